"""Contrastive distillation (open_clip's ``DistillClipLoss``), tile by tile.

The student's logits ``S = s·a bᵀ`` and the teacher's ``T = t·a' b'ᵀ``
(``N x N`` each, never stored). For the image→text rows and the
text→image rows (the columns)::

    H_row = −mean_i Σ_j softmax_j(T_i·)·log_softmax_j(S_i·)   = mean_i [LSE_j S_ij − Σ_j P_ij S_ij]
    H_col = −mean_j Σ_i softmax_i(T_·j)·log_softmax_i(S_·j)   = mean_j [LSE_i S_ij − Σ_i Q_ij S_ij]
    distill = (H_row + H_col) / 2

with ``P`` the teacher's row softmax and ``Q`` its column softmax. Both
cross terms together are ``s·Σ_i a_i·((P + Q) b)_i``, and ``(P + Q) b`` and
``(P + Q)ᵀ a`` are one offset sweep over the teacher's tiles: with features
``[a', a, 0]`` and ``[b', 0, b]`` its logits are ``T`` and its products
``t·(P + Q)·[b', 0, b]`` and ``t·(P + Q)ᵀ·[a', a, 0]`` carry them in their last
blocks. So the loss is built from the primitives every backend has — the
statistics of ``S`` and of ``T``, that sweep, and in the backward the
student's offset sweep for ``∂/∂S = ((P_S − P) + (Q_S − Q)) / 2N`` (the
teacher's part reuses the forward's products) — and runs on every backend and
across ranks, where the teacher's columns travel with the student's.

Cost, in passes over ``N x N`` tiles: the student's statistics (shared with
the CLIP loss) 1 at width ``D``; the teacher's statistics 1 and its sweep 3,
both at width ``D' + 2D`` (the same wide features, so that the sweep's ``T``
is the statistics' to the last bit); the backward 3 at ``D``.
The teacher's gradient, when its features or scale require grad (a teacher
trained with the student; open_clip's teacher runs under ``torch.no_grad()``
and needs none)::

    ∂distill/∂T_ij = −(1/2N)·[P_ij·(S_ij − c_i) + Q_ij·(S_ij − r_j)],
    c_i = Σ_j P_ij S_ij,  r_j = Σ_i Q_ij S_ij

reads a student and a teacher tile in one elementwise step, which none of the
backends' sweeps does; it runs as two blockwise torch sweeps over row blocks
of both score matrices (``O(rows·N)`` memory), shared by every backend, on
one process (across ranks it is refused).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from . import validation as v
from .backends import LseStats, OffsetTerms, Scores
from .distributed import resolve_group
from .driver import Signature, begin
from .function import LossSpec, apply_loss, batch_stats, first_derivative
from .validation import Scale

__all__ = ["distill_clip_loss"]


#: entries of one row block of the teacher's gradient sweeps (about ten such blocks live at once)
TEACHER_BLOCK_ENTRIES = 1 << 20


def _teacher_gradients(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    teacher_a: torch.Tensor,
    teacher_b: torch.Tensor,
    teacher_scale: torch.Tensor,
    student_rows: torch.Tensor,
    student_cols: torch.Tensor,
    g: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(∂/∂a', ∂/∂b', ∂/∂t)`` of ``g·N·(H_row + H_col)`` (module docstring), in ``g``'s dtype.

    Two sweeps over row blocks. The first forms the teacher's softmaxes from
    the same products as the second (not from the forward's statistics: a
    softmax that sums to ``1 + δ`` makes ``P·(S − c)`` off by ``δ·P·S``): each
    block's rows whole, its columns merged online — per column a running max,
    ``Σ exp(T − max)`` and ``Σ exp(T − max)·S`` — which gives ``c``, ``r`` and
    the softmaxes' normalizers. The second forms the gradient of ``T`` block by block and
    contracts it with the teacher's features. ``S`` enters as the student's log
    softmaxes, ``S − LSE_row S`` in the row term and ``S − LSE_col S`` in the
    column term (a shift per row, per column: the same gradient), which are
    small where ``S`` is large.
    """
    acc = g.dtype
    s, t = scale.detach().to(acc), teacher_scale.detach().to(acc)
    a, b, ta, tb = (x.detach().to(acc) for x in (a, b, teacher_a, teacher_b))
    n = a.shape[0]
    step = max(1, TEACHER_BLOCK_ENTRIES // max(n, 1))
    blocks = [slice(start, min(start + step, n)) for start in range(0, n, step)]

    # the scales multiply the features, not the products: half the rounding error in float32
    scaled_a, scaled_ta = s * a, t * ta

    def tiles(rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        student = scaled_a[rows] @ b.T
        return student - student_rows[rows, None], student - student_cols[None, :], scaled_ta[rows] @ tb.T

    row_max, row_mass, row_sums, row_means = (torch.empty(n, dtype=acc, device=a.device) for _ in range(4))
    col_max = torch.full((n,), -torch.inf, dtype=acc, device=a.device)
    col_mass, col_weighted, col_teacher = (torch.zeros_like(col_max) for _ in range(3))
    for rows in blocks:
        log_rows, log_cols, teacher = tiles(rows)
        row_max[rows] = teacher.max(dim=1).values
        e = torch.exp(teacher - row_max[rows, None])
        row_mass[rows] = e.sum(dim=1)
        row_sums[rows] = (e * log_rows).sum(dim=1) / row_mass[rows]
        row_means[rows] = (e * teacher).sum(dim=1) / row_mass[rows]
        new_max = torch.maximum(col_max, teacher.max(dim=0).values)
        rescale = torch.exp(col_max - new_max)
        e = torch.exp(teacher - new_max[None, :])
        col_mass = col_mass * rescale + e.sum(dim=0)
        col_weighted = col_weighted * rescale + (e * log_cols).sum(dim=0)
        col_teacher = col_teacher * rescale + (e * teacher).sum(dim=0)
        col_max = new_max
    col_sums, col_means = col_weighted / col_mass, col_teacher / col_mass
    grad_ta, grad_tb = torch.empty_like(ta), torch.zeros_like(tb)
    grad_t = torch.zeros((), dtype=acc, device=a.device)
    for rows in blocks:
        log_rows, log_cols, teacher = tiles(rows)
        # exp(T − max) / Σ, not exp(T − LSE): an LSE of ~30 rounds by ~2e-6 in float32, and a
        # softmax summing to 1 + δ puts δ·P·(S − c) into the gradient
        p = torch.exp(teacher - row_max[rows, None]) / row_mass[rows, None]
        q = torch.exp(teacher - col_max[None, :]) / col_mass[None, :]
        row_part, col_part = p * (log_rows - row_sums[rows, None]), q * (log_cols - col_sums[None, :])
        grad_teacher = -g * (row_part + col_part)
        grad_ta[rows] = t * (grad_teacher @ tb)
        grad_tb += grad_teacher.T @ scaled_ta[rows]
        # Σ ∂/∂T·T/t, each part centred on its softmax's mean of T (each part sums to 0 along its
        # softmax, so the centring changes nothing but the cancellation, which is heavy otherwise)
        centred = torch.sum(row_part * (teacher - row_means[rows, None])) + torch.sum(
            col_part * (teacher - col_means[None, :])
        )
        grad_t -= g * centred / t
    return grad_ta, grad_tb, grad_t


def _teacher_features(
    a: torch.Tensor, b: torch.Tensor, teacher_a: torch.Tensor, teacher_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[a', a, 0]`` and ``[b', 0, b]``: their product is the teacher's ``a' b'ᵀ`` alone."""
    zeros_a, zeros_b = torch.zeros_like(a), torch.zeros_like(b)
    return torch.cat([teacher_a, a, zeros_a], dim=1), torch.cat([teacher_b, zeros_b, b], dim=1)


class DistillFunction(torch.autograd.Function):
    """``distill`` of the student's ``(a, b, scale)`` and the teacher's ``(a', b', t)``.

    Saved between the passes: the inputs, four ``O(N)`` statistics and the two
    ``N x D`` products ``(P + Q) b`` and ``(P + Q)ᵀ a``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: torch.Tensor,
        teacher_a: torch.Tensor,
        teacher_b: torch.Tensor,
        teacher_scale: torch.Tensor,
        student_stats: LseStats,
        spec: LossSpec,
    ) -> torch.Tensor:
        primitives = spec.primitives
        d = a.shape[1]
        with torch.no_grad():
            # the statistics read the same wide features as the sweep: both form T from the same
            # products, so the sweep's softmaxes are the statistics' to the last bit (T from the
            # teacher's features alone rounds differently, and a confident teacher's
            # softmax − softmax then loses digits)
            wide_a, wide_b = _teacher_features(a.detach(), b.detach(), teacher_a.detach(), teacher_b.detach())
            if wide_a.dtype in (torch.float16, torch.bfloat16):
                # the sweep's products (P + Q)·b and (P + Q)ᵀ·a stay in float32: kernels that round
                # G = P + Q to the 16-bit input before them leave an error the cross term
                # s·Σ a·(P + Q)b cannot cancel against the LSEs (bf16 distillation 2x off)
                wide_a, wide_b = wide_a.float(), wide_b.float()
            teacher = Scores(wide_a, wide_b, teacher_scale.detach(), False)
            targets = torch.arange(a.shape[0], device=a.device)
            teacher_stats = primitives.lse_stats(teacher, targets, b.shape[0])
            teacher_rows, teacher_cols = teacher_stats.row_lse, teacher_stats.col_lse
            acc = teacher_rows.dtype
            ones_rows, ones_cols = torch.ones_like(teacher_rows), torch.ones_like(teacher_cols)
            terms = OffsetTerms(teacher_rows, ones_rows, teacher_cols, ones_cols)
            sweep = primitives.sweep(teacher, terms)
            t = teacher_scale.detach().to(acc)
            pulled_b = sweep.grad_a[:, -d:] / t  # (P + Q) b, this rank's rows
            pulled_a = sweep.grad_b[:, -2 * d : -d] / t  # (P + Q)ᵀ a, this rank's columns
            s = scale.detach().to(acc)
            cross = s * torch.sum(a.to(acc) * pulled_b)
            value = (student_stats.row_lse.sum() + student_stats.col_lse.sum() - cross) / 2
            if spec.reduction == "mean":
                value = value / a.shape[0]
        # the teacher's inputs only when they need a gradient: a frozen teacher is not kept alive
        teacher_inputs = (teacher_a, teacher_b, teacher_scale) if any(ctx.needs_input_grad[3:6]) else ()
        ctx.save_for_backward(
            a, b, scale, student_stats.row_lse, student_stats.col_lse, pulled_b, pulled_a, *teacher_inputs
        )
        ctx.spec = spec
        return value

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        return first_derivative(DistillFunction._backward, ctx, grad_output)

    @staticmethod
    def _backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        a, b, scale, row_lse, col_lse, pulled_b, pulled_a, *teacher = ctx.saved_tensors
        spec: LossSpec = ctx.spec
        acc = row_lse.dtype
        g = grad_output.to(acc) / 2
        if spec.reduction == "mean":
            g = g / a.shape[0]
        rows, cols = g.expand(row_lse.shape[0]), g.expand(col_lse.shape[0])
        student = Scores(a, b, scale, False)
        grad_a, grad_b, grad_scale = spec.primitives.sweep(student, OffsetTerms(row_lse, rows, col_lse, cols))
        # the teacher's softmaxes enter with −g: (P + Q) b and (P + Q)ᵀ a from the forward
        s = scale.to(acc)
        grad_a = grad_a - (g * s) * pulled_b
        grad_b = grad_b - (g * s) * pulled_a
        grad_scale = grad_scale - g * torch.sum(a.to(acc) * pulled_b)
        needs = ctx.needs_input_grad
        teacher_grads: tuple[Optional[torch.Tensor], ...] = (None, None, None)
        if any(needs[3:6]):
            teacher_a, teacher_b, teacher_scale = teacher
            grad_ta, grad_tb, grad_t = _teacher_gradients(
                a, b, scale, teacher_a, teacher_b, teacher_scale, row_lse, col_lse, g
            )
            teacher_grads = (
                grad_ta.to(teacher_a.dtype) if needs[3] else None,
                grad_tb.to(teacher_b.dtype) if needs[4] else None,
                grad_t.to(teacher_scale.dtype).reshape(teacher_scale.shape) if needs[5] else None,
            )
        return (
            grad_a.to(a.dtype) if needs[0] else None,
            grad_b.to(b.dtype) if needs[1] else None,
            grad_scale.to(scale.dtype).reshape(scale.shape) if needs[2] else None,
            *teacher_grads,
            None,
            None,
        )


def distill_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scale,
    dist_image_features: torch.Tensor,
    dist_text_features: torch.Tensor,
    dist_logit_scale: Scale,
    *,
    backend: str = "auto",
    process_group: Optional[Any] = None,
    device_mesh: Optional[Any] = None,
    mesh_dim: Union[int, str, None] = None,
    dist_impl: str = "gather",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's CLIP loss and its distillation loss from a teacher, as open_clip's ``DistillClipLoss``.

    Args:
        image_features, text_features: the student's ``(N, D)`` features.
        logit_scale: the student's exponentiated scale ``s`` (number or 0-d
            tensor; gets its gradient).
        dist_image_features, dist_text_features: the teacher's ``(N, D')``
            features (``D'`` may differ from ``D``), cast to the student's
            dtype. They get their gradient when they require grad (module
            docstring; on one process only) — detach them, or compute them
            under ``torch.no_grad()`` as open_clip does, for a frozen teacher.
        dist_logit_scale: the teacher's exponentiated scale ``t`` (number or
            0-d tensor; gets its gradient as the features do).
        backend: as :func:`tilecl.contrastive_loss`.
        process_group, device_mesh, mesh_dim, dist_impl: as
            :func:`tilecl.contrastive_loss`: both losses over every rank's
            pairs (the teacher's columns travel with the student's).

    Returns:
        ``(contrastive_loss, distill_loss)``: the symmetric CLIP loss of the
        student and ``(H_row + H_col) / 2`` (module docstring), each a mean over
        the ``N`` pairs; float32 for 16-bit inputs.
    """
    process_group = resolve_group(process_group, device_mesh, mesh_dim)
    names = ("image_features", "text_features")
    teacher_names = ("dist_image_features", "dist_text_features")
    teacher_inputs = (dist_image_features, dist_text_features)

    def check() -> tuple[tuple[torch.Tensor, torch.Tensor], Signature]:
        v.check_pair(image_features, text_features, names)
        v.check_pair(dist_image_features, dist_text_features, teacher_names)
        n = image_features.shape[0]
        for name, x in zip(
            (names[1], *teacher_names), (text_features, dist_image_features, dist_text_features)
        ):
            if x.shape[0] != n:
                raise ValueError(
                    f"{name} must have one row per row of image_features ({n}), got {x.shape[0]}"
                )
        if dist_image_features.device != image_features.device:
            raise ValueError(
                "the teacher's and the student's features must be on the same device, got "
                f"{dist_image_features.device} and {image_features.device}"
            )
        scale = v.check_scale(logit_scale, "logit_scale", image_features)
        teacher_scale = v.check_scale(dist_logit_scale, "dist_logit_scale", image_features)
        if process_group is not None and torch.is_grad_enabled():
            for name, x in zip((*teacher_names, "dist_logit_scale"), (*teacher_inputs, teacher_scale)):
                if x.requires_grad:
                    raise ValueError(
                        f"{name} requires grad: the teacher's gradient is computed on one process "
                        "only; detach the teacher's outputs (or run the teacher under torch.no_grad())"
                    )
        signature = dict(
            N=n, M=n, columns_with_statistics=n, D=image_features.shape[1],
            teacher_D=dist_image_features.shape[1], dtype=image_features.dtype,
            teacher_dtype=dist_image_features.dtype,
        )  # fmt: skip
        return (scale, teacher_scale), signature

    run = begin(check, like=image_features, backend=backend, process_group=process_group, dist_impl=dist_impl)
    scale, teacher_scale = run.checked
    a, b = image_features, text_features
    teacher_a = dist_image_features.to(a.dtype)
    teacher_b = dist_text_features.to(a.dtype)
    spec = run.spec(symmetric=True, exclude_diagonal=False)
    # the student's statistics serve both losses: one pass fewer than two separate calls
    stats = batch_stats(a, b, scale, None, None, spec)
    contrastive = run.global_loss(apply_loss(a, b, scale, spec, stats=stats), a.shape[0])
    value: torch.Tensor = DistillFunction.apply(a, b, scale, teacher_a, teacher_b, teacher_scale, stats, spec)
    return contrastive, run.global_loss(value, a.shape[0])
