"""The oracle: contrastive losses and their analytic gradients in float64.

Written for clarity, not memory: the full ``N x M`` logit matrix is formed here
(O(N·M) memory is fine for an oracle). Every backend of tilecl is tested
against these functions.

Every function takes an array-module parameter ``xp`` (NumPy by default).
Passing CuPy arrays with ``xp=cupy`` runs the same code on the GPU, so kernels
can be checked on device without copying to the host.

Conventions (shared with every backend, see docs/design.md)::

    S = s · a bᵀ                                      (N x M logits)
    ℓ_i^{a→b} = LSE_j S_ij − S_{i, y_i}               (row direction)
    ℓ_i^{b→a} = LSE_k S_{k, y_i} − S_{i, y_i}          (column direction, symmetric only)
    ℓ_i = (ℓ_i^{a→b} + ℓ_i^{b→a}) / 2  if symmetric else ℓ_i^{a→b}

``reduction="mean"`` averages ``ℓ`` over the N pairs, ``"sum"`` adds them,
``"none"`` returns the vector ``ℓ``. Gradients are those of
``Σ_i grad_output_i · ℓ_i`` for ``"none"`` (``grad_output`` defaults to ones),
and of the scalar loss otherwise.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import numpy as np

__all__ = [
    "LossAndGrads",
    "NTXentLossAndGrads",
    "SigmoidLossAndGrads",
    "contrastive_loss",
    "gamma_contrastive_loss",
    "gamma_em_update",
    "logsumexp",
    "loss_and_logit_grad",
    "nt_xent_loss",
    "distill_clip_loss",
    "sigmoid_loss",
    "supcon_loss",
]

REDUCTIONS = ("mean", "sum", "none")


class LossAndGrads(NamedTuple):
    """Loss value and its gradients with respect to ``a``, ``b``, ``logit_scale`` (and ``positives``)."""

    loss: Any
    grad_a: Any
    grad_b: Any
    grad_logit_scale: float
    grad_positives: Any = None


class NTXentLossAndGrads(NamedTuple):
    """NT-Xent loss value and its gradients with respect to the two views."""

    loss: Any
    grad_z1: Any
    grad_z2: Any


def logsumexp(x: Any, axis: int, xp: Any = np) -> Any:
    """Numerically stable ``log Σ exp(x)`` along ``axis``; all ``-inf`` gives ``-inf``."""
    peak = xp.max(x, axis=axis, keepdims=True)
    peak = xp.where(xp.isfinite(peak), peak, 0.0)
    total = xp.sum(xp.exp(x - peak), axis=axis, keepdims=True)
    with np.errstate(divide="ignore"):
        return xp.squeeze(peak + xp.log(total), axis=axis)


def _softmax(x: Any, axis: int, xp: Any) -> Any:
    return xp.exp(x - xp.expand_dims(logsumexp(x, axis, xp), axis))


def _pair_weights(
    n: int, reduction: str, grad_output: Optional[Any], xp: Any, weights: Optional[Any] = None
) -> Any:
    """d(reduced loss)/d(ℓ_i): what each pair's loss is multiplied by upstream.

    With per-pair ``weights`` the reduced loss is ``Σ w_i ℓ_i / Σ w_i``
    (``"mean"``; 0 when every weight is 0), ``Σ w_i ℓ_i`` or ``w_i ℓ_i``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if weights is not None:
        w = xp.asarray(weights, dtype=xp.float64)
        if reduction == "mean":
            total = float(xp.sum(w))
            return w / total if total > 0 else xp.zeros(n)
        return w if reduction == "sum" else w * _pair_weights(n, "none", grad_output, xp)
    if reduction == "mean":
        return xp.full(n, 1.0 / n)
    if reduction == "sum":
        return xp.ones(n)
    if grad_output is None:
        return xp.ones(n)
    return xp.asarray(grad_output, dtype=xp.float64).reshape(n)


