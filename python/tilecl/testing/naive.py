"""The full-matrix losses tilecl replaces (what open_clip's ClipLoss computes).

They materialize the ``N x M`` logits and run ``cross_entropy`` on them, in the
input dtype. Tests use them for the "≤ 2× the error of naive PyTorch in the
same dtype" rule; benchmarks and the demo use them as the baseline.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

__all__ = [
    "naive_contrastive_loss",
    "naive_distill_clip_loss",
    "naive_nt_xent_loss",
    "naive_sigmoid_loss",
    "naive_supcon_loss",
]


def _reduce(per_pair: torch.Tensor, reduction: str, weights: Optional[torch.Tensor]) -> torch.Tensor:
    if weights is not None:
        # weighted in float64: float32 weights of 1e-39 are subnormal there, normal here
        w = weights.to(torch.float64)
        weighted = torch.where(w == 0, 0.0, per_pair.to(torch.float64) * w)  # weight 0: left out
        if reduction == "mean":
            weighted = weighted.sum() / w.sum().clamp_min(torch.finfo(torch.float64).tiny)
        elif reduction == "sum":
            weighted = weighted.sum()
        return weighted.to(per_pair.dtype)
    if reduction == "mean":
        return per_pair.mean()
    if reduction == "sum":
        return per_pair.sum()
    return per_pair


def _mask_false_negatives(
    logits: torch.Tensor, targets: torch.Tensor, row_groups: torch.Tensor, col_groups: torch.Tensor
) -> torch.Tensor:
    """``-inf`` where the group ids are equal and the column is not the row's positive (an N x M mask)."""
    same = row_groups[:, None] == col_groups[None, :]
    positive = targets[:, None] == torch.arange(logits.shape[1], device=logits.device)[None, :]
    return logits.masked_fill(same & ~positive, float("-inf"))


def naive_contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: Union[float, torch.Tensor] = 1.0,
    *,
    labels: Optional[torch.Tensor] = None,
    symmetric: bool = True,
    reduction: str = "mean",
    row_groups: Optional[torch.Tensor] = None,
    col_groups: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Same definition as :func:`tilecl.contrastive_loss`, with ``S`` stored whole."""
    n = a.shape[0]
    targets = torch.arange(n, device=a.device) if labels is None else labels.long()
    logits = logit_scale * a @ b.t()
    if row_groups is not None and col_groups is not None:
        logits = _mask_false_negatives(logits, targets, row_groups, col_groups)
    per_pair = F.cross_entropy(logits, targets, reduction="none")
    if symmetric:
        per_pair = (
            per_pair
            + F.cross_entropy(logits.t()[targets], torch.arange(n, device=a.device), reduction="none")
        ) / 2
    return _reduce(per_pair, reduction, weights)


def naive_nt_xent_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.5,
    *,
    reduction: str = "mean",
    groups: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """SimCLR's NT-Xent with the ``2N x 2N`` similarity matrix stored whole."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.t() / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    partners = torch.arange(2 * n, device=z.device).roll(n)
    if groups is not None:
        ids = torch.cat([groups, groups])
        logits = _mask_false_negatives(logits, partners, ids, ids)
    per_view = F.cross_entropy(logits, partners, reduction="none")
    return _reduce(per_view, reduction, None if weights is None else torch.cat([weights, weights]))


def naive_supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.1,
    *,
    columns: Optional[torch.Tensor] = None,
    column_labels: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Supervised contrastive loss (``L_out``) from the stored similarity matrix and positive mask."""
    a = F.normalize(features, dim=1)
    b = a if columns is None else F.normalize(columns, dim=1)
    col_labels = labels if column_labels is None else column_labels
    logits = a @ b.t() / temperature
    positive = labels[:, None] == col_labels[None, :]
    if columns is None:
        eye = torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
        logits = logits.masked_fill(eye, float("-inf"))
        positive = positive & ~eye
    counts = positive.sum(dim=1)
    mean_positive = torch.where(positive, logits, 0.0).sum(dim=1) / counts.clamp(min=1)
    per_anchor = torch.logsumexp(logits, dim=1) - mean_positive
    has = (counts > 0).to(per_anchor.dtype)
    pair_weights = has if weights is None else has * weights.to(per_anchor.dtype)
    return _reduce(torch.where(counts > 0, per_anchor, 0.0), reduction, pair_weights)


def naive_sigmoid_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: Union[float, torch.Tensor] = 1.0,
    logit_bias: Union[float, torch.Tensor, None] = None,
    *,
    labels: Optional[torch.Tensor] = None,
    row_groups: Optional[torch.Tensor] = None,
    col_groups: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """open_clip's ``SigLipLoss`` formula, ``−logsigmoid(z ∘ ℓ)`` over the stored ``N x M`` logits."""
    n, m = a.shape[0], b.shape[0]
    logits = logit_scale * a @ b.t()
    if logit_bias is not None:
        logits = logits + logit_bias
    if row_groups is not None and col_groups is not None:
        positive = row_groups[:, None] == col_groups[None, :]
    else:
        targets = torch.arange(n, device=a.device) if labels is None else labels.long()
        positive = targets[:, None] == torch.arange(m, device=a.device)[None, :]
    signs = torch.where(positive, 1.0, -1.0).to(logits.dtype)
    per_row = -F.logsigmoid(signs * logits).sum(dim=1)
    if reduction == "mean":
        return per_row.sum() / n
    if reduction == "sum":
        return per_row.sum()
    return per_row


def naive_distill_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Union[float, torch.Tensor],
    dist_image_features: torch.Tensor,
    dist_text_features: torch.Tensor,
    dist_logit_scale: Union[float, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's ``DistillClipLoss`` (one process): ``(contrastive_loss, distill_loss)`` from the
    student's and the teacher's stored ``N x N`` logits."""
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logits_per_image.T
    dist_logits_per_image = dist_logit_scale * dist_image_features @ dist_text_features.T
    dist_logits_per_text = dist_logits_per_image.T
    labels = torch.arange(image_features.shape[0], device=image_features.device)
    contrastive = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2

    def dist_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean(dim=0)

    distill = (
        dist_loss(dist_logits_per_image, logits_per_image) + dist_loss(dist_logits_per_text, logits_per_text)
    ) / 2
    return contrastive, distill
