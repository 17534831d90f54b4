"""Shared state of a benchmark session: matmul throughput, collected rows, the JSON writer.

Every row is one measurement (provider x configuration). Ratios and
efficiencies are computed against figures measured in the same session, since
these machines are noisy and absolute times do not transfer between runs.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import pytest
import torch

RESULTS = Path(__file__).parent / "results"
ROWS: list[dict] = []
_MATMUL_FLOPS: dict[int, float] = {}


def matmul_flops(d: int) -> float:
    """FLOP/s of ``torch.mm`` for a (4096 x D) @ (D x 4096) product, best of 5, measured once per D."""
    if d not in _MATMUL_FLOPS:
        a, b = torch.randn(4096, d), torch.randn(4096, d)
        out = torch.empty(4096, 4096)
        torch.mm(a, b.t(), out=out)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            torch.mm(a, b.t(), out=out)
            best = min(best, time.perf_counter() - start)
        _MATMUL_FLOPS[d] = 2 * 4096 * 4096 * d / best
    return _MATMUL_FLOPS[d]


def merge_rows(name: str, rows: list[dict], key: tuple[str, ...]) -> None:
    """Write ``rows`` into ``bench/results/<name>``, replacing earlier rows with the same key.

    A partial run (``-k``, ``TILECL_BENCH_MAX_N``) refreshes its own
    configurations and keeps the rest of the file.
    """
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    previous = json.loads(path.read_text())["rows"] if path.exists() else []
    fresh = {tuple(r[k] for k in key) for r in rows}
    kept = [r for r in previous if tuple(r[k] for k in key) not in fresh]
    merged = sorted(kept + rows, key=lambda r: tuple(r[k] for k in key))
    path.write_text(json.dumps({"machine": machine(), "rows": merged}, indent=2) + "\n")


def median_time(fn, rounds: int) -> float:
    """Median wall time of ``rounds`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def fastest_time(fn, runs: int) -> float:
    """Fastest wall time of ``runs`` calls after one warm-up call (interference only adds time)."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


@pytest.fixture(scope="session")
def rows() -> list[dict]:
    return ROWS


def pytest_sessionfinish(session, exitstatus):
    """Write this session's rows, merged into the JSON of earlier sessions (same provider/N/D replaced).

    Ratios and efficiencies are computed from figures of the same session only,
    so a partial re-run (``-k``) refreshes whole configurations.
    """
    if not ROWS:
        return
    RESULTS.mkdir(exist_ok=True)
    by_key = {(r["n"], r["d"]): r for r in ROWS if r["provider"] == "naive" and r.get("time_s")}
    for row in ROWS:
        naive = by_key.get((row["n"], row["d"]))
        if row["provider"] != "naive" and naive is not None and row.get("time_s"):
            row["time_ratio_to_naive"] = row["time_s"] / naive["time_s"]
    path = RESULTS / os.environ.get("TILECL_BENCH_OUT", "clip_cpu.json")
    previous = json.loads(path.read_text()) if path.exists() else {"rows": [], "matmul_flops": {}}
    fresh = {(r["provider"], r["n"], r["d"]) for r in ROWS}
    kept = [r for r in previous["rows"] if (r["provider"], r["n"], r["d"]) not in fresh]
    flops = {**previous.get("matmul_flops", {}), **{str(d): f for d, f in sorted(_MATMUL_FLOPS.items())}}
    out = {
        "machine": machine(),
        "matmul_flops": flops,
        "rows": sorted(kept + ROWS, key=lambda r: (r["d"], r["n"], r["provider"])),
    }
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {path}")