def _reduce(per_pair: Any, reduction: str, xp: Any, weights: Optional[Any] = None) -> Any:
    if weights is not None:
        w = xp.asarray(weights, dtype=xp.float64)
        weighted = xp.where(w == 0, 0.0, w * per_pair)  # a pair of weight 0 is left out
        if reduction == "mean":
            total = float(xp.sum(w))
            return xp.sum(weighted) / total if total > 0 else 0.0 * xp.sum(weighted)
        return xp.sum(weighted) if reduction == "sum" else weighted
    if reduction == "mean":
        return xp.mean(per_pair)
    if reduction == "sum":
        return xp.sum(per_pair)
    return per_pair


def loss_and_logit_grad(
    logits: Any,
    labels: Any,
    symmetric: bool,
    reduction: str,
    grad_output: Optional[Any] = None,
    xp: Any = np,
    log_u_rows: Optional[Any] = None,
    log_u_cols: Optional[Any] = None,
    positive_logits: Optional[Any] = None,
    weights: Optional[Any] = None,
) -> tuple[Any, Any, Any]:
    """Contrastive loss of a given logit matrix and its gradient ``dL/dS``.

    ``logits`` is ``N x M`` (entries may be ``-inf`` for masked pairs),
    ``labels`` gives each row's positive column. With ``log_u_rows`` (and
    ``log_u_cols``) the row (column) term is the gamma surrogate
    ``u_i·D̂_i`` with ``D̂_i = mean_j exp(S_ij)`` instead of ``LSE_j S_ij``.
    With ``positive_logits`` the positive is not a column of ``logits``
    (decoupled form). ``weights``: per-pair weights (:func:`_pair_weights`).
    Returns ``(loss, dL/dS, dL/d positive_logits)``.
    """
    n, m = logits.shape
    rows = xp.arange(n)
    positive = logits[rows, labels] if positive_logits is None else positive_logits
    pair_weights = weights
    weights = _pair_weights(n, reduction, grad_output, xp, pair_weights)
    row_weights = weights / 2 if symmetric else weights
    if log_u_rows is None:
        row_term = logsumexp(logits, 1, xp)
        row_grad = _softmax(logits, 1, xp)
    else:
        row_grad = xp.exp(logits + log_u_rows[:, None] - np.log(m))
        row_term = xp.sum(row_grad, axis=1)
    per_pair = row_term - positive
    grad = row_weights[:, None] * row_grad
    if symmetric:
        col_weights = weights / 2
        if log_u_cols is None:
            col_term = logsumexp(logits, 0, xp)[labels]
            col_grad = _softmax(logits, 0, xp)
            # column j's softmax is weighted by every pair whose positive is column j
            col_mult = xp.bincount(labels, weights=col_weights, minlength=m)
        else:
            col_grad = xp.exp(logits - np.log(n))
            col_term = xp.exp(log_u_cols) * xp.sum(col_grad, axis=0)[labels]
            col_mult = xp.bincount(labels, weights=col_weights * xp.exp(log_u_cols), minlength=m)
        per_pair = (per_pair + col_term - positive) / 2
        grad = grad + col_grad * col_mult[None, :]
    loss = _reduce(per_pair, reduction, xp, pair_weights)
    if positive_logits is None:
        grad[rows, labels] -= weights
        return loss, grad, None
    return loss, grad, -weights


