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

:class:`CachedMultipleNegativesRankingLoss` is the drop-in for
sentence-transformers' ``CachedMultipleNegativesRankingLoss``: the columns are
embedded mini-batch by mini-batch without activations (:class:`tilecl.GradCache`)
and re-embedded in the loss's backward, so the encoder's memory is bounded by
the mini-batch and the loss's by ``O(N·D)``.
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
        "(pip install sentence-transformers)"
    ) from error

from .. import validation as v
from ..backends import check_backend_name
from ..contrastive import contrastive_loss
from ..distributed import DIST_IMPLS
from ..gradcache import GradCache
from ..ranking import DIRECTIONS, HARDNESS_MODES, ranking_loss

__all__ = [
    "MASK_MODES",
    "CachedMultipleNegativesRankingLoss",
    "MultipleNegativesRankingLoss",
    "pair_groups_from_keys",
]

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
        directions, partition_mode: any of ``"query_to_doc"`` (required),
            ``"query_to_query"``, ``"doc_to_query"``, ``"doc_to_doc"``, one joint
            softmax (GTE) or one per direction (directions that hold the
            positive); see :mod:`tilecl.ranking`.
        hardness_mode, hardness_strength: hardness-weighted negatives
            (``"in_batch_negatives"``, ``"hard_negatives"``, ``"all_negatives"``;
            a stop-gradient ``α·sim`` on their logits), as sentence-transformers'.
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
        v.check_flag(gather_across_devices, "gather_across_devices")
        v.check_flag(symmetric, "symmetric")
        check_backend_name(backend)
        v.check_choice(dist_impl, "dist_impl", DIST_IMPLS)
        v.check_choice(partition_mode, "partition_mode", ("joint", "per_direction"))
        if similarity_fct not in (cos_sim, dot_score):
            raise NotImplementedError(
                "similarity_fct must be sentence_transformers.util.cos_sim or dot_score: an arbitrary "
                "similarity cannot be computed tile by tile"
            )
        if symmetric:
            directions, partition_mode = _SYMMETRIC, "per_direction"
        directions = tuple(directions)
        # sentence-transformers' own refusals, with its messages' substance
        if not directions or not set(directions) <= set(DIRECTIONS):
            raise ValueError(f"directions must be among {DIRECTIONS}, got {directions}")
        if "query_to_doc" not in directions:
            raise ValueError("'query_to_doc' direction is required (contains the positive pair)")
        if partition_mode == "per_direction" and set(directions) & {"query_to_query", "doc_to_doc"}:
            raise ValueError(
                "partition_mode='per_direction' requires every direction's candidate pool to include the "
                "positive pair; use partition_mode='joint' with 'query_to_query' or 'doc_to_doc'"
            )
        if hardness_mode is not None:
            v.check_choice(hardness_mode, "hardness_mode", HARDNESS_MODES)
        if not hardness_strength >= 0.0:
            raise ValueError(f"hardness_strength must be non-negative, got {hardness_strength}")
        self.hardness_mode, self.hardness_strength = hardness_mode, float(hardness_strength)
        self._ranking = self._needs_ranking(directions, partition_mode)
        if self._ranking and mask_false_negatives is not None:
            raise NotImplementedError(
                f"mask_false_negatives={mask_false_negatives!r} with directions={directions}, "
                f"partition_mode={partition_mode!r}, hardness_mode={hardness_mode!r}: masking works with "
                "query_to_doc alone or with doc_to_query per direction, without hardness weighting"
            )
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
        return self.directions == _SYMMETRIC and self.partition_mode == "per_direction"

    def _needs_ranking(self, directions: tuple[str, ...], partition_mode: str) -> bool:
        """Whether the call needs the multi-direction loss (:func:`tilecl.ranking.ranking_loss`) rather
        than the contrastive loss (one direction, or both per direction, without hardness)."""
        weighted = self.hardness_mode is not None and self.hardness_strength > 0
        plain = directions == ("query_to_doc",) or (
            directions == _SYMMETRIC and partition_mode == "per_direction"
        )
        return weighted or not plain

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Optional[Tensor]) -> Tensor:
        features = list(sentence_features)
        embeddings = _embed(self.model, features)
        groups = self._text_groups(features, embeddings[0].device)
        return self.compute_loss_from_embeddings(embeddings, labels, groups=groups)

    def _text_groups(
        self, features: list[dict[str, Any]], device: torch.device
    ) -> Optional[tuple[Tensor, Tensor]]:
        """The duplicate-text groups of ``mask_false_negatives="text"`` (None in the other modes)."""
        if self.mask_false_negatives != "text":
            return None
        keys = [_text_keys(f) for f in features]
        rows, cols = pair_groups_from_keys(keys[0], keys[1], keys[2:])
        return torch.tensor(rows, device=device), torch.tensor(cols, device=device)

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
        # sentence-transformers' cos_sim and dot_score take 16-bit embeddings in float32 (its
        # _convert_to_batch_tensor): normalized in bfloat16, a unit vector is off by ~1e-3
        embeddings = [x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in embeddings]
        anchors, positives, *negatives = embeddings
        if self.similarity_fct is cos_sim:
            anchors = F.normalize(anchors, dim=-1)
            positives = F.normalize(positives, dim=-1)
            negatives = [F.normalize(x, dim=-1) for x in negatives]
        if self.mask_false_negatives == "labels" and groups is None:
            groups = self._label_groups(labels, anchors.shape[0], len(negatives))
        group = None
        # as sentence-transformers' all_gather: one process without a process group is a world of one
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self.gather_across_devices and distributed:
            group = torch.distributed.group.WORLD
        if self._ranking:
            return ranking_loss(
                anchors, [positives, *negatives], self.scale, directions=self.directions,
                partition_mode=self.partition_mode, hardness_mode=self.hardness_mode,
                hardness_strength=self.hardness_strength, backend=self.backend, process_group=group,
                dist_impl=self.dist_impl,
            )  # fmt: skip
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
            "hardness_mode": self.hardness_mode,
            "hardness_strength": self.hardness_strength,
            "mask_false_negatives": self.mask_false_negatives,
            "backend": self.backend,
        }


