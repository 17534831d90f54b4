"""InfoNCE / CLIP, NT-Xent and the gamma surrogate as one autograd Function over a backend's two primitives.

Forward: the backend's streaming LSE gives the row and column statistics and
the positive logits. Backward: every loss's ``dL/dS`` is

    G_ij = α_i·exp(S_ij − c_i) + h_j·exp(S_ij − r_j) − Σ_{pairs} w_i·[j = y_i]

with row offsets ``c`` (InfoNCE: the row LSE; gamma: ``log M − log u_i``) and
column offsets ``r``, so the backend's offset backward handles the
exponential part and the sparse positive part is applied here with gathers.
Only the inputs and ``O(N + M)`` statistics are saved between the passes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, TypeVar

import torch
from torch._C import _functions

from . import _validation as v
from .backends import Backend, resolve_backend

__all__ = ["contrastive_loss", "gamma_contrastive_loss", "nt_xent_loss"]

_T = TypeVar("_T")


def _pair_weights(grad_output: torch.Tensor, reduction: str, n: int, acc: torch.dtype) -> torch.Tensor:
    """d(loss)/d(ℓ_i) for each pair, as a length-``n`` vector."""
    grad_output = grad_output.to(acc)
    if reduction == "none":
        return grad_output
    per_pair = grad_output / n if reduction == "mean" else grad_output
    return per_pair.expand(n)


DOUBLE_BACKWARD_MESSAGE = (
    b"tilecl losses are differentiable once: double backward (differentiating a gradient "
    b"of a tilecl loss, e.g. a gradient penalty) is not supported; use tilecl.naive for that"
)


def _refuse_second_derivative(grads: tuple) -> tuple:
    """Under ``create_graph=True``, make differentiating these gradients raise a clear error.

    Like ``once_differentiable``, but the outputs always carry the error node
    (its own version skips it when the upstream gradient does not require grad,
    which ends in an unrelated "does not require grad" message).
    """
    if not torch.is_grad_enabled():
        return grads
    live = [i for i, g in enumerate(grads) if g is not None]
    guard = _functions.DelayedError(DOUBLE_BACKWARD_MESSAGE, len(live))
    guarded = guard(*[grads[i].detach().requires_grad_() for i in live])
    guarded = guarded if isinstance(guarded, tuple) else (guarded,)
    out = list(grads)
    for i, g in zip(live, guarded):
        out[i] = g
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """The fixed options of one call of the shared autograd Function."""

    symmetric: bool
    reduction: str
    exclude_diagonal: bool
    backend: Backend
    #: ranks whose shards make the global batch (the backend is then sharded)
    world: int = 1


class BatchStats(NamedTuple):
    """What the streaming forward yields: row LSE (N), column LSE (col_count), positive logits (N)."""

    row_lse: torch.Tensor
    col_lse: torch.Tensor
    positive: torch.Tensor


def batch_stats(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    labels: Optional[torch.Tensor],
    positives: Optional[torch.Tensor],
    spec: LossSpec,
) -> BatchStats:
    """One streaming pass over the tiles (no autograd). Decoupled positives are a row-wise dot."""
    n = a.shape[0]
    col_count = _col_count(labels, n, b.shape[0], spec.symmetric)
    with torch.no_grad():
        row_lse, col_lse, positive = spec.backend.lse_stats(
            a, b, scale, _targets(labels, n, a.device), col_count, spec.exclude_diagonal
        )
        if positives is not None:
            acc = row_lse.dtype
            positive = scale.to(acc) * torch.sum(a.to(acc) * positives.to(acc), dim=1)
    return BatchStats(row_lse, col_lse, positive)


def _targets(labels: Optional[torch.Tensor], n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device) if labels is None else labels.long()


class _ContrastiveFunction(torch.autograd.Function):
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
        stats: BatchStats,
        spec: LossSpec,
    ) -> torch.Tensor:
        n, m = a.shape[0], b.shape[0]
        targets = _targets(labels, n, a.device)
        row_lse, col_lse, positive = stats
        acc = row_lse.dtype
        if log_u_rows is None:
            row_offset, row_term = row_lse, row_lse
        else:
            row_offset = math.log(m * spec.world) - log_u_rows.to(acc)
            row_term = torch.exp(row_lse - row_offset)
        per_pair = row_term - positive
        col_offset = None
        if spec.symmetric:
            col_at_pair = col_lse[targets]
            if log_u_cols is None:
                col_offset, col_term = col_at_pair, col_at_pair
            else:
                col_offset = math.log(n * spec.world) - log_u_cols.to(acc)
                col_term = torch.exp(col_at_pair - col_offset)
            per_pair = (per_pair + col_term - positive) / 2
        ctx.save_for_backward(a, b, positives, scale, targets, row_offset, col_offset)
        ctx.col_count = col_lse.shape[0]
        ctx.spec = spec
        if spec.reduction == "mean":
            return per_pair.mean()
        if spec.reduction == "sum":
            return per_pair.sum()
        return per_pair

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        with torch.no_grad():
            grads = _ContrastiveFunction._backward(ctx, grad_output)
        return _refuse_second_derivative(grads)

    @staticmethod
    def _backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        a, b, positives, scale, targets, row_offset, col_offset = ctx.saved_tensors
        spec: LossSpec = ctx.spec
        acc = row_offset.dtype
        weights = _pair_weights(grad_output, spec.reduction, a.shape[0], acc)
        half = weights / 2 if spec.symmetric else weights
        col_mult = torch.zeros(ctx.col_count, dtype=acc, device=a.device)
        col_shift = torch.full_like(col_mult, math.inf)
        if spec.symmetric:
            # pairs sharing a column fold into one offset: r_j = min_i c_i, h_j = Σ_i w_i·e^(r_j − c_i)
            col_shift.scatter_reduce_(0, targets, col_offset, "amin")
            col_mult.index_add_(0, targets, half * torch.exp(col_shift[targets] - col_offset))
        grad_a, grad_b, grad_scale = spec.backend.offset_backward(
            a, b, scale, row_offset, half, col_shift, col_mult, spec.exclude_diagonal
        )
        # the positive logit enters every pair's loss with weight −w_i
        s = scale.to(acc)
        a_acc = a.to(acc)
        positive_rows = (positives if positives is not None else b[targets]).to(acc)
        grad_a -= (s * weights)[:, None] * positive_rows
        grad_positive_rows = -(s * weights)[:, None] * a_acc
        grad_scale = grad_scale - torch.sum(weights * torch.sum(a_acc * positive_rows, dim=1))
        grad_positives = None
        if positives is not None:
            grad_positives = grad_positive_rows.to(positives.dtype) if ctx.needs_input_grad[2] else None
        else:
            grad_b.index_add_(0, targets, grad_positive_rows)
        needs = ctx.needs_input_grad
        return (
            grad_a.to(a.dtype) if needs[0] else None,
            grad_b.to(b.dtype) if needs[1] else None,
            grad_positives,
            grad_scale.to(scale.dtype).reshape(scale.shape) if needs[3] else None,
            None,
            None,
            None,
            None,
            None,
        )


def _apply(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    labels: Optional[torch.Tensor],
    positives: Optional[torch.Tensor],
    log_u_rows: Optional[torch.Tensor],
    log_u_cols: Optional[torch.Tensor],
    spec: LossSpec,
    stats: Optional[BatchStats] = None,
    *,
    process_group: Optional[Any] = None,
    dist_impl: str = "gather",
) -> torch.Tensor:
    """Run the shared Function, computing the batch statistics unless the caller already has them.

    With ``process_group``: the same on the global batch (sharded backend, global reduction).
    """
    if process_group is not None:
        sharded = sharded_spec(spec, a, b, labels, process_group, dist_impl)
        share = _apply(a, b, scale, labels, positives, log_u_rows, log_u_cols, sharded, stats)
        return global_loss(share, a.shape[0], spec.reduction, sharded.world, process_group)
    if stats is None:
        stats = batch_stats(a, b, scale, labels, positives, spec)
    return _ContrastiveFunction.apply(a, b, positives, scale, labels, log_u_rows, log_u_cols, stats, spec)


def checked_on_every_rank(
    process_group: Optional[Any], dist_impl: str, check: Callable[[], _T], reduction: str = "mean"
) -> _T:
    """Run ``check``; with a group, every rank raises if any rank's check failed (nobody hangs)."""
    if process_group is None:
        return check()
    from .distributed import agree, check_dist_impl

    failure: Optional[Exception] = None
    result = None
    try:
        check_dist_impl(dist_impl)
        if reduction == "none":
            raise ValueError("with process_group, reduction must be 'mean' or 'sum'")
        result = check()
    except Exception as error:  # whatever it is, the other ranks must not wait for this one
        failure = error
    agree(failure, process_group, "the loss's input")
    return result  # type: ignore[return-value]