def contrastive_loss(
    a: Any,
    b: Any,
    logit_scale: float = 1.0,
    labels: Optional[Any] = None,
    symmetric: bool = True,
    reduction: str = "mean",
    grad_output: Optional[Any] = None,
    xp: Any = np,
    positives: Optional[Any] = None,
    log_u_rows: Optional[Any] = None,
    log_u_cols: Optional[Any] = None,
    row_groups: Optional[Any] = None,
    col_groups: Optional[Any] = None,
    weights: Optional[Any] = None,
) -> LossAndGrads:
    """InfoNCE / CLIP loss of ``S = logit_scale · a bᵀ`` and its analytic gradients.

    Args:
        a: ``N x D`` anchors (e.g. image features).
        b: ``M x D`` candidates (e.g. text features); ``M > N`` adds hard negatives.
        logit_scale: the already-exponentiated inverse temperature ``s``.
        labels: length-``N`` integer array, row ``i``'s positive column
            (default ``i``).
        symmetric: add the column direction (CLIP) and halve.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        grad_output: upstream gradient of the per-pair losses for ``"none"``.
        positives: ``N x D``, row ``i``'s positive apart from ``b`` (decoupled:
            not in the denominator); its gradient is ``grad_positives``.
        log_u_rows, log_u_cols: gamma weights; see :func:`gamma_contrastive_loss`.
        row_groups, col_groups: false-negative masking: ``S_ij = -inf`` where
            the ids are equal and ``j != labels_i``.
        weights: per-pair weights (see :func:`_pair_weights`).

    Returns:
        :class:`LossAndGrads` with ``dL/da = s·G·b``, ``dL/db = s·Gᵀ·a`` and
        ``dL/ds = Σ G_ij (a_i·b_j)`` where ``G = dL/dS`` (plus the positive
        terms when ``positives`` is given).
    """
    a = xp.asarray(a, dtype=xp.float64)
    b = xp.asarray(b, dtype=xp.float64)
    s = float(logit_scale)
    n = a.shape[0]
    labels = xp.arange(n) if labels is None else xp.asarray(labels).astype(xp.int64)
    dots = a @ b.T
    logits = s * dots
    if row_groups is not None:
        same = xp.asarray(row_groups)[:, None] == xp.asarray(col_groups)[None, :]
        logits = xp.where(same & (xp.arange(b.shape[0])[None, :] != labels[:, None]), -xp.inf, logits)
    positive_dots = None
    if positives is not None:
        positives = xp.asarray(positives, dtype=xp.float64)
        positive_dots = xp.sum(a * positives, axis=1)
    as_array = lambda x: None if x is None else xp.asarray(x, dtype=xp.float64)  # noqa: E731
    loss, grad_logits, grad_positive = loss_and_logit_grad(
        logits,
        labels,
        symmetric,
        reduction,
        grad_output,
        xp,
        as_array(log_u_rows),
        as_array(log_u_cols),
        None if positive_dots is None else s * positive_dots,
        weights,
    )
    grad_a = s * grad_logits @ b
    # masked entries have no gradient; 0·dots keeps an inf input's NaN out of them
    grad_s = float(xp.sum(xp.where(xp.isneginf(logits), 0.0, grad_logits * dots)))
    grad_positives = None
    if positives is not None:
        grad_a = grad_a + s * grad_positive[:, None] * positives
        grad_positives = s * grad_positive[:, None] * a
        grad_s += float(xp.sum(grad_positive * positive_dots))
    return LossAndGrads(loss, grad_a, s * grad_logits.T @ a, grad_s, grad_positives)


def gamma_contrastive_loss(
    a: Any,
    b: Any,
    log_u_rows: Any,
    log_u_cols: Optional[Any] = None,
    logit_scale: float = 1.0,
    labels: Optional[Any] = None,
    symmetric: bool = True,
    reduction: str = "mean",
    grad_output: Optional[Any] = None,
    xp: Any = np,
    positives: Optional[Any] = None,
    row_groups: Optional[Any] = None,
    col_groups: Optional[Any] = None,
) -> LossAndGrads:
    """The gamma-augmented surrogate and its gradients, ``u`` held fixed::

    ℓ_i^{a→b} = −S_{i,y_i} + u_i·(1/M) Σ_j exp(S_ij)
    ℓ_i^{b→a} = −S_{i,y_i} + u'_i·(1/N) Σ_k exp(S_{k,y_i})

    (masked entries, ``row_groups`` / ``col_groups``, leave the sums; ``M``, ``N`` stay).
    """
    return contrastive_loss(
        a, b, logit_scale, labels, symmetric, reduction, grad_output, xp, positives, log_u_rows, log_u_cols,
        row_groups, col_groups,
    )  # fmt: skip


def gamma_em_update(
    log_memory: Any, visited: Any, index: Any, log_d_hat: Any, gamma: float, xp: Any = np
) -> tuple[Any, Any]:
    """E-step memory update: returns new copies of ``(log_memory, visited)``.

    For each distinct dataset index of the batch, its estimate is the mean of
    ``D̂`` over its occurrences; a visited entry becomes
    ``log((1−γ)·D̄ + γ·D̂)``, a first visit takes ``log D̂``.
    """
    log_memory, visited = xp.array(log_memory, dtype=xp.float64), xp.array(visited, dtype=bool)
    index = xp.asarray(index)
    for k in xp.unique(index).tolist():
        estimate = logsumexp(log_d_hat[index == k], 0, xp) - np.log(int(xp.sum(index == k)))
        if bool(visited[k]):
            mixed = (1 - gamma) * float(xp.exp(log_memory[k])) + gamma * float(xp.exp(estimate))
            log_memory[k] = np.log(mixed) if mixed > 0 else estimate
        else:
            log_memory[k] = estimate
        visited[k] = True
    return log_memory, visited


