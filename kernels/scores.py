"""A tile of ``S = s·a bᵀ``: the one place every pass forms ``S`` (as ``csrc/scores.cuh``).

The statistics (:mod:`tilecl.kernels.stats`) and the recomputing gradient sweep
(:mod:`tilecl.kernels.sweep`) take their tiles from :func:`_scores`, so they
exclude the same entries: outside the matrix, the diagonal (NT-Xent) and the
false negatives of the group mask.

``D`` is looped over in ``BLOCK_D`` chunks. float16/bfloat16 go through tensor
cores with fp32 accumulation; float32 uses full-precision dot products unless
TF32 is requested.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_block(ptr, index, n, feats, dim, stride):
    """Rows ``index`` x features ``feats`` of an ``(n, dim)`` matrix, zeros outside.

    The row offset is formed in int64: ``index * stride`` passes 2^31 at N·D = 2^31 (N = 4,194,304
    rows of 512 features), and an int32 product would wrap to a wrong address.
    """
    return tl.load(
        ptr + index[:, None].to(tl.int64) * stride + feats[None, :],
        mask=(index[:, None] < n) & (feats[None, :] < dim),
        other=0.0,
    )


@triton.jit
def _dot(x, y, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + x·y`` with fp32 accumulation.

    ``UPCAST`` is set only under Triton's CPU interpreter for bfloat16, whose
    ``tl.dot`` it gets wrong there (numpy has no bfloat16): the operands are
    widened exactly to fp32, which gives the tensor-core result (exact
    products, fp32 sums).
    """
    if UPCAST:
        return tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(x, y, acc, input_precision=PRECISION)


@triton.jit
def _scores(
    a_ptr,
    b_ptr,
    rows,
    cols,
    n_rows,
    n_cols,
    dim,
    stride_a,
    stride_b,
    scale,
    row_group_ptr,
    col_group_ptr,
    kept_ptr,
    EXCLUDE_DIAGONAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """The fp32 tile ``scale · a[rows] · b[cols]ᵀ``, ``-inf`` outside the matrix and where excluded,
    and the mask of its entries that are in the loss (:func:`_included`)."""
    acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        feats = d0 + tl.arange(0, BLOCK_D)
        a = _load_block(a_ptr, rows, n_rows, feats, dim, stride_a)
        b = _load_block(b_ptr, cols, n_cols, feats, dim, stride_b)
        acc = _dot(a, tl.trans(b), acc, PRECISION, UPCAST)
    included = _included(rows, cols, n_rows, n_cols, row_group_ptr, col_group_ptr, kept_ptr, EXCLUDE_DIAGONAL)
    return tl.where(included, acc * scale, float("-inf")), included


@triton.jit
def _included(
    rows, cols, n_rows, n_cols, row_group_ptr, col_group_ptr, kept_ptr, EXCLUDE_DIAGONAL: tl.constexpr,
):  # fmt: skip
    """The entries of the tile that are in the loss: inside the matrix, off the diagonal for
    NT-Xent, and (given the group ids) not a false negative (same group id, not the row's kept column).
    The tile of ``S`` is ``-inf`` elsewhere; the gradient's epilogue gets this mask itself, since
    an ``S`` of ``-inf`` can also be a value (an infinite feature), which is not an exclusion."""
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    valid = row_ok[:, None] & col_ok[None, :]
    if EXCLUDE_DIAGONAL:
        valid = valid & (rows[:, None] != cols[None, :])
    if row_group_ptr is not None:
        # int32 ids (the launcher ranks the user's int64 ids): int64 ones spilled on sm_90
        row_group = tl.load(row_group_ptr + rows, mask=row_ok, other=0)
        kept = tl.load(kept_ptr + rows, mask=row_ok, other=-1)
        col_group = tl.load(col_group_ptr + cols, mask=col_ok, other=0)
        same = row_group[:, None] == col_group[None, :]
        valid = valid & ~(same & (cols[None, :] != kept[:, None]))
    return valid
