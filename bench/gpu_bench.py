"""GPU benchmark of the CLIP and SigLIP losses: one CSV row per measurement, in Liger-Kernel's schema.

``python -m bench.gpu_bench --out DIR`` on a CUDA machine times every provider with
``triton.testing.do_bench`` (median and 20/80 quantiles) in three modes (forward,
backward, full), as ms, TFLOP/s (useful FLOPs: 2·N²·D forward, 4·N²·D backward)
and peak allocated MiB, for N × D × dtype × kind of input (L2-normalized features at
CLIP's logit scale 14.3, unnormalized ``randn`` ones — dot-product embeddings — at
10: the worst case of the CPU sweep, ``bench.small_batch``); the efficiency against ``torch.mm``
measured in the same run at the same dtype stands next to the static pass count in
``extra_benchmark_config_str``. ``--dry`` runs the same code on the CPU with tiny
sizes (wall-clock quantiles over a few repetitions; the CUDA kernels through the
emulation; no memory metric), so the script is exercised where there is no GPU.

Providers (``kernel_name="clip_loss"``): the naive full-matrix loss (open_clip's
formula) in the same dtype, tilecl's torch, triton (default and deterministic)
and cuda backends, and Inf-CL (``inf_cl.cal_inf_loss`` once per direction) when
it is importable. ``kernel_name="siglip_loss"``: open_clip's ``SigLipLoss``
formula, tilecl's sigmoid loss on torch and triton (default and deterministic),
and siglip-kernel when it is importable. Then the ATen operations and kernel launches per
CLIP fwd+bwd of the naive loss and the torch and triton backends at N = 128 and 8,192
(``gpu_launch_counts.json``): at small N each launch costs about what its work does.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

# a dry run executes the Triton kernels under the interpreter, which triton reads when imported
if "--dry" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import tilecl  # noqa: E402
from tilecl.backends import BACKENDS  # noqa: E402
from tilecl.backends.triton import MAX_BLOCK_DOUT, pass_count, sigmoid_pass_count  # noqa: E402
from tilecl.testing.naive import naive_contrastive_loss, naive_sigmoid_loss  # noqa: E402

COLUMNS = [
    "kernel_name", "kernel_provider", "kernel_operation_mode", "metric_name", "metric_unit", "x_name",
    "x_label", "x_value", "y_value_50", "y_value_20", "y_value_80", "extra_benchmark_config_str",
    "gpu_name", "timestamp", "tilecl_version",
]  # fmt: skip
MODES = ("forward", "backward", "full")
#: kind of input → its logit scale (bench.small_batch's worst cases of each kind)
INPUTS = {"normalized": 14.3, "unnormalized": 10.0}
#: useful FLOPs of a symmetric fwd+bwd, in units of N²·D
FLOPS_PER_MODE = {"forward": 2, "backward": 4, "full": 6}


def _time(fn: Callable[[], Any], on_gpu: bool, repeats: int = 3) -> tuple[float, float, float]:
    """Median, 20% and 80% quantiles of ``fn``'s time in ms."""
    if on_gpu:
        import triton.testing

        q50, q20, q80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return float(q50), float(q20), float(q80)
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    quantiles = torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)
    q50, q20, q80 = torch.tensor(times, dtype=torch.float64).quantile(quantiles).tolist()
    return q50, q20, q80


def matmul_tflops(d: int, dtype: torch.dtype, device: torch.device, on_gpu: bool) -> float:
    """TFLOP/s of ``torch.mm`` for a (4096 x D) @ (D x 4096) product (1024 rows in a dry run)."""
    rows = 4096 if on_gpu else 512
    a, b = (torch.randn(rows, d, device=device).to(dtype) for _ in range(2))
    q50, _, _ = _time(lambda: torch.mm(a, b.t()), on_gpu)
    return 2 * rows * rows * d / (q50 * 1e-3) / 1e12


