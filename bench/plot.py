"""Draw one PNG next to each benchmark result JSON in bench/results/ (``make bench`` runs it).

Usage::

    python -m bench.plot                     # every plottable bench/results/*.json -> <name>.png beside it
    python -m bench.plot --out DIR           # the same figures, written to DIR instead
    python -m bench.plot --json PATH [--out PNG]   # one file (its spec from its name, else its columns)

Which file gets which figure is the table :data:`SPECS` at the bottom: every
result file is a list of ``rows`` (dicts); a :class:`Spec` says which rows to
keep, how to turn "wide" rows (``tilecl_s``, ``naive_s``) into one row per
provider, which column is the x axis, which columns name a line, what each panel
plots, and which provider the ratio panel divides by. Files in :data:`NOT_PLOTTED`
are skipped, with the reason printed.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

RESULTS = Path(__file__).parent / "results"
MIB = 2**20

Row = dict[str, Any]


@dataclass(frozen=True)
class Metric:
    """One plotted column: ``column`` divided by ``scale``; ``label`` joins the line's legend entry."""

    column: str
    label: str = ""
    scale: float = 1.0
    linestyle: Optional[str] = None  # overrides the style the line's other keys would pick


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    metrics: tuple[Metric, ...]
    log_y: bool = True
    hline: Optional[float] = None  # e.g. 1 on a ratio panel
    color_by_metric: bool = False  # a ratio panel: colour says which quantity, not which provider
    where: dict[str, Any] = field(default_factory=dict)  # the panel's rows: those with these values


@dataclass(frozen=True)
class Melt:
    """Wide rows to long: ``{"tilecl_s": a, "naive_s": b}`` -> one row per value of ``key``."""

    key: str
    values: tuple[str, ...]
    columns: dict[str, str]  # long column -> template of the wide one, "{}" the value


@dataclass(frozen=True)
class Baseline:
    """Rows whose ``key`` differs from ``value`` gain ``<column>/base``: their column over the baseline's."""

    key: str
    value: str
    match: tuple[str, ...]  # the columns a row and its baseline row share
    columns: tuple[str, ...]


@dataclass(frozen=True)
class Spec:
    title: str
    x: str
    xlabel: str
    series: tuple[str, ...]  # the columns that name a line; the first picks its colour
    panels: tuple[Panel, ...]
    where: dict[str, Any] = field(default_factory=dict)
    melt: Optional[Melt] = None
    baseline: Optional[Baseline] = None
    category: tuple[str, ...] = ()  # set: bars, one group per value of these columns, instead of lines
    note: Optional[Callable[[list[Row]], str]] = None  # one line under the title, from all the raw rows
    columns: int = 0  # panels per row of the figure (0: all in one row)
    shared_legend: bool = False  # one legend under the figure, for panels that draw the same series

    def rows(self, data: dict) -> list[Row]:
        """The file's measured rows, filtered, melted and with their ratios to the baseline."""
        rows = [dict(r) for r in data.get("rows", []) if "skipped" not in r]  # copies: ratios join them
        rows = [r for r in rows if all(r.get(k) == v for k, v in self.where.items())]
        if self.melt is not None:
            m = self.melt
            rows = [
                {**r, m.key: v, **{c: r[t.format(v)] for c, t in m.columns.items() if t.format(v) in r}}
                for r in rows
                for v in m.values
            ]
        if self.baseline is not None:
            b = self.baseline
            base = {tuple(r.get(k) for k in b.match): r for r in rows if r.get(b.key) == b.value}
            for r in rows:
                ref = base.get(tuple(r.get(k) for k in b.match))
                if r.get(b.key) == b.value or ref is None:
                    continue
                for c in b.columns:
                    if c in r and c in ref and ref[c]:
                        r[f"{c}/base"] = r[c] / ref[c]
        return rows

    def xval(self, r: Row) -> Any:
        return tuple((k, r.get(k)) for k in self.category) if self.category else r[self.x]

    def fits(self, rows: list[Row]) -> bool:
        """Whether these rows carry the columns this spec plots (for a file named as none in SPECS)."""
        needed = {
            *(self.category or (self.x,)),
            *self.series,
            *(m.column for p in self.panels for m in p.metrics),
        }
        needed -= {c for c in needed if c.endswith("/base")}
        return bool(rows) and all(any(c in r for r in rows) for c in needed)


