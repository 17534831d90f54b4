"""Multiple-negatives ranking over several directions (sentence-transformers' MNRL at full parity).

Queries ``q`` (``N x D``), documents ``d_all = [d; h_1; …; h_k]`` (each pair's
positive, then ``k`` hard negatives per pair) and the scale ``s``. Row ``i``
of the loss scores its candidates in up to four directions::

    query_to_doc    s·⟨q_i, d_all_j⟩                    every document
    query_to_query  s·⟨q_i, q_j⟩,  j ≠ i                 the other queries
    doc_to_query    s·⟨d_i, q_j⟩                         every query
    doc_to_doc      s·⟨d_i, d_all_j⟩, j not pair i's     the other pairs' documents

    ℓ_i = log Z_i − s·⟨q_i, d_i⟩
    log Z_i = LSE over every selected direction's entries         (partition_mode="joint": GTE)
            = mean over directions of each direction's LSE          ("per_direction")

Hardness weighting (Lan et al. 2025) adds ``α·sim`` to the ``query_to_doc``
logits of the chosen negatives — ``"in_batch_negatives"`` (other pairs'
documents), ``"hard_negatives"`` (the pair's own hard negatives) or
``"all_negatives"`` — with stop-gradient: those entries' logits are
``(s + α)·sim`` and their gradient ``s·∂sim``.

Each direction is one or two blocks of the primitives' scores — a block
runs at its own scale, its excluded entries (the diagonal, another pair's
documents, the penalized or unpenalized set) masked by group ids inside the
tiles — so no ``N x M`` matrix is formed and every backend and exchange
runs it. The pair's own documents (at most ``1 + k`` per row) are scored
directly where hardness gives them a scale of their own.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import torch

from . import validation as v
from .backends import OffsetTerms, Scores
from .driver import Signature, begin
from .function import LossSpec, first_derivative

__all__ = ["DIRECTIONS", "HARDNESS_MODES", "ranking_loss"]

DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
HARDNESS_MODES = ("in_batch_negatives", "hard_negatives", "all_negatives")


class Block(NamedTuple):
    """One block of a direction's scores: rows ``q`` (0) or ``d`` (1), columns ``q`` (0) or ``d_all``
    (1), the scale's value offset ``α`` (stop-gradient), the diagonal excluded, and the group ids
    (rows, columns) of entries excluded where equal (``None``: no mask)."""

    rows: int
    cols: int
    offset: float
    exclude_diagonal: bool
    groups: Optional[tuple[torch.Tensor, torch.Tensor]]


class Plan(NamedTuple):
    """What the Function computes: per direction its blocks, and the pair's own documents that are
    scored directly (block index ``t`` of ``d_all``, scale offset) in ``query_to_doc``."""

    directions: tuple[tuple[Block, ...], ...]
    own_docs: tuple[tuple[int, float], ...]
    joint: bool
    spec: LossSpec


def _block_scores(block: Block, q: torch.Tensor, docs: torch.Tensor, scale: torch.Tensor) -> Scores:
    n = q.shape[0]
    a = q if block.rows == 0 else docs[:n]
    b = q if block.cols == 0 else docs
    s = scale.detach() + block.offset
    if block.groups is None:
        return Scores(a, b, s, block.exclude_diagonal)
    kept = torch.full((n,), -1, dtype=torch.int64, device=q.device)
    return Scores(a, b, s, block.exclude_diagonal, block.groups[0], block.groups[1], kept)


class RankingFunction(torch.autograd.Function):
    """``Σ_i ℓ_i`` (or the mean) of the plan, differentiable in ``q``, ``d_all`` and ``s``."""

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, docs: torch.Tensor, scale: torch.Tensor, plan: Plan
    ) -> torch.Tensor:
        n = q.shape[0]
        primitives = plan.spec.primitives
        with torch.no_grad():
            targets = torch.zeros(n, dtype=torch.int64, device=q.device)
            parts: list[list[torch.Tensor]] = []
            for blocks in plan.directions:
                parts.append(
                    [
                        primitives.lse_stats(_block_scores(b, q, docs, scale), targets, 0).row_lse
                        for b in blocks
                    ]
                )
            acc = parts[0][0].dtype
            s = scale.detach().to(acc)
            own = _own_logits(q, docs, s, plan.own_docs)  # (N, T)
            if own is not None:
                parts[0].append(torch.logsumexp(own, dim=1))
            lse = torch.stack([torch.logsumexp(torch.stack(p), dim=0) for p in parts])  # (directions, N)
            log_z = torch.logsumexp(lse, dim=0) if plan.joint else lse.mean(dim=0)
            positive = s * torch.sum(q.to(acc) * docs[:n].to(acc), dim=1)
            value = (log_z - positive).sum()
            if plan.spec.reduction == "mean":
                value = value / max(n, 1)
        ctx.save_for_backward(q, docs, scale, lse, log_z)
        ctx.plan = plan
        return value

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        return first_derivative(RankingFunction._backward, ctx, grad_output)

    @staticmethod
    def _backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        q, docs, scale, lse, log_z = ctx.saved_tensors
        plan: Plan = ctx.plan
        n, acc = q.shape[0], lse.dtype
        g = grad_output.to(acc).expand(n)
        if plan.spec.reduction == "mean":
            g = g / max(n, 1)
        s = scale.to(acc)
        grad_q = torch.zeros(q.shape, dtype=acc, device=q.device)
        grad_docs = torch.zeros(docs.shape, dtype=acc, device=q.device)
        grad_s = torch.zeros((), dtype=acc, device=q.device)
        no_cols = torch.zeros(0, dtype=acc, device=q.device)
        # the positive −g_i·s·⟨q_i, d_i⟩ goes into G where its entry is formed, before G is rounded
        # to the input dtype, so a saturated row's softmax − 1 cancels as the full-matrix loss's does:
        # in query_to_doc's tiled block, or among the pair's own documents scored directly
        dense_positive = any(block_index == 0 for block_index, _ in plan.own_docs)
        for direction, blocks in enumerate(plan.directions):
            # d log Z / d LSE_direction: its share of the joint sum, or 1/P of the mean
            share = torch.exp(lse[direction] - log_z) if plan.joint else torch.full_like(g, 1 / len(lse))
            weight = g * share
            for block in blocks:
                scores = _block_scores(block, q, docs, scale)
                terms = OffsetTerms(lse[direction], weight, no_cols, no_cols)
                if direction == 0 and block is blocks[0] and not dense_positive:
                    terms = terms._replace(positive_cols=torch.arange(n, device=q.device), positive_mult=g)
                ga, gb, gs = plan.spec.primitives.sweep(scores, terms)
                # the block ran at s + α; the offset α·sim has no gradient: s·G·b, not (s + α)·G·b
                ratio = s / (s + block.offset)
                (grad_q if block.rows == 0 else grad_docs[:n]).add_(ratio * ga)
                (grad_q if block.cols == 0 else grad_docs).add_(ratio * gb)
                grad_s = grad_s + gs
        own = _own_logits(q, docs, s, plan.own_docs)
        if own is not None:
            weight = g * (torch.exp(lse[0] - log_z) if plan.joint else 1 / len(lse))
            probs = weight[:, None] * torch.exp(own - lse[0][:, None])  # (N, T)
            if dense_positive:
                probs[:, [b for b, _ in plan.own_docs].index(0)] -= g
            q_acc = q.to(acc)
            for t, (block_index, _) in enumerate(plan.own_docs):
                rows = slice(block_index * n, (block_index + 1) * n)
                d_acc = docs[rows].to(acc)
                grad_q += (s * probs[:, t])[:, None] * d_acc
                grad_docs[rows] += (s * probs[:, t])[:, None] * q_acc
                grad_s = grad_s + torch.sum(probs[:, t] * torch.sum(q_acc * d_acc, dim=1))
        needs = ctx.needs_input_grad
        return (
            grad_q.to(q.dtype) if needs[0] else None,
            grad_docs.to(docs.dtype) if needs[1] else None,
            grad_s.to(scale.dtype).reshape(scale.shape) if needs[2] else None,
            None,
        )


def _own_logits(
    q: torch.Tensor, docs: torch.Tensor, s: torch.Tensor, own_docs: Sequence[tuple[int, float]]
) -> Optional[torch.Tensor]:
    """``(s + α_t)·⟨q_i, d_all[t·N + i]⟩`` for the pair's own documents scored directly: ``(N, T)``."""
    if not own_docs:
        return None
    n = q.shape[0]
    q_acc = q.to(s.dtype)
    columns = [
        (s + offset) * torch.sum(q_acc * docs[t * n : (t + 1) * n].to(s.dtype), dim=1)
        for t, offset in own_docs
    ]
    return torch.stack(columns, dim=1)


