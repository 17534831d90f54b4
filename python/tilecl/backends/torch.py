"""The ``torch`` backend: the primitives (:mod:`tilecl.backends.base`) as tiled PyTorch.

* :func:`lse_stats` — one pass over the tiles of ``S = s·a bᵀ`` that yields the
  row log-sum-exp (all ``M`` columns) and the column log-sum-exp of the first
  ``col_count`` columns, merging tiles with the streaming rule
  ``(m, l) ⊕ (m', l') = (μ, l·e^(m−μ) + l'·e^(m'−μ))``.
* :func:`sweep` — recomputes ``S`` tile by tile and applies a form's
  epilogue: :func:`offset_backward` (``G_ij = g_i·exp(S_ij − c_i) +
  h_j·exp(S_ij − r_j) − p_i·[j = t_i]``, returning ``s·G·b``, ``s·Gᵀ·a`` and
  ``Σ G_ij (a_i·b_j)``) or :func:`sigmoid_sweep` (SigLIP).

Only ``O(N + M)`` statistics and a few tiles live at once; the tile
shape follows a byte budget (:data:`TILE_BYTES`, env ``TILECL_TILE_BYTES``).

Tile buffers are allocated once per call and every elementwise step writes in
place: on CPU a fresh multi-MB allocation costs more than the ``exp`` itself.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from typing import Callable, Iterator, Optional

import torch

from .._compat import softplus_into
from .base import (
    FLOAT_DTYPES,
    Backend,
    Gradients,
    LseStats,
    OffsetTerms,
    Scores,
    SigmoidSweep,
    SigmoidTerms,
    WholeTile,
    accumulation_dtype,
    anywhere,
    cuda_visible,
    lse_parts,
    module_loader,
    softplus_threshold,
    sweep_of,
)
from .registry import register_backend

__all__ = [
    "BACKEND",
    "TILE_BYTES",
    "accumulation_dtype",
    "lse_stats",
    "offset_backward",
    "sigmoid_sweep",
    "sweep",
    "one_tile",
    "one_tile_exclude_",
    "one_tile_products",
    "one_tile_scores",
    "tile_shape",
]

#: Bytes of float tile buffers a call may hold (the "extra memory" knob).
TILE_BYTES: int = int(os.environ.get("TILECL_TILE_BYTES", str(16 << 20)))

# The single-exp paths shift whole tiles by one reference value. They are used
# only where every shifted quantity provably stays far inside the float range;
# elsewhere the two-exp paths, exact for any spread of logits, run. Margins in
# natural-log units: a row's exp(S − c_i) carries the column terms
# h_j·exp(S − r_j) = exp(S − c_i)·exp(c_i − r_j), so with offsets spread by up
# to the window it must stay a normal number (below e^-87 / e^-708 it is
# subnormal, and :func:`_exp_` gives 0 below e^-103 / e^-745) while such a term
# is above the dtype's resolution (e^-17 / e^-37).
_SAFE_WINDOW = {torch.float32: 64.0, torch.float64: 660.0}


#: ``exp(x) = 2^(x·log₂e)``
_LOG2_E = 1.0 / math.log(2.0)


def _exp_(x: torch.Tensor) -> torch.Tensor:
    """``exp`` in place, taken as ``exp2(x·log₂e)``.

    PyTorch's CPU ``exp`` leaves its vectorized path for an argument whose
    result is subnormal or 0 (10-20x slower below -87 in float32), and the
    shifted logits of unnormalized embeddings sit there on most entries;
    ``exp2`` stays vectorized everywhere (4-5x faster than a clamped ``exp``
    on such tiles, two ops instead of four). Rounding ``x·log₂e`` costs a
    relative error of about ``|x|·ε`` in the result: the error ``x`` already
    carries from forming ``S``, and 0 where ``x = 0`` (a saturated row's
    softmax stays exactly 1). -inf gives 0, NaN stays NaN.
    """
    return x.mul_(_LOG2_E).exp2_()


def _reads_values(x: torch.Tensor) -> bool:
    """Whether a value of ``x`` may be read to pick a faster exact path, once per call (never per
    tile): on the CPU a read costs nothing; on an accelerator it would stall the stream, so there
    the paths exact for every input run without asking."""
    return x.device.type == "cpu"


def _narrow_logits(scores: Scores, acc: torch.dtype) -> bool:
    """Whether all finite logits lie within the single-exp window of each other, from the bound
    ``|S_ij| ≤ |s|·max‖a‖·max‖b‖`` (one read per call, CPU only; inf or NaN inputs: no)."""
    a, b = scores.a, scores.b
    if not _reads_values(a) or a.shape[0] == 0 or b.shape[0] == 0:
        return False
    norms = [torch.linalg.vector_norm(x, dim=1, dtype=acc).max() for x in (a, b)]
    return bool(2 * scores.scale.to(acc).abs() * norms[0] * norms[1] <= _SAFE_WINDOW[acc])


def tile_shape(n: int, m: int, acc: torch.dtype) -> tuple[int, int]:
    """Rows and columns of a tile; the two tile buffers of the backward fit in :data:`TILE_BYTES`.

    The forward uses the same shape although it needs one buffer: the backward
    then recomputes bit-identical logits, so ``exp(S_ij − LSE_i)`` of a
    saturated row is exactly the forward's softmax (the positive term's
    ``−1`` cancels it as in a full-matrix cross entropy).
    """
    elements = max(1, TILE_BYTES // (2 * acc.itemsize))
    side = max(1, math.isqrt(elements))
    rows = min(n, side)
    cols = min(m, max(side, elements // rows))
    return rows, cols


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """Reference value for a shift: ``-inf`` (nothing seen yet) becomes 0 so exp(-inf − 0) = 0;
    ``+inf`` and NaN stay (one op)."""
    return x.nan_to_num(nan=math.nan, posinf=math.inf, neginf=0.0)


def _merge_(m: torch.Tensor, l: torch.Tensor, m2: torch.Tensor, l2: torch.Tensor) -> None:
    """In-place streaming-LSE merge ``(m, l) ← (m, l) ⊕ (m2, l2)``."""
    peak = _finite_or_zero(torch.maximum(m, m2))
    l.mul_(torch.exp(m - peak)).add_(l2 * torch.exp(m2 - peak))
    torch.maximum(m, m2, out=m)


def _diagonal_offset(row0: int, col0: int) -> int:
    """Offset of the global diagonal ``i == j`` inside the tile at (row0, col0)."""
    return row0 - col0


def _tile(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous ``rows x cols`` view at the start of a preallocated buffer."""
    return buffer.as_strided((rows, cols), (cols, 1))


