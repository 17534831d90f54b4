"""``nn.Module`` wrappers: drop-in ClipLoss, SigLipLoss, InfoNCELoss (learnable temperature),
NTXentLoss, SupConLoss."""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from torch import nn

from . import validation as v
from .backends import check_backend_name
from .contrastive import contrastive_loss, nt_xent_loss
from .distill import distill_clip_loss
from .distributed import DIST_IMPLS, resolve_group
from .modality import brownian_bridge_loss, feature_separation_loss, geometric_consistency_loss
from .sigmoid import OPEN_CLIP_DIST_IMPLS, sigmoid_loss
from .supervised import supcon_loss
from .validation import Scale

MeshDim = Union[int, str, None]

__all__ = [
    "ClipLoss",
    "DistillClipLoss",
    "InfoNCELoss",
    "ModalityStructureLoss",
    "NTXentLoss",
    "SigLipLoss",
    "SupConLoss",
]


def _check_world(world_size: object, dist_impl: object) -> None:
    v.check_count(world_size, "world_size")
    v.check_choice(dist_impl, "dist_impl", DIST_IMPLS)


def _explicit_group(
    owner: str, world_size: int, process_group: Optional[Any], device_mesh: Optional[Any], mesh_dim: MeshDim
) -> Optional[Any]:
    """The group given to a module's constructor (``process_group``, or ``device_mesh``'s dimension
    ``mesh_dim``), checked against ``world_size`` where that is given too (open_clip passes it)."""
    group = resolve_group(process_group, device_mesh, mesh_dim)
    if group is not None and world_size != 1 and world_size != torch.distributed.get_world_size(group):
        raise ValueError(
            f"{owner}(world_size={world_size}) but its group has "
            f"{torch.distributed.get_world_size(group)} ranks"
        )
    return group


def _default_group(
    world_size: int, owner: str, rank: Optional[int] = None, explicit: Optional[Any] = None
) -> Optional[object]:
    """The group given to the constructor if any; else the default process group when
    ``world_size > 1`` (which must then be initialized), else None."""
    if explicit is not None:
        return explicit
    if world_size == 1:
        return None
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise RuntimeError(
            f"{owner}(world_size={world_size}) needs an initialized default process group "
            "(torch.distributed.init_process_group)"
        )
    if torch.distributed.get_world_size() != world_size:
        raise ValueError(
            f"{owner}(world_size={world_size}) but the default process group has "
            f"{torch.distributed.get_world_size()} ranks"
        )
    if rank is not None and rank != torch.distributed.get_rank():
        raise ValueError(f"{owner}(rank={rank}) but this process is rank {torch.distributed.get_rank()}")
    return torch.distributed.group.WORLD


