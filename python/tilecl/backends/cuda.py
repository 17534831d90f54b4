"""The ``cuda`` and ``cuda-emu`` backends: the CUDA C++ kernels of ``csrc/`` behind the primitives.

* ``cuda`` — the nvcc-built extension ``tilecl._cuda`` on CUDA tensors: compiled for the local GPU
  on first use (:func:`load_extension`, cached), or ahead of time (``TILECL_FORCE_CUDA_BUILD=1``
  at install, ``make cuda`` in a checkout). Launches go on the current stream.
* ``cuda-emu`` — the same kernel source compiled by g++ against the CPU emulation layer
  (``csrc/cuda_emu.h``), on CPU tensors: a verification aid, slow, and how the CUDA kernels run in
  the tests. Built on first use under ``build/cuda-emu/``.

Both take float32, float16 or bfloat16 inputs and return float32 statistics and gradients, with
the contract of :mod:`tilecl.backends.base` (group masking included: the kernels exclude the masked
entries inside their tiles). Every argument is checked here, before a launch: the extension
receives raw pointers and trusts them.

The emulation's settings (:func:`emulation_settings`): the order in which the fibers of a block
run between synchronization points (``"forward"``, ``"reverse"``, ``"shuffled"`` with a seed; the
environment variable ``TILECL_EMU_SCHEDULE`` — ``reverse`` or ``shuffled:SEED`` — sets the default,
read per launch), and whether the 16-bit types take the tensor-core (sm_80+) or the FMA path.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Any, Callable, Iterator, NamedTuple, Optional

import torch

from .. import _cuda_build
from .base import (
    KERNEL_DTYPES,
    Backend,
    Gradients,
    LseStats,
    OffsetTerms,
    Scores,
    SigmoidSweep,
    SigmoidTerms,
    anywhere,
    cuda_visible,
    sweep_of,
)
from .registry import register_backend

__all__ = [
    "DTYPE_CODES",
    "MAX_DIM",
    "CudaKernels",
    "cuda_built",
    "emulation_buildable",
    "emulation_settings",
    "load_extension",
]

#: the kernels' input types (the dtype code the bindings take)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
#: pointer alignment the real extension is given (fresh CUDA allocations are 256-byte aligned)
ALIGNMENT = 16
#: largest N, M or D the kernels take: their 32-bit tile loops (``col0 += 64``) stay below 2^31
MAX_DIM = 2**31 - 64
#: oldest compute capability the kernels are written for (warp-synchronous intrinsics)
MIN_CAPABILITY = (7, 0)
SCHEDULES = ("forward", "reverse", "shuffled")

BUILD_HINT = (
    "it compiles on first use where nvcc is found (set CUDA_HOME or put nvcc on PATH), or build it "
    "ahead of time: TILECL_FORCE_CUDA_BUILD=1 pip install tilecl (TILECL_CUDA_ARCHS selects the GPU "
    "architectures, default 80;90), or `make cuda` in a checkout"
)


def cuda_built() -> bool:
    """Whether ``tilecl._cuda`` is importable (built ahead of time), without importing it."""
    return importlib.util.find_spec("tilecl._cuda") is not None


def cuda_compilable() -> bool:
    """Whether ``tilecl._cuda`` can be compiled here on first use: nvcc and the kernels' sources."""
    return _cuda_build.find_nvcc() is not None and (_cuda_build.CSRC / "bindings.cpp").is_file()


def emulation_buildable() -> Optional[str]:
    """``None`` when the emulation module can be built here, else what is missing."""
    return _cuda_build.emulation_buildable()


@functools.cache
def load_extension() -> Any:
    """The ``tilecl._cuda`` module: built ahead of time, else compiled now for this GPU's architecture
    (once: cached); a clear error saying how to build it when neither can be had."""
    if cuda_built():
        from tilecl import _cuda  # type: ignore[attr-defined]

        return _cuda
    if not cuda_compilable() or not torch.cuda.is_available():
        raise RuntimeError(f"backend='cuda': the CUDA extension tilecl._cuda is not built; {BUILD_HINT}")
    major, minor = torch.cuda.get_device_capability()
    return _cuda_build.load_library(_cuda_build.build_extension_jit(10 * major + minor), "tilecl._cuda")


