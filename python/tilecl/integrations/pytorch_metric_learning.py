"""pytorch-metric-learning's ``NTXentLoss`` and ``SupConLoss``, tile by tile.

Same constructor (``temperature``) and call, ``loss(embeddings, labels)``, as
``pytorch_metric_learning.losses``, with its default distance (cosine
similarity) and reducer, so a training script swaps the import::

    from tilecl.integrations.pytorch_metric_learning import SupConLoss
    loss = SupConLoss(temperature=0.1)(embeddings, labels)

PML forms the ``N x N`` similarity and its pair masks; these never do, forward
or backward. ``indices_tuple`` (a miner's pairs) is not supported: the pairs are
all the pairs the labels define. ``distance=`` and ``reducer=`` take what PML
uses by default, passed explicitly (``CosineSimilarity()``; ``AvgNonZeroReducer()``
for ``SupConLoss``, ``MeanReducer()`` for ``NTXentLoss``), and refuse any other.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import modules
from .. import validation as v
from ..backends import check_backend_name
from ..contrastive import contrastive_loss
from ..supervised import supcon_loss

__all__ = ["CrossBatchMemory", "NTXentLoss", "SupConLoss", "average_nonzero", "positive_pairs"]


def _no_miner(indices_tuple: Optional[Any]) -> None:
    if indices_tuple is not None:
        raise NotImplementedError(
            "indices_tuple (a miner's pairs) is not supported: every pair the labels define is used"
        )


def _pml_defaults(cls: str, distance: Any, reducer: Any, default_reducer: str) -> None:
    """Refuse a ``distance`` / ``reducer`` other than PML's default for ``cls`` (these compute that one).

    Compared by class name and module, so that a default never needs PML imported to be checked.
    """
    if distance is not None:
        default = (
            _is_pml(distance, "distances", "CosineSimilarity")
            and getattr(distance, "normalize_embeddings", None) is True
            and getattr(distance, "p", None) == 2
            and getattr(distance, "power", None) == 1
        )
        if not default:
            raise ValueError(
                f"{cls}(distance={distance!r}): only PML's default, a default-constructed "
                "CosineSimilarity(), is supported (the loss is computed on cosine similarities)"
            )
    if reducer is not None and not _is_pml(reducer, "reducers", default_reducer):
        raise ValueError(
            f"{cls}(reducer={reducer!r}): only PML's default for {cls}, {default_reducer}(), is supported"
        )


def _is_pml(value: Any, package: str, name: str) -> bool:
    kind = type(value)
    return kind.__name__ == name and kind.__module__.startswith(f"pytorch_metric_learning.{package}")


def positive_pairs(
    labels: torch.Tensor, ref_labels: Optional[torch.Tensor] = None, own: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pair ``(i, p)`` of equal labels, ``i`` a row of ``labels`` and ``p`` of ``ref_labels``
    (default: ``labels``, without ``i == p``: ``Σ_c n_c(n_c − 1)`` pairs). ``own``: ``(N,)``, row
    ``i``'s own copy among the references, left out (a memory that holds the batch).

    Found by sorting (``O((N + M) log M)`` plus the pairs), not from an ``N x M`` comparison.
    """
    one_set = ref_labels is None
    refs = labels if ref_labels is None else ref_labels
    order = torch.argsort(refs, stable=True)
    ordered = refs[order]
    start = torch.searchsorted(ordered, labels, side="left")
    size = torch.searchsorted(ordered, labels, side="right") - start
    anchor = torch.repeat_interleave(torch.arange(labels.shape[0], device=labels.device), size)
    rank = torch.arange(anchor.shape[0], device=labels.device) - torch.repeat_interleave(
        torch.cumsum(size, 0) - size, size
    )
    partner = order[start[anchor] + rank]
    if one_set:
        keep = anchor != partner
    elif own is not None:
        keep = partner != own[anchor]
    else:
        return anchor, partner
    return anchor[keep], partner[keep]