# --------------------------------------------------------------------------- the cached drop-in


def _st_batch_size(features: dict[str, Any]) -> int:
    try:
        from sentence_transformers.base.losses.gradcache import _get_batch_size
    except ImportError:  # older sentence-transformers: padded inputs only
        return next(v.shape[0] for v in features.values() if isinstance(v, Tensor) and v.dim() > 0)
    return int(_get_batch_size(features))


def _st_minibatch(features: dict[str, Any], begin: int, end: int) -> dict[str, Any]:
    """Rows ``begin:end`` of a tokenized column, cut as sentence-transformers' cached losses cut them.

    Its ``_create_minibatch`` also handles flattened (``cu_seq_lens_q``) and
    vision-language inputs and trims the mini-batch's trailing padding.
    """
    try:
        from sentence_transformers.base.losses.gradcache import _create_minibatch
    except ImportError:  # older sentence-transformers: a plain row slice
        return {k: v[begin:end] if isinstance(v, Tensor) and v.dim() > 0 else v for k, v in features.items()}
    return dict(_create_minibatch(features, begin, end))


def _row_tokens(features: dict[str, Any]) -> Tensor:
    """Each row's token count: the attention mask's, or the flattened layout's sequence lengths."""
    if "cu_seq_lens_q" in features:
        return features["cu_seq_lens_q"].diff()
    mask = features.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2:
        return mask.ne(0).sum(dim=1)
    raise ValueError(
        "mini_batch_num_tokens needs per-sequence token counts, but the tokenized inputs contain neither "
        "'cu_seq_lens_q' (flattened inputs) nor 'attention_mask' (padded inputs); use mini_batch_size instead"
    )


