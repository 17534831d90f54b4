"""The autograd Function every softmax loss runs: per-pair losses over a backend's primitives.

Forward: the backend's streaming LSE gives the row and column statistics and
the positive logits. Backward: every loss's ``dL/dS`` is

    G_ij = α_i·exp(S_ij − c_i) + h_j·exp(S_ij − r_j) − Σ_{pairs} w_i·[j = y_i]

with row offsets ``c`` (InfoNCE: the row LSE; gamma: ``log M − log u_i``) and
column offsets ``r``: the backend's offset backward forms all of it, the
positive's one-hot in the tile; decoupled positives (not columns of ``b``)
are applied here. Only the inputs and ``O(N + M)`` statistics are saved
between the passes. A small batch (``S`` one tile of a backend that declares
a :class:`~tilecl.backends.base.WholeTile`, eager, local) runs the same loss
as :class:`OneTileFunction`, which keeps that one tile between the passes.

Layers: the losses (:mod:`tilecl.contrastive`, :mod:`tilecl.supervised`,
:mod:`tilecl.gamma`) → :mod:`tilecl.driver` (checks, backend, agreement,
sharded primitives) → this Function → a backend's primitives
(:mod:`tilecl.backends`); the loss then takes the global value from the
driver's run. The Function sees primitives and a :class:`LossSpec`, never a
process group.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional

import torch

from ._compat import delayed_error
from .backends import LseStats, OffsetTerms, Primitives, Scores
from .backends.base import WholeTile, accumulation_dtype
from .validation import reads_values

__all__ = [
    "ContrastiveFunction",
    "LossSpec",
    "OneTileFunction",
    "apply_loss",
    "batch_stats",
    "col_count",
    "distinct",
    "first_derivative",
    "log_count",
    "reduce_pairs",
    "refuse_second_derivative",
    "scores_of",
    "targets_of",
    "weight_total",
    "whole_tile_of",
]

DOUBLE_BACKWARD_MESSAGE = (
    "tilecl losses are differentiable once: double backward (differentiating a gradient "
    "of a tilecl loss, e.g. a gradient penalty) is not supported; use tilecl.testing.naive for that"
)


def refuse_second_derivative(grads: tuple, inputs: Sequence[Optional[torch.Tensor]] = ()) -> tuple:
    """Under ``create_graph=True``, make differentiating these gradients raise a clear error.

    Like ``once_differentiable``, but the outputs always carry the error node
    (its own version skips it when the upstream gradient does not require grad,
    which ends in an unrelated "does not require grad" message). The node also
    takes the Function's ``inputs`` and upstream gradients: ``torch.autograd.grad(g, x)``
    for any ``x`` they depend on then reaches it and raises this error, where a
    node cut off from them gets autograd's "appears to not have been used in the graph".
    """
    if not torch.is_grad_enabled():
        return grads
    live = [i for i, g in enumerate(grads) if g is not None]
    connected = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    detached = [grads[i].detach().requires_grad_() for i in live]
    guarded = delayed_error(DOUBLE_BACKWARD_MESSAGE, detached + connected)[: len(live)]
    out = list(grads)
    for i, g in zip(live, guarded):
        out[i] = g
    return tuple(out)


def first_derivative(compute: Any, ctx: Any, grad_output: torch.Tensor) -> tuple:
    """A Function's backward: ``compute(ctx, grad_output)`` without a graph, its gradients guarded
    against a second derivative (:func:`refuse_second_derivative`)."""
    if not torch.is_grad_enabled():
        # the usual backward (no create_graph): nothing records a graph, nothing to refuse
        return compute(ctx, grad_output)
    with torch.no_grad():
        grads = compute(ctx, grad_output)
    return refuse_second_derivative(grads, (*ctx.saved_tensors, grad_output))


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """The fixed options of one call of the shared autograd Function."""

    symmetric: bool
    reduction: str
    exclude_diagonal: bool
    primitives: Primitives
    #: rows and columns of the global batch (0: this call's own, no process group); the
    #: primitives are then sharded
    global_rows: int = 0
    global_cols: int = 0
    #: ``a`` and ``b`` are one tensor: ``S`` is symmetric (:class:`~tilecl.backends.base.Scores`)
    shared_operands: bool = False


def distinct(*tensors: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
    """The tensors, a repeated one replaced by a view of it (same values, a new tensor object).

    torch.compile does not trace an autograd Function given one tensor twice
    (``loss(a, a)``, one group-id tensor for rows and columns); autograd adds a
    view's gradient to its base, so nothing else changes.
    """
    seen: list[torch.Tensor] = []
    out = []
    for x in tensors:
        if x is not None and any(x is y for y in seen):
            x = x.view_as(x)
        if x is not None:
            seen.append(x)
        out.append(x)
    return tuple(out)


def log_count(count: int, like: torch.Tensor) -> torch.Tensor:
    """``log(count)`` as a 0-d tensor of ``like``'s dtype and device.

    Under ``torch.compile`` a batch size is symbolic; ``math.log`` of it would
    specialize the graph to that size (one recompile per batch size).
    """
    return torch.full((), count, dtype=like.dtype, device=like.device).log()


def targets_of(labels: Optional[torch.Tensor], n: int, device: torch.device) -> torch.Tensor:
    """Row ``i``'s positive column: ``labels`` as int64, or ``i``."""
    return torch.arange(n, device=device) if labels is None else labels.long()


