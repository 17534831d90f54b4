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

__all__ = ["NTXentLoss", "SupConLoss", "positive_pairs"]


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


def positive_pairs(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ordered pair ``(i, p)``, ``i != p``, of equal labels: ``Σ_c n_c(n_c − 1)`` pairs.

    Found by sorting (``O(N log N)`` plus the pairs), not from an ``N x N`` comparison.
    """
    order = torch.argsort(labels, stable=True)
    ordered = labels[order]
    start = torch.searchsorted(ordered, ordered, side="left")
    size = torch.searchsorted(ordered, ordered, side="right") - start
    anchor = torch.repeat_interleave(torch.arange(labels.shape[0], device=labels.device), size)
    rank = torch.arange(anchor.shape[0], device=labels.device) - torch.repeat_interleave(
        torch.cumsum(size, 0) - size, size
    )
    partner = start[anchor] + rank
    distinct = anchor != partner
    return order[anchor[distinct]], order[partner[distinct]]


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


class SupConLoss(modules.SupConLoss):
    """PML's ``SupConLoss`` (:class:`tilecl.SupConLoss`, :func:`tilecl.supcon_loss`): the mean over
    anchors that have a positive (PML's ``AvgNonZeroReducer``), PML's argument order;
    ``ref_emb`` / ``ref_labels`` give the two-tower form. A batch without a negative pair (one
    class) is PML's zero loss.

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
        loss = super().forward(embeddings, labels, ref_emb, ref_labels)
        classes = torch.cat([labels.reshape(-1), (labels if ref_labels is None else ref_labels).reshape(-1)])
        if classes.numel() and bool(classes.min() == classes.max()):
            # one class, no negative pair: PML returns its zero loss (tilecl's L_out would not be 0)
            return loss * 0.0
        return loss
