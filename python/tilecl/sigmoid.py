"""The sigmoid (SigLIP) contrastive loss (Zhai et al., ICCV 2023), fused, tile by tile.

With ``ℓ_ij = s·⟨a_i, b_j⟩ + β`` and ``z_ij = +1`` for a positive pair, ``−1``
otherwise::

    L = −(1/N) Σ_ij log σ(z_ij ℓ_ij) = (1/N) Σ_ij softplus(−z_ij ℓ_ij)
    G_ij = ∂L/∂ℓ_ij = (σ(ℓ_ij) − [z_ij = +1]) / N

Every pair's term is elementwise, so no tile needs statistics from another:
when gradients are wanted, the forward's one sweep over the tiles (the
backends' ``sweep`` in the sigmoid form, the gradient tile loop with the sigmoid
elementwise step) yields the loss and ``G·b``, ``Gᵀ·a``, ``Σ G a·b`` and
``Σ G`` — 3 ``N·M·D`` matmul passes, where a forward-then-recompute scheme
needs 4 — and the backward only rescales them by the upstream gradient.
Under ``no_grad`` the sweep is one pass; with ``reduction="none"`` (a per-row
upstream gradient) the backward sweeps again with those rows' weights.
(The scaling is not in place: a graph kept with ``retain_graph=True`` may be
differentiated again.)

Positives are described by keys (``row_keys[i] == col_keys[j]``): the diagonal
(global indices), labels (row ``i``'s positive column) or group ids (several
captions of one image) are all the same mechanism in every kernel, and keys
travel with their columns across ranks.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from . import validation as v
from .backends import Primitives, Scores, SigmoidTerms
from .backends.base import WholeTile, accumulation_dtype
from .distributed import resolve_group
from .driver import Signature, begin
from .function import as_input, distinct, first_derivative, refuse_second_derivative, whole_tile_of
from .validation import Scale

__all__ = ["OPEN_CLIP_DIST_IMPLS", "sigmoid_loss"]

#: open_clip's ``SigLipLoss(dist_impl=...)`` names, mapped onto tilecl's two exchanges
OPEN_CLIP_DIST_IMPLS = {"bidir": "ring", "shift": "ring", "reduce": "gather", "gather": "gather"}


class SigmoidFunction(torch.autograd.Function):
    """``Σ_ij softplus(−z_ij ℓ_ij)`` per row, reduced, with the gradients from the forward's sweep."""

    @staticmethod
    def forward(
        ctx: Any,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor,
        row_keys: torch.Tensor,
        col_keys: torch.Tensor,
        primitives: Primitives,
        reduction: str,
        fused: bool,
    ) -> torch.Tensor:
        acc = accumulation_dtype(a.dtype)
        scores = Scores(a, b, scale, False)
        weights = torch.ones(a.shape[0], dtype=acc, device=a.device)
        sweep = primitives.sweep(scores, SigmoidTerms(bias, row_keys, col_keys, weights), fused)
        row_loss = sweep.row_loss.to(acc)
        ctx.primitives, ctx.fused = primitives, fused
        ctx.divisor = a.shape[0] if reduction == "mean" else 1
        if fused:
            # the inputs only as references: a second derivative must reach them (see the backward)
            ctx.save_for_backward(
                sweep.grad_a, sweep.grad_b, sweep.grad_scale, sweep.grad_bias, a, b, scale, bias
            )
        else:
            ctx.save_for_backward(a, b, scale, bias, row_keys, col_keys)
        ctx.kinds = [(x.dtype, x.shape) for x in (a, b, scale, bias)]
        if reduction == "none":
            return row_loss
        total = row_loss.sum()
        return total / ctx.divisor if reduction == "mean" else total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        kinds = ctx.kinds
        with torch.no_grad():
            if ctx.fused:
                grad_a, grad_b, grad_scale, grad_bias, *inputs = ctx.saved_tensors
                g = grad_output.to(grad_a.dtype) / ctx.divisor
                # not in place: a graph kept with retain_graph=True may run this backward again
                grad_a, grad_b, grad_scale, grad_bias = grad_a * g, grad_b * g, grad_scale * g, grad_bias * g
            else:
                saved_a, saved_b, saved_scale, saved_bias, row_keys, col_keys = ctx.saved_tensors
                inputs = [saved_a, saved_b, saved_scale, saved_bias]
                acc = accumulation_dtype(saved_a.dtype)
                weights = grad_output.to(acc).expand(saved_a.shape[0]) / ctx.divisor
                terms = SigmoidTerms(saved_bias, row_keys, col_keys, weights.contiguous())
                scores = Scores(saved_a, saved_b, saved_scale, False)
                _, grad_a, grad_b, grad_scale, grad_bias = ctx.primitives.sweep(scores, terms, True)
            grads = tuple(
                as_input(grad, dtype, shape) if needed else None
                for grad, (dtype, shape), needed in zip(
                    (grad_a, grad_b, grad_scale, grad_bias), kinds, ctx.needs_input_grad
                )
            )
        return (*refuse_second_derivative(grads, (*inputs, grad_output)), None, None, None, None, None)