def _scores_(
    out: torch.Tensor, a_scaled: torch.Tensor, b_block: torch.Tensor, scores: Scores, rows: slice, cols: slice
) -> torch.Tensor:
    """The tile of ``S`` at ``(rows, cols)`` into ``out``, its excluded entries ``-inf`` (:class:`Scores`)."""
    torch.mm(a_scaled, b_block.t(), out=out)
    return _exclude_(out, scores, rows, cols, -math.inf)


def _exclude_(tile: torch.Tensor, scores: Scores, rows: slice, cols: slice, value: float) -> torch.Tensor:
    """``value`` written into the tile's excluded entries: the diagonal (``exclude_diagonal``) and
    the false negatives of the group mask.

    ``-inf`` into a tile of ``S``; 0 into a tile of ``G``, where an offset can
    be NaN (a row or column whose logits are ``-inf`` by value): an excluded
    entry is not in the loss and has no gradient, as in the full-matrix loss.
    """
    if scores.exclude_diagonal:
        offset = _diagonal_offset(rows.start, cols.start)
        if -tile.shape[0] < offset < tile.shape[1]:
            tile.diagonal(offset).fill_(value)
    if scores.masked:
        row_groups, col_groups, kept_cols = scores.group_mask()
        # same group and not the row's positive: a false negative (the positive keeps its logit).
        # A dense comparison, not a list of matches: its size does not depend on the values, so
        # nothing waits for the device
        column = torch.arange(cols.start, cols.stop, device=tile.device)
        same = row_groups[rows, None] == col_groups[None, cols]
        false_negative = same & (kept_cols[rows, None] != column)
        tile.masked_fill_(false_negative, value)
    return tile


def lse_stats(scores: Scores, targets: torch.Tensor, col_count: int) -> LseStats:
    """Row and column log-sum-exp of ``S = scale · a bᵀ`` without forming ``S``.

    Args:
        scores: ``a`` (``N x D``), ``b`` (``M x D``), the 0-d ``scale`` and
            ``exclude_diagonal`` (treat ``S_ii`` as ``-inf``).
        targets: ``N`` int64, row ``i``'s positive column ``y_i``.
        col_count: column statistics are returned for columns ``[0, col_count)``.

    Returns:
        ``row_lse`` (``N``), ``col_lse`` (``col_count``) and the positive logits
        ``S_{i,y_i}`` (``N``, read from the same tiles as the LSEs so that
        ``LSE − S_{i,y_i}`` cancels exactly for a saturated row), all in the
        accumulation dtype. A row or column with every entry excluded gets
        ``-inf``, never NaN.
    """
    if _mirrored(scores, col_count):
        return _mirrored_lse_stats(scores, targets)
    a, b, scale = scores.a, scores.b, scores.scale
    n, m = a.shape[0], b.shape[0]
    acc = accumulation_dtype(a.dtype)
    s = scale.to(acc)
    rows, cols = tile_shape(n, m, acc)
    if (rows, cols) == (n, m) and n and m:
        return _one_tile_lse_stats(scores, targets, col_count, acc)
    score_buffer = torch.empty(rows * cols, dtype=acc, device=a.device)
    exp_buffer = torch.empty(rows * cols, dtype=acc, device=a.device)
    narrow = col_count > 0 and _narrow_logits(scores, acc)
    row_max = torch.full((n,), -math.inf, dtype=acc, device=a.device)
    row_sum = torch.zeros(n, dtype=acc, device=a.device)
    col_max = torch.full((col_count,), -math.inf, dtype=acc, device=a.device)
    col_sum = torch.zeros(col_count, dtype=acc, device=a.device)
    positive = torch.empty(n, dtype=acc, device=a.device)

    for i0 in range(0, n, rows):
        i1 = min(n, i0 + rows)
        a_scaled = a[i0:i1].to(acc) * s
        run_max, run_sum = row_max[i0:i1], row_sum[i0:i1]
        block_targets = targets[i0:i1]
        for j0 in range(0, m, cols):
            j1 = min(m, j0 + cols)
            tile = _tile(score_buffer, i1 - i0, j1 - j0)
            _scores_(tile, a_scaled, b[j0:j1].to(acc), scores, slice(i0, i1), slice(j0, j1))
            _gather_positive_(positive[i0:i1], tile, block_targets - j0)
            exps, row_shift = _merge_rows_(run_max, run_sum, tile, exp_buffer)
            if j0 < col_count:
                width = min(col_count, j1) - j0
                peak, shifted = _column_sums(tile[:, :width], exps[:, :width], row_shift, narrow, exp_buffer)
                _merge_(col_max[j0 : j0 + width], col_sum[j0 : j0 + width], peak, shifted)
    (row_lse, row_low), (col_lse, col_low) = lse_parts(row_max, row_sum), lse_parts(col_max, col_sum)
    return LseStats(row_lse, col_lse, positive, row_low, col_low)


