"""The sigmoid (SigLIP) loss fwd+bwd on CPU, float32: tilecl (torch backend) against open_clip's formula.

Providers: ``tilecl`` (:func:`tilecl.sigmoid_loss`, the fused sweep) and
``open_clip`` (``SigLipLoss``'s single-process formula, ``−logsigmoid(z ∘ ℓ)``
over the stored ``N x N`` logits, as :func:`tilecl.testing.naive.naive_sigmoid_loss`).
open_clip's chunked variant is not a provider: open_clip is not installed
with this project (it pulls its own torch). Per configuration: time (fastest of a few
warm runs; one cold run inside the memory probe from ``N = 65,536`` on), the
ratio to open_clip's, peak extra memory (fresh subprocess), and efficiency —
the time of three ``torch.mm`` products of the loss's shape (``N x D`` by
``D x N``, then the two ``N x N`` by ``N x D``) measured in the same run,
divided by the loss's time (modelled from ``torch.mm``'s FLOP/s above
``N = 16,384``, where the products' ``N x N`` output does not fit).

Writes ``bench/results/siglip_cpu.json``; ``TILECL_BENCH_MAX_N`` caps N.
"""

from __future__ import annotations

import os

import pytest
import torch

import tilecl
from experiments.memory import peak_extra_memory_cpu
from tilecl.testing.naive import naive_sigmoid_loss

from .conftest import fastest_time, matmul_flops, merge_rows

NS = [1024, 4096, 8192, 16384, 65536]
DS = [128, 512]
#: the memory target's shape: tilecl only
HUGE = (262144, 256)
MAX_N = int(os.environ.get("TILECL_BENCH_MAX_N", str(max(NS))))
#: from here on one fwd+bwd takes tens of seconds: time it once, in the memory-probe process
PROBE_ONLY_N = 65536
#: the largest N whose three N x N products are measured directly (1 GiB output)
MEASURED_MM_N = 16384
RAM_BYTES = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
#: open_clip's formula holds ~4 N x N float32 buffers at its peak (logits, signs, logsigmoid, grad)
OPEN_CLIP_BYTES_PER_N2 = 16


def three_mm_seconds(n: int, d: int) -> float:
    """``S = a bᵀ``, ``S·b`` and ``Sᵀ·a``: the products a fused sigmoid fwd+bwd cannot avoid."""
    a, b = torch.randn(n, d), torch.randn(n, d)
    scores = torch.empty(n, n)
    out_a, out_b = torch.empty(n, d), torch.empty(n, d)

    def products() -> None:
        torch.mm(a, b.t(), out=scores)
        torch.mm(scores, b, out=out_a)
        torch.mm(scores.t(), a, out=out_b)

    return fastest_time(products, 3)


def configs():
    for d in DS:
        for n in NS:
            if n <= MAX_N:
                for provider in ("tilecl", "open_clip"):
                    yield pytest.param(provider, n, d, id=f"{provider}-N{n}-D{d}")
    if HUGE[0] <= MAX_N:
        yield pytest.param("tilecl", *HUGE, id=f"tilecl-N{HUGE[0]}-D{HUGE[1]}")


@pytest.mark.parametrize("provider,n,d", list(configs()))
def test_siglip_fwd_bwd(benchmark, provider, n, d):
    row = {"provider": provider, "n": n, "d": d, "dtype": "float32"}
    if provider.startswith("open_clip") and OPEN_CLIP_BYTES_PER_N2 * n * n > 0.8 * RAM_BYTES:
        row["skipped"] = f"needs ~{OPEN_CLIP_BYTES_PER_N2 * n * n / 2**30:.0f} GiB for N x N buffers"
        merge_rows("siglip_cpu.json", [row], ("provider", "d", "n"))
        pytest.skip(row["skipped"])
    probe_name = {"tilecl": "tilecl-sigmoid", "open_clip": "naive-sigmoid"}[provider]
    probe = peak_extra_memory_cpu(probe_name, n, d)
    row["peak_extra_bytes"] = probe["peak_extra_bytes"]
    if n >= PROBE_ONLY_N:
        benchmark.pedantic(lambda: None, rounds=1)
        row["time_s"] = probe["seconds"]
        row["timing"] = "one cold run in the memory-probe process"
    else:
        gen = torch.Generator().manual_seed(0)
        a = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1).requires_grad_()
        b = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1).requires_grad_()
        scale = torch.tensor(10.0, requires_grad=True)
        bias = torch.tensor(-10.0, requires_grad=True)
        fn = tilecl.sigmoid_loss if provider == "tilecl" else naive_sigmoid_loss

        def step() -> None:
            fn(a, b, scale, bias).backward()

        runs = 5 if n <= 4096 else 3
        row["time_s"] = fastest_time(step, runs)
        row["timing"] = f"fastest of {runs} warm runs"
        benchmark.pedantic(step, rounds=1)
    if n <= MEASURED_MM_N:
        row["three_mm_s"] = three_mm_seconds(n, d)
        row["three_mm_timing"] = "measured"
    else:
        row["three_mm_s"] = 3 * 2 * n * n * d / matmul_flops(d)
        row["three_mm_timing"] = "modelled from torch.mm FLOP/s at 4096 x D x 4096"
    row["efficiency"] = row["three_mm_s"] / row["time_s"]
    benchmark.extra_info.update(row)
    merge_rows("siglip_cpu.json", [row], ("provider", "d", "n"))
