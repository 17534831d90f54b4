"""The primitives as registered custom ops ``tilecl::<primitive>``, generated from one schema table.

``torch.compile`` sees each primitive as one opaque op with an exact fake
(meta) implementation, so a loss traces without graph breaks however
data-dependent the kernel behind it is (the torch backend's tile loop, the
Triton launch, the CUDA extension), and a loss runs on ``meta`` / fake
tensors (shapes and dtypes, no data). Autograd is not registered on the ops:
the losses' autograd Functions (:mod:`tilecl.function`, :mod:`tilecl.sigmoid`,
:mod:`tilecl.modality`, :mod:`tilecl.distill`'s ``DistillFunction``,
:mod:`tilecl.ranking`'s ``RankingFunction``) call them under ``no_grad`` in
their forward and backward.

Every op takes the backend's name, then :class:`~tilecl.backends.base.Scores`
field by field, then the primitive's own arguments (a form's terms type, field
by field, and its options), and returns the primitive's result type field by
field. :data:`SCHEMAS` holds one row per primitive; the ops, their fakes and
:class:`RegisteredPrimitives` are made from it, so a new form adds one row
(its terms type, result type and output shapes) and nothing else here. The
schemas, as :func:`schema` writes them::

    tilecl::lse_stats(str backend, <Scores>, Tensor targets, SymInt col_count)
        -> (Tensor row_lse, Tensor col_lse, Tensor positive)
    tilecl::offset_backward(str backend, <Scores>, Tensor row_offset, Tensor row_mult,
                            Tensor col_offset, Tensor col_mult, Tensor? positive_cols,
                            Tensor? positive_mult)
        -> (Tensor grad_a, Tensor grad_b, Tensor grad_scale)
    tilecl::sigmoid_sweep(str backend, <Scores>, Tensor bias, Tensor row_keys, Tensor col_keys,
                          Tensor row_weights, bool with_grads)
        -> (Tensor row_loss, Tensor grad_a, Tensor grad_b, Tensor grad_scale, Tensor grad_bias)

with ``<Scores>`` = ``Tensor a, Tensor b, Tensor scale, bool exclude_diagonal,
Tensor? row_groups, Tensor? col_groups, Tensor? kept_cols, bool shared_operands``.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..validation import reads_values
from .base import (
    Gradients,
    LseStats,
    OffsetTerms,
    Scores,
    SigmoidSweep,
    SigmoidTerms,
)
from .registry import BACKENDS

__all__ = [
    "NAMESPACE",
    "OPS",
    "SCHEMAS",
    "OpSchema",
    "RegisteredPrimitives",
    "fields_schema",
    "lse_stats_op",
    "offset_backward_op",
    "schema",
    "sigmoid_sweep_op",
]

NAMESPACE = "tilecl"

#: an argument's Python type → its op schema type
_SCHEMA_TYPES: dict[Any, str] = {Tensor: "Tensor", Optional[Tensor]: "Tensor?", bool: "bool", int: "SymInt"}


def fields_schema(kind: type) -> str:
    """A NamedTuple's fields as op arguments, from its annotations (``Tensor row_offset, Tensor?
    positive_cols, ...``): the schema is never a hand copy of the fields."""
    hints = typing.get_type_hints(kind)
    return ", ".join(f"{_SCHEMA_TYPES[hints[field]]} {field}" for field in kind._fields)  # type: ignore[attr-defined]


#: Scores' fields as op arguments
_SCORES = fields_schema(Scores)
_SCORES_FIELDS = len(Scores._fields)


@dataclasses.dataclass(frozen=True)
class OpSchema:
    """One primitive as an op.

    Attributes:
        name: the :class:`~tilecl.backends.base.Primitives` method and the op's name.
        terms: the form's argument type (a NamedTuple of tensors), passed to the
            method as one argument; ``None`` when the method takes its tensors
            directly (``lse_stats``).
        options: the op schema of the method's arguments after the scores
            and the terms (all of them for ``lse_stats``).
        result: the method's result type (a NamedTuple of tensors).
        fake: ``(accumulation dtype, scores, *arguments) -> result``, the
            output shapes without data.
    """

    name: str
    terms: Optional[type]
    options: str
    result: type
    fake: Callable[..., tuple]

    @property
    def arguments(self) -> str:
        """The op schema of the method's arguments after the scores: the terms' fields, then the options."""
        terms = [] if self.terms is None else [fields_schema(self.terms)]
        return ", ".join(terms + ([self.options] if self.options else []))

    @property
    def term_count(self) -> int:
        return 0 if self.terms is None else len(self.terms._fields)  # type: ignore[attr-defined]


def _empty(like: Tensor, shape: Any, dtype: torch.dtype) -> Tensor:
    return like.new_empty(shape, dtype=dtype)


def _lse_stats_fake(acc: torch.dtype, scores: Scores, targets: Tensor, col_count: int) -> tuple:
    n = scores.a.shape[0]
    return _empty(scores.a, n, acc), _empty(scores.a, col_count, acc), _empty(scores.a, n, acc)


def _offset_backward_fake(acc: torch.dtype, scores: Scores, *terms: Tensor) -> tuple:
    a, b = scores.a, scores.b
    return _empty(a, a.shape, acc), _empty(b, b.shape, acc), _empty(a, (), acc)


def _sigmoid_sweep_fake(acc: torch.dtype, scores: Scores, *terms_and_options: Any) -> tuple:
    a, b, with_grads = scores.a, scores.b, terms_and_options[-1]
    row_loss = _empty(a, a.shape[0], acc)
    if not with_grads:
        return (row_loss, *(_empty(a, 0, acc) for _ in range(4)))
    return row_loss, _empty(a, a.shape, acc), _empty(b, b.shape, acc), _empty(a, (), acc), _empty(a, (), acc)


#: one row per primitive: the ops below are generated from it
SCHEMAS = (
    OpSchema("lse_stats", None, "Tensor targets, SymInt col_count", LseStats, _lse_stats_fake),
    OpSchema("offset_backward", OffsetTerms, "", Gradients, _offset_backward_fake),
    OpSchema(
        "sigmoid_sweep",
        SigmoidTerms,
        "bool with_grads",
        SigmoidSweep,
        _sigmoid_sweep_fake,
    ),
)


def schema(entry: OpSchema) -> str:
    """The op's schema string (without the namespace and name)."""
    returns = ", ".join(f"Tensor {field}" for field in entry.result._fields)  # type: ignore[attr-defined]
    return f"(str backend, {_SCORES}, {entry.arguments}) -> ({returns})"