# --- drawing ------------------------------------------------------------------------------------

#: fixed colours for the names that recur across files; others take the next free one of tab10
COLORS = {
    "tilecl": "tab:blue",
    "naive": "tab:red",
    "open_clip": "tab:red",
    "pml": "tab:red",
    "infonce": "tab:red",
    "gamma": "tab:blue",
    "eager": "tab:gray",
    "compiled": "tab:blue",
    "single": "black",
    "gather": "tab:orange",
    "ring": "tab:green",
    "time": "tab:purple",
    "peak memory": "tab:olive",
    "clip": "tab:blue",
    "siglip": "tab:orange",
    "supcon": "tab:green",
}
PALETTE = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink"]
MARKERS = ["o", "s", "^", "D", "v"]
LINESTYLES = ["-", "--", "-.", ":"]
#: how a key's value reads in a legend ("D=128"); keys not here show the bare value
PREFIX = {"d": "D", "n": "N", "world": "W", "classes": "classes"}


def _value(key: str, value: Any) -> str:
    if key == "n" and isinstance(value, int):
        value = _size(value)
    return f"{PREFIX[key]}={value}" if key in PREFIX else str(value)


def _size(n: float) -> str:
    n = int(n)
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


class _Styler:
    """Colour by a line's first key (or metric), marker and line style by the rest; stable per figure."""

    def __init__(self, rest_values: Sequence[tuple]) -> None:
        self.rest = sorted(set(rest_values), key=repr)
        self.colors = dict(COLORS)

    def color(self, name: str) -> str:
        if name not in self.colors:
            used = set(self.colors.values())
            self.colors[name] = next((c for c in PALETTE if c not in used), "tab:cyan")
        return self.colors[name]

    def marker_and_line(self, rest: tuple) -> tuple[str, str]:
        i = self.rest.index(rest) if rest in self.rest else 0
        return MARKERS[i % len(MARKERS)], LINESTYLES[i % len(LINESTYLES)]


def _series(spec: Spec, rows: list[Row]) -> list[tuple]:
    """The lines' keys: the baseline's last (its ratio panel has no line of its own)."""
    keys = {tuple(r.get(k) for k in spec.series) for r in rows}
    base = spec.baseline.value if spec.baseline is not None else None
    return sorted(keys, key=lambda k: (k[0] == base, repr(k)))


def _draw_lines(ax: Any, spec: Spec, panel: Panel, rows: list[Row], styler: _Styler) -> None:
    for key in _series(spec, rows):
        sel = sorted((r for r in rows if tuple(r.get(k) for k in spec.series) == key), key=spec.xval)
        for metric in panel.metrics:
            pts = [(spec.xval(r), r[metric.column] / metric.scale) for r in sel if metric.column in r]
            if not pts:
                continue
            name, rest = str(key[0]), key[1:]
            marker, linestyle = styler.marker_and_line(rest)
            color = styler.color(metric.label if panel.color_by_metric else name)
            words = ([metric.label] if metric.label else []) + [
                _value(k, v)
                for k, v in zip(spec.series, key)
                if not (panel.color_by_metric and k == spec.series[0])
            ]
            xs, ys = zip(*pts)
            ax.plot(
                xs,
                ys,
                marker=marker,
                linestyle=metric.linestyle or linestyle,
                color=color,
                label=", ".join(words),
            )
    xs_all = sorted({spec.xval(r) for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs_all, [_size(x) if spec.x == "n" else str(x) for x in xs_all])


def _draw_bars(ax: Any, spec: Spec, panel: Panel, rows: list[Row], styler: _Styler) -> None:
    cats = sorted({spec.xval(r) for r in rows}, key=lambda c: tuple(v for _, v in c))
    bars = [
        (key, metric)
        for key in _series(spec, rows)
        for metric in panel.metrics
        if any(tuple(r.get(k) for k in spec.series) == key and metric.column in r for r in rows)
    ]
    width = 0.8 / max(1, len(bars))
    for j, (key, metric) in enumerate(bars):
        xs, ys = [], []
        for i, cat in enumerate(cats):
            for r in rows:
                if spec.xval(r) == cat and tuple(r.get(k) for k in spec.series) == key and metric.column in r:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(r[metric.column] / metric.scale)
        label = ", ".join(
            ([metric.label] if metric.label else []) + [_value(k, v) for k, v in zip(spec.series, key)]
        )
        color = styler.color(metric.label if panel.color_by_metric else str(key[0]))
        drawn = ax.bar(xs, ys, width=width * 0.95, color=color, label=label)
        if panel.hline is not None:  # a ratio: its value, readable without the grid
            ax.bar_label(drawn, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(cats)), [_category(c) for c in cats], rotation=30, ha="right", fontsize=8)


