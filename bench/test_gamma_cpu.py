"""Cost of the gamma loss: GammaContrastiveLoss (E-step + surrogate) fwd+bwd against InfoNCE, same shapes.

Both run the torch backend on CPU in float32, symmetric, in the same session;
the rows carry the time ratio gamma / InfoNCE (target ≤ 1.05). Writes
``bench/results/gamma_cpu.json``. ``TILECL_BENCH_MAX_N`` caps N.
"""

from __future__ import annotations

import os

import pytest
import torch

import tilecl

from .conftest import median_time, merge_rows

NS = [1024, 4096, 8192]
DS = [128, 512]
MAX_N = int(os.environ.get("TILECL_BENCH_MAX_N", str(max(NS))))


def _inputs(n: int, d: int):
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1).requires_grad_()
    return a, b, torch.tensor(14.3, requires_grad=True)


@pytest.mark.parametrize("n,d", [(n, d) for d in DS for n in NS if n <= MAX_N])
def test_gamma_vs_infonce(benchmark, n, d):
    a, b, scale = _inputs(n, d)
    index = torch.arange(n)
    gamma_loss = tilecl.GammaContrastiveLoss(n, generator=torch.Generator().manual_seed(0))

    def infonce():
        tilecl.contrastive_loss(a, b, scale).backward()

    def gamma():
        gamma_loss(a, b, index, scale).backward()

    rounds = 7 if n <= 4096 else 5
    # interleave the two so that machine noise hits both alike
    t_info, t_gamma = [], []
    for _ in range(3):
        t_info.append(median_time(infonce, rounds))
        t_gamma.append(median_time(gamma, rounds))
    benchmark.pedantic(gamma, rounds=1)
    row = {
        "n": n,
        "d": d,
        "infonce_s": min(t_info),
        "gamma_s": min(t_gamma),
        "ratio_gamma_to_infonce": min(t_gamma) / min(t_info),
    }
    benchmark.extra_info.update(row)
    merge_rows("gamma_cpu.json", [row], ("d", "n"))
