"""The ``reference`` backend: the two primitives from the full ``S`` in NumPy float64.

The oracle of the test matrix at the primitive level: it materializes
``S = scale · a bᵀ`` (so it is for small shapes only) and returns float64
whatever the input dtype, on the inputs' device.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import reference as oracle
from .base import Gradients, LseStats, OffsetTerms

__all__ = ["lse_stats", "offset_backward"]


def _host(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy()


def _scores(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, exclude_diagonal: bool) -> np.ndarray:
    scores = float(scale) * _host(a) @ _host(b).T
    if exclude_diagonal:
        k = min(scores.shape)
        scores[np.arange(k), np.arange(k)] = -np.inf
    return scores


def _on(like: torch.Tensor, *arrays: np.ndarray) -> list[torch.Tensor]:
    # the oracle stays in float64 whatever the input dtype
    return [torch.as_tensor(x).to(device=like.device, dtype=torch.float64) for x in arrays]


def lse_stats(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    targets: torch.Tensor,
    col_count: int,
    exclude_diagonal: bool = False,
) -> LseStats:
    """:class:`~tilecl.backends.base.LseStats` of ``S = scale·a bᵀ``, in float64."""
    scores = _scores(a, b, scale, exclude_diagonal)
    rows = oracle.logsumexp(scores, axis=1)
    cols = oracle.logsumexp(scores[:, :col_count], axis=0)
    positive = scores[np.arange(scores.shape[0]), targets.cpu().numpy()]  # -inf where excluded
    return LseStats(*_on(a, rows, cols, positive))


def offset_backward(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    terms: OffsetTerms,
    exclude_diagonal: bool = False,
) -> Gradients:
    """:class:`~tilecl.backends.base.Gradients` for ``terms``, in float64."""
    scores = _scores(a, b, scale, exclude_diagonal)
    c, g, r, h = map(_host, terms)
    # a non-finite offset drops its term: exp(S - inf) = 0, never 0·inf
    live_rows, live_cols = np.isfinite(c), np.isfinite(r)
    g, c = np.where(live_rows, g, 0.0), np.where(live_rows, c, np.inf)
    h, r = np.where(live_cols, h, 0.0), np.where(live_cols, r, np.inf)
    grad = g[:, None] * np.exp(scores - c[:, None])
    width = r.shape[0]
    grad[:, :width] += h[None, :] * np.exp(scores[:, :width] - r[None, :])
    s = float(scale)
    a64, b64 = _host(a), _host(b)
    return Gradients(*_on(a, s * grad @ b64, s * grad.T @ a64, np.sum(grad @ b64 * a64)))
