"""The global losses across ranks (torch.distributed), without any rank holding N×N.

Every loss takes ``process_group`` and ``dist_impl`` and hands them to one
:class:`Ranks`, which is all a loss needs to know about ranks, local or global:

* :meth:`Ranks.checked` — the loss's own checks, and agreement: if any rank's
  checks fail, every rank raises (the failing rank its own error, the others
  a ValueError saying so), before any exchange, so none is left waiting;
* :meth:`Ranks.sharded` — every rank must make the same call (sizes, dtype,
  options; else the same ValueError on every rank), then the spec runs on the
  sharded primitives of :mod:`tilecl.backends.sharded` (``dist_impl``
  ``"gather"`` or ``"ring"``) with per-rank sums;
* :meth:`Ranks.global_loss` — the global value from the per-rank sums, with the
  gradient convention below; :meth:`Ranks.mean`, :meth:`Ranks.gather`,
  :meth:`Ranks.logsumexp` and :meth:`Ranks.sum_` for losses built from
  per-sample terms, row statistics or Gram matrices.

With ``process_group=None`` every method is the identity (no collective), so a
loss has one code path.

Gradient convention (documented because open_clip's users were confused by
world-size factors): the returned value is the **global** loss on every rank
(logs show the true loss), and its backward gives each rank's inputs
``world_size × ∂L/∂(inputs)`` when every rank back-propagates the same
upstream gradient — so DistributedDataParallel's gradient *average* is the
single-process gradient of the global loss. Without DDP, average the parameter
gradients across ranks yourself (``all_reduce`` then divide by
``world_size``), which is what DDP does. A replicated ``logit_scale`` gets a
per-rank part whose average is the exact gradient.

Batch sizes must be equal on all ranks; otherwise every rank raises the same
error (no hang).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist

from . import validation as v
from .backends import Primitives
from .backends.sharded import (
    DIST_IMPLS,
    Shard,
    ShardedPrimitives,
    control_tensor,
    gather_plain,
    logsumexp_across,
)
from .function import LossSpec, col_count, weight_total

__all__ = ["DIST_IMPLS", "Ranks", "agree", "agree_on_call", "global_value"]

_T = TypeVar("_T")


def agree(failure: Optional[Exception], group: Any, what: str) -> None:
    """Raise on every rank if any rank failed a check (none is left waiting in a collective)."""
    flag = control_tensor([0 if failure is None else 1], group)
    dist.all_reduce(flag, group=group)
    if failure is not None:
        try:
            raise failure
        finally:
            # the traceback holds this frame: without this, frame and exception keep each other
            # (and the group and inputs they reach) alive until a garbage collection, which may
            # come only at interpreter shutdown, after the process group's threads are gone
            failure = None
    if int(flag):
        raise ValueError(f"{what} failed its checks on another rank")


def agree_on_call(group: Any, **values: object) -> int:
    """Every rank's call signature (sizes, dtype, options); the same error on every rank where they differ.

    Ranks that disagree would otherwise exchange buffers of different sizes or
    wait in different collectives (a hang or a transport abort). Returns the
    group's size.
    """
    world = dist.get_world_size(group)
    codes = [x if isinstance(x, int) else zlib.crc32(repr(x).encode()) for x in values.values()]
    mine = control_tensor([int(c) for c in codes], group)
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    rows = torch.stack(gathered).cpu()
    differing = [name for i, name in enumerate(values) if not bool((rows[:, i] == rows[0, i]).all())]
    if {"N", "M"} & set(differing):
        shapes = [tuple(r[:2].tolist()) for r in rows]
        raise ValueError(f"the distributed loss needs equal (N, M) batch sizes on every rank, got {shapes}")
    if differing:
        raise ValueError(f"the distributed loss needs the same {', '.join(differing)} on every rank")
    return world


def global_value(share: torch.Tensor, world: int, group: Any) -> torch.Tensor:
    """Value: the sum of every rank's ``share`` (the global loss); gradient: ``world ×`` this rank's share.

    DistributedDataParallel averages gradients over ranks, so the factor makes
    its average the single-process gradient of the global loss.
    """
    total = share.detach().clone()
    dist.all_reduce(total, group=group)
    return world * share + (total - world * share).detach()


@dataclasses.dataclass(frozen=True)
class Ranks:
    """Where a loss runs: this process alone (``group=None``) or every rank of a process group."""

    group: Optional[Any] = None
    dist_impl: str = "gather"

    @property
    def world(self) -> int:
        return 1 if self.group is None else dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return 0 if self.group is None else dist.get_rank(self.group)

    def checked(self, check: Callable[[], _T], reduction: Optional[str] = None) -> _T:
        """Run ``check``; with a group, every rank raises if any rank's check failed (nobody hangs).

        ``reduction`` is the loss's: a global loss is ``"mean"`` or ``"sum"``.
        """
        if self.group is None:
            return check()
        failure: Optional[Exception] = None
        result: Optional[_T] = None
        try:
            v.check_choice(self.dist_impl, "dist_impl", DIST_IMPLS)
            if reduction == "none":
                raise ValueError("with process_group, reduction must be 'mean' or 'sum'")
            result = check()
        except Exception as error:  # whatever it is, the other ranks must not wait for this one
            failure = error
        try:
            agree(failure, self.group, "the loss's input")
        finally:
            failure = None  # see agree: no frame ↔ exception cycle
        return result  # type: ignore[return-value]

    def agree_on_call(self, **values: object) -> int:
        """The world size, once every rank made the same call (:func:`agree_on_call`); 1 locally."""
        return 1 if self.group is None else agree_on_call(self.group, **values)

    def sharded(
        self,
        spec: LossSpec,
        a: torch.Tensor,
        b: torch.Tensor,
        labels: Optional[torch.Tensor],
        **options: object,
    ) -> LossSpec:
        """``spec`` over the global batch: sharded primitives, per-rank sums. Locally: ``spec``.

        ``options``: more of the call every rank must agree on (e.g. whether
        group ids or weights were given: they change what travels).
        """
        if self.group is None:
            return spec
        n, m = a.shape[0], b.shape[0]
        world = self.agree_on_call(
            **options,
            N=n,
            M=m,
            D=a.shape[1],
            dtype=a.dtype,
            columns_with_statistics=col_count(labels, n, m, spec.symmetric),
            exclude_diagonal=spec.exclude_diagonal,
            reduction=spec.reduction,
            dist_impl=self.dist_impl,
        )
        primitives = self.sharded_primitives(spec.primitives)
        return dataclasses.replace(spec, primitives=primitives, reduction="sum", world=world)

    def sharded_primitives(self, local: Primitives) -> Primitives:
        """``local`` over the global batch (call :meth:`agree_on_call` first). Locally: ``local``."""
        if self.group is None:
            return local
        return ShardedPrimitives(local, Shard.of(self.group), self.dist_impl)

    def global_loss(
        self, value: torch.Tensor, count: int, reduction: str, weights: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The global loss from :meth:`sharded`'s per-rank sum over ``count`` terms. Locally: ``value``.

        With per-pair ``weights`` a ``"mean"`` is the weighted mean over every rank's pairs.
        """
        if self.group is None:
            return value
        if reduction != "mean":
            share = value
        elif weights is None:
            share = value / (count * self.world)
        else:
            total = self.sum_(weights.detach().sum().to(value.dtype).reshape(1))[0]
            share = value / weight_total(total.reshape(1))
        return global_value(share, self.world, self.group)

    def mean(self, per_sample: torch.Tensor) -> torch.Tensor:
        """Mean over every rank's samples (the gradient convention above)."""
        if self.group is None:
            return per_sample.mean()
        world = self.world
        return global_value(per_sample.sum() / (per_sample.shape[0] * world), world, self.group)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` concatenated in rank order (no autograd). Locally: ``x``."""
        return x if self.group is None else torch.cat(gather_plain(x, self.group))

    def gather_with_grad(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` concatenated in rank order, differentiable: the backward sums every
        rank's gradient of a part into its owner (the gradient convention above). Locally: ``x``."""
        if self.group is None:
            return x
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x.contiguous(), group=self.group))

    def own(self, n: int) -> slice:
        """This rank's rows in :meth:`gather`'s concatenation of ``n``-row parts."""
        return slice(self.rank * n, (self.rank + 1) * n)

    def logsumexp(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise ``log Σ_ranks exp(x)``. Locally: ``x``."""
        return x if self.group is None else logsumexp_across(x, self.group)

    def sum_(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over every rank, in place. Locally: ``x``."""
        if self.group is not None:
            dist.all_reduce(x, group=self.group)
        return x
