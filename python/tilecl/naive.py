"""The full-matrix losses tilecl replaces (what open_clip's ClipLoss computes).

They materialize the ``N x M`` logits and run ``cross_entropy`` on them, in the
input dtype. Tests use them for the "≤ 2× the error of naive PyTorch in the
same dtype" rule; benchmarks and the demo use them as the baseline.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

__all__ = ["naive_contrastive_loss", "naive_nt_xent_loss", "naive_sigmoid_loss"]


def naive_contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: Union[float, torch.Tensor] = 1.0,
    *,
    labels: Optional[torch.Tensor] = None,
    symmetric: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Same definition as :func:`tilecl.contrastive_loss`, with ``S`` stored whole."""
    n = a.shape[0]
    targets = torch.arange(n, device=a.device) if labels is None else labels.long()
    logits = logit_scale * a @ b.t()
    per_pair = F.cross_entropy(logits, targets, reduction="none")
    if symmetric:
        per_pair = (
            per_pair
            + F.cross_entropy(logits.t()[targets], torch.arange(n, device=a.device), reduction="none")
        ) / 2
    if reduction == "mean":
        return per_pair.mean()
    if reduction == "sum":
        return per_pair.sum()
    return per_pair


def naive_nt_xent_loss(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, *, reduction: str = "mean"
) -> torch.Tensor:
    """SimCLR's NT-Xent with the ``2N x 2N`` similarity matrix stored whole."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.t() / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    partners = torch.arange(2 * n, device=z.device).roll(n)
    return F.cross_entropy(logits, partners, reduction=reduction)


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
