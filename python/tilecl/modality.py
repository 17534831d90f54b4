"""Modality-structure regularizers (Jiang et al., CVPR 2023), exact and without N×N.

Features are ``(N, d)`` tensors (L2-normalized by the caller, as in the paper);
``*_aug`` marks an augmented view.

* :func:`uniformity_loss` — Wang & Isola's ``log mean_{j≠k} exp(−t‖z_j − z_k‖²)``
  as a streaming LSE over pairs on the tiled backends. Since
  ``−t‖z_j − z_k‖² = 2t·z_j·z_k − t‖z_k‖² − t‖z_j‖²``, the column term rides
  in one extra feature (``a'_j = [√(2t)·z_j, 1]``, ``b'_k = [√(2t)·z_k, −t‖z_k‖²]``)
  and the row term is a per-row bias: the same primitives as the
  contrastive losses compute it, forward and backward.
* :func:`geometric_consistency_loss` — ``L_gc`` (and ``L^a_gc``) from d×d Gram
  matrices accumulated in float64 over row chunks: O(N·d²) time, O(d²) memory,
  no cancellation trouble when the geometry is nearly consistent.
* :func:`brownian_bridge_loss`, :func:`feature_separation_loss` — per-sample
  terms plus the pieces above.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import validation as v
from .backends import OffsetTerms, Primitives, Scores
from .contrastive import contrastive_loss
from .distributed import Ranks, resolve_group
from .driver import Signature, begin
from .function import log_count, refuse_second_derivative

__all__ = [
    "brownian_bridge_loss",
    "feature_separation_loss",
    "geometric_consistency_loss",
    "uniformity_loss",
]

#: rows per chunk when accumulating float64 Grams (extra memory: chunk x d x 8 bytes)
GRAM_CHUNK_ROWS = 8192


# --------------------------------------------------------------------------- uniformity


class _RowLogSumExp(torch.autograd.Function):
    """Per row ``j``: ``LSE_{k≠j}(a'_j·b'_k) + β_j`` over the tiles, an ``(N,)`` vector.

    Over a process group (sharded primitives) the rows are this rank's and the
    columns every rank's. Backward: an upstream ``g_j`` gives
    ``∂/∂S'_jk = g_j·exp(S'_jk − LSE_j)``, the offset backward with the row
    LSE as offset, and ``∂/∂β_j = g_j``.

    Not the shared Function of :mod:`tilecl.function`: uniformity is one
    log-sum-exp of all row statistics, not a sum of per-pair terms; the
    reduction over rows (and ranks) is autograd's, after this Function.
    """

    @staticmethod
    def forward(ctx, a_aug, b_aug, row_bias, primitives: Primitives):
        one = torch.ones((), dtype=torch.float64, device=a_aug.device)
        targets = torch.zeros(a_aug.shape[0], dtype=torch.long, device=a_aug.device)
        row_lse = primitives.lse_stats(Scores(a_aug, b_aug, one, True), targets, 0).row_lse
        ctx.save_for_backward(a_aug, b_aug, row_lse)
        ctx.primitives, ctx.bias_dtype = primitives, row_bias.dtype
        return row_lse + row_bias.to(row_lse.dtype)

    @staticmethod
    def backward(ctx, grad_rows):
        with torch.no_grad():
            a_aug, b_aug, row_lse = ctx.saved_tensors
            g = grad_rows.to(row_lse.dtype)
            one = torch.ones((), dtype=torch.float64, device=a_aug.device)
            empty = torch.empty(0, dtype=g.dtype, device=g.device)
            terms = OffsetTerms(row_lse, g.contiguous(), empty, empty)
            grad_a, grad_b, _ = ctx.primitives.sweep(Scores(a_aug, b_aug, one, True), terms)
            grads = (grad_a.to(a_aug.dtype), grad_b.to(b_aug.dtype), g.to(ctx.bias_dtype), None)
        return refuse_second_derivative(grads, (*ctx.saved_tensors, grad_rows))


def uniformity_loss(
    z: torch.Tensor,
    t: float = 2.0,
    *,
    backend: str = "auto",
    process_group: Optional[object] = None,
    device_mesh: Optional[Any] = None,
    mesh_dim: Union[int, str, None] = None,
    dist_impl: str = "gather",
) -> torch.Tensor:
    """Wang & Isola's uniformity: ``log( (1/(N(N−1))) Σ_{j≠k} exp(−t‖z_j − z_k‖²) )``.

    Args:
        z: ``(N, d)`` features, ``N >= 2`` (unnormalized inputs are fine).
        t: the Gaussian potential's scale ``t > 0``.
        process_group, device_mesh, mesh_dim, dist_impl: as :func:`tilecl.contrastive_loss`: the
            uniformity of the concatenation of all ranks' ``z`` (equal ``N``
            on every rank).

    Computed tile by tile (no N×N); equals
    ``torch.pdist(z).pow(2).mul(-t).exp().mean().log()``.
    """
    process_group = resolve_group(process_group, device_mesh, mesh_dim)

    def check() -> tuple[None, Signature]:
        v.check_features(z, "z")
        if z.shape[0] < 2 and process_group is None:
            raise ValueError(f"uniformity_loss needs at least 2 samples, got N={z.shape[0]}")
        v.check_positive(t, "t")
        return None, dict(N=z.shape[0], D=z.shape[1], dtype=z.dtype, t=float(t))

    run = begin(check, like=z, backend=backend, process_group=process_group, dist_impl=dist_impl)
    n = run.ranks.total_rows(z.shape[0])
    if n < 2:
        raise ValueError(f"uniformity_loss needs at least 2 samples over all ranks, got {n}")
    assert run.primitives is not None  # a backend was resolved
    sq_norm = (z * z).sum(dim=1, keepdim=True)
    root = math.sqrt(2 * t)
    a_aug = torch.cat([root * z, torch.ones_like(sq_norm)], dim=1)
    b_aug = torch.cat([root * z, -t * sq_norm], dim=1)
    rows = _RowLogSumExp.apply(a_aug, b_aug, -t * sq_norm.squeeze(1), run.primitives)
    total = run.ranks.global_logsumexp(torch.logsumexp(rows, dim=0))
    return (total - log_count(n * (n - 1), total)).to(z.dtype)


# --------------------------------------------------------------------------- Gram-matrix losses


def _row_chunks(n: int) -> list[slice]:
    """Row chunks of ``GRAM_CHUNK_ROWS``; one chunk under ``torch.compile``.

    The chunks bound the float64 copies; a loop over a symbolic batch size
    would specialize a compiled graph to that size, so a compiled loss takes
    the whole batch at once (``O(N·d)`` extra memory, still no ``N x N``).
    """
    if torch.compiler.is_compiling():
        return [slice(None)]
    return [slice(start, start + GRAM_CHUNK_ROWS) for start in range(0, n, GRAM_CHUNK_ROWS)]


def _gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``xᵀ·y`` in float64, accumulated over row chunks (exact products of float32 inputs)."""
    out = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, device=x.device)
    for rows in _row_chunks(x.shape[0]):
        out.addmm_(x[rows].double().t(), y[rows].double())
    return out