class _Column(nn.Module):
    """One tokenized column as a :class:`tilecl.GradCache` tower over row indices.

    GradCache hands it ``index`` (the mini-batch's rows, consecutive); it cuts
    those rows out of the column as sentence-transformers does and returns the
    model's ``sentence_embedding``. The cut tensors are copies, so a module
    that edits its features in place (``Pooling(include_prompt=False)`` zeroes
    the prompt in the attention mask) cannot change what the re-embedding sees.
    """

    def __init__(self, model: nn.Module, features: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.features = features

    def forward(self, index: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        begin, end = int(index[0]), int(index[-1]) + 1
        rows = _st_minibatch(self.features, begin, end)
        rows = {k: v.clone() if isinstance(v, Tensor) else v for k, v in rows.items()}
        out: Tensor = self.model(rows)["sentence_embedding"]
        return out


class CachedMultipleNegativesRankingLoss(MultipleNegativesRankingLoss):
    """sentence-transformers' ``CachedMultipleNegativesRankingLoss`` on :class:`tilecl.GradCache`.

    Same constructor and call as
    ``sentence_transformers.losses.CachedMultipleNegativesRankingLoss`` (plus
    this module's keyword options), so a training script swaps the import::

        from tilecl.integrations.sentence_transformers import CachedMultipleNegativesRankingLoss
        loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=64, mask_false_negatives="text")

    Each column is embedded mini-batch by mini-batch without an autograd graph
    (the mini-batches sentence-transformers forms: ``mini_batch_size`` rows,
    or greedy packs of ``mini_batch_num_tokens`` non-padding tokens, trailing
    padding trimmed); the loss is :class:`MultipleNegativesRankingLoss`'s
    tiled one over the whole batch; its backward re-embeds each mini-batch
    with the random state of its first forward and back-propagates the
    embeddings' gradient slice. Value and gradients are those of the plain
    step embedding the same mini-batches in the same order (dropout
    included). The forward returns an ordinary differentiable loss, so
    ``loss.backward()``, ``GradScaler`` and gradient accumulation work as with
    the uncached loss.

    Args:
        model, scale, similarity_fct, gather_across_devices, directions,
            partition_mode, hardness_mode, hardness_strength: as
            :class:`MultipleNegativesRankingLoss`.
        mini_batch_size: rows per embedding mini-batch.
        mini_batch_num_tokens: instead, at most this many non-padding tokens
            per mini-batch (a longer sequence alone in its own), as
            sentence-transformers does.
        show_progress_bar: progress bars over the embedding pass and over the re-embedding in
            the backward (the longer one), :class:`tilecl.GradCache`'s.
        symmetric, mask_false_negatives, backend, dist_impl: as
            :class:`MultipleNegativesRankingLoss`.
        offload_inputs: keep the tokenized columns on CPU between the two
            passes (:class:`tilecl.GradCache`).

    Not supported: a model wrapped in ``DistributedDataParallel`` (GradCache
    does not yet defer DDP's gradient reduction to the last re-embedding), a
    ``StaticEmbedding`` model (its input has no batch dimension), and
    wrapping by ``MatryoshkaLoss`` / ``AdaptiveLayerLoss``'s cached paths
    (they decorate sentence-transformers' ``calculate_loss``).
    """

    def __init__(
        self,
        model: nn.Module,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: Optional[int] = None,
        gather_across_devices: bool = False,
        directions: tuple[str, ...] = ("query_to_doc",),
        partition_mode: str = "joint",
        show_progress_bar: bool = False,
        hardness_mode: Optional[str] = None,
        hardness_strength: float = 0.0,
        *,
        symmetric: bool = False,
        mask_false_negatives: Optional[str] = None,
        backend: str = "auto",
        dist_impl: str = "gather",
        offload_inputs: bool = False,
    ) -> None:
        super().__init__(
            model,
            scale,
            similarity_fct,
            gather_across_devices,
            directions,
            partition_mode,
            hardness_mode,
            hardness_strength,
            symmetric=symmetric,
            mask_false_negatives=mask_false_negatives,
            backend=backend,
            dist_impl=dist_impl,
        )
        if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size <= 0:
            raise ValueError(f"mini_batch_size must be a positive integer, got {mini_batch_size!r}")
        if mini_batch_num_tokens is not None and (
            isinstance(mini_batch_num_tokens, bool)
            or not isinstance(mini_batch_num_tokens, int)
            or mini_batch_num_tokens <= 0
        ):
            raise ValueError("mini_batch_num_tokens must be a positive integer or None.")
        if _has_static_embedding(model):
            raise ValueError(
                "CachedMultipleNegativesRankingLoss cannot split a StaticEmbedding model's inputs into "
                "mini-batches (they have no batch dimension); use MultipleNegativesRankingLoss instead"
            )
        v.check_flag(show_progress_bar, "show_progress_bar")
        v.check_flag(offload_inputs, "offload_inputs")
        self.mini_batch_size = mini_batch_size
        self.mini_batch_num_tokens = mini_batch_num_tokens
        self.show_progress_bar = show_progress_bar
        self.offload_inputs = offload_inputs

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Optional[Tensor]) -> Tensor:
        features = list(sentence_features)
        if len(features) < 2:
            raise ValueError(f"Expected at least 2 inputs, got {len(features)}")
        if isinstance(getattr(self.model, "_orig_mod", self.model), nn.parallel.DistributedDataParallel):
            raise NotImplementedError(
                "CachedMultipleNegativesRankingLoss: a DistributedDataParallel model is not supported yet "
                "(tilecl.GradCache does not defer DDP's gradient reduction to the last re-embedding)"
            )
        columns = [_Column(self.model, f) for f in features]
        inputs = [self._rows_input(f) for f in features]
        tokens = self.mini_batch_num_tokens
        cache = GradCache(
            columns,
            mini_batch_size=None if tokens is not None else self.mini_batch_size,
            tokens_per_mini_batch=tokens,
            offload_inputs=self.offload_inputs,
            progress=self.show_progress_bar,
        )
        embeddings = list(cache.embed(*inputs))
        groups = self._text_groups(features, embeddings[0].device)
        return self.compute_loss_from_embeddings(embeddings, labels, groups=groups)

    def _rows_input(self, features: dict[str, Any]) -> dict[str, Tensor]:
        """What GradCache splits: the row indices, and for a token budget a mask of each row's count.

        A count above the budget is clipped to it, so that row forms a mini-batch
        of its own (sentence-transformers' rule) instead of being refused.
        """
        n = _st_batch_size(features)
        rows = {"index": torch.arange(n)}
        if self.mini_batch_num_tokens is not None:
            counts = _row_tokens(features).to("cpu").clamp(max=self.mini_batch_num_tokens)
            width = max(int(counts.max()), 1) if n else 1
            rows["attention_mask"] = (torch.arange(width) < counts[:, None]).to(torch.long)
        return rows

    def get_config_dict(self) -> dict[str, Union[str, float, bool, tuple, None]]:
        return {
            **super().get_config_dict(),
            "mini_batch_size": self.mini_batch_size,
            "mini_batch_num_tokens": self.mini_batch_num_tokens,
        }


def _has_static_embedding(model: nn.Module) -> bool:
    try:
        from sentence_transformers.base.losses.gradcache import has_static_embedding_input
    except ImportError:  # older sentence-transformers
        return False
    try:
        return bool(has_static_embedding_input(model))
    except (TypeError, IndexError, KeyError, AttributeError):  # not a SentenceTransformer (a bare module)
        return False
