"""``make gpu-check``: verify and benchmark every kernel on this machine's GPU in one command.

Steps, each with its own time budget, each failure reported without stopping the
later steps; everything goes to ``--out`` (``GPU_CHECK_OUT``, default ``gpu-check/``):

1. ``env.json`` — GPU name, SM count, driver, torch / triton / nvcc versions;
2. build the CUDA extension in place for this GPU's architecture;
3. the test matrix on CUDA tensors (``pytest tests -m "not slow"``, the CUDA cells), JUnit XML + log.
   What only this step settles: the kernels' bfloat16 and float16 cells on the hardware's own
   tensor-core products and roundings (on the CPU the Triton interpreter's float32 → bfloat16
   cast is made to round to nearest even, as GPUs do, by ``tests/utils.py``; with a Triton
   whose interpreter lacks that cast the CPU bf16 cells run unpatched and only this step checks
   them), the compiled CUDA C++ against its CPU emulation, and the torch backend's tile loops
   under ``torch.cuda.set_sync_debug_mode("error")`` (no synchronization per tile);
4. the NumPy oracle on CuPy arrays against NumPy on the same inputs;
5. ``compute-sanitizer`` memcheck and racecheck over small odd-shaped calls of every kernel;
6. the benchmark (:mod:`bench.gpu_bench`), CSV and plots;
7. ``summary.md`` — a pass/fail table, the benchmark's headline rows, the plots.

``--dry`` runs the same steps on a machine without a GPU, with tiny sizes: the
emulation module is built instead of the extension, a few matrix cells run on CPU
tensors, NumPy stands in for CuPy, and the sanitizer is reported as skipped. It
uses the ``python3`` it is started with and downloads nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]

#: (name, budget in seconds): 460 s in all, inside the 8 minutes one H100/H200-class GPU is given
STEPS = [
    ("env", 20),
    ("build", 90),
    ("tests", 150),
    ("oracle-on-cupy", 20),
    ("sanitizer", 60),
    ("benchmark", 120),
]


def _run(command: list[str], log: Path, budget: float, env: Optional[dict] = None) -> tuple[str, str]:
    """Run ``command`` within ``budget`` seconds, output to ``log``; (status, detail)."""
    with open(log, "w") as handle:
        try:
            done = subprocess.run(
                command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, timeout=budget,
                env={**os.environ, **(env or {})},
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return "fail", f"over its {budget:.0f} s budget"
    if done.returncode == 0:
        return "pass", ""
    return "fail", f"exit {done.returncode}: {last_error(log)} (see {log.name})"


def last_error(log: Path) -> str:
    """The line of ``log`` that says what went wrong: the last one naming an error, else its last line
    (a table cell: one line, no ``|``, at most 200 characters)."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    named = [line for line in lines if "Error" in line or "error:" in line or line.startswith("FAILED")]
    found = (named or lines or ["(no output)"])[-1]
    return found.replace("|", "\\|")[:200]


def step_env(out: Path, dry: bool) -> tuple[str, str]:
    info: dict = {"python": platform.python_version(), "dry_run": dry}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(
                gpu=props.name,
                sm_count=props.multi_processor_count,
                capability=f"{props.major}.{props.minor}",
                memory_gib=round(props.total_memory / 2**30, 1),
            )
    except ImportError as error:
        info["torch"] = f"missing: {error}"
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    for tool, flag in (
        ("nvcc", "--version"),
        ("nvidia-smi", "--query-gpu=driver_version --format=csv,noheader"),
    ):
        path = shutil.which(tool)
        if path is None:
            info[tool] = None
            continue
        done = subprocess.run([path, *flag.split()], capture_output=True, text=True)
        info[tool] = (done.stdout.strip().splitlines() or [""])[-1]
    (out / "env.json").write_text(json.dumps(info, indent=1))
    return "pass", info.get("gpu", "no GPU (dry run)" if dry else "no GPU visible")


def step_build(out: Path, dry: bool, budget: float) -> tuple[str, str]:
    if dry:  # the same kernel source, through the emulation
        code = "from tilecl import _cuda_build; _cuda_build.load_emulation()"
        return _run([sys.executable, "-c", code], out / "build.log", budget)
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    env = {"TILECL_CUDA_ARCHS": f"{major}{minor}", "TILECL_FORCE_CUDA_BUILD": "1"}
    return _run([sys.executable, "setup.py", "build_ext", "--inplace"], out / "build.log", budget, env)


