"""The ``sharded`` backends: a local backend's primitives over the global batch of a process group.

``a`` and ``b`` are this rank's shards of the global ``A = [a_0; a_1; …]`` and
``B = [b_0; b_1; …]``, and

* ``lse_stats`` returns the row LSE of this rank's rows over **all** columns,
  the column LSE of this rank's columns over **all** rows, and the positive
  logits of this rank's (rank-local) targets;
* ``offset_backward`` takes this rank's row and column terms and returns
  ``∂/∂a`` and ``∂/∂b`` of the *global* sum ``Σ G_ij S_ij``, plus this rank's
  part of ``Σ G_ij a_i·b_j``;
* ``sigmoid_sweep`` returns this rank's rows' losses over **all** columns (the
  column keys travel with the columns), ``∂/∂a`` and ``∂/∂b`` of the global
  sum, and this rank's parts of the scale and bias gradients.

The losses' autograd Function runs unchanged on top; the agreement before any
exchange, the global reduction and the gradient convention are
:mod:`tilecl.distributed`'s. Two implementations (``dist_impl``):

``"gather"``
    all-gather ``b`` (``O(N_global·D)`` per rank), one tiled pass of this
    rank's rows against every column; column statistics are merged across
    ranks with two ``all_reduce`` of ``O(N_global)`` floats, and the backward
    reduce-scatters ``∂/∂B`` to the owners.
``"ring"``
    the blocks of ``b`` travel around the ring with ``batch_isend_irecv``
    (the next block is in flight while the current one is computed), so a
    rank holds two blocks, ``O(N_local·D)``. A block's column statistics
    (forward) and its ``∂/∂b`` (backward) travel with it, each rank adding its
    rows' part, and arrive at the owner after one lap.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .base import Gradients, LseStats, OffsetTerms, Primitives, Scores, SigmoidSweep, SigmoidTerms

__all__ = ["DIST_IMPLS", "Shard", "ShardedPrimitives", "control_tensor", "gather_plain", "logsumexp_across"]

DIST_IMPLS = ("gather", "ring")


def control_tensor(values: list[int], group: Any) -> torch.Tensor:
    """A small int64 tensor for agreement collectives, on the device the group's backend needs."""
    on_gpu = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    return torch.tensor(values, dtype=torch.int64, device=device)


def logsumexp_across(x: torch.Tensor, group) -> torch.Tensor:
    """Elementwise ``log Σ_ranks exp(x)`` (two all-reduces; ``-inf`` everywhere stays ``-inf``)."""
    peak = x.clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.exp(x - peak)
    dist.all_reduce(total, group=group)
    return peak + torch.log(total)


