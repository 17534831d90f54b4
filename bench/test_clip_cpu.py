"""Symmetric CLIP fwd+bwd on CPU, float32: tilecl (torch backend) against the naive full-matrix loss.

Per configuration: time, time ratio to naive (same session), peak extra memory
(fresh subprocess) and efficiency ``6·N²·D / (time × torch.mm FLOP/s)``.
Configurations whose single fwd+bwd takes minutes run once, inside the
memory-probe subprocess, and report that run's time.

Environment: ``TILECL_BENCH_MAX_N`` caps N (default: the whole sweep, about
45 minutes on 2 cores); ``TILECL_BENCH_OUT`` names the JSON file.
"""

from __future__ import annotations

import os

import pytest
import torch

import tilecl
from experiments.memory import peak_extra_memory_cpu
from tilecl.testing.naive import naive_contrastive_loss

from .conftest import matmul_flops

NS = [1024, 4096, 8192, 16384, 65536, 262144]
DS = [128, 256, 512]
MAX_N = int(os.environ.get("TILECL_BENCH_MAX_N", str(max(NS))))
#: above this N one fwd+bwd takes minutes: time it once, in the memory-probe process
SUBPROCESS_ONLY_N = 65536
#: the naive loss holds ~4 N x N float32 buffers at its peak
NAIVE_BYTES_PER_N2 = 16
RAM_BYTES = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def configs():
    for d in DS:
        for n in NS:
            if n > MAX_N or (d == 256 and n != 262144):
                continue  # D = 256 only for the N = 262144 memory target
            for provider in ("tilecl", "naive"):
                yield pytest.param(provider, n, d, id=f"{provider}-N{n}-D{d}")


def fwd_bwd(provider: str, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> None:
    fn = tilecl.contrastive_loss if provider == "tilecl" else naive_contrastive_loss
    fn(a, b, scale).backward()
    a.grad = b.grad = scale.grad = None


@pytest.mark.parametrize("provider,n,d", list(configs()))
def test_clip_fwd_bwd(benchmark, rows, provider, n, d):
    row = {"provider": provider, "n": n, "d": d, "dtype": "float32", "symmetric": True}
    if provider == "naive" and NAIVE_BYTES_PER_N2 * n * n > 0.8 * RAM_BYTES:
        row["skipped"] = f"naive needs ~{NAIVE_BYTES_PER_N2 * n * n / 2**30:.0f} GiB for N x N buffers"
        rows.append(row)
        pytest.skip(row["skipped"])
    flops = matmul_flops(d)
    probe = peak_extra_memory_cpu(provider, n, d)
    row["peak_extra_bytes"] = probe["peak_extra_bytes"]
    if n >= SUBPROCESS_ONLY_N:
        benchmark.pedantic(lambda: None, rounds=1)
        row["time_s"] = probe["seconds"]
        row["timing"] = "one cold run in the memory-probe process"
    else:
        gen = torch.Generator().manual_seed(0)
        a = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1).requires_grad_()
        b = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1).requires_grad_()
        scale = torch.tensor(14.3, requires_grad=True)
        rounds = 5 if n <= 4096 else 3
        benchmark.pedantic(fwd_bwd, args=(provider, a, b, scale), rounds=rounds, warmup_rounds=1)
        row["time_s"] = benchmark.stats.stats.median
        row["timing"] = f"median of {rounds} warm runs"
    row["matmul_flops"] = flops
    row["efficiency"] = 6 * n * n * d / (row["time_s"] * flops)
    benchmark.extra_info.update(row)
    rows.append(row)