class _Grams(torch.autograd.Function):
    """The Grams ``G_p = Z_iᵀ Z_j`` (float64, ``d x d``) for index pairs ``p = (i, j)``.

    Forward accumulates each Gram of this rank's rows in float64 over row
    chunks (the sum over ranks is :meth:`Ranks.global_sum`'s, after this
    Function); a loss is then any function of the Grams, differentiated
    by autograd on the d×d matrices. Backward maps ``∂f/∂G_p`` back with
    ``∂f/∂Z_i = Z_j·(∂f/∂G)ᵀ`` and ``∂f/∂Z_j = Z_i·∂f/∂G``, chunk by chunk.
    """

    @staticmethod
    def forward(ctx, pairs: Sequence[tuple[int, int]], *mats: torch.Tensor):
        ctx.pairs = pairs
        ctx.save_for_backward(*mats)
        return tuple(_gram(mats[i], mats[j]) for i, j in pairs)

    @staticmethod
    def backward(ctx, *dgrams: torch.Tensor):
        with torch.no_grad():
            pairs, mats = ctx.pairs, ctx.saved_tensors
            grads = []
            for k, z in enumerate(mats):
                out = torch.empty(z.shape, dtype=z.dtype, device=z.device)
                for rows in _row_chunks(z.shape[0]):
                    acc = torch.zeros(out[rows].shape, dtype=torch.float64, device=z.device)
                    for (i, j), d in zip(pairs, dgrams):
                        if i == k:
                            acc.addmm_(mats[j][rows].double(), d.t())
                        if j == k:
                            acc.addmm_(mats[i][rows].double(), d)
                    out[rows] = acc.to(z.dtype)
                grads.append(out if ctx.needs_input_grad[1 + k] else None)
        return refuse_second_derivative((None, *grads), (*ctx.saved_tensors, *dgrams))


