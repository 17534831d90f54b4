"""False-negative masking, per-pair weights and SupCon on every backend of the matrix, against the oracle.

Values and every gradient meet the error rule (``≤ 2×`` naive PyTorch's error
in the same dtype, :mod:`utils`) against the float64 oracle
(:mod:`tilecl.testing.oracle`): masked CLIP (both directions), masked InfoNCE with
labels and hard-negative columns, weights under every reduction, masked
NT-Xent, SupCon in its one- and two-tower forms, and the masked gamma
surrogate. The group ids are chosen so that every tile of the torch backend
(``~20 x 20`` in the matrix), every Triton block (16) and every CUDA tile has
masked and unmasked entries.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

import tilecl
from tilecl.testing import oracle as reference
from tilecl.testing.naive import naive_contrastive_loss, naive_nt_xent_loss, naive_supcon_loss
from utils import (
    CROSSING_TILES,
    Combo,
    assert_all_close_by_rule,
    assert_close_by_rule,
    assert_rel,
    host,
    matrix,
    oracle,
    run,
)

ALL = matrix()


def ids(count: int, groups: int, device: Any, seed: int) -> torch.Tensor:
    """``count`` group ids in ``[0, groups)``, the same on every device."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, groups, (count,), generator=gen).to(device)


def as_numpy(kw: dict) -> dict:
    """The oracle's keyword arguments: tensors as NumPy arrays (integers stay integers)."""
    return {k: x.cpu().numpy() if isinstance(x, torch.Tensor) else x for k, x in kw.items()}


def check_contrastive(combo: Combo, n: int, m: int, d: int, scale: float, grad_output=None, **kw) -> None:
    a, b = combo.inputs(n, m, d, seed=n + m + d)

    def ours(a, b, s, **kw):
        return tilecl.contrastive_loss(a, b, s, backend=combo.backend, **kw)

    mine = run(ours, a, b, scale, grad_output, **kw)
    naive = run(naive_contrastive_loss, a, b, scale, grad_output, **kw)
    assert_all_close_by_rule(mine, naive, oracle(a, b, scale, grad_output, **as_numpy(kw)), combo)


@pytest.mark.parametrize("combo", ALL, indirect=True)
@pytest.mark.parametrize("n,m,d", [(37, 37, 24), CROSSING_TILES])
def test_masked_clip_both_directions(combo, n, m, d):
    n, m, d = combo.crossing_shape() if n is None else (n, m, d)
    dev = combo.device
    check_contrastive(combo, n, m, d, 8.0, row_groups=ids(n, 6, dev, 1), col_groups=ids(m, 6, dev, 2))


@pytest.mark.parametrize("combo", ALL, indirect=True)
def test_masked_infonce_with_labels_and_hard_negative_columns(combo):
    dev = combo.device
    labels = ids(29, 29, dev, 3)
    check_contrastive(
        combo, 29, 45, 16, 6.0, labels=labels, symmetric=False, row_groups=ids(29, 5, dev, 4),
        col_groups=ids(45, 5, dev, 5),
    )  # fmt: skip


@pytest.mark.parametrize("combo", ALL, indirect=True)
def test_masked_clip_with_labels(combo):
    dev = combo.device
    labels = ids(23, 31, dev, 6)
    check_contrastive(
        combo, 23, 31, 12, 5.0, labels=labels, row_groups=ids(23, 4, dev, 7), col_groups=ids(31, 4, dev, 8)
    )


@pytest.mark.parametrize("combo", ALL, indirect=True)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weights_are_row_multipliers(combo, reduction):
    gen = torch.Generator().manual_seed(9)
    weights = torch.rand(21, generator=gen, dtype=torch.float64)
    weights[3] = 0.0
    weights = weights.to(combo.device)
    grad_output = torch.linspace(-1.0, 2.0, 21, dtype=torch.float64) if reduction == "none" else None
    check_contrastive(combo, 21, 27, 10, 7.0, grad_output, weights=weights, reduction=reduction)