def step_tests(out: Path, dry: bool, budget: float) -> tuple[str, str]:
    junit = ["--junitxml", str(out / "tests.xml"), "-q", "-p", "no:cacheprovider"]
    if dry:
        selection = ["tests/test_losses.py", "-k", "test_values_and_gradients and 13-17-5 and float32"]
    else:
        selection = ["tests", "-m", "not slow", "-k", "cuda"]
    return _run([sys.executable, "-m", "pytest", *selection, *junit], out / "tests.log", budget)


def step_oracle(out: Path, dry: bool, budget: float) -> tuple[str, str]:
    code = (
        "import numpy as np\n"
        "from tilecl.testing import oracle as reference\n"
        "try:\n    import cupy as xp\nexcept ImportError:\n    xp = None\n"
        f"if xp is None or {dry!r}:\n    xp, note = np, 'numpy standing in for cupy'\n"
        "else:\n    note = 'cupy'\n"
        "rng = np.random.default_rng(0)\n"
        "a, b = rng.standard_normal((37, 19)), rng.standard_normal((45, 19))\n"
        "host = reference.contrastive_loss(a, b, 7.0)\n"
        "dev = reference.contrastive_loss(xp.asarray(a), xp.asarray(b), 7.0, xp=xp)\n"
        "get = getattr(xp, 'asnumpy', np.asarray)\n"
        "for name in ('loss', 'grad_a', 'grad_b', 'grad_logit_scale'):\n"
        "    err = float(np.max(np.abs(get(getattr(dev, name)) - np.asarray(getattr(host, name)))))\n"
        "    assert err < 1e-10, (name, err)\n"
        "print('oracle on', note, ': max difference < 1e-10')\n"
    )
    status, detail = _run([sys.executable, "-c", code], out / "oracle.log", budget)
    return status, detail or (out / "oracle.log").read_text().strip().splitlines()[-1]


def step_sanitizer(out: Path, dry: bool, budget: float) -> tuple[str, str]:
    tool = shutil.which("compute-sanitizer")
    if dry or tool is None:
        return "skip", "dry run" if dry else "compute-sanitizer not found"
    code = (
        "import torch, tilecl\n"
        "for backend, deterministic in (('cuda', False), ('triton', False), ('triton', True)):\n"
        "    torch.use_deterministic_algorithms(deterministic)  # the column-block backward kernel too\n"
        "    for dtype in (torch.float32, torch.bfloat16):\n"
        "        a = torch.randn(67, 45, device='cuda', dtype=dtype, requires_grad=True)\n"
        "        b = torch.randn(131, 45, device='cuda', dtype=dtype, requires_grad=True)\n"
        "        tilecl.contrastive_loss(a, b, 5.0, labels=torch.arange(67, device='cuda') * 2,"
        " backend=backend).backward()\n"
        "        tilecl.nt_xent_loss(a, a.detach().clone(), 0.3, backend=backend).backward()\n"
        "torch.cuda.synchronize()\n"
    )
    results = []
    for check in ("memcheck", "racecheck"):
        status, _ = _run([tool, "--tool", check, "--error-exitcode", "3", sys.executable, "-c", code],
                         out / f"sanitizer-{check}.log", budget / 2)  # fmt: skip
        results.append((check, status))
    failed = [c for c, s in results if s != "pass"]
    return (
        ("fail", f"{', '.join(failed)} reported errors") if failed else ("pass", "memcheck, racecheck clean")
    )


def step_benchmark(out: Path, dry: bool, budget: float) -> tuple[str, str]:
    command = [sys.executable, "-m", "bench.gpu_bench", "--out", str(out)]
    if dry:
        command.append("--dry")
    else:  # sizes for the budget; the full sweep is python -m bench.gpu_bench
        command += ["--n", "256", "4096", "16384", "65536", "--d", "768", "--dtypes", "bfloat16", "float32"]
    return _run(command, out / "benchmark.log", budget)