def _operand(x: torch.Tensor, aligned: bool) -> torch.Tensor:
    """``x`` with a unit column stride (and, for the GPU, a 16-byte aligned start), copying only if needed."""
    if x.stride(1) != 1 or x.stride(0) < x.shape[1] or (aligned and x.data_ptr() % ALIGNMENT):
        x = x.clone(memory_format=torch.contiguous_format)
    return x


def _check_inputs(a: torch.Tensor, b: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    want = "cuda" if backend == "cuda" else "cpu"
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"backend={backend!r}: {name} must be a 2-D tensor")
        if x.dtype not in DTYPE_CODES:
            raise TypeError(
                f"backend={backend!r} supports float32, float16 and bfloat16 inputs, got "
                f"{name}.dtype={x.dtype}; use backend='torch' for float64"
            )
        if x.device.type != want:
            kind = "CUDA" if want == "cuda" else "CPU"
            raise RuntimeError(f"backend={backend!r} needs {kind} tensors, got {name} on {x.device}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"backend={backend!r}: {name} is empty (shape {tuple(x.shape)})")
        if x.shape[0] > MAX_DIM or x.shape[1] > MAX_DIM:
            raise ValueError(
                f"backend={backend!r}: {name} has shape {tuple(x.shape)}; the kernels take at most "
                f"2^31 - 64 = {MAX_DIM} rows and features"
            )
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(
            f"backend={backend!r}: a and b must share dtype and device, got {a.dtype}/{a.device} "
            f"and {b.dtype}/{b.device}"
        )
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"backend={backend!r}: a and b must have the same feature dimension, got "
            f"{a.shape[1]} and {b.shape[1]}"
        )
    aligned = backend == "cuda"
    return _operand(a, aligned), _operand(b, aligned)


