"""The test matrix, the input factory and the error rule shared by every test file.

Error rule (as flash-attention's tests): a backend's error against the float64
oracle must be at most ``2×`` the error of naive PyTorch computed in the same
dtype on the same device, plus a small absolute slack relative to the
reference's magnitude.

The matrix: every ``(backend, device, dtype)`` a backend declares
(:data:`tilecl.backends.BACKENDS`). :func:`matrix` yields them all as pytest
params; a combination this machine cannot run carries the backend's own
reason and is skipped by the ``combo`` fixture, never dropped.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterable
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch

from tilecl.backends import BACKENDS, Backend
from tilecl.backends.base import TOLERANCES, Tolerance
from tilecl.testing import oracle as reference

#: the device a backend-independent test runs on: the GPU where there is one
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)
NAMES = ("loss", "grad_a", "grad_b", "grad_scale")
SIGMOID_NAMES = (*NAMES, "grad_bias")


#: the largest shape of the matrix tests on cells that run at full speed
CROSSING = (70, 130, 24)
#: a shape parameter that stands for the cell's :meth:`Combo.crossing_shape` (slow: ``make test`` only)
CROSSING_TILES = pytest.param(None, None, None, id="crossing-tiles", marks=pytest.mark.slow)


@dataclasses.dataclass(frozen=True)
class Combo:
    """One cell of the matrix."""

    backend: str
    device: str
    dtype: torch.dtype

    @property
    def id(self) -> str:
        return f"{self.backend}/{self.device}/{str(self.dtype).removeprefix('torch.')}"

    @property
    def declaration(self) -> Backend:
        return BACKENDS[self.backend]

    @property
    def result_dtype(self) -> torch.dtype:
        """The dtype of the loss and statistics this cell returns (its backend's declaration)."""
        return self.declaration.result_dtype(self.dtype)

    @property
    def tolerance(self) -> Tolerance:
        return self.declaration.tolerances[self.dtype]

    @property
    def emulated(self) -> bool:
        """Whether the cell runs interpreted or emulated (slow: it gets the smallest shapes)."""
        return self.device in self.declaration.emulated_on

    def crossing_shape(self) -> tuple[int, int, int]:
        """``(N, M, D)`` of the matrix's largest case: several tiles with a remainder everywhere.

        An emulated cell (slow) takes the smallest such shape its declared tile allows — one full
        tile and a ragged one in rows and in columns, one full feature chunk and a ragged one —
        every other cell :data:`CROSSING` (2 x 3 CUDA tiles, 5 x 9 interpreter tiles, ragged).
        """
        tile = self.declaration.tiles.get(self.device)
        if tile is None or not self.emulated:
            return CROSSING
        rows, cols, features = tile
        return rows + 3, cols + 5, features + 8

    def reasons(self) -> list[str]:
        return self.declaration.not_supported_reasons(torch.device(self.device), self.dtype)

    def inputs(self, n: int, m: int, d: int, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return make_inputs(n, m, d, dtype=self.dtype, device=self.device, **kw)


#: the primitive-level oracle: the primitive tests compare every backend with it; a whole loss run
#: on it would compare the float64 oracle with the float64 oracle, so loss tests leave it out
ORACLE_BACKEND = "reference"


def matrix(
    dtypes: Iterable[torch.dtype] = (torch.float64, *LOW_PRECISION),
    backends: Optional[Iterable[str]] = None,
    with_oracle: bool = False,
    emulated_slow: bool = False,
) -> list[Any]:
    """Every declared ``(backend, device, dtype)`` among ``dtypes`` (and ``backends``), as pytest params.

    ``with_oracle``: include the :data:`ORACLE_BACKEND`'s cells (the primitive-level tests do).
    ``emulated_slow``: mark the emulated cells ``slow`` (a test whose emulated runs are costly and
    whose kernel paths other fast tests already take).
    """
    wanted = tuple(dtypes)
    params = []
    for name, backend in BACKENDS.items():
        if backends is not None and name not in backends:
            continue
        if name == ORACLE_BACKEND and not with_oracle and backends is None:
            continue
        # meta tensors carry no values to compare: tests/test_compile.py checks their shapes
        for device in (d for d in backend.devices if d != "meta"):
            for dtype in backend.dtypes:
                if dtype in wanted:
                    combo = Combo(name, device, dtype)
                    marks = [pytest.mark.slow] if emulated_slow and combo.emulated else []
                    params.append(pytest.param(combo, id=combo.id, marks=marks))
    return params


def make_inputs(
    n: int,
    m: int,
    d: int,
    dtype: torch.dtype = torch.float64,
    device: Any = DEVICE,
    seed: int = 0,
    spread: float = 1.0,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, D)`` and ``(M, D)`` leaf features, drawn in float64 on the CPU (the same on every device)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=gen, dtype=torch.float64) * spread
    b = torch.randn(m, d, generator=gen, dtype=torch.float64) * spread
    if normalize:
        a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    return a.to(device=device, dtype=dtype).requires_grad_(), b.to(
        device=device, dtype=dtype
    ).requires_grad_()


def host(x: Any) -> np.ndarray:
    """A float64 NumPy copy of a tensor (any device) or array."""
    if isinstance(x, torch.Tensor):
        return x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def run(
    loss_fn: Callable[..., torch.Tensor],
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    grad_output: Optional[torch.Tensor] = None,
    **kw: Any,
) -> tuple[torch.Tensor, ...]:
    """Loss and gradients (a, b, logit_scale) of ``loss_fn`` in the inputs' dtype and device."""
    s = torch.tensor(
        scale,
        dtype=torch.float64 if a.dtype == torch.float64 else torch.float32,
        device=a.device,
        requires_grad=True,
    )
    loss = loss_fn(a, b, s, **kw)
    if grad_output is not None:
        grad_output = grad_output.to(device=a.device, dtype=loss.dtype)
    grads = torch.autograd.grad(loss, (a, b, s), grad_outputs=grad_output)
    return (loss, *grads)


def oracle(
    a: torch.Tensor, b: torch.Tensor, scale: float, grad_output: Optional[torch.Tensor] = None, **kw: Any
) -> tuple[Any, ...]:
    """The float64 NumPy oracle's loss and gradients for the same (rounded) inputs."""
    out = reference.contrastive_loss(
        host(a), host(b), scale, grad_output=None if grad_output is None else host(grad_output), **kw
    )
    return out.loss, out.grad_a, out.grad_b, out.grad_logit_scale


def run_sigmoid(fn, a, b, scale: float, bias: float, grad_output=None, **kw):
    """The sigmoid loss and its gradients (a, b, logit_scale, logit_bias) in the inputs' dtype and device."""
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    s = torch.tensor(scale, dtype=acc, device=a.device, requires_grad=True)
    t = torch.tensor(bias, dtype=acc, device=a.device, requires_grad=True)
    loss = fn(a, b, s, t, **kw)
    if grad_output is not None:
        grad_output = grad_output.to(device=a.device, dtype=loss.dtype)
    return (loss, *torch.autograd.grad(loss, (a, b, s, t), grad_outputs=grad_output))


def sigmoid_oracle(a, b, scale, bias, grad_output=None, **kw):
    """The float64 oracle's sigmoid loss and gradients for the same (rounded) inputs."""
    kw = {k: None if x is None else host(x).astype(int) for k, x in kw.items() if k != "reduction"} | {
        "reduction": kw.get("reduction", "mean")
    }
    out = reference.sigmoid_loss(
        host(a), host(b), scale, bias, grad_output=None if grad_output is None else host(grad_output), **kw
    )
    return out.loss, out.grad_a, out.grad_b, out.grad_logit_scale, out.grad_logit_bias


def extension_in_a_fresh_process(library: Any) -> dict[str, Any]:
    """Import a built ``tilecl._cuda`` from its file in a new Python process; its names, EMULATED, ARCHS.

    A fresh process: no GPU is needed to import it (static cudart loads the driver on the first
    CUDA call), and nothing of this process's imports can stand in for it.
    """
    probe = (
        "import importlib.util, json, sys\n"
        "spec = importlib.util.spec_from_file_location('tilecl._cuda', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(json.dumps({'names': dir(module), 'emulated': module.EMULATED, 'archs': module.ARCHS}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(library)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    info: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return info


def max_error(x: Any, ref: Any) -> float:
    return float(np.max(np.abs(host(x) - host(ref))))


def tolerance(cell: Combo | torch.dtype) -> Tolerance:
    """The error rule of a matrix cell (its backend's declaration), or the default one of a dtype."""
    return cell.tolerance if isinstance(cell, Combo) else TOLERANCES[cell]


def assert_close_by_rule(ours: Any, naive: Any, ref: Any, cell: Combo | torch.dtype, what: str) -> None:
    """``|ours − ref| ≤ factor·|naive − ref| + slack·max|ref|`` (elementwise maxima; the factor and
    slack of the cell's backend for its dtype, ``2`` and the dtype's slack by default)."""
    rule = tolerance(cell)
    scale = float(np.max(np.abs(host(ref)))) + 1e-30
    ours_err = max_error(ours, ref)
    naive_err = max_error(naive, ref)
    bound = rule.factor * naive_err + rule.slack * scale
    assert ours_err <= bound, (
        f"{what}: error {ours_err:.3e} > {rule.factor:g} x naive {naive_err:.3e} "
        f"+ slack {rule.slack:g} ({cell})"
    )


def assert_all_close_by_rule(
    ours: Iterable[Any],
    naive: Iterable[Any],
    ref: Iterable[Any],
    cell: Combo | torch.dtype,
    names: Iterable[str] = NAMES,
) -> None:
    for name, x, y, r in zip(names, ours, naive, ref):
        assert_close_by_rule(x, y, r, cell, name)


def assert_rel(ours: Any, ref: Any, rel: float, what: str, atol: float = 1e-15) -> None:
    """Max error relative to the largest reference entry, plus ``atol``.

    ``atol`` covers results that are tiny only because large terms cancel
    (a saturated softmax minus its one-hot target): pass the terms' magnitude
    times a few eps there.
    """
    scale = float(np.max(np.abs(host(ref))))
    err = max_error(ours, ref)
    assert err <= rel * scale + atol, (
        f"{what}: error {err:.3e} > {rel:.1e} x max|ref| {scale:.3e} + {atol:.1e}"
    )


def round_bf16_like_the_hardware() -> bool:
    """Make the Triton interpreter round float32 → bfloat16 to nearest even, as GPUs do.

    The interpreter (Triton 3.x) truncates (0.015624999 → 0.015564 where a GPU
    gives 0.015625), so the bf16 kernels run on the CPU would be checked against
    a rounding the hardware never does. Its cast is replaced by PyTorch's,
    which rounds to nearest even; ``tests/test_triton_backend.py`` checks the
    cast. Returns whether the interpreter is there to patch (its cast is a
    private function: with another Triton the bf16 cells are the GPU check's to
    settle, ``bench/gpu_check.py``).
    """
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    handle = getattr(interpreter, "TensorHandle", None)
    if builder is None or handle is None or getattr(builder, "_tilecl_bf16_rne", False):
        return builder is not None
    cast_impl, fp_to_fp = builder.cast_impl, builder.create_fp_to_fp

    def to_bf16(src: Any) -> Any:
        bits = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
        return handle(bits.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)

    def rounding_cast(self: Any, src: Any, dst_type: Any) -> Any:
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return to_bf16(src)
        return cast_impl(self, src, dst_type)

    def rounding_fp_to_fp(self: Any, src: Any, dst_type: Any, rounding_mode: Any) -> Any:
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return to_bf16(src)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    builder.cast_impl, builder.create_fp_to_fp = rounding_cast, rounding_fp_to_fp
    builder._tilecl_bf16_rne = True
    return True


#: the Tensor methods that read a value to the host (each stalls an accelerator's stream)
VALUE_READS = ("item", "tolist", "__float__", "__bool__", "__int__")


def count_value_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on (for the test), the name of every value read of a tensor is appended to the list."""
    reads: list[str] = []
    for name in VALUE_READS:
        original = getattr(torch.Tensor, name)

        def counting(
            self: torch.Tensor, *args: Any, _original: Any = original, _name: str = name, **kw: Any
        ) -> Any:
            reads.append(_name)
            return _original(self, *args, **kw)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return reads
