"""The global contrastive loss across ranks (torch.distributed), without any rank holding N×N.

``dist_impl="gather"``: every rank all-gathers the features (O(N_global·D)
per rank), computes the row direction for *its* rows against all columns and
the column direction for *its* columns against all rows, tile by tile, and
the all-gather's backward routes the gradients of gathered features back to
their owners.

Gradient convention (documented because open_clip's users were confused by
world-size factors): the returned value is the **global** loss on every rank
(logs show the true loss), and its backward gives each rank
``world_size × ∂(its share)/∂(inputs)``, so that DistributedDataParallel's
gradient *average* equals the single-process gradient of the global loss.
Without DDP, average the parameter gradients across ranks yourself
(``all_reduce`` then divide by ``world_size``), which is what DDP does.

Batch sizes must be equal on all ranks; otherwise every rank raises the same
error (no hang).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from . import _validation as v

__all__ = ["gather_contrastive_loss"]

DIST_IMPLS = ("gather", "ring")


def _check_equal_sizes(n: int, m: int, group) -> int:
    """All ranks' (N, M); raises the same error on every rank when they differ."""
    world = dist.get_world_size(group)
    sizes = torch.tensor([n, m], dtype=torch.int64)
    gathered = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(gathered, sizes, group=group)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        shapes = [tuple(g.tolist()) for g in gathered]
        raise ValueError(f"the distributed loss needs equal (N, M) batch sizes on every rank, got {shapes}")
    return world


def gather_contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: v.Scale,
    *,
    symmetric: bool = True,
    process_group: Optional[dist.ProcessGroup] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The global InfoNCE/CLIP loss over all ranks' pairs (row ``i`` of ``a`` with row ``i`` of ``b``).

    Args:
        a: ``(N, D)`` this rank's anchors; b: ``(M, D)``, ``M ≥ N`` (rows
            ``N..M-1``: this rank's hard negatives, shared with every rank).
        logit_scale: as :func:`tilecl.contrastive_loss` (same value on every rank).
        process_group: the group (default: the default group).

    Returns:
        The global loss (mean over the ``N·world_size`` pairs) on every rank,
        with the gradient convention of the module docstring.
    """
    from .contrastive import contrastive_loss

    v.check_pair(a, b)
    n, m = a.shape[0], b.shape[0]
    v.check_symmetric(symmetric, n, m)
    world = _check_equal_sizes(n, m, process_group)
    rank = dist.get_rank(process_group)
    all_b = torch.cat(dist_fn.all_gather(b, group=process_group))
    pair_cols = rank * m + torch.arange(n, device=a.device)  # my pairs' columns among all ranks' b rows
    share = contrastive_loss(
        a, all_b, logit_scale, labels=pair_cols, symmetric=False, reduction="sum", backend=backend
    )
    if symmetric:
        all_a = torch.cat(dist_fn.all_gather(a, group=process_group))
        pair_rows = rank * n + torch.arange(n, device=a.device)
        share = share + contrastive_loss(
            b[:n], all_a, logit_scale, labels=pair_rows, symmetric=False, reduction="sum", backend=backend
        )
        share = share / 2
    return global_value(share / (n * world), world, process_group)


def global_value(share: torch.Tensor, world: int, group) -> torch.Tensor:
    """Value: the sum of every rank's ``share`` (the global loss); gradient: ``world ×`` this rank's share.

    DistributedDataParallel averages gradients over ranks, so the factor makes
    its average the single-process gradient of the global loss.
    """
    total = share.detach().clone()
    dist.all_reduce(total, group=group)
    return world * share + (total - world * share).detach()
