"""The two primitives as registered custom ops, ``tilecl::lse_stats`` and ``tilecl::offset_backward``.

``torch.compile`` sees each primitive as one opaque op with an exact fake
(meta) implementation, so a loss traces without graph breaks however
data-dependent the kernel behind it is (the torch backend's tile loop, the
Triton launch, the CUDA extension), and a loss runs on ``meta`` / fake
tensors (the shapes and dtypes below, no data). Autograd is not registered on
the ops: the losses' autograd Functions (:mod:`tilecl.function`,
:mod:`tilecl.modality`) call them under ``no_grad`` in their forward and
backward, so there is still one Function over two primitives.

The backend is the op's first argument, a string: one op per primitive serves
every backend, and the compiled graph names the one it runs.

``Tensor? row_groups, Tensor? col_groups, Tensor? kept_cols, bool shared_operands``
after ``exclude_diagonal`` are :class:`~tilecl.backends.base.Scores`' group mask
(``None``: no masking) and its ``a is b`` flag. Schemas::

    tilecl::lse_stats(str backend, Tensor a, Tensor b, Tensor scale, bool exclude_diagonal,
                      Tensor? row_groups, Tensor? col_groups, Tensor? kept_cols, bool shared_operands,
                      Tensor targets, SymInt col_count) -> (Tensor row_lse, Tensor col_lse, Tensor positive)
    tilecl::offset_backward(str backend, Tensor a, Tensor b, Tensor scale, bool exclude_diagonal,
                            Tensor? row_groups, Tensor? col_groups, Tensor? kept_cols, bool shared_operands,
                            Tensor row_offset, Tensor row_mult, Tensor col_offset, Tensor col_mult)
                            -> (Tensor grad_a, Tensor grad_b, Tensor grad_scale)
    tilecl::sigmoid_sweep(str backend, Tensor a, Tensor b, Tensor scale, bool exclude_diagonal,
                          Tensor? row_groups, Tensor? col_groups, Tensor? kept_cols, bool shared_operands,
                          Tensor bias, Tensor row_keys, Tensor col_keys, Tensor row_weights,
                          bool with_grads)
                          -> (Tensor row_loss, Tensor grad_a, Tensor grad_b, Tensor grad_scale,
                              Tensor grad_bias)
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor

from .base import (
    Gradients,
    LseStats,
    OffsetTerms,
    Primitives,
    Scores,
    SigmoidSweep,
    SigmoidTerms,
    accumulation_dtype,
)

__all__ = ["NAMESPACE", "OPS", "RegisteredPrimitives", "result_dtype", "sigmoid_sweep_op"]

NAMESPACE = "tilecl"

#: the backend implementations behind the ops, by name (filled by the registry)
_IMPLEMENTATIONS: dict[str, Callable[[], Primitives]] = {}


def register_implementation(name: str, load: Callable[[], Primitives]) -> None:
    """Make ``backend=name`` of the ops run the primitives ``load()`` returns."""
    _IMPLEMENTATIONS[name] = load


def result_dtype(backend: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of a backend's statistics and gradients for inputs of ``dtype``.

    The reference oracle answers in float64 whatever the input; every other
    backend accumulates float64 in float64 and anything else in float32.
    """
    return torch.float64 if backend == "reference" else accumulation_dtype(dtype)


def _fresh(x: Tensor, inputs: tuple[Tensor, ...]) -> Tensor:
    # a custom op's outputs may not alias its inputs (an oracle's float64 result can be its float64 input)
    return x.clone() if any(x.data_ptr() == t.data_ptr() for t in inputs if t.numel()) else x


