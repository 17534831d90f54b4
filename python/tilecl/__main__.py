"""Command line: ``python -m tilecl {demo, reproduce synthetic|digits, inspect}``."""

from __future__ import annotations

import argparse
import importlib
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tilecl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="fast synthetic reproduction, then the digits two-tower demo")
    demo.add_argument("--epochs", type=int, default=150)
    demo.add_argument("--batch-size", type=int, default=256)
    demo.add_argument("--memory-n", type=int, default=16384, help="batch size of the memory comparison")
    demo.add_argument("--memory-d", type=int, default=128)
    demo.add_argument("--out", default="results", help="folder for the reproduction's JSON and plot")
    demo.add_argument("--skip-reproduction", action="store_true")

    reproduce = commands.add_parser("reproduce", help="the article's experiments")
    experiments = reproduce.add_subparsers(dest="experiment", required=True)
    synthetic = experiments.add_parser("synthetic", help="θ* = 1 synthetic: InfoNCE vs gamma-EM")
    synthetic.add_argument("--seeds", type=int, default=10)
    synthetic.add_argument("--steps", type=int, default=30000)
    synthetic.add_argument("--negatives", type=int, default=8)
    synthetic.add_argument("--gamma", type=float, default=0.02, help="memory rate γ of gamma-EM")
    synthetic.add_argument("--fast", action="store_true", help="3 seeds x 6000 steps (the make demo setting)")
    synthetic.add_argument("--json", default="results/synthetic.json")
    synthetic.add_argument("--plot", default="results/synthetic.png")
    digits = experiments.add_parser("digits", help="digits towers: InfoNCE at B and 4B vs gamma-EM at B")
    digits.add_argument("--seeds", type=int, default=3)
    digits.add_argument("--batch", type=int, default=32)
    digits.add_argument("--epochs", type=int, default=60)
    digits.add_argument("--gamma", type=float, default=0.9)
    digits.add_argument("--estimator", choices=("sample", "mean"), default="sample")
    digits.add_argument("--json", default="results/digits.json")
    digits.add_argument("--plot", default="results/digits.png")

    modality = experiments.add_parser("modality", help="digits with an information gap: CLIP vs regularizers")
    modality.add_argument("--seeds", type=int, default=3)
    modality.add_argument("--epochs", type=int, default=100)
    modality.add_argument("--batch", type=int, default=128)
    modality.add_argument("--json", default="results/modality.json")
    modality.add_argument("--plot", default="results/modality.png")

    inspect = commands.add_parser(
        "inspect", help="compile the Triton and CUDA C++ kernels for sm_80/sm_90 and report (no GPU needed)"
    )
    inspect.add_argument("--json", default=None)
    inspect.add_argument("--only", choices=("triton", "cuda"), default=None, help="one section only")

    args = parser.parse_args(argv)
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
            f"tilecl {args.command}: this command needs {error.name!r}, which is not installed; "
            f"install it with: pip install 'tilecl[{extra}]'"
        ) from None


#: optional packages the CLI commands use → the extra that installs them
OPTIONAL_MODULES = {"sklearn": "demo", "tqdm": "demo", "matplotlib": "demo", "triton": "gpu"}
#: what each command imports, checked before it starts
REQUIRED_MODULES = {"demo": ("sklearn", "tqdm", "matplotlib"), "reproduce": ("sklearn", "tqdm", "matplotlib")}


def _run(args: argparse.Namespace) -> None:
    if args.command == "demo":
        from .demo import run_demo

        if not args.skip_reproduction:
            from .reproduce import fast_config, run_synthetic

            print("== 1. the article's synthetic experiment, fast mode (3 seeds x 6000 steps) ==")
            run_synthetic(
                fast_config(), 3, f"{args.out}/synthetic-fast.json", f"{args.out}/synthetic-fast.png"
            )
            print("\n== 2. tilecl.ClipLoss on digits halves ==")
        run_demo(args.epochs, args.batch_size, args.memory_n, args.memory_d)
    elif args.command == "inspect":
        from .inspect_kernels import main as inspect_main

        inspect_main(args.json, args.only)
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
