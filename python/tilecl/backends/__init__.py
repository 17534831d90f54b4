"""Backend registry and dispatch.

A backend implements the primitives of :mod:`tilecl.backends.base`
(``lse_stats`` and ``sweep``, one implementation per form); every loss in tilecl
is written once on top of them. One module per backend, each declaring itself
next to its code (:class:`~tilecl.backends.base.Backend`, registered in
:mod:`tilecl.backends.registry`):

==============  =============================================================
``triton``      the ``@triton.jit`` kernels of ``kernels/`` (:mod:`tilecl.backends.triton`)
``cuda``        the CUDA C++ kernels of ``csrc/``, nvcc-built (:mod:`tilecl.backends.cuda`)
``cuda-emu``    the same CUDA C++ source on the CPU through the emulation layer
``torch``       tiled PyTorch (:mod:`tilecl.backends.torch`), any device
``reference``   the full ``S`` in NumPy float64 (:mod:`tilecl.backends.reference`)
==============  =============================================================

:mod:`tilecl.backends.sharded` lifts any of them to a process group.

Dispatch and every message come from the declarations: :func:`resolve_backend`
returns the primitives a call runs (through the registered ops of
:mod:`tilecl.backends.ops`), :func:`explain_backend` says which backend a call
takes and why not each of the others. ``backend="auto"`` takes, in order of
declared ``preference``, the first backend that declares the tensors' device
type among its ``auto_devices`` and supports the call, else its last resort
(the most general auto backend, torch, whose own checks then apply): on CUDA
tensors ``triton``, then ``cuda``, then ``torch``; anything else ``torch``. An explicitly requested
backend that cannot run raises, listing its reasons; it never silently falls
back.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch as _torch
from torch import device as Device
from torch import dtype as DType

from ..validation import check_features, check_pair

# importing a backend's module registers its declaration
from . import cuda, reference, torch, triton  # noqa: F401
from .base import (
    FLOAT_DTYPES,
    FORMS,
    KERNEL_DTYPES,
    Backend,
    Gradients,
    LseStats,
    OffsetTerms,
    Primitives,
    Scores,
    SigmoidSweep,
    SigmoidTerms,
    Unsupported,
)
from .ops import RegisteredPrimitives
from .registry import BACKENDS, register_backend

__all__ = [
    "BACKENDS",
    "FLOAT_DTYPES",
    "KERNEL_DTYPES",
    "Backend",
    "BackendChoice",
    "Gradients",
    "LseStats",
    "OffsetTerms",
    "Primitives",
    "Scores",
    "SigmoidSweep",
    "SigmoidTerms",
    "available_backends",
    "check_backend_name",
    "explain_backend",
    "register_backend",
    "resolve_backend",
]


def available_backends() -> list[str]:
    """The backends that can run on this machine (on some device), in ``auto``'s preference order."""
    return [
        name
        for name, backend in BACKENDS.items()
        if backend.missing() is None and any(check() is None for check in backend.devices.values())
    ]


@dataclasses.dataclass(frozen=True)
class BackendChoice:
    """Which backend a call takes, and why not each of the others.

    Attributes:
        requested: the ``backend=`` argument.
        device, dtype, form, extent: what the call is (``extent``: its
            largest ``N``, ``M`` or ``D``, when known).
        chosen: the backend it runs on (``None``: it raises).
        reasons: every registered backend → why it cannot take this call
            (empty: it can).
        refusal: the error the loss raises on these inputs before choosing a
            backend (its own checks: ``"TypeError: a must be float16, ..."``),
            else ``None``; ``chosen`` is then ``None`` and ``reasons`` empty.
    """

    requested: str
    device: Device
    dtype: DType
    form: str
    extent: Optional[int]
    chosen: Optional[str]
    reasons: dict[str, list[Unsupported]]
    refusal: Optional[str] = None

    def __str__(self) -> str:
        kind = str(self.dtype).removeprefix("torch.")
        head = f"backend={self.requested!r} for {kind} tensors on {self.device} ({self.form} form)"
        if self.refusal is not None:
            return f"{head}: cannot run: the loss raises {self.refusal}"
        lines = [f"{head}: {'runs on ' + repr(self.chosen) if self.chosen else 'cannot run'}"]
        for name, found in self.reasons.items():
            if name == self.chosen and found:
                lines.append(f"  {name} (auto's last resort) reports: " + "; ".join(u.reason for u in found))
            if name == self.chosen:
                continue
            if found:
                lines.append(f"  {name}: " + "; ".join(u.reason for u in found))
            elif self.requested == "auto":
                lines.append(f"  {name}: could run, but auto does not pick it on {self.device.type}")
            else:
                lines.append(f"  {name}: could run")
        return "\n".join(lines)


