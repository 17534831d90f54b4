"""The global losses across ranks (torch.distributed), without any rank holding N×N.

Every loss takes ``process_group`` and ``dist_impl``; :mod:`tilecl.driver`
checks the call on every rank and makes the ranks agree on it (:func:`agree`,
:func:`agree_on_call`) before anything is exchanged, then hands the loss a
:class:`Ranks`: the collectives, with the gradient convention below.

* :meth:`Ranks.global_loss` — the global value from the per-rank sums;
* :meth:`Ranks.mean`, :meth:`Ranks.global_sum`, :meth:`Ranks.global_logsumexp`
  — differentiable global reductions, for losses built from per-sample
  terms, row statistics or Gram matrices;
* :meth:`Ranks.gather`, :meth:`Ranks.gather_with_grad`, :meth:`Ranks.sum_`.

With ``group=None`` every method is the identity (no collective), so a loss
has one code path.

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
from typing import Any, Optional, TypeVar

import torch
import torch.distributed as dist

from .backends.sharded import DIST_IMPLS, control_tensor, gather_plain, logsumexp_across
from .function import weight_total

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
    names = list(values)
    differing = [name for i, name in enumerate(names) if not bool((rows[:, i] == rows[0, i]).all())]
    sizes = [name for name in ("N", "M") if name in names]
    if set(sizes) & set(differing):
        columns = [names.index(name) for name in sizes]
        shapes = [tuple(r[columns].tolist()) for r in rows]
        got = shapes if len(sizes) > 1 else [shape[0] for shape in shapes]
        raise ValueError(
            f"the distributed loss needs equal ({', '.join(sizes)}) batch sizes on every rank, got {got}"
        )
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


class _ValueWithScaledGradient(torch.autograd.Function):
    """Forward: ``value`` (computed elsewhere); backward: ``factor ×`` the gradient, to ``source``."""

    @staticmethod
    def forward(ctx: Any, source: torch.Tensor, value: torch.Tensor, factor: int) -> torch.Tensor:
        ctx.factor = factor
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return grad * ctx.factor, None, None


@dataclasses.dataclass(frozen=True)
class Ranks:
    """The collectives a loss needs, over a process group or (``group=None``) as identities.

    Built by :func:`tilecl.driver.begin` once every rank has agreed on the call:
    ``world`` is the group's size.
    """

    group: Optional[Any] = None
    #: the group's size (derived from ``group`` when not given: the default ``-1``)
    world: int = -1

    def __post_init__(self) -> None:
        size = 1 if self.group is None else dist.get_world_size(self.group)
        if self.world == -1:
            object.__setattr__(self, "world", size)
        elif self.world != size:
            raise ValueError(f"Ranks: world={self.world} but the group has {size} ranks")

    @property
    def rank(self) -> int:
        return 0 if self.group is None else dist.get_rank(self.group)

    def global_loss(
        self, value: torch.Tensor, count: int, reduction: str, weights: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The global loss from a Function's per-rank sum over ``count`` terms. Locally: ``value``.

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

    def global_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Value: ``Σ_ranks x`` (exactly the all-reduced sum); gradient: ``world ×`` this rank's (the
        convention above). Locally: ``x``."""
        if self.group is None:
            return x
        total = x.detach().clone()
        dist.all_reduce(total, group=self.group)
        return _ValueWithScaledGradient.apply(x, total, self.world)

    def global_logsumexp(self, x: torch.Tensor) -> torch.Tensor:
        """Value: ``log Σ_ranks exp(x)`` of a 0-d ``x``; gradient: ``world × exp(x − value)``, this
        rank's part of the global one (the convention above). Locally: ``x``."""
        if self.group is None:
            return x
        total = logsumexp_across(x.detach(), self.group)
        # a rank whose every term is excluded (x = −inf) adds nothing: no inf − inf, no 0·inf
        finite = torch.isfinite(x.detach())
        weight = torch.where(finite, self.world * torch.exp(x.detach() - total), 0.0)
        change = torch.where(finite, x - x.detach(), torch.zeros_like(total))
        return total + weight * change

    def sum_(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over every rank, in place. Locally: ``x``."""
        if self.group is not None:
            dist.all_reduce(x, group=self.group)
        return x
