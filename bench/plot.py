"""Plot bench/results/clip_cpu.json: time and peak extra memory against N, both providers.

Usage: ``python -m bench.plot [--json PATH] [--out PATH]`` (``make bench`` runs it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=str(RESULTS / "clip_cpu.json"))
    parser.add_argument("--out", default=str(RESULTS / "clip_cpu.png"))
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(args.json).read_text())
    rows = [r for r in data["rows"] if "time_s" in r]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"tilecl": "-o", "naive": "--s"}
    for provider in ("tilecl", "naive"):
        for d in sorted({r["d"] for r in rows}):
            sel = sorted((r for r in rows if r["provider"] == provider and r["d"] == d), key=lambda r: r["n"])
            if not sel:
                continue
            ns = [r["n"] for r in sel]
            label = f"{provider}, D={d}"
            ax_time.plot(ns, [r["time_s"] for r in sel], styles[provider], label=label)
            ax_mem.plot(ns, [r["peak_extra_bytes"] / 2**20 for r in sel], styles[provider], label=label)
    for ax, title, unit in ((ax_time, "fwd+bwd time", "seconds"), (ax_mem, "peak extra memory", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size N")
        ax.set_ylabel(unit)
        ax.set_title(f"symmetric CLIP loss, float32, CPU: {title}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    m = data["machine"]
    fig.suptitle(f"{m['cpu']} ({m['torch_threads']} threads), torch {m['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