def explain_backend(
    a: _torch.Tensor,
    b: Optional[_torch.Tensor] = None,
    *,
    backend: str = "auto",
    form: str = "softmax",
) -> BackendChoice:
    """Which backend a loss on ``a`` (and ``b``) takes, and why not the others; ``print`` it.

    ``form``: ``"softmax"`` for every softmax loss, ``"sigmoid"`` for SigLIP.
    Raises only for a ``backend`` that is not a backend's name, a ``form``
    that is no form, or ``a`` / ``b`` that are not tensors. A call that cannot
    run is an answer: inputs the loss itself refuses (its checks, the same
    code: not 2-D, not floating, ``a`` and ``b`` of different dtypes, devices
    or ``D``) give :attr:`BackendChoice.refusal`, the error the loss raises;
    a backend that cannot run gives :attr:`BackendChoice.chosen` ``None``
    (or, for ``auto``, its last resort) and the reasons say why.
    """
    check_backend_name(backend)
    if form not in FORMS:
        raise ValueError(f"form must be one of {tuple(FORMS)}, got {form!r}")
    for name, x in (("a", a), ("b", b)):
        if x is not None and not isinstance(x, _torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    try:
        if b is None:
            check_features(a, "a")
        else:
            check_pair(a, b)
    except (TypeError, ValueError) as error:
        extent = max((*a.shape, *(() if b is None else b.shape)), default=0)
        refusal = f"{type(error).__name__}: {error}"
        return BackendChoice(backend, a.device, a.dtype, form, extent, None, {}, refusal)
    extent = max((*a.shape, *(() if b is None else b.shape)), default=0)
    return _choose(backend, a.device, a.dtype, form, extent)


def check_backend_name(name: object) -> str:
    """The ``backend=`` option: ``"auto"`` or a registered backend's name (checked where it is
    given, e.g. a module's constructor); raises ``TypeError`` / ``ValueError``."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {tuple(BACKENDS)}, got {name!r}")
    return name


def _most_general() -> str:
    """``auto``'s last resort: the auto backend tried last (torch), for a call none of the candidates
    declares (another device type, or every candidate refuses it); its own checks then say why."""
    return [n for n, b in BACKENDS.items() if b.auto_devices][-1]


def _choose(
    name: str, device: Device, dtype: DType, form: str, extent: Optional[int], every: bool = True
) -> BackendChoice:
    """The choice; ``every=False`` probes only what the choice needs (a call's hot path: probes may
    look for files, which a compiled graph must not do)."""
    reasons: dict[str, list[Unsupported]] = {}

    def why_not(other: str) -> list[Unsupported]:
        if other not in reasons:
            reasons[other] = BACKENDS[other].unsupported(device, dtype, form, extent)
        return reasons[other]

    chosen: Optional[str]
    if name == "auto":
        candidates = [n for n, b in BACKENDS.items() if device.type in b.auto_devices]
        chosen = next((n for n in candidates if not why_not(n)), None) or _most_general()
    else:
        chosen = None if why_not(name) else name
    if every:
        for other in BACKENDS:
            why_not(other)
    return BackendChoice(name, device, dtype, form, extent, chosen, reasons)


#: successful resolutions without an extent: (name, device, dtype, form, registry version) → primitives
_RESOLVED: dict[tuple, Primitives] = {}


def resolve_backend(
    name: object, device: Device, dtype: DType, form: str = "softmax", extent: Optional[int] = None
) -> Primitives:
    """The primitives to run the ``form`` on ``device`` tensors of ``dtype``; raises if ``name`` cannot.

    They call the backend through the registered ops of :mod:`tilecl.backends.ops`.

    Raises:
        TypeError: ``name`` is not a string, or the backend does not take ``dtype``.
        ValueError: ``name`` is not a known backend, or the call is larger than it takes.
        RuntimeError: the backend cannot run here (not installed or built, wrong device).
    """
    key = (name, device, dtype, form, BACKENDS.version)
    # a known success first: only a registered name was ever kept (the lookup of an unhashable
    # name is left to the check below)
    known = _RESOLVED.get(key) if extent is None and type(name) is str else None
    if known is not None:
        return known
    check_backend_name(name)
    assert isinstance(name, str)
    choice = _choose(name, device, dtype, form, extent, every=False)
    if choice.chosen is not None:
        declared = BACKENDS[choice.chosen].whole_tile
        primitives = RegisteredPrimitives(choice.chosen, None if declared is None else declared())
        if extent is None:
            # the probes answer for the process (a device, a package, a build), so a success is
            # kept until the registry changes; a refusal is worked out again, with every reason
            _RESOLVED[key] = primitives
        return primitives
    choice = _choose(name, device, dtype, form, extent)
    if name == "auto":
        raise RuntimeError(f"no backend can run this call:\n{choice}")
    found = choice.reasons[name]
    # a backend that cannot run here outranks a dtype mistake: fixing the dtype would not help
    kinds = {u.error for u in found}
    error = next(kind for kind in (RuntimeError, TypeError, ValueError) if kind in kinds)
    takers = [other for other, reasons in choice.reasons.items() if not reasons]
    reasons = "; ".join(u.reason for u in found)
    raise error(
        f"backend={name!r} cannot run {dtype} tensors on {device} here: {reasons} "
        f"(backends that can: {', '.join(takers) or 'none'}; tilecl.explain_backend(a, b) says more)"
    )