def _col_count(labels: Optional[torch.Tensor], n: int, m: int, symmetric: bool) -> int:
    """Columns with statistics: the pair columns (all of ``b`` with labels) when symmetric, else none."""
    return (n if labels is None else m) if symmetric else 0


def sharded_spec(
    spec: LossSpec,
    a: torch.Tensor,
    b: torch.Tensor,
    labels: Optional[torch.Tensor],
    process_group: Any,
    dist_impl: str,
) -> LossSpec:
    """``spec`` over the global batch: sharded backend, per-rank sums.

    Every rank must make the same call (sizes, dtype, options); otherwise every
    rank raises the same error instead of some of them waiting in a collective.
    """
    from .distributed import agree_on_call, sharded_backend

    n, m = a.shape[0], b.shape[0]
    world = agree_on_call(
        process_group,
        N=n,
        M=m,
        D=a.shape[1],
        dtype=a.dtype,
        columns_with_statistics=_col_count(labels, n, m, spec.symmetric),
        exclude_diagonal=spec.exclude_diagonal,
        reduction=spec.reduction,
        dist_impl=dist_impl,
    )
    backend = sharded_backend(spec.backend, process_group, dist_impl)
    return dataclasses.replace(spec, backend=backend, reduction="sum", world=world)


def global_loss(
    share: torch.Tensor, count: int, reduction: str, world: int, process_group: Any
) -> torch.Tensor:
    """The global loss from this rank's sum over its ``count`` terms (convention: tilecl.distributed)."""
    from .distributed import global_value

    if reduction == "mean":
        share = share / (count * world)
    return global_value(share, world, process_group)


