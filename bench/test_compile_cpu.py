"""Every loss fwd+bwd compiled (``torch.compile(fullgraph=True)``, inductor) against eager, CPU float32.

The torch backend, ``D = 256``, each loss at ``N = 2048`` and the losses a
training step is made of at ``N = 8192`` too. Eager and compiled runs are
interleaved so that machine noise hits both alike, and each reports its fastest
run (as ``timeit``: interference only ever adds time, and on a shared 2-core
machine it varies by ±15% between medians); compilation happens in a warm-up
call before timing. Writes ``bench/results/compile_cpu.json`` (rows:
loss, N, D, eager and compiled seconds, their ratio). ``TILECL_BENCH_MAX_N``
caps N.
"""

from __future__ import annotations

import os
from typing import Callable

import pytest
import torch

import tilecl

from .conftest import fastest_time, merge_rows

D = 256
NS = [2048, 8192]
MAX_N = int(os.environ.get("TILECL_BENCH_MAX_N", str(max(NS))))
#: the losses also timed at the larger N
LARGE = ("clip", "nt_xent", "GammaContrastiveLoss")
#: eager and compiled alternate this many times, a few runs each
INTERLEAVED = 4


def _features(n: int, count: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    return [
        torch.nn.functional.normalize(torch.randn(n, D, generator=gen), dim=1).requires_grad_()
        for _ in range(count)
    ]


def _losses(n: int) -> dict[str, Callable[[], torch.Tensor]]:
    """Each loss as ``fn(*tensors)`` with its tensors, at batch size ``n``."""
    scale = torch.tensor(14.3, requires_grad=True)
    a, b, c, e, f, g = _features(n, 6)
    labels = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    log_u = [torch.randn(n, generator=torch.Generator().manual_seed(k)) for k in (1, 2)]
    gamma = tilecl.GammaContrastiveLoss(n, estimator="mean")
    index = torch.arange(n)
    return {
        "clip": (lambda a, b, s: tilecl.contrastive_loss(a, b, s), (a, b, scale)),
        "clip-labels-negatives": (
            lambda a, b, c, s, y: tilecl.contrastive_loss(a, b, s, labels=y, negatives=c, symmetric=False),
            (a, b, c, scale, labels),
        ),
        "nt_xent": (lambda a, b: tilecl.nt_xent_loss(a, b, 0.2), (a, b)),
        "gamma-surrogate": (
            lambda a, b, s, u, w: tilecl.gamma_contrastive_loss(a, b, u, w, s),
            (a, b, scale, *log_u),
        ),
        "GammaContrastiveLoss": (gamma, (a, b, index, scale)),
        "uniformity": (lambda z: tilecl.uniformity_loss(z), (a,)),
        "geometric-consistency": (tilecl.geometric_consistency_loss, (a, b, c, e)),
        "brownian-bridge": (tilecl.brownian_bridge_loss, (a, b, c)),
        "feature-separation": (
            lambda *z: tilecl.feature_separation_loss(*z, 0.2),
            (a, b, c, e, f, g),
        ),
    }


def configs():
    for n in NS:
        for name in _losses(4):
            if n <= MAX_N and (n == min(NS) or name in LARGE):
                yield pytest.param(name, n, id=f"{name}-N{n}")


@pytest.mark.parametrize("name,n", list(configs()))
def test_compiled_vs_eager(benchmark, name, n):
    torch._dynamo.reset()
    fn, args = _losses(n)[name]
    compiled = torch.compile(fn, fullgraph=True)

    def step(loss_fn) -> Callable[[], None]:
        def run() -> None:
            loss_fn(*args).backward()

        return run

    step(compiled)()  # compile outside the timing
    step(fn)()
    rounds = 5 if n <= 2048 else 3
    eager_s, compiled_s = [], []
    for _ in range(INTERLEAVED):
        eager_s.append(fastest_time(step(fn), rounds))
        compiled_s.append(fastest_time(step(compiled), rounds))
    benchmark.pedantic(step(compiled), rounds=1)
    row = {
        "loss": name,
        "n": n,
        "d": D,
        "eager_s": min(eager_s),
        "compiled_s": min(compiled_s),
        "ratio_compiled_to_eager": min(compiled_s) / min(eager_s),
    }
    benchmark.extra_info.update(row)
    merge_rows("compile_cpu.json", [row], ("loss", "n", "d"))