@pytest.mark.parametrize("combo", ALL, indirect=True)
def test_masking_down_to_the_positive_is_finite(combo):
    """Every entry of one group: each row keeps only its positive, loss 0, gradient 0 — never NaN."""
    dev = combo.device
    same = torch.zeros(19, dtype=torch.long, device=dev)
    a, b = combo.inputs(19, 19, 8, seed=3)
    s = torch.tensor(4.0, device=dev, requires_grad=True)
    loss = tilecl.contrastive_loss(a, b, s, row_groups=same, col_groups=same, backend=combo.backend)
    grads = torch.autograd.grad(loss, (a, b, s))
    # 16-bit inputs: the softmax of 1 feeds the products rounded to the input type
    tol = 1e-6 if combo.dtype in (torch.float32, torch.float64) else 1e-3
    for x in (loss, *grads):
        assert torch.isfinite(x).all()
        assert float(x.abs().max()) <= tol


@pytest.mark.parametrize("combo", ALL, indirect=True)
def test_masked_and_weighted_nt_xent(combo):
    dev = combo.device
    z1, z2 = combo.inputs(22, 22, 12, seed=10, normalize=False)
    groups = ids(22, 7, dev, 11)
    weights = torch.rand(22, generator=torch.Generator().manual_seed(12), dtype=torch.float64).to(dev)

    def grads(fn, **kw):
        loss = fn(z1, z2, 0.3, groups=groups, weights=weights, **kw)
        return (loss, *torch.autograd.grad(loss, (z1, z2)))

    mine = grads(tilecl.nt_xent_loss, backend=combo.backend)
    naive = grads(naive_nt_xent_loss)
    out = reference.nt_xent_loss(host(z1), host(z2), 0.3, groups=groups.cpu().numpy(), weights=host(weights))
    assert_all_close_by_rule(mine, naive, (out.loss, out.grad_z1, out.grad_z2), combo, ("loss", "z1", "z2"))


@pytest.mark.parametrize("combo", ALL, indirect=True)
@pytest.mark.parametrize("two_tower", [False, True], ids=["one-tower", "two-tower"])
def test_supcon_against_the_oracle(combo, two_tower):
    dev = combo.device
    n, m = 41, 33
    features, columns = combo.inputs(n, m, 16, seed=13, normalize=False)
    labels = ids(n, 9, dev, 14)
    labels[0] = 99  # an anchor without a positive: left out of the mean
    column_labels = ids(m, 9, dev, 15) if two_tower else None
    weights = torch.rand(n, generator=torch.Generator().manual_seed(16), dtype=torch.float64).to(dev)
    kw: dict = dict(columns=columns, column_labels=column_labels) if two_tower else {}
    leaves = (features, columns) if two_tower else (features,)

    def grads(fn, **extra):
        loss = fn(features, labels, 0.2, weights=weights, **kw, **extra)
        return (loss, *torch.autograd.grad(loss, leaves))

    mine = grads(tilecl.supcon_loss, backend=combo.backend)
    naive = grads(naive_supcon_loss)
    out = reference.supcon_loss(
        host(features), labels.cpu().numpy(), 0.2, weights=host(weights),
        **({"columns": host(columns), "column_labels": column_labels.cpu().numpy()} if two_tower else {}),
    )  # fmt: skip
    want = (out.loss, out.grad_features, out.grad_columns)[: 1 + len(leaves)]
    assert_all_close_by_rule(mine, naive, want, combo, ("loss", "features", "columns"))


@pytest.mark.parametrize("combo", ALL, indirect=True)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("two_tower", [False, True], ids=["one-tower", "two-tower"])
def test_supcon_on_a_batch_of_one_sample_is_zero(combo, reduction, two_tower):
    """The trailing batch of one sample (``drop_last=False``): no positive, and one-tower an empty
    row (its LSE over no column is −inf). The loss is 0 with a zero gradient, as PML's."""
    features, columns = combo.inputs(1, 1, 8, seed=3)
    labels = torch.tensor([4], device=combo.device)
    kw: dict = dict(columns=columns, column_labels=labels + 1) if two_tower else {}
    leaves = (features, columns) if two_tower else (features,)
    loss = tilecl.supcon_loss(features, labels, reduction=reduction, backend=combo.backend, **kw)
    grads = torch.autograd.grad(loss.sum(), leaves)
    assert loss.shape == ((1,) if reduction == "none" else ())
    assert torch.equal(loss, torch.zeros_like(loss)), loss
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads), grads


