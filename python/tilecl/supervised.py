"""The supervised contrastive loss (SupCon, Khosla et al. 2020, ``L_out``): same-class samples are positives.

For anchor ``i`` with positives ``P(i)`` (same class, not ``i`` itself)::

    ℓ_i = LSE_{j ≠ i} S_ij − (1/|P(i)|) Σ_{p ∈ P(i)} S_ip,       S = a bᵀ / τ

The first term is the streaming forward and the offset backward of every
softmax loss, with the diagonal excluded. The second is linear in the
features: ``Σ_{p ∈ P(i)} S_ip = a_i · (Σ_{p ∈ P(i)} b_p) / τ``, and the sum is
the class sum of ``b`` minus ``b_i`` — ``O(N·D)`` from per-class sums, never a
mask matrix. It enters the shared autograd Function as the decoupled positive
(:func:`tilecl.contrastive_loss`'s ``positives``), whose gradient flows back
through the class sums by autograd. Anchors without a positive are left out
of the mean (weight 0) and counted (:class:`SupConOutput`), never a silent 0.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from . import validation as v
from .backends.base import accumulation_dtype
from .distributed import resolve_group
from .driver import Signature, begin
from .function import apply_loss

__all__ = ["SupConOutput", "class_sums", "supcon_loss"]


class SupConOutput(NamedTuple):
    """``supcon_loss(..., with_counts=True)``: the loss and how many anchors it averages.

    ``anchors_with_positives`` and ``anchors_without_positives`` are int64
    0-d tensors (global counts with ``process_group``); the second kind is
    excluded from the mean, and with no anchor of the first kind the loss is 0.
    """

    loss: torch.Tensor
    anchors_with_positives: torch.Tensor
    anchors_without_positives: torch.Tensor


def class_sums(
    row_labels: torch.Tensor, col_labels: torch.Tensor, columns: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row, the sum of the ``columns`` of its class and their count, in ``O((N + M)·D)``.

    ``row_labels``: ``(N,)``; ``col_labels``: ``(M,)``; ``columns``: ``(M, D)``.
    Returns ``(sums (N, D), counts (N,))``: ``Σ_{j: col_labels[j] = row_labels[i]} columns[j]``
    and the number of terms. Differentiable in ``columns``. A class is named by
    the position of its first entry in the sorted column labels, so every shape
    is static (no ``unique``; torch.compile traces it without a break).
    """
    m = col_labels.shape[0]
    row_labels, col_labels = row_labels.long(), col_labels.long()
    sorted_labels, _ = torch.sort(col_labels)
    col_class = torch.searchsorted(sorted_labels, col_labels)
    table = columns.new_zeros(m, columns.shape[1]).index_add(0, col_class, columns)
    sizes = torch.zeros(m, dtype=torch.int64, device=columns.device).index_add_(
        0, col_class, torch.ones_like(col_class)
    )
    row_class = torch.searchsorted(sorted_labels, row_labels).clamp(max=m - 1)
    present = sorted_labels[row_class] == row_labels
    sums = torch.where(present[:, None], table[row_class], 0.0)
    return sums, torch.where(present, sizes[row_class], 0)


def supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.1,
    *,
    columns: Optional[torch.Tensor] = None,
    column_labels: Optional[torch.Tensor] = None,
    own_columns: bool = False,
    normalize: bool = True,
    weights: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    backend: str = "auto",
    with_counts: bool = False,
    process_group: Optional[Any] = None,
    device_mesh: Optional[Any] = None,
    mesh_dim: Union[int, str, None] = None,
    dist_impl: str = "gather",
) -> Union[torch.Tensor, SupConOutput]:
    """Supervised contrastive loss (``L_out``), tile by tile.

    One tower (``columns is None``): ``features`` are the anchors and the
    candidates (several views stacked, as SimCLR's ``2N``), ``S_ii`` excluded::

        ℓ_i = LSE_{j ≠ i} S_ij − mean_{p ≠ i, y_p = y_i} S_ip,        S = z zᵀ / τ

    Two towers: rows ``features`` (``a``, classes ``labels``) against
    ``columns`` (``b``, classes ``column_labels``), nothing excluded::

        ℓ_i = LSE_j S_ij − mean_{j: y^b_j = y^a_i} S_ij,               S = a bᵀ / τ

    Args:
        features: ``(N, D)``.
        labels: ``(N,)`` integer class ids (any values).
        temperature: ``τ > 0``.
        columns, column_labels: ``(M, D)`` and ``(M,)``, the two-tower form.
        own_columns: two towers whose first ``N`` columns are the anchors'
            own copies (a memory queue that holds the batch, as
            pytorch-metric-learning's ``CrossBatchMemory``): column ``i`` is
            left out of row ``i``'s denominator and positives. Needs ``M ≥ N``.
        normalize: L2-normalize the features first (cosine similarity, as
            pytorch-metric-learning's ``SupConLoss``).
        weights: optional ``(N,)`` non-negative per-anchor weights (see
            :func:`tilecl.contrastive_loss`).
        reduction: ``"mean"`` over the anchors that have a positive (weighted
            by ``weights``), ``"sum"``, or ``"none"`` (``(N,)``; 0 for an
            anchor without a positive).
        with_counts: return a :class:`SupConOutput` with the anchor counts.
        backend, process_group, device_mesh, mesh_dim, dist_impl: as :func:`tilecl.contrastive_loss`;
            across ranks the classes are global (every rank's samples of a
            class are positives), and the class sums gather ``b``
            (``O(N_global·D)``) whatever ``dist_impl``.

    Returns:
        The loss (float32 for 16-bit inputs), or a :class:`SupConOutput`.
    """
    process_group = resolve_group(process_group, device_mesh, mesh_dim)
    two_tower = columns is not None

    def check() -> tuple[None, Signature]:
        v.check_features(features, "features")
        n = features.shape[0]
        v.check_ids(labels, "labels", n, features, "class ids")
        if two_tower:
            assert columns is not None
            v.check_pair(features, columns, ("features", "columns"))
            v.check_ids(column_labels, "column_labels", columns.shape[0], features, "class ids")
        elif column_labels is not None:
            raise ValueError("column_labels need columns (the two-tower form)")
        v.check_flag(own_columns, "own_columns")
        if own_columns and (columns is None or columns.shape[0] < n):
            raise ValueError(
                "own_columns needs columns (the two-tower form) with at least one per row of features"
            )
        v.check_positive(temperature, "temperature")
        v.check_flag(normalize, "normalize")
        v.check_flag(with_counts, "with_counts")
        v.check_reduction(reduction)
        v.check_weights(weights, n, features, warn_all_zero=reduction == "mean" and process_group is None)
        m = n if columns is None else columns.shape[0]
        signature = dict(
            N=n, M=m, D=features.shape[1], dtype=features.dtype, two_tower=two_tower,
            normalize=bool(normalize), weighted=weights is not None, own_columns=bool(own_columns),
            # the class ids are gathered: their dtypes must match too
            label_dtype=labels.dtype, column_label_dtype=getattr(column_labels, "dtype", None),
        )  # fmt: skip
        return None, signature

    run = begin(
        check,
        like=features,
        backend=backend,
        reduction=reduction,
        process_group=process_group,
        dist_impl=dist_impl,
    )
    ranks = run.ranks
    a = F.normalize(features, dim=1) if normalize else features
    if columns is None:
        b, b_labels = a, labels
    else:
        assert column_labels is not None  # checked
        b = F.normalize(columns, dim=1) if normalize else columns
        b_labels = column_labels
    acc = accumulation_dtype(a.dtype)
    every_b = ranks.gather_with_grad(b).to(acc)
    sums, counts = class_sums(labels, ranks.gather(b_labels), every_b)
    if not two_tower:
        # the anchor is in its own class sum, not among its positives
        sums, counts = sums - b.to(acc), counts - 1
    elif own_columns:
        # nor is its own copy (in its class sum where the copy carries the anchor's class)
        own = (b_labels[: a.shape[0]] == labels).to(acc)
        sums, counts = sums - own[:, None] * b[: a.shape[0]].to(acc), counts - own.long()
    has_positive = counts > 0
    positives = (sums / counts.clamp(min=1)[:, None].to(acc)).to(a.dtype)
    anchor_weights = has_positive.to(acc) if weights is None else has_positive.to(acc) * weights
    pair_weights = run.pair_weights(anchor_weights, a)
    scale = torch.tensor(1.0 / temperature, dtype=torch.float64, device=a.device)
    spec = run.spec(symmetric=False, exclude_diagonal=not two_tower or bool(own_columns))
    loss = apply_loss(a, b, scale, spec, positives=positives, weights=pair_weights)
    loss = run.global_loss(loss, a.shape[0], pair_weights)
    if not with_counts:
        return loss
    with_positive = ranks.sum_(has_positive.sum().reshape(1))[0]
    return SupConOutput(loss, with_positive, ranks.total_rows(a.shape[0]) - with_positive)
