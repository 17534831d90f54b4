"""The distributed CLIP and SigLIP losses on CPU ranks (gloo over loopback): time, bytes, memory per step.

Per configuration (ranks W, ``dist_impl``, global batch N, D): W processes
with one torch thread each (this machine has 2 cores: W = 4 oversubscribes
them, so its times measure the schedule, not the algorithm), float32
features, the symmetric loss forward + backward.

* ``time_s`` — median over ``ROUNDS`` steps (a barrier before each) of the
  slowest rank's step time;
* ``loopback_bytes_per_rank`` — the loopback interface's transmitted bytes
  during one step (``/proc/net/dev``, all ranks' traffic incl. TCP headers and
  the barrier), divided by W — measured, not modelled;
* ``model_bytes_per_rank`` — the payload per rank the implementation is
  designed to send (docs/results.md's table) for comparison;
* ``peak_extra_bytes`` — the largest per-rank growth of the resident set
  during one step (``/proc/self/clear_refs`` + ``VmHWM``).

A single-process row (``impl="single"``, all cores) gives the reference time.
Writes ``bench/results/distributed_cpu.json`` (CLIP),
``bench/results/siglip_distributed_cpu.json`` (the sigmoid loss) and
``bench/results/distributed_uneven_cpu.json`` (CLIP, ranks of different
sizes, with every rank's peak);
``TILECL_BENCH_MAX_N`` caps N.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
import time
from typing import Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tilecl

from .conftest import median_time, merge_rows

NS = [4096, 16384]
D = 256
WORLDS = [2, 4]
ROUNDS = 3
MAX_N = int(os.environ.get("TILECL_BENCH_MAX_N", str(max(NS))))


def loopback_tx_bytes() -> int:
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, fields = line.partition(":")
            if name.strip() == "lo":
                return int(fields.split()[8])
    raise RuntimeError("no loopback interface in /proc/net/dev")


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def model_bytes_per_rank(impl: str, world: int, n: int, d: int, itemsize: int = 4) -> int:
    """Payload one rank sends per step by design (features in the input dtype, statistics float32)."""
    local = n // world
    features = local * d * itemsize
    if impl == "gather":
        vectors = 2 * (2 * (world - 1) * n * 4) // world  # two all-reduces of the N column statistics
        # forward all-gather of b (kept for the backward); backward all-gather of (r, h), reduce-scatter of dB
        gathers = (world - 1) * (features + 2 * local * 4 + local * d * 4)
        return gathers + vectors
    # ring: b (and in the backward r, h) travels W-1 hops; the column stats and dB accumulators W hops
    forward = (world - 1) * features + world * local * 4
    backward = (world - 1) * (features + 2 * local * 4) + world * local * d * 4
    return forward + backward


def model_sigmoid_bytes_per_rank(impl: str, world: int, n: int, d: int, itemsize: int = 4) -> int:
    """The sigmoid loss's payload per rank: the columns with their int64 keys out, ``dB`` back."""
    local = n // world
    columns = local * (d * itemsize + 8)
    grads = local * d * 4
    if impl == "gather":
        return (world - 1) * (columns + grads)  # all-gather of b and keys, reduce-scatter of dB
    return (world - 1) * columns + world * grads  # W-1 hops for b, W hops for the dB accumulator


def _loss(kind: str, a: torch.Tensor, b: torch.Tensor, group, impl: str) -> torch.Tensor:
    if kind == "sigmoid":
        return tilecl.sigmoid_loss(a, b, 10.0, -10.0, backend="torch", process_group=group, dist_impl=impl)
    return tilecl.contrastive_loss(a, b, 20.0, backend="torch", process_group=group, dist_impl=impl)


