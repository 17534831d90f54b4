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

Batch sizes may differ between ranks (the last batch of an epoch, packed
sequences, variable per-rank batches), a rank may hold no rows: the loss is the
one of the concatenated batch, every rank agreeing on every rank's sizes
before any exchange, and the convention above holds unchanged — each rank's
inputs get ``world ×`` the global loss's gradient, whatever their share of the
rows (so DDP's average is still the single-process gradient). Everything else
of a call (feature dimension, dtype, options) must be equal on every rank;
otherwise every rank raises the same error (no hang).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Optional, TypeVar, Union

import torch
import torch.distributed as dist

from .collectives import DIST_IMPLS, control_tensor, gather_plain, leading_sizes, logsumexp_across
from .function import weight_total

__all__ = ["DIST_IMPLS", "Ranks", "agree", "agree_on_call", "global_value", "resolve_group"]

_T = TypeVar("_T")


def resolve_group(
    process_group: Optional[Any] = None,
    device_mesh: Optional[Any] = None,
    mesh_dim: Union[int, str, None] = None,
) -> Optional[Any]:
    """The group a loss exchanges its batch over: ``process_group``, or ``device_mesh``'s dimension
    ``mesh_dim`` (a name or an index; may be left out for a 1-D mesh).

    With tensor or context parallelism the ranks along the other dimensions of
    the mesh hold the same samples: gathering over them would count those
    samples as negatives several times. Only the data-parallel dimension holds
    distinct samples, so it is the one to name.
    """
    if device_mesh is None:
        if mesh_dim is not None:
            raise ValueError(f"mesh_dim={mesh_dim!r} needs a device_mesh")
        return process_group
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(device_mesh, DeviceMesh):
        raise TypeError(
            f"device_mesh must be a torch.distributed DeviceMesh, got {type(device_mesh).__name__}"
        )
    if process_group is not None:
        raise ValueError("give process_group or device_mesh (with mesh_dim), not both")
    names = tuple(device_mesh.mesh_dim_names or ())
    if mesh_dim is None:
        if device_mesh.ndim != 1:
            raise ValueError(
                f"device_mesh has {device_mesh.ndim} dimensions {names or ''}: name the one that holds "
                "distinct samples (the data-parallel one) with mesh_dim"
            )
        mesh_dim = 0
    if isinstance(mesh_dim, bool) or not isinstance(mesh_dim, (int, str)):
        raise TypeError(f"mesh_dim must be a dimension name or index, got {type(mesh_dim).__name__}")
    if isinstance(mesh_dim, str) and mesh_dim not in names:
        raise ValueError(f"mesh_dim={mesh_dim!r} is not a dimension of device_mesh {names}")
    if isinstance(mesh_dim, int) and not 0 <= mesh_dim < device_mesh.ndim:
        raise ValueError(f"mesh_dim={mesh_dim} is out of range for a {device_mesh.ndim}-D device_mesh")
    return device_mesh.get_group(mesh_dim)


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


#: signature entries that may differ between ranks: the batch sizes
SIZES = ("N", "M", "columns_with_statistics")

#: bytes of the call's name in the header of :func:`agree_on_call` (longer names are cut)
CALL_NAME_BYTES = 64


def _header(call: str, names: list[str], codes: list[int]) -> list[int]:
    """What every call's agreement exchanges first, of one size whatever the call: its name (as
    int64 words), its signature's length, a digest of the entries' names and one of their values
    (batch sizes left out: they may differ)."""
    name = call.encode()[:CALL_NAME_BYTES].ljust(CALL_NAME_BYTES, b"\0")
    words = [int.from_bytes(name[i : i + 8], "little", signed=True) for i in range(0, CALL_NAME_BYTES, 8)]
    fixed = [code for entry, code in zip(names, codes) if entry not in SIZES]
    return [*words, len(codes), zlib.crc32(repr(names).encode()), zlib.crc32(repr(fixed).encode())]


def _call_name(words: list[int]) -> str:
    raw = b"".join(int(w).to_bytes(8, "little", signed=True) for w in words)
    return raw.rstrip(b"\0").decode(errors="replace")


def _gather_rows(values: list[int], group: Any, world: int) -> torch.Tensor:
    mine = control_tensor(values, group)
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    return torch.stack(gathered).cpu()


def agree_on_call(
    group: Any, call: str = "the loss", **values: object
) -> tuple[int, dict[str, tuple[int, ...]]]:
    """Every rank's call signature (sizes, dtype, options); the same error on every rank where the
    ranks made different calls, or an entry other than a batch size (:data:`SIZES`) differs.

    Ranks that disagree would otherwise exchange buffers of different shapes or
    wait in different collectives (a hang or a transport abort). So the first
    exchange has one size for every call (:func:`_header`: ``call``, the
    signature's length and digests); only when every rank made the same call
    does the signature itself, whose length depends on the call, travel.
    Returns the group's size and every rank's batch sizes (rank order).
    """
    world = dist.get_world_size(group)
    names = list(values)
    codes = [x if isinstance(x, int) else zlib.crc32(repr(x).encode()) for x in values.values()]
    headers = _gather_rows(_header(call, names, codes), group, world)
    words = CALL_NAME_BYTES // 8
    shape = headers[:, : words + 2]
    if not bool((shape == shape[0]).all()):
        calls = [_call_name(row[:words].tolist()) for row in headers]
        if len(set(calls)) > 1:
            listing = ", ".join(f"rank {r}: {c}" for r, c in enumerate(calls))
            raise ValueError(
                f"the ranks made different calls ({listing}); every rank must call the same loss"
            )
        raise ValueError(f"the ranks called {call} with different options (the calls' signatures differ)")
    rows = _gather_rows([int(c) for c in codes], group, world)
    differing = [
        name
        for i, name in enumerate(names)
        if name not in SIZES and not bool((rows[:, i] == rows[0, i]).all())
    ]
    if differing:
        raise ValueError(f"the distributed loss needs the same {', '.join(differing)} on every rank")
    sizes = {name: tuple(int(x) for x in rows[:, names.index(name)]) for name in SIZES if name in names}
    if "N" in sizes and sum(sizes["N"]) == 0:
        raise ValueError(
            "the distributed loss needs at least one sample on some rank, got N = 0 on every rank"
        )
    return world, sizes


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
    ``world`` is the group's size, ``rows`` and ``cols`` every rank's ``N`` and
    ``M`` (rank order; empty without a group or where the loss has no such size).
    """

    group: Optional[Any] = None
    #: the group's size (derived from ``group`` when not given: the default ``-1``)
    world: int = -1
    rows: tuple[int, ...] = ()
    cols: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        size = 1 if self.group is None else dist.get_world_size(self.group)
        if self.world == -1:
            object.__setattr__(self, "world", size)
        elif self.world != size:
            raise ValueError(f"Ranks: world={self.world} but the group has {size} ranks")

    @property
    def rank(self) -> int:
        return 0 if self.group is None else dist.get_rank(self.group)

    def total_rows(self, n: int) -> int:
        """Rows of the global batch (this rank's ``n`` locally)."""
        return sum(self.rows) if self.rows else n * self.world

    def total_cols(self, m: int) -> int:
        """Columns of the global batch (this rank's ``m`` locally)."""
        return sum(self.cols) if self.cols else m * self.world

    def col_offset(self) -> int:
        """This rank's first column in the global batch."""
        return sum(self.cols[: self.rank])

    def global_loss(
        self, value: torch.Tensor, count: int, reduction: str, weights: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The global loss from a Function's per-rank sum over ``count`` terms. Locally: ``value``.

        A ``"mean"`` divides by every rank's terms (ranks may hold different counts); with
        per-pair ``weights`` it is the weighted mean over every rank's pairs.
        """
        if self.group is None:
            return value
        if reduction != "mean":
            share = value
        elif weights is None:
            return self._global_mean(value, count)
        else:
            total = self.sum_(weights.detach().sum().to(value.dtype).reshape(1))[0]
            share = value / weight_total(total.reshape(1))
        return global_value(share, self.world, self.group)

    def _global_mean(self, value: torch.Tensor, count: int) -> torch.Tensor:
        """Value: ``Σ_ranks value / Σ_ranks count`` (one all-reduce of both); gradient: ``world ×``
        this rank's ``value / Σ count`` (the convention above)."""
        both = torch.stack([value.detach().double(), value.new_tensor(count, dtype=torch.float64)])
        dist.all_reduce(both, group=self.group)
        counted = both[1].to(value.dtype)
        share = value / counted
        return self.world * share + (both[0].to(value.dtype) / counted - self.world * share).detach()

    def mean(self, per_sample: torch.Tensor) -> torch.Tensor:
        """Mean over every rank's samples (the gradient convention above)."""
        if self.group is None:
            return per_sample.mean()
        return self._global_mean(per_sample.sum(), per_sample.shape[0])

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` concatenated in rank order (no autograd; ranks may hold different
        numbers of rows). Locally: ``x``."""
        return x if self.group is None else torch.cat(gather_plain(x, self.group))

    def gather_with_grad(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` concatenated in rank order, differentiable: the backward sums every
        rank's gradient of a part into its owner (the gradient convention above). Locally: ``x``."""
        if self.group is None:
            return x
        from torch.distributed.nn.functional import all_gather

        # torch's differentiable all-gather takes equal sizes: parts travel padded and are cut back
        sizes = leading_sizes(x, self.group)
        most = max(sizes)
        if x.shape[0] < most:
            x = torch.cat([x, x.new_zeros((most - x.shape[0], *x.shape[1:]))])
        parts = all_gather(x.contiguous(), group=self.group)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    def own(self, n: int) -> slice:
        """This rank's ``n`` rows in :meth:`gather`'s concatenation of every rank's rows."""
        start = sum(self.rows[: self.rank]) if self.rows else self.rank * n
        return slice(start, start + n)

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
