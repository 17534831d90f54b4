"""Triton kernels for the primitives every tilecl loss is built from.

* ``stats_kernel`` / ``merge_stats_kernel`` — the streaming-LSE forward,
  each tile of ``S = s·a bᵀ`` computed once for both its rows and its
  columns: a program walks a group of row blocks × a split of the column
  tiles, keeping an online max and sum in fp32 per row (and reading the
  positive logit from the same tile) and updating its group's partial
  (max, sum) of each column in place; a second, cheap kernel folds the
  partials in a fixed order (deterministic, no atomics). Any input, any
  scale: no fixed maximum.
* ``backward_kernel`` — the gradient sweep, one tile loop for every
  elementwise form: one program per block of rows recomputes its tiles of
  ``S``, turns each into ``G`` through the form's epilogue and accumulates
  ``dA = s·G·b`` in registers; ``dB = s·Gᵀ·a`` is either added with fp32
  atomics from the same program (default: 3 N·M·D passes) or computed by
  ``backward_cols_kernel``, one program per block of columns
  (``deterministic=True``: 4 passes, no floating-point atomics, bitwise
  reproducible). A symmetric fwd+bwd is 4 N·M·D passes (5 deterministic).

The forms (:mod:`tilecl.kernels.forms`): the softmax losses' offset form
``G_ij = g_i·exp(S_ij − c_i) + h_j·exp(S_ij − r_j)`` and SigLIP's sigmoid form
``G_ij = w_i·(σ(S_ij + β) − [k_i = κ_j])``, whose per-row losses come out of the
same tiles. A form enters the sweep kernels as two things: ``form``, one tuple
argument holding its own pointers and scalars (Triton flattens it into plain
kernel parameters, so it costs no registers and a launch of one form passes
nothing of another's), and its epilogue's ``@triton.jit`` functions as
constexprs (``EPILOGUE``, ``REPORT``, ``TOTALS``), inlined at compile time as
a ``constexpr``-selected branch would be. One entry point per form sharing a
tile-loop helper was the alternative; it would make every new form restate
both kernels' signatures and the launcher's and inspect's lists of them.

``D`` is looped over in ``BLOCK_D`` chunks for ``S``; the gradient
accumulators hold ``BLOCK_DOUT`` feature columns, and a second program along
the grid's axis 1 covers the next ``BLOCK_DOUT`` columns when ``D`` is larger
(recomputing its ``S`` tiles). float16/bfloat16 go through tensor cores with
fp32 accumulation; float32 uses full-precision dot products unless TF32 is
requested.
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
    MASKED: tl.constexpr,
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
    included = _included(
        rows, cols, n_rows, n_cols, row_group_ptr, col_group_ptr, kept_ptr, EXCLUDE_DIAGONAL, MASKED
    )
    return tl.where(included, acc * scale, float("-inf")), included


@triton.jit
def _included(
    rows, cols, n_rows, n_cols, row_group_ptr, col_group_ptr, kept_ptr, EXCLUDE_DIAGONAL: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    """The entries of the tile that are in the loss: inside the matrix, off the diagonal for
    NT-Xent, and (``MASKED``) not a false negative (same group id, not the row's kept column).
    The tile of ``S`` is ``-inf`` elsewhere; the gradient's epilogue gets this mask itself, since
    an ``S`` of ``-inf`` can also be a value (an infinite feature), which is not an exclusion."""
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    valid = row_ok[:, None] & col_ok[None, :]
    if EXCLUDE_DIAGONAL:
        valid = valid & (rows[:, None] != cols[None, :])
    if MASKED:
        # int32 ids (the launcher ranks the user's int64 ids): int64 ones spilled on sm_90
        row_group = tl.load(row_group_ptr + rows, mask=row_ok, other=0)
        kept = tl.load(kept_ptr + rows, mask=row_ok, other=-1)
        col_group = tl.load(col_group_ptr + cols, mask=col_ok, other=0)
        same = row_group[:, None] == col_group[None, :]
        valid = valid & ~(same & (cols[None, :] != kept[:, None]))
    return valid


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
    return tl.where(run_sum == 0, float("-inf"), run_max + tl.log(tl.where(run_sum == 0, 1.0, run_sum)))


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
    MASKED: tl.constexpr,
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
                col_group_ptr, kept_ptr, EXCLUDE_DIAGONAL, MASKED, BLOCK_D, PRECISION, UPCAST,
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
    max_ptr, sum_ptr, positive_ptr, lse_ptr, positive_out_ptr, parts, count, POSITIVE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """The LSE of each of ``count`` lines from its ``parts`` partial (max, sum) (``(parts, count)``,
    folded in a fixed order), and with ``POSITIVE`` the sum of its partial positive logits (one
    partial holds the logit, the others 0)."""
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = index < count
    run_max = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    positive = tl.zeros((BLOCK,), dtype=tl.float32)
    # pointers step a line of partials per part: addresses are 64-bit, parts · count may pass 2^31
    max_at, sum_at, positive_at = max_ptr + index, sum_ptr + index, positive_ptr + index
    for _ in range(0, parts):
        part_max = tl.load(max_at, mask=ok, other=float("-inf"))
        part_sum = tl.load(sum_at, mask=ok, other=0.0)
        run_max, run_sum = _merge_partial(run_max, run_sum, part_max, part_sum)
        if POSITIVE:
            positive += tl.load(positive_at, mask=ok, other=0.0)
        max_at, sum_at, positive_at = max_at + count, sum_at + count, positive_at + count
    tl.store(lse_ptr + index, _log_sum_exp(run_max, run_sum), mask=ok)
    if POSITIVE:
        tl.store(positive_out_ptr + index, positive, mask=ok)


@triton.jit
def _zero_totals(TOTALS: tl.constexpr, BLOCK_M: tl.constexpr):
    """The form's per-row reductions before the first tile: ``TOTALS`` zero vectors."""
    totals = ()
    for _ in tl.static_range(TOTALS):
        totals = totals + (tl.zeros((BLOCK_M,), dtype=tl.float32),)
    return totals


@triton.jit
def _gradient_tile(
    a_ptr, b_ptr, rows, cols, scale, n_rows, n_cols, dim, stride_a, stride_b, form, totals, row_group_ptr,
    col_group_ptr, kept_ptr, EPILOGUE: tl.constexpr, EXCLUDE_DIAGONAL: tl.constexpr, MASKED: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """The fp32 tiles of ``G`` and ``G∘S`` at (rows, cols), ``S`` recomputed exactly as in the
    forward, and the form's updated totals (:mod:`tilecl.kernels.forms`)."""
    s, included = _scores(
        a_ptr, b_ptr, rows, cols, n_rows, n_cols, dim, stride_a, stride_b, scale, row_group_ptr,
        col_group_ptr, kept_ptr, EXCLUDE_DIAGONAL, MASKED, BLOCK_D, PRECISION, UPCAST,
    )  # fmt: skip
    return EPILOGUE(s, included, rows, cols, n_rows, n_cols, form, totals)


@triton.jit
def backward_kernel(
    a_ptr,
    b_ptr,
    grad_a_ptr,
    grad_b_ptr,
    scale_partial_ptr,
    scale,
    inv_scale,
    n_rows,
    n_cols,
    dim,
    stride_a,
    stride_b,
    form,
    row_group_ptr,
    col_group_ptr,
    kept_ptr,
    EPILOGUE: tl.constexpr,
    REPORT: tl.constexpr,
    TOTALS: tl.constexpr,
    EXCLUDE_DIAGONAL: tl.constexpr,
    MASKED: tl.constexpr,
    ATOMIC_GRAD_B: tl.constexpr,
    SCALE_FROM_FP32_G: tl.constexpr,
    WITH_GRADS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One block of rows × one chunk of output features: ``dA = s·G·b`` (and ``dB`` by atomics).

    The form (``form``: its arguments; ``EPILOGUE``, ``REPORT``, ``TOTALS``:
    :mod:`tilecl.kernels.forms`) reports its own results after the tile loop;
    ``WITH_GRADS=False`` computes only those (one pass, no products with ``G``).
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    feats = tl.program_id(1) * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    feat_ok = feats < dim
    a_out = _load_block(a_ptr, rows, n_rows, feats, dim, stride_a)
    grad_a = tl.zeros((BLOCK_M, BLOCK_DOUT), dtype=tl.float32)
    grad_times_s_sum = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # unused without SCALE_FROM_FP32_G
    totals = _zero_totals(TOTALS, BLOCK_M)
    for c0 in range(0, n_cols, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        grad, grad_times_s, totals = _gradient_tile(
            a_ptr, b_ptr, rows, cols, scale, n_rows, n_cols, dim, stride_a, stride_b, form, totals,
            row_group_ptr, col_group_ptr, kept_ptr, EPILOGUE, EXCLUDE_DIAGONAL, MASKED, BLOCK_D, PRECISION,
            UPCAST,
        )  # fmt: skip
        if WITH_GRADS:
            if SCALE_FROM_FP32_G:
                grad_times_s_sum += grad_times_s
            b_out = _load_block(b_ptr, cols, n_cols, feats, dim, stride_b)
            grad_a = _dot(grad.to(b_out.dtype), b_out, grad_a, PRECISION, UPCAST)
            if ATOMIC_GRAD_B:
                zero = tl.zeros((BLOCK_N, BLOCK_DOUT), dtype=tl.float32)
                grad_b = _dot(tl.trans(grad.to(a_out.dtype)), a_out, zero, PRECISION, UPCAST)
                tl.atomic_add(
                    grad_b_ptr + cols[:, None].to(tl.int64) * dim + feats[None, :],
                    grad_b * scale,
                    mask=(cols[:, None] < n_cols) & feat_ok[None, :],
                )
    REPORT(totals, rows, n_rows, form)
    if WITH_GRADS:
        program = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        if SCALE_FROM_FP32_G:
            # Σ_ij G_ij (a_i·b_j) = Σ_ij G_ij S_ij / scale (the launcher takes scale = 0 apart), from
            # the fp32 G; every feature chunk recomputes the same G, the first one reports the sum
            partial = tl.sum(tl.sum(grad_times_s_sum, axis=1), axis=0)
            partial = tl.where(tl.program_id(1) == 0, partial, 0.0) * inv_scale
        else:
            # Σ_ij G_ij (a_i·b_j) = Σ_i a_i·(G b)_i, this program's share of the features (fp32 G)
            partial = tl.sum(tl.sum(grad_a * a_out.to(tl.float32), axis=1), axis=0)
        tl.store(scale_partial_ptr + program, partial)
        tl.store(
            grad_a_ptr + rows[:, None].to(tl.int64) * dim + feats[None, :],
            grad_a * scale,
            mask=(rows[:, None] < n_rows) & feat_ok[None, :],
        )


@triton.jit
def backward_cols_kernel(
    a_ptr,
    b_ptr,
    grad_b_ptr,
    scale,
    n_rows,
    n_cols,
    dim,
    stride_a,
    stride_b,
    form,
    row_group_ptr,
    col_group_ptr,
    kept_ptr,
    EPILOGUE: tl.constexpr,
    TOTALS: tl.constexpr,
    EXCLUDE_DIAGONAL: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One block of columns × one chunk of features: ``dB = s·Gᵀ·a`` without atomics.

    The form's totals are the row kernel's to report: here they are discarded.
    """
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    feats = tl.program_id(1) * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    feat_ok = feats < dim
    grad_b = tl.zeros((BLOCK_N, BLOCK_DOUT), dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        grad, _, _ = _gradient_tile(
            a_ptr, b_ptr, rows, cols, scale, n_rows, n_cols, dim, stride_a, stride_b, form,
            _zero_totals(TOTALS, BLOCK_M), row_group_ptr, col_group_ptr, kept_ptr, EPILOGUE, EXCLUDE_DIAGONAL,
            MASKED, BLOCK_D, PRECISION, UPCAST,
        )  # fmt: skip
        a_out = _load_block(a_ptr, rows, n_rows, feats, dim, stride_a)
        grad_b = _dot(tl.trans(grad.to(a_out.dtype)), a_out, grad_b, PRECISION, UPCAST)
    tl.store(
        grad_b_ptr + cols[:, None].to(tl.int64) * dim + feats[None, :],
        grad_b * scale,
        mask=(cols[:, None] < n_cols) & feat_ok[None, :],
    )
