"""The ``sharded`` backends: a local backend's primitives over the global batch of a process group.

``a`` and ``b`` are this rank's shards of the global ``A = [a_0; a_1; …]`` and
``B = [b_0; b_1; …]``, and

* ``lse_stats`` returns the row LSE of this rank's rows over **all** columns,
  the column LSE of this rank's columns over **all** rows, and the positive
  logits of this rank's (rank-local) targets;
* ``sweep`` takes this rank's row and column terms of any form and returns
  ``∂/∂a`` and ``∂/∂b`` of the *global* sum ``Σ G_ij S_ij``, this rank's rows'
  values over **all** columns, and this rank's part of each 0-d output (the
  scale's gradient ``Σ G_ij a_i·b_j``). The form's entry
  (:class:`~tilecl.backends.base.Form`) says which terms travel with the
  columns, which refer to the own block only, and how each output merges:
  one gather sweep, one ring sweep and one empty-block sweep serve every form.

The losses' autograd Function runs unchanged on top; the agreement before any
exchange, the global reduction and the gradient convention are
:mod:`tilecl.distributed`'s, the collectives themselves (uneven gather and
reduce-scatter, log-sum-exp across ranks) :mod:`tilecl.collectives`'. Two
implementations (``dist_impl``):

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
import math
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from ..collectives import DIST_IMPLS, control_tensor, gather_plain, reduce_scatter_uneven, shifted_sum_across
from .base import Form, LseStats, Primitives, Scores, accumulation_dtype, form_of, lse_parts, merge_lse

__all__ = ["DIST_IMPLS", "Shard", "ShardedPrimitives"]

_P = TypeVar("_P")


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

    def rolled(self, parts: list[_P]) -> list[_P]:
        """Own part first: the home block's local diagonal is then the global one."""
        return parts[self.rank :] + parts[: self.rank]

    def layout(self, b: torch.Tensor, col_count: int) -> Layout:
        """Every rank's columns of ``b`` and columns with statistics (one small all-gather per call:
        the backward of the same call reuses it).

        Kept per column tensor, by identity: a loss of several blocks (distillation, ranking) has
        several, and on a rank of zero rows they all have shape ``(0, D)`` — a key by shape would
        hit there and miss on the other ranks, which would then wait in a collective for it.
        """
        key = ("layout", id(b), col_count)
        kept = self.kept.get(key)
        if kept is None or kept[0] is not b:
            mine = control_tensor([b.shape[0], col_count], self.group)
            every = [torch.zeros_like(mine) for _ in range(self.world)]
            dist.all_gather(every, mine, group=self.group)
            table = torch.stack(every).tolist()
            kept = (b, Layout(tuple(r[0] for r in table), tuple(r[1] for r in table)))
            self.kept[key] = kept
        return kept[1]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Every rank's ``b`` rows (``cols``) and how many of them come first with statistics
    (``stats``), rank order."""

    cols: tuple[int, ...]
    stats: tuple[int, ...]


# --------------------------------------------------------------------------- gather


def _arranged_columns(shard: Shard, blocks: list[torch.Tensor], layout: Layout) -> torch.Tensor:
    """Gathered ``b`` blocks, own first, with every block's columns with statistics up front.

    The local primitives return column statistics for a prefix of the
    columns, so the columns that have statistics (every rank's pair columns)
    must come first; the hard negatives follow. Blocks may differ in size.
    """
    rolled = shard.rolled(list(zip(blocks, layout.stats)))
    if any(0 < c < x.shape[0] for x, c in rolled):
        return torch.cat([x[:c] for x, c in rolled] + [x[c:] for x, c in rolled])
    return torch.cat([x for x, _ in rolled])


def _split_arranged(shard: Shard, arranged: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """Inverse of :func:`_arranged_columns`: per-rank blocks in rank order."""
    rolled = shard.rolled(list(zip(layout.cols, layout.stats)))
    if any(0 < c < m for m, c in rolled):
        heads = arranged[: sum(c for _, c in rolled)].split([c for _, c in rolled])
        tails = arranged[sum(c for _, c in rolled) :].split([m - c for m, c in rolled])
        blocks = [torch.cat([h, t]) for h, t in zip(heads, tails)]
    else:
        blocks = list(arranged.split([m for m, _ in rolled]))
    back = shard.world - shard.rank
    return blocks[back:] + blocks[:back]


def _tail_shift(shard: Shard, layout: Layout) -> int:
    """How far a column of this rank's block past its statistics prefix moves in the arranged
    columns: past every other rank's prefix."""
    return sum(layout.stats) - layout.stats[shard.rank]


def _gathered_columns(shard: Shard, b: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Every rank's ``b``, arranged; gathered once per call and kept until the backward.

    Keeping them (as an all-gather with autograd would) saves the backward's
    second all-gather: a third of the gather implementation's traffic.
    """
    # by identity and version, not address: every empty tensor has address 0 (see Shard.layout)
    key = (id(b), b._version, layout)
    if shard.kept.get("key") != key or shard.kept.get("b") is not b:
        shard.kept["key"], shard.kept["b"] = key, b
        shard.kept["columns"] = _arranged_columns(shard, gather_plain(b, shard.group, layout.cols), layout)
    return shard.kept["columns"]


def _with_gathered_groups(shard: Shard, scores: Scores, columns: Tensor, layout: Layout) -> Scores:
    """``scores`` over the gathered ``columns``: every rank's column group ids, arranged as the columns.

    The kept (positive) columns index this rank's block, which comes first;
    a kept column past the statistics prefix moves with the block's tail.
    """
    scores = scores._replace(b=columns)
    if not scores.masked:
        return scores
    _, col_groups, kept = scores.group_mask()
    groups = _arranged_columns(shard, gather_plain(col_groups, shard.group, layout.cols), layout)
    own = layout.stats[shard.rank]
    if 0 < own < col_groups.shape[0]:
        kept = torch.where(kept >= own, kept + _tail_shift(shard, layout), kept)
    return scores._replace(col_groups=groups, kept_cols=kept)


def _gather_lse_stats(
    local: Primitives, shard: Shard, scores: Scores, targets: Tensor, col_count: int
) -> LseStats:
    _check_layout(scores.exclude_diagonal, col_count, scores.b.shape[0])
    layout = shard.layout(scores.b, col_count)
    columns = _gathered_columns(shard, scores.b, layout)
    stats = local.lse_stats(_with_gathered_groups(shard, scores, columns, layout), targets, sum(layout.stats))
    if not any(layout.stats):
        return stats
    # the partials come in rolled order (own block first): back to rank order, merged over all
    # ranks' rows, then this rank's
    peak, total = shifted_sum_across(
        torch.cat(_unrolled(shard, stats.col_lse, layout)),
        torch.cat(_unrolled(shard, stats.col_lse_low, layout)),
        shard.group,
    )
    merged, merged_low = lse_parts(peak, total)
    mine = slice(sum(layout.stats[: shard.rank]), sum(layout.stats[: shard.rank + 1]))
    return stats._replace(col_lse=merged[mine], col_lse_low=merged_low[mine])


def _unrolled(shard: Shard, rolled: Tensor, layout: Layout) -> list[Tensor]:
    """A vector of per-rank parts in rolled order (own first), as parts in rank order."""
    parts = list(rolled.split(shard.rolled(list(layout.stats))))
    back = shard.world - shard.rank
    return parts[back:] + parts[:back]


def _shifted_pointers(shard: Shard, layout: Layout, form: Form, terms: Any, m: int) -> Any:
    """The row terms that hold a column of this rank's block, in the arranged columns: the block
    comes first, and past its statistics prefix a column moves with the block's tail (as the kept
    columns of the group mask)."""
    own = layout.stats[shard.rank]
    if not form.column_pointers or not 0 < own < m:
        return terms
    shift = _tail_shift(shard, layout)
    moved = {
        f: torch.where(x >= own, x + shift, x)
        for f in form.column_pointers
        if (x := getattr(terms, f)) is not None
    }
    return terms._replace(**moved)


def _gather_sweep(local: Primitives, shard: Shard, scores: Scores, terms: Any, with_grads: bool) -> Any:
    form = form_of(terms)
    m, col_count = scores.b.shape[0], form.column_count(terms)
    _check_layout(scores.exclude_diagonal, col_count, m)
    layout = shard.layout(scores.b, col_count)
    columns = _gathered_columns(shard, scores.b, layout)
    if with_grads:
        shard.kept.clear()  # the sweep with gradients is the last use
    travelled = {}
    for field, per in form.column_terms.items():
        sizes = layout.stats if per == "stats" else layout.cols
        if any(sizes):
            parts = gather_plain(getattr(terms, field), shard.group, sizes)
            travelled[field] = (
                torch.cat(shard.rolled(parts)) if per == "stats" else _arranged_columns(shard, parts, layout)
            )
    terms = _shifted_pointers(shard, layout, form, terms._replace(**travelled), m)
    result = local.sweep(_with_gathered_groups(shard, scores, columns, layout), terms, with_grads)
    if not with_grads:
        return result
    column_output = _column_output(form)
    grad_b = reduce_scatter_uneven(
        _split_arranged(shard, getattr(result, column_output), layout), shard.group
    )
    return result._replace(**{column_output: grad_b})


def _column_output(form: Form) -> str:
    """The output per row of ``b``, which goes back to the columns' owner."""
    return next(field for field, code in form.outputs.items() if code == "MD")


def _check_layout(exclude_diagonal: bool, col_count: int, m: int) -> None:
    # the losses that exclude the diagonal (NT-Xent, uniformity) have no column statistics
    if exclude_diagonal and 0 < col_count < m:
        raise NotImplementedError("exclude_diagonal with column statistics on part of the columns")


# --------------------------------------------------------------------------- ring


def _ring(
    shard: Shard,
    travelling: list[torch.Tensor],
    sizes: Sequence[Sequence[int]],
    step: Callable[[list[torch.Tensor], int], torch.Tensor],
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    result_sizes: Sequence[int],
) -> torch.Tensor:
    """One lap of the ring; returns the accumulator of this rank's own block.

    Blocks may differ in size from rank to rank: ``sizes[k]`` is every rank's
    leading size of ``travelling[k]``, ``result_sizes`` every rank's of the
    accumulator (all 0 when nothing accumulates), so each receive is posted
    with the shape its sender has.

    At step ``t`` a rank holds the block of rank ``rank − t`` (``step`` gets it
    and its owner). One batch of
    point-to-point ops per step sends on the accumulator finished at step
    ``t − 1`` and the block in hand, and receives this step's accumulator so
    far and the next block; the step's part (``step``) is computed while they
    travel, then added (``combine``). Every send is in a batch with the
    matching receives, in the same order on both sides — NCCL pairs batched
    ops in order, and a lone send would wait for a receive posted behind the
    peer's own send. At most two accumulators are alive: ``O(n·D)`` per rank.
    """
    if shard.world == 1:
        return step(travelling, shard.rank)
    group, after, before = shard.group, shard.peer(1), shard.peer(-1)
    held, finished = travelling, None

    def exchange(send: list[torch.Tensor], receive: list[torch.Tensor]) -> list:
        ops = [dist.P2POp(dist.isend, x, after, group) for x in send if x.numel()]
        ops += [dist.P2POp(dist.irecv, x, before, group) for x in receive if x.numel()]
        return dist.batch_isend_irecv(ops) if ops else []

    def like(x: torch.Tensor, rows: int) -> torch.Tensor:
        return x.new_empty((rows, *x.shape[1:]))

    for t in range(shard.world):
        sends, receives = [], []
        accumulated = incoming = None
        if finished is not None:
            # the accumulator of the block in hand: rank (rank − t)'s
            accumulated = like(finished, result_sizes[(shard.rank - t) % shard.world])
            sends.append(finished)
            receives.append(accumulated)
        if t < shard.world - 1:
            owner = (shard.rank - t - 1) % shard.world
            incoming = [like(x, size[owner]) for x, size in zip(held, sizes)]
            sends += held
            receives += incoming
        requests = exchange(sends, receives)
        part = step(held, (shard.rank - t) % shard.world)
        for request in requests:
            request.wait()
        finished = (part if accumulated is None else combine(accumulated, part)).contiguous()
        held = incoming if incoming is not None else held
    assert finished is not None  # world >= 2 steps ran
    own = like(finished, result_sizes[shard.rank])
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
    rows: Optional[tuple[Tensor, Tensor]] = None
    positive: Optional[Tensor] = None
    layout = shard.layout(scores.b, col_count)

    def step(held: list[torch.Tensor], owner: int) -> torch.Tensor:
        nonlocal rows, positive
        home = owner == shard.rank
        block = _block_scores(scores, held[0], held[1:], home)
        # the column statistics of the block in hand: its owner's columns with statistics
        part = local.lse_stats(block, targets, layout.stats[owner])
        mine = (part.row_lse, part.row_lse_low)
        rows = mine if rows is None else merge_lse(*rows, *mine)
        if home:
            positive = part.positive
        # a column's LSE and its low part travel together, as (count, 2)
        return torch.stack([part.col_lse, part.col_lse_low], dim=1)

    travelling = [scores.b.contiguous(), *_travelling_groups(scores)]
    sizes = [layout.cols] * len(travelling)
    cols = _ring(shard, travelling, sizes, step, _merge_lse_pairs, layout.stats)
    assert rows is not None and positive is not None  # the home step always runs
    return LseStats(rows[0], cols[:, 0].contiguous(), positive, rows[1], cols[:, 1].contiguous())


def _merge_lse_pairs(x: Tensor, y: Tensor) -> Tensor:
    """:func:`~tilecl.backends.base.merge_lse` of two ``(count, 2)`` stacks of (LSE, low part)."""
    return torch.stack(merge_lse(x[:, 0], x[:, 1], y[:, 0], y[:, 1]), dim=1)


def _ring_sweep(local: Primitives, shard: Shard, scores: Scores, terms: Any, with_grads: bool) -> Any:
    form = form_of(terms)
    layout = shard.layout(scores.b, form.column_count(terms))
    moving = list(form.column_terms)
    total: Any = None
    column_output = _column_output(form)

    def step(held: list[torch.Tensor], owner: int) -> torch.Tensor:
        nonlocal total
        home = owner == shard.rank
        block, groups = held[0], held[1 + len(moving) :]
        block_terms = terms._replace(**dict(zip(moving, held[1 : 1 + len(moving)])))
        if not home:
            # the home terms refer to this rank's own columns: the home step's alone
            block_terms = block_terms._replace(**dict.fromkeys(form.home_terms))
        part = local.sweep(_block_scores(scores, block, groups, home), block_terms, with_grads)
        total = part if total is None else form.merged(total, part)
        return getattr(part, column_output)  # empty without gradients: nothing travels

    travelling = [scores.b.contiguous(), *(getattr(terms, f).contiguous() for f in moving)]
    travelling += _travelling_groups(scores)
    sizes = [layout.cols, *(layout.stats if form.column_terms[f] == "stats" else layout.cols for f in moving)]
    sizes += [layout.cols] * (len(travelling) - len(sizes))
    result_sizes = layout.cols if with_grads else (0,) * shard.world
    grad_b = _ring(shard, travelling, sizes, step, torch.add, result_sizes)
    assert total is not None  # the home step always runs
    return total._replace(**{column_output: grad_b})


# --------------------------------------------------------------------------- the primitives


class _EmptyBlocks:
    """``local``'s primitives, answering a block with no rows or no columns without a kernel.

    A rank may hold no rows, or a ring step a block of no columns (its owner's
    batch is empty); the rank still takes part in every exchange, its block's
    results are the empty ones (an LSE over nothing is ``-inf``, a gradient 0).
    """

    def __init__(self, local: Primitives) -> None:
        self.local = local

    @staticmethod
    def _empty(scores: Scores) -> bool:
        return scores.a.shape[0] == 0 or scores.b.shape[0] == 0

    @staticmethod
    def _zeros(scores: Scores, *shape: int) -> torch.Tensor:
        return scores.a.new_zeros(shape, dtype=accumulation_dtype(scores.a.dtype))

    def lse_stats(self, scores: Scores, targets: torch.Tensor, col_count: int) -> LseStats:
        if not self._empty(scores):
            return self.local.lse_stats(scores, targets, col_count)
        n = scores.a.shape[0]
        return LseStats(
            self._zeros(scores, n) - math.inf,
            self._zeros(scores, col_count) - math.inf,
            self._zeros(scores, n),
            self._zeros(scores, n),
            self._zeros(scores, col_count),
        )

    def sweep(self, scores: Scores, terms: Any, with_grads: bool = True) -> Any:
        if not self._empty(scores):
            return self.local.sweep(scores, terms, with_grads)
        form = form_of(terms)
        form.check(with_grads)
        return form.zeros(scores, accumulation_dtype(scores.a.dtype), with_grads)


class ShardedPrimitives:
    """``local``'s primitives over the global batch of ``shard.group`` (see the module docstring)."""

    def __init__(self, local: Primitives, shard: Shard, dist_impl: str) -> None:
        if dist_impl not in DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {DIST_IMPLS}, got {dist_impl!r}")
        self.local: Primitives = _EmptyBlocks(local)
        self.shard, self.dist_impl = shard, dist_impl

    # the local calls see this rank's rows against other columns: never one tensor on both sides

    def lse_stats(self, scores: Scores, targets: torch.Tensor, col_count: int) -> LseStats:
        forward = _gather_lse_stats if self.dist_impl == "gather" else _ring_lse_stats
        return forward(self.local, self.shard, scores._replace(shared_operands=False), targets, col_count)

    def sweep(self, scores: Scores, terms: Any, with_grads: bool = True) -> Any:
        sweep = _gather_sweep if self.dist_impl == "gather" else _ring_sweep
        return sweep(self.local, self.shard, scores._replace(shared_operands=False), terms, with_grads)
