"""A cross-batch memory of embeddings (MoCo's queue, XBM): earlier batches as extra negatives.

A ring buffer of ``size`` entries, each an embedding, an id (the sample's, its
class's or its group's) and the step that wrote it. After a training step the
batch is enqueued without gradient; the next steps read the live entries as
the hard-negative columns of any tilecl softmax loss, their ids as the
columns' group ids, so an entry that shares the anchor's id (its own earlier
copy, a duplicate) is masked as a false negative inside the tiles::

    queue = tilecl.MemoryQueue(65536, 128, max_age=100)
    memory = queue.entries()
    loss = tilecl.contrastive_loss(
        a, b, scale, negatives=memory.embeddings,
        row_groups=ids, col_groups=torch.cat([ids, memory.ids]),
    )
    loss.backward()
    queue.enqueue(b, ids)          # detached; every rank enqueues every rank's batch

The loss's extra memory is ``O((N + K)·D)`` for ``K`` live entries (no
``N x K`` similarity). Across ranks (``process_group`` / ``device_mesh``)
``enqueue`` gathers every rank's rows first, so all ranks hold the same queue.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import nn

from . import validation as v
from .collectives import gather_plain, leading_sizes
from .distributed import agree, agree_on_call, resolve_group

__all__ = ["MemoryEntries", "MemoryQueue"]


class MemoryEntries(NamedTuple):
    """The live entries, oldest first: ``embeddings`` ``(K, D)`` (no gradient), ``ids`` ``(K,)``
    int64, ``steps`` ``(K,)`` int64 (the step that wrote each)."""

    embeddings: torch.Tensor
    ids: torch.Tensor
    steps: torch.Tensor


class MemoryQueue(nn.Module):
    """A fixed-size queue of ``(embedding, id, step)``; see the module docstring.

    Args:
        size: entries held (the oldest are overwritten).
        dim: the embeddings' ``D``.
        max_age: entries written more than ``max_age`` steps ago are not
            returned (``0``: only the last step's; ``None``: any age).
        dtype: the stored embeddings' dtype (``.to()`` / ``.half()`` cast it).
        process_group, device_mesh, mesh_dim: as :func:`tilecl.contrastive_loss`;
            ``enqueue`` then gathers every rank's rows (sizes may differ).

    Buffers (in ``state_dict``, so a resumed run continues exactly):
    ``embeddings``, ``ids``, ``steps`` (``-1``: empty), ``step`` (the number
    of ``enqueue`` calls), ``head`` (the next slot). ``skipped_steps`` (not
    saved) counts enqueues refused for non-finite embeddings.
    """

    embeddings: torch.Tensor
    ids: torch.Tensor
    steps: torch.Tensor
    step: torch.Tensor
    head: torch.Tensor
    skipped_steps: torch.Tensor

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        max_age: Optional[int] = None,
        dtype: torch.dtype = torch.float32,
        process_group: Optional[Any] = None,
        device_mesh: Optional[Any] = None,
        mesh_dim: Union[int, str, None] = None,
    ) -> None:
        super().__init__()
        self.size = v.check_count(size, "size")
        self.dim = v.check_count(dim, "dim")
        self.max_age = None if max_age is None else v.check_count(max_age, "max_age", minimum=0)
        if dtype not in v.FLOAT_DTYPES:
            raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype}")
        self.process_group = resolve_group(process_group, device_mesh, mesh_dim)
        self.register_buffer("embeddings", torch.zeros(size, dim, dtype=dtype))
        self.register_buffer("ids", torch.zeros(size, dtype=torch.int64))
        self.register_buffer("steps", torch.full((size,), -1, dtype=torch.int64))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("head", torch.zeros((), dtype=torch.int64))
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.int64), persistent=False)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, max_age={self.max_age}"

    def entries(self) -> MemoryEntries:
        """The live entries (written, and not older than ``max_age``), oldest first."""
        order = (torch.arange(self.size, device=self.head.device) + self.head) % self.size
        steps = self.steps[order]
        live = steps >= 0
        if self.max_age is not None:
            live &= steps >= self.step - 1 - self.max_age
        keep = order[live]
        return MemoryEntries(self.embeddings[keep].detach(), self.ids[keep], self.steps[keep])

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, ids: torch.Tensor) -> None:
        """Write ``(N, D)`` embeddings (detached, cast to the queue's dtype) and their ``(N,)`` ids,
        as one step. Across ranks every rank's rows are written on every rank, in rank order.

        Refused before anything is written: a wrong shape or id dtype (an error on every rank);
        any non-finite embedding on any rank (a warning; the step writes nothing and counts in
        ``skipped_steps``).
        """
        group = self.process_group
        failure: Optional[Exception] = None
        try:
            with v.empty_batches_allowed(group is not None):  # a rank may hold no rows
                v.check_features(embeddings, "embeddings")
            if embeddings.shape[1] != self.dim:
                raise ValueError(
                    f"embeddings must have D = {self.dim} (the queue's), got {embeddings.shape[1]}"
                )
            v.check_ids(ids, "ids", embeddings.shape[0], embeddings, "ids")
        except Exception as error:  # every rank must hear of it before any exchange
            if group is None:
                raise
            failure = error
        if group is not None:
            try:
                agree(failure, group, "MemoryQueue.enqueue")
            finally:
                failure = None
            # every rank sends its rows in its queue's dtype: queues that differ would exchange
            # buffers of different sizes (a transport abort), so that is refused on every rank first
            agree_on_call(group, "MemoryQueue.enqueue", D=self.dim, queue_dtype=self.embeddings.dtype)
        # cast first: a value finite in the input may not be in the queue's dtype (1e5 in float16),
        # and every rank then sends the same dtype
        rows = embeddings.detach().to(device=self.embeddings.device, dtype=self.embeddings.dtype)
        keys = ids.long().to(self.ids.device)
        finite = torch.isfinite(rows).all().reshape(1).to(torch.int64)
        if group is not None:
            sizes = leading_sizes(rows, group)
            rows = torch.cat(gather_plain(rows.contiguous(), group, sizes))
            keys = torch.cat(gather_plain(keys.contiguous(), group, sizes))
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN, group=group)
        if not bool(finite):
            self.skipped_steps += 1
            warnings.warn(
                "MemoryQueue.enqueue: non-finite embeddings; this step enqueued nothing", stacklevel=2
            )
            return
        n = rows.shape[0]
        if n > self.size:  # only the newest size rows survive
            rows, keys, n = rows[-self.size :], keys[-self.size :], self.size
        slots = (self.head + torch.arange(n, device=self.head.device)) % self.size
        self.embeddings[slots] = rows
        self.ids[slots] = keys
        self.steps[slots] = self.step
        self.head.copy_((self.head + n) % self.size)
        self.step += 1
