"""Backend registry and dispatch.

A backend is two functions with the signatures of :mod:`tilecl._blockwise`:
``lse_stats`` (the streaming-LSE forward) and ``offset_backward`` (the single
offset-form backward). Every loss in tilecl is written once on top of these.

``backend="auto"``: CUDA tensors → ``triton`` if importable, else ``cuda`` if
built, else ``torch``; anything else → ``torch``. An explicitly requested
backend that cannot run raises; it never silently falls back.
"""

from __future__ import annotations

import importlib.util
import os
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
    acc = torch.float64  # the oracle stays in float64 whatever the input dtype
    return tuple(torch.from_numpy(x).to(device=a.device, dtype=acc) for x in (rows, cols, positive))


def _reference_offset_backward(
    a, b, scale, row_offset, row_mult, col_offset, col_mult, exclude_diagonal=False
):
    a64, b64, scores = _reference_scores(a, b, scale, exclude_diagonal)

    def host(x: torch.Tensor) -> np.ndarray:
        return x.detach().cpu().double().numpy()

    c, g, r, h = map(host, (row_offset, row_mult, col_offset, col_mult))
    live = np.isfinite(r)
    h, r = np.where(live, h, 0.0), np.where(live, r, np.inf)  # exp(S - inf) = 0, never 0·inf
    grad = g[:, None] * np.exp(scores - np.where(np.isfinite(c), c, 0.0)[:, None])
    width = r.shape[0]
    grad[:, :width] += h[None, :] * np.exp(scores[:, :width] - r[None, :])
    s = float(scale)
    acc = torch.float64  # the oracle stays in float64 whatever the input dtype
    out = (s * grad @ b64, s * grad.T @ a64, np.sum(grad @ b64 * a64))
    return tuple(torch.as_tensor(x).to(device=a.device, dtype=acc) for x in out)


_BACKENDS = {
    "torch": Backend("torch", _blockwise.lse_stats, _blockwise.offset_backward),
    "reference": Backend("reference", _reference_lse_stats, _reference_offset_backward),
}


def _with_unit_multipliers(offset_backward: Callable) -> Callable:
    """``offset_backward`` with float16 multipliers rescaled by a power of two (exact) around 1.

    The kernels round the gradient tile ``G = g·exp(S − c) + …`` to the input
    type for the second tensor-core product. The multipliers are ~1/N, so for
    float16 (smallest normal 6e-5) ``G`` falls into the subnormals and loses
    its digits at realistic N; scaled so the largest multiplier is in [1, 2),
    ``G ≤ 2`` keeps full precision and the float32 outputs are scaled back.
    bfloat16 and float32 have float32's exponent range and pass through.
    """

    def wrapped(a, b, scale, row_offset, row_mult, col_offset, col_mult, exclude_diagonal=False):
        if a.dtype != torch.float16:
            return offset_backward(a, b, scale, row_offset, row_mult, col_offset, col_mult, exclude_diagonal)
        peak = torch.zeros((), dtype=torch.float32, device=a.device)
        for mult in (row_mult, col_mult):
            if mult.numel():
                peak = torch.maximum(peak, mult.detach().abs().max().to(peak))
        usable = torch.isfinite(peak) & (peak > 0)
        # a tensor, not a float: no device synchronization
        unit = torch.where(usable, torch.exp2(-torch.floor(torch.log2(peak))), torch.ones_like(peak))
        grads = offset_backward(
            a, b, scale, row_offset, row_mult * unit, col_offset, col_mult * unit, exclude_diagonal
        )
        return tuple(x / unit.to(x.dtype) for x in grads)

    return wrapped


def _triton_usable() -> bool:
    """triton is installed and can run here: a CUDA device, or its CPU interpreter (TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_backend() -> Backend:
    """Imported on first use: importing triton costs about a second."""
    from tilecl import kernels

    return Backend("triton", kernels.lse_stats, _with_unit_multipliers(kernels.offset_backward))


def _cuda_usable() -> bool:
    """The nvcc-built extension is importable (whether a GPU is present is checked per call)."""
    from .cuda_backend import cuda_built

    return cuda_built()


def _cuda_backend() -> Backend:
    from .cuda_backend import extension_backend

    lse_stats, offset_backward = extension_backend()
    return Backend("cuda", lse_stats, _with_unit_multipliers(offset_backward))


def _emu_usable() -> bool:
    """The emulation module can be built here (source tree, g++, ninja, pybind11); built on first use."""
    from ._cuda_build import emulation_buildable

    return emulation_buildable() is None


def _emu_backend() -> Backend:
    from .cuda_backend import emulation_backend

    lse_stats, offset_backward = emulation_backend()
    return Backend("cuda-emu", lse_stats, _with_unit_multipliers(offset_backward))


_LAZY = {
    "triton": (_triton_usable, _triton_backend),
    "cuda": (_cuda_usable, _cuda_backend),
    "cuda-emu": (_emu_usable, _emu_backend),
}


def _lookup(name: str) -> Backend:
    if name not in _BACKENDS and name in _LAZY and _LAZY[name][0]():
        _BACKENDS[name] = _LAZY[name][1]()
    return _BACKENDS[name]


def _runnable(name: str) -> bool:
    return name in _BACKENDS or (name in _LAZY and _LAZY[name][0]())


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, in dispatch-preference order."""
    return [name for name in ("triton", "cuda", "cuda-emu", "torch", "reference") if _runnable(name)]


HINTS = {
    "triton": ": install triton (pip install triton) and use CUDA tensors, or set TRITON_INTERPRET=1",
    "cuda": ": the CUDA C++ extension tilecl._cuda is not built; build it with `make cuda` (or "
    "`pip install -e .` with nvcc on PATH)",
    "cuda-emu": ": building the CUDA emulation module needs the source tree's csrc/, g++, ninja and pybind11 "
    "(pip install -e '.[dev]')",
}


def resolve_backend(name: str, device: torch.device) -> Backend:
    """The backend to run on tensors living on ``device``; raises if ``name`` cannot run."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        if device.type == "cuda":
            for candidate in ("triton", "cuda"):
                if _runnable(candidate):
                    return _lookup(candidate)
        return _BACKENDS["torch"]
    if name not in KNOWN_BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {KNOWN_BACKENDS}, got {name!r}")
    if not _runnable(name):
        raise RuntimeError(
            f"backend={name!r} is not available here (available: {available_backends()}){HINTS.get(name, '')}"
        )
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(
            "backend='triton' needs CUDA tensors; on CPU tensors it runs only under Triton's "
            "interpreter (set TRITON_INTERPRET=1 before importing triton)"
        )
    if name == "cuda" and device.type != "cuda":
        raise RuntimeError(
            "backend='cuda' needs CUDA tensors; backend='cuda-emu' runs the same kernels on CPU tensors"
        )
    if name == "cuda-emu" and device.type != "cpu":
        raise RuntimeError("backend='cuda-emu' (the CPU emulation of the CUDA kernels) needs CPU tensors")
    return _lookup(name)