@torch.library.custom_op(f"{NAMESPACE}::lse_stats", mutates_args=())
def lse_stats_op(
    backend: str,
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    exclude_diagonal: bool,
    row_groups: Optional[Tensor],
    col_groups: Optional[Tensor],
    kept_cols: Optional[Tensor],
    shared_operands: bool,
    targets: Tensor,
    col_count: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``backend``'s ``lse_stats``: ``(row_lse (N,), col_lse (col_count,), positive (N,))``."""
    scores = Scores(a, b, scale, exclude_diagonal, row_groups, col_groups, kept_cols, shared_operands)
    stats = _IMPLEMENTATIONS[backend]().lse_stats(scores, targets, col_count)
    row_lse, col_lse, positive = (_fresh(x, (a, b, scale, targets)) for x in stats)
    return row_lse, col_lse, positive


@lse_stats_op.register_fake
def _lse_stats_fake(
    backend: str,
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    exclude_diagonal: bool,
    row_groups: Optional[Tensor],
    col_groups: Optional[Tensor],
    kept_cols: Optional[Tensor],
    shared_operands: bool,
    targets: Tensor,
    col_count: int,
) -> tuple[Tensor, Tensor, Tensor]:
    acc = result_dtype(backend, a.dtype)
    n = a.shape[0]
    return a.new_empty(n, dtype=acc), a.new_empty(col_count, dtype=acc), a.new_empty(n, dtype=acc)


@torch.library.custom_op(f"{NAMESPACE}::offset_backward", mutates_args=())
def offset_backward_op(
    backend: str,
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    exclude_diagonal: bool,
    row_groups: Optional[Tensor],
    col_groups: Optional[Tensor],
    kept_cols: Optional[Tensor],
    shared_operands: bool,
    row_offset: Tensor,
    row_mult: Tensor,
    col_offset: Tensor,
    col_mult: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """``backend``'s ``offset_backward``: ``(grad_a (N, D), grad_b (M, D), grad_scale ())``."""
    scores = Scores(a, b, scale, exclude_diagonal, row_groups, col_groups, kept_cols, shared_operands)
    terms = OffsetTerms(row_offset, row_mult, col_offset, col_mult)
    grads = _IMPLEMENTATIONS[backend]().offset_backward(scores, terms)
    inputs = (a, b, scale, row_offset, row_mult, col_offset, col_mult)
    grad_a, grad_b, grad_scale = (_fresh(x, inputs) for x in grads)
    return grad_a, grad_b, grad_scale


@offset_backward_op.register_fake
def _offset_backward_fake(
    backend: str,
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    exclude_diagonal: bool,
    row_groups: Optional[Tensor],
    col_groups: Optional[Tensor],
    kept_cols: Optional[Tensor],
    shared_operands: bool,
    row_offset: Tensor,
    row_mult: Tensor,
    col_offset: Tensor,
    col_mult: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    acc = result_dtype(backend, a.dtype)
    return a.new_empty(a.shape, dtype=acc), b.new_empty(b.shape, dtype=acc), a.new_empty((), dtype=acc)


@torch.library.custom_op(f"{NAMESPACE}::sigmoid_sweep", mutates_args=())
def sigmoid_sweep_op(
    backend: str,
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    exclude_diagonal: bool,
    row_groups: Optional[Tensor],
    col_groups: Optional[Tensor],
    kept_cols: Optional[Tensor],
    shared_operands: bool,
    bias: Tensor,
    row_keys: Tensor,
    col_keys: Tensor,
    row_weights: Tensor,
    with_grads: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``backend``'s ``sigmoid_sweep``: ``(row_loss (N,), grad_a, grad_b, grad_scale, grad_bias)``."""
    scores = Scores(a, b, scale, exclude_diagonal, row_groups, col_groups, kept_cols, shared_operands)
    terms = SigmoidTerms(bias, row_keys, col_keys, row_weights)
    sweep = _IMPLEMENTATIONS[backend]().sigmoid_sweep(scores, terms, with_grads)
    inputs = (a, b, scale, bias, row_keys, col_keys, row_weights)
    row_loss, grad_a, grad_b, grad_scale, grad_bias = (_fresh(x, inputs) for x in sweep)
    return row_loss, grad_a, grad_b, grad_scale, grad_bias


@sigmoid_sweep_op.register_fake
def _sigmoid_sweep_fake(
    backend: str,
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    exclude_diagonal: bool,
    row_groups: Optional[Tensor],
    col_groups: Optional[Tensor],
    kept_cols: Optional[Tensor],
    shared_operands: bool,
    bias: Tensor,
    row_keys: Tensor,
    col_keys: Tensor,
    row_weights: Tensor,
    with_grads: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    acc = result_dtype(backend, a.dtype)
    row_loss = a.new_empty(a.shape[0], dtype=acc)
    if not with_grads:
        return row_loss, *(a.new_empty(0, dtype=acc) for _ in range(4))  # type: ignore[return-value]
    grads = a.new_empty(a.shape, dtype=acc), b.new_empty(b.shape, dtype=acc)
    return row_loss, *grads, a.new_empty((), dtype=acc), a.new_empty((), dtype=acc)


#: every registered op, for ``torch.library.opcheck`` and the docs
OPS = (lse_stats_op, offset_backward_op, sigmoid_sweep_op)


@dataclasses.dataclass(frozen=True)
class RegisteredPrimitives:
    """The :class:`Primitives` of backend ``name``, called through the registered ops."""

    name: str

    def lse_stats(self, scores: Scores, targets: Tensor, col_count: int) -> LseStats:
        return LseStats(*lse_stats_op(self.name, *scores, targets, col_count))

    def offset_backward(self, scores: Scores, terms: OffsetTerms) -> Gradients:
        return Gradients(*offset_backward_op(self.name, *scores, *terms))

    def sigmoid_sweep(self, scores: Scores, terms: SigmoidTerms, with_grads: bool) -> SigmoidSweep:
        return SigmoidSweep(*sigmoid_sweep_op(self.name, *scores, *terms, with_grads))