def nt_xent_loss(
    z1: Any,
    z2: Any,
    temperature: float = 0.5,
    reduction: str = "mean",
    grad_output: Optional[Any] = None,
    xp: Any = np,
    groups: Optional[Any] = None,
    weights: Optional[Any] = None,
) -> NTXentLossAndGrads:
    """SimCLR's NT-Xent loss over ``2N`` views and its gradients.

    The views ``z = [z1; z2]`` (``2N x D``) are L2-normalized, ``S = z zᵀ / τ``,
    self-similarity is excluded and view ``k``'s positive is its partner
    ``(k + N) mod 2N``::

        ℓ_k = LSE_{j ≠ k} S_kj − S_{k, partner(k)}

    ``"mean"`` averages over the ``2N`` views; ``"none"`` returns the ``2N``
    per-view losses (first the ``z1`` views, then the ``z2`` views).
    ``groups`` (``N``): another sample of the same group is masked;
    ``weights`` (``N``): per-sample weights, both views.
    """
    z = xp.concatenate([xp.asarray(z1, dtype=xp.float64), xp.asarray(z2, dtype=xp.float64)])
    views = z.shape[0]
    half = views // 2
    norms = xp.sqrt(xp.sum(z * z, axis=1, keepdims=True))
    unit = z / norms
    logits = unit @ unit.T / temperature
    logits[xp.arange(views), xp.arange(views)] = -xp.inf
    partners = (xp.arange(views) + half) % views
    if groups is not None:
        ids = xp.concatenate([xp.asarray(groups), xp.asarray(groups)])
        same = (ids[:, None] == ids[None, :]) & (xp.arange(views)[None, :] != partners[:, None])
        logits = xp.where(same, -xp.inf, logits)
    view_weights = None if weights is None else xp.concatenate([xp.asarray(weights)] * 2).astype(xp.float64)
    loss, grad_logits, _ = loss_and_logit_grad(
        logits, partners, False, reduction, grad_output, xp, weights=view_weights
    )
    grad_unit = (grad_logits + grad_logits.T) @ unit / temperature
    # through u = z/‖z‖: du/dz projects out the radial component
    grad_z = (grad_unit - unit * xp.sum(unit * grad_unit, axis=1, keepdims=True)) / norms
    return NTXentLossAndGrads(loss=loss, grad_z1=grad_z[:half], grad_z2=grad_z[half:])


class ModalityLossAndGrads(NamedTuple):
    """A regularizer's value and its gradients, one per input (in argument order)."""

    loss: float
    grads: tuple


def uniformity_loss(z: Any, t: float = 2.0, xp: Any = np) -> ModalityLossAndGrads:
    """``log mean_{j≠k} exp(−t‖z_j − z_k‖²)`` and its gradient.

    With ``P`` the softmax over all ordered pairs ``j ≠ k``:
    ``dU/dz_j = −2t Σ_k (P_jk + P_kj)(z_j − z_k)``.
    """
    z = xp.asarray(z, dtype=xp.float64)
    n = z.shape[0]
    sq = xp.sum(z * z, axis=1)
    dist2 = sq[:, None] + sq[None, :] - 2 * z @ z.T
    logits = -t * dist2
    logits[xp.arange(n), xp.arange(n)] = -xp.inf
    total = logsumexp(logits.reshape(-1), 0, xp)
    p = xp.exp(logits - total)
    w = p + p.T
    grad = -2 * t * (xp.sum(w, axis=1)[:, None] * z - w @ z)
    return ModalityLossAndGrads(float(total - np.log(n * (n - 1))), (grad,))


