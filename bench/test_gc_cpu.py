"""Geometric consistency fwd+bwd on CPU: tilecl's d×d-Gram form against the naive N×N formula (CyCLIP's).

Per configuration: time of each (median of warm runs, same session), the
speed-up, and peak extra memory (fresh subprocess). Writes
``bench/results/gc_cpu.json``. ``TILECL_BENCH_MAX_N`` caps N.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import tilecl

from .conftest import median_time, merge_rows

NS = [1024, 4096, 16384]
DS = [128, 256, 512]
MAX_N = int(os.environ.get("TILECL_BENCH_MAX_N", str(max(NS))))

_CHILD = r"""
import json, sys, torch, torch.nn.functional as F
sys.path.insert(0, sys.argv[4])
from bench.test_gc_cpu import naive_gc
import tilecl
provider, n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
gen = torch.Generator().manual_seed(0)
zv = F.normalize(torch.randn(n, d, generator=gen), dim=1).requires_grad_()
zt = F.normalize(torch.randn(n, d, generator=gen), dim=1).requires_grad_()
fn = tilecl.geometric_consistency_loss if provider == "tilecl" else naive_gc
fn(zv[:64].detach().requires_grad_(), zt[:64].detach().requires_grad_()).backward()
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
fn(zv, zt).backward()
print(json.dumps({"peak_extra_bytes": status("VmHWM") - before}))
"""


def naive_gc(z_v: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """CyCLIP-style: the N×N similarity matrices formed in the input dtype."""
    s_vt = z_v @ z_t.T
    n = z_v.shape[0]
    return (((s_vt - s_vt.T) ** 2).sum() + ((z_v @ z_v.T - z_t @ z_t.T) ** 2).sum()) / n


@pytest.mark.parametrize("n,d", [(n, d) for d in DS for n in NS if n <= MAX_N])
def test_gc_vs_naive(benchmark, n, d):
    gen = torch.Generator().manual_seed(0)
    z_v = F.normalize(torch.randn(n, d, generator=gen), dim=1).requires_grad_()
    z_t = F.normalize(torch.randn(n, d, generator=gen), dim=1).requires_grad_()

    def run(fn):
        return lambda: fn(z_v, z_t).backward()

    rounds = 5 if n <= 4096 else 3
    t_ours = median_time(run(tilecl.geometric_consistency_loss), rounds)
    t_naive = median_time(run(naive_gc), rounds)
    benchmark.pedantic(run(tilecl.geometric_consistency_loss), rounds=1)
    memory = {}
    root = os.path.dirname(os.path.dirname(__file__))
    for provider in ("tilecl", "naive"):
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, provider, str(n), str(d), root],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        memory[provider] = json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]
    row = {
        "n": n,
        "d": d,
        "tilecl_s": t_ours,
        "naive_s": t_naive,
        "speedup": t_naive / t_ours,
        "tilecl_peak_extra_bytes": memory["tilecl"],
        "naive_peak_extra_bytes": memory["naive"],
    }
    benchmark.extra_info.update(row)
    merge_rows("gc_cpu.json", [row], ("d", "n"))