def _of_grams(
    fn: Callable[..., torch.Tensor], pairs: Sequence[tuple[int, int]], ranks: Ranks, *mats: torch.Tensor
) -> torch.Tensor:
    """``fn`` of the Grams of ``pairs`` of ``mats`` over every rank's rows, in the features' dtype."""
    grams: tuple[torch.Tensor, ...] = _Grams.apply(pairs, *mats)
    return fn(*(ranks.global_sum(gram) for gram in grams)).to(mats[0].dtype)


def _sq(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum()


def _shapes(z: torch.Tensor) -> Signature:
    """What the ranks of a per-sample or Gram loss must agree on: equal shapes and dtype."""
    return dict(N=z.shape[0], D=z.shape[1], dtype=z.dtype)


def geometric_consistency_loss(
    z_v: torch.Tensor,
    z_t: torch.Tensor,
    z_v_aug: Optional[torch.Tensor] = None,
    z_t_aug: Optional[torch.Tensor] = None,
    *,
    process_group: Optional[object] = None,
    device_mesh: Optional[Any] = None,
    mesh_dim: Union[int, str, None] = None,
) -> torch.Tensor:
    """Geometric consistency ``L_gc`` (+ ``L^a_gc`` when both augmented views are given).

    With ``S_VT = Z_V Z_Tᵀ`` etc. (never formed)::

        L_gc   = (1/N)(‖S_VT − S_VTᵀ‖²_F + ‖S_VV − S_TT‖²_F)
        L^a_gc = (1/N)(‖S_VV − S_V^aV^a‖²_F + ‖S_TT − S_T^aT^a‖²_F)
                 + mean_j (⟨z_Vj, z_Tj⟩ − ⟨z^a_Vj, z^a_Tj⟩)²

    Every Frobenius term is a function of d×d Grams, e.g.
    ``‖S_VV − S_TT‖² = ‖Z_VᵀZ_V‖² + ‖Z_TᵀZ_T‖² − 2‖Z_VᵀZ_T‖²``, accumulated in
    float64: O(N·d²) time, O(d²) extra memory, exact. Gradients included.
    With ``process_group`` (or ``device_mesh``, ``mesh_dim``) the Grams are all-reduced (d×d floats per rank):
    the loss of the concatenation of all ranks' features.
    """
    process_group = resolve_group(process_group, device_mesh, mesh_dim)

    def check() -> tuple[None, Signature]:
        v.check_features(z_v, "z_v")
        v.check_like(z_t, "z_t", z_v, "z_v")
        if (z_v_aug is None) != (z_t_aug is None):
            raise ValueError("pass both z_v_aug and z_t_aug (for L^a_gc) or neither")
        if z_v_aug is not None:
            v.check_like(z_v_aug, "z_v_aug", z_v, "z_v")
            v.check_like(z_t_aug, "z_t_aug", z_v, "z_v")
        return None, {**_shapes(z_v), "augmented": z_v_aug is not None}

    ranks = begin(check, like=z_v, form=None, process_group=process_group).ranks
    n = ranks.total_rows(z_v.shape[0])

    def l_gc(g_vv, g_tt, g_tv):
        # ‖S_VT − S_VTᵀ‖² = 2⟨G_V, G_T⟩ − 2 tr(C·C), C = Z_TᵀZ_V; ‖S_VV − S_TT‖² as above
        return (
            2 * (g_vv * g_tt).sum() - 2 * (g_tv * g_tv.t()).sum() + _sq(g_vv) + _sq(g_tt) - 2 * _sq(g_tv)
        ) / n

    loss = _of_grams(l_gc, [(0, 0), (1, 1), (1, 0)], ranks, z_v, z_t)
    if z_v_aug is None:
        return loss

    def l_aug(g_vv, g_aa, g_va, g_tt, g_bb, g_tb):
        return (_sq(g_vv) + _sq(g_aa) - 2 * _sq(g_va) + _sq(g_tt) + _sq(g_bb) - 2 * _sq(g_tb)) / n

    assert z_t_aug is not None  # checked above: both or neither
    pairs = [(0, 0), (2, 2), (0, 2), (1, 1), (3, 3), (1, 3)]
    loss = loss + _of_grams(l_aug, pairs, ranks, z_v, z_t, z_v_aug, z_t_aug)
    cross = (z_v * z_t).sum(dim=1) - (z_v_aug * z_t_aug).sum(dim=1)
    return loss + ranks.mean(cross * cross)


# --------------------------------------------------------------------------- per-sample terms


def brownian_bridge_loss(
    z_v: torch.Tensor,
    z_t: torch.Tensor,
    z_v_aug: torch.Tensor,
    t: Union[float, torch.Tensor] = 0.25,
    *,
    process_group: Optional[object] = None,
    device_mesh: Optional[Any] = None,
    mesh_dim: Union[int, str, None] = None,
) -> torch.Tensor:
    """The augmented image feature should lie on the bridge from image to text.

    ``μ_j = normalize(t·z_Vj + (1−t)·z_Tj)``, ``L_br = mean_j ‖z^a_Vj − μ_j‖²``
    (the bridge's variance ``t(1−t)`` dropped; the paper's printed closed form
    is garbled; this is the corrected one of docs/design.md). ``t`` is a float in
    ``[0, 1]`` or an ``(N,)`` tensor of sampled bridge times. With
    ``process_group`` (or ``device_mesh``, ``mesh_dim``): the mean over all ranks' samples.
    """
    process_group = resolve_group(process_group, device_mesh, mesh_dim)

    def check() -> tuple[Union[float, torch.Tensor], Signature]:
        v.check_features(z_v, "z_v")
        v.check_like(z_t, "z_t", z_v, "z_v")
        v.check_like(z_v_aug, "z_v_aug", z_v, "z_v")
        if isinstance(t, torch.Tensor):
            if t.shape not in ((), (z_v.shape[0],)):
                raise ValueError(
                    f"t must be a float or a ({z_v.shape[0]},) tensor, got shape {tuple(t.shape)}"
                )
            inside = (t >= 0) & (t <= 1)
            if not v.reads_values(t):
                v.check_values(inside, "bridge times t must lie in [0, 1]")
            elif not bool(inside.all()):
                raise ValueError("bridge times t must lie in [0, 1]")
            return (t.to(z_v.dtype).reshape(-1, 1) if t.dim() else t.to(z_v.dtype)), _shapes(z_v)
        return v.check_in_interval(t, "t", 0.0, 1.0), _shapes(z_v)

    run = begin(check, like=z_v, form=None, process_group=process_group)
    times, ranks = run.checked, run.ranks
    mid = F.normalize(times * z_v + (1 - times) * z_t, dim=1)
    return ranks.mean(((z_v_aug - mid) ** 2).sum(dim=1))


def feature_separation_loss(
    z_v: torch.Tensor,
    z_t: torch.Tensor,
    zi_v: torch.Tensor,
    zi_t: torch.Tensor,
    zi_v_aug: torch.Tensor,
    zi_t_aug: torch.Tensor,
    temperature: float,
    t: float = 2.0,
    *,
    backend: str = "auto",
    process_group: Optional[object] = None,
    device_mesh: Optional[Any] = None,
    mesh_dim: Union[int, str, None] = None,
    dist_impl: str = "gather",
) -> torch.Tensor:
    """Deep feature separation: ``L_ortho + L^i_con + L^i_uni``.

    * ``L_ortho = mean_j (⟨z_Vj, zi_Vj⟩² + ⟨z_Tj, zi_Tj⟩²)`` — shared and
      independent features orthogonal;
    * ``L^i_con`` — symmetric in-modal InfoNCE (``1/temperature``) of each
      modality's independent features against their augmented view's, averaged
      over the two modalities;
    * ``L^i_uni = uniformity(zi_V) + uniformity(zi_T)`` — Wang & Isola's
      uniformity per modality (mean over pairs ``j ≠ k``; the paper's version
      sums the two potentials inside one log with the diagonal included).

    With ``process_group`` (or ``device_mesh``, ``mesh_dim``; and ``dist_impl``): every term over
    all ranks' samples.
    """
    process_group = resolve_group(process_group, device_mesh, mesh_dim)

    def check() -> tuple[None, Signature]:
        v.check_features(z_v, "z_v")
        for name, z in (
            ("z_t", z_t),
            ("zi_v", zi_v),
            ("zi_t", zi_t),
            ("zi_v_aug", zi_v_aug),
            ("zi_t_aug", zi_t_aug),
        ):
            v.check_like(z, name, z_v, "z_v")
        v.check_positive(temperature, "temperature")
        return None, _shapes(z_v)

    ranks = begin(check, like=z_v, form=None, process_group=process_group, dist_impl=dist_impl).ranks
    ortho = ranks.mean((z_v * zi_v).sum(dim=1) ** 2 + (z_t * zi_t).sum(dim=1) ** 2)
    shared: dict[str, Any] = dict(backend=backend, process_group=process_group, dist_impl=dist_impl)
    scale = 1.0 / temperature
    con = (
        contrastive_loss(zi_v, zi_v_aug, scale, **shared) + contrastive_loss(zi_t, zi_t_aug, scale, **shared)
    ) / 2
    uni = uniformity_loss(zi_v, t, **shared) + uniformity_loss(zi_t, t, **shared)
    return ortho + con + uni