def _vector(x: torch.Tensor, name: str, length: int, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.shape[0] != length:
        raise ValueError(
            f"{name} must be a 1-D tensor of length {length}, got {getattr(x, 'shape', type(x))}"
        )
    return x.to(device=like.device, dtype=dtype).contiguous()


def _group_mask(scores: Scores, n: int, m: int, like: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
    """``row_groups``, ``col_groups``, ``kept_cols`` as contiguous int64 on ``like``'s device (the
    caller holds them across the launch), or three ``None`` when ``scores`` is not masked."""
    if not scores.masked:
        return None, None, None
    lengths = {"row_groups": n, "col_groups": m, "kept_cols": n}
    if any(getattr(scores, name) is None for name in lengths):
        raise ValueError("group masking needs row_groups, col_groups and kept_cols together")
    return tuple(
        _vector(getattr(scores, name), name, size, like, torch.int64) for name, size in lengths.items()
    )


def _addresses(*tensors: Optional[torch.Tensor]) -> list[int]:
    """``data_ptr()`` of each tensor, 0 (no array) for ``None``."""
    return [0 if x is None else x.data_ptr() for x in tensors]


def _scale(scale: Any, backend: str) -> float:
    value = float(scale)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"backend={backend!r}: scale must be finite, got {value}")
    return value


def _built_archs(module: Any) -> Optional[list[tuple[int, int]]]:
    """The compute capabilities the extension holds code for (its ``ARCHS``, e.g. ``"80,90"``)."""
    spec = getattr(module, "ARCHS", None)
    if not spec:
        return None
    return [(int(a) // 10, int(a) % 10) for a in str(spec).split(",") if a.strip()]


def runs_on(capability: tuple[int, int], archs: Optional[list[tuple[int, int]]]) -> bool:
    """Whether an extension built for ``archs`` runs on a device of ``capability``.

    SASS for ``(major, minor)`` runs on the same major with an equal or newer minor; the PTX of the
    newest arch (always embedded) JIT-compiles for any newer device. Unknown archs: ``>= (7, 0)``.
    """
    if archs is None:
        return tuple(capability) >= MIN_CAPABILITY
    major, minor = capability
    sass = any(a_major == major and a_minor <= minor for a_major, a_minor in archs)
    return sass or tuple(capability) >= max(archs)


@functools.cache
def _check_capability(index: int, module: Any) -> None:
    major, minor = torch.cuda.get_device_capability(index)
    capability = (major, minor)
    archs = _built_archs(module)
    if not runs_on(capability, archs):
        built = ", ".join(f"sm_{a}{b}" for a, b in archs) if archs else "unknown"
        raise RuntimeError(
            f"backend='cuda': tilecl._cuda was built for {built}, which cannot run on cuda:{index} "
            f"(compute capability {capability[0]}.{capability[1]}); rebuild it for this GPU with "
            f"TILECL_CUDA_ARCHS={capability[0]}{capability[1]} make cuda"
        )


def _check_device(device: torch.device, backend: str, module: Any) -> None:
    if backend == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        _check_capability(index, module)


# --------------------------------------------------------------------------- emulation settings

_EMU_SETTINGS: dict[str, Any] = {"schedule": None, "seed": 0, "tensor_cores": True}


def _parse_schedule(spec: str) -> tuple[str, int]:
    order, _, seed = spec.partition(":")
    if order not in SCHEDULES or (seed and not seed.isdigit()):
        raise ValueError(f"emulation schedule must be one of {SCHEDULES} (shuffled:SEED), got {spec!r}")
    return order, int(seed or 0)


def _emulation_schedule() -> tuple[str, int]:
    if _EMU_SETTINGS["schedule"] is not None:
        return _EMU_SETTINGS["schedule"], _EMU_SETTINGS["seed"]
    return _parse_schedule(os.environ.get("TILECL_EMU_SCHEDULE", "forward") or "forward")


@contextlib.contextmanager
def emulation_settings(
    schedule: Optional[str] = None, seed: int = 0, tensor_cores: Optional[bool] = None
) -> Iterator[None]:
    """Settings of the ``cuda-emu`` launches inside the ``with`` block (process-wide, not thread-safe).

    ``schedule``: the order in which the fibers of a block run between synchronization points —
    ``"forward"`` (thread 0 first; the default), ``"reverse"`` (the last thread first) or
    ``"shuffled"`` (a fresh permutation each round, from ``seed``). A kernel whose result depends
    on the order has a race (typically a missing ``__syncthreads()``). ``tensor_cores=False`` runs
    the FMA path the 16-bit types take below sm_80 (a second emulation module, built on first use).
    """
    if schedule is not None:
        _parse_schedule(schedule)
    saved = dict(_EMU_SETTINGS)
    if schedule is not None:
        _EMU_SETTINGS.update(schedule=schedule, seed=int(seed))
    if tensor_cores is not None:
        _EMU_SETTINGS["tensor_cores"] = bool(tensor_cores)
    try:
        yield
    finally:
        _EMU_SETTINGS.clear()
        _EMU_SETTINGS.update(saved)


def _emulation_module() -> Any:
    """The emulation module of the current settings, its schedule set for the next launch."""
    module = _cuda_build.load_emulation(_EMU_SETTINGS["tensor_cores"])
    module.set_schedule(*_emulation_schedule())
    return module


#: most row groups (and column splits) of the statistics kernel: its partials take
#: ``parts · (3·N + 2·col_count)`` floats; the emulation's few parts still give a group several blocks
STATS_PARTS = {"cuda": 32, "cuda-emu": 2}


def _stream(device: torch.device, backend: str) -> int:
    return torch.cuda.current_stream(device).cuda_stream if backend == "cuda" else 0


class CudaKernels:
    """The primitives over the kernels of ``csrc/``: ``"cuda"`` (the nvcc extension on CUDA
    tensors) or ``"cuda-emu"`` (the g++ emulation on CPU tensors). Float32 statistics and gradients."""

    def __init__(self, backend: str) -> None:
        if backend not in ("cuda", "cuda-emu"):
            raise ValueError(f"backend must be 'cuda' or 'cuda-emu', got {backend!r}")
        self.backend = backend
        # fail when the backend is loaded, before any launch, if the module cannot be had
        self.module()
        launches: dict[str, Callable[..., Any]] = {
            "softmax": self._launch_backward,
            "sigmoid": self._launch_sigmoid,
        }
        self._sweeps = sweep_of(launches, rescale_16bit=True)

    def module(self) -> Any:
        return load_extension() if self.backend == "cuda" else _emulation_module()

    def lse_stats(self, scores: Scores, targets: torch.Tensor, col_count: int, parts: int = 0) -> LseStats:
        """:class:`~tilecl.backends.base.LseStats` in float32; ``0 <= col_count <= M``.

        One computation of each tile of ``S`` for both statistics: ``S`` is cut into at most
        ``parts`` row groups × ``parts`` column splits (default :data:`STATS_PARTS`), whose
        partial statistics are merged in a fixed order.
        """
        backend = self.backend
        a, b = _check_inputs(scores.a, scores.b, backend)
        n, m, d = a.shape[0], b.shape[0], a.shape[1]
        if not 0 <= int(col_count) <= m:
            raise ValueError(f"col_count must be in [0, {m}], got {col_count}")
        # the callers validate labels; a target outside [0, M) is never read past (its positive is 0)
        targets = _vector(targets, "targets", n, a, torch.int64)
        mask = _group_mask(scores, n, m, a)
        s = _scale(scores.scale, backend)
        module = self.module()
        _check_device(a.device, backend, module)
        f32: dict[str, Any] = dict(dtype=torch.float32, device=a.device)
        row_lse, row_low, positive = torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n, **f32)
        col_lse, col_low = torch.empty(int(col_count), **f32), torch.empty(int(col_count), **f32)
        parts = parts or STATS_PARTS[backend]
        code = DTYPE_CODES[a.dtype]
        workspace = torch.empty(module.lse_workspace_floats(code, n, m, int(col_count), parts), **f32)
        with _device_guard(a.device, backend):
            module.lse_stats(
                code, a.data_ptr(), b.data_ptr(), targets.data_ptr(), row_lse.data_ptr(), col_lse.data_ptr(),
                positive.data_ptr(), s, n, m, d, a.stride(0), b.stride(0), int(col_count),
                scores.exclude_diagonal, *_addresses(*mask), workspace.data_ptr(), parts,
                *_addresses(row_low, col_low), _stream(a.device, backend),
            )  # fmt: skip
        return LseStats(row_lse, col_lse, positive, row_low, col_low)

    def _sweep(self, scores: Scores, a: torch.Tensor, b: torch.Tensor, with_grads: bool) -> _Sweep:
        """What every form's sweep takes (the module's ``SweepArgs``) and the outputs it fills.

        ``a`` and ``b``: ``scores``' operands as :func:`_check_inputs` returned them; without
        gradients no gradient outputs are allocated (their addresses are 0).
        """
        backend = self.backend
        n, m, d = a.shape[0], b.shape[0], a.shape[1]
        mask = _group_mask(scores, n, m, a)
        s = _scale(scores.scale, backend)
        module = self.module()
        _check_device(a.device, backend, module)
        code = DTYPE_CODES[a.dtype]
        f32: dict[str, Any] = dict(dtype=torch.float32, device=a.device)
        grads: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        if with_grads:
            grads = (torch.empty(n, d, **f32), torch.empty(m, d, **f32), torch.empty((), **f32))
        workspace = torch.empty(module.workspace_floats(code, n, d), **f32)
        args = module.SweepArgs(
            a.data_ptr(), b.data_ptr(), s, n, m, d, a.stride(0), b.stride(0), scores.exclude_diagonal,
            *_addresses(*mask), *_addresses(*(grads or (None, None, None))), workspace.data_ptr(),
            _stream(a.device, backend),
        )  # fmt: skip
        return _Sweep(module, code, args, grads, (a, b, *mask, workspace))

    def sweep(self, scores: Scores, terms: Any, with_grads: bool = True) -> Any:
        """The gradient kernels in the form of ``terms`` (float16 multipliers rescaled around 1 first)."""
        return self._sweeps(scores, terms, with_grads)

    def _launch_sigmoid(self, scores: Scores, terms: SigmoidTerms, with_grads: bool) -> SigmoidSweep:
        """:class:`~tilecl.backends.base.SigmoidSweep` in float32. Without gradients one ``S`` pass
        (the row kernel alone); with them the row and column kernels (4 passes, no float atomics)."""
        a, b = _check_inputs(scores.a, scores.b, self.backend)
        n, m = a.shape[0], b.shape[0]
        weights = _vector(terms.row_weights, "row_weights", n, a, torch.float32)
        row_keys = _vector(terms.row_keys, "row_keys", n, a, torch.int64)
        col_keys = _vector(terms.col_keys, "col_keys", m, a, torch.int64)
        bias = float(terms.bias)
        sweep = self._sweep(scores, a, b, with_grads)
        f32: dict[str, Any] = dict(dtype=torch.float32, device=a.device)
        row_loss, grad_bias = torch.empty(n, **f32), torch.empty((), **f32)
        form = sweep.module.SigmoidForm(
            bias, *_addresses(row_keys, col_keys, weights, row_loss, grad_bias), with_grads
        )
        with _device_guard(a.device, self.backend):
            sweep.module.sweep(sweep.code, sweep.args, form)
        if sweep.grads is None:
            return SigmoidSweep(row_loss, *(torch.empty(0, **f32) for _ in range(4)))
        return SigmoidSweep(row_loss, *sweep.grads, grad_bias)

    def _launch_backward(self, scores: Scores, terms: OffsetTerms, with_grads: bool = True) -> Gradients:
        """:class:`~tilecl.backends.base.Gradients` in float32: the offset form."""
        a, b = _check_inputs(scores.a, scores.b, self.backend)
        n, m = a.shape[0], b.shape[0]
        row_offset, row_mult, col_offset, col_mult, positive_cols, positive_mult = terms
        k = col_offset.shape[0] if isinstance(col_offset, torch.Tensor) and col_offset.dim() == 1 else -1
        if not 0 <= k <= m:
            raise ValueError(f"col_offset must be a 1-D tensor of at most {m} entries")
        c = _vector(row_offset, "row_offset", n, a, torch.float32)
        g = _vector(row_mult, "row_mult", n, a, torch.float32)
        r = _vector(col_offset, "col_offset", k, a, torch.float32)
        h = _vector(col_mult, "col_mult", k, a, torch.float32)
        t = p = None  # no positive terms: null pointers, which the epilogue reads as none
        if positive_cols is not None and positive_mult is not None:
            t = _vector(positive_cols, "positive_cols", n, a, torch.int64)
            p = _vector(positive_mult, "positive_mult", n, a, torch.float32)
        sweep = self._sweep(scores, a, b, with_grads=True)
        form = sweep.module.OffsetForm(*_addresses(c, g, r, h), k, *_addresses(t, p))
        with _device_guard(a.device, self.backend):
            sweep.module.sweep(sweep.code, sweep.args, form)
        assert sweep.grads is not None
        return Gradients(*sweep.grads)


class _Sweep(NamedTuple):
    """One gradient sweep's common part: the module, dtype code and ``SweepArgs`` to launch with,
    the gradient outputs (``None`` without gradients) and the tensors the addresses point into,
    held until the launch is done."""

    module: Any
    code: int
    args: Any
    grads: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    held: tuple[Optional[torch.Tensor], ...]


def _device_guard(device: torch.device, backend: str):
    return torch.cuda.device(device) if backend == "cuda" else contextlib.nullcontext()


def _cuda_missing() -> Optional[str]:
    if not cuda_built() and not cuda_compilable():
        return f"the CUDA C++ extension tilecl._cuda is not built and cannot be compiled here; {BUILD_HINT}"
    return None


def _emulation_missing() -> Optional[str]:
    missing = emulation_buildable()
    if missing is not None:
        return f"the CUDA emulation module cannot be built here: {missing}"
    return None


@functools.cache
def _kernels(backend: str) -> CudaKernels:
    return CudaKernels(backend)


#: the kernels' tile of S (rows, columns, features): csrc/kernel_traits.h
KERNEL_TILE = (64, 64, 32)

CUDA = register_backend(
    Backend(
        "cuda",
        KERNEL_DTYPES,
        {"cuda": cuda_visible},
        _cuda_missing,
        lambda: _kernels("cuda"),
        max_extent=MAX_DIM,
        auto_devices=("cuda",),
        preference=20,
        tiles={"cuda": KERNEL_TILE},
    )
)
CUDA_EMULATION = register_backend(
    Backend(
        "cuda-emu",
        KERNEL_DTYPES,
        {"cpu": anywhere},
        _emulation_missing,
        lambda: _kernels("cuda-emu"),
        max_extent=MAX_DIM,
        preference=30,
        tiles={"cpu": KERNEL_TILE},
        emulated_on=("cpu",),
    )
)