def geometric_consistency_loss(
    z_v: Any, z_t: Any, z_v_aug: Optional[Any] = None, z_t_aug: Optional[Any] = None, xp: Any = np
) -> ModalityLossAndGrads:
    """``L_gc`` (+ ``L^a_gc``) with the N×N matrices formed, and analytic gradients.

    ``‖E‖²`` with ``E = S_VT − S_VTᵀ`` has ``∂/∂Z_V = 4E·Z_T``, ``∂/∂Z_T = 4Eᵀ·Z_V``;
    ``‖F‖²`` with ``F = S_VV − S_TT`` has ``∂/∂Z_V = 4F·Z_V``, ``∂/∂Z_T = −4F·Z_T``.
    """
    z_v, z_t = xp.asarray(z_v, dtype=xp.float64), xp.asarray(z_t, dtype=xp.float64)
    n = z_v.shape[0]
    s_vt, s_vv, s_tt = z_v @ z_t.T, z_v @ z_v.T, z_t @ z_t.T
    e, f = s_vt - s_vt.T, s_vv - s_tt
    loss = (xp.sum(e * e) + xp.sum(f * f)) / n
    g_v = 4 * (e @ z_t + f @ z_v) / n
    g_t = 4 * (e.T @ z_v - f @ z_t) / n
    if z_v_aug is None:
        return ModalityLossAndGrads(float(loss), (g_v, g_t))
    a, b = xp.asarray(z_v_aug, dtype=xp.float64), xp.asarray(z_t_aug, dtype=xp.float64)
    fa, fb = s_vv - a @ a.T, s_tt - b @ b.T
    cross = xp.sum(z_v * z_t, axis=1) - xp.sum(a * b, axis=1)
    loss = loss + (xp.sum(fa * fa) + xp.sum(fb * fb)) / n + xp.mean(cross * cross)
    g_v = g_v + 4 * fa @ z_v / n + 2 * cross[:, None] * z_t / n
    g_t = g_t + 4 * fb @ z_t / n + 2 * cross[:, None] * z_v / n
    g_a = -4 * fa @ a / n - 2 * cross[:, None] * b / n
    g_b = -4 * fb @ b / n - 2 * cross[:, None] * a / n
    return ModalityLossAndGrads(float(loss), (g_v, g_t, g_a, g_b))


def brownian_bridge_loss(
    z_v: Any, z_t: Any, z_v_aug: Any, t: Any = 0.25, xp: Any = np
) -> ModalityLossAndGrads:
    """``mean_j ‖z^a_Vj − normalize(t·z_Vj + (1−t)·z_Tj)‖²`` and its gradients."""
    z_v, z_t = xp.asarray(z_v, dtype=xp.float64), xp.asarray(z_t, dtype=xp.float64)
    a = xp.asarray(z_v_aug, dtype=xp.float64)
    n = z_v.shape[0]
    t = xp.asarray(t, dtype=xp.float64).reshape(-1, 1) if np.ndim(t) else float(t)
    m = t * z_v + (1 - t) * z_t
    norm = xp.sqrt(xp.sum(m * m, axis=1, keepdims=True))
    mu = m / norm
    diff = a - mu
    grad_mu = -2 * diff / n
    grad_m = (grad_mu - mu * xp.sum(mu * grad_mu, axis=1, keepdims=True)) / norm
    return ModalityLossAndGrads(float(xp.sum(diff * diff) / n), (t * grad_m, (1 - t) * grad_m, 2 * diff / n))


class SigmoidLossAndGrads(NamedTuple):
    """Sigmoid loss value and its gradients with respect to ``a``, ``b``, ``logit_scale``, ``logit_bias``."""

    loss: Any
    grad_a: Any
    grad_b: Any
    grad_logit_scale: float
    grad_logit_bias: float