def gather_plain(x: torch.Tensor, group) -> list[torch.Tensor]:
    """All ranks' ``x`` in rank order (no autograd: the Functions route gradients themselves)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


@dataclasses.dataclass(frozen=True)
class Shard:
    """This rank's place in the group and the column layout of a sharded call."""

    group: Optional[dist.ProcessGroup]
    world: int
    rank: int
    #: gather: the forward's gathered columns, reused by the backward of the same call
    kept: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, group) -> Shard:
        return cls(group, dist.get_world_size(group), dist.get_rank(group))

    def peer(self, offset: int) -> int:
        """Global rank of the group member ``offset`` places further round the ring."""
        local = (self.rank + offset) % self.world
        return local if self.group is None else dist.get_global_rank(self.group, local)

    def rolled(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Own part first: the home block's local diagonal is then the global one."""
        return parts[self.rank :] + parts[: self.rank]


# --------------------------------------------------------------------------- gather


def _arranged_columns(shard: Shard, blocks: list[torch.Tensor], col_count: int) -> torch.Tensor:
    """Gathered ``b`` blocks, own first, with every block's first ``col_count`` rows up front.

    The local primitives return column statistics for a prefix of the
    columns, so the columns that have statistics (every rank's pair columns)
    must come first; the hard negatives follow.
    """
    rolled = shard.rolled(blocks)
    m = blocks[0].shape[0]
    if 0 < col_count < m:
        return torch.cat([x[:col_count] for x in rolled] + [x[col_count:] for x in rolled])
    return torch.cat(rolled)


def _gathered_columns(shard: Shard, b: torch.Tensor, col_count: int) -> torch.Tensor:
    """Every rank's ``b``, arranged; gathered once per call and kept until the backward.

    Keeping them (as an all-gather with autograd would) saves the backward's
    second all-gather: a third of the gather implementation's traffic.
    """
    key = (b.data_ptr(), tuple(b.shape), b._version, col_count)
    if shard.kept.get("key") != key:
        shard.kept["key"] = key
        shard.kept["columns"] = _arranged_columns(shard, gather_plain(b, shard.group), col_count)
    return shard.kept["columns"]


def _with_gathered_groups(shard: Shard, scores: Scores, columns: Tensor, col_count: int) -> Scores:
    """``scores`` over the gathered ``columns``: every rank's column group ids, arranged as the columns.

    The kept (positive) columns index this rank's block, which comes first;
    a kept column past the statistics prefix moves with the block's tail.
    """
    scores = scores._replace(b=columns)
    if not scores.masked:
        return scores
    _, col_groups, kept = scores.group_mask()
    m = col_groups.shape[0]
    groups = _arranged_columns(shard, gather_plain(col_groups, shard.group), col_count)
    if 0 < col_count < m:
        kept = torch.where(kept >= col_count, kept + (shard.world - 1) * col_count, kept)
    return scores._replace(col_groups=groups, kept_cols=kept)


def _gather_lse_stats(
    local: Primitives, shard: Shard, scores: Scores, targets: Tensor, col_count: int
) -> LseStats:
    _check_layout(scores.exclude_diagonal, col_count, scores.b.shape[0])
    columns = _gathered_columns(shard, scores.b, col_count)
    row_lse, col_partial, positive = local.lse_stats(
        _with_gathered_groups(shard, scores, columns, col_count), targets, col_count * shard.world
    )
    if col_count == 0:
        return LseStats(row_lse, col_partial, positive)
    # rolled block p is rank (rank + p)'s: roll back to rank order, merge over all ranks' rows
    by_rank = col_partial.view(shard.world, col_count).roll(shard.rank, dims=0)
    col_lse = logsumexp_across(by_rank.contiguous(), shard.group)[shard.rank]
    return LseStats(row_lse, col_lse, positive)


def _gather_offset_backward(local: Primitives, shard: Shard, scores: Scores, terms: OffsetTerms) -> Gradients:
    m, col_count = scores.b.shape[0], terms.col_offset.shape[0]
    _check_layout(scores.exclude_diagonal, col_count, m)
    columns = _gathered_columns(shard, scores.b, col_count)
    shard.kept.clear()  # the backward is the last use
    if col_count:
        terms = terms._replace(
            col_offset=torch.cat(shard.rolled(gather_plain(terms.col_offset, shard.group))),
            col_mult=torch.cat(shard.rolled(gather_plain(terms.col_mult, shard.group))),
        )
    if terms.positive_cols is not None and 0 < col_count < m:
        # the positives index this rank's block, which comes first; past the statistics prefix a
        # column moves with the block's tail (as the kept columns of the group mask)
        cols = terms.positive_cols
        terms = terms._replace(
            positive_cols=torch.where(cols >= col_count, cols + (shard.world - 1) * col_count, cols)
        )
    gathered = _with_gathered_groups(shard, scores, columns, col_count)
    grad_a, grad_columns, grad_scale = local.offset_backward(gathered, terms)
    grad_blocks = _split_arranged(shard, grad_columns, m, col_count)
    grad_b = torch.empty_like(grad_blocks[0])
    dist.reduce_scatter(grad_b, [x.contiguous() for x in grad_blocks], group=shard.group)
    return Gradients(grad_a, grad_b, grad_scale)


def _gather_sigmoid_sweep(
    local: Primitives, shard: Shard, scores: Scores, terms: SigmoidTerms, with_grads: bool
) -> SigmoidSweep:
    m = scores.b.shape[0]
    columns = _gathered_columns(shard, scores.b, 0)
    col_keys = torch.cat(shard.rolled(gather_plain(terms.col_keys, shard.group)))
    if with_grads:
        shard.kept.clear()  # the sweep with gradients is the last use
    gathered = _with_gathered_groups(shard, scores, columns, 0)
    sweep = local.sigmoid_sweep(gathered, terms._replace(col_keys=col_keys), with_grads)
    if not with_grads:
        return sweep
    grad_blocks = _split_arranged(shard, sweep.grad_b, m, 0)
    grad_b = torch.empty_like(grad_blocks[0])
    dist.reduce_scatter(grad_b, [x.contiguous() for x in grad_blocks], group=shard.group)
    return sweep._replace(grad_b=grad_b)


def _split_arranged(shard: Shard, arranged: torch.Tensor, m: int, col_count: int) -> list[torch.Tensor]:
    """Inverse of :func:`_arranged_columns`: per-rank blocks in rank order."""
    world = shard.world
    if 0 < col_count < m:
        heads = arranged[: world * col_count].view(world, col_count, -1)
        tails = arranged[world * col_count :].view(world, m - col_count, -1)
        rolled = [torch.cat([h, t]) for h, t in zip(heads, tails)]
    else:
        rolled = list(arranged.view(world, m, -1))
    back = world - shard.rank
    return rolled[back:] + rolled[:back]


def _check_layout(exclude_diagonal: bool, col_count: int, m: int) -> None:
    # the losses that exclude the diagonal (NT-Xent, uniformity) have no column statistics
    if exclude_diagonal and 0 < col_count < m:
        raise NotImplementedError("exclude_diagonal with column statistics on part of the columns")


# --------------------------------------------------------------------------- ring


def _ring(
    shard: Shard,
    travelling: list[torch.Tensor],
    step: Callable[[list[torch.Tensor], bool], torch.Tensor],
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """One lap of the ring; returns the accumulator of this rank's own block.

    At step ``t`` a rank holds the block of rank ``rank − t``. One batch of
    point-to-point ops per step sends on the accumulator finished at step
    ``t − 1`` and the block in hand, and receives this step's accumulator so
    far and the next block; the step's part (``step``) is computed while they
    travel, then added (``combine``). Every send is in a batch with the
    matching receives, in the same order on both sides — NCCL pairs batched
    ops in order, and a lone send would wait for a receive posted behind the
    peer's own send. At most two accumulators are alive: ``O(n·D)`` per rank.
    """
    if shard.world == 1:
        return step(travelling, True)
    group, after, before = shard.group, shard.peer(1), shard.peer(-1)
    held, finished = travelling, None

    def exchange(send: list[torch.Tensor], receive: list[torch.Tensor]) -> list:
        ops = [dist.P2POp(dist.isend, x, after, group) for x in send if x.numel()]
        ops += [dist.P2POp(dist.irecv, x, before, group) for x in receive if x.numel()]
        return dist.batch_isend_irecv(ops) if ops else []

    for t in range(shard.world):
        sends, receives = [], []
        accumulated = incoming = None
        if finished is not None:
            accumulated = torch.empty_like(finished)
            sends.append(finished)
            receives.append(accumulated)
        if t < shard.world - 1:
            incoming = [torch.empty_like(x) for x in held]
            sends += held
            receives += incoming
        requests = exchange(sends, receives)
        part = step(held, t == 0)
        for request in requests:
            request.wait()
        finished = (part if accumulated is None else combine(accumulated, part)).contiguous()
        held = incoming if incoming is not None else held
    assert finished is not None  # world >= 2 steps ran
    own = torch.empty_like(finished)
    for request in exchange([finished], [own]):
        request.wait()
    return own


def _travelling_groups(scores: Scores) -> list[torch.Tensor]:
    """The column group ids travel with their block (nothing when unmasked)."""
    return [] if scores.col_groups is None else [scores.col_groups.contiguous()]


def _block_scores(scores: Scores, block: Tensor, groups: list[Tensor], home: bool) -> Scores:
    """``scores`` against a travelling block: the diagonal and the kept (positive) columns lie in the
    rank's own block only."""
    block_scores = scores._replace(b=block, exclude_diagonal=scores.exclude_diagonal and home)
    if not scores.masked or home:
        return block_scores._replace(col_groups=groups[0] if groups else None)
    none_kept = torch.full_like(scores.group_mask()[2], -1)
    return block_scores._replace(col_groups=groups[0], kept_cols=none_kept)


def _ring_lse_stats(
    local: Primitives, shard: Shard, scores: Scores, targets: Tensor, col_count: int
) -> LseStats:
    row_lse: Optional[Tensor] = None
    positive: Optional[Tensor] = None

    def step(held: list[torch.Tensor], home: bool) -> torch.Tensor:
        nonlocal row_lse, positive
        block = _block_scores(scores, held[0], held[1:], home)
        rows, cols, pos = local.lse_stats(block, targets, col_count)
        row_lse = rows if row_lse is None else torch.logaddexp(row_lse, rows)
        if home:
            positive = pos
        return cols

    col_lse = _ring(shard, [scores.b.contiguous(), *_travelling_groups(scores)], step, torch.logaddexp)
    assert row_lse is not None and positive is not None  # the home step always runs
    return LseStats(row_lse, col_lse, positive)


def _ring_offset_backward(local: Primitives, shard: Shard, scores: Scores, terms: OffsetTerms) -> Gradients:
    grad_a: Optional[Tensor] = None
    grad_scale: Optional[Tensor] = None

    def step(held: list[torch.Tensor], home: bool) -> torch.Tensor:
        nonlocal grad_a, grad_scale
        block, offsets, mults, *groups = held
        block_scores = _block_scores(scores, block, groups, home)
        # the positives are columns of this rank's own block: the home step's alone
        block_terms = terms._replace(col_offset=offsets, col_mult=mults)
        if not home:
            block_terms = block_terms._replace(positive_cols=None, positive_mult=None)
        ga, gb, gs = local.offset_backward(block_scores, block_terms)
        grad_a = ga if grad_a is None else grad_a.add_(ga)
        grad_scale = gs if grad_scale is None else grad_scale + gs
        return gb

    travelling = [scores.b.contiguous(), terms.col_offset.contiguous(), terms.col_mult.contiguous()]
    travelling += _travelling_groups(scores)
    grad_b = _ring(shard, travelling, step, torch.add)
    assert grad_a is not None and grad_scale is not None  # the home step always runs
    return Gradients(grad_a, grad_b, grad_scale)


def _ring_sigmoid_sweep(
    local: Primitives, shard: Shard, scores: Scores, terms: SigmoidTerms, with_grads: bool
) -> SigmoidSweep:
    totals: Optional[SigmoidSweep] = None

    def step(held: list[torch.Tensor], home: bool) -> torch.Tensor:
        nonlocal totals
        block, keys, *groups = held
        block_scores = _block_scores(scores, block, groups, home)
        part = local.sigmoid_sweep(block_scores, terms._replace(col_keys=keys), with_grads)
        if totals is None:
            totals = part
        else:
            totals = totals._replace(
                row_loss=totals.row_loss.add_(part.row_loss),
                grad_a=totals.grad_a.add_(part.grad_a),
                grad_scale=totals.grad_scale + part.grad_scale,
                grad_bias=totals.grad_bias + part.grad_bias,
            )
        return part.grad_b  # empty without gradients: nothing travels

    travelling = [scores.b.contiguous(), terms.col_keys.contiguous(), *_travelling_groups(scores)]
    grad_b = _ring(shard, travelling, step, torch.add)
    assert totals is not None  # the home step always runs
    return totals._replace(grad_b=grad_b)


# --------------------------------------------------------------------------- the primitives


class ShardedPrimitives:
    """``local``'s primitives over the global batch of ``shard.group`` (see the module docstring)."""

    def __init__(self, local: Primitives, shard: Shard, dist_impl: str) -> None:
        if dist_impl not in DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {DIST_IMPLS}, got {dist_impl!r}")
        self.local, self.shard, self.dist_impl = local, shard, dist_impl

    # the local calls see this rank's rows against other columns: never one tensor on both sides

    def lse_stats(self, scores: Scores, targets: torch.Tensor, col_count: int) -> LseStats:
        forward = _gather_lse_stats if self.dist_impl == "gather" else _ring_lse_stats
        return forward(self.local, self.shard, scores._replace(shared_operands=False), targets, col_count)

    def offset_backward(self, scores: Scores, terms: OffsetTerms) -> Gradients:
        backward = _gather_offset_backward if self.dist_impl == "gather" else _ring_offset_backward
        return backward(self.local, self.shard, scores._replace(shared_operands=False), terms)

    def sigmoid_sweep(self, scores: Scores, terms: SigmoidTerms, with_grads: bool) -> SigmoidSweep:
        sweep = _gather_sigmoid_sweep if self.dist_impl == "gather" else _ring_sigmoid_sweep
        return sweep(self.local, self.shard, scores._replace(shared_operands=False), terms, with_grads)