def check_call(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: v.Scale,
    labels: Optional[torch.Tensor],
    positives: Optional[torch.Tensor],
    symmetric: bool,
    reduction: str,
    backend: str,
) -> tuple[torch.Tensor, LossSpec]:
    """Every check of a contrastive call, before any compute; returns the scale tensor and the spec."""
    v.check_pair(a, b)
    n, m = a.shape[0], b.shape[0]
    v.check_reduction(reduction)
    v.check_labels(labels, n, m, a)
    if positives is not None:
        v.check_pair(a, positives, ("a", "positives"))
        if positives.shape[0] != n:
            raise ValueError(f"positives must have one row per row of a ({n}), got {positives.shape[0]}")
        if labels is not None:
            raise ValueError("labels and positives are exclusive: positives already give each row's positive")
        if symmetric:
            raise ValueError("positives (decoupled positives) need symmetric=False")
    else:
        v.check_symmetric(symmetric, n, m)
    scale = v.check_scale(logit_scale, "logit_scale", a)
    return scale, LossSpec(bool(symmetric), reduction, False, resolve_backend(backend, a.device))


def contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: v.Scale = 1.0,
    *,
    labels: Optional[torch.Tensor] = None,
    symmetric: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    positives: Optional[torch.Tensor] = None,
    process_group: Optional[Any] = None,
    dist_impl: str = "gather",
) -> torch.Tensor:
    """InfoNCE (one direction) or CLIP (symmetric) loss, tile by tile.

    With ``S = logit_scale · a bᵀ`` (never stored) and ``y`` the labels::

        ℓ_i^{a→b} = LSE_j S_ij − S_{i,y_i}
        ℓ_i^{b→a} = LSE_k S_{k,y_i} − S_{i,y_i}
        ℓ_i = (ℓ_i^{a→b} + ℓ_i^{b→a}) / 2   if symmetric else ℓ_i^{a→b}

    Args:
        a: ``(N, D)`` anchors, e.g. image features.
        b: ``(M, D)`` candidates, e.g. text features. Rows ``N..M-1`` are extra
            (hard-negative) columns that only appear in the row direction.
        logit_scale: the inverse temperature, already exponentiated: a float
            or a 0-d tensor (which may require grad).
        labels: ``(N,)`` integer tensor, row ``i``'s positive column
            (default ``i``).
        symmetric: add the column direction and halve (CLIP). Needs ``M >= N``.
        reduction: ``"mean"`` (over the N pairs), ``"sum"`` or ``"none"`` (``(N,)``).
        backend: ``"auto"``, ``"torch"``, ``"reference"`` (see :func:`tilecl.available_backends`).
        positives: optional ``(N, D)``: row ``i``'s positive given apart from
            ``b``, so that it is *not* in the denominator (decoupled form:
            ``ℓ_i = LSE_j S_ij − s·a_i·p_i`` over ``b``'s columns only, as in the
            gamma paper's ``D_i = E_neg[exp s]``). Needs ``symmetric=False``.

    Distributed:
        process_group: a ``torch.distributed`` group: the loss is then the
            global loss over the concatenation of all ranks' batches
            (``reduction`` ``"mean"`` or ``"sum"``; labels index this rank's
            ``b``), the same value on every rank; see :mod:`tilecl.distributed`
            for the gradient convention.
        dist_impl: ``"gather"`` (all-gather, ``O(N_global·D)`` per rank) or
            ``"ring"`` (blocks travel round the ring, ``O(N_local·D)``).

    Returns:
        The loss; float32 for float16/bfloat16 inputs, otherwise the input dtype.
        Double backward is not supported.
    """
    scale, spec = checked_on_every_rank(
        process_group,
        dist_impl,
        lambda: check_call(a, b, logit_scale, labels, positives, symmetric, reduction, backend),
        reduction,
    )
    group = dict(process_group=process_group, dist_impl=dist_impl)
    return _apply(a, b, scale, labels, positives, None, None, spec, **group)


