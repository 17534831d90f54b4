"""Backend registry and dispatch.

A backend implements the two primitives of :mod:`tilecl.backends.base`
(``lse_stats`` and ``offset_backward``); every loss in tilecl is written once
on top of them. One module per backend:

==============  =============================================================
``torch``       tiled PyTorch (:mod:`tilecl.backends.torch`), any device
``reference``   the full ``S`` in NumPy float64 (:mod:`tilecl.backends.reference`)
``triton``      the ``@triton.jit`` kernels of ``kernels/`` (:mod:`tilecl.backends.triton`)
``cuda``        the CUDA C++ kernels of ``csrc/``, nvcc-built (:mod:`tilecl.backends.cuda`)
``cuda-emu``    the same CUDA C++ source on the CPU through the emulation layer
==============  =============================================================

:mod:`tilecl.backends.sharded` lifts any of them to a process group.

Each entry of :data:`BACKENDS` declares the devices and dtypes it takes and
answers :meth:`~tilecl.backends.base.Backend.not_supported_reasons`; dispatch
and every error message come from those declarations.

On ``meta`` tensors (shapes, no data) the ops of :mod:`tilecl.backends.ops`
answer with their fake implementations; ``torch`` and ``reference`` take them.

``backend="auto"``: CUDA tensors → the first of ``triton``, ``cuda`` that
supports the call, else ``torch``; anything else → ``torch``. An explicitly
requested backend that cannot run raises; it never silently falls back.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Optional

from torch import device as Device
from torch import dtype as DType

from . import torch as torch_primitives
from .base import (
    FLOAT_DTYPES,
    KERNEL_DTYPES,
    Backend,
    Gradients,
    LseStats,
    OffsetTerms,
    Primitives,
    Scores,
    SigmoidSweep,
    SigmoidTerms,
    anywhere,
    cuda_visible,
)
from .cuda import BUILD_HINT, CudaKernels, cuda_built, emulation_buildable
from .ops import RegisteredPrimitives, register_implementation

__all__ = [
    "BACKENDS",
    "FLOAT_DTYPES",
    "KERNEL_DTYPES",
    "Backend",
    "Gradients",
    "LseStats",
    "OffsetTerms",
    "Primitives",
    "Scores",
    "SigmoidSweep",
    "SigmoidTerms",
    "available_backends",
    "resolve_backend",
]

#: the order ``backend="auto"`` tries on CUDA tensors
AUTO_ON_CUDA = ("triton", "cuda")


def _triton_missing() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "needs triton (pip install triton)"
    return None


def _triton_interpreter() -> Optional[str]:
    # read when triton is first imported, so it must be set before that
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return (
            "runs on CPU tensors only under Triton's interpreter "
            "(set TRITON_INTERPRET=1 before importing triton)"
        )
    return None


def _cuda_missing() -> Optional[str]:
    if not cuda_built():
        return f"the CUDA C++ extension tilecl._cuda is not built; {BUILD_HINT}"
    return None


def _emulation_missing() -> Optional[str]:
    missing = emulation_buildable()
    if missing is not None:
        return f"the CUDA emulation module cannot be built here: {missing}"
    return None


@functools.cache
def _load_triton() -> Primitives:
    # importing triton costs about a second: only when the backend is first used
    module: Primitives = importlib.import_module(".triton", __name__)
    return module


@functools.cache
def _load_cuda(name: str) -> Primitives:
    return CudaKernels(name)


BACKENDS: dict[str, Backend] = {
    "triton": Backend(
        "triton",
        KERNEL_DTYPES,
        {"cuda": cuda_visible, "cpu": _triton_interpreter},
        _triton_missing,
        _load_triton,
    ),
    "cuda": Backend("cuda", KERNEL_DTYPES, {"cuda": cuda_visible}, _cuda_missing, lambda: _load_cuda("cuda")),
    "cuda-emu": Backend(
        "cuda-emu", KERNEL_DTYPES, {"cpu": anywhere}, _emulation_missing, lambda: _load_cuda("cuda-emu")
    ),
    "torch": Backend(
        "torch",
        FLOAT_DTYPES,
        {"cpu": anywhere, "cuda": cuda_visible, "meta": anywhere},
        lambda: None,
        lambda: torch_primitives,
    ),
    "reference": Backend(
        "reference",
        FLOAT_DTYPES,
        {"cpu": anywhere, "cuda": cuda_visible, "meta": anywhere},
        lambda: None,
        lambda: importlib.import_module(".reference", __name__),
    ),
}


def _load(name: str) -> Primitives:
    # looked up at each call, so that a backend swapped in the registry (a test's stand-in) is the
    # one the ops run
    return BACKENDS[name].load()


for _name in BACKENDS:
    register_implementation(_name, functools.partial(_load, _name))


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine (on some device), in dispatch-preference order."""
    return [
        name
        for name, backend in BACKENDS.items()
        if backend.missing() is None and any(check() is None for check in backend.devices.values())
    ]


def resolve_backend(name: object, device: Device, dtype: DType, form: str = "softmax") -> Primitives:
    """The primitives to run the ``form`` on ``device`` tensors of ``dtype``; raises if ``name`` cannot.

    They call the backend through the registered ops of :mod:`tilecl.backends.ops`.

    Raises:
        TypeError: ``name`` is not a string, or the backend does not take ``dtype``.
        ValueError: ``name`` is not a known backend.
        RuntimeError: the backend cannot run here (not installed or built, wrong device).
    """
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        candidates = AUTO_ON_CUDA if device.type == "cuda" else ()
        chosen = next((c for c in candidates if not BACKENDS[c].unsupported(device, dtype, form)), "torch")
        return RegisteredPrimitives(chosen)
    if name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {tuple(BACKENDS)}, got {name!r}")
    found = BACKENDS[name].unsupported(device, dtype, form)
    if found:
        # a backend that cannot run here outranks a dtype mistake: fixing the dtype would not help
        error = RuntimeError if any(u.error is RuntimeError for u in found) else TypeError
        takers = [other for other, b in BACKENDS.items() if not b.unsupported(device, dtype, form)]
        reasons = "; ".join(u.reason for u in found)
        raise error(
            f"backend={name!r} cannot run {dtype} tensors on {device} here: {reasons} "
            f"(backends that can: {', '.join(takers) or 'none'})"
        )
    return RegisteredPrimitives(name)
