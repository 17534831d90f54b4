"""The ``reference`` backend: the primitives from the full ``S`` in NumPy float64.

The oracle of the test matrix at the primitive level: it materializes
``S = scale · a bᵀ`` (so it is for small shapes only) and returns float64
whatever the input dtype, on the inputs' device.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import (
    FLOAT_DTYPES,
    Backend,
    Gradients,
    LseStats,
    OffsetTerms,
    Scores,
    SigmoidSweep,
    SigmoidTerms,
    anywhere,
    cuda_visible,
    module_loader,
    sweep_of,
)
from .registry import register_backend

__all__ = ["BACKEND", "lse_stats", "offset_backward", "sigmoid_sweep", "sweep"]


def _host(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy()


def _full(scores: Scores) -> np.ndarray:
    full = float(scores.scale) * _host(scores.a) @ _host(scores.b).T
    full[_excluded(scores, full.shape)] = -np.inf
    return full


def _excluded(scores: Scores, shape: tuple[int, ...]) -> np.ndarray:
    """The entries not in the loss: the diagonal (``exclude_diagonal``) and the false negatives."""
    excluded = np.zeros(shape, dtype=bool)
    if scores.exclude_diagonal:
        k = min(shape)
        excluded[np.arange(k), np.arange(k)] = True
    if scores.masked:
        row_groups, col_groups, kept_cols = (x.cpu().numpy() for x in scores.group_mask())
        same = row_groups[:, None] == col_groups[None, :]
        positive = np.arange(shape[1])[None, :] == kept_cols[:, None]
        excluded |= same & ~positive
    return excluded


def _on(like: torch.Tensor, *arrays: np.ndarray) -> list[torch.Tensor]:
    # the oracle stays in float64 whatever the input dtype
    return [torch.as_tensor(x).to(device=like.device, dtype=torch.float64) for x in arrays]


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    """``log Σ exp(x)`` shifted by the max, as a full-matrix cross entropy is: a line of only ``-inf``
    (or none) gives ``-inf``, a ``+inf`` entry NaN (``inf − inf``), as in the streaming backends."""
    if x.shape[axis] == 0:
        return np.full(x.shape[1 - axis], -np.inf)
    peak = np.max(x, axis=axis, keepdims=True)
    shift = np.where(np.isneginf(peak), 0.0, peak)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.squeeze(shift + np.log(np.sum(np.exp(x - shift), axis=axis, keepdims=True)), axis=axis)


def lse_stats(scores: Scores, targets: torch.Tensor, col_count: int) -> LseStats:
    """:class:`~tilecl.backends.base.LseStats` of ``S = scale·a bᵀ``, in float64."""
    full = _full(scores)
    rows = _logsumexp(full, axis=1)
    cols = _logsumexp(full[:, :col_count], axis=0)
    # -inf where excluded; a target outside [0, M) (decoupled positives with M < N) is not read
    columns = targets.cpu().numpy()
    inside = (columns >= 0) & (columns < full.shape[1])
    picked = (
        full[np.arange(full.shape[0]), np.clip(columns, 0, max(full.shape[1] - 1, 0))] if full.size else 0.0
    )
    positive = np.where(inside, picked, 0.0)
    # float64 throughout: nothing left out by rounding to the result dtype
    return LseStats(*_on(scores.a, rows, cols, positive, np.zeros_like(rows), np.zeros_like(cols)))


def offset_backward(scores: Scores, terms: OffsetTerms, with_grads: bool = True) -> Gradients:
    """:class:`~tilecl.backends.base.Gradients` for ``terms``, in float64."""
    full = _full(scores)
    c, g, r, h = map(_host, terms[:4])
    # no term where the multiplier is 0 or the offset -inf (every entry excluded): exactly 0, never
    # 0·inf; any other offset as it is, so NaN or inf inputs propagate
    live_rows, live_cols = ~np.isneginf(c) & (g != 0), ~np.isneginf(r) & (h != 0)
    with np.errstate(invalid="ignore", over="ignore"):
        grad = np.where(live_rows[:, None], g[:, None] * np.exp(full - c[:, None]), 0.0)
        width = r.shape[0]
        grad[:, :width] += np.where(
            live_cols[None, :], h[None, :] * np.exp(full[:, :width] - r[None, :]), 0.0
        )
    # an excluded entry has no gradient, even where an offset is NaN (a row or column of -inf logits)
    grad[_excluded(scores, grad.shape)] = 0.0
    if terms.positive_cols is not None and terms.positive_mult is not None:
        cols, mult = terms.positive_cols.cpu().numpy(), _host(terms.positive_mult)
        rows = np.flatnonzero(cols >= 0)
        grad[rows, cols[rows]] -= mult[rows]
    s = float(scores.scale)
    a64, b64 = _host(scores.a), _host(scores.b)
    # explicit products, not BLAS: 0·inf must be NaN (an inf input), as IEEE and the naive loss say
    with np.errstate(invalid="ignore"):
        grad_a = np.einsum("ij,jd->id", grad, b64, optimize=False)
        grad_b = np.einsum("ij,id->jd", grad, a64, optimize=False)
    return Gradients(*_on(scores.a, s * grad_a, s * grad_b, np.sum(grad_a * a64)))


def sigmoid_sweep(scores: Scores, terms: SigmoidTerms, with_grads: bool) -> SigmoidSweep:
    """:class:`~tilecl.backends.base.SigmoidSweep` from the full ``ℓ = S + β``, in float64."""
    logits = _full(scores) + float(terms.bias)
    positive = terms.row_keys.cpu().numpy()[:, None] == terms.col_keys.cpu().numpy()[None, :]
    weights = _host(terms.row_weights)
    signed = np.where(positive, logits, -logits)
    with np.errstate(over="ignore", invalid="ignore"):
        # softplus(−t) = max(−t, 0) + log1p(e^−|t|); an excluded entry (ℓ = −inf, negative) adds 0
        per_pair = np.maximum(-signed, 0.0) + np.log1p(np.exp(-np.abs(signed)))
        per_pair = np.where(np.isneginf(logits) & ~positive, 0.0, per_pair)
        row_loss = weights * per_pair.sum(axis=1)
        if not with_grads:
            empty = np.zeros(0)
            return SigmoidSweep(*_on(scores.a, row_loss, empty, empty, empty, empty))
        grad = weights[:, None] * (1.0 / (1.0 + np.exp(-logits)) - positive)
    s = float(scores.scale)
    a64, b64 = _host(scores.a), _host(scores.b)
    grad_a = np.einsum("ij,jd->id", grad, b64, optimize=False)
    grad_b = np.einsum("ij,id->jd", grad, a64, optimize=False)
    return SigmoidSweep(*_on(scores.a, row_loss, s * grad_a, s * grad_b, np.sum(grad_a * a64), np.sum(grad)))


#: the gradient sweep: one implementation per form
sweep = sweep_of({"softmax": offset_backward, "sigmoid": sigmoid_sweep})


#: float64 results whatever the inputs; never chosen by ``auto`` (it materializes S)
BACKEND = register_backend(
    Backend(
        "reference",
        FLOAT_DTYPES,
        {"cpu": anywhere, "cuda": cuda_visible, "meta": anywhere},
        lambda: None,
        module_loader(__name__),
        result_dtype=lambda dtype: torch.float64,
        preference=100,
    )
)
