"""InfoNCE / CLIP and NT-Xent as one autograd Function over a backend's two primitives.

Forward: the backend's streaming LSE gives the row and column statistics; the
positive logits are a gather. Backward: the loss's ``dL/dS`` is

    G_ij = α_i·exp(S_ij − rowLSE_i) + h_j·exp(S_ij − colLSE_j) − Σ_{pairs} p_i·[j = y_i]

so the backend's offset backward handles the exponential part and the sparse
positive part is applied here with gathers. Only the inputs and ``O(N + M)``
statistics are saved between the passes.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch._C import _functions

from . import _validation as v
from .backends import Backend, resolve_backend

__all__ = ["contrastive_loss", "nt_xent_loss"]


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


class _ContrastiveFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: torch.Tensor,
        labels: Optional[torch.Tensor],
        symmetric: bool,
        reduction: str,
        exclude_diagonal: bool,
        backend: Backend,
    ) -> torch.Tensor:
        n, m = a.shape[0], b.shape[0]
        targets = torch.arange(n, device=a.device) if labels is None else labels.long()
        col_count = (n if labels is None else m) if symmetric else 0
        row_lse, col_lse, positive = backend.lse_stats(a, b, scale, targets, col_count, exclude_diagonal)
        per_pair = row_lse - positive
        if symmetric:
            per_pair = (per_pair + col_lse[targets] - positive) / 2
        ctx.save_for_backward(a, b, scale, targets, row_lse, col_lse)
        ctx.options = (symmetric, reduction, exclude_diagonal, backend)
        if reduction == "mean":
            return per_pair.mean()
        if reduction == "sum":
            return per_pair.sum()
        return per_pair

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        with torch.no_grad():
            grads = _ContrastiveFunction._backward(ctx, grad_output)
        return _refuse_second_derivative(grads)

    @staticmethod
    def _backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        a, b, scale, targets, row_lse, col_lse = ctx.saved_tensors
        symmetric, reduction, exclude_diagonal, backend = ctx.options
        acc = row_lse.dtype
        weights = _pair_weights(grad_output, reduction, a.shape[0], acc)
        row_mult = weights / 2 if symmetric else weights
        col_mult = torch.zeros_like(col_lse)
        if symmetric:
            col_mult.index_add_(0, targets, weights / 2)
        grad_a, grad_b, grad_scale = backend.offset_backward(
            a, b, scale, row_lse, row_mult, col_lse, col_mult, exclude_diagonal
        )
        # the positive logit S_{i,y_i} enters every pair's loss with weight −w_i
        s = scale.to(acc)
        a_acc, b_pos = a.to(acc), b[targets].to(acc)
        grad_a -= (s * weights)[:, None] * b_pos
        grad_b.index_add_(0, targets, -(s * weights)[:, None] * a_acc)
        grad_scale = grad_scale - torch.sum(weights * torch.sum(a_acc * b_pos, dim=1))
        return (
            grad_a.to(a.dtype) if ctx.needs_input_grad[0] else None,
            grad_b.to(b.dtype) if ctx.needs_input_grad[1] else None,
            grad_scale.to(scale.dtype).reshape(scale.shape) if ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
            None,
            None,
        )


def contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: v.Scale = 1.0,
    *,
    labels: Optional[torch.Tensor] = None,
    symmetric: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
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

    Returns:
        The loss; float32 for float16/bfloat16 inputs, otherwise the input dtype.
        Double backward is not supported.
    """
    v.check_pair(a, b)
    n, m = a.shape[0], b.shape[0]
    v.check_reduction(reduction)
    v.check_labels(labels, n, m, a)
    v.check_symmetric(symmetric, n, m)
    scale = v.check_scale(logit_scale, "logit_scale", a)
    ops = resolve_backend(backend, a.device)
    return _ContrastiveFunction.apply(a, b, scale, labels, bool(symmetric), reduction, False, ops)


def nt_xent_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.5,
    *,
    reduction: str = "mean",
    backend: str = "auto",
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
    """
    v.check_pair(z1, z2, ("z1", "z2"))
    if z1.shape[0] != z2.shape[0]:
        raise ValueError(
            f"z1 and z2 must hold the same number of samples, got {z1.shape[0]} and {z2.shape[0]}"
        )
    v.check_positive(temperature, "temperature")
    v.check_reduction(reduction)
    ops = resolve_backend(backend, z1.device)
    views = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    partners = torch.arange(2 * n, device=z1.device).roll(n)
    scale = torch.tensor(1.0 / temperature, dtype=torch.float64, device=z1.device)
    return _ContrastiveFunction.apply(views, views, scale, partners, False, reduction, True, ops)