def sigmoid_loss(
    a: Any,
    b: Any,
    logit_scale: float,
    logit_bias: float = 0.0,
    *,
    labels: Any = None,
    row_groups: Any = None,
    col_groups: Any = None,
    reduction: str = "mean",
    grad_output: Any = None,
    xp: Any = np,
) -> SigmoidLossAndGrads:
    """SigLIP's loss ``(1/N) Σ_ij softplus(−z_ij ℓ_ij)``, ``ℓ = s·a bᵀ + β``, and its analytic gradients.

    ``z_ij = +1`` where ``j = labels_i`` (default ``i``) or, with group ids,
    where ``row_groups_i = col_groups_j``; ``∂/∂ℓ_ij = w_i(σ(ℓ_ij) − [z_ij = +1])``
    with ``w_i = 1/N`` (mean), 1 (sum) or ``grad_output_i`` (none, per-row sums).
    """
    a = xp.asarray(a, dtype=xp.float64)
    b = xp.asarray(b, dtype=xp.float64)
    n, m = a.shape[0], b.shape[0]
    if row_groups is not None:
        positive = xp.asarray(row_groups)[:, None] == xp.asarray(col_groups)[None, :]
    else:
        targets = xp.arange(n) if labels is None else xp.asarray(labels)
        positive = targets[:, None] == xp.arange(m)[None, :]
    dots = a @ b.T
    logits = logit_scale * dots + logit_bias
    signed = xp.where(positive, logits, -logits)
    # softplus(−t) = max(−t, 0) + log1p(e^−|t|), exact at any magnitude
    per_pair = xp.maximum(-signed, 0.0) + xp.log1p(xp.exp(-xp.abs(signed)))
    per_row = per_pair.sum(axis=1)
    if reduction == "none":
        weights = xp.ones(n) if grad_output is None else xp.asarray(grad_output, dtype=xp.float64)
        loss: Any = per_row
    else:
        weights = xp.full(n, 1.0 / n if reduction == "mean" else 1.0)
        loss = float((weights * per_row).sum())
    grad = weights[:, None] * (1.0 / (1.0 + xp.exp(-logits)) - positive)
    return SigmoidLossAndGrads(
        loss,
        logit_scale * grad @ b,
        logit_scale * grad.T @ a,
        float((grad * dots).sum()),
        float(grad.sum()),
    )


class SupConLossAndGrads(NamedTuple):
    """SupCon's value, the anchors with a positive, and the gradients (``grad_columns`` is
    ``None`` in the one-tower form)."""

    loss: Any
    anchors_with_positives: int
    grad_features: Any
    grad_columns: Any = None


def _unit_and_back(z: Any, xp: Any) -> tuple[Any, Any]:
    """``z / ‖z‖`` and the map taking ``dL/du`` back to ``dL/dz``."""
    norms = xp.sqrt(xp.sum(z * z, axis=1, keepdims=True))
    unit = z / norms

    def back(grad_unit: Any) -> Any:
        return (grad_unit - unit * xp.sum(unit * grad_unit, axis=1, keepdims=True)) / norms

    return unit, back


def supcon_loss(
    features: Any,
    labels: Any,
    temperature: float = 0.1,
    *,
    columns: Optional[Any] = None,
    column_labels: Optional[Any] = None,
    normalize: bool = True,
    weights: Optional[Any] = None,
    reduction: str = "mean",
    grad_output: Optional[Any] = None,
    xp: Any = np,
) -> SupConLossAndGrads:
    """Supervised contrastive loss (``L_out``) from the full matrix, and its gradients.

    ``ℓ_i = LSE_{j ≠ i} S_ij − mean_{p ∈ P(i)} S_ip`` with ``P(i)`` the same-class
    columns (not ``i`` in the one-tower form); ``dℓ_i/dS_ij = softmax_ij −
    [j ∈ P(i)]/|P(i)|``. Anchors without a positive have weight 0 (left out of
    the mean).
    """
    z = xp.asarray(features, dtype=xp.float64)
    y = xp.asarray(labels)
    a, back_a = _unit_and_back(z, xp) if normalize else (z, lambda g: g)
    if columns is None:
        b, y_b, back_b = a, y, back_a
    else:
        zb = xp.asarray(columns, dtype=xp.float64)
        y_b = xp.asarray(column_labels)
        b, back_b = _unit_and_back(zb, xp) if normalize else (zb, lambda g: g)
    logits = a @ b.T / temperature
    positive = y[:, None] == y_b[None, :]
    if columns is None:
        eye = xp.eye(a.shape[0], dtype=bool)
        logits = xp.where(eye, -xp.inf, logits)
        positive = positive & ~eye
    counts = positive.sum(axis=1)
    has = counts > 0
    mean_positive = xp.where(has, xp.where(positive, logits, 0.0).sum(axis=1) / xp.maximum(counts, 1), 0.0)
    per_anchor = logsumexp(logits, 1, xp) - mean_positive
    pair_weights = has.astype(xp.float64) * (
        1.0 if weights is None else xp.asarray(weights, dtype=xp.float64)
    )
    c = _pair_weights(a.shape[0], reduction, grad_output, xp, pair_weights)
    loss = _reduce(xp.where(has, per_anchor, 0.0), reduction, xp, pair_weights)
    grad = c[:, None] * (_softmax(logits, 1, xp) - positive / xp.maximum(counts, 1)[:, None])
    if columns is None:
        return SupConLossAndGrads(loss, int(has.sum()), back_a((grad + grad.T) @ a / temperature))
    return SupConLossAndGrads(
        loss, int(has.sum()), back_a(grad @ b / temperature), back_b(grad.T @ a / temperature)
    )