def _one_tile_lse_stats(scores: Scores, targets: torch.Tensor, col_count: int, acc: torch.dtype) -> LseStats:
    """:func:`lse_stats` when ``S`` is one tile: the fewest ops (a small batch's cost is per op).

    ``S`` is formed as the tile loop forms it (:func:`one_tile_scores`), so
    the backward's recomputed tile is bit-identical; each LSE shifts by its
    maximum as the streaming merge does (a row of excluded entries is
    ``-inf``, a ``+inf`` logit makes its row and column NaN), with
    :func:`_exp_` (not ``torch.logsumexp``, whose ``exp`` is slow on the far
    tails of unnormalized logits).
    """
    tile, _ = one_tile_scores(scores, acc)
    # clamped: under torch.compile the labels' range check is a device assertion that may run later
    positive = tile.gather(1, targets.clamp(0, tile.shape[1] - 1)[:, None]).squeeze(1)
    spare = torch.empty_like(tile)
    columns = tile if col_count == tile.shape[1] else tile[:, :col_count]
    (row_lse, row_low), (col_lse, col_low) = (
        lse_parts(*_shifted_sums(tile, 1, spare)),
        lse_parts(*_shifted_sums(columns, 0, spare)),
    )
    return LseStats(row_lse, col_lse, positive, row_low, col_low)


def one_tile(n: int, m: int, dtype: torch.dtype) -> bool:
    """Whether all of an ``N x M`` score matrix of inputs of ``dtype`` is one tile (:func:`tile_shape`)."""
    return _fits_one_tile(n, m, dtype, TILE_BYTES)


@functools.lru_cache(maxsize=1024)
def _fits_one_tile(n: int, m: int, dtype: torch.dtype, budget: int) -> bool:
    # keyed by the budget too: TILE_BYTES may be changed at run time (the tests do)
    return tile_shape(n, m, accumulation_dtype(dtype)) == (n, m)


def one_tile_exclude_(tile: torch.Tensor, scores: Scores, value: float) -> torch.Tensor:
    """``value`` into the excluded entries of a whole-``S`` tile (see :func:`_exclude_`)."""
    return _exclude_(tile, scores, slice(0, tile.shape[0]), slice(0, tile.shape[1]), value)