class OneTileSigmoidFunction(torch.autograd.Function):
    """:class:`SigmoidFunction`'s loss when ``ℓ`` is one tile of a backend's
    :class:`~tilecl.backends.base.WholeTile` (a local eager call): ``t = z·ℓ`` is formed once and
    kept for the backward, which forms ``G = −z·σ(−t)`` from it (the same elementwise steps as the
    sweep's: no confident pair's loss or gradient from a cancellation). With the diagonal positives
    the flip is the diagonal's alone; with labels or groups, one multiplication by a ``±1`` tile.
    Under ``no_grad`` only the losses are formed."""

    @staticmethod
    def forward(
        ctx: Any,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor,
        call: tuple[Optional[tuple[torch.Tensor, torch.Tensor]], str, WholeTile],
    ) -> torch.Tensor:
        keys, reduction, whole = call
        acc = accumulation_dtype(a.dtype)
        # t = z·ℓ, formed as −S − β with the diagonal's sign flipped back (z = +1 there only): the
        # negation rides on the product, and each pair's loss is −log σ(t), PyTorch's fused
        # logsigmoid (2.5x softplus's time on the far tails of unnormalized logits)
        tile, _ = whole.one_tile_scores(Scores(a, b, -scale, False), acc)
        flip = None
        if keys is None:
            tile.sub_(bias.to(acc)).diagonal().neg_()
        else:
            flip = torch.where(keys[0][:, None] == keys[1][None, :], -1.0, 1.0).to(acc)
            tile.sub_(bias.to(acc)).mul_(flip)
        log_likelihood = F.logsigmoid(tile).sum(dim=1)  # each row's −loss
        ctx.save_for_backward(a, b, scale, bias, tile, flip)
        ctx.reduction, ctx.whole = reduction, whole
        if reduction == "none":
            return log_likelihood.neg_()
        total = log_likelihood.sum()
        return total / -a.shape[0] if reduction == "mean" else total.neg()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        return first_derivative(OneTileSigmoidFunction._backward, ctx, grad_output)

    @staticmethod
    def _backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        a, b, scale, bias, t, flip = ctx.saved_tensors
        acc = t.dtype
        # σ(−t) directly, never 1 − σ(t): a confident pair's tiny gradient is no cancellation
        # (a new tensor: retain_graph=True may run this backward again)
        grad = torch.neg(t).sigmoid_()
        if flip is None:
            grad.diagonal().neg_()  # G = −z·σ(u)
        else:
            grad.mul_(flip)
        weight = grad_output.to(acc)
        if ctx.reduction == "none":
            grad.mul_(weight[:, None])
        else:
            grad.mul_(weight / a.shape[0] if ctx.reduction == "mean" else weight)
        needs = ctx.needs_input_grad
        grad_a, grad_b, grad_scale = ctx.whole.one_tile_products(
            grad, Scores(a, b, scale, False), acc, None, needs[1]
        )
        return (
            as_input(grad_a, a.dtype, a.shape) if needs[0] else None,
            as_input(grad_b, b.dtype, b.shape) if needs[1] else None,
            as_input(grad_scale, scale.dtype, scale.shape) if needs[2] else None,
            as_input(grad.sum(), bias.dtype, bias.shape) if needs[3] else None,
            None,
        )


