"""tilecl against the full-matrix loss where a drop-in is judged: small batches and any embeddings.

Symmetric CLIP fwd+bwd, CPU float32, torch backend (what ``auto`` picks on
CPU), for N from 64 up, D in ``--dims``, and four kinds of inputs: L2-normalized
features at logit scale 14.3 (CLIP's initial 1/0.07) and 100 (its cap), and
unnormalized ``randn`` features (dot-product embeddings, sentence-transformers'
``dot_score``) at scale 10 and 100. tilecl and the naive loss alternate, each
first in every other round, so a loaded machine slows them alike; a row is
the median of the rounds.

    python -m bench.small_batch                 # writes bench/results/small_batch_cpu.json
    python -m bench.plot --json bench/results/small_batch_cpu.json --out bench/results/small_batch_cpu.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

#: (features, logit scale)
INPUTS = (("normalized", 14.3), ("normalized", 100.0), ("unnormalized", 10.0), ("unnormalized", 100.0))


def _rounds(n: int, d: int, most: int) -> int:
    """Enough rounds for a stable median in about a second per configuration."""
    return max(5, min(most, int(4e8 / (6 * n * n * d + 1e6))))


def measure(n: int, d: int, features: str, scale: float, most_rounds: int = 200) -> dict[str, Any]:
    import torch

    import tilecl
    from tilecl.testing.naive import naive_contrastive_loss

    gen = torch.Generator().manual_seed(n + d)
    a, b = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    if features == "normalized":
        a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    a.requires_grad_()
    b.requires_grad_()
    logit_scale = torch.tensor(scale, requires_grad=True)
    losses: dict[str, Callable[..., Any]] = {
        "tilecl": tilecl.contrastive_loss,
        "naive": naive_contrastive_loss,
    }

    def step(loss: Callable[..., Any]) -> float:
        start = time.perf_counter()
        loss(a, b, logit_scale).backward()
        seconds = time.perf_counter() - start
        a.grad = b.grad = logit_scale.grad = None
        return seconds

    for loss in losses.values():
        step(loss)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in losses}
    for k in range(_rounds(n, d, most_rounds)):
        for name in list(losses)[:: 1 if k % 2 == 0 else -1]:
            times[name].append(step(losses[name]))
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        "n": n,
        "d": d,
        "features": features,
        "scale": scale,
        "inputs": f"{features}, scale {scale:g}",
        "provider": "tilecl",
        "time_s": median["tilecl"],
        "naive_time_s": median["naive"],
        "ratio": median["tilecl"] / median["naive"],
        "rounds": len(times["tilecl"]),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 512])
    parser.add_argument("--rounds", type=int, default=200, help="at most this many rounds per row")
    parser.add_argument("--out", default="bench/results/small_batch_cpu.json")
    args = parser.parse_args(argv)
    rows = []
    for d in args.dims:
        for n in args.sizes:
            for features, scale in INPUTS:
                rows.append(measure(n, d, features, scale, args.rounds))
                row = rows[-1]
                print(f"D={d:4d} N={n:5d} {row['inputs']:>26}: tilecl / naive {row['ratio']:.2f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