def distill_clip_loss(
    a: Any, b: Any, logit_scale: float, teacher_a: Any, teacher_b: Any, teacher_scale: float, xp: Any = np
) -> LossAndGrads:
    """open_clip's ``distill_loss`` of the student's ``S = s·a bᵀ`` given the teacher's
    ``T = t·a' b'ᵀ``, and its analytic gradients (the teacher's features are constants).

    ``distill = (H_row + H_col) / 2`` with ``H_row = −mean_i Σ_j softmax(T)_ij log_softmax(S)_ij``
    over rows and ``H_col`` the same over columns; ``∂/∂S = ((P_S − P_T) + (Q_S − Q_T)) / 2N`` with
    ``P`` the row softmaxes and ``Q`` the column softmaxes.
    """
    a, b = xp.asarray(a, dtype=xp.float64), xp.asarray(b, dtype=xp.float64)
    teacher_a = xp.asarray(teacher_a, dtype=xp.float64)
    teacher_b = xp.asarray(teacher_b, dtype=xp.float64)
    n = a.shape[0]
    dots = a @ b.T
    student = logit_scale * dots
    teacher = teacher_scale * (teacher_a @ teacher_b.T)
    log_rows = student - logsumexp(student, 1, xp)[:, None]
    log_cols = student - logsumexp(student, 0, xp)[None, :]
    teacher_rows, teacher_cols = _softmax(teacher, 1, xp), _softmax(teacher, 0, xp)
    loss = float(-((teacher_rows * log_rows).sum() + (teacher_cols * log_cols).sum()) / (2 * n))
    grad = (xp.exp(log_rows) - teacher_rows + xp.exp(log_cols) - teacher_cols) / (2 * n)
    return LossAndGrads(loss, logit_scale * grad @ b, logit_scale * grad.T @ a, float((grad * dots).sum()))


def distill_clip_teacher_grads(
    a: Any, b: Any, logit_scale: float, teacher_a: Any, teacher_b: Any, teacher_scale: float, xp: Any = np
) -> tuple[Any, Any, float]:
    """The gradients of :func:`distill_clip_loss` with respect to the teacher's ``(a', b', t)``.

    ``∂distill/∂T_ij = −(P_ij·(S_ij − c_i) + Q_ij·(S_ij − r_j)) / 2N`` with ``c_i = Σ_j P_ij S_ij``
    and ``r_j = Σ_i Q_ij S_ij`` (the softmaxes' derivative, contracted with the student's logits).
    """
    a, b = xp.asarray(a, dtype=xp.float64), xp.asarray(b, dtype=xp.float64)
    teacher_a = xp.asarray(teacher_a, dtype=xp.float64)
    teacher_b = xp.asarray(teacher_b, dtype=xp.float64)
    n = a.shape[0]
    student = logit_scale * (a @ b.T)
    dots = teacher_a @ teacher_b.T
    rows, cols = _softmax(teacher_scale * dots, 1, xp), _softmax(teacher_scale * dots, 0, xp)
    row_sums = (rows * student).sum(axis=1, keepdims=True)
    col_sums = (cols * student).sum(axis=0, keepdims=True)
    grad = -(rows * (student - row_sums) + cols * (student - col_sums)) / (2 * n)
    return teacher_scale * grad @ teacher_b, teacher_scale * grad.T @ teacher_a, float((grad * dots).sum())
