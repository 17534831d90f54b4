"""How every tilecl loss is run, locally or across ranks — the sequence written once.

A loss calls :func:`begin` with its own argument check, then runs its autograd
Function on the primitives it gets back, then asks the same :class:`Run` for the
global value::

    run = begin(check, like=a, backend=backend, reduction=reduction, process_group=..., dist_impl=...)
    spec = run.spec(symmetric=True, exclude_diagonal=False)
    loss = apply_loss(a, b, scale, spec, ...)          # tilecl.function
    return run.global_loss(loss, count)

:func:`begin` is, in order:

1. **check** — the loss's checks (``check()`` raises before any kernel, one
   exception type per kind of mistake) and, with a process group, the group's
   own rules (``dist_impl``, no ``reduction="none"``);
2. **resolve** — the backend for the inputs' device and dtype and the loss's
   form (:func:`tilecl.backends.resolve_backend`), apart from the check;
3. **agree** — with a process group, every rank raises if any rank's check or
   resolution failed, then every rank compares the call's signature (what
   ``check`` returned: sizes, dtype, options) and raises the same error where
   they differ. Nothing is exchanged before this step, so a mismatch is an
   error on every rank, never a hang or a transport abort;
4. **shard** — the local primitives lifted to the group
   (:mod:`tilecl.backends.sharded`, ``dist_impl`` ``"gather"`` or ``"ring"``).

What the loss does next only goes down: its Function (:mod:`tilecl.function`,
:mod:`tilecl.sigmoid`, :mod:`tilecl.modality`, :mod:`tilecl.distill`'s
``DistillFunction``, :mod:`tilecl.ranking`'s ``RankingFunction``) over the
primitives, and the collectives of :class:`~tilecl.distributed.Ranks`. No
Function sees a process group: a Function's values are this rank's, and the
cross-rank reduction is :meth:`Run.global_loss` (or a collective of
:class:`~tilecl.distributed.Ranks`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Optional, TypeVar

import torch
import torch.distributed as dist

from . import validation as v
from ._compat import functorch_transform_active
from .backends import Primitives, check_backend_name, resolve_backend
from .backends.base import accumulation_dtype
from .backends.sharded import DIST_IMPLS, Shard, ShardedPrimitives
from .distributed import Ranks, agree, agree_on_call
from .function import LossSpec

__all__ = ["Run", "Signature", "begin"]

_T = TypeVar("_T")

FUNCTORCH_MESSAGE = (
    "tilecl losses do not run under torch.func transforms (grad, vmap, jacrev, jvp, ...): "
    "their autograd Functions compute the gradient tile by tile and have no batching rule. "
    "Differentiate with loss.backward() or torch.autograd.grad, or use the full-matrix losses "
    "of tilecl.testing.naive under torch.func"
)

#: the collectives of a call without a process group: identities
_LOCAL = Ranks()

#: what every rank must agree on before any exchange: name → value (sizes, dtype, options)
Signature = Mapping[str, object]


class Run(NamedTuple):
    """A checked and agreed call: what the loss runs on, and how its value becomes the global one.

    Attributes:
        checked: what the loss's ``check`` returned besides the signature
            (e.g. the scale as a tensor).
        primitives: the backend's primitives, sharded over the group
            (``None`` for a loss without a tile loop).
        ranks: the collectives (identity without a group).
        reduction: the user's reduction.
    """

    checked: Any
    primitives: Optional[Primitives]
    ranks: Ranks
    reduction: str

    @property
    def local_reduction(self) -> str:
        """What the Function reduces to: per-rank sums across ranks, the user's reduction locally."""
        return self.reduction if self.ranks.group is None else "sum"

    def spec(self, *, symmetric: bool, exclude_diagonal: bool) -> LossSpec:
        """The shared Function's :class:`~tilecl.function.LossSpec` for this call."""
        assert self.primitives is not None, "this loss resolved no backend"
        ranks = self.ranks
        if ranks.group is None:
            return _local_spec(symmetric, self.reduction, exclude_diagonal, self.primitives)  # type: ignore[arg-type]
        rows, cols = sum(ranks.rows), sum(ranks.cols)
        return LossSpec(symmetric, self.local_reduction, exclude_diagonal, self.primitives, rows, cols)

    def pair_weights(self, weights: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-pair weights as the Function takes them: detached, in ``like``'s accumulation dtype.

        For a weighted mean they are divided by their largest value on any
        rank: the mean is unchanged, and ``Σ w`` stays a normal number however
        small the weights (float32 weights of 1e-40 are subnormal; their sum
        would be taken for the all-zero case).
        """
        if weights is None:
            return None
        weights = weights.detach().to(torch.promote_types(weights.dtype, accumulation_dtype(like.dtype)))
        if self.reduction != "mean":
            return weights
        largest = torch.cat([weights.reshape(-1), weights.new_zeros(1)]).max().reshape(1)
        if self.ranks.group is not None:
            # in float64 whatever the weights' dtype: ranks may pass weights of different dtypes
            # (an empty float32 batch next to float64 weights), and the buffers must match
            largest = largest.double()
            dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=self.ranks.group)
            largest = largest.to(weights.dtype)
        return torch.where(largest > 0, weights / largest, weights)

    def global_loss(
        self, value: torch.Tensor, count: int, weights: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The global loss from the Function's per-rank value over ``count`` terms (locally: ``value``)."""
        if self.ranks.group is None:
            return value
        return self.ranks.global_loss(value, count, self.reduction, weights)


@functools.lru_cache(maxsize=256)
def _local_spec(symmetric: bool, reduction: str, exclude_diagonal: bool, primitives: Any) -> LossSpec:
    """One :class:`LossSpec` per set of a local call's options (frozen, so calls share it: no
    per-call object); ``primitives`` are the resolved backend's, which are hashable."""
    return LossSpec(symmetric, reduction, exclude_diagonal, primitives)


def begin(
    check: Callable[[], tuple[_T, Signature]],
    *,
    like: object,
    backend: object = "auto",
    form: Optional[str] = "softmax",
    reduction: str = "mean",
    process_group: Optional[Any] = None,
    dist_impl: str = "gather",
) -> Run:
    """Check, resolve the backend, agree across ranks and shard: see the module docstring.

    Args:
        check: the loss's checks; returns ``(checked, signature)``, raises on a
            bad input (before any kernel, on every rank).
        like: the tensor whose device and dtype choose the backend (read
            after ``check`` has passed).
        backend: the ``backend=`` argument.
        form: the elementwise form the loss needs of its backend; ``None`` for
            a loss that runs no tile loop (the Gram and per-sample
            regularizers), which resolves no backend.
        reduction: the loss's reduction.
        process_group, dist_impl: where the loss runs.
    """
    if functorch_transform_active():
        raise RuntimeError(FUNCTORCH_MESSAGE)
    group = process_group

    def checked_and_resolved() -> tuple[_T, Signature, Optional[Primitives]]:
        # the options are checked whether or not this call uses them: a typo never passes silently
        v.check_choice(dist_impl, "dist_impl", DIST_IMPLS)
        check_backend_name(backend)
        if group is not None:
            if reduction == "none":
                raise ValueError("with process_group, reduction must be 'mean' or 'sum'")
        if group is None:
            # no context variable on the local path: torch.compile cannot trace one (a graph break)
            value, signature = check()
        else:
            with v.empty_batches_allowed(True):
                value, signature = check()
        if form is None:
            return value, signature, None
        assert isinstance(like, torch.Tensor)  # the loss's check has checked it
        return value, signature, resolve_backend(backend, like.device, like.dtype, form)

    if group is None:
        value, _, local = checked_and_resolved()
        return Run(value, local, _LOCAL, reduction)
    value, signature, local = _on_every_rank(checked_and_resolved, group)
    # the loss's name: its check is a closure of the public loss (e.g. "contrastive_loss.<locals>.check")
    call = getattr(check, "__qualname__", "the loss").split(".<locals>")[0]
    world, sizes = agree_on_call(
        group, call, **signature, form=form, reduction=reduction, dist_impl=dist_impl
    )
    primitives = None if local is None else ShardedPrimitives(local, Shard.of(group), dist_impl)
    return Run(value, primitives, Ranks(group, world, sizes.get("N", ()), sizes.get("M", ())), reduction)


def _on_every_rank(step: Callable[[], _T], group: Any) -> _T:
    """``step()``; if it raised on any rank, every rank raises (the failing one its own error)."""
    failure: Optional[Exception] = None
    result: Optional[_T] = None
    try:
        result = step()
    except Exception as error:  # whatever it is, the other ranks must not wait for this one
        failure = error
    try:
        agree(failure, group, "the loss's input")
    finally:
        failure = None  # see distributed.agree: no frame ↔ exception cycle
    return result  # type: ignore[return-value]