def gamma_contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    log_u_rows: torch.Tensor,
    log_u_cols: Optional[torch.Tensor] = None,
    logit_scale: v.Scale = 1.0,
    *,
    labels: Optional[torch.Tensor] = None,
    symmetric: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    positives: Optional[torch.Tensor] = None,
    process_group: Optional[Any] = None,
    dist_impl: str = "gather",
) -> torch.Tensor:
    """The gamma-augmented surrogate (M-step loss) for given auxiliary weights ``u``.

    With ``D̂_i = (1/M) Σ_j exp(S_ij)`` (row ``i``'s batch estimate of its
    denominator) and ``u`` fixed (no gradient flows into ``log_u_*``)::

        ℓ_i^{a→b} = −S_{i,y_i} + u_i·D̂_i
        ℓ_i^{b→a} = −S_{i,y_i} + u'_i·D̂'_{y_i},   D̂'_j = (1/N) Σ_k exp(S_kj)

    Linear in ``D̂``, so a minibatch estimate of it is unbiased. Its gradient is
    the InfoNCE backward with the row offset ``c_i = log M − log u_i``; with
    ``u_i = 1/D̂_i`` it *is* the InfoNCE gradient. Everything stays in log
    space (``exp(S)`` overflows float32 for ``S > 88``).

    Args:
        log_u_rows: ``(N,)`` ``log u_i`` of the row direction.
        log_u_cols: ``(N,)`` ``log u'_i`` of pair ``i``'s column direction
            (required when ``symmetric``).
        Others: as :func:`contrastive_loss`; with ``process_group``, ``M`` and
            ``N`` in ``D̂`` are the global counts.
    """

    def check() -> tuple[torch.Tensor, LossSpec]:
        checked = check_call(a, b, logit_scale, labels, positives, symmetric, reduction, backend)
        v.check_log_weights(log_u_rows, "log_u_rows", a.shape[0], a)
        if symmetric:
            v.check_log_weights(log_u_cols, "log_u_cols", a.shape[0], a)
        return checked

    scale, spec = checked_on_every_rank(process_group, dist_impl, check, reduction)
    log_u_cols = _detached(log_u_cols) if symmetric else None
    group = dict(process_group=process_group, dist_impl=dist_impl)
    return _apply(a, b, scale, labels, positives, log_u_rows.detach(), log_u_cols, spec, **group)


def _detached(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if x is None else x.detach()


def nt_xent_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.5,
    *,
    reduction: str = "mean",
    backend: str = "auto",
    process_group: Optional[Any] = None,
    dist_impl: str = "gather",
) -> torch.Tensor:
    """SimCLR's NT-Xent loss over the ``2N`` views ``z = [z1; z2]``.

    The views are L2-normalized, ``S = z zᵀ / τ`` with the self-similarity
    ``S_kk`` excluded, and view ``k``'s positive is its partner
    ``(k + N) mod 2N``::

        ℓ_k = LSE_{j ≠ k} S_kj − S_{k, partner(k)}

    Args:
        z1, z2: ``(N, D)`` the two augmented views of the same ``N`` samples.
        temperature: ``τ > 0``.
        reduction: ``"mean"`` over the ``2N`` views, ``"sum"``, or ``"none"``
            (``(2N,)``: the ``z1`` views first).
        process_group, dist_impl: as :func:`contrastive_loss`; every view's
            negatives are then all other views of all ranks.
    """

    def check() -> LossSpec:
        v.check_pair(z1, z2, ("z1", "z2"))
        if z1.shape[0] != z2.shape[0]:
            raise ValueError(
                f"z1 and z2 must hold the same number of samples, got {z1.shape[0]} and {z2.shape[0]}"
            )
        v.check_positive(temperature, "temperature")
        v.check_reduction(reduction)
        return LossSpec(False, reduction, True, resolve_backend(backend, z1.device))

    spec = checked_on_every_rank(process_group, dist_impl, check, reduction)
    views = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    partners = torch.arange(2 * n, device=z1.device).roll(n)
    scale = torch.tensor(1.0 / temperature, dtype=torch.float64, device=z1.device)
    group = dict(process_group=process_group, dist_impl=dist_impl)
    return _apply(views, views, scale, partners, None, None, None, spec, **group)