def one_tile_scores(scores: Scores, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """All of ``S`` as one tile (excluded entries ``-inf``) and ``s·a`` in the accumulation dtype."""
    a, b, scale = scores.a, scores.b, scores.scale
    # (a .to() of the dtype it has is still a call: skipped on the small batch's path)
    a_scaled = (a if a.dtype == acc else a.to(acc)) * (scale if scale.dtype == acc else scale.to(acc))
    tile = torch.mm(a_scaled, (b if b.dtype == acc else b.to(acc)).t())
    if scores.exclude_diagonal or scores.row_groups is not None:
        _exclude_(tile, scores, slice(0, a.shape[0]), slice(0, b.shape[0]), -math.inf)
    return tile, a_scaled


def _shifted_sums(x: torch.Tensor, dim: int, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, Σ exp(x − m))`` along ``dim``, ``m`` the maximum (``-inf``: shifted by 0), the exps
    into ``buffer``: the streaming LSE's pair for a whole tile, exact for any spread."""
    peak = x.amax(dim=dim, keepdim=True)
    exps = _exp_(torch.sub(x, _finite_or_zero(peak), out=_tile(buffer, *x.shape)))
    return peak.squeeze(dim), exps.sum(dim=dim)


def _mirrored(scores: Scores, col_count: int) -> bool:
    """Whether ``S`` is symmetric and the call can visit each pair of mirrored tiles once.

    ``a`` and ``b`` are one tensor and nothing breaks the symmetry: no column
    statistics or terms (their own offsets) and no group mask (row ``i``'s kept
    column is not column ``i``'s).
    """
    return scores.shared_operands and col_count == 0 and not scores.masked


def _symmetric_(tile: torch.Tensor, spare: torch.Tensor) -> torch.Tensor:
    """A diagonal tile made exactly symmetric, ``(S + Sᵀ)/2``: its row ``j`` and column ``j`` must be
    the same numbers, and ``s·a_i·a_j`` and ``s·a_j·a_i`` can differ in the last bit."""
    mirror = _tile(spare, tile.shape[0], tile.shape[1]).copy_(tile.t())
    return tile.add_(mirror).mul_(0.5)


def _mirrored_scores(scores: Scores) -> Iterator[tuple[torch.Tensor, torch.Tensor, slice, slice]]:
    """Every tile of a symmetric ``S`` on or above the diagonal, ``(tile, spare, rows, cols)``.

    The one place both mirrored passes form their tiles, so the backward's
    ``S`` is bit-identical to the forward's; a diagonal tile is made exactly
    symmetric (:func:`_symmetric_`). ``spare`` is a second (flat) tile
    buffer, free for the caller.
    """
    a = scores.a
    n = a.shape[0]
    acc = accumulation_dtype(a.dtype)
    s = scores.scale.to(acc)
    side, _ = tile_shape(n, n, acc)
    buffer = torch.empty(side * side, dtype=acc, device=a.device)
    second = torch.empty(side * side, dtype=acc, device=a.device)
    for i0 in range(0, n, side):
        rows = slice(i0, min(n, i0 + side))
        a_scaled = a[rows].to(acc) * s
        for j0 in range(i0, n, side):
            cols = slice(j0, min(n, j0 + side))
            tile = _tile(buffer, rows.stop - rows.start, cols.stop - cols.start)
            _scores_(tile, a_scaled, a[cols].to(acc), scores, rows, cols)
            if j0 == i0:
                _symmetric_(tile, second)
            yield tile, second, rows, cols


def _mirrored_lse_stats(scores: Scores, targets: torch.Tensor) -> LseStats:
    """:func:`lse_stats` of a symmetric ``S`` from the tiles on and above the diagonal: half the work.

    Tile ``(I, J)`` gives rows ``I`` their statistics over columns ``J`` and,
    read by columns (:func:`_column_sums`), rows ``J`` theirs over columns
    ``I``. The backward (:func:`_mirrored_offset_backward`) recomputes the
    same tiles (:func:`_mirrored_scores`).
    """
    a = scores.a
    n = a.shape[0]
    acc = accumulation_dtype(a.dtype)
    row_max = torch.full((n,), -math.inf, dtype=acc, device=a.device)
    row_sum = torch.zeros(n, dtype=acc, device=a.device)
    positive = torch.zeros(n, dtype=acc, device=a.device)
    narrow = _narrow_logits(scores, acc)
    for tile, spare, rows, cols in _mirrored_scores(scores):
        _gather_positive_(positive[rows], tile, targets[rows] - cols.start)
        exps, row_shift = _merge_rows_(row_max[rows], row_sum[rows], tile, spare)
        if cols != rows:
            _gather_positive_(positive[cols], tile.t(), targets[cols] - rows.start)
            peak, shifted = _column_sums(tile, exps, row_shift, narrow, spare)
            _merge_(row_max[cols], row_sum[cols], peak, shifted)
    row_lse, row_low = lse_parts(row_max, row_sum)
    return LseStats(row_lse, row_max.new_empty(0), positive, row_low, row_max.new_empty(0))


def _merge_rows_(
    run_max: torch.Tensor, run_sum: torch.Tensor, tile: torch.Tensor, exp_buffer: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a tile's rows into the running ``(max, sum)`` in place; returns the tile's
    ``exp(S − shift)`` (in ``exp_buffer``) and the rows' shifts, for the column statistics."""
    new_max = torch.maximum(run_max, tile.amax(dim=1))
    row_shift = _finite_or_zero(new_max)
    exps = _exp_(torch.sub(tile, row_shift[:, None], out=_tile(exp_buffer, tile.shape[0], tile.shape[1])))
    run_sum.mul_(torch.exp(run_max - row_shift)).add_(exps.sum(dim=1))
    run_max.copy_(new_max)
    return exps, row_shift


def _column_sums(
    scores: torch.Tensor, exps: torch.Tensor, row_shift: torch.Tensor, narrow: bool, buffer: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One tile's column statistics ``(shift, sum)``, merged by the caller with the streaming rule.

    ``narrow`` (:func:`_narrow_logits`): ``exps`` holds
    ``exp(scores_ij − row_shift_i)``, none underflowed, and re-weighting its rows
    by ``exp(row_shift_i − K)`` gives every column the common shift ``K`` with
    one matrix-vector product. Otherwise each column is shifted by its own
    maximum over the tile, ``exp`` taken again into ``buffer`` (``exps`` is
    then overwritten): exact for any spread of logits, and an infinite logit
    makes only its own column non-finite.
    """
    if narrow:
        peak = row_shift.max()
        return peak.expand(exps.shape[1]), exps.t().mv(torch.exp(row_shift - peak))
    return _shifted_sums(scores, 0, buffer)


def _gather_positive_(out: torch.Tensor, tile: torch.Tensor, local_targets: torch.Tensor) -> None:
    """``out[r] = tile[r, local_targets[r]]`` for the rows whose target lies in this tile."""
    inside = (local_targets >= 0) & (local_targets < tile.shape[1])
    picked = tile.gather(1, local_targets.clamp(0, tile.shape[1] - 1)[:, None]).squeeze(1)
    torch.where(inside, picked, out, out=out)


def offset_backward(scores: Scores, terms: OffsetTerms, with_grads: bool = True) -> Gradients:
    """The offset-form backward shared by every softmax loss.

    With ``S = scale · a bᵀ`` recomputed tile by tile and::

        G_ij = g_i·exp(S_ij − c_i) + h_j·exp(S_ij − r_j)      (h_j = 0 for j ≥ len(h))

    returns ``(scale·G·b, scale·Gᵀ·a, Σ_ij G_ij (a_i·b_j))`` — the gradients
    with respect to ``a``, ``b`` and ``scale`` of the exponential part of
    ``dL/dS``. Shapes: ``c, g``: ``N``; ``r, h``: ``col_count ≤ M``.
    Outputs are in the accumulation dtype.
    """
    a = scores.a
    row_offset, row_mult, col_offset, col_mult = terms[:4]
    col_count = col_offset.shape[0]
    acc = accumulation_dtype(a.dtype)
    # a row or column with no term (a zero multiplier, or every entry excluded: offset -inf)
    # contributes nothing: multiplier 0 and offset a finite 0 (rows) or +inf (columns, whose exp is
    # then exactly 0: a finite placeholder could overflow and meet h = 0 as 0·inf). Other offsets
    # stay as they are, NaN included: NaN inputs must reach the gradients.
    dead_rows = torch.isneginf(row_offset)
    # a zero-weight row keeps its (finite) offset: exp(S − 0) would overflow at large logits and
    # meet the zero weight as inf·0; only -inf (and NaN there) become 0
    placeholder = dead_rows | ((row_mult == 0) & torch.isnan(row_offset))
    c = row_offset.masked_fill(placeholder, 0.0).to(acc)
    g = row_mult.masked_fill(dead_rows, 0.0).to(acc)
    dead_cols = torch.isneginf(col_offset) | (col_mult == 0)
    h = col_mult.masked_fill(dead_cols, 0.0).to(acc)
    r = col_offset.masked_fill(dead_cols, math.inf).to(acc)
    positive_cols, positive_mult = terms.positive_cols, terms.positive_mult
    positives = None
    if positive_cols is not None and positive_mult is not None:
        positives = (positive_cols, positive_mult.to(acc))
    if _mirrored(scores, col_count):
        return _mirrored_offset_backward(scores, c, g, positives)
    if tile_shape(a.shape[0], scores.b.shape[0], acc) == (a.shape[0], scores.b.shape[0]):
        return _one_tile_offset_backward(scores, c, g, r, h, positives, acc)
    tile_rows, tile_cols = tile_shape(a.shape[0], scores.b.shape[0], acc)
    single_exp = _single_exp_tiles(c, torch.ones_like(dead_rows), tile_rows, r, ~dead_cols, tile_cols, acc)

    def to_gradient(tile: torch.Tensor, spare: torch.Tensor, rows: slice, cols: slice) -> None:
        c1 = min(col_count, cols.stop)
        if c1 > cols.start:
            one_exp = single_exp is not None and single_exp[rows.start // tile_rows][cols.start // tile_cols]
            _column_term_(tile, spare, c[rows], g[rows], r[cols.start : c1], h[cols.start : c1], one_exp)
        else:
            _exp_(tile.sub_(c[rows, None])).mul_(g[rows, None])
        if positives is not None:
            _subtract_positives_(tile, rows, cols, *positives)

    return _gradient_sweep(scores, to_gradient)


def _one_tile_offset_backward(
    scores: Scores,
    c: torch.Tensor,
    g: torch.Tensor,
    r: torch.Tensor,
    h: torch.Tensor,
    positives: Optional[tuple[torch.Tensor, torch.Tensor]],
    acc: torch.dtype,
) -> Gradients:
    """:func:`offset_backward` when ``S`` is one tile: the exact two-exp form in the fewest ops.

    ``S`` is the forward's tile (:func:`one_tile_scores`), ``G`` is formed in
    the accumulation dtype with the positives subtracted there, then the three
    products of :func:`_gradient_sweep`.
    """
    tile, a_scaled = one_tile_scores(scores, acc)
    n, m = tile.shape
    width = r.shape[0]
    grad = _exp_(torch.sub(tile, c[:, None])).mul_(g[:, None])
    if width:
        column = tile if width == m else tile[:, :width]
        grad_cols = grad if width == m else grad[:, :width]
        grad_cols.add_(_exp_(column.sub_(r)).mul_(h))
    if positives is not None:
        positive_cols, positive_mult = positives
        # -1 (or a column of another block): no positive in this tile
        outside = (positive_cols < 0) | (positive_cols >= m)
        minus = torch.neg(positive_mult).masked_fill_(outside, 0.0)
        grad.scatter_add_(1, positive_cols.clamp(0, m - 1)[:, None], minus[:, None])
    _exclude_(grad, scores, slice(0, n), slice(0, m), 0.0)
    return one_tile_products(grad, scores, acc, a_scaled=a_scaled)


def one_tile_products(
    grad: torch.Tensor,
    scores: Scores,
    acc: torch.dtype,
    row_scale: Optional[torch.Tensor] = None,
    with_grad_b: bool = True,
    a_scaled: Optional[torch.Tensor] = None,
) -> Gradients:
    """The three products of :func:`_gradient_sweep` for a whole-``S`` tile ``G`` (``W`` the diagonal
    of ``row_scale``, applied to the ``N x D`` operands, never to the tile): ``s·W·G·b``,
    ``s·(W·G)ᵀ·a`` (empty without ``with_grad_b``) and ``Σ (W·G)_ij a_i·b_j``; ``a_scaled``: ``s·a``
    when the caller has it. (A cast to the dtype a tensor has is still a call: skipped.)"""
    a, b, scale = scores.a, scores.b, scores.scale
    a_acc = a if a.dtype == acc else a.to(acc)
    s = scale if scale.dtype == acc else scale.to(acc)
    grad_a = torch.mm(grad, b if b.dtype == acc else b.to(acc))
    if row_scale is not None:
        grad_a.mul_(row_scale[:, None])
    grad_scale = torch.sum(grad_a * a_acc)
    if not with_grad_b:
        return Gradients(grad_a.mul_(s), grad_a.new_empty(0), grad_scale)
    a_weighted = a_acc * s if a_scaled is None else a_scaled
    grad_b = torch.mm(grad.t(), a_weighted if row_scale is None else a_weighted * row_scale[:, None])
    return Gradients(grad_a.mul_(s), grad_b, grad_scale)


def _subtract_positives_(
    tile: torch.Tensor, rows: slice, cols: slice, positive_cols: torch.Tensor, positive_mult: torch.Tensor
) -> None:
    """``G_{i, t_i} −= p_i`` for the rows whose positive column lies in this tile (see
    :class:`~tilecl.backends.base.OffsetTerms`): one scatter, no value read to the host."""
    width = tile.shape[1]
    local = positive_cols[rows] - cols.start
    inside = (local >= 0) & (local < width)
    minus = torch.where(inside, -positive_mult[rows], 0.0).to(tile.dtype)
    tile.scatter_add_(1, local.clamp(0, width - 1)[:, None], minus[:, None])


def _single_exp_tiles(
    c: torch.Tensor, c_live: torch.Tensor, rows: int, r: torch.Tensor, r_live: torch.Tensor, cols: int,
    acc: torch.dtype,
) -> Optional[list[list[bool]]]:  # fmt: skip
    """Per (row block, column block) of the sweep: whether its live offsets ``c`` and ``r`` lie within
    the single-exp window (:func:`_column_term_`). One read per call, on the CPU only
    (:func:`_reads_values`); ``None`` elsewhere: every tile then takes the exact two-exp path."""
    if not _reads_values(c):
        return None
    row_hi, row_lo = _block_extrema(c, c_live, rows)
    col_hi, col_lo = _block_extrema(r, r_live, cols)
    spread = torch.maximum(row_hi[:, None], col_hi[None, :]) - torch.minimum(row_lo[:, None], col_lo[None, :])
    fits: list[list[bool]] = (spread <= _SAFE_WINDOW[acc]).tolist()  # NaN: False
    return fits


def _block_extrema(x: torch.Tensor, live: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and min of the live entries of each ``size``-block of ``x`` (-inf and +inf for none)."""
    blocks = max(1, -(-x.shape[0] // size))
    hi = torch.full((blocks * size,), -math.inf, dtype=x.dtype, device=x.device)
    lo = torch.full((blocks * size,), math.inf, dtype=x.dtype, device=x.device)
    hi[: x.shape[0]] = torch.where(live, x, -math.inf)
    lo[: x.shape[0]] = torch.where(live, x, math.inf)
    return hi.view(blocks, size).amax(dim=1), lo.view(blocks, size).amin(dim=1)


def _mirrored_offset_backward(
    scores: Scores, c: torch.Tensor, g: torch.Tensor, positives: Optional[tuple[torch.Tensor, torch.Tensor]]
) -> Gradients:
    """:func:`offset_backward` of a symmetric ``S`` with row terms only, from the tiles on and above
    the diagonal: the whole gradient of the shared tensor in ``grad_a``, ``grad_b`` zero.

    With ``G_ij = g_i·exp(S_ij − c_i)`` the shared tensor's gradient is
    ``s·(G + Gᵀ)·a``. Tile ``(I, J)`` of ``H = G + Gᵀ`` is
    ``g_i·exp(S_ij − c_i) + g_j·exp(S_ij − c_j)`` — the offset form with column
    terms ``(c_J, g_J)`` on the tile of ``S`` itself — and gives rows ``I``
    ``H·a_J`` and rows ``J`` ``Hᵀ·a_I``: one recompute and two products per
    pair of mirrored tiles, where the general sweep has two and four. A
    diagonal tile's ``H`` already holds both halves (one product).
    ``Σ G_ij a_i·a_j`` is half of ``Σ_i a_i·(H·a)_i``. A positive ``(i, t_i)``
    of ``G`` sits at ``H_{i t_i}`` and at ``H_{t_i i}``: tile ``(I, J)`` takes
    those of rows ``I`` with ``t_i ∈ J`` and, transposed, those of rows ``J``
    with ``t_j ∈ I`` (on a diagonal tile both, which are distinct entries).
    """
    a = scores.a
    acc = accumulation_dtype(a.dtype)
    grad = torch.zeros(a.shape[0], a.shape[1], dtype=acc, device=a.device)
    # a row without a term contributes no column term either: offset +inf, whose exp is exactly 0
    # (its placeholder offset 0 could overflow exp(K − 0) and meet g = 0 as 0·inf)
    r = torch.where(g != 0, c, math.inf)
    side, _ = tile_shape(a.shape[0], a.shape[0], acc)
    single_exp = _single_exp_tiles(c, torch.ones_like(g, dtype=torch.bool), side, r, g != 0, side, acc)
    for tile, spare, rows, cols in _mirrored_scores(scores):
        one_exp = single_exp is not None and single_exp[rows.start // side][cols.start // side]
        _column_term_(tile, spare, c[rows], g[rows], r[cols], g[cols], one_exp)
        if positives is not None:
            _subtract_positives_(tile, rows, cols, *positives)
            _subtract_positives_(tile.t(), cols, rows, *positives)
        _exclude_(tile, scores, rows, cols, 0.0)
        grad[rows].addmm_(tile, a[cols].to(acc))
        if cols != rows:
            grad[cols].addmm_(tile.t(), a[rows].to(acc))
    grad_scale = torch.sum(grad * a.to(acc)) / 2
    return Gradients(grad.mul_(scores.scale.to(acc)), torch.zeros_like(grad), grad_scale)


def sigmoid_sweep(scores: Scores, terms: SigmoidTerms, with_grads: bool) -> SigmoidSweep:
    """The sigmoid (SigLIP) losses of every row and, ``with_grads``, their gradients, in one sweep.

    With ``ℓ = scale · a bᵀ + β`` recomputed tile by tile and ``z_ij = +1``
    where ``row_keys[i] == col_keys[j]`` (else ``−1``)::

        row_loss_i = Σ_j w_i·softplus(−z_ij ℓ_ij),    G_ij = w_i·(σ(ℓ_ij) − [z_ij = +1])

    and the gradients as :func:`offset_backward`'s, plus ``grad_bias = Σ G_ij``.
    Per tile: ``u = −z·ℓ``, the loss ``softplus(u)`` and ``G = −z·σ(u)`` — no
    confident pair's tiny loss or gradient comes from a cancellation. The
    positives are a dense comparison of the tile's keys (a mask whose size
    does not depend on the values, so nothing waits for the device) and are
    flipped in place; the weights ``w`` scale the ``N x D`` operands, not the tile.
    """
    a = scores.a
    acc = accumulation_dtype(a.dtype)
    bias = terms.bias.to(acc)
    weights = terms.row_weights.to(acc)
    threshold = softplus_threshold(acc)
    if one_tile(a.shape[0], scores.b.shape[0], a.dtype):
        return _one_tile_sigmoid_sweep(scores, terms, with_grads, bias, weights, threshold)
    row_loss = torch.zeros(a.shape[0], dtype=acc, device=a.device)
    row_grad_sums = torch.zeros(a.shape[0], dtype=acc, device=a.device)

    def to_gradient(tile: torch.Tensor, spare: torch.Tensor, rows: slice, cols: slice) -> None:
        # the positives as a dense mask (its size does not depend on the values: no device sync)
        positive = terms.row_keys[rows, None] == terms.col_keys[None, cols]
        second = _tile(spare, tile.shape[0], tile.shape[1])
        tile.add_(bias)
        torch.where(positive, torch.neg(tile, out=second), tile, out=tile)  # u = −z·ℓ
        losses = softplus_into(tile, second, threshold)
        row_loss[rows] += losses.sum(dim=1)
        if with_grads:
            tile.sigmoid_()
            torch.where(positive, torch.neg(tile, out=second), tile, out=tile)  # G = −z·σ(u)
            row_grad_sums[rows] += tile.sum(dim=1)

    if not with_grads:
        _gradient_sweep(scores, to_gradient, with_grads=False)
        return SigmoidSweep(row_loss * weights, *(row_loss.new_empty(0) for _ in range(4)))
    grad_a, grad_b, grad_scale = _gradient_sweep(scores, to_gradient, row_scale=weights)
    return SigmoidSweep(row_loss * weights, grad_a, grad_b, grad_scale, torch.dot(row_grad_sums, weights))


def _one_tile_sigmoid_sweep(
    scores: Scores,
    terms: SigmoidTerms,
    with_grads: bool,
    bias: torch.Tensor,
    weights: torch.Tensor,
    threshold: float,
) -> SigmoidSweep:
    """:func:`sigmoid_sweep` when ``ℓ`` is one tile: the same steps in the fewest ops (the weights
    still scale the ``N x D`` operands, as :func:`_gradient_sweep` does)."""
    acc = weights.dtype
    tile, a_scaled = one_tile_scores(scores, acc)
    # −z as a tile of ±1: each flip is then one exact multiplication, where a where() and a neg()
    # were two passes
    flip = torch.where(terms.row_keys[:, None] == terms.col_keys[None, :], -1.0, 1.0).to(acc)
    tile.add_(bias).mul_(flip)  # u = −z·ℓ
    row_loss = softplus_into(tile, torch.empty_like(tile), threshold).sum(dim=1).mul_(weights)
    if not with_grads:
        return SigmoidSweep(row_loss, *(row_loss.new_empty(0) for _ in range(4)))
    grad = tile.sigmoid_().mul_(flip)  # G = −z·σ(u)
    grad_a, grad_b, grad_scale = one_tile_products(grad, scores, acc, weights, a_scaled=a_scaled)
    return SigmoidSweep(row_loss, grad_a, grad_b, grad_scale, torch.dot(grad.sum(dim=1), weights))


def _gradient_sweep(
    scores: Scores,
    to_gradient: Callable[[torch.Tensor, torch.Tensor, slice, slice], None],
    with_grads: bool = True,
    row_scale: Optional[torch.Tensor] = None,
) -> Gradients:
    """The tile loop of every backward: ``S`` recomputed, turned into ``G`` in place, then two products.

    ``to_gradient(tile, spare, rows, cols)`` turns the tile of ``S`` at
    ``(rows, cols)`` into ``G`` (``spare``: a second tile buffer). Returns
    ``(scale·W·G·b, scale·(W·G)ᵀ·a, Σ (W·G)_ij a_i·b_j)`` with ``W`` the
    diagonal of ``row_scale`` (identity when ``None``; applied to the ``N x D``
    operands, never to a tile); ``with_grads=False`` only visits the tiles
    (empty results).
    """
    a, b, scale = scores.a, scores.b, scores.scale
    n, m = a.shape[0], b.shape[0]
    acc = accumulation_dtype(a.dtype)
    s = scale.to(acc)
    rows, cols = tile_shape(n, m, acc)
    buffer = torch.empty(rows * cols, dtype=acc, device=a.device)
    second = torch.empty(rows * cols, dtype=acc, device=a.device)
    if with_grads:
        grad_a = torch.empty(n, a.shape[1], dtype=acc, device=a.device)
        grad_b = torch.zeros(m, b.shape[1], dtype=acc, device=a.device)
    else:
        grad_a = grad_b = torch.empty(0, dtype=acc, device=a.device)
    grad_scale = torch.zeros((), dtype=acc, device=a.device)

    for i0 in range(0, n, rows):
        i1 = min(n, i0 + rows)
        a_block = a[i0:i1].to(acc)
        a_scaled = a_block * s
        a_weighted = a_scaled if row_scale is None else a_scaled * row_scale[i0:i1, None]
        ga_block = grad_a[i0:i1].zero_() if with_grads else grad_a
        for j0 in range(0, m, cols):
            j1 = min(m, j0 + cols)
            b_block = b[j0:j1].to(acc)
            tile = _tile(buffer, i1 - i0, j1 - j0)
            _scores_(tile, a_scaled, b_block, scores, slice(i0, i1), slice(j0, j1))
            to_gradient(tile, second, slice(i0, i1), slice(j0, j1))
            _exclude_(tile, scores, slice(i0, i1), slice(j0, j1), 0.0)
            if with_grads:
                ga_block.addmm_(tile, b_block)
                grad_b[j0:j1].addmm_(tile.t(), a_weighted)
        if with_grads:
            if row_scale is not None:
                ga_block.mul_(row_scale[i0:i1, None])
            grad_scale += torch.sum(ga_block * a_block)
            ga_block.mul_(s)
    return Gradients(grad_a, grad_b, grad_scale)


def _column_term_(
    tile: torch.Tensor,
    spare: torch.Tensor,
    c: torch.Tensor,
    g: torch.Tensor,
    r: torch.Tensor,
    h: torch.Tensor,
    single_exp: bool,
) -> None:
    """Turn a tile of ``S`` into ``G`` in place when some columns carry a term.

    ``single_exp`` (every offset of the tile within the window of the others,
    :func:`_single_exp_tiles`): ``G_ij = exp(S_ij − c_i)·(g_i + u_i·v_j)`` with
    ``u_i = exp(c_i − K)`` and ``v_j = h_j·exp(K − r_j)`` needs one exp over the
    tile, and the factor is a rank-2 product ``[g u]·[1 v]ᵀ`` written by one
    thin matmul. Otherwise the two exponentials are taken separately: exact
    for any spread of offsets.
    """
    rows, cols = tile.shape
    width = r.shape[0]
    if single_exp:
        reference = c.max()
        left = torch.stack([g, torch.exp(c - reference)], dim=1)
        right = torch.zeros(2, cols, dtype=tile.dtype, device=tile.device)
        right[0] = 1.0
        right[1, :width] = h * torch.exp(reference - r)
        factor = torch.mm(left, right, out=_tile(spare, rows, cols))
        _exp_(tile.sub_(c[:, None])).mul_(factor)
        return
    column_part = _tile(spare, rows, width)
    _exp_(torch.sub(tile[:, :width], r[None, :], out=column_part)).mul_(h[None, :])
    _exp_(tile.sub_(c[:, None])).mul_(g[:, None])
    tile[:, :width].add_(column_part)


#: the gradient sweep (:class:`~tilecl.backends.base.Primitives`): one implementation per form
sweep = sweep_of({"softmax": offset_backward, "sigmoid": sigmoid_sweep})


def _this_module() -> WholeTile:
    """This module, which implements :class:`~tilecl.backends.base.WholeTile` too."""
    module: WholeTile = sys.modules[__name__]
    return module


#: any device, any float dtype; what ``auto`` falls back to
BACKEND = register_backend(
    Backend(
        "torch",
        FLOAT_DTYPES,
        {"cpu": anywhere, "cuda": cuda_visible, "meta": anywhere},
        lambda: None,
        module_loader(__name__),
        auto_devices=("cpu", "cuda", "meta"),
        preference=90,
        whole_tile=_this_module,
    )
)
