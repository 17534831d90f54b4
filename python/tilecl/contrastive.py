"""The contrastive losses: InfoNCE / CLIP, the gamma surrogate and NT-Xent, each written once.

Each loss hands its argument check to :func:`tilecl.driver.begin` (check,
backend, agreement across ranks, sharding), runs the shared autograd Function
of :mod:`tilecl.function` on the primitives it gets back, and takes the global
value from the same run.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from . import validation as v
from .distributed import resolve_group
from .driver import Signature, begin
from .function import apply_loss, col_count
from .validation import Scale

__all__ = [
    "check_call",
    "contrastive_loss",
    "gamma_contrastive_loss",
    "nt_xent_loss",
]


def check_call(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: Scale,
    labels: Optional[torch.Tensor],
    positives: Optional[torch.Tensor],
    symmetric: bool,
    reduction: str,
    names: tuple[str, str] = ("a", "b"),
    groups: tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None),
    weights: Optional[torch.Tensor] = None,
    local: bool = True,
) -> tuple[torch.Tensor, Signature]:
    """Every check of a contrastive call, before any compute (``local``: no process group).

    Returns the scale as a tensor and the call's signature: what every rank
    must agree on (sizes, dtype and the options that change what travels).
    """
    v.check_pair(a, b, names)
    n, m = a.shape[0], b.shape[0]
    if not isinstance(symmetric, bool):
        v.check_flag(symmetric, "symmetric")
    if reduction not in v.REDUCTIONS:
        v.check_reduction(reduction)
    if labels is not None:
        v.check_labels(labels, n, m, a)
    if groups[0] is not None or groups[1] is not None:
        v.check_groups(*groups, n, m, a)
    if weights is not None:
        v.check_weights(weights, n, a, warn_all_zero=local and reduction == "mean")
    if positives is not None and groups[0] is not None:
        raise ValueError("row_groups/col_groups mask columns of b; with positives the positive is not one")
    if positives is not None:
        v.check_pair(a, positives, (names[0], "positives"))
        if positives.shape[0] != n:
            raise ValueError(
                f"positives must have one row per row of {names[0]} ({n}), got {positives.shape[0]}"
            )
        if labels is not None:
            raise ValueError("labels and positives are exclusive: positives already give each row's positive")
        if symmetric:
            raise ValueError("positives (decoupled positives) need symmetric=False")
    else:
        v.check_symmetric(symmetric, n, m)
    scale = v.check_scale(logit_scale, "logit_scale", a)
    signature = dict(
        N=n,
        M=m,
        D=a.shape[1],
        dtype=a.dtype,
        # the sizes may differ between ranks; whether the columns have statistics may not
        columns_with_statistics=col_count(labels, n, m, bool(symmetric)),
        symmetric=bool(symmetric),
        labeled=labels is not None,
        masked=groups[0] is not None,
        weighted=weights is not None,
    )
    return scale, signature


def contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: Scale = 1.0,
    *,
    labels: Optional[torch.Tensor] = None,
    negatives: Optional[torch.Tensor] = None,
    symmetric: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    positives: Optional[torch.Tensor] = None,
    row_groups: Optional[torch.Tensor] = None,
    col_groups: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    process_group: Optional[Any] = None,
    device_mesh: Optional[Any] = None,
    mesh_dim: Union[int, str, None] = None,
    dist_impl: str = "gather",
    argument_names: tuple[str, str] = ("a", "b"),
) -> torch.Tensor:
    """InfoNCE (one direction) or CLIP (symmetric) loss, tile by tile.

    With ``S = logit_scale · a bᵀ`` (never stored) and ``y`` the labels::

        ℓ_i^{a→b} = LSE_j S_ij − S_{i,y_i}
        ℓ_i^{b→a} = LSE_k S_{k,y_i} − S_{i,y_i}
        ℓ_i = (ℓ_i^{a→b} + ℓ_i^{b→a}) / 2   if symmetric else ℓ_i^{a→b}

    Args:
        a: ``(N, D)`` anchors, e.g. image features.
        b: ``(M, D)`` candidates, e.g. text features. Rows ``N..M-1`` are extra
            (hard-negative) columns that only appear in the row direction.
        logit_scale: the inverse temperature, already exponentiated: a float
            or a 0-d tensor (which may require grad).
        labels: ``(N,)`` integer tensor, row ``i``'s positive column
            (default ``i``).
        negatives: optional ``(K, D)`` extra (hard-negative) candidates,
            appended after ``b``'s rows: ``b`` becomes ``(M + K, D)``. ``K = 0``
            (a memory queue at its first step) is the loss without them.
        symmetric: add the column direction and halve (CLIP). Needs ``M >= N``.
        reduction: ``"mean"`` (over the N pairs), ``"sum"`` or ``"none"`` (``(N,)``).
        backend: ``"auto"``, ``"torch"``, ``"reference"`` (see :func:`tilecl.available_backends`).
        positives: optional ``(N, D)``: row ``i``'s positive given apart from
            ``b``, so that it is *not* in the denominator (decoupled form:
            ``ℓ_i = LSE_j S_ij − s·a_i·p_i`` over ``b``'s columns only, as in the
            gamma paper's ``D_i = E_neg[exp s]``). Needs ``symmetric=False``.
        row_groups, col_groups: optional ``(N,)`` and ``(M [+ K],)`` integer
            group ids (one per column of ``b``, then of ``negatives``):
            false-negative masking. An entry ``(i, j)`` with
            ``row_groups[i] == col_groups[j]`` that is not the pair's positive
            (``j != y_i``) is removed from both directions' denominators —
            two captions of one image, a duplicated query. Applied inside the
            tiles (no ``N x M`` mask); a row masked down to its positive has
            loss 0.
        weights: optional ``(N,)`` non-negative per-pair weights:
            ``"sum"`` is ``Σ w_i ℓ_i``, ``"mean"`` is ``Σ w_i ℓ_i / Σ w_i``
            (0 when every weight is 0), ``"none"`` is ``w_i ℓ_i``. They are the
            backward's row multipliers; no gradient flows into them.

    Distributed:
        process_group: a ``torch.distributed`` group: the loss is then the
            global loss over the concatenation of all ranks' batches
            (``reduction`` ``"mean"`` or ``"sum"``; labels index this rank's
            ``b``), the same value on every rank; see :mod:`tilecl.distributed`
            for the gradient convention.
        device_mesh, mesh_dim: instead of ``process_group``, a
            ``DeviceMesh`` and the dimension (name or index) whose ranks hold
            distinct samples — the data-parallel one; ranks along the other
            dimensions (tensor or context parallel) hold the same samples and
            are not gathered. ``mesh_dim`` may be left out for a 1-D mesh.
        dist_impl: ``"gather"`` (all-gather, ``O(N_global·D)`` per rank) or
            ``"ring"`` (blocks travel round the ring, ``O(N_local·D)``).

    Error messages call ``a`` and ``b`` by ``argument_names`` (the wrappers
    pass theirs, e.g. ``("image_features", "text_features")``).

    Returns:
        The loss; float32 for float16/bfloat16 inputs, otherwise the input dtype.
        Double backward is not supported.
    """
    process_group = resolve_group(process_group, device_mesh, mesh_dim)

    def check() -> tuple[torch.Tensor, Signature]:
        if negatives is not None:
            # no extra negatives (an empty memory queue at its first step) is a batch without them
            v.check_pair(b, negatives, (argument_names[1], "negatives"), b_may_be_empty=True)
        columns = b if negatives is None else torch.cat([b, negatives])
        return check_call(
            a, columns, logit_scale, labels, positives, symmetric, reduction, argument_names,
            (row_groups, col_groups), weights, local=process_group is None,
        )  # fmt: skip

    run = begin(
        check, like=a, backend=backend, reduction=reduction, process_group=process_group, dist_impl=dist_impl
    )
    if negatives is not None:
        b = torch.cat([b, negatives])  # also an empty batch of them: they stay in the graph
    groups = None if row_groups is None or col_groups is None else (row_groups, col_groups)
    spec = run.spec(symmetric=bool(symmetric), exclude_diagonal=False)
    weights = None if weights is None else run.pair_weights(weights, a)
    loss = apply_loss(
        a, b, run.checked, spec, labels=labels, positives=positives, groups=groups, weights=weights
    )
    return run.global_loss(loss, a.shape[0], weights)


def gamma_contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    log_u_rows: torch.Tensor,
    log_u_cols: Optional[torch.Tensor] = None,
    logit_scale: Scale = 1.0,
    *,
    labels: Optional[torch.Tensor] = None,
    symmetric: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    positives: Optional[torch.Tensor] = None,
    row_groups: Optional[torch.Tensor] = None,
    col_groups: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    process_group: Optional[Any] = None,
    device_mesh: Optional[Any] = None,
    mesh_dim: Union[int, str, None] = None,
    dist_impl: str = "gather",
) -> torch.Tensor:
    """The gamma-augmented surrogate (M-step loss) for given auxiliary weights ``u``.

    With ``D̂_i = (1/M) Σ_j exp(S_ij)`` (row ``i``'s batch estimate of its
    denominator) and ``u`` fixed (no gradient flows into ``log_u_*``)::

        ℓ_i^{a→b} = −S_{i,y_i} + u_i·D̂_i
        ℓ_i^{b→a} = −S_{i,y_i} + u'_i·D̂'_{y_i},   D̂'_j = (1/N) Σ_k exp(S_kj)

    Linear in ``D̂``, so a minibatch estimate of it is unbiased. Its gradient is
    the InfoNCE backward with the row offset ``c_i = log M − log u_i``; with
    ``u_i = 1/D̂_i`` it *is* the InfoNCE gradient. Everything stays in log
    space (``exp(S)`` overflows float32 for ``S > 88``).

    Args:
        log_u_rows: ``(N,)`` ``log u_i`` of the row direction.
        log_u_cols: ``(N,)`` ``log u'_i`` of pair ``i``'s column direction
            (required when ``symmetric``).
        Others: as :func:`contrastive_loss`; with ``process_group``, ``M`` and
            ``N`` in ``D̂`` are the global counts. With ``row_groups`` /
            ``col_groups`` the masked entries leave ``D̂``'s sum; its
            normalizer stays ``M`` (``N``).
    """
    process_group = resolve_group(process_group, device_mesh, mesh_dim)

    def check() -> tuple[torch.Tensor, Signature]:
        checked = check_call(
            a, b, logit_scale, labels, positives, symmetric, reduction, ("a", "b"),
            (row_groups, col_groups), weights, local=process_group is None,
        )  # fmt: skip
        v.check_log_weights(log_u_rows, "log_u_rows", a.shape[0], a)
        if symmetric:
            v.check_log_weights(log_u_cols, "log_u_cols", a.shape[0], a)
        return checked

    run = begin(
        check, like=a, backend=backend, reduction=reduction, process_group=process_group, dist_impl=dist_impl
    )
    groups = None if row_groups is None or col_groups is None else (row_groups, col_groups)
    weights = run.pair_weights(weights, a)
    loss = apply_loss(
        a,
        b,
        run.checked,
        run.spec(symmetric=bool(symmetric), exclude_diagonal=False),
        labels=labels,
        positives=positives,
        log_u_rows=log_u_rows.detach(),
        log_u_cols=log_u_cols.detach() if symmetric and log_u_cols is not None else None,
        groups=groups,
        weights=weights,
    )
    return run.global_loss(loss, a.shape[0], weights)


def nt_xent_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.5,
    *,
    reduction: str = "mean",
    backend: str = "auto",
    groups: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    process_group: Optional[Any] = None,
    device_mesh: Optional[Any] = None,
    mesh_dim: Union[int, str, None] = None,
    dist_impl: str = "gather",
) -> torch.Tensor:
    """SimCLR's NT-Xent loss over the ``2N`` views ``z = [z1; z2]``.

    The views are L2-normalized, ``S = z zᵀ / τ`` with the self-similarity
    ``S_kk`` excluded, and view ``k``'s positive is its partner
    ``(k + N) mod 2N``::

        ℓ_k = LSE_{j ≠ k} S_kj − S_{k, partner(k)}

    Args:
        z1, z2: ``(N, D)`` the two augmented views of the same ``N`` samples.
        temperature: ``τ > 0``.
        reduction: ``"mean"`` over the ``2N`` views, ``"sum"``, or ``"none"``
            (``(2N,)``: the ``z1`` views first).
        groups: optional ``(N,)`` integer ids of the samples: another sample
            of the same group is not a negative (false-negative masking; both
            views of a sample share its id, the partner stays the positive).
        weights: optional ``(N,)`` per-sample weights, applied to both views
            (see :func:`contrastive_loss`).
        process_group, device_mesh, mesh_dim, dist_impl: as :func:`contrastive_loss`; every view's
            negatives are then all other views of all ranks.
    """
    process_group = resolve_group(process_group, device_mesh, mesh_dim)

    def check() -> tuple[None, Signature]:
        v.check_pair(z1, z2, ("z1", "z2"))
        if z1.shape[0] != z2.shape[0]:
            raise ValueError(
                f"z1 and z2 must hold the same number of samples, got {z1.shape[0]} and {z2.shape[0]}"
            )
        v.check_positive(temperature, "temperature")
        v.check_reduction(reduction)
        if groups is not None:
            v.check_groups(groups, groups, z1.shape[0], z1.shape[0], z1)
        v.check_weights(weights, z1.shape[0], z1, warn_all_zero=reduction == "mean" and process_group is None)
        signature = dict(
            N=z1.shape[0], M=z2.shape[0], D=z1.shape[1], dtype=z1.dtype, masked=groups is not None,
            weighted=weights is not None,
        )  # fmt: skip
        return None, signature

    run = begin(
        check, like=z1, backend=backend, reduction=reduction, process_group=process_group, dist_impl=dist_impl
    )
    views = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    partners = torch.arange(2 * n, device=z1.device).roll(n)
    scale = torch.tensor(1.0 / temperature, dtype=torch.float64, device=z1.device)
    view_groups = None if groups is None else torch.cat([groups, groups]).long()
    view_weights = run.pair_weights(None if weights is None else torch.cat([weights, weights]), views)
    loss = apply_loss(
        views,
        views,
        scale,
        run.spec(symmetric=False, exclude_diagonal=True),
        labels=partners,
        groups=None if view_groups is None else (view_groups, view_groups),
        weights=view_weights,
    )
    return run.global_loss(loss, 2 * n, view_weights)