def _method_arguments(entry: OpSchema, rest: tuple) -> tuple:
    """The op's arguments after the scores, as the primitive method takes them."""
    if entry.terms is None:
        return rest
    return (entry.terms(*rest[: entry.term_count]), *rest[entry.term_count :])


def _fresh(x: Tensor, inputs: tuple) -> Tensor:
    # a custom op's outputs may not alias its inputs (an oracle's float64 result can be its float64 input)
    tensors = [t for t in inputs if isinstance(t, Tensor) and t.numel()]
    return x.clone() if any(x.data_ptr() == t.data_ptr() for t in tensors) else x


def _make_op(entry: OpSchema) -> Any:
    def run(backend: str, *args: Any) -> tuple:
        scores, rest = Scores(*args[:_SCORES_FIELDS]), args[_SCORES_FIELDS:]
        primitive = getattr(BACKENDS[backend].load(), entry.name)
        result = primitive(scores, *_method_arguments(entry, rest))
        return tuple(_fresh(x, args) for x in result)

    def fake(backend: str, *args: Any) -> tuple:
        scores, rest = Scores(*args[:_SCORES_FIELDS]), args[_SCORES_FIELDS:]
        return entry.fake(BACKENDS[backend].result_dtype(scores.a.dtype), scores, *rest)

    run.__name__ = fake.__name__ = entry.name
    run.__doc__ = f"``backend``'s ``{entry.name}``: the fields of :class:`{entry.result.__name__}`."
    op = torch.library.custom_op(f"{NAMESPACE}::{entry.name}", run, mutates_args=(), schema=schema(entry))
    op.register_fake(fake)
    return op


#: every registered op, in :data:`SCHEMAS` order (for ``torch.library.opcheck`` and the docs)
OPS = tuple(_make_op(entry) for entry in SCHEMAS)
lse_stats_op, offset_backward_op, sigmoid_sweep_op = OPS


def _call(name: str, op: Any, result: type, backend: str, scores: Scores, *arguments: Any) -> Any:
    if reads_values(scores.a):
        # plain eager tensors: the op would only add its dispatch, tens of microseconds per call,
        # which is a small batch's whole budget; compiled, fake or meta calls take the op
        return getattr(BACKENDS[backend].load(), name)(scores, *arguments)
    flat: list[Any] = []
    for argument in arguments:
        flat.extend(argument if isinstance(argument, tuple) else (argument,))
    return result(*op(backend, *scores, *flat))


@dataclasses.dataclass(frozen=True)
class RegisteredPrimitives:
    """The :class:`~tilecl.backends.base.Primitives` of backend ``name``, through the registered ops."""

    name: str

    def lse_stats(self, scores: Scores, targets: Tensor, col_count: int) -> LseStats:
        result: LseStats = _call("lse_stats", lse_stats_op, LseStats, self.name, scores, targets, col_count)
        return result

    def offset_backward(self, scores: Scores, terms: OffsetTerms) -> Gradients:
        result: Gradients = _call("offset_backward", offset_backward_op, Gradients, self.name, scores, terms)
        return result

    def sigmoid_sweep(self, scores: Scores, terms: SigmoidTerms, with_grads: bool) -> SigmoidSweep:
        op = sigmoid_sweep_op
        result: SigmoidSweep = _call("sigmoid_sweep", op, SigmoidSweep, self.name, scores, terms, with_grads)
        return result
