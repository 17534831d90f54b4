"""The ``reference`` backend: the two primitives from the full ``S`` in NumPy float64.

The oracle of the test matrix at the primitive level: it materializes
``S = scale · a bᵀ`` (so it is for small shapes only) and returns float64
whatever the input dtype, on the inputs' device.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import reference as oracle
from .base import Gradients, LseStats, OffsetTerms, Scores

__all__ = ["lse_stats", "offset_backward"]


def _host(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy()


def _full(scores: Scores) -> np.ndarray:
    full = float(scores.scale) * _host(scores.a) @ _host(scores.b).T
    if scores.exclude_diagonal:
        k = min(full.shape)
        full[np.arange(k), np.arange(k)] = -np.inf
    return full


def _on(like: torch.Tensor, *arrays: np.ndarray) -> list[torch.Tensor]:
    # the oracle stays in float64 whatever the input dtype
    return [torch.as_tensor(x).to(device=like.device, dtype=torch.float64) for x in arrays]


def lse_stats(scores: Scores, targets: torch.Tensor, col_count: int) -> LseStats:
    """:class:`~tilecl.backends.base.LseStats` of ``S = scale·a bᵀ``, in float64."""
    full = _full(scores)
    rows = oracle.logsumexp(full, axis=1)
    cols = oracle.logsumexp(full[:, :col_count], axis=0)
    positive = full[np.arange(full.shape[0]), targets.cpu().numpy()]  # -inf where excluded
    return LseStats(*_on(scores.a, rows, cols, positive))


def offset_backward(scores: Scores, terms: OffsetTerms) -> Gradients:
    """:class:`~tilecl.backends.base.Gradients` for ``terms``, in float64."""
    full = _full(scores)
    c, g, r, h = map(_host, terms)
    # a non-finite offset drops its term: exp(S - inf) = 0, never 0·inf
    live_rows, live_cols = np.isfinite(c), np.isfinite(r)
    g, c = np.where(live_rows, g, 0.0), np.where(live_rows, c, np.inf)
    h, r = np.where(live_cols, h, 0.0), np.where(live_cols, r, np.inf)
    grad = g[:, None] * np.exp(full - c[:, None])
    width = r.shape[0]
    grad[:, :width] += h[None, :] * np.exp(full[:, :width] - r[None, :])
    s = float(scores.scale)
    a64, b64 = _host(scores.a), _host(scores.b)
    return Gradients(*_on(scores.a, s * grad @ b64, s * grad.T @ a64, np.sum(grad @ b64 * a64)))
