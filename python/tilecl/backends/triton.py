"""The ``triton`` backend: the two primitives as launches of the ``@triton.jit`` kernels of ``kernels/``.

Argument preparation, block configurations and grids live here; the kernel
source is ``tilecl.kernels`` (the top-level ``kernels/`` folder). They run on
CUDA tensors, and on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported) — which is how the test
suite executes every kernel line without a GPU. Importing this module imports
triton (about a second), so the registry loads it on first use.

``torch.use_deterministic_algorithms(True)`` selects the backward without
floating-point atomics (bitwise reproducible, one more N·M·D pass).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
import triton

from tilecl.kernels.contrastive import (
    backward_cols_kernel,
    backward_kernel,
    col_stats_kernel,
    row_stats_kernel,
)

from . import torch as torch_primitives
from .base import (
    KERNEL_DTYPES,
    Gradients,
    LseStats,
    OffsetTerms,
    Scores,
    SigmoidSweep,
    SigmoidTerms,
    with_unit_multipliers,
    with_unit_weights,
)

__all__ = [
    "GPU_CONFIGS",
    "SIGMOID_GPU_CONFIGS",
    "KernelConfig",
    "MAX_BLOCK_DOUT",
    "lse_stats",
    "offset_backward",
    "pass_count",
    "sigmoid_pass_count",
    "sigmoid_sweep",
]

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: float32 inputs use full-precision dot products unless this is set (TILECL_ALLOW_TF32=1)
ALLOW_TF32 = os.environ.get("TILECL_ALLOW_TF32", "0") == "1"


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
    # 16-bit D <= 128: 32 columns, not 64, since the backward also sums G∘S in fp32 (sm_80 spilled)
    "float16": [
        KernelConfig(32, 32, 32, 128, 8),
        KernelConfig(32, 32, 32, 256, 8),
        KernelConfig(16, 16, 32, 512, 8),
    ],
    "bfloat16": [
        KernelConfig(32, 32, 32, 128, 8),
        KernelConfig(32, 32, 32, 256, 8),
        KernelConfig(16, 16, 32, 512, 8),
    ],
    # float32: the 64-bit address products cost registers; these are the largest spill-free tiles
    # (at D <= 256, 16 x 32: 16 x 16 spilled on sm_80 once the group mask was compiled in)
    "float32": [
        KernelConfig(32, 16, 16, 128, 8),
        KernelConfig(16, 32, 16, 256, 8),
        KernelConfig(16, 16, 16, 512, 8),
    ],
}
#: widest gradient accumulator: larger D adds a program (and an S recompute) per chunk
MAX_BLOCK_DOUT = 512
#: below this |scale|, 1/scale overflows float32: the 16-bit d(scale) comes from the torch backend
TINY_SCALE = 2.0**-100
#: largest block side: tile indices ``program_id · BLOCK + arange`` are int32 and must not wrap
MAX_BLOCK = 512
#: largest N, M or D the kernels take (address products are int64; the indices themselves int32)
MAX_DIM = 2**31 - MAX_BLOCK
# chosen by `python -m tilecl inspect`: the largest tiles with zero register spills on sm_80 and sm_90


#: the sigmoid form keeps more fp32 temporaries live per tile entry (the loss, σ's pieces), so the
#: 16-bit tiles of the softmax configurations spill there: these are the largest spill-free ones
#: for each feature width (python -m tilecl inspect)
_SIGMOID_16_BIT = [
    KernelConfig(32, 16, 32, 128, 4),
    KernelConfig(16, 32, 32, 256, 8),
    KernelConfig(16, 16, 32, 512, 8),
]
SIGMOID_GPU_CONFIGS = {
    "float16": _SIGMOID_16_BIT,
    "bfloat16": _SIGMOID_16_BIT,
    # the softmax form's 16 x 32 tile at D <= 256 spills in the sigmoid form on sm_80
    "float32": [
        KernelConfig(32, 16, 16, 128, 8),
        KernelConfig(16, 16, 16, 256, 8),
        KernelConfig(16, 16, 16, 512, 8),
    ],
}


def gpu_config(dim: int, dtype: torch.dtype, form: str = "softmax") -> KernelConfig:
    """The smallest configuration whose gradient accumulator holds all ``dim`` features (≤ 512)."""
    table = SIGMOID_GPU_CONFIGS if form == "sigmoid" else GPU_CONFIGS
    configs = table[str(dtype).removeprefix("torch.")]
    return next((c for c in configs if c.BLOCK_DOUT >= dim), configs[-1])


def config_for(a: torch.Tensor, form: str = "softmax") -> KernelConfig:
    return INTERPRETER_CONFIG if INTERPRETED else gpu_config(a.shape[1], a.dtype, form)


def pass_count(dim: int, block_dout: int, deterministic: bool) -> int:
    """N·M·D matmul passes of a symmetric fwd+bwd.

    Forward: row statistics (1) + column statistics (1). Backward: each
    feature chunk recomputes ``S`` (1 per chunk), ``G·b`` and ``Gᵀ·a`` add one
    pass each; the deterministic backward recomputes ``S`` once more per chunk
    in its column-block kernel.
    """
    chunks = -(-dim // block_dout)
    return 2 + chunks * (2 if deterministic else 1) + 2


def sigmoid_pass_count(dim: int, block_dout: int, deterministic: bool) -> int:
    """N·M·D matmul passes of a sigmoid fwd+bwd: the whole of it is one gradient sweep.

    Each feature chunk computes ``S`` (1 per chunk), then ``G·b`` and ``Gᵀ·a``
    one pass each; the deterministic sweep recomputes ``S`` once more per
    chunk in its column-block kernel. 3 (4 deterministic) at ``D ≤ BLOCK_DOUT``.
    """
    chunks = -(-dim // block_dout)
    return chunks * (2 if deterministic else 1) + 2


def _dot_options(dtype: torch.dtype) -> dict:
    precision = "tf32" if dtype == torch.float32 and ALLOW_TF32 else "ieee"
    return dict(PRECISION=precision, UPCAST=INTERPRETED and dtype == torch.bfloat16)


def _check(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # the registry refuses these before a loss runs; a direct call of the primitive is checked here
    for name, x in (("a", a), ("b", b)):
        if max(x.shape) > MAX_DIM:
            raise ValueError(
                f"backend='triton': {name} has shape {tuple(x.shape)}; the kernels take at most "
                f"2^31 - {MAX_BLOCK} = {MAX_DIM} rows and features (their tile indices are 32-bit)"
            )
    if a.dtype not in KERNEL_DTYPES:
        raise TypeError(f"backend='triton' takes float16, bfloat16 and float32 inputs, got {a.dtype}")
    if a.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    # rows may be strided, features must be contiguous
    return (a if a.stride(1) == 1 else a.contiguous()), (b if b.stride(1) == 1 else b.contiguous())


def _group_mask(scores: Scores, placeholder: torch.Tensor) -> dict:
    """The kernels' group-mask arguments: the id and kept-column pointers and ``MASKED``.

    Without masking the pointers are never read; ``placeholder`` stands in for them.
    """
    if not scores.masked:
        return dict(row_group_ptr=placeholder, col_group_ptr=placeholder, kept_ptr=placeholder, MASKED=False)
    row_groups, col_groups, kept_cols = scores.group_mask()
    # the kernels compare int32 ids (int64 ones cost registers the tiles need): each id becomes its
    # rank among all ids, which keeps equality; a kept column index is < MAX_DIM already
    every = torch.sort(torch.cat([row_groups.long(), col_groups.long()])).values
    rank = (
        torch.searchsorted(every, x.long()).to(torch.int32).contiguous() for x in (row_groups, col_groups)
    )
    return dict(
        row_group_ptr=next(rank),
        col_group_ptr=next(rank),
        kept_ptr=kept_cols.clamp(-1, MAX_DIM).to(torch.int32).contiguous(),
        MASKED=True,
    )


def _launch_options(cfg: KernelConfig) -> dict:
    opts = asdict(cfg)
    if INTERPRETED:
        opts.pop("num_warps")
        opts.pop("num_stages")
    return opts


def lse_stats(scores: Scores, targets: torch.Tensor, col_count: int) -> LseStats:
    """:class:`~tilecl.backends.base.LseStats` in float32."""
    a, b = _check(scores.a, scores.b)
    scale, exclude_diagonal = scores.scale, scores.exclude_diagonal
    n, m, dim = a.shape[0], b.shape[0], a.shape[1]
    cfg = config_for(a)
    opts = _launch_options(cfg)
    opts.pop("BLOCK_DOUT")
    s = float(scale)
    row_lse = torch.empty(n, dtype=torch.float32, device=a.device)
    positive = torch.empty(n, dtype=torch.float32, device=a.device)
    groups = _group_mask(scores, targets)
    row_stats_kernel[(triton.cdiv(n, cfg.BLOCK_M),)](
        a, b, targets.contiguous(), row_lse, positive, s, n, m, dim, a.stride(0), b.stride(0),
        EXCLUDE_DIAGONAL=exclude_diagonal, **groups, **_dot_options(a.dtype), **opts,
    )  # fmt: skip
    col_lse = torch.empty(col_count, dtype=torch.float32, device=a.device)
    if col_count:
        col_stats_kernel[(triton.cdiv(col_count, cfg.BLOCK_N),)](
            a, b, col_lse, s, n, m, col_count, dim, a.stride(0), b.stride(0),
            EXCLUDE_DIAGONAL=exclude_diagonal, **groups, **_dot_options(a.dtype), **opts,
        )  # fmt: skip
    return LseStats(row_lse, col_lse, positive)


@with_unit_multipliers
def offset_backward(scores: Scores, terms: OffsetTerms) -> Gradients:
    """:class:`~tilecl.backends.base.Gradients` in float32."""
    a, b = _check(scores.a, scores.b)
    scale, exclude_diagonal = scores.scale, scores.exclude_diagonal
    row_offset, row_mult, col_offset, col_mult = terms
    n, m, dim = a.shape[0], b.shape[0], a.shape[1]
    col_count = col_offset.shape[0]
    cfg = config_for(a)
    opts = _launch_options(cfg)
    f32: dict[str, Any] = dict(dtype=torch.float32, device=a.device)
    # an offset of -inf (a fully excluded row or column) carries no term; +inf and NaN stay, so
    # NaN or inf inputs reach the gradients as in the full-matrix loss
    row_live, col_live = ~torch.isneginf(row_offset), ~torch.isneginf(col_offset)
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
    groups = _group_mask(scores, c)
    common = dict(EXCLUDE_DIAGONAL=exclude_diagonal, **groups, **_dot_options(a.dtype), **opts)
    inv_s = 1.0 / s if abs(s) >= TINY_SCALE else 0.0
    unused = dict(row_key_ptr=c, col_key_ptr=c, bias=0.0)  # the sigmoid form's arguments
    backward_kernel[grid](
        a, b, c, g, r, h, grad_a, grad_b, scale_partials, s, inv_s, n, m, col_count, dim,
        a.stride(0), b.stride(0), **unused, row_loss_ptr=c, bias_partial_ptr=c,
        ATOMIC_GRAD_B=not deterministic, SCALE_FROM_FP32_G=a.dtype != torch.float32, SIGMOID=False,
        WITH_GRADS=True, **common,
    )  # fmt: skip
    if deterministic:
        backward_cols_kernel[(triton.cdiv(m, cfg.BLOCK_N), grid[1])](
            a, b, c, g, r, h, grad_b, s, n, m, col_count, dim, a.stride(0), b.stride(0), **unused,
            SIGMOID=False, **common,
        )  # fmt: skip
    grad_scale = scale_partials.sum()
    if abs(s) < TINY_SCALE and a.dtype != torch.float32:
        # 16-bit inputs: the kernel sums G·S / scale, and at scale ~0 (an infinite temperature) S
        # holds no a·b to divide (1/scale would overflow float32)
        grad_scale = torch_primitives.offset_backward(scores, terms).grad_scale.float()
    return Gradients(grad_a, grad_b, grad_scale)


@with_unit_weights
def sigmoid_sweep(scores: Scores, terms: SigmoidTerms, with_grads: bool) -> SigmoidSweep:
    """:class:`~tilecl.backends.base.SigmoidSweep` in float32: ``backward_kernel`` in its sigmoid form.

    One sweep: without gradients one ``S`` pass; with them 3 passes (4 under
    ``torch.use_deterministic_algorithms``, no float atomics).
    """
    a, b = _check(scores.a, scores.b)
    scale, exclude_diagonal = scores.scale, scores.exclude_diagonal
    n, m, dim = a.shape[0], b.shape[0], a.shape[1]
    cfg = config_for(a, "sigmoid")
    opts = _launch_options(cfg)
    f32: dict[str, Any] = dict(dtype=torch.float32, device=a.device)
    weights = terms.row_weights.to(**f32).contiguous()
    row_keys, col_keys = terms.row_keys.contiguous(), terms.col_keys.contiguous()
    deterministic = torch.are_deterministic_algorithms_enabled()
    s, bias = float(scale), float(terms.bias)
    grid = (triton.cdiv(n, cfg.BLOCK_M), triton.cdiv(dim, cfg.BLOCK_DOUT) if with_grads else 1)
    row_loss = torch.empty(n, **f32)
    bias_partials = torch.empty(grid[0] * grid[1], **f32)
    grad_a = torch.empty(n, dim, **f32) if with_grads else row_loss
    grad_b = (
        (torch.empty(m, dim, **f32) if deterministic else torch.zeros(m, dim, **f32))
        if with_grads
        else row_loss
    )
    scale_partials = torch.empty(grid[0] * grid[1], **f32)
    common = dict(
        EXCLUDE_DIAGONAL=exclude_diagonal, SIGMOID=True, **_group_mask(scores, row_keys),
        **_dot_options(a.dtype), **opts,
    )  # fmt: skip
    keys = dict(row_key_ptr=row_keys, col_key_ptr=col_keys, bias=bias)
    inv_s = 1.0 / s if abs(s) >= TINY_SCALE else 0.0
    # the offset form's c, r and h are not read: the row weights stand in for their pointers
    backward_kernel[grid](
        a, b, weights, weights, weights, weights, grad_a, grad_b, scale_partials, s, inv_s, n, m, 0,
        dim, a.stride(0), b.stride(0), **keys, row_loss_ptr=row_loss, bias_partial_ptr=bias_partials,
        ATOMIC_GRAD_B=not deterministic, SCALE_FROM_FP32_G=a.dtype != torch.float32,
        WITH_GRADS=with_grads, **common,
    )  # fmt: skip
    if not with_grads:
        return SigmoidSweep(row_loss, *(torch.empty(0, **f32) for _ in range(4)))
    if deterministic:
        backward_cols_kernel[(triton.cdiv(m, cfg.BLOCK_N), grid[1])](
            a, b, weights, weights, weights, weights, grad_b, s, n, m, 0, dim, a.stride(0), b.stride(0),
            **keys, **common,
        )  # fmt: skip
    grad_scale = scale_partials.sum()
    if abs(s) < TINY_SCALE and a.dtype != torch.float32:
        # as in offset_backward: S / scale holds no a·b at scale ~0
        grad_scale = torch_primitives.sigmoid_sweep(scores, terms, True).grad_scale.float()
    return SigmoidSweep(row_loss, grad_a, grad_b, grad_scale, bias_partials.sum())