def col_count(labels: Optional[torch.Tensor], n: int, m: int, symmetric: bool) -> int:
    """Columns with statistics: the pair columns (all of ``b`` with labels) when symmetric, else none."""
    return (n if labels is None else m) if symmetric else 0


def scores_of(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    targets: torch.Tensor,
    groups: Optional[tuple[torch.Tensor, torch.Tensor]],
    spec: LossSpec,
) -> Scores:
    """The :class:`Scores` of a call: with ``groups`` (row, column ids), same-group entries other
    than row ``i``'s positive ``targets[i]`` are excluded (false-negative masking)."""
    if groups is None:
        return Scores(a, b, scale, spec.exclude_diagonal, shared_operands=spec.shared_operands)
    row_groups, col_groups = groups[0].long(), groups[1].long()
    return Scores(a, b, scale, spec.exclude_diagonal, row_groups, col_groups, targets, spec.shared_operands)


def batch_stats(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    labels: Optional[torch.Tensor],
    positives: Optional[torch.Tensor],
    spec: LossSpec,
    groups: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> LseStats:
    """One streaming pass over the tiles (no autograd). Decoupled positives are a row-wise dot."""
    with torch.no_grad():
        targets = targets_of(labels, a.shape[0], a.device)
        return _stats(a, b, scale, targets, labels is None, positives, spec, groups)


def _stats(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    targets: torch.Tensor,
    own_columns: bool,
    positives: Optional[torch.Tensor],
    spec: LossSpec,
    groups: Optional[tuple[torch.Tensor, torch.Tensor]],
) -> LseStats:
    """:func:`batch_stats` for the rows' ``targets`` (``own_columns``: row ``i``'s is column ``i``)."""
    count = (a.shape[0] if own_columns else b.shape[0]) if spec.symmetric else 0
    scores = scores_of(a, b, scale, targets, groups, spec)
    stats = spec.primitives.lse_stats(scores, targets, count)
    if positives is not None:
        acc = stats.row_lse.dtype
        return stats._replace(positive=scale.to(acc) * torch.sum(a.to(acc) * positives.to(acc), dim=1))
    return stats


def weight_total(weights: torch.Tensor) -> torch.Tensor:
    """The normalizer of a weighted mean, ``Σ w``; an all-zero batch gives 0, not 0/0."""
    return weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)