def providers(dry: bool) -> dict[str, Callable[..., torch.Tensor]]:
    """Loss functions by provider name; only those that can run here."""
    device = torch.device("cpu" if dry else "cuda")
    found: dict[str, Callable[..., torch.Tensor]] = {"naive": naive_contrastive_loss}

    def backend(name: str) -> Callable[..., torch.Tensor]:
        return lambda a, b, s: tilecl.contrastive_loss(a, b, s, backend=name)

    for provider, name in (("tilecl-torch", "torch"), ("tilecl-triton", "triton")):
        if not BACKENDS[name].not_supported_reasons(device, torch.float32):
            found[provider] = backend(name)
    if "tilecl-triton" in found:
        found["tilecl-triton-deterministic"] = _deterministic(backend("triton"))
    cuda_name = "cuda-emu" if dry else "cuda"
    if not BACKENDS[cuda_name].not_supported_reasons(device, torch.float32):
        found[f"tilecl-{cuda_name}"] = backend(cuda_name)  # no float atomics: deterministic as it is
    try:
        from inf_cl import cal_inf_loss  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        found["inf-cl"] = lambda a, b, s: (
            (cal_inf_loss(a, b, scale=s) + cal_inf_loss(b, a, scale=s)) / 2
        )  # one call per direction
    return found


#: SigLIP's initial logit bias, for every sigmoid provider
SIGLIP_BIAS = -10.0


def siglip_providers(dry: bool) -> dict[str, Callable[..., torch.Tensor]]:
    """Sigmoid-loss functions ``(a, b, scale)`` by provider name; only those that can run here."""
    device = torch.device("cpu" if dry else "cuda")
    found: dict[str, Callable[..., torch.Tensor]] = {
        "naive": lambda a, b, s: naive_sigmoid_loss(a, b, s, SIGLIP_BIAS)
    }

    def backend(name: str) -> Callable[..., torch.Tensor]:
        return lambda a, b, s: tilecl.sigmoid_loss(a, b, s, SIGLIP_BIAS, backend=name)

    for provider, name in (("tilecl-torch", "torch"), ("tilecl-triton", "triton")):
        if not BACKENDS[name].not_supported_reasons(device, torch.float32, "sigmoid"):
            found[provider] = backend(name)
    if "tilecl-triton" in found:
        found["tilecl-triton-deterministic"] = _deterministic(backend("triton"))
    try:
        import siglip_kernel  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        loss = getattr(siglip_kernel, "siglip_loss", None) or getattr(siglip_kernel, "sigmoid_loss", None)
        if loss is not None:
            found["siglip-kernel"] = lambda a, b, s: loss(a, b, s, SIGLIP_BIAS)
    return found


def _deterministic(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(*args: Any) -> torch.Tensor:
        torch.use_deterministic_algorithms(True)
        try:
            return fn(*args)
        finally:
            torch.use_deterministic_algorithms(False)

    return run


def measure(
    provider: str,
    fn: Callable[..., torch.Tensor],
    n: int,
    d: int,
    dtype: torch.dtype,
    on_gpu: bool,
    inputs: str = "normalized",
) -> dict[str, tuple[float, float, float]]:
    """ms quantiles per mode, and the peak allocated MiB of a full step (GPU only)."""
    device = torch.device("cuda" if on_gpu else "cpu")
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, d, generator=gen) for _ in range(2))
    if inputs == "normalized":
        a, b = (torch.nn.functional.normalize(x, dim=1) for x in (a, b))
    a, b = (x.to(device=device, dtype=dtype).requires_grad_() for x in (a, b))
    scale = torch.tensor(INPUTS[inputs], device=device)
    out: dict[str, tuple[float, float, float]] = {}
    with torch.no_grad():
        out["forward"] = _time(lambda: fn(a, b, scale), on_gpu)
    loss = fn(a, b, scale)
    out["backward"] = _time(lambda: loss.backward(retain_graph=True), on_gpu)
    out["full"] = _time(lambda: fn(a, b, scale).backward(), on_gpu)
    if on_gpu:
        a.grad = b.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(a, b, scale).backward()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        out["memory"] = (peak, peak, peak)
    return out


def fits(n: int, d: int, dtype: torch.dtype, provider: str, on_gpu: bool) -> Optional[str]:
    """Why this configuration is skipped, or None."""
    if not on_gpu:
        return None
    free, _ = torch.cuda.mem_get_info()
    itemsize = torch.finfo(dtype).bits // 8
    need = 3 * n * n * 4 if provider == "naive" else 16 * n * d * itemsize  # logits+grad+softmax vs I/O
    if need > 0.9 * free:
        return f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    return None


