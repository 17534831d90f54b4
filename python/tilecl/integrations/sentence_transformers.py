"""sentence-transformers' ``MultipleNegativesRankingLoss``, tile by tile, with false-negative masking.

Same constructor and call as ``sentence_transformers.losses.MultipleNegativesRankingLoss``
(a model, ``scale=20.0``, ``similarity_fct=cos_sim``, columns ``(anchor,
positive, negative_1, …, negative_k)``), so a training script swaps the import::

    from tilecl.integrations.sentence_transformers import MultipleNegativesRankingLoss
    loss = MultipleNegativesRankingLoss(model, mask_false_negatives="text")

Anchor ``i``'s candidates are every positive and every hard negative of the
batch (``N·(1 + k)`` columns); its loss is the cross entropy towards its own
positive. ``directions=("query_to_doc", "doc_to_query")`` with
``partition_mode="per_direction"`` (or ``symmetric=True``) adds the
positive→anchors direction and halves: the symmetric loss. The ``N x N(1+k)``
score matrix is never formed, forward or backward.

False negatives (``mask_false_negatives``) leave both softmaxes:

* ``"text"``: pairs whose anchors or whose positives are the same text form
  one group (so do chains of them), and a candidate identical to a positive
  belongs to that positive's group; an anchor's same-group candidates other
  than its own positive are masked. Texts are compared by their token ids.
* ``"labels"``: the dataset's label column holds a group id per pair; an
  anchor's in-batch positives of its group are masked (hard negatives never).

With the cached variant's idea (sentence-transformers'
``CachedMultipleNegativesRankingLoss``: embed the batch in mini-batches
without activations, take the loss and its gradient with respect to the
embeddings, then re-embed mini-batch by mini-batch with the cached gradient)
the encoder's memory is bounded by the mini-batch and this loss's by
``O(N·D)``: call :meth:`MultipleNegativesRankingLoss.compute_loss_from_embeddings`
on the cached embeddings in the place of the full-matrix cross entropy.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from sentence_transformers.util import cos_sim, dot_score
except ImportError as error:  # pragma: no cover - the dev extra installs it
    raise ImportError(
        "tilecl.integrations.sentence_transformers needs sentence-transformers "
        "(pip install 'tilecl[sentence-transformers]')"
    ) from error

from ..contrastive import contrastive_loss

__all__ = ["MASK_MODES", "MultipleNegativesRankingLoss", "pair_groups_from_keys"]

#: the ``mask_false_negatives`` modes
MASK_MODES = (None, "text", "labels")
_SYMMETRIC = ("query_to_doc", "doc_to_query")


def _embed(model: nn.Module, features: list[dict[str, Any]]) -> list[Tensor]:
    try:
        from sentence_transformers.base.losses.merged_forward import embed_columns
    except ImportError:  # older sentence-transformers: one forward per column
        return [model(f)["sentence_embedding"] for f in features]
    return embed_columns(model, features)


def _text_keys(features: dict[str, Any]) -> list[tuple[int, ...]]:
    """One hashable key per row of a tokenized column: its token ids without padding."""
    ids = features["input_ids"].tolist()
    mask = features.get("attention_mask")
    if mask is None:
        return [tuple(row) for row in ids]
    return [tuple(t for t, keep in zip(row, m) if keep) for row, m in zip(ids, mask.tolist())]


def pair_groups_from_keys(
    anchors: list, positives: list, negatives: list[list]
) -> tuple[list[int], list[int]]:
    """Group ids for masking by duplicate text: ``(row_groups (N,), col_groups (N·(1 + k),))``.

    Pairs sharing an anchor text or a positive text are one group (union of
    both relations, chains included); a candidate whose text is some positive's
    belongs to that positive's group; every other candidate has a group of its own.
    """
    n = len(anchors)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for keys in (anchors, positives):
        first: dict = {}
        for i, key in enumerate(keys):
            if key in first:
                parent[root(i)] = root(first[key])
            else:
                first[key] = i
    rows = [root(i) for i in range(n)]
    group_of_positive = {key: rows[i] for i, key in enumerate(positives)}
    cols = list(rows)
    fresh = n
    for column in negatives:
        for key in column:
            if key in group_of_positive:
                cols.append(group_of_positive[key])
            else:
                cols.append(fresh)
                fresh += 1
    return rows, cols


class MultipleNegativesRankingLoss(nn.Module):
    """``MultipleNegativesRankingLoss`` over tilecl's tiled softmax loss (see the module docstring).

    Args:
        model: the ``SentenceTransformer`` (only :meth:`forward` calls it).
        scale: the inverse temperature applied to the similarities.
        similarity_fct: ``cos_sim`` (default) or ``dot_score``; another
            function cannot be tiled and is refused.
        gather_across_devices: the loss over every rank's batch (the default
            process group), each anchor against every rank's candidates; hard
            negatives stay with their rank's block, so they remain aligned.
        directions, partition_mode: ``("query_to_doc",)``, or
            ``("query_to_doc", "doc_to_query")`` with ``"per_direction"``
            (the symmetric loss). The joint and same-type directions are refused.
        symmetric: shorthand for the symmetric directions.
        mask_false_negatives: ``None``, ``"text"`` or ``"labels"``.
        backend, dist_impl: tilecl's (:func:`tilecl.contrastive_loss`).
    """

    def __init__(
        self,
        model: nn.Module,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        gather_across_devices: bool = False,
        directions: tuple[str, ...] = ("query_to_doc",),
        partition_mode: str = "joint",
        hardness_mode: Optional[str] = None,
        hardness_strength: float = 0.0,
        *,
        symmetric: bool = False,
        mask_false_negatives: Optional[str] = None,
        backend: str = "auto",
        dist_impl: str = "gather",
    ) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        if similarity_fct not in (cos_sim, dot_score):
            raise NotImplementedError(
                "similarity_fct must be sentence_transformers.util.cos_sim or dot_score: an arbitrary "
                "similarity cannot be computed tile by tile"
            )
        if symmetric:
            directions, partition_mode = _SYMMETRIC, "per_direction"
        directions = tuple(directions)
        if directions not in (("query_to_doc",), _SYMMETRIC):
            raise NotImplementedError(
                f"directions={directions}: supported are ('query_to_doc',) and "
                "('query_to_doc', 'doc_to_query')"
            )
        if len(directions) > 1 and partition_mode != "per_direction":
            raise NotImplementedError(
                "two directions need partition_mode='per_direction' (the symmetric loss)"
            )
        if hardness_mode is not None and hardness_strength > 0:
            raise NotImplementedError("hardness_mode (negative-hardness weighting) is not supported")
        if mask_false_negatives not in MASK_MODES:
            raise ValueError(
                f"mask_false_negatives must be one of {MASK_MODES}, got {mask_false_negatives!r}"
            )
        self.model = model
        self.scale = scale
        self.similarity_fct = similarity_fct
        self.gather_across_devices = gather_across_devices
        self.directions = directions
        self.partition_mode = partition_mode
        self.mask_false_negatives = mask_false_negatives
        self.backend = backend
        self.dist_impl = dist_impl

    @property
    def symmetric(self) -> bool:
        return self.directions == _SYMMETRIC

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Optional[Tensor]) -> Tensor:
        features = list(sentence_features)
        embeddings = _embed(self.model, features)
        groups = None
        if self.mask_false_negatives == "text":
            keys = [_text_keys(f) for f in features]
            rows, cols = pair_groups_from_keys(keys[0], keys[1], keys[2:])
            device = embeddings[0].device
            groups = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
        return self.compute_loss_from_embeddings(embeddings, labels, groups=groups)

    def compute_loss_from_embeddings(
        self,
        embeddings: list[Tensor],
        labels: Optional[Tensor] = None,
        *,
        groups: Optional[tuple[Tensor, Tensor]] = None,
    ) -> Tensor:
        """The loss of ``[anchors (N, D), positives (N, D), negatives_1 (N, D), …]``.

        ``groups``: explicit ``(row_groups (N,), col_groups (N·(1 + k),))``
        ids for false-negative masking; ``mask_false_negatives="labels"``
        builds them from ``labels``.
        """
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings (anchor, positive, ...), got {len(embeddings)}")
        anchors, positives, *negatives = embeddings
        if self.similarity_fct is cos_sim:
            anchors = F.normalize(anchors, dim=-1)
            positives = F.normalize(positives, dim=-1)
            negatives = [F.normalize(x, dim=-1) for x in negatives]
        if self.mask_false_negatives == "labels" and groups is None:
            groups = self._label_groups(labels, anchors.shape[0], len(negatives))
        group = None
        if self.gather_across_devices:
            if not torch.distributed.is_available() or not torch.distributed.is_initialized():
                raise RuntimeError("gather_across_devices=True needs an initialized default process group")
            group = torch.distributed.group.WORLD
        return contrastive_loss(
            anchors,
            positives,
            self.scale,
            negatives=torch.cat(negatives) if negatives else None,
            symmetric=self.symmetric,
            row_groups=None if groups is None else groups[0],
            col_groups=None if groups is None else groups[1],
            backend=self.backend,
            process_group=group,
            dist_impl=self.dist_impl,
            argument_names=("anchors", "positives"),
        )

    @staticmethod
    def _label_groups(labels: Optional[Tensor], n: int, k: int) -> tuple[Tensor, Tensor]:
        if not isinstance(labels, Tensor) or labels.shape != (n,):
            raise ValueError(
                f'mask_false_negatives="labels" needs a label column of {n} group ids, one per pair'
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"the label column must hold integer group ids, got {labels.dtype}")
        rows = labels.long()
        # hard negatives are negatives by construction: ids no pair can have
        below = rows.min() - 1 if n else torch.zeros((), dtype=torch.long)
        unique = below - torch.arange(n * k, device=rows.device)
        return rows, torch.cat([rows, unique])

    def get_config_dict(self) -> dict[str, Union[str, float, bool, tuple, None]]:
        return {
            "scale": self.scale,
            "similarity_fct": self.similarity_fct.__name__,
            "gather_across_devices": self.gather_across_devices,
            "directions": self.directions,
            "partition_mode": self.partition_mode,
            "mask_false_negatives": self.mask_false_negatives,
            "backend": self.backend,
        }
