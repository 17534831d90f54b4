"""Backend registry and dispatch.

A backend is two functions with the signatures of :mod:`tilecl._blockwise`:
``lse_stats`` (the streaming-LSE forward) and ``offset_backward`` (the single
offset-form backward). Every loss in tilecl is written once on top of these.

``backend="auto"``: CUDA tensors → ``triton`` if importable, else ``cuda`` if
built, else ``torch``; anything else → ``torch``. An explicitly requested
backend that cannot run raises; it never silently falls back.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch

from . import _blockwise
from . import reference as _reference

__all__ = ["Backend", "available_backends", "resolve_backend"]

KNOWN_BACKENDS = ("reference", "torch", "triton", "cuda", "cuda-emu")


class Backend(NamedTuple):
    """The two primitives a backend implements (see DESIGN.md)."""

    name: str
    lse_stats: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    offset_backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _reference_scores(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, exclude_diagonal: bool):
    a64 = a.detach().cpu().double().numpy()
    b64 = b.detach().cpu().double().numpy()
    scores = float(scale) * a64 @ b64.T
    if exclude_diagonal:
        k = min(scores.shape)
        scores[np.arange(k), np.arange(k)] = -np.inf
    return a64, b64, scores


def _reference_lse_stats(a, b, scale, targets, col_count, exclude_diagonal=False):
    _, _, scores = _reference_scores(a, b, scale, exclude_diagonal)
    rows = _reference.logsumexp(scores, axis=1)
    cols = _reference.logsumexp(scores[:, :col_count], axis=0)
    positive = scores[np.arange(scores.shape[0]), targets.cpu().numpy()]  # -inf where excluded
    acc = _blockwise.accumulation_dtype(a.dtype)
    return tuple(torch.from_numpy(x).to(device=a.device, dtype=acc) for x in (rows, cols, positive))


def _reference_offset_backward(
    a, b, scale, row_offset, row_mult, col_offset, col_mult, exclude_diagonal=False
):
    a64, b64, scores = _reference_scores(a, b, scale, exclude_diagonal)

    def host(x: torch.Tensor) -> np.ndarray:
        return x.detach().cpu().double().numpy()

    c, g, r, h = map(host, (row_offset, row_mult, col_offset, col_mult))
    live = np.isfinite(r)
    h, r = np.where(live, h, 0.0), np.where(live, r, 0.0)
    grad = g[:, None] * np.exp(scores - np.where(np.isfinite(c), c, 0.0)[:, None])
    width = r.shape[0]
    grad[:, :width] += h[None, :] * np.exp(scores[:, :width] - r[None, :])
    s = float(scale)
    acc = _blockwise.accumulation_dtype(a.dtype)
    out = (s * grad @ b64, s * grad.T @ a64, np.sum(grad @ b64 * a64))
    return tuple(torch.as_tensor(x).to(device=a.device, dtype=acc) for x in out)


_BACKENDS = {
    "torch": Backend("torch", _blockwise.lse_stats, _blockwise.offset_backward),
    "reference": Backend("reference", _reference_lse_stats, _reference_offset_backward),
}


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, in dispatch-preference order."""
    return [name for name in ("triton", "cuda", "cuda-emu", "torch", "reference") if name in _BACKENDS]


def resolve_backend(name: str, device: torch.device) -> Backend:
    """The backend to run on tensors living on ``device``; raises if ``name`` cannot run."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        if device.type == "cuda":
            for candidate in ("triton", "cuda"):
                if candidate in _BACKENDS:
                    return _BACKENDS[candidate]
        return _BACKENDS["torch"]
    if name not in KNOWN_BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {KNOWN_BACKENDS}, got {name!r}")
    if name not in _BACKENDS:
        raise RuntimeError(
            f"backend={name!r} is not available in this build of tilecl (available: {available_backends()})"
        )
    return _BACKENDS[name]
