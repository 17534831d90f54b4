"""The collectives over a process group, written once: the distributed layer's exchanges.

The losses' collectives (:class:`tilecl.distributed.Ranks`, the agreement of
:mod:`tilecl.distributed`, :class:`tilecl.MemoryQueue`'s gather) and the
sharded primitives (:mod:`tilecl.backends.sharded`) exchange through these.
The module sits below the backends so that both can import it; it imports
nothing of the package.

* :func:`control_tensor` — a small int64 tensor for the agreement, on the
  device the group's backend needs;
* :func:`leading_sizes`, :func:`gather_plain`, :func:`reduce_scatter_uneven` —
  gathers and reduce-scatters whose parts may differ in rows from rank to rank
  (no autograd: the Functions route gradients themselves);
* :func:`logsumexp_across` — an elementwise log-sum-exp over the ranks (:func:`shifted_sum_across`
  with each value's rounding residual).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "DIST_IMPLS",
    "control_tensor",
    "gather_plain",
    "leading_sizes",
    "logsumexp_across",
    "shifted_sum_across",
    "reduce_scatter_uneven",
]

#: how the sharded primitives exchange the columns (:mod:`tilecl.backends.sharded`)
DIST_IMPLS = ("gather", "ring")


def control_tensor(values: list[int], group: Any) -> torch.Tensor:
    """A small int64 tensor for agreement collectives, on the device the group's backend needs."""
    on_gpu = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    return torch.tensor(values, dtype=torch.int64, device=device)


def logsumexp_across(x: torch.Tensor, group) -> torch.Tensor:
    """Elementwise ``log Σ_ranks exp(x)`` (two all-reduces; ``-inf`` everywhere stays ``-inf``)."""
    peak, total = shifted_sum_across(x, None, group)
    return peak + torch.log(total)


def shifted_sum_across(
    x: torch.Tensor, low: Optional[torch.Tensor], group
) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise ``(K, Σ_ranks exp((x − K) + low))`` with ``K`` the largest finite ``x`` over the
    ranks (0 where there is none): the log-sum-exp of ``x + low`` (``low``: a rounding residual, or
    ``None``) as a shift and a shifted sum, which the caller adds without losing ``low`` (two
    all-reduces)."""
    peak = x.clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.exp(x - peak if low is None else (x - peak) + low)
    dist.all_reduce(total, group=group)
    return peak, total


def leading_sizes(x: torch.Tensor, group) -> list[int]:
    """Every rank's ``x.shape[0]``, in rank order (one small all-gather)."""
    mine = control_tensor([x.shape[0]], group)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    return [int(t) for t in torch.cat(every).tolist()]


def gather_plain(x: torch.Tensor, group, sizes: Optional[Sequence[int]] = None) -> list[torch.Tensor]:
    """All ranks' ``x`` in rank order (no autograd: the Functions route gradients themselves).

    Ranks may hold different numbers of rows (``sizes``, every rank's ``x.shape[0]``; asked of the
    group when not given): each part is then broadcast from its owner at its own size, so a rank
    holds ``Σ sizes`` rows, not ``world × max(sizes)`` (gloo's all-gather takes equal sizes only).
    """
    sizes = list(sizes) if sizes is not None else leading_sizes(x, group)
    x = x.contiguous()
    if len(set(sizes)) == 1:
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x, group=group)
        return parts
    me = dist.get_rank(group)
    parts = [x if r == me else x.new_empty((size, *x.shape[1:])) for r, size in enumerate(sizes)]
    for r, part in enumerate(parts):
        if part.numel():
            dist.broadcast(part, src=_global_rank(group, r), group=group)
    return parts


def reduce_scatter_uneven(blocks: list[torch.Tensor], group) -> torch.Tensor:
    """``Σ_ranks blocks[rank]`` of every rank's list, this rank's only. Blocks of different rows are
    each reduced onto their owner at their own size (no padding to the largest)."""
    blocks = [x.contiguous() for x in blocks]
    me = dist.get_rank(group)
    if len({x.shape[0] for x in blocks}) == 1:
        out = torch.empty_like(blocks[me])
        dist.reduce_scatter(out, blocks, group=group)
        return out
    for r, block in enumerate(blocks):
        if block.numel():
            # reduce writes the sum into the destination's own tensor: the owner's block is its
            # own gradient buffer, reduced in place; the others' are scratch
            dist.reduce(block, dst=_global_rank(group, r), group=group)
    return blocks[me].clone()  # not a view that keeps every rank's blocks alive


def _global_rank(group, rank: int) -> int:
    """A member's rank in the default group (collectives name sources and destinations by it)."""
    return rank if group is None or group is dist.group.WORLD else dist.get_global_rank(group, rank)