def _memory_table(out: Path) -> list[str]:
    """Peak allocated MiB of a full step by N and provider (the shape of Inf-CL's Table 1); GPU only."""
    with open(out / "gpu_bench.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["metric_name"] == "memory"]
    if not rows:
        return ["", "Peak memory: measured on a GPU only (torch.cuda.max_memory_allocated)."]
    providers = sorted({r["kernel_provider"] for r in rows})
    header = "| N, D, dtype, inputs | " + " | ".join(providers) + " |"
    lines = [
        "",
        "## Peak allocated memory of a full step (MiB)",
        "",
        header,
        "|---|" + "---:|" * len(providers),
    ]
    for key in sorted({(int(r["x_value"]), r["extra_benchmark_config_str"]) for r in rows}):
        extra = json.loads(key[1])
        cells = {r["kernel_provider"]: float(r["y_value_50"]) for r in rows
                 if (int(r["x_value"]), r["extra_benchmark_config_str"]) == key}  # fmt: skip
        values = " | ".join(f"{cells[p]:,.0f}" if p in cells else "—" for p in providers)
        lines.append(
            f"| {key[0]:,}, {extra['D']}, {extra['dtype']}, {extra.get('inputs', 'normalized')} | {values} |"
        )
    return lines


def write_summary(out: Path, results: list[tuple[str, str, str, float]], dry: bool) -> Path:
    lines = [
        "# tilecl GPU check" + (" (dry run on the CPU)" if dry else ""),
        "",
        "| step | status | seconds | detail |",
        "|---|---|---:|---|",
    ]
    lines += [
        f"| {name} | {status} | {seconds:.1f} | {detail} |" for name, status, detail, seconds in results
    ]
    csv_path = out / "gpu_bench.csv"
    if csv_path.exists():
        with open(csv_path) as handle:
            rows = [r for r in csv.DictReader(handle) if r["kernel_operation_mode"] == "full"]
        largest = max((int(r["x_value"]) for r in rows), default=None)
        lines += ["", f"## Benchmark: full fwd+bwd at N = {largest}", "",
                  "| loss | provider | D, dtype, inputs | ms (median) | TFLOP/s | efficiency vs torch.mm "
                  "| passes |",
                  "|---|---|---|---:|---:|---:|---:|"]  # fmt: skip
        for r in rows:
            if int(r["x_value"]) != largest or r["metric_name"] != "time":
                continue
            extra = json.loads(r["extra_benchmark_config_str"])
            same = ("kernel_provider", "x_value", "extra_benchmark_config_str")
            tflops = next(
                float(t["y_value_50"])
                for t in rows
                if t["metric_name"] == "throughput" and all(t[k] == r[k] for k in same)
            )
            inputs = extra.get("inputs", "normalized")
            lines.append(
                f"| {r['kernel_name']} | {r['kernel_provider']} | {extra['D']}, {extra['dtype']}, {inputs} | "
                f"{float(r['y_value_50']):.3f} | {tflops:.3g} | {extra.get('efficiency_vs_mm', '')} | "
                f"{extra['passes'] or ''} |"
            )
        lines += _memory_table(out)
        lines += ["", *[f"![{p.stem}]({p.name})" for p in sorted(out.glob("gpu_bench_*.png"))]]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT", "gpu-check"))
    parser.add_argument("--dry", action="store_true", help="no GPU: the same steps on the CPU, tiny sizes")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.dry:
        os.environ["TRITON_INTERPRET"] = "1"
    steps = {
        "env": lambda budget: step_env(out, args.dry),
        "build": lambda budget: step_build(out, args.dry, budget),
        "tests": lambda budget: step_tests(out, args.dry, budget),
        "oracle-on-cupy": lambda budget: step_oracle(out, args.dry, budget),
        "sanitizer": lambda budget: step_sanitizer(out, args.dry, budget),
        "benchmark": lambda budget: step_benchmark(out, args.dry, budget),
    }
    results = []
    for name, budget in STEPS:
        start = time.monotonic()
        try:
            status, detail = steps[name](budget)
        except Exception as error:  # a step's failure must not stop the later ones
            status, detail = "fail", f"{type(error).__name__}: {error}"
        results.append((name, status, detail, time.monotonic() - start))
        print(f"{name:<15} {status:<5} {results[-1][3]:6.1f} s  {detail}", flush=True)
    print("summary:", write_summary(out, results, args.dry))
    return 0 if all(status != "fail" for _, status, _, _ in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