def test_supcon_modules_on_a_batch_of_one_sample_are_zero():
    from tilecl.integrations import pytorch_metric_learning as tilecl_pml

    features = torch.randn(1, 8, dtype=torch.float64, requires_grad=True)
    for loss_fn in (tilecl.SupConLoss(0.1), tilecl_pml.SupConLoss(0.1)):
        loss = loss_fn(features, torch.tensor([2]))
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(features.grad, torch.zeros_like(features))
        features.grad = None


@pytest.mark.parametrize("combo", ALL, indirect=True)
@pytest.mark.parametrize("loss", ["contrastive", "supcon"])
def test_weighted_mean_with_subnormal_weights(combo, loss):
    """float32 weights of ~1e-40 are subnormal: their sum is below float32's smallest normal, which
    the all-zero guard must not take for zero (the weighted mean is scale-free)."""
    gen = torch.Generator().manual_seed(4)
    weights = ((torch.rand(21, generator=gen) + 0.5) * 1e-40).to(torch.float32).to(combo.device)
    assert weights.sum() < torch.finfo(torch.float32).tiny
    normal = weights.double() * 1e40
    if loss == "contrastive":
        check_contrastive(combo, 21, 27, 10, 7.0, weights=weights)
        return
    features, _ = combo.inputs(21, 21, 10, seed=5)
    labels = ids(21, 5, combo.device, 6)
    tiny = tilecl.supcon_loss(features, labels, weights=weights, backend=combo.backend)
    plain = tilecl.supcon_loss(features, labels, weights=normal, backend=combo.backend)
    assert_rel(tiny, plain, 4 * torch.finfo(combo.result_dtype).eps, "loss")


@pytest.mark.parametrize("combo", matrix([torch.float64, torch.float32]), indirect=True)
def test_masked_gamma_surrogate(combo):
    dev = combo.device
    a, b = combo.inputs(26, 26, 10, seed=17)
    log_u_rows = torch.linspace(-1.0, 1.0, 26, dtype=torch.float64)
    log_u_cols = torch.linspace(0.5, -0.5, 26, dtype=torch.float64)
    row_groups, col_groups = ids(26, 5, dev, 18), ids(26, 5, dev, 19)
    loss = tilecl.gamma_contrastive_loss(
        a, b, log_u_rows.to(dev), log_u_cols.to(dev), 4.0, row_groups=row_groups, col_groups=col_groups,
        backend=combo.backend,
    )  # fmt: skip
    grad_a, grad_b = torch.autograd.grad(loss, (a, b))
    out = reference.gamma_contrastive_loss(
        host(a), host(b), log_u_rows.numpy(), log_u_cols.numpy(), 4.0,
        row_groups=row_groups.cpu().numpy(), col_groups=col_groups.cpu().numpy(),
    )  # fmt: skip
    rel = 1e-12 if combo.dtype == torch.float64 else 1e-5
    for what, x, ref in (
        ("loss", loss, out.loss),
        ("grad_a", grad_a, out.grad_a),
        ("grad_b", grad_b, out.grad_b),
    ):
        assert_rel(x, ref, rel, what)


def test_supcon_counts_anchors_without_positives():
    features = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 2, 2, 3])
    out = tilecl.supcon_loss(features, labels, with_counts=True, backend="torch")
    assert isinstance(out, tilecl.SupConOutput)
    assert (int(out.anchors_with_positives), int(out.anchors_without_positives)) == (4, 2)
    lonely = tilecl.supcon_loss(features, torch.arange(6), with_counts=True, backend="torch")
    assert float(lonely.loss) == 0.0 and int(lonely.anchors_without_positives) == 6


def test_class_sums_are_per_class_without_a_mask_matrix():
    columns = torch.arange(12, dtype=torch.float64).view(6, 2)
    col_labels = torch.tensor([5, -1, 5, 7, -1, 5])
    sums, counts = tilecl.supervised.class_sums(torch.tensor([5, 7, 3, -1]), col_labels, columns)
    assert counts.tolist() == [3, 1, 0, 2]
    want = [
        columns[[0, 2, 5]].sum(0),
        columns[3],
        torch.zeros(2, dtype=torch.float64),
        columns[[1, 4]].sum(0),
    ]
    assert torch.equal(sums, torch.stack(want))