def sigmoid_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: Scale,
    logit_bias: Optional[Scale] = None,
    *,
    labels: Optional[torch.Tensor] = None,
    row_groups: Optional[torch.Tensor] = None,
    col_groups: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    backend: str = "auto",
    process_group: Optional[Any] = None,
    device_mesh: Optional[Any] = None,
    mesh_dim: Union[int, str, None] = None,
    dist_impl: str = "gather",
    argument_names: tuple[str, str] = ("a", "b"),
) -> torch.Tensor:
    """SigLIP's sigmoid loss ``(1/N) Σ_ij softplus(−z_ij (s·a_i·b_j + β))``, tile by tile.

    Args:
        a: ``(N, D)`` e.g. image features; b: ``(M, D)`` e.g. text features
            (``M > N``: extra negative columns).
        logit_scale: ``s > 0``, already exponentiated (a float or 0-d tensor,
            may require grad).
        logit_bias: ``β`` (a finite float or 0-d tensor, may require grad);
            ``None`` is 0.
        labels: ``(N,)`` row ``i``'s positive column (default: ``i``).
        row_groups, col_groups: ``(N,)`` and ``(M,)`` integer ids instead:
            every pair with equal ids is positive (several captions per image).
        reduction: ``"mean"`` (``Σ / N``, open_clip's), ``"sum"`` or
            ``"none"`` (``(N,)``, each row's ``Σ_j``).
        backend: as :func:`tilecl.contrastive_loss`.
        process_group, device_mesh, mesh_dim, dist_impl: the global loss over every rank's pairs
            (``"gather"`` or ``"ring"``; labels index this rank's ``b``,
            group ids are global), gradient convention of
            :mod:`tilecl.distributed`.

    Returns:
        The loss, float32 for 16-bit inputs, else the input dtype. Double
        backward is not supported.
    """
    process_group = resolve_group(process_group, device_mesh, mesh_dim)

    def check() -> tuple[tuple[torch.Tensor, torch.Tensor, bool], Signature]:
        v.check_pair(a, b, argument_names)
        n, m = a.shape[0], b.shape[0]
        v.check_reduction(reduction)
        v.check_labels(labels, n, m, a)
        v.check_groups(row_groups, col_groups, n, m, a, "a pair is positive where they are equal")
        if labels is not None and row_groups is not None:
            raise ValueError("labels and row_groups/col_groups are exclusive ways to name the positives")
        if labels is None and row_groups is None and m < n:
            raise ValueError(
                f"the diagonal positives need {argument_names[1]} to have at least as many rows as "
                f"{argument_names[0]} (M >= N), got N={n}, M={m}; pass labels or group ids"
            )
        scale = v.check_scale(logit_scale, "logit_scale", a)
        bias = v.check_bias(logit_bias, "logit_bias", a)
        kind = "groups" if row_groups is not None else ("labels" if labels is not None else "diagonal")
        # the fused sweep exchanges ∂b in the forward: every rank must take the same path
        fused = torch.is_grad_enabled() and any(x.requires_grad for x in (a, b, scale, bias))
        signature = dict(N=n, M=m, D=a.shape[1], dtype=a.dtype, positives=kind, gradients=fused)
        return (scale, bias, fused), signature

    run = begin(
        check,
        like=a,
        backend=backend,
        form="sigmoid",
        reduction=reduction,
        process_group=process_group,
        dist_impl=dist_impl,
    )
    scale, bias, fused = run.checked
    n, m = a.shape[0], b.shape[0]
    if row_groups is not None and col_groups is not None:
        row_keys, col_keys = row_groups.long(), col_groups.long()
    else:
        # global column indices: keys stay unique across ranks and travel with their columns
        offset = run.ranks.col_offset()
        col_keys = torch.arange(offset, offset + m, device=a.device)
        if labels is None:
            row_keys = torch.arange(offset, offset + n, device=a.device)
        else:
            row_keys = offset + labels.long()
    assert run.primitives is not None  # the sigmoid form was resolved
    whole = None if run.ranks.group is not None else whole_tile_of(run.primitives, a, b)
    if whole is not None:
        # eager only, so one tensor given twice needs no distinct view (that is for torch.compile)
        diagonal = labels is None and row_groups is None
        keys = None if diagonal else (row_keys, col_keys)
        result: torch.Tensor = OneTileSigmoidFunction.apply(a, b, scale, bias, (keys, reduction, whole))
        return result
    inputs = distinct(a, b, scale, bias, row_keys, col_keys)
    loss: torch.Tensor = SigmoidFunction.apply(
        *inputs, run.primitives, run.local_reduction, fused and run.local_reduction != "none"
    )
    return run.global_loss(loss, n)