def _category(cat: Any) -> str:
    return ", ".join(_value(k, v) for k, v in cat)


def plot_file(spec: Spec, data: dict, out: Path) -> None:
    """Draw one figure: ``spec``'s panels side by side, from the result file's parsed ``data``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    class plain(ticker.LogFormatter):
        """Log-axis labels as plain numbers; which ticks get one is still LogFormatter's choice."""

        def __call__(self, x: float, pos: Optional[int] = None) -> str:
            return f"{x:g}" if super().__call__(x, pos) else ""

    rows = spec.rows(data)
    n_rest = [tuple(r.get(k) for k in spec.series[1:]) for r in rows]
    styler = _Styler(n_rest)
    columns = spec.columns or len(spec.panels)
    grid = (-(-len(spec.panels) // columns), columns)
    height = 5.4 if not spec.shared_legend else 4.2
    fig, axes = plt.subplots(*grid, figsize=(5.2 * grid[1], height * grid[0]), squeeze=False)
    for ax, panel in zip(axes.flat, spec.panels):
        drawn = [
            r
            for r in rows
            if any(m.column in r for m in panel.metrics)
            and all(r.get(k) == v for k, v in panel.where.items())
        ]
        (_draw_bars if spec.category else _draw_lines)(ax, spec, panel, drawn, styler)
        if panel.hline is not None:
            ax.axhline(panel.hline, color="k", lw=0.8, ls=":")
        if panel.log_y:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plain())  # 0.01 and 20 rather than 10^-2 and 2x10^1
            ax.yaxis.set_minor_formatter(plain(labelOnlyBase=False))
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(spec.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(
            True, which="major" if spec.category else "both", axis="y" if spec.category else "both", alpha=0.3
        )
        if spec.shared_legend:
            pass  # one legend for the figure, below
        elif spec.category:  # the bars' rotated names fill the space below
            ax.legend(fontsize=7)
        else:  # below the panel, where it hides no point
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    if spec.shared_legend:
        entries: dict[str, Any] = {}
        for ax in axes.flat:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                entries.setdefault(label, handle)
        fig.legend(
            list(entries.values()), list(entries), loc="lower center", ncol=4, fontsize=8, frameon=False
        )
    lines = [spec.title]
    m = data.get("machine")
    if m:
        lines.append(
            f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}"
        )
    if spec.note is not None:
        lines.append(spec.note(data.get("rows", [])))
    fig.suptitle("\n".join(lines), fontsize=9)
    fig.tight_layout(rect=(0, 0.08 if spec.shared_legend else 0, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def spec_for(path: Path, data: dict) -> Optional[Spec]:
    """The spec named after the file, else the first whose columns the file's rows carry."""
    if path.name in SPECS:
        return SPECS[path.name]
    if path.name in NOT_PLOTTED:
        return None
    return next((s for s in SPECS.values() if s.fits(s.rows(data))), None)


def plot_all(results: Path = RESULTS, out_dir: Optional[Path] = None) -> list[Path]:
    """One PNG per plottable ``results/*.json``, named after it, in ``out_dir`` (default: beside it)."""
    written = []
    for path in sorted(results.glob("*.json")):
        if path.name in NOT_PLOTTED:
            print(f"skip {path.name}: {NOT_PLOTTED[path.name]}")
            continue
        data = json.loads(path.read_text())
        spec = spec_for(path, data)
        if spec is None:
            print(f"skip {path.name}: no plot spec fits its rows (add one to bench/plot.py's SPECS)")
            continue
        png = (out_dir or path.parent) / (path.stem + ".png")
        plot_file(spec, data, png)
        print(f"wrote {png}")
        written.append(png)
    return written


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(RESULTS), help="folder of result JSON files")
    parser.add_argument("--json", help="plot this one file only")
    parser.add_argument(
        "--out", help="with --json the PNG's path; otherwise a folder (default: beside each JSON)"
    )
    args = parser.parse_args(argv)
    if args.json is None:
        plot_all(Path(args.results), Path(args.out) if args.out else None)
        return
    path = Path(args.json)
    data = json.loads(path.read_text())
    spec = spec_for(path, data)
    if spec is None:
        raise SystemExit(f"{path}: no plot spec fits its rows")
    out = Path(args.out) if args.out else path.with_suffix(".png")
    plot_file(spec, data, out)
    print(f"wrote {out}")


# --- which file gets which figure ---------------------------------------------------------------

SECONDS = "seconds, fwd+bwd (log)"
SIZE = "batch size N (K = 1024, log)"


def _time(title: str = "time per fwd+bwd", column: str = "time_s") -> Panel:
    return Panel(title, SECONDS, (Metric(column),))


def _memory(title: str = "peak extra memory") -> Panel:
    return Panel(title, "MiB (log)", (Metric("peak_extra_bytes", scale=MIB),))


def _ratio(title: str, *columns: tuple[str, str], log_y: bool = True) -> Panel:
    metrics = tuple(Metric(f"{c}/base", label) for c, label in columns)
    return Panel(
        title, "ratio" + (" (log)" if log_y else ""), metrics, log_y=log_y, hline=1.0, color_by_metric=True
    )


def _vs(key: str, baseline: str, match: tuple[str, ...] = ("n", "d")) -> Baseline:
    return Baseline(key, baseline, match, ("time_s", "peak_extra_bytes"))


_TIME_AND_MEMORY = (("time_s", "time"), ("peak_extra_bytes", "peak memory"))


def _masking_note(rows: list[Row]) -> str:
    m = next((r for r in rows if r.get("bench") == "masking"), None)
    if m is None:
        return ""
    return (
        f"false-negative masking (CLIP, N={m['n']:,}, D={m['d']}, "
        f"~{m['masked_entries_per_row']:.0f} masked per row): masked / unmasked time = {m['ratio']:.2f}"
    )


def _distributed(loss: str) -> Spec:
    return Spec(
        title=f"distributed {loss} loss over gloo loopback, CPU, float32, D = 256: per step and per rank",
        x="world",
        xlabel="ranks W (processes; W = 4 oversubscribes the 2 cores)",
        series=("impl", "n"),
        panels=(
            Panel("step time (slowest rank, median)", SECONDS, (Metric("time_s"),)),
            Panel(
                "bytes sent per rank per step (solid: measured, dotted: designed payload)",
                "MiB (log)",
                (
                    Metric("loopback_bytes_per_rank", scale=MIB),
                    Metric("model_bytes_per_rank", "designed", MIB, ":"),
                ),
            ),
            Panel("peak extra memory per rank", "MiB (log)", (Metric("peak_extra_bytes", scale=MIB),)),
        ),
    )


#: result file name -> its figure
SPECS: dict[str, Spec] = {
    "clip_cpu.json": Spec(
        title="symmetric CLIP loss, CPU, float32: tilecl (torch backend) against the naive full-matrix loss",
        x="n",
        xlabel=SIZE,
        series=("provider", "d"),
        panels=(_time(), _memory(), _ratio("tilecl / naive (below 1: tilecl cheaper)", *_TIME_AND_MEMORY)),
        baseline=_vs("provider", "naive"),
    ),
    "siglip_cpu.json": Spec(
        title="sigmoid (SigLIP) loss, CPU, float32: tilecl against open_clip's N x N formula",
        x="n",
        xlabel=SIZE,
        series=("provider", "d"),
        panels=(
            _time(),
            _memory(),
            _ratio("tilecl / open_clip (below 1: tilecl cheaper)", *_TIME_AND_MEMORY),
        ),
        baseline=_vs("provider", "open_clip"),
    ),
    "supcon_cpu.json": Spec(
        title="SupCon loss (100 classes, one tower), CPU, float32: tilecl against pytorch-metric-learning",
        x="n",
        xlabel=SIZE,
        series=("provider", "d"),
        where={"bench": "supcon"},
        panels=(_time(), _memory(), _ratio("tilecl / pml (below 1: tilecl cheaper)", *_TIME_AND_MEMORY)),
        baseline=_vs("provider", "pml"),
        note=_masking_note,
    ),
    "gc_cpu.json": Spec(
        title="geometric consistency loss, CPU, float32: "
        "tilecl's D x D Gram form against the naive N x N formula",
        x="n",
        xlabel=SIZE,
        series=("provider", "d"),
        melt=Melt(
            "provider", ("tilecl", "naive"), {"time_s": "{}_s", "peak_extra_bytes": "{}_peak_extra_bytes"}
        ),
        panels=(_time(), _memory(), _ratio("tilecl / naive (below 1: tilecl cheaper)", *_TIME_AND_MEMORY)),
        baseline=_vs("provider", "naive"),
    ),
    "gamma_cpu.json": Spec(
        title="cost of the gamma loss (E-step + surrogate) against InfoNCE, CPU, float32, symmetric",
        x="n",
        xlabel=SIZE,
        series=("loss", "d"),
        melt=Melt("loss", ("gamma", "infonce"), {"time_s": "{}_s"}),
        panels=(
            _time(),
            _ratio("gamma / InfoNCE time (target: at most 1.05)", ("time_s", "time"), log_y=False),
        ),
        baseline=_vs("loss", "infonce"),
    ),
    "compile_cpu.json": Spec(
        title="torch.compile(fullgraph=True) against eager, every loss fwd+bwd, CPU, float32, D = 256",
        x="",
        category=("loss", "n"),
        xlabel="loss, batch size N",
        series=("mode",),
        melt=Melt("mode", ("eager", "compiled"), {"time_s": "{}_s"}),
        panels=(
            _time("time per fwd+bwd (fastest of interleaved runs)"),
            _ratio("compiled / eager time (below 1: compiling pays)", ("time_s", "time"), log_y=False),
        ),
        baseline=Baseline("mode", "eager", ("loss", "n"), ("time_s",)),
    ),
    "distributed_cpu.json": _distributed("CLIP"),
    "siglip_distributed_cpu.json": _distributed("SigLIP"),
    "small_batch_cpu.json": Spec(
        title="CLIP, SigLIP, SupCon fwd+bwd: tilecl's time / the full-matrix loss's (below 1: tilecl is "
        "faster; CPU float32, torch backend)",
        x="n",
        xlabel="batch size N (log)",
        series=("loss", "scale"),
        panels=tuple(
            Panel(
                f"{features} features, D = {d}",
                "time ratio (log)",
                (Metric("ratio"),),
                hline=1.0,
                where={"features": features, "d": d},
            )  # fmt: skip
            for features in ("normalized", "unnormalized")
            for d in (64, 128, 512)
        ),
        columns=3,
        shared_legend=True,
    ),
    "gradcache_minilm.json": Spec(
        title="one MNRL training step of all-MiniLM-L6-v2 (32 tokens, CPU, float32): the plain step "
        "against the cached ones (mini-batch 64); a missing point ran out of memory",
        x="n",
        xlabel="pairs per batch N (log)",
        series=("provider",),
        panels=(
            Panel("time per training step", "seconds (log)", (Metric("seconds"),)),
            Panel("peak RSS growth of the step", "MiB (log)", (Metric("peak_rss_growth_mib"),)),
        ),
    ),
}

#: result files drawn by no figure, and why
NOT_PLOTTED = {
    "pytest-benchmark.json": "pytest-benchmark's own record of the CLIP sweep: clip_cpu.json's measurements "
    "(its figure), and for N >= 64K its timer saw a placeholder, not the loss",
}


if __name__ == "__main__":
    main()