def ranking_loss(
    queries: torch.Tensor,
    documents: Sequence[torch.Tensor],
    scale: float,
    *,
    directions: Sequence[str] = ("query_to_doc",),
    partition_mode: str = "joint",
    hardness_mode: Optional[str] = None,
    hardness_strength: float = 0.0,
    backend: str = "auto",
    process_group: Optional[Any] = None,
    dist_impl: str = "gather",
) -> torch.Tensor:
    """The module docstring's loss, the mean over every rank's pairs.

    Args:
        queries: ``(N, D)``, already normalized for cosine similarity.
        documents: ``[positives (N, D), hard negatives (N, D) …]``.
        scale: ``s > 0``.
        directions, partition_mode, hardness_mode, hardness_strength: as
            sentence-transformers' ``MultipleNegativesRankingLoss`` (which
            requires ``"query_to_doc"``, and ``"per_direction"`` only for
            directions that hold the positive).
        backend, process_group, dist_impl: as :func:`tilecl.contrastive_loss`.
    """
    directions = tuple(directions)

    def check() -> tuple[torch.Tensor, Signature]:
        if not documents:
            raise ValueError("documents needs at least the positives")
        for k, x in enumerate(documents):
            v.check_pair(queries, x, ("anchors", "positives" if k == 0 else f"negatives_{k}"))
            if x.shape[0] != queries.shape[0]:
                raise ValueError(
                    f"every column must have one row per anchor ({queries.shape[0]}), got {x.shape[0]}"
                )
        if not directions or not set(directions) <= set(DIRECTIONS) or "query_to_doc" not in directions:
            raise ValueError(
                f"directions must include 'query_to_doc' and be among {DIRECTIONS}, got {directions}"
            )
        v.check_choice(partition_mode, "partition_mode", ("joint", "per_direction"))
        if partition_mode == "per_direction" and set(directions) & {"query_to_query", "doc_to_doc"}:
            raise ValueError("partition_mode='per_direction' needs every direction to hold the positive pair")
        if hardness_mode is not None:
            v.check_choice(hardness_mode, "hardness_mode", HARDNESS_MODES)
        v.check_nonnegative(hardness_strength, "hardness_strength")
        s = v.check_scale(scale, "scale", queries)
        signature = dict(
            N=queries.shape[0], M=queries.shape[0] * len(documents), D=queries.shape[1], dtype=queries.dtype,
            directions=directions, partition_mode=partition_mode, hardness_mode=hardness_mode,
            hardness_strength=float(hardness_strength),
        )  # fmt: skip
        return s, signature

    run = begin(check, like=queries, backend=backend, process_group=process_group, dist_impl=dist_impl)
    n, k = queries.shape[0], len(documents) - 1
    docs = torch.cat(list(documents))
    device = queries.device
    # global pair ids: an entry (row i, column j) of one pair is found by equal ids across ranks
    pair = torch.arange(n, device=device) + run.ranks.own(n).start
    doc_pairs = pair.repeat(k + 1)
    alpha = float(hardness_strength) if hardness_mode is not None else 0.0
    query_to_doc: list[Block] = []
    own_docs: list[tuple[int, float]] = []
    if alpha == 0.0:
        query_to_doc.append(Block(0, 1, 0.0, False, None))
    elif hardness_mode == "in_batch_negatives":
        # the other pairs' documents at s + α; the pair's own documents at s
        query_to_doc.append(Block(0, 1, alpha, False, (pair, doc_pairs)))
        own_docs += [(t, 0.0) for t in range(k + 1)]
    elif hardness_mode == "hard_negatives":
        # everything at s but the pair's own hard negatives, which get s + α
        outside = torch.full((n,), -1, dtype=torch.int64, device=device) - pair - 1  # no pair's id
        own_hard = torch.cat([outside, pair.repeat(k)])
        query_to_doc.append(Block(0, 1, 0.0, False, (pair, own_hard)))
        own_docs += [(t, alpha) for t in range(1, k + 1)]
    else:  # all_negatives: every negative at s + α, the positive at s
        outside = torch.full((n * k,), -1, dtype=torch.int64, device=device) - pair.repeat(k) - 1
        query_to_doc.append(Block(0, 1, alpha, False, (pair, torch.cat([pair, outside]))))
        own_docs.append((0, 0.0))
    plan_directions: list[tuple[Block, ...]] = [tuple(query_to_doc)]
    if "query_to_query" in directions:
        plan_directions.append((Block(0, 0, 0.0, True, None),))
    if "doc_to_query" in directions:
        plan_directions.append((Block(1, 0, 0.0, False, None),))
    if "doc_to_doc" in directions:
        plan_directions.append((Block(1, 1, 0.0, False, (pair, doc_pairs)),))
    spec = run.spec(symmetric=False, exclude_diagonal=False)
    plan = Plan(tuple(plan_directions), tuple(own_docs), partition_mode == "joint", spec)
    scale_tensor = run.checked
    value: torch.Tensor = RankingFunction.apply(queries, docs, scale_tensor, plan)
    return run.global_loss(value, n)
