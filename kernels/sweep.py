"""The gradient sweep, one tile loop for every elementwise form, as ``csrc/grad.cuh``.

* ``backward_kernel`` — one program per block of rows recomputes its tiles of
  ``S`` (:mod:`tilecl.kernels.scores`), turns each into ``G`` through the
  form's epilogue and accumulates ``dA = s·G·b`` in registers; ``dB = s·Gᵀ·a``
  is either added with fp32 atomics from the same program (default: 3 N·M·D
  passes) or computed by ``backward_cols_kernel``, one program per block of
  columns (``deterministic=True``: 4 passes, no floating-point atomics,
  bitwise reproducible). A symmetric fwd+bwd, with the statistics of
  :mod:`tilecl.kernels.stats`, is 4 N·M·D passes (5 deterministic).

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

The gradient accumulators hold ``BLOCK_DOUT`` feature columns, and a second
program along the grid's axis 1 covers the next ``BLOCK_DOUT`` columns when
``D`` is larger (recomputing its ``S`` tiles). The launcher is ``_sweep`` in
``tilecl.backends.triton``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .scores import _dot, _load_block, _scores


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
    col_group_ptr, kept_ptr, EPILOGUE: tl.constexpr, EXCLUDE_DIAGONAL: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """The fp32 tiles of ``G`` and ``G∘S`` at (rows, cols), ``S`` recomputed exactly as in the
    forward, and the form's updated totals (:mod:`tilecl.kernels.forms`)."""
    s, included = _scores(
        a_ptr, b_ptr, rows, cols, n_rows, n_cols, dim, stride_a, stride_b, scale, row_group_ptr,
        col_group_ptr, kept_ptr, EXCLUDE_DIAGONAL, BLOCK_D, PRECISION, UPCAST,
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
            row_group_ptr, col_group_ptr, kept_ptr, EPILOGUE, EXCLUDE_DIAGONAL, BLOCK_D, PRECISION,
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
            BLOCK_D, PRECISION, UPCAST,
        )  # fmt: skip
        a_out = _load_block(a_ptr, rows, n_rows, feats, dim, stride_a)
        grad_b = _dot(tl.trans(grad.to(a_out.dtype)), a_out, grad_b, PRECISION, UPCAST)
    tl.store(
        grad_b_ptr + cols[:, None].to(tl.int64) * dim + feats[None, :],
        grad_b * scale,
        mask=(cols[:, None] < n_cols) & feat_ok[None, :],
    )