def _worker(
    rank: int, world: int, store: str, out: str, impl: str, n: int, d: int, kind: str, sizes: list[int]
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(rank)
    local = sizes[rank]
    a = torch.nn.functional.normalize(torch.randn(local, d, generator=gen), dim=1).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(local, d, generator=gen), dim=1).requires_grad_()
    group = dist.group.WORLD

    def step() -> float:
        dist.barrier()
        start = time.perf_counter()
        _loss(kind, a, b, group, impl).backward()
        return time.perf_counter() - start

    step()  # warm-up
    dist.barrier()
    before = loopback_tx_bytes()
    open("/proc/self/clear_refs", "w").write("5")
    rss_before = _rss("VmRSS")
    step()
    peak = torch.tensor([_rss("VmHWM") - rss_before], dtype=torch.float64)
    dist.barrier()
    traffic = loopback_tx_bytes() - before
    times = []
    for _ in range(ROUNDS):
        slowest = torch.tensor([step()], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        times.append(float(slowest))
    peaks = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(peaks, peak)
    if rank == 0:
        row = {
            "impl": impl,
            "world": world,
            "n": n,
            "d": d,
            "time_s": sorted(times)[len(times) // 2],
            "loopback_bytes_per_rank": traffic / world,
            "model_bytes_per_rank": (
                model_sigmoid_bytes_per_rank if kind == "sigmoid" else model_bytes_per_rank
            )(impl, world, n, d),
            "peak_extra_bytes": max(float(p) for p in peaks),
        }
        if len(set(sizes)) > 1:
            row["sizes"] = sizes
            row["peak_extra_bytes_per_rank"] = [float(p) for p in peaks]
            del row["model_bytes_per_rank"]  # the model above is for equal shards
        with open(out, "w") as f:
            json.dump(row, f)
    dist.destroy_process_group()


def run_ranks(
    impl: str, world: int, n: int, d: int, kind: str = "clip", sizes: Optional[list[int]] = None
) -> dict:
    """One configuration's row; ``sizes``: rows per rank (default ``n // world`` each)."""
    sizes = [n // world] * world if sizes is None else sizes
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        store = os.path.join(tmp, "store")
        mp.spawn(_worker, args=(world, store, out, impl, n, d, kind, sizes), nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)


CONFIGS = [(impl, w, n) for n in NS if n <= MAX_N for w in WORLDS for impl in ("gather", "ring")]


@pytest.mark.parametrize("impl,world,n", CONFIGS)
def test_distributed_step(impl, world, n):
    row = run_ranks(impl, world, n, D)
    merge_rows("distributed_cpu.json", [row], ("n", "world", "impl"))


@pytest.mark.parametrize("impl,world,n", CONFIGS)
def test_siglip_distributed_step(impl, world, n):
    row = run_ranks(impl, world, n, D, "sigmoid")
    merge_rows("siglip_distributed_cpu.json", [row], ("n", "world", "impl"))


#: uneven layouts of 4 ranks with the same largest rank (4096 rows): the ring's peak per rank should
#: follow that largest block (O(max N_r · D)), the gather's the global batch (O(N · D)). D is large
#: enough that the feature buffers, not the tiles, set the peak.
UNEVEN = {"one rank": [0, 0, 0, 4096], "uneven": [0, 256, 1024, 4096], "three more": [1024, 1024, 1024, 4096]}
UNEVEN_D = 1024


@pytest.mark.parametrize("impl", ["gather", "ring"])
@pytest.mark.parametrize("layout", list(UNEVEN))
def test_uneven_step_memory(impl, layout, monkeypatch):
    # a fixed mmap threshold: every large buffer is mapped and unmapped, so the resident set follows
    # the live tensors (glibc's adaptive threshold would keep freed warm-up buffers in the heap)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    sizes = UNEVEN[layout]
    row = run_ranks(impl, len(sizes), sum(sizes), UNEVEN_D, sizes=sizes)
    merge_rows("distributed_uneven_cpu.json", [{"layout": layout, **row}], ("layout", "impl"))


@pytest.mark.parametrize("n", [n for n in NS if n <= MAX_N])
def test_siglip_single_process_reference(n):
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(n, D, generator=gen), dim=1).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(n, D, generator=gen), dim=1).requires_grad_()
    seconds = median_time(lambda: _loss("sigmoid", a, b, None, "gather").backward(), ROUNDS)
    row = {"impl": "single", "world": 1, "n": n, "d": D, "time_s": seconds}
    merge_rows("siglip_distributed_cpu.json", [row], ("n", "world", "impl"))


@pytest.mark.parametrize("n", [n for n in NS if n <= MAX_N])
def test_single_process_reference(n):
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(n, D, generator=gen), dim=1).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(n, D, generator=gen), dim=1).requires_grad_()
    seconds = median_time(lambda: tilecl.contrastive_loss(a, b, 20.0, backend="torch").backward(), ROUNDS)
    row = {"impl": "single", "world": 1, "n": n, "d": D, "time_s": seconds}
    merge_rows("distributed_cpu.json", [row], ("n", "world", "impl"))