def test_weighted_mean_is_the_weighted_average_of_per_pair_losses():
    a, b = torch.randn(9, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    w = torch.tensor([0.0, 1, 2, 3, 0, 1, 1, 0.5, 4], dtype=torch.float64)
    per_pair = tilecl.contrastive_loss(a, b, 3.0, reduction="none", backend="torch")
    weighted = tilecl.contrastive_loss(a, b, 3.0, weights=w, backend="torch")
    assert math.isclose(float(weighted), float((per_pair * w).sum() / w.sum()), rel_tol=1e-14)
    with pytest.warns(RuntimeWarning, match="weights are all zero") as caught:
        zero = tilecl.contrastive_loss(
            a, b, 3.0, weights=torch.zeros(9, dtype=torch.float64), backend="torch"
        )
    assert float(zero) == 0.0
    assert caught[0].filename == __file__  # it points at the call
    for loss in (
        lambda: tilecl.nt_xent_loss(a, b, 0.5, weights=torch.zeros(9, dtype=torch.float64)),
        lambda: tilecl.supcon_loss(a, torch.arange(9) % 3, weights=torch.zeros(9, dtype=torch.float64)),
    ):
        with pytest.warns(RuntimeWarning, match="weights are all zero"):
            assert float(loss()) == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_group_masking_is_independent_of_the_tile_shape(tile_bytes, seed):
    """The torch backend finds masked entries per tile by sorting: every tiling gives the same loss."""
    a, b = torch.randn(45, 6, dtype=torch.float64), torch.randn(52, 6, dtype=torch.float64)
    row_groups, col_groups = ids(45, 4, "cpu", seed), ids(52, 4, "cpu", seed + 10)
    loss = tilecl.contrastive_loss(a, b, 2.0, row_groups=row_groups, col_groups=col_groups, backend="torch")
    want = reference.contrastive_loss(
        a.numpy(), b.numpy(), 2.0, row_groups=row_groups.numpy(), col_groups=col_groups.numpy()
    )
    assert abs(float(loss) - want.loss) <= 1e-12 * abs(want.loss)
    assert np.isfinite(want.loss)


def test_supcon_and_masked_losses_match_naive_on_one_tile():
    """Sanity of the naive references themselves (they are the 2× rule's yardstick)."""
    features = torch.randn(12, 5, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 3, 0, 1, 2, 3, 3])
    got = naive_supcon_loss(features, labels, 0.5)
    want = reference.supcon_loss(features.numpy(), labels.numpy(), 0.5).loss
    assert_close_by_rule(got, got, want, torch.float64, "naive supcon")


def test_gamma_module_masks_false_negatives_in_its_estimates_and_its_loss():
    """The masked entries leave D̂: the memory holds the masked row LSE (minus log M), and the M-step
    is the masked surrogate for the module's weights."""
    module = tilecl.GammaContrastiveLoss(30, gamma=1.0, estimator="mean", backend="torch").double()
    a, b = (torch.randn(8, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    groups = torch.tensor([0, 1, 0, 2, 2, 3, 1, 0])
    loss = module(a, b, torch.arange(8), 3.0, row_groups=groups, col_groups=groups)
    logits = 3.0 * a.detach().numpy() @ b.detach().numpy().T
    same = (groups[:, None] == groups[None, :]).numpy() & ~np.eye(8, dtype=bool)
    logits[same] = -np.inf
    assert_rel(module.log_memory_rows[:8], reference.logsumexp(logits, 1) - np.log(8), 1e-12, "row memory")
    log_u, log_uc = module.last_log_u
    want = reference.gamma_contrastive_loss(
        a.detach().numpy(), b.detach().numpy(), log_u.numpy(), log_uc.numpy(), 3.0,
        row_groups=groups.numpy(), col_groups=groups.numpy(),
    )  # fmt: skip
    assert_rel(loss, want.loss, 1e-12, "loss")
