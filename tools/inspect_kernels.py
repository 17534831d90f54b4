"""``python -m tools.inspect_kernels``: every GPU kernel compiled ahead of time for sm_80 and sm_90.

No GPU needed.

Triton section:

For each kernel x dtype x configuration x architecture: shared memory
(from Triton's metadata), registers per thread and spill bytes (``ptxas -v``
on the generated PTX, with the ptxas that ships with Triton), and the count of
tensor-core instructions in the PTX (``mma.sync``, and on sm_90 also
``wgmma.mma_async``). Plus the N·M·D matmul pass count of a symmetric fwd+bwd, derived from
the kernel structure (``tilecl.backends.triton.pass_count``).

CUDA section (``report["cuda"]``): the ``csrc/`` kernels compiled by nvcc for sm_80 and sm_90
with warnings as errors; per kernel x dtype x architecture, ptxas's registers, spill and stack
bytes and static shared memory, and the tensor-core (``wmma.mma``/``mma``) instructions in its PTX
(see ``tilecl._cuda_build.nvcc_report``). Where nvcc or the ``csrc/`` sources are absent the
section is skipped and the reason goes to stderr; with ``--only cuda`` that is a failure (exit 1).

Run from a source checkout (``python -m tools.inspect_kernels --help``); it needs triton
(the ``gpu`` extra) for the Triton section and nvcc for the CUDA one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

#: per-SM shared memory a block may use, bytes (opt-in maximum)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TYPE_NAMES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _signature(kernel: str, dtype: str, form: str, masked: bool) -> dict:
    t = f"*{TYPE_NAMES[dtype]}"
    f32, i32 = "*fp32", "i32"
    # without masking the launcher passes None: the mask compiles out
    groups = {k: "*i32" if masked else "constexpr" for k in ("row_group_ptr", "col_group_ptr", "kept_ptr")}
    shapes = {"n_rows": i32, "n_cols": i32}
    strides = {"dim": i32, "stride_a": i32, "stride_b": i32}
    if kernel == "stats_kernel":
        ptrs = {"a_ptr": t, "b_ptr": t, "targets_ptr": "*i64"}
        partials = {
            k: f32 for k in ("row_max_ptr", "row_sum_ptr", "positive_ptr", "col_max_ptr", "col_sum_ptr")
        }
        walk = {"blocks_per_group": i32, "tiles_per_split": i32}
        return {**ptrs, **partials, "scale": "fp32", **shapes, "col_count": i32, **strides, **walk, **groups}
    if kernel == "merge_stats_kernel":
        ptrs = {
            k: f32 for k in ("max_ptr", "sum_ptr", "positive_ptr", "lse_ptr", "low_ptr", "positive_out_ptr")
        }
        return {**ptrs, "parts": i32, "count": i32}
    # the sweep kernels take the form's own arguments as one tuple (tilecl.kernels.forms)
    forms = {
        "offset": (f32, f32, f32, f32, i32, "*i32", f32),  # c, g, r, h, col_count, t, p
        "sigmoid": (f32, "*i64", "*i64", "fp32", f32, f32),  # w, keys, bias, row_loss, bias_partial
    }
    if kernel == "backward_kernel":
        outs = {"grad_a_ptr": f32, "grad_b_ptr": f32, "scale_partial_ptr": f32}
        scales = {"scale": "fp32", "inv_scale": "fp32"}
    else:
        outs, scales = {"grad_b_ptr": f32}, {"scale": "fp32"}
    return {"a_ptr": t, "b_ptr": t, **outs, **scales, **shapes, **strides, "form": forms[form], **groups}


def _variants() -> list[tuple[str, str, dict]]:
    """(report name, kernel function name, extra constexprs; ``FORM``: the sweep's form, default offset)."""
    return [
        ("stats", "stats_kernel", {}),
        ("merge_stats", "merge_stats_kernel", {"BLOCK": 256}),
        ("backward_atomic", "backward_kernel", {"ATOMIC_GRAD_B": True}),
        ("backward_rows_deterministic", "backward_kernel", {"ATOMIC_GRAD_B": False}),
        ("backward_cols_deterministic", "backward_cols_kernel", {}),
        # false-negative masking by group id (issue: supervised and masked losses), forward and backward
        ("stats_masked", "stats_kernel", {"MASKED": True}),
        ("backward_atomic_masked", "backward_kernel", {"ATOMIC_GRAD_B": True, "MASKED": True}),
        # the same two kernels in their sigmoid (SigLIP) form: the loss and its gradients in one sweep
        ("sigmoid_atomic", "backward_kernel", {"ATOMIC_GRAD_B": True, "FORM": "sigmoid"}),
        ("sigmoid_rows_deterministic", "backward_kernel", {"ATOMIC_GRAD_B": False, "FORM": "sigmoid"}),
        ("sigmoid_cols_deterministic", "backward_cols_kernel", {"FORM": "sigmoid"}),
        (
            "sigmoid_loss_only",
            "backward_kernel",
            {"ATOMIC_GRAD_B": True, "FORM": "sigmoid", "WITH_GRADS": False},
        ),
    ]


def _ptxas_report(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path  # the ptxas Triton itself uses for this arch
    suffix = "a" if arch == 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run(
            [ptxas, f"-arch=sm_{arch}{suffix}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    used = re.search(r"Used (\d+) registers", out)
    if used is None:
        raise RuntimeError(f"ptxas reported no register count:\n{out}")
    registers = int(used.group(1))
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out)]
    return {"registers": registers, "spill_bytes": sum(spills)}


def _register_cap(kernel: str) -> dict:
    """The ``maxnreg`` the launcher gives ``kernel``, as a compile option."""
    from tilecl.backends.triton import STATS_MAX_REGISTERS

    return {"maxnreg": STATS_MAX_REGISTERS} if kernel == "stats_kernel" else {}


def compile_kernel(name: str, dtype: str, config, arch: int) -> dict:
    """Compile one kernel for ``sm_<arch>`` and measure it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tilecl.kernels import forms, stats, sweep

    _, fn_name, extra = next(v for v in _variants() if v[0] == name)
    fn = getattr(stats if hasattr(stats, fn_name) else sweep, fn_name)  # the statistics or the sweep
    blocks = asdict(config)
    extra = dict(extra)
    form = extra.pop("FORM", "offset")
    masked = extra.pop("MASKED", False)
    defaults = {
        **{"offset": forms.OFFSET, "sigmoid": forms.SIGMOID}[form],
        "SCALE_FROM_FP32_G": dtype != "float32",
        "WITH_GRADS": True,
    }
    constexprs = {
        "EXCLUDE_DIAGONAL": False,
        "PRECISION": "ieee",
        "UPCAST": False,
        **{k: v for k, v in defaults.items() if k in fn.arg_names},
        **extra,
        **{k: v for k, v in blocks.items() if k.startswith("BLOCK")},
    }
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    signature = {**_signature(fn_name, dtype, form, masked), **{k: "constexpr" for k in constexprs}}
    if not masked:
        constexprs.update(
            dict.fromkeys(("row_group_ptr", "col_group_ptr", "kept_ptr"))
            if "kept_ptr" in fn.arg_names
            else {}
        )
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages, **_register_cap(fn_name)},
    )
    ptx = compiled.asm["ptx"]
    # sm_90 runs Hopper's wgmma for tiles of >= 64 rows and Ampere's mma.sync below that
    tensor_core = len(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)\.", ptx))
    # address products: index × stride over a tile (a tensor-typed multiply); int32 ones wrap at 2^31
    products = re.findall(r"arith\.muli [^:]*: tensor<[0-9x]+x(i32|i64)>", compiled.asm["ttir"])
    return {
        "name": name,
        "arch": f"sm_{arch}",
        "dtype": dtype,
        "config": blocks,
        "shared_bytes": int(compiled.metadata.shared),
        **_ptxas_report(ptx, arch),
        "tensor_core_instructions": tensor_core,
        "ptx_instructions": len(
            re.findall(r"^\s+(?:@%p\d+\s+)?[a-z][\w.:]*\s[^\n]*;\s*$", ptx, flags=re.MULTILINE)
        ),
        "address_products": len(products),
        "address_products_i64": products.count("i64"),
    }


def inspect(
    archs=(80, 90), dtypes=("float16", "bfloat16", "float32"), kernels=None, configs=None, progress=True
) -> dict:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from tilecl.backends.triton import (
        GPU_CONFIGS,
        MAX_BLOCK_DOUT,
        SIGMOID_GPU_CONFIGS,
        pass_count,
        sigmoid_pass_count,
    )

    rows = []
    names = kernels or [v[0] for v in _variants()]
    for dtype in dtypes:
        for name in names:
            table = SIGMOID_GPU_CONFIGS if name.startswith("sigmoid") else GPU_CONFIGS
            for config in configs or table[dtype]:
                for arch in archs:
                    row = compile_kernel(name, dtype, config, arch)
                    if progress:
                        blocks = (
                            f"M{config.BLOCK_M} N{config.BLOCK_N} D{config.BLOCK_D} DOUT{config.BLOCK_DOUT}"
                        )
                        print(
                            f"{row['name']:<28} {row['arch']} {dtype:<8} {blocks} w{config.num_warps}: "
                            f"smem {row['shared_bytes']:>6} B, {row['registers']:>3} regs, "
                            f"spill {row['spill_bytes']} B, tensor-core {row['tensor_core_instructions']}"
                        )
                    rows.append(row)
    return {
        "kernels": rows,
        "passes": {
            "default": pass_count(MAX_BLOCK_DOUT, MAX_BLOCK_DOUT, False),
            "deterministic": pass_count(MAX_BLOCK_DOUT, MAX_BLOCK_DOUT, True),
        },
        "sigmoid_passes": {
            "default": sigmoid_pass_count(MAX_BLOCK_DOUT, MAX_BLOCK_DOUT, False),
            "deterministic": sigmoid_pass_count(MAX_BLOCK_DOUT, MAX_BLOCK_DOUT, True),
        },
        "passes_by_dim": {
            str(d): {
                "default": pass_count(d, MAX_BLOCK_DOUT, False),
                "deterministic": pass_count(d, MAX_BLOCK_DOUT, True),
            }
            for d in (128, 256, 512, 1024)
        },
    }


#: NVIDIA H100 SXM dense tensor-core peaks (FLOP/s), from the H100 datasheet
H100_PEAK = {"bf16": 989e12, "tf32": 494e12}


def performance_model(n: int = 65536, d: int = 512) -> dict:
    """A model, not a measurement: matmul passes x 2·N²·D / the H100's dense peak.

    It ignores the exp/elementwise work, memory traffic and occupancy, so it
    is a lower bound on time for both structures; what it compares is the
    matmul work each structure must do.
    """
    from tilecl.backends.triton import MAX_BLOCK_DOUT, pass_count

    flops_per_pass = 2 * n * n * d
    ours = pass_count(d, MAX_BLOCK_DOUT, deterministic=False)
    ours_det = pass_count(d, MAX_BLOCK_DOUT, deterministic=True)
    infcl = 10  # forward, then dQ and dK kernels that each recompute S, for each direction
    return {
        "note": "model: passes x 2*N^2*D / H100 dense peak; not measured",
        "n": n,
        "d": d,
        "tilecl_bf16": {"passes": ours, "ms": 1e3 * ours * flops_per_pass / H100_PEAK["bf16"]},
        "tilecl_bf16_deterministic": {
            "passes": ours_det,
            "ms": 1e3 * ours_det * flops_per_pass / H100_PEAK["bf16"],
        },
        "infcl_tf32": {"passes": infcl, "ms": 1e3 * infcl * flops_per_pass / H100_PEAK["tf32"]},
        "sigmoid": siglip_model(n),
    }


#: siglip-kernel's own figure (its README): B = 65,536, bf16, H100, fwd+bwd
SIGLIP_KERNEL_REPORTED_MS = 48.8


def siglip_model(n: int = 65536, dims: tuple[int, ...] = (512, 768, 1152)) -> dict:
    """The sigmoid fwd+bwd, bf16 on an H100, modelled as :func:`performance_model` (passes only).

    siglip-kernel's report does not state its feature dimension, so the
    model is given for the common ones (ViT-B/16: 768; So400m: 1152).
    """
    from tilecl.backends.triton import MAX_BLOCK_DOUT, sigmoid_pass_count

    out: dict = {"n": n, "siglip_kernel_reported_ms": SIGLIP_KERNEL_REPORTED_MS}
    for d in dims:
        passes = sigmoid_pass_count(d, MAX_BLOCK_DOUT, deterministic=False)
        ms = 1e3 * passes * 2 * n * n * d / H100_PEAK["bf16"]
        out[str(d)] = {"passes": passes, "ms": ms, "speedup_vs_reported": SIGLIP_KERNEL_REPORTED_MS / ms}
    return out


def cuda_inspect(progress: bool = True) -> dict:
    """The CUDA C++ kernels compiled by nvcc (cached under build/cuda-inspect/), or why not."""
    from tilecl import _cuda_build

    if _cuda_build.find_nvcc() is None:
        return {"skipped": "nvcc not found (set CUDA_HOME or put nvcc on PATH)"}
    if not _cuda_build.sources():
        return {"skipped": "the csrc/ sources are not here (use the source tree)"}
    report = _cuda_build.nvcc_report()
    if progress:
        print(f"CUDA C++ kernels ({report['nvcc']}; {report['flags']}):")
        for k in report["kernels"]:
            print(
                f"  {k['name']:<13} {k['arch']} {k['dtype']:<8}: smem {k['shared_bytes']:>6} B, "
                f"{k['registers']:>3} regs, spill {k['spill_store_bytes'] + k['spill_load_bytes']} B, "
                f"stack {k['stack_bytes']} B, tensor-core {k['tensor_core_instructions']}"
            )
    return report


#: the folder that holds the ``tools`` package: a child process imports it from there, whatever its cwd
_SOURCE_ROOT = Path(__file__).resolve().parents[1]


def run(json_path: Optional[str] = None, only: Optional[str] = None) -> dict:
    """Both sections (``only``: ``"triton"`` or ``"cuda"`` for one), printed and optionally saved as JSON.

    A CUDA section that could not run holds ``{"skipped": reason}``.
    """
    if only == "cuda":
        report = {"cuda": cuda_inspect()}
        return _write(report, json_path)
    report = inspect()
    if only is None:
        report["cuda"] = cuda_inspect()
    report["performance_model"] = model = performance_model()
    print(
        f"model (not measured), symmetric fwd+bwd, N={model['n']}, D={model['d']} on an H100: tilecl bf16 "
        f"{model['tilecl_bf16']['passes']} passes ≈ {model['tilecl_bf16']['ms']:.1f} ms "
        f"(deterministic {model['tilecl_bf16_deterministic']['ms']:.1f} ms); Inf-CL structure, TF32, "
        f"{model['infcl_tf32']['passes']} passes ≈ {model['infcl_tf32']['ms']:.1f} ms"
    )
    print(f"N·M·D matmul passes, symmetric fwd+bwd (D <= 512): {report['passes']}")
    print(f"N·M·D matmul passes, sigmoid fwd+bwd (D <= 512): {report['sigmoid_passes']}")
    for d, row in model["sigmoid"].items():
        if isinstance(row, dict):
            print(
                f"model (not measured), sigmoid fwd+bwd, N={model['n']}, D={d}, bf16, H100: {row['passes']} "
                f"passes ≈ {row['ms']:.1f} ms ({row['speedup_vs_reported']:.1f}x siglip-kernel's reported "
                f"{SIGLIP_KERNEL_REPORTED_MS} ms)"
            )
    print(f"by feature dimension D: {report['passes_by_dim']}")
    return _write(report, json_path)


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every default shown; a ``None`` default is said in the option's own words instead."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        return action.help if action.default is None else super()._get_help_string(action)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tools.inspect_kernels",
        description="Compile the Triton and CUDA C++ kernels for sm_80 and sm_90 (no GPU needed) and "
        "report shared memory, registers, spills and tensor-core instructions per kernel.",
        formatter_class=_HelpWithDefaults,
    )
    parser.add_argument(
        "--json", default=None, help="also write the report to this JSON file (default: no file)"
    )
    parser.add_argument(
        "--only", choices=("triton", "cuda"), default=None, help="one section only (default: both sections)"
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1" and args.only != "cuda":
        # interpreted kernels cannot be compiled: redo this in a process without the interpreter
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_SOURCE_ROOT), env.get("PYTHONPATH")) if p)
        command = [
            sys.executable,
            "-m",
            "tools.inspect_kernels",
            *(argv if argv is not None else sys.argv[1:]),
        ]
        raise SystemExit(subprocess.run(command, env=env).returncode)
    try:
        report = run(args.json, args.only)
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] != "triton":
            raise
        raise SystemExit(
            "python -m tools.inspect_kernels: the Triton section needs triton, which is not installed; "
            "install it with: pip install 'tilecl[gpu]' (or run --only cuda)"
        ) from None
    skipped = report.get("cuda", {}).get("skipped")
    if skipped is not None:
        print(f"python -m tools.inspect_kernels: CUDA section skipped: {skipped}", file=sys.stderr)
        if args.only == "cuda":
            raise SystemExit(1)


def _write(report: dict, json_path: Optional[str]) -> dict:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
        print(f"JSON: {json_path}")
    return report


if __name__ == "__main__":
    main()