def run(
    out_dir: Path,
    ns: list[int],
    ds: list[int],
    dtypes: list[torch.dtype],
    dry: bool,
    inputs: tuple[str, ...] = tuple(INPUTS),
) -> tuple[list[dict], list[str]]:
    """Every measurement as a CSV row (also written to ``out_dir/gpu_bench.csv``) and the skips."""
    on_gpu = not dry
    device = torch.device("cuda" if on_gpu else "cpu")
    gpu_name = torch.cuda.get_device_name() if on_gpu else "cpu (dry run)"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    rows: list[dict] = []
    skipped: list[str] = []
    losses = (
        ("clip_loss", providers(dry), pass_count),
        ("siglip_loss", siglip_providers(dry), sigmoid_pass_count),
    )
    for dtype in dtypes:
        for d in ds:
            mm = matmul_tflops(d, dtype, device, on_gpu)
            for kernel_name, found, passes_of in losses:
                for provider, fn in found.items():
                    for kind in inputs:
                        for n in ns:
                            rows += _measured_rows(
                                kernel_name, provider, fn, n, d, dtype, kind, on_gpu, mm, passes_of, skipped,
                                gpu_name, stamp,
                            )  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "gpu_bench.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out_dir)
    return rows, skipped


def _measured_rows(
    kernel_name: str,
    provider: str,
    fn: Callable[..., torch.Tensor],
    n: int,
    d: int,
    dtype: torch.dtype,
    inputs: str,
    on_gpu: bool,
    mm: float,
    passes_of: Callable[[int, int, bool], int],
    skipped: list[str],
    gpu_name: str,
    stamp: str,
) -> list[dict]:
    """The CSV rows of one provider at one configuration (none, and a line in ``skipped``, if it cannot)."""
    dtype_name = str(dtype).removeprefix("torch.")
    label = f"{kernel_name} {provider} N={n} D={d} {dtype_name} {inputs}"
    why = fits(n, d, dtype, provider, on_gpu)
    if why is not None:
        skipped.append(f"{label}: {why}")
        return []
    try:
        result = measure(provider, fn, n, d, dtype, on_gpu, inputs)
    except (RuntimeError, TypeError) as error:  # e.g. out of memory, a dtype refused
        skipped.append(f"{label}: {type(error).__name__}: {error}")
        return []
    deterministic = provider.endswith("deterministic")
    passes = passes_of(d, MAX_BLOCK_DOUT, deterministic) if "triton" in provider else None
    rows = []
    for mode in MODES:
        q50, q20, q80 = result[mode]
        tflops = FLOPS_PER_MODE[mode] * n * n * d / 1e12
        extra = {"D": d, "dtype": dtype_name, "inputs": inputs, "mm_tflops": round(mm, 3), "passes": passes}
        if mode == "full":
            extra["efficiency_vs_mm"] = round(tflops / (q50 * 1e-3) / mm, 4)
        common = dict(
            kernel_name=kernel_name, kernel_provider=provider, kernel_operation_mode=mode,
            x_name="N", x_label="batch size N", x_value=n,
            extra_benchmark_config_str=json.dumps(extra), gpu_name=gpu_name,
            timestamp=stamp, tilecl_version=tilecl.__version__,
        )  # fmt: skip
        rows.append(dict(common, metric_name="time", metric_unit="ms",
                         y_value_50=q50, y_value_20=q20, y_value_80=q80))  # fmt: skip
        # quantiles swap: more time is fewer TFLOP/s
        rows.append(dict(common, metric_name="throughput", metric_unit="TFLOP/s",
                         y_value_50=tflops / (q50 * 1e-3), y_value_20=tflops / (q80 * 1e-3),
                         y_value_80=tflops / (q20 * 1e-3)))  # fmt: skip
    if "memory" in result:
        peak = result["memory"][0]
        rows.append(dict(common, kernel_operation_mode="full", metric_name="memory",
                         metric_unit="MiB", y_value_50=peak, y_value_20=peak, y_value_80=peak))  # fmt: skip
    return rows


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    """Full-step time (and, on a GPU, peak memory) against N, one line per provider, one figure per
    (loss, D, dtype, kind of input)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def config(row: dict) -> tuple:
        extra = json.loads(row["extra_benchmark_config_str"])
        return row["kernel_name"], extra["D"], extra["dtype"], extra.get("inputs", "normalized")

    full = [
        r for r in rows if r["kernel_operation_mode"] == "full" and r["metric_name"] in ("time", "memory")
    ]
    figures = []
    for key in sorted({config(r) for r in full}):
        kernel, d, dtype, inputs = key
        metrics = [
            m for m in ("time", "memory") if any(r["metric_name"] == m and config(r) == key for r in full)
        ]
        fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            for provider in sorted({r["kernel_provider"] for r in full}):
                points = sorted(
                    (r["x_value"], r["y_value_50"])
                    for r in full
                    if r["kernel_provider"] == provider and r["metric_name"] == metric and config(r) == key
                )
                if points:
                    ax.plot(*zip(*points), marker="o", label=provider)
            ax.set(
                xscale="log",
                yscale="log",
                xlabel="N",
                ylabel="ms (median)" if metric == "time" else "peak allocated MiB",
                title=f"{kernel} fwd+bwd, D={d}, {dtype}, {inputs}",
            )
            ax.legend(fontsize=7)
        path = out_dir / f"gpu_bench_{kernel}_D{d}_{dtype}_{inputs}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        figures.append(path)
    return figures


def launch_counts(dry: bool, sizes: tuple[int, ...] = (128, 8192), d: int = 128) -> list[dict]:
    """Per symmetric CLIP fwd+bwd (float32, normalized features): the ATen operations each provider
    issues (a ``TorchDispatchMode``) and, on a GPU, the kernels it launches (``torch.profiler``'s
    CUDA events; a Triton kernel is one, and not an ATen operation). ``--dry``: N = 24, 48, D = 16,
    ATen operations only."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.ops += 1
            return func(*args, **(kwargs or {}))

    device = torch.device("cpu" if dry else "cuda")
    sizes, d = ((24, 48), 16) if dry else (sizes, d)
    chosen = {k: v for k, v in providers(dry).items() if k in ("naive", "tilecl-torch", "tilecl-triton")}
    rows = []
    for n in sizes:
        gen = torch.Generator(device=device).manual_seed(n)
        a, b = (torch.randn(n, d, device=device, generator=gen) for _ in range(2))
        a = torch.nn.functional.normalize(a, dim=1).requires_grad_()
        b = torch.nn.functional.normalize(b, dim=1).requires_grad_()
        scale = torch.tensor(INPUTS["normalized"], device=device, requires_grad=True)
        for name, loss in chosen.items():
            loss(a, b, scale).backward()  # warm-up: compilation, autotuning, caches
            with Count() as counted:
                loss(a, b, scale).backward()
            launches = None
            if not dry:
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    loss(a, b, scale).backward()
                    torch.cuda.synchronize()
                launches = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
            rows.append(
                {"provider": name, "n": n, "d": d, "aten_ops": counted.ops, "kernel_launches": launches}
            )
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-check")
    parser.add_argument("--dry", action="store_true", help="CPU, tiny sizes (no GPU needed)")
    parser.add_argument("--n", type=int, nargs="*", default=None)
    parser.add_argument("--d", type=int, nargs="*", default=None)
    parser.add_argument("--dtypes", nargs="*", default=None)
    parser.add_argument("--inputs", nargs="*", choices=list(INPUTS), default=list(INPUTS))
    args = parser.parse_args(argv)
    # from N = 64, where a per-call overhead shows, to where only a tiled loss fits
    ns = args.n or ([24, 48] if args.dry else [64, 256, 1024, 4096, 16384, 65536, 131072, 262144])
    ds = args.d or ([16] if args.dry else [64, 128, 512, 768, 1024])
    default_dtypes = ["float32"] if args.dry else ["bfloat16", "float32"]
    dtypes = [getattr(torch, t) for t in (args.dtypes or default_dtypes)]
    rows, skipped = run(Path(args.out), ns, ds, dtypes, args.dry, tuple(args.inputs))
    print(f"{len(rows)} rows -> {Path(args.out) / 'gpu_bench.csv'}")
    for line in skipped:
        print("skipped:", line)
    (Path(args.out) / "gpu_bench_skipped.json").write_text(json.dumps(skipped, indent=1))
    counts = launch_counts(args.dry)
    for row in counts:
        launches = "" if row["kernel_launches"] is None else f", {row['kernel_launches']} kernel launches"
        print(
            f"{row['provider']} N={row['n']} D={row['d']}: {row['aten_ops']} ATen ops{launches} per fwd+bwd"
        )
    (Path(args.out) / "gpu_launch_counts.json").write_text(json.dumps(counts, indent=1))


if __name__ == "__main__":
    main()
