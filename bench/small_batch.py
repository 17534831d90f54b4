"""tilecl against the full-matrix loss where a drop-in is judged: small batches and any embeddings.

fwd+bwd, CPU float32, torch backend (what ``auto`` picks on CPU), for N from
64 up, D in ``--dims``, and four kinds of inputs: L2-normalized features at
logit scale 14.3 (CLIP's initial 1/0.07) and 100 (its cap), and unnormalized
``randn`` features (dot-product embeddings, sentence-transformers'
``dot_score``) at scale 10 and 100. ``--losses``: symmetric CLIP against the
full-matrix CLIP loss, SigLIP against open_clip's formula, SupCon against the
stored-mask SupCon (PML's formula; 8 classes, it normalizes its features
itself, so its rows are one kind of input). tilecl and the naive loss
alternate, each first in every other round, so a loaded machine slows them
alike; a row is the median of the rounds. It also prints the per-call counts
at N = 128 (:func:`counts`: ATen operations and Python function calls per
fwd+bwd, deterministic), which ``tests/test_call_counts.py`` holds.

    python -m bench.small_batch                 # writes bench/results/small_batch_cpu.json
    python -m bench.plot --json bench/results/small_batch_cpu.json --out bench/results/small_batch_cpu.png
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time
from pathlib import Path
from typing import Any, Callable

#: (features, logit scale)
INPUTS = (("normalized", 14.3), ("normalized", 100.0), ("unnormalized", 10.0), ("unnormalized", 100.0))
#: the largest N of the SigLIP and SupCon rows (the targets are stated up to there)
SMALL_LOSSES_UP_TO = 2048


def _rounds(n: int, d: int, most: int) -> int:
    """Enough rounds for a stable median in about a second per configuration."""
    return max(5, min(most, int(4e8 / (6 * n * n * d + 1e6))))


def losses(kind: str) -> dict[str, Callable[..., Any]]:
    """``{"tilecl": ..., "naive": ...}``: the two losses of a row, each called ``(a, b, scale)``."""
    import torch

    import tilecl
    from tilecl.testing import naive

    if kind == "clip":
        return {"tilecl": tilecl.contrastive_loss, "naive": naive.naive_contrastive_loss}
    if kind == "siglip":
        bias = torch.tensor(-10.0, requires_grad=True)
        return {
            "tilecl": lambda a, b, s: tilecl.sigmoid_loss(a, b, s, bias),
            "naive": lambda a, b, s: naive.naive_sigmoid_loss(a, b, s, bias),
        }
    if kind == "supcon":
        classes: dict[int, torch.Tensor] = {}

        def labels(n: int) -> torch.Tensor:
            if n not in classes:
                classes[n] = torch.randint(0, 8, (n,), generator=torch.Generator().manual_seed(n))
            return classes[n]

        def supcon(loss: Callable[..., Any]) -> Callable[..., Any]:
            # one tower of 2N views in 8 classes, temperature 1/scale (a number: PML's and ours)
            return lambda a, b, s: loss(torch.cat([a, b]), labels(2 * a.shape[0]), 1 / float(s.detach()))

        return {"tilecl": supcon(tilecl.supcon_loss), "naive": supcon(naive.naive_supcon_loss)}
    raise ValueError(f"unknown loss {kind!r}")


def _inputs(n: int, d: int, features: str, scale: float) -> tuple[Any, Any, Any]:
    import torch

    gen = torch.Generator().manual_seed(n + d)
    a, b = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    if features == "normalized":
        a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    return a.requires_grad_(), b.requires_grad_(), torch.tensor(scale, requires_grad=True)


def measure(
    n: int, d: int, features: str, scale: float, most_rounds: int = 200, kind: str = "clip"
) -> dict[str, Any]:
    import torch

    a, b, logit_scale = _inputs(n, d, features, scale)
    pair = losses(kind)

    def step(loss: Callable[..., Any]) -> float:
        start = time.perf_counter()
        loss(a, b, logit_scale).backward()
        seconds = time.perf_counter() - start
        a.grad = b.grad = logit_scale.grad = None
        return seconds

    for loss in pair.values():
        step(loss)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in pair}
    for k in range(_rounds(n, d, most_rounds)):
        for name in list(pair)[:: 1 if k % 2 == 0 else -1]:
            times[name].append(step(pair[name]))
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        "loss": kind,
        "n": n,
        "d": d,
        "features": features,
        "scale": scale,
        "inputs": f"{kind}, {features}, scale {scale:g}",
        "provider": "tilecl",
        "time_s": median["tilecl"],
        "naive_time_s": median["naive"],
        "ratio": median["tilecl"] / median["naive"],
        "rounds": len(times["tilecl"]),
        "threads": torch.get_num_threads(),
    }


def counts(kind: str = "clip", n: int = 128, d: int = 128) -> dict[str, dict[str, int]]:
    """Per fwd+bwd of each loss of ``kind`` at ``N = n``: ``{"tilecl" | "naive": {"aten": n, "python": n}}``.

    ATen operations are counted by a ``TorchDispatchMode`` (each is a kernel
    launch on a GPU), Python function calls by ``cProfile`` (builtins and
    torch's own Python included); both after a warm-up call, so they are
    deterministic.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.ops += 1
            return func(*args, **(kwargs or {}))

    a, b, logit_scale = _inputs(n, d, "normalized", 14.3)
    found = {}
    for name, loss in losses(kind).items():
        loss(a, b, logit_scale).backward()
        with Count() as counted:
            loss(a, b, logit_scale).backward()
        profile = cProfile.Profile()
        profile.enable()
        loss(a, b, logit_scale).backward()
        profile.disable()
        calls = pstats.Stats(profile).total_calls  # type: ignore[attr-defined]
        found[name] = {"aten": counted.ops, "python": calls}
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 512])
    parser.add_argument("--losses", nargs="+", default=["clip", "siglip", "supcon"])
    parser.add_argument("--rounds", type=int, default=200, help="at most this many rounds per row")
    parser.add_argument("--out", default="bench/results/small_batch_cpu.json")
    args = parser.parse_args(argv)
    found = {kind: counts(kind) for kind in args.losses}
    for kind, pair in found.items():
        mine, theirs = pair["tilecl"], pair["naive"]
        print(
            f"{kind} N=128 per fwd+bwd: ATen ops {mine['aten']} (full-matrix {theirs['aten']}), "
            f"Python calls {mine['python']} (full-matrix {theirs['python']})",
            flush=True,
        )
    rows = []
    for kind in args.losses:
        inputs = INPUTS if kind != "supcon" else INPUTS[:1]
        sizes = [n for n in args.sizes if kind == "clip" or n <= SMALL_LOSSES_UP_TO]
        for d in args.dims:
            for n in sizes:
                for features, scale in inputs:
                    rows.append(measure(n, d, features, scale, args.rounds, kind))
                    row = rows[-1]
                    line = f"D={d:4d} N={n:5d} {row['inputs']:>34}: tilecl / naive {row['ratio']:.2f}"
                    print(line, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"counts_n128": found, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
