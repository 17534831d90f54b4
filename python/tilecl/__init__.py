"""tilecl: contrastive losses computed tile by tile, never materializing N x N.

Public API::

    tilecl.contrastive_loss(a, b, logit_scale, *, labels, symmetric, reduction, backend)
    tilecl.contrastive_loss(..., row_groups, col_groups, weights)   # false-negative masking, weights
    tilecl.nt_xent_loss(z1, z2, temperature, *, reduction, backend, groups, weights)
    tilecl.supcon_loss(features, labels, temperature, *, columns, column_labels, ...)
    tilecl.sigmoid_loss(a, b, logit_scale, logit_bias, *, labels, row_groups, col_groups, ...)
    tilecl.gamma_contrastive_loss(a, b, log_u_rows, log_u_cols, logit_scale, ...)
    tilecl.distill_clip_loss(image, text, scale, teacher_image, teacher_text, teacher_scale)
    tilecl.ClipLoss, tilecl.DistillClipLoss, tilecl.SigLipLoss, tilecl.InfoNCELoss, tilecl.NTXentLoss,
    tilecl.SupConLoss, tilecl.GammaContrastiveLoss
    tilecl.integrations.sentence_transformers, tilecl.integrations.pytorch_metric_learning
        (adapters, imported on demand)
    tilecl.uniformity_loss, tilecl.geometric_consistency_loss, tilecl.brownian_bridge_loss,
    tilecl.feature_separation_loss, tilecl.ModalityStructureLoss
    tilecl.available_backends()
    tilecl.explain_backend(a, b, backend="auto")   # which backend a call takes, and why not the others
    tilecl.GradCache(towers, mini_batch_size=...).embed(*inputs)   # giant batches: gradient caching
    tilecl.MemoryQueue(size, dim, max_age=...)   # earlier batches as negatives (MoCo / XBM)

The oracles the tests check against (a NumPy float64 oracle, the full-matrix
PyTorch losses) live in :mod:`tilecl.testing`, imported on demand.
"""

__version__ = "0.1.0"

from .backends import BackendChoice, available_backends, explain_backend
from .contrastive import contrastive_loss, gamma_contrastive_loss, nt_xent_loss
from .distill import distill_clip_loss
from .gamma import GammaContrastiveLoss
from .gradcache import GradCache
from .memory_queue import MemoryEntries, MemoryQueue
from .modality import (
    brownian_bridge_loss,
    feature_separation_loss,
    geometric_consistency_loss,
    uniformity_loss,
)
from .modules import (
    ClipLoss,
    DistillClipLoss,
    InfoNCELoss,
    ModalityStructureLoss,
    NTXentLoss,
    SigLipLoss,
    SupConLoss,
)
from .sigmoid import sigmoid_loss
from .supervised import SupConOutput, supcon_loss
from .validation import Scale

__all__ = [
    "Scale",
    "ClipLoss",
    "DistillClipLoss",
    "GammaContrastiveLoss",
    "GradCache",
    "InfoNCELoss",
    "MemoryEntries",
    "MemoryQueue",
    "ModalityStructureLoss",
    "NTXentLoss",
    "SigLipLoss",
    "SupConLoss",
    "BackendChoice",
    "SupConOutput",
    "available_backends",
    "brownian_bridge_loss",
    "contrastive_loss",
    "distill_clip_loss",
    "explain_backend",
    "feature_separation_loss",
    "gamma_contrastive_loss",
    "geometric_consistency_loss",
    "nt_xent_loss",
    "sigmoid_loss",
    "supcon_loss",
    "uniformity_loss",
]