class ClipLoss(nn.Module):
    """Drop-in replacement for ``open_clip.loss.ClipLoss`` that never forms ``N x N``.

    Same constructor keywords and ``forward`` arguments as open_clip, so
    swapping the import in an open_clip training script just works::

        loss = ClipLoss()(image_features, text_features, logit_scale)     # (N, D) each

    ``logit_scale`` is the already-exponentiated scale (open_clip passes
    ``model.logit_scale.exp()``). A scalar ``logit_bias`` shifts every logit
    equally, which cancels in both softmaxes: it is accepted and has zero
    gradient (a model trained with a bias is SigLIP's: :class:`SigLipLoss`).
    ``cache_labels`` is accepted and has no effect (no label tensor is built).

    With ``world_size > 1`` the loss is the global loss over all ranks' pairs
    on the default process group (``dist_impl="gather"`` or ``"ring"``; see
    :mod:`tilecl.distributed` for both and for the gradient convention, which
    makes DistributedDataParallel's gradient average exact). ``local_loss``
    and ``gather_with_grad`` are accepted and have no effect: gradients always
    reach every rank's features and every rank computes only its own rows.

    ``process_group=`` or ``device_mesh=`` with ``mesh_dim=`` (keywords, as
    every tilecl module takes them) choose the group instead of the default
    one: with tensor or context parallelism, the mesh's data-parallel
    dimension, whose ranks hold distinct samples (``world_size``, if given,
    must be that group's size; ``rank`` is then not checked). Batch sizes
    may differ between ranks, a rank may hold none.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        dist_impl: str = "gather",
        backend: str = "auto",
        process_group: Optional[Any] = None,
        device_mesh: Optional[Any] = None,
        mesh_dim: MeshDim = None,
    ) -> None:
        super().__init__()
        for name, flag in (
            ("local_loss", local_loss),
            ("gather_with_grad", gather_with_grad),
            ("cache_labels", cache_labels),
            ("use_horovod", use_horovod),
        ):
            v.check_flag(flag, name)
        check_backend_name(backend)
        _check_world(world_size, dist_impl)
        if use_horovod:
            raise NotImplementedError("ClipLoss(use_horovod=True): horovod is not supported")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.dist_impl = dist_impl
        self.backend = backend
        owner = type(self).__name__  # DistillClipLoss too
        self.process_group = _explicit_group(owner, world_size, process_group, device_mesh, mesh_dim)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: Scale,
        logit_bias: Optional[torch.Tensor] = None,
        output_dict: bool = False,
        *,
        image_groups: Optional[torch.Tensor] = None,
        text_groups: Optional[torch.Tensor] = None,
        weights: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, dict[str, torch.Tensor]]:
        """Symmetric CLIP loss of ``(N, D)`` image and text features.

        ``image_groups`` / ``text_groups`` (``(N,)`` integer ids, both or
        neither): false-negative masking — an image and a text of the same
        group that are not a pair leave both softmaxes (two captions of one
        image, one product photographed twice). ``weights``: ``(N,)``
        per-pair weights. See :func:`tilecl.contrastive_loss`.
        """
        v.check_flag(output_dict, "output_dict")
        group = _default_group(self.world_size, "ClipLoss", self.rank, self.process_group)
        loss = contrastive_loss(
            image_features,
            text_features,
            logit_scale,
            row_groups=image_groups,
            col_groups=text_groups,
            weights=weights,
            symmetric=True,
            backend=self.backend,
            process_group=group,
            dist_impl=self.dist_impl,
            argument_names=("image_features", "text_features"),
        )
        if logit_bias is not None:
            # keeps the bias in the graph (DDP expects a gradient) without changing the value
            loss = loss + 0.0 * logit_bias.sum()
        return {"contrastive_loss": loss} if output_dict else loss


class DistillClipLoss(ClipLoss):
    """Drop-in replacement for ``open_clip.loss.DistillClipLoss``: the student's CLIP loss and its
    distillation from a teacher's logits, neither model's ``N x N`` ever formed.

    Same constructor as :class:`ClipLoss` (and open_clip's); ``forward(image_features,
    text_features, logit_scale, dist_image_features, dist_text_features, dist_logit_scale,
    output_dict=False)`` returns ``(contrastive_loss, distill_loss)`` or, with ``output_dict``,
    ``{"contrastive_loss": ..., "distill_loss": ...}``; see :func:`tilecl.distill_clip_loss`
    for the formula. The teacher's ``(N, D')`` features and scale get their gradient when they
    require grad (on one process); a teacher under ``torch.no_grad()`` costs nothing of it.
    """

    def forward(  # type: ignore[override]
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: Scale,
        dist_image_features: torch.Tensor,
        dist_text_features: torch.Tensor,
        dist_logit_scale: Scale,
        output_dict: bool = False,
    ) -> Union[tuple[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
        v.check_flag(output_dict, "output_dict")
        group = _default_group(self.world_size, "DistillClipLoss", self.rank, self.process_group)
        contrastive, distill = distill_clip_loss(
            image_features,
            text_features,
            logit_scale,
            dist_image_features,
            dist_text_features,
            dist_logit_scale,
            backend=self.backend,
            process_group=group,
            dist_impl=self.dist_impl,
        )
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill


class InfoNCELoss(nn.Module):
    """InfoNCE with a fixed or learnable temperature, optional hard negatives.

    ``forward(a, b, negatives=None, labels=None)``: ``a`` ``(N, D)`` anchors,
    ``b`` ``(N, D)`` positives (or any ``(M, D)`` candidates with ``labels``),
    ``negatives`` ``(K, D)`` extra hard-negative candidates appended after ``b``.
    The loss uses ``S = a bᵀ / τ``.

    With ``learn_temperature=True`` the module owns ``log_scale = log(1/τ)``
    (CLIP's parametrization) and clamps ``1/τ`` to ``max_scale``.

    With ``world_size > 1`` (or ``process_group`` / ``device_mesh``): the
    global loss, as :class:`ClipLoss` (labels and negatives are this rank's).
    """

    def __init__(
        self,
        temperature: float = 0.07,
        *,
        learn_temperature: bool = False,
        max_scale: float = 100.0,
        symmetric: bool = True,
        reduction: str = "mean",
        backend: str = "auto",
        world_size: int = 1,
        dist_impl: str = "gather",
        process_group: Optional[Any] = None,
        device_mesh: Optional[Any] = None,
        mesh_dim: MeshDim = None,
    ) -> None:
        super().__init__()
        v.check_positive(temperature, "temperature")
        v.check_positive(max_scale, "max_scale")
        v.check_flag(learn_temperature, "learn_temperature")
        v.check_flag(symmetric, "symmetric")
        v.check_reduction(reduction)
        check_backend_name(backend)
        _check_world(world_size, dist_impl)
        self.world_size, self.dist_impl = world_size, dist_impl
        self.process_group = _explicit_group("InfoNCELoss", world_size, process_group, device_mesh, mesh_dim)
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learn_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.max_scale = max_scale
        self.symmetric = symmetric
        self.reduction = reduction
        self.backend = backend

    @property
    def temperature(self) -> float:
        return 1.0 / float(self.logit_scale().detach())

    def logit_scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)

    def forward(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        negatives: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        *,
        row_groups: Optional[torch.Tensor] = None,
        col_groups: Optional[torch.Tensor] = None,
        weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The loss of anchors ``a`` against ``b`` (then ``negatives``); ``row_groups`` /
        ``col_groups`` mask false negatives, ``weights`` weigh the pairs
        (:func:`tilecl.contrastive_loss`)."""
        return contrastive_loss(
            a,
            b,
            self.logit_scale(),
            labels=labels,
            negatives=negatives,
            row_groups=row_groups,
            col_groups=col_groups,
            weights=weights,
            symmetric=self.symmetric,
            reduction=self.reduction,
            backend=self.backend,
            process_group=_default_group(self.world_size, "InfoNCELoss", explicit=self.process_group),
            dist_impl=self.dist_impl,
        )


class SigLipLoss(nn.Module):
    """Drop-in replacement for ``open_clip.loss.SigLipLoss`` that never forms ``N x N``, fwd or bwd.

    Same constructor and ``forward`` as open_clip::

        loss = SigLipLoss()(image_features, text_features, logit_scale, logit_bias)

    ``logit_scale`` is the exponentiated scale (``model.logit_scale.exp()``),
    ``logit_bias`` the learnable bias; both get their gradients. The value is
    open_clip's, ``(1/N) Σ_ij softplus(−z_ij ℓ_ij)`` (see
    :func:`tilecl.sigmoid_loss`). ``cache_labels`` is accepted and has no
    effect (no label matrix exists).

    With ``world_size > 1`` (the default process group): ``dist_impl`` takes
    tilecl's ``"gather"``/``"ring"`` or open_clip's names (``"bidir"``,
    ``"shift"`` → ring; ``"reduce"``, ``"gather"`` → gather; ``None`` is
    open_clip's default, ``"bidir"``). The value is the **global** loss
    (``Σ`` over every rank's pairs ``/ N_global``) on every rank, where
    open_clip returns each rank's ``Σ`` over its rows ``/ N_local``; the
    average over ranks is the same, and so are DDP's averaged gradients.
    ``process_group`` / ``device_mesh`` + ``mesh_dim``: as :class:`ClipLoss`.
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: Optional[str] = None,
        *,
        backend: str = "auto",
        process_group: Optional[Any] = None,
        device_mesh: Optional[Any] = None,
        mesh_dim: MeshDim = None,
    ) -> None:
        super().__init__()
        v.check_flag(cache_labels, "cache_labels")
        check_backend_name(backend)
        name = "bidir" if dist_impl is None else dist_impl
        if name not in OPEN_CLIP_DIST_IMPLS and name not in DIST_IMPLS:
            choices = tuple(OPEN_CLIP_DIST_IMPLS) + tuple(
                d for d in DIST_IMPLS if d not in OPEN_CLIP_DIST_IMPLS
            )
            raise ValueError(f"dist_impl must be None or one of {choices}, got {dist_impl!r}")
        _check_world(world_size, "gather")
        self.cache_labels, self.rank, self.world_size = cache_labels, rank, world_size
        self.dist_impl = OPEN_CLIP_DIST_IMPLS.get(name, name)
        self.backend = backend
        self.process_group = _explicit_group("SigLipLoss", world_size, process_group, device_mesh, mesh_dim)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: Scale,
        logit_bias: Optional[Scale] = None,
        output_dict: bool = False,
    ) -> Union[torch.Tensor, dict[str, torch.Tensor]]:
        """Sigmoid loss of ``(N, D)`` image and text features, the diagonal pairs positive."""
        v.check_flag(output_dict, "output_dict")
        group = _default_group(self.world_size, "SigLipLoss", self.rank, self.process_group)
        loss = sigmoid_loss(
            image_features,
            text_features,
            logit_scale,
            logit_bias,
            backend=self.backend,
            process_group=group,
            dist_impl=self.dist_impl,
            argument_names=("image_features", "text_features"),
        )
        return {"contrastive_loss": loss} if output_dict else loss


class _TemperatureLoss(nn.Module):
    """A loss of one fixed temperature ``τ > 0``; ``reduction``, ``backend`` and, with
    ``world_size > 1``, the default process group (or ``process_group`` / ``device_mesh`` +
    ``mesh_dim``, as :class:`ClipLoss`; ``dist_impl``) as the functional losses'."""

    def __init__(
        self,
        temperature: float,
        *,
        reduction: str = "mean",
        backend: str = "auto",
        world_size: int = 1,
        dist_impl: str = "gather",
        process_group: Optional[Any] = None,
        device_mesh: Optional[Any] = None,
        mesh_dim: MeshDim = None,
    ) -> None:
        super().__init__()
        v.check_positive(temperature, "temperature")
        v.check_reduction(reduction)
        check_backend_name(backend)
        _check_world(world_size, dist_impl)
        self.temperature = temperature
        self.reduction = reduction
        self.backend = backend
        self.world_size, self.dist_impl = world_size, dist_impl
        owner = type(self).__name__
        self.process_group = _explicit_group(owner, world_size, process_group, device_mesh, mesh_dim)


class NTXentLoss(_TemperatureLoss):
    """SimCLR's NT-Xent (normalized temperature-scaled cross entropy) over two views.

    ``forward(z1, z2)`` with ``(N, D)`` views; see :func:`tilecl.nt_xent_loss`.
    With ``world_size > 1``: the global loss on the default process group.
    """

    def __init__(self, temperature: float = 0.5, **options: Any) -> None:
        super().__init__(temperature, **options)

    def forward(
        self,
        z1: torch.Tensor,
        z2: torch.Tensor,
        *,
        groups: Optional[torch.Tensor] = None,
        weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``groups``: ``(N,)`` sample ids whose other members are not negatives; ``weights``:
        ``(N,)`` per-sample weights (:func:`tilecl.nt_xent_loss`)."""
        return nt_xent_loss(
            z1,
            z2,
            self.temperature,
            groups=groups,
            weights=weights,
            reduction=self.reduction,
            backend=self.backend,
            process_group=_default_group(self.world_size, "NTXentLoss", explicit=self.process_group),
            dist_impl=self.dist_impl,
        )


class SupConLoss(_TemperatureLoss):
    """Supervised contrastive loss (Khosla et al. 2020, ``L_out``) with pytorch-metric-learning's call.

    ``loss(embeddings, labels)`` equals ``pytorch_metric_learning.losses.SupConLoss(temperature)``'s
    value and gradients (cosine similarity, the mean over anchors that have a
    positive) without its ``N x N`` matrices; see :func:`tilecl.supcon_loss`.
    ``ref_emb`` / ``ref_labels`` give the two-tower form. With
    ``world_size > 1``: the global loss on the default process group.
    """

    def __init__(self, temperature: float = 0.1, **options: Any) -> None:
        super().__init__(temperature, **options)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: Optional[torch.Tensor] = None,
        ref_labels: Optional[torch.Tensor] = None,
        *,
        weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if (ref_emb is None) != (ref_labels is None):
            raise ValueError("pass both ref_emb and ref_labels (the two-tower form) or neither")
        loss = supcon_loss(
            embeddings,
            labels,
            self.temperature,
            columns=ref_emb,
            column_labels=ref_labels,
            weights=weights,
            reduction=self.reduction,
            backend=self.backend,
            process_group=_default_group(self.world_size, "SupConLoss", explicit=self.process_group),
            dist_impl=self.dist_impl,
        )
        assert isinstance(loss, torch.Tensor)
        return loss


class ModalityStructureLoss(nn.Module):
    """CLIP loss plus the modality-structure regularizers of Jiang et al. (CVPR 2023).

    ``total = L_clip + λ_sep·L_sep + λ_br·L_br + λ_gc·(L_gc + L^a_gc)``, each
    regularizer used when its inputs are passed to ``forward``:

    * ``L_sep`` (:func:`tilecl.feature_separation_loss`) needs the independent
      features ``zi_v, zi_t, zi_v_aug, zi_t_aug``;
    * ``L_br`` (:func:`tilecl.brownian_bridge_loss`) needs ``z_v_aug``;
    * ``L_gc`` (:func:`tilecl.geometric_consistency_loss`) always runs when
      ``lambda_gc > 0``; ``L^a_gc`` when both ``z_v_aug`` and ``z_t_aug`` are given.

    Default weights are **ours** (the paper's are not available): ``λ_gc = 0.25``
    is CyCLIP's weight for the same (1/N-normalized) terms; ``λ_sep = λ_br = 0.1``
    keep those terms an order below the contrastive loss at the start of training.
    ``forward(..., output_dict=True)`` returns the total and every part.
    With ``world_size > 1``: every part over all ranks' samples on the default
    process group (``dist_impl`` for the contrastive parts).
    """

    def __init__(
        self,
        lambda_sep: float = 0.1,
        lambda_br: float = 0.1,
        lambda_gc: float = 0.25,
        temperature: float = 0.07,
        uniformity_t: float = 2.0,
        bridge_t: float = 0.25,
        *,
        backend: str = "auto",
        world_size: int = 1,
        dist_impl: str = "gather",
        process_group: Optional[Any] = None,
        device_mesh: Optional[Any] = None,
        mesh_dim: MeshDim = None,
    ) -> None:
        super().__init__()
        check_backend_name(backend)
        _check_world(world_size, dist_impl)
        self.world_size, self.dist_impl = world_size, dist_impl
        self.process_group = _explicit_group(
            "ModalityStructureLoss", world_size, process_group, device_mesh, mesh_dim
        )
        for name, value in (("lambda_sep", lambda_sep), ("lambda_br", lambda_br), ("lambda_gc", lambda_gc)):
            v.check_nonnegative(value, name)
        v.check_positive(temperature, "temperature")
        self.lambda_sep, self.lambda_br, self.lambda_gc = lambda_sep, lambda_br, lambda_gc
        self.temperature, self.uniformity_t, self.bridge_t = temperature, uniformity_t, bridge_t
        self.backend = backend

    def forward(
        self,
        z_v: torch.Tensor,
        z_t: torch.Tensor,
        logit_scale: Scale,
        *,
        z_v_aug: Optional[torch.Tensor] = None,
        z_t_aug: Optional[torch.Tensor] = None,
        zi_v: Optional[torch.Tensor] = None,
        zi_t: Optional[torch.Tensor] = None,
        zi_v_aug: Optional[torch.Tensor] = None,
        zi_t_aug: Optional[torch.Tensor] = None,
        output_dict: bool = False,
    ) -> Union[torch.Tensor, dict[str, torch.Tensor]]:
        v.check_flag(output_dict, "output_dict")
        group = _default_group(self.world_size, "ModalityStructureLoss", explicit=self.process_group)
        dist_kw: dict[str, Any] = dict(process_group=group, dist_impl=self.dist_impl)
        parts = {"contrastive_loss": contrastive_loss(z_v, z_t, logit_scale, backend=self.backend, **dist_kw)}
        if (
            self.lambda_sep
            and zi_v is not None
            and zi_t is not None
            and zi_v_aug is not None
            and zi_t_aug is not None
        ):
            parts["separation_loss"] = self.lambda_sep * feature_separation_loss(
                z_v, z_t, zi_v, zi_t, zi_v_aug, zi_t_aug, self.temperature, self.uniformity_t,
                backend=self.backend, **dist_kw,
            )  # fmt: skip
        if self.lambda_br and z_v_aug is not None:
            parts["bridge_loss"] = self.lambda_br * brownian_bridge_loss(
                z_v, z_t, z_v_aug, self.bridge_t, process_group=group
            )
        if self.lambda_gc:
            parts["geometric_loss"] = self.lambda_gc * geometric_consistency_loss(
                z_v, z_t, z_v_aug, z_t_aug, process_group=group
            )
        total = torch.stack(list(parts.values())).sum()
        return {"loss": total, **parts} if output_dict else total