def reduce_pairs(per_pair: torch.Tensor, reduction: str, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """``mean``, ``sum`` or ``none`` of the per-pair losses; with ``weights`` the pairs are weighted
    and ``mean`` is ``Σ w_i ℓ_i / Σ w_i``.

    A pair of weight 0 is left out: it adds exactly 0, even where its term is
    not finite (SupCon's anchor without a positive in a batch of one has an
    empty row, ``LSE = −inf``; ``0·(−inf)`` would make the loss NaN).
    """
    if weights is not None:
        weights = weights.to(per_pair.dtype)
        per_pair = torch.where(weights == 0, 0.0, per_pair * weights)
        if reduction == "mean":
            return per_pair.sum() / weight_total(weights)
    if reduction == "mean":
        return per_pair.mean()
    if reduction == "sum":
        return per_pair.sum()
    return per_pair


def _pair_weights(
    grad_output: torch.Tensor, reduction: str, n: int, acc: torch.dtype, weights: Optional[torch.Tensor]
) -> torch.Tensor:
    """d(loss)/d(ℓ_i) for each pair, as a length-``n`` vector: the backward's row multipliers."""
    grad_output = grad_output.to(acc)
    if weights is None:
        if reduction == "none":
            return grad_output
        per_pair = grad_output / n if reduction == "mean" else grad_output
        return per_pair.expand(n)
    w = weights.to(acc)
    if reduction == "mean":
        return grad_output * w / weight_total(w)
    return grad_output * w


def _decoupled_positives(
    grad_a: torch.Tensor,
    grad_scale: torch.Tensor,
    a: torch.Tensor,
    positives: torch.Tensor,
    s: torch.Tensor,
    weights: torch.Tensor,
    needed: bool,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The part of decoupled positives (not columns of ``b``, so not in ``G``): each pair's loss has
    ``−s·a_i·p_i`` with weight ``w_i``. Returns ``grad_a``, ``grad_scale`` with it and, if
    ``needed``, the positives' gradient ``−s·w_i·a_i`` (``a``, ``s``: in the accumulation dtype)."""
    positive_rows = positives.to(a.dtype)
    grad_a = grad_a - (s * weights)[:, None] * positive_rows
    grad_scale = grad_scale - torch.sum(weights * torch.sum(a * positive_rows, dim=1))
    grad_positives = (-(s * weights)[:, None] * a).to(positives.dtype) if needed else None
    return grad_a, grad_scale, grad_positives


def _by_value(offset: torch.Tensor, pair_weights: Optional[torch.Tensor]) -> torch.Tensor:
    """A pair's offset with ``-inf`` made NaN where the pair counts (weight ≠ 0): see the backward."""
    counted = torch.isneginf(offset)
    if pair_weights is not None:
        counted &= pair_weights != 0
    return offset.masked_fill(counted, math.nan)


def as_input(grad: torch.Tensor, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    """``grad`` in an input's dtype and shape (a 0-d scale's gradient may come back as ``(1,)``); no
    op where it has them already: a small batch pays per op."""
    grad = grad if grad.dtype == dtype else grad.to(dtype)
    return grad if grad.shape == shape else grad.reshape(shape)


class ContrastiveFunction(torch.autograd.Function):
    """Per-pair loss ``ℓ_i = row_i (+ col_i) − S⁺_i`` over precomputed stats, and its backward.

    InfoNCE (``log_u_rows is None``): ``row_i = LSE_j S_ij``. Gamma surrogate:
    ``row_i = u_i·D̂_i = exp(log u_i + LSE_j S_ij − log M)``. Either way
    ``dℓ_i/dS_ij = exp(S_ij − c_i) − [j = y_i]`` with the row offset
    ``c_i = LSE_i`` (InfoNCE) or ``log M − log u_i`` (gamma), and likewise for
    the column direction, so one offset backward serves both.
    """

    @staticmethod
    def forward(
        ctx: Any,
        a: torch.Tensor,
        b: torch.Tensor,
        positives: Optional[torch.Tensor],
        scale: torch.Tensor,
        labels: Optional[torch.Tensor],
        log_u_rows: Optional[torch.Tensor],
        log_u_cols: Optional[torch.Tensor],
        row_groups: Optional[torch.Tensor],
        col_groups: Optional[torch.Tensor],
        weights: Optional[torch.Tensor],
        stats: Optional[LseStats],
        spec: LossSpec,
    ) -> torch.Tensor:
        n, m = a.shape[0], b.shape[0]
        targets = targets_of(labels, n, a.device)
        own_columns = labels is None
        if stats is None:
            groups = None if row_groups is None or col_groups is None else (row_groups, col_groups)
            stats = _stats(a, b, scale, targets, own_columns, positives, spec, groups)
        row_lse, col_lse, positive = stats.row_lse, stats.col_lse, stats.positive
        acc = row_lse.dtype
        # an LSE's low part (LseStats) goes with it: LSE − S⁺ of a nearly saturated row is below one
        # ulp of the LSE; the gamma loss's offsets are its own (no low part)
        row_low = col_low = None
        if log_u_rows is None:
            row_offset, row_low = row_lse, stats.row_lse_low
            per_pair = (row_lse - positive) + row_low
        else:
            row_offset = log_count(spec.global_cols or m, row_lse) - log_u_rows.to(acc)
            per_pair = torch.exp(row_lse - row_offset) - positive
        col_offset = None
        if spec.symmetric:
            col_at_pair = col_lse if own_columns else col_lse[targets]
            if log_u_cols is None:
                col_offset, col_low = col_at_pair, stats.col_lse_low
                col_low_at_pair = col_low if own_columns else col_low[targets]
                col_part = (col_at_pair - positive) + col_low_at_pair
            else:
                col_offset = log_count(spec.global_rows or n, row_lse) - log_u_cols.to(acc)
                col_part = torch.exp(col_at_pair - col_offset) - positive
            per_pair = (per_pair + col_part) / 2
        saved = (a, b, positives, scale, targets, row_offset, col_offset, row_groups, col_groups, weights)
        ctx.save_for_backward(*saved, row_low, col_low)
        ctx.col_count = col_lse.shape[0]
        ctx.own_columns = own_columns
        ctx.spec = spec
        return reduce_pairs(per_pair, spec.reduction, weights)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        return first_derivative(ContrastiveFunction._backward, ctx, grad_output)

    @staticmethod
    def _backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        a, b, positives, scale, targets, row_offset, col_offset, row_groups, col_groups, pair_weights = (
            ctx.saved_tensors[:10]
        )
        row_low, col_low = ctx.saved_tensors[10:]
        spec: LossSpec = ctx.spec
        acc = row_offset.dtype
        weights = _pair_weights(grad_output, spec.reduction, a.shape[0], acc, pair_weights)
        half = weights / 2 if spec.symmetric else weights
        # A pair's row and its positive's column always hold the positive, which no mask excludes:
        # an offset of -inf there is -inf by value (every logit -inf, an infinite feature), not an
        # empty row, which the offset backward would read as "no term". The full-matrix softmax
        # is 0/0 there: NaN, which every backend keeps. Pairs left out (weight 0) keep -inf.
        row_offset = _by_value(row_offset, pair_weights)
        if spec.symmetric and ctx.own_columns:
            # pair i's positive is column i, alone: its offset and multiplier are the pair's
            col_shift = _by_value(col_offset, pair_weights)
            # a pair with u' = 0 (offset +inf) adds nothing, also to a column whose offset is +inf
            col_mult = half.masked_fill(torch.isposinf(col_shift), 0.0)
        elif spec.symmetric:
            col_offset = _by_value(col_offset, pair_weights)
            col_mult = torch.zeros(ctx.col_count, dtype=acc, device=a.device)
            col_shift = torch.full_like(col_mult, math.inf)
            # pairs sharing a column fold into one offset: r_j = min_i c_i, h_j = Σ_i w_i·e^(r_j − c_i)
            col_shift.scatter_reduce_(0, targets, col_offset, "amin")
            # amin skips NaN: a column any NaN pair points to must stay NaN (NaN inputs propagate)
            col_shift.index_add_(0, targets, torch.where(torch.isnan(col_offset), math.nan, 0.0).to(acc))
            shares = torch.exp(col_shift[targets] - col_offset)
            col_mult.index_add_(0, targets, half * torch.where(torch.isposinf(col_offset), 0.0, shares))
        else:
            col_mult = col_shift = row_offset.new_empty(0)
        # exp(S − (LSE + low)) = exp(S − LSE)·exp(−low): an LSE's low part is a factor of its
        # multiplier, so a saturated row's softmax − onehot is as exact as the full-matrix loss's
        row_mult = half if row_low is None else half * torch.exp(-row_low)
        if col_low is not None and col_mult.numel():
            col_mult = col_mult * torch.exp(-col_low)
        # the positive logit enters every pair's loss with weight −w_i: a column of b, so its
        # one-hot goes into G itself, where it cancels a saturated row's softmax exactly; decoupled
        # positives are not columns of b (below)
        coupled = positives is None
        terms = OffsetTerms(
            row_offset,
            row_mult,
            col_shift,
            col_mult,
            targets if coupled else None,
            weights if coupled else None,
        )
        groups = None if row_groups is None else (row_groups, col_groups)
        scores = scores_of(a, b, scale, targets, groups, spec)
        grad_a, grad_b, grad_scale = spec.primitives.sweep(scores, terms)
        grad_positives = None
        if positives is not None:
            grad_a, grad_scale, grad_positives = _decoupled_positives(
                grad_a, grad_scale, a.to(acc), positives, scale.to(acc), weights, ctx.needs_input_grad[2]
            )
        needs = ctx.needs_input_grad
        return (
            grad_a.to(a.dtype) if needs[0] else None,
            grad_b.to(b.dtype) if needs[1] else None,
            grad_positives,
            as_input(grad_scale, scale.dtype, scale.shape) if needs[3] else None,
            *(None,) * 8,
        )


class _OneTileCall(NamedTuple):
    """:class:`OneTileFunction`'s arguments that take no gradient, as one (fewer arguments: less of
    autograd's per-argument work on every call)."""

    labels: Optional[torch.Tensor]
    row_groups: Optional[torch.Tensor]
    col_groups: Optional[torch.Tensor]
    weights: Optional[torch.Tensor]
    spec: LossSpec
    whole: WholeTile


class OneTileFunction(torch.autograd.Function):
    """:class:`ContrastiveFunction`'s loss (without ``u``) when ``S`` is one tile of the torch backend.

    A small batch's cost is per op, so the tile is formed once and kept for
    the backward (it fits the tile budget, :data:`tilecl.backends.torch.TILE_BYTES`),
    and both passes use PyTorch's fused softmax kernels. With ``P`` the row
    softmax and ``Q`` the column softmax of ``S`` (excluded entries ``-inf``)::

        ℓ_i = −log P_{i,y_i}  (+ −log Q_{i,y_i}, halved, when symmetric)
        G = diag(α)·P + Q·diag(h) − W_onehot,      α_i = w_i (/2),  h_j = Σ_{i: y_i = j} w_i/2

    which is the offset form of :class:`ContrastiveFunction` with the offsets
    the statistics (``exp(S_ij − LSE_i) = P_ij``). Decoupled positives are
    applied outside ``S`` as there. A pair of weight 0 and a column no pair
    holds contribute nothing (0, also where their softmax is NaN), excluded
    entries have no gradient.
    """

    @staticmethod
    def forward(
        ctx: Any,
        a: torch.Tensor,
        b: torch.Tensor,
        positives: Optional[torch.Tensor],
        scale: torch.Tensor,
        call: _OneTileCall,
    ) -> torch.Tensor:
        labels, row_groups, col_groups, weights, spec, whole = call
        acc = accumulation_dtype(a.dtype)
        targets = None if labels is None else labels.long()
        groups = None if row_groups is None or col_groups is None else (row_groups, col_groups)
        kept = targets_of(labels, a.shape[0], a.device) if groups is not None else targets
        scores = scores_of(a, b, scale, kept, groups, spec)  # type: ignore[arg-type]
        tile, _ = whole.one_tile_scores(scores, acc)
        row_log = torch.log_softmax(tile, 1)
        if positives is None:
            per_pair = (row_log.diagonal() if targets is None else _at_pairs(row_log, targets)).neg()
        else:
            positive = scale.to(acc) * torch.sum(a.to(acc) * positives.to(acc), dim=1)
            per_pair = _row_lse(tile, row_log) - positive
        if spec.symmetric:
            col_log = torch.log_softmax(_pair_columns(tile, targets), 0)
            per_pair = per_pair.sub_(_at_pairs(col_log, targets)).div_(2)
        ctx.save_for_backward(a, b, positives, scale, targets, row_groups, col_groups, weights, tile)
        ctx.spec, ctx.whole = spec, whole
        return reduce_pairs(per_pair, spec.reduction, weights)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        return first_derivative(OneTileFunction._backward, ctx, grad_output)

    @staticmethod
    def _backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        a, b, positives, scale, targets, row_groups, col_groups, pair_weights, tile = ctx.saved_tensors
        spec: LossSpec = ctx.spec
        acc = tile.dtype
        n = a.shape[0]
        if pair_weights is None and targets is None and spec.reduction != "none":
            # every pair has the same weight and its own column: one scalar multiplier
            # (a cast to the dtype a tensor has is still a call: skipped where a small batch pays per call)
            weight = grad_output if grad_output.dtype == acc else grad_output.to(acc)
            if spec.reduction == "mean":
                weight = weight / n
            grad = torch.softmax(tile, 1)
            if spec.symmetric:
                square = tile.shape[1] == n
                columns = torch.softmax(tile if square else tile[:, :n], 0)
                (grad if square else grad[:, :n]).add_(columns)
                grad.mul_(weight / 2)
            else:
                grad.mul_(weight)
            if positives is None:
                grad.diagonal().sub_(weight)
            return OneTileFunction._products(ctx, grad, weight.expand(n))
        weights = _pair_weights(grad_output, spec.reduction, n, acc, pair_weights)
        half = weights / 2 if spec.symmetric else weights
        grad = torch.softmax(tile, 1)
        if pair_weights is not None:
            # a pair of weight 0 adds nothing, whatever its softmax (an empty row's is 0/0)
            grad.masked_fill_((pair_weights == 0)[:, None], 0.0)
        grad.mul_(half[:, None])
        if spec.symmetric:
            col_mult = half
            if targets is not None:
                col_mult = torch.zeros(grad.shape[1], dtype=acc, device=a.device).index_add_(0, targets, half)
            column_part = torch.softmax(_pair_columns(tile, targets), 0)
            if targets is not None or pair_weights is not None:
                # a column no pair holds (or held by pairs of weight 0) adds nothing
                column_part.masked_fill_(col_mult == 0, 0.0)
            _pair_columns(grad, targets).add_(column_part.mul_(col_mult))
        if positives is None:
            # the positive's −w_i enters G itself, where it cancels a saturated row's softmax exactly
            if targets is None:
                grad.diagonal().sub_(weights)
            else:
                grad.scatter_add_(1, targets[:, None], weights.neg()[:, None])
        return OneTileFunction._products(ctx, grad, weights)

    @staticmethod
    def _products(ctx: Any, grad: torch.Tensor, weights: torch.Tensor) -> tuple:
        """The gradients from ``G`` (``dL/dS``) and the pairs' ``weights`` (decoupled positives)."""
        a, b, positives, scale, targets, row_groups, col_groups, _, _ = ctx.saved_tensors
        spec: LossSpec = ctx.spec
        acc = grad.dtype
        groups = None if row_groups is None else (row_groups.long(), col_groups.long())
        if spec.exclude_diagonal or groups is not None:
            kept = targets_of(targets, a.shape[0], a.device)
            ctx.whole.one_tile_exclude_(grad, scores_of(a, b, scale, kept, groups, spec), 0.0)
        needs = ctx.needs_input_grad
        grad_a, grad_b, grad_scale = ctx.whole.one_tile_products(
            grad, Scores(a, b, scale), acc, None, needs[1]
        )
        grad_positives = None
        if positives is not None:
            grad_a, grad_scale, grad_positives = _decoupled_positives(
                grad_a, grad_scale, a.to(acc), positives, scale.to(acc), weights, needs[2]
            )
        return (
            None if not needs[0] else grad_a if a.dtype == acc else grad_a.to(a.dtype),
            None if not needs[1] else grad_b if b.dtype == acc else grad_b.to(b.dtype),
            grad_positives,
            as_input(grad_scale, scale.dtype, scale.shape) if needs[3] else None,
            None,
        )


def _pair_columns(tile: torch.Tensor, targets: Optional[torch.Tensor]) -> torch.Tensor:
    """The columns with statistics: the pairs' (``N``) without labels, all of them with."""
    return tile[:, : tile.shape[0]] if targets is None and tile.shape[1] != tile.shape[0] else tile


def _at_pairs(x: torch.Tensor, targets: Optional[torch.Tensor]) -> torch.Tensor:
    """``x[i, y_i]`` for every pair (``y_i = i`` without labels)."""
    if targets is None:
        return x.diagonal()
    return x.gather(1, targets.clamp(0, x.shape[1] - 1)[:, None]).squeeze(1)


def _row_lse(tile: torch.Tensor, row_log: torch.Tensor) -> torch.Tensor:
    """``LSE_j S_ij`` from the row log-softmax at each row's maximum (an empty row: ``-inf``)."""
    peak, where = tile.max(dim=1)
    lse = peak - row_log.gather(1, where[:, None]).squeeze(1)
    return lse.masked_fill_(torch.isneginf(peak), -math.inf)


def whole_tile_of(primitives: Primitives, a: torch.Tensor, b: torch.Tensor) -> Optional[WholeTile]:
    """The :class:`~tilecl.backends.base.WholeTile` of a local call's backend when it declares one,
    ``S = a bᵀ`` fits one tile and the call is eager (a compiled graph keeps the registered ops,
    opaque to the compiler, whose device assertions then raise where inlined code would abort)."""
    if not reads_values(a):
        return None
    # the resolved backend's (tilecl.backends.ops.RegisteredPrimitives); sharded primitives have none
    whole: Optional[WholeTile] = getattr(primitives, "whole", None)
    return whole if whole is not None and whole.one_tile(a.shape[0], b.shape[0], a.dtype) else None


def apply_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    spec: LossSpec,
    *,
    labels: Optional[torch.Tensor] = None,
    positives: Optional[torch.Tensor] = None,
    log_u_rows: Optional[torch.Tensor] = None,
    log_u_cols: Optional[torch.Tensor] = None,
    groups: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    weights: Optional[torch.Tensor] = None,
    stats: Optional[LseStats] = None,
) -> torch.Tensor:
    """Run the shared Function, computing the batch statistics unless the caller already has them.

    ``groups``: ``(row_groups (N,), col_groups (M,))`` false-negative masking;
    ``weights``: ``(N,)`` per-pair weights (see :func:`reduce_pairs`), no gradient.
    """
    row_groups, col_groups = (None, None) if groups is None else groups
    if weights is not None:
        weights = weights.detach()
    # the one-tile Function takes an InfoNCE-type call (no u) that is local with its own statistics
    local = log_u_rows is None and log_u_cols is None and stats is None and not spec.global_rows
    whole = whole_tile_of(spec.primitives, a, b) if local else None
    if whole is not None:
        # eager only, so one tensor given twice needs no distinct view (that is for torch.compile)
        call = _OneTileCall(labels, row_groups, col_groups, weights, spec, whole)
        result: torch.Tensor = OneTileFunction.apply(a, b, positives, scale, call)
        return result
    if stats is None and b is a:
        # one tensor on both sides (NT-Xent, one-tower SupCon): a backend may use S's symmetry; the
        # caller that computed the stats itself made them without the flag, so it stays off then
        spec = dataclasses.replace(spec, shared_operands=True)
    a, b, positives, scale, labels, log_u_rows, log_u_cols, row_groups, col_groups, weights = distinct(  # type: ignore[assignment]
        a, b, positives, scale, labels, log_u_rows, log_u_cols, row_groups, col_groups, weights
    )
    loss: torch.Tensor = ContrastiveFunction.apply(
        a, b, positives, scale, labels, log_u_rows, log_u_cols, row_groups, col_groups, weights, stats, spec
    )
    return loss
