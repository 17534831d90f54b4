"""The statistics pass (the softmax losses' forward), as ``csrc/stats.cuh``.

* ``stats_kernel`` / ``merge_stats_kernel`` — the streaming-LSE forward,
  each tile of ``S = s·a bᵀ`` (:mod:`tilecl.kernels.scores`) computed once
  for both its rows and its columns: a program walks a group of row blocks ×
  a split of the column tiles, keeping an online max and sum in fp32 per row
  (and reading the positive logit from the same tile) and updating its
  group's partial (max, sum) of each column in place; a second, cheap kernel
  folds the partials in a fixed order (deterministic, no atomics). Any input,
  any scale: no fixed maximum.

The launcher is ``lse_stats`` in ``tilecl.backends.triton``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .scores import _scores


@triton.jit
def _merge_tile(run_max, run_sum, s, AXIS: tl.constexpr):
    """Streaming LSE: fold a tile's rows (AXIS=1) or columns (AXIS=0) into the running (max, sum)."""
    new_max = tl.maximum(run_max, tl.max(s, axis=AXIS))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    tile_sum = tl.sum(tl.exp(s - tl.expand_dims(shift, AXIS)), axis=AXIS)
    return new_max, run_sum * tl.exp(run_max - shift) + tile_sum


@triton.jit
def _merge_partial(run_max, run_sum, part_max, part_sum):
    """Streaming LSE: fold a partial (max, sum), itself relative to its max, into the running one."""
    new_max = tl.maximum(run_max, part_max)
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    return new_max, run_sum * tl.exp(run_max - shift) + part_sum * tl.exp(part_max - shift)


@triton.jit
def _log_sum_exp(run_max, run_sum):
    """``max + log(sum)``; an empty (fully excluded or padding) row is ``-inf``, without log(0).

    A NaN sum (a NaN logit) stays NaN: it must not pass for an excluded row.
    """
    return _log_sum_exp_parts(run_max, run_sum)[0]


@triton.jit
def _log_sum_exp_parts(run_max, run_sum):
    """:func:`_log_sum_exp` and what rounding it left out (TwoSum of ``max`` and ``log(sum)``: their
    sum exactly; 0 where the LSE is not finite)."""
    log_sum = tl.log(tl.where(run_sum == 0, 1.0, run_sum))
    lse = tl.where(run_sum == 0, float("-inf"), run_max + log_sum)
    b_part = lse - run_max
    low = (run_max - (lse - b_part)) + (log_sum - b_part)
    finite = (lse == lse) & (lse != float("inf")) & (lse != float("-inf"))
    return lse, tl.where(finite, low, 0.0)


@triton.jit
def stats_kernel(
    a_ptr,
    b_ptr,
    targets_ptr,
    row_max_ptr,
    row_sum_ptr,
    positive_ptr,
    col_max_ptr,
    col_sum_ptr,
    scale,
    n_rows,
    n_cols,
    col_count,
    dim,
    stride_a,
    stride_b,
    blocks_per_group,
    tiles_per_split,
    row_group_ptr,
    col_group_ptr,
    kept_ptr,
    EXCLUDE_DIAGONAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """The row and the column statistics from one computation of each tile of ``S``.

    Program ``(p, q)`` takes row group ``p`` (``blocks_per_group`` blocks of
    rows) × column split ``q`` (``tiles_per_split`` tiles of columns). Each
    row block's (max, sum) and positive logit over the split land in row
    ``q`` of the row partials (``(splits, n_rows)``); each column's (max, sum)
    over the group in row ``p`` of the column partials (``(groups,
    col_count)``), updated in place as the program's row blocks pass — no
    other program owns those entries, so no atomics, and the result is
    reproducible bitwise. :func:`merge_stats_kernel` folds the partials.
    """
    group = tl.program_id(0)
    split = tl.program_id(1)
    c_begin = split * tiles_per_split * BLOCK_N
    c_end = tl.minimum(n_cols, c_begin + tiles_per_split * BLOCK_N)
    b_begin = group * blocks_per_group
    b_end = tl.minimum(tl.cdiv(n_rows, BLOCK_M), b_begin + blocks_per_group)
    for block in range(b_begin, b_end):
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
        run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        positive = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c0 in range(c_begin, c_end, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            s, _ = _scores(
                a_ptr, b_ptr, rows, cols, n_rows, n_cols, dim, stride_a, stride_b, scale, row_group_ptr,
                col_group_ptr, kept_ptr, EXCLUDE_DIAGONAL, BLOCK_D, PRECISION, UPCAST,
            )  # fmt: skip
            is_target = cols[None, :] == targets[:, None]
            positive += tl.sum(tl.where(is_target, s, 0.0), axis=1)
            run_max, run_sum = _merge_tile(run_max, run_sum, s, 1)
            if c0 < col_count:
                col_ok = cols < col_count
                # the group's earlier blocks wrote these entries; the barrier makes the writes of
                # every thread of the program visible to the threads that now read them
                tl.debug_barrier()
                earlier = col_ok & (tl.full((BLOCK_N,), block, tl.int32) > b_begin)
                col_at = group.to(tl.int64) * col_count + cols
                col_max = tl.load(col_max_ptr + col_at, mask=earlier, other=float("-inf"))
                col_sum = tl.load(col_sum_ptr + col_at, mask=earlier, other=0.0)
                col_max, col_sum = _merge_tile(col_max, col_sum, s, 0)
                tl.store(col_max_ptr + col_at, col_max, mask=col_ok)
                tl.store(col_sum_ptr + col_at, col_sum, mask=col_ok)
        row_out = split.to(tl.int64) * n_rows + rows
        tl.store(row_max_ptr + row_out, run_max, mask=row_ok)
        tl.store(row_sum_ptr + row_out, run_sum, mask=row_ok)
        tl.store(positive_ptr + row_out, positive, mask=row_ok)


@triton.jit
def merge_stats_kernel(
    max_ptr, sum_ptr, positive_ptr, lse_ptr, low_ptr, positive_out_ptr, parts, count, BLOCK: tl.constexpr,
):  # fmt: skip
    """The LSE of each of ``count`` lines from its ``parts`` partial (max, sum) (``(parts, count)``,
    folded in a fixed order), with what its rounding left out (``low_ptr``), and given
    ``positive_ptr`` (``None`` for columns) the sum of its partial positive logits (one partial holds
    the logit, the others 0)."""
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = index < count
    run_max = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    positive = tl.zeros((BLOCK,), dtype=tl.float32)
    # pointers step a line of partials per part: addresses are 64-bit, parts · count may pass 2^31
    max_at, sum_at = max_ptr + index, sum_ptr + index
    for part in range(0, parts):
        part_max = tl.load(max_at, mask=ok, other=float("-inf"))
        part_sum = tl.load(sum_at, mask=ok, other=0.0)
        run_max, run_sum = _merge_partial(run_max, run_sum, part_max, part_sum)
        if positive_ptr is not None:
            positive += tl.load(positive_ptr + part * count + index, mask=ok, other=0.0)
        max_at, sum_at = max_at + count, sum_at + count
    lse, low = _log_sum_exp_parts(run_max, run_sum)
    tl.store(lse_ptr + index, lse, mask=ok)
    tl.store(low_ptr + index, low, mask=ok)
    if positive_out_ptr is not None:
        tl.store(positive_out_ptr + index, positive, mask=ok)