class NTXentLoss(nn.Module):
    """PML's ``NTXentLoss``: for every positive pair ``(a, p)``::

        ℓ_ap = −log( e^{S_ap} / (e^{S_ap} + Σ_{n: y_n ≠ y_a} e^{S_an}) ),     S = cos / τ

    averaged over the pairs (PML's ``MeanReducer``). The other positives of
    ``a`` (and ``a`` itself) are not in the denominator: one row per pair,
    every same-label column other than ``p`` masked by group id inside the
    tiles. With two views per label this is SimCLR's NT-Xent. Single process:
    the pair count differs between ranks, so the across-ranks form is
    :func:`tilecl.nt_xent_loss` or :class:`SupConLoss`.
    """

    def __init__(
        self,
        temperature: float = 0.07,
        *,
        distance: Optional[Any] = None,
        reducer: Optional[Any] = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _pml_defaults("NTXentLoss", distance, reducer, "MeanReducer")
        v.check_positive(temperature, "temperature")
        self.temperature = temperature
        self.backend = check_backend_name(backend)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: Optional[Any] = None,
        ref_emb: Optional[torch.Tensor] = None,
        ref_labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        _no_miner(indices_tuple)
        if ref_emb is not None or ref_labels is not None:
            raise NotImplementedError("ref_emb / ref_labels: use SupConLoss's two-tower form")
        v.check_features(embeddings, "embeddings")
        v.check_ids(labels, "labels", embeddings.shape[0], embeddings, "class ids")
        anchors, partners = positive_pairs(labels.long())
        unit = F.normalize(embeddings, dim=1)
        if anchors.numel() == 0:
            return (unit * 0.0).sum()  # no positive pair: PML's zero loss, still in the graph
        classes = labels.long()
        return contrastive_loss(
            unit[anchors],
            unit,
            1.0 / self.temperature,
            labels=partners,
            row_groups=classes[anchors],
            col_groups=classes,
            symmetric=False,
            backend=self.backend,
            argument_names=("embeddings", "embeddings"),
        )


#: the keywords tilecl's own SupConLoss takes besides the temperature
_SUPCON_OPTIONS = frozenset(
    name
    for name, parameter in inspect.signature(modules._TemperatureLoss.__init__).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
)


def average_nonzero(per_anchor: torch.Tensor) -> torch.Tensor:
    """PML's ``AvgNonZeroReducer``: the mean of the anchors' losses that are > 0 (0 when none is).

    An anchor without a positive has loss 0, and so has one whose loss underflows or saturates to
    exactly 0 (float64 at τ = 0.01, float32 well-separated classes): PML leaves both out of the mean."""
    count = (per_anchor > 0).sum().clamp_min(1)
    return per_anchor.sum() / count.to(per_anchor.dtype)


class SupConLoss(modules.SupConLoss):
    """PML's ``SupConLoss`` (:class:`tilecl.SupConLoss`, :func:`tilecl.supcon_loss`): the mean over
    anchors whose loss is > 0 (PML's ``AvgNonZeroReducer``, :func:`average_nonzero`), PML's
    argument order; ``ref_emb`` / ``ref_labels`` give the two-tower form. A batch without a
    negative pair (one class) is PML's zero loss. Across ranks (``world_size`` /
    ``process_group``) it is the mean over the anchors that have a positive, which differs only
    where an anchor's loss is exactly 0.

    ``distance=CosineSimilarity()`` and ``reducer=AvgNonZeroReducer()`` (PML's defaults) are
    accepted; the other keywords are :class:`tilecl.SupConLoss`'s (``backend``, ``world_size``, ...).
    """

    def __init__(
        self,
        temperature: float = 0.1,
        *,
        distance: Optional[Any] = None,
        reducer: Optional[Any] = None,
        **options: Any,
    ) -> None:
        _pml_defaults("SupConLoss", distance, reducer, "AvgNonZeroReducer")
        unknown = sorted(set(options) - _SUPCON_OPTIONS)
        if unknown:
            raise TypeError(
                f"SupConLoss() got unexpected keyword arguments {unknown}; it takes temperature, distance, "
                f"reducer and {sorted(_SUPCON_OPTIONS)}"
            )
        super().__init__(temperature, **options)

    def forward(  # type: ignore[override]
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: Optional[Any] = None,
        ref_emb: Optional[torch.Tensor] = None,
        ref_labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        _no_miner(indices_tuple)
        group = modules._default_group(self.world_size, "SupConLoss", explicit=self.process_group)
        if self.reduction == "mean" and group is None:
            if (ref_emb is None) != (ref_labels is None):
                raise ValueError("pass both ref_emb and ref_labels (the two-tower form) or neither")
            per_anchor = supcon_loss(
                embeddings, labels, self.temperature, columns=ref_emb, column_labels=ref_labels,
                reduction="none", backend=self.backend,
            )  # fmt: skip
            assert isinstance(per_anchor, torch.Tensor)
            loss = average_nonzero(per_anchor)
        else:
            loss = super().forward(embeddings, labels, ref_emb, ref_labels)
        classes = torch.cat([labels.reshape(-1), (labels if ref_labels is None else ref_labels).reshape(-1)])
        if classes.numel() and bool(classes.min() == classes.max()):
            # one class, no negative pair: PML returns its zero loss (tilecl's L_out would not be 0)
            return loss * 0.0
        return loss


class CrossBatchMemory(nn.Module):
    """PML's ``CrossBatchMemory`` (XBM) around tilecl's :class:`NTXentLoss` or :class:`SupConLoss`:
    the batch against a memory of earlier batches' embeddings, without its ``N x K`` similarity.

    Same constructor and call as ``pytorch_metric_learning.losses.CrossBatchMemory``::

        loss_fn = CrossBatchMemory(SupConLoss(0.1), embedding_size=128, memory_size=65536)
        loss = loss_fn(embeddings, labels)                # enqueues the batch, then the loss

    As PML's: the batch is written into the memory first (detached), then each
    embedding is an anchor against every memory entry, its own copy left out;
    with ``enqueue_mask`` the masked rows only go into the memory and the
    others are the anchors (no copy to leave out). Positive pairs are the
    anchor–entry pairs of equal labels. ``miner`` and ``indices_tuple`` are
    not supported. For any tilecl softmax loss, :class:`tilecl.MemoryQueue`
    is the general queue (ids as false-negative groups, ``max_age``, ranks).
    """

    embedding_memory: torch.Tensor
    label_memory: torch.Tensor

    def __init__(
        self, loss: nn.Module, embedding_size: int, memory_size: int = 1024, miner: Optional[Any] = None
    ) -> None:
        super().__init__()
        if not isinstance(loss, (NTXentLoss, SupConLoss)):
            ours, kind = __name__, type(loss)
            raise TypeError(
                f"CrossBatchMemory(loss=...) takes {ours}.NTXentLoss or {ours}.SupConLoss, "
                f"got {kind.__module__}.{kind.__qualname__}"
            )
        if miner is not None:
            raise NotImplementedError("CrossBatchMemory(miner=...): miners are not supported")
        self.loss = loss
        self.miner = miner
        self.embedding_size = v.check_count(embedding_size, "embedding_size")
        self.memory_size = v.check_count(memory_size, "memory_size")
        self.reset_queue()

    def reset_queue(self) -> None:
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, self.embedding_size))
        self.register_buffer("label_memory", torch.zeros(self.memory_size, dtype=torch.int64))
        self.has_been_filled = False
        self.queue_idx = 0

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: Optional[Any] = None,
        enqueue_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        _no_miner(indices_tuple)
        v.check_features(embeddings, "embeddings")
        v.check_ids(labels, "labels", embeddings.shape[0], embeddings, "class ids")
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings must have D = embedding_size = {self.embedding_size}, got {embeddings.shape[1]}"
            )
        if enqueue_mask is not None:
            enqueue_mask = v.check_tensor(enqueue_mask, "enqueue_mask")
            if enqueue_mask.dtype != torch.bool or enqueue_mask.shape != labels.shape:
                raise ValueError(f"enqueue_mask must be a bool tensor of shape {tuple(labels.shape)}")
        elif embeddings.shape[0] > self.memory_size:
            raise ValueError(
                f"a batch of {embeddings.shape[0]} does not fit a memory of {self.memory_size} entries"
            )
        labels = labels.long()
        device = embeddings.device
        self.embedding_memory = self.embedding_memory.to(device=device, dtype=embeddings.dtype)
        self.label_memory = self.label_memory.to(device)
        if enqueue_mask is not None:
            queued, queued_labels = embeddings[enqueue_mask], labels[enqueue_mask]
            embeddings, labels = embeddings[~enqueue_mask], labels[~enqueue_mask]
        else:
            queued, queued_labels = embeddings, labels
        slots = self._add_to_memory(queued, queued_labels)
        if embeddings.shape[0] == 0:
            # every row went into the memory, none is an anchor: PML's zero loss, in the graph
            return (queued * 0.0).sum()
        filled = self.memory_size if self.has_been_filled else self.queue_idx
        memory, memory_labels = self.embedding_memory[:filled], self.label_memory[:filled]
        own = slots if enqueue_mask is None else None
        if isinstance(self.loss, SupConLoss):
            return self._supcon(embeddings, labels, memory, memory_labels, own)
        return self._ntxent(embeddings, labels, memory, memory_labels, own)

    def _add_to_memory(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = embeddings.shape[0]
        slots = torch.arange(self.queue_idx, self.queue_idx + n, device=labels.device) % self.memory_size
        self.embedding_memory[slots] = embeddings.detach()
        self.label_memory[slots] = labels.detach()
        previous = self.queue_idx
        self.queue_idx = (self.queue_idx + n) % self.memory_size
        if not self.has_been_filled and self.queue_idx <= previous:
            self.has_been_filled = True
        return slots

    def _supcon(self, a, labels, memory, memory_labels, own: Optional[torch.Tensor]) -> torch.Tensor:
        loss_fn = self.loss
        assert isinstance(loss_fn, SupConLoss)
        if own is not None:
            # the anchors' own copies first, in anchor order: the loss leaves column i out of row i
            rest = torch.ones(memory.shape[0], dtype=torch.bool, device=memory.device)
            rest[own] = False
            memory = torch.cat([memory[own], memory[rest]])
            memory_labels = torch.cat([memory_labels[own], memory_labels[rest]])
        nonzero_mean = loss_fn.reduction == "mean"
        loss = supcon_loss(
            a, labels, loss_fn.temperature, columns=memory, column_labels=memory_labels,
            own_columns=own is not None, reduction="none" if nonzero_mean else loss_fn.reduction,
            backend=loss_fn.backend,
        )  # fmt: skip
        assert isinstance(loss, torch.Tensor)
        if nonzero_mean:
            loss = average_nonzero(loss)  # PML's reducer (SupConLoss)
        classes = torch.cat([labels, memory_labels])
        if bool(classes.min() == classes.max()):
            return loss * 0.0  # one class, no negative pair: PML's zero loss
        return loss

    def _ntxent(self, a, labels, memory, memory_labels, own: Optional[torch.Tensor]) -> torch.Tensor:
        loss_fn = self.loss
        assert isinstance(loss_fn, NTXentLoss)
        anchors, partners = positive_pairs(labels, memory_labels, own)
        unit = F.normalize(a, dim=1)
        if anchors.numel() == 0:
            return (unit * 0.0).sum()  # no positive pair: PML's zero loss, still in the graph
        return contrastive_loss(
            unit[anchors], F.normalize(memory, dim=1), 1.0 / loss_fn.temperature,
            labels=partners, row_groups=labels[anchors], col_groups=memory_labels,
            symmetric=False, backend=loss_fn.backend, argument_names=("embeddings", "embedding_memory"),
        )  # fmt: skip
