"""The primitives as registered custom ops ``tilecl::<primitive>``, generated from the contract.

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
field by field, then the primitive's own arguments, and returns the result
type field by field. There is one op for the statistics pass and one per
registered :class:`~tilecl.backends.base.Form` (``tilecl::<form>_sweep``: the
form's terms field by field, then ``with_grads``), made from the form's entry
with its fake (:meth:`Form.fake`), so a new form adds nothing here. The
schemas, as :func:`schema` writes them::

    tilecl::lse_stats(str backend, <Scores>, Tensor targets, SymInt col_count)
        -> (Tensor row_lse, Tensor col_lse, Tensor positive, Tensor row_lse_low, Tensor col_lse_low)
    tilecl::softmax_sweep(str backend, <Scores>, Tensor row_offset, Tensor row_mult,
                          Tensor col_offset, Tensor col_mult, Tensor? positive_cols,
                          Tensor? positive_mult, bool with_grads)
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
from .base import FORMS, Form, LseStats, Scores, WholeTile, form_of
from .registry import BACKENDS

__all__ = ["NAMESPACE", "OPS", "SWEEP_OPS", "RegisteredPrimitives", "fields_schema", "lse_stats_op", "schema"]

NAMESPACE = "tilecl"

#: an argument's Python type → its op schema type
_SCHEMA_TYPES: dict[Any, str] = {Tensor: "Tensor", Optional[Tensor]: "Tensor?", bool: "bool", int: "SymInt"}


def fields_schema(kind: type) -> str:
    """A NamedTuple's fields as op arguments, from its annotations (``Tensor row_offset, Tensor?
    positive_cols, ...``): the schema is never a hand copy of the fields."""
    hints = typing.get_type_hints(kind)
    return ", ".join(f"{_SCHEMA_TYPES[hints[field]]} {field}" for field in kind._fields)  # type: ignore[attr-defined]


def _returns(kind: type) -> str:
    return ", ".join(f"Tensor {field}" for field in kind._fields)  # type: ignore[attr-defined]


#: Scores' fields as op arguments
_SCORES = fields_schema(Scores)
_SCORES_FIELDS = len(Scores._fields)


def schema(arguments: str, result: type) -> str:
    """An op's schema string (without the namespace and name): the backend, the scores, ``arguments``."""
    return f"(str backend, {_SCORES}, {arguments}) -> ({_returns(result)})"


def _fresh(result: tuple, inputs: tuple) -> tuple:
    # a custom op's outputs may not alias its inputs (an oracle's float64 result can be its float64 input)
    addresses = {t.data_ptr() for t in inputs if isinstance(t, Tensor) and t.numel()}
    return tuple(x.clone() if x.data_ptr() in addresses else x for x in result)


def _register(name: str, arguments: str, result: type, run: Callable, fake: Callable) -> Any:
    run.__name__ = fake.__name__ = name
    run.__doc__ = f"``backend``'s ``{name}``: the fields of :class:`{result.__name__}`."
    op = torch.library.custom_op(
        f"{NAMESPACE}::{name}", run, mutates_args=(), schema=schema(arguments, result)
    )
    op.register_fake(fake)
    return op


def _lse_stats_op() -> Any:
    def run(backend: str, *args: Any) -> tuple:
        scores, (targets, col_count) = Scores(*args[:_SCORES_FIELDS]), args[_SCORES_FIELDS:]
        return _fresh(BACKENDS[backend].load().lse_stats(scores, targets, col_count), args)

    def fake(backend: str, *args: Any) -> tuple:
        scores, (_, col_count) = Scores(*args[:_SCORES_FIELDS]), args[_SCORES_FIELDS:]
        acc, n = BACKENDS[backend].result_dtype(scores.a.dtype), scores.a.shape[0]
        return tuple(scores.a.new_empty(size, dtype=acc) for size in (n, col_count, n, n, col_count))

    return _register("lse_stats", "Tensor targets, SymInt col_count", LseStats, run, fake)


def _sweep_op(form: Form) -> Any:
    def split(args: tuple) -> tuple[Scores, Any, bool]:
        *terms, with_grads = args[_SCORES_FIELDS:]
        return Scores(*args[:_SCORES_FIELDS]), form.terms(*terms), with_grads

    def run(backend: str, *args: Any) -> tuple:
        return _fresh(BACKENDS[backend].load().sweep(*split(args)), args)

    def fake(backend: str, *args: Any) -> tuple:
        scores, _, with_grads = split(args)
        return form.fake(scores, BACKENDS[backend].result_dtype(scores.a.dtype), with_grads)

    arguments = f"{fields_schema(form.terms)}, bool with_grads"
    return _register(f"{form.name}_sweep", arguments, form.result, run, fake)


lse_stats_op = _lse_stats_op()
#: the sweep's op of every registered form, by form name
SWEEP_OPS = {name: _sweep_op(form) for name, form in FORMS.items()}
#: every registered op (for ``torch.library.opcheck`` and the docs)
OPS = (lse_stats_op, *SWEEP_OPS.values())


# eq=False: compared and hashed by identity (resolve_backend keeps one per backend and call kind),
# which a small batch's per-call LossSpec lookup hashes with no Python call
@dataclasses.dataclass(frozen=True, eq=False)
class RegisteredPrimitives:
    """The :class:`~tilecl.backends.base.Primitives` of backend ``name``, through the registered ops.

    Plain eager tensors skip the op: it would only add its dispatch, tens of microseconds per call,
    which is a small batch's whole budget; compiled, fake or meta calls take it. ``whole``: the
    backend's :class:`~tilecl.backends.base.WholeTile`, if it declares one.
    """

    name: str
    whole: Optional[WholeTile] = dataclasses.field(default=None, compare=False)

    def lse_stats(self, scores: Scores, targets: Tensor, col_count: int) -> LseStats:
        if reads_values(scores.a):
            result: LseStats = BACKENDS[self.name].load().lse_stats(scores, targets, col_count)
            return result
        return LseStats(*lse_stats_op(self.name, *scores, targets, col_count))

    def sweep(self, scores: Scores, terms: Any, with_grads: bool = True) -> Any:
        if reads_values(scores.a):
            return BACKENDS[self.name].load().sweep(scores, terms, with_grads)
        form = form_of(terms)
        form.check(with_grads)
        return form.result(*SWEEP_OPS[form.name](self.name, *scores, *terms, with_grads))
