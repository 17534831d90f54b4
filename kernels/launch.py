"""Launch wrappers: argument preparation, block configuration, grids."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
import triton

from .contrastive import _backward_cols_kernel, _backward_kernel, _col_stats_kernel, _row_stats_kernel

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: float32 inputs use full-precision dot products unless this is set (TILECL_ALLOW_TF32=1)
ALLOW_TF32 = os.environ.get("TILECL_ALLOW_TF32", "0") == "1"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes of one launch (``BLOCK_DOUT``: feature columns per gradient accumulator)."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_D: int
    BLOCK_DOUT: int
    num_warps: int = 4
    num_stages: int = 2


#: small blocks under the interpreter: several tiles and feature chunks even for tiny test shapes
INTERPRETER_CONFIG = KernelConfig(16, 16, 16, 16, num_warps=1, num_stages=1)


#: the configurations compiled and checked by ``python -m tilecl inspect`` (per input dtype);
#: :func:`gpu_config` picks among them by the feature dimension
GPU_CONFIGS = {
    "float16": [
        KernelConfig(32, 64, 32, 128, 8),
        KernelConfig(32, 32, 32, 256, 8),
        KernelConfig(16, 16, 32, 512, 8),
    ],
    "bfloat16": [
        KernelConfig(32, 64, 32, 128, 8),
        KernelConfig(32, 32, 32, 256, 8),
        KernelConfig(16, 16, 32, 512, 8),
    ],
    "float32": [
        KernelConfig(32, 32, 16, 128, 8),
        KernelConfig(32, 16, 16, 256, 8),
        KernelConfig(16, 16, 16, 512, 8),
    ],
}
#: widest gradient accumulator: larger D adds a program (and an S recompute) per chunk
MAX_BLOCK_DOUT = 512
# chosen by `python -m tilecl inspect`: the largest tiles with zero register spills on sm_80 and sm_90


def gpu_config(dim: int, dtype: torch.dtype) -> KernelConfig:
    """The smallest configuration whose gradient accumulator holds all ``dim`` features (≤ 512)."""
    configs = GPU_CONFIGS[str(dtype).removeprefix("torch.")]
    return next((c for c in configs if c.BLOCK_DOUT >= dim), configs[-1])


def config_for(a: torch.Tensor) -> KernelConfig:
    return INTERPRETER_CONFIG if INTERPRETED else gpu_config(a.shape[1], a.dtype)


def pass_count(dim: int, block_dout: int, deterministic: bool) -> int:
    """N·M·D matmul passes of a symmetric fwd+bwd.

    Forward: row statistics (1) + column statistics (1). Backward: each
    feature chunk recomputes ``S`` (1 per chunk), ``G·b`` and ``Gᵀ·a`` add one
    pass each; the deterministic backward recomputes ``S`` once more per chunk
    in its column-block kernel.
    """
    chunks = -(-dim // block_dout)
    return 2 + chunks * (2 if deterministic else 1) + 2


def _dot_options(dtype: torch.dtype) -> dict:
    precision = "tf32" if dtype == torch.float32 and ALLOW_TF32 else "ieee"
    return dict(PRECISION=precision, UPCAST=INTERPRETED and dtype == torch.bfloat16)


def _check(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"backend='triton' supports float16, bfloat16 and float32 inputs, got {a.dtype}; "
            "use backend='torch' for float64"
        )
    if a.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    # rows may be strided, features must be contiguous
    return (a if a.stride(1) == 1 else a.contiguous()), (b if b.stride(1) == 1 else b.contiguous())


def _launch_options(cfg: KernelConfig) -> dict:
    opts = asdict(cfg)
    if INTERPRETED:
        opts.pop("num_warps")
        opts.pop("num_stages")
    return opts


def lse_stats(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    targets: torch.Tensor,
    col_count: int,
    exclude_diagonal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row LSE (N), column LSE (col_count) and positive logits (N), fp32; see ``tilecl._blockwise``."""
    a, b = _check(a, b)
    n, m, dim = a.shape[0], b.shape[0], a.shape[1]
    cfg = config_for(a)
    opts = _launch_options(cfg)
    opts.pop("BLOCK_DOUT")
    s = float(scale)
    row_lse = torch.empty(n, dtype=torch.float32, device=a.device)
    positive = torch.empty(n, dtype=torch.float32, device=a.device)
    _row_stats_kernel[(triton.cdiv(n, cfg.BLOCK_M),)](
        a, b, targets.contiguous(), row_lse, positive, s, n, m, dim, a.stride(0), b.stride(0),
        EXCLUDE_DIAGONAL=exclude_diagonal, **_dot_options(a.dtype), **opts,
    )  # fmt: skip
    col_lse = torch.empty(col_count, dtype=torch.float32, device=a.device)
    if col_count:
        _col_stats_kernel[(triton.cdiv(col_count, cfg.BLOCK_N),)](
            a, b, col_lse, s, n, m, col_count, dim, a.stride(0), b.stride(0),
            EXCLUDE_DIAGONAL=exclude_diagonal, **_dot_options(a.dtype), **opts,
        )  # fmt: skip
    return row_lse, col_lse, positive


def offset_backward(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    row_offset: torch.Tensor,
    row_mult: torch.Tensor,
    col_offset: torch.Tensor,
    col_mult: torch.Tensor,
    exclude_diagonal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s·G·b, s·Gᵀ·a, Σ G_ij a_i·b_j)`` in fp32; see ``tilecl._blockwise.offset_backward``."""
    a, b = _check(a, b)
    n, m, dim = a.shape[0], b.shape[0], a.shape[1]
    col_count = col_offset.shape[0]
    cfg = config_for(a)
    opts = _launch_options(cfg)
    f32 = dict(dtype=torch.float32, device=a.device)
    # an infinite offset carries no term (a column without pairs, a fully excluded row or column)
    row_live, col_live = torch.isfinite(row_offset), torch.isfinite(col_offset)
    c = torch.where(row_live, row_offset, 0.0).to(**f32).contiguous()
    g = torch.where(row_live, row_mult, 0.0).to(**f32).contiguous()
    r = torch.where(col_live, col_offset, 0.0).to(**f32).contiguous()
    h = torch.where(col_live, col_mult, 0.0).to(**f32).contiguous()
    deterministic = torch.are_deterministic_algorithms_enabled()
    s = float(scale)
    grid = (triton.cdiv(n, cfg.BLOCK_M), triton.cdiv(dim, cfg.BLOCK_DOUT))
    grad_a = torch.empty(n, dim, **f32)
    grad_b = torch.empty(m, dim, **f32) if deterministic else torch.zeros(m, dim, **f32)
    scale_partials = torch.empty(grid[0] * grid[1], **f32)
    common = dict(EXCLUDE_DIAGONAL=exclude_diagonal, **_dot_options(a.dtype), **opts)
    _backward_kernel[grid](
        a, b, c, g, r, h, grad_a, grad_b, scale_partials, s, n, m, col_count, dim, a.stride(0), b.stride(0),
        ATOMIC_GRAD_B=not deterministic, **common,
    )  # fmt: skip
    if deterministic:
        _backward_cols_kernel[(triton.cdiv(m, cfg.BLOCK_N), grid[1])](
            a, b, c, g, r, h, grad_b, s, n, m, col_count, dim, a.stride(0), b.stride(0), **common,
        )  # fmt: skip
    return grad_a, grad_b, scale_partials.sum()
