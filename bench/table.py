"""Print bench results as docs/results.md's markdown tables.

Usage: ``python -m bench.table [--json PATH]`` (the CLIP sweep),
``python -m bench.table --distributed`` (``distributed_cpu.json``),
``python -m bench.table --uneven`` (``distributed_uneven_cpu.json``) or
``python -m bench.table --small-batch`` (``small_batch_cpu.json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def fmt_bytes(x: float) -> str:
    return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.0f} MiB"


def distributed_table(path: Path) -> None:
    rows = json.loads(path.read_text())["rows"]
    single = {r["n"]: r["time_s"] for r in rows if r["impl"] == "single"}
    columns = ["N", "D", "ranks", "impl", "step time", "single process", "loopback bytes / rank"]
    print("| " + " | ".join([*columns, "designed payload / rank", "peak extra / rank"]) + " |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in sorted(
        (r for r in rows if r["impl"] != "single"), key=lambda r: (r["n"], r["world"], r["impl"])
    ):
        cells = [
            f"{r['n']:,}",
            str(r["d"]),
            str(r["world"]),
            r["impl"],
            f"{r['time_s']:.3g} s",
            f"{single[r['n']]:.3g} s" if r["n"] in single else "–",
            f"{r['loopback_bytes_per_rank'] / 2**20:.1f} MiB",
            f"{r['model_bytes_per_rank'] / 2**20:.1f} MiB",
            f"{r['peak_extra_bytes'] / 2**20:.0f} MiB",
        ]
        print("| " + " | ".join(cells) + " |")


def uneven_table(path: Path) -> None:
    """Every rank's peak per layout, beside the designed feature buffers (gather: ``b`` and ``∂/∂B``
    of all ``N`` rows; ring: two blocks and two accumulators of the largest rank's ``n_max``)."""
    rows = json.loads(path.read_text())["rows"]
    print("| rows per rank | N | impl | peak extra per rank | designed feature buffers | step time |")
    print("|---|---:|---|---|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["n"], r["impl"])):
        feature = r["d"] * 4
        designed = 2 * r["n"] * feature if r["impl"] == "gather" else 4 * max(r["sizes"]) * feature
        peaks = ", ".join(f"{p / 2**20:.0f}" for p in r["peak_extra_bytes_per_rank"])
        sizes = ", ".join(str(n) for n in r["sizes"])
        cells = [sizes, f"{r['n']:,}", r["impl"], f"{peaks} MiB", fmt_bytes(designed), f"{r['time_s']:.3g} s"]
        print("| " + " | ".join(cells) + " |")


def small_batch_table(path: Path) -> None:
    """One table per loss: tilecl / naive time per (N, D) and kind of input, and the call counts."""
    found = json.loads(path.read_text())
    for kind, pair in found.get("counts_n128", {}).items():
        mine, theirs = pair["tilecl"], pair["naive"]
        print(
            f"- {kind}, N = 128, per fwd+bwd: {mine['aten']} ATen ops (full-matrix {theirs['aten']}), "
            f"{mine['python']} Python calls (full-matrix {theirs['python']})"
        )
    rows = found["rows"]
    for kind in dict.fromkeys(r.get("loss", "clip") for r in rows):
        mine = [r for r in rows if r.get("loss", "clip") == kind]
        inputs = list(dict.fromkeys(f"{r['features']}, scale {r['scale']:g}" for r in mine))
        print(f"\n{kind}:\n")
        print("| N | D | " + " | ".join(inputs) + " |")
        print("|---:|---:|" + "---:|" * len(inputs))
        cells = {(r["n"], r["d"], f"{r['features']}, scale {r['scale']:g}"): r["ratio"] for r in mine}
        for d in sorted({r["d"] for r in mine}):
            for n in sorted({r["n"] for r in mine}):
                ratios = ["" if (n, d, i) not in cells else f"{cells[n, d, i]:.2f}" for i in inputs]
                print(f"| {n:,} | {d} | " + " | ".join(ratios) + " |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=str(RESULTS / "clip_cpu.json"))
    parser.add_argument("--distributed", action="store_true", help="print distributed_cpu.json")
    parser.add_argument("--uneven", action="store_true", help="print distributed_uneven_cpu.json")
    parser.add_argument("--small-batch", action="store_true", help="print small_batch_cpu.json")
    args = parser.parse_args()
    if args.uneven:
        uneven_table(RESULTS / "distributed_uneven_cpu.json")
        return
    if args.distributed:
        distributed_table(RESULTS / "distributed_cpu.json")
        return
    if args.small_batch:
        small_batch_table(RESULTS / "small_batch_cpu.json")
        return
    data = json.loads(Path(args.json).read_text())
    m = data["machine"]
    flops = ", ".join(f"D={d}: {f / 1e9:.0f} GFLOP/s" for d, f in data["matmul_flops"].items())
    print(f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads).")
    print(f"torch.mm throughput measured in the same run: {flops}.\n")
    columns = ["N", "D", "naive time", "tilecl time", "tilecl / naive", "naive peak extra"]
    print("| " + " | ".join([*columns, "tilecl peak extra", "efficiency"]) + " |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = data["rows"]
    keys = sorted({(r["d"], r["n"]) for r in rows})
    for d, n in keys:
        by = {r["provider"]: r for r in rows if r["n"] == n and r["d"] == d}
        naive, ours = by.get("naive", {}), by.get("tilecl", {})
        if "time_s" not in ours:
            continue  # not measured (e.g. a configuration left out of a partial run)
        if "time_s" in naive:
            naive_time, naive_mem = f"{naive['time_s']:.3g} s", fmt_bytes(naive["peak_extra_bytes"])
        else:
            naive_time, naive_mem = "skipped", naive.get("skipped", "")
        ratio = f"{ours['time_ratio_to_naive']:.2f}" if "time_ratio_to_naive" in ours else "–"
        ours_time = f"{ours.get('time_s', float('nan')):.3g} s"
        ours_mem = fmt_bytes(ours.get("peak_extra_bytes", 0))
        efficiency = f"{ours.get('efficiency', float('nan')):.2f}"
        cells = [f"{n:,}", str(d), naive_time, ours_time, ratio, naive_mem, ours_mem, efficiency]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
