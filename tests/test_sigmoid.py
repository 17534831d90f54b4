"""The sigmoid (SigLIP) loss on every backend of the matrix against the float64 oracle, and its module.

Values and the four gradients (``a``, ``b``, ``logit_scale``, ``logit_bias``)
meet the error rule (``≤ 2×`` naive PyTorch's error in the same dtype) for the
diagonal positives, labels with extra negative columns, group ids and all
three reductions. A backend that declared no sigmoid form would be a skip
carrying that reason (every backend here has it).
"""

from __future__ import annotations

import math

import pytest
import torch

import tilecl
from tilecl.backends import BACKENDS
from tilecl.testing.naive import naive_sigmoid_loss
from utils import (
    CROSSING_TILES,
    SIGMOID_NAMES,
    Combo,
    assert_all_close_by_rule,
    assert_rel,
    make_inputs,
    matrix,
    run_sigmoid,
    sigmoid_oracle,
)

ALL = matrix()
NAMES = SIGMOID_NAMES
SHAPES = [(1, 1, 1), (13, 17, 5), (37, 45, 40), CROSSING_TILES]


def sigmoid_combo(combo: Combo) -> Combo:
    reasons = BACKENDS[combo.backend].not_supported_reasons(
        torch.device(combo.device), combo.dtype, "sigmoid"
    )
    if reasons:
        pytest.skip(f"{combo.backend}/{combo.device}: {'; '.join(reasons)}")
    return combo


def check(combo: Combo, n: int, m: int, d: int, scale=10.0, bias=-5.0, grad_output=None, **kw) -> None:
    a, b = combo.inputs(n, m, d, seed=n + m + d)

    def ours(a, b, s, t, **kw):
        return tilecl.sigmoid_loss(a, b, s, t, backend=combo.backend, **kw)

    mine = run_sigmoid(ours, a, b, scale, bias, grad_output, **kw)
    naive = run_sigmoid(naive_sigmoid_loss, a, b, scale, bias, grad_output, **kw)
    assert mine[0].dtype == combo.result_dtype
    assert_all_close_by_rule(mine, naive, sigmoid_oracle(a, b, scale, bias, grad_output, **kw), combo, NAMES)


@pytest.mark.parametrize("combo", ALL, indirect=True)
@pytest.mark.parametrize("n,m,d", SHAPES)
def test_diagonal_positives(combo, n, m, d):
    n, m, d = combo.crossing_shape() if n is None else (n, m, d)
    check(sigmoid_combo(combo), n, m, d)


@pytest.mark.parametrize("combo", ALL, indirect=True)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions_and_a_per_row_upstream_gradient(combo, reduction):
    grad_output = torch.linspace(-1.0, 2.0, 13, dtype=torch.float64) if reduction == "none" else None
    check(sigmoid_combo(combo), 13, 17, 6, reduction=reduction, grad_output=grad_output)


@pytest.mark.parametrize("combo", ALL, indirect=True)
def test_labels_and_extra_negative_columns(combo):
    labels = torch.tensor([4, 0, 9, 9, 1, 3, 2, 8, 6, 5, 12], device=combo.device)
    check(sigmoid_combo(combo), 11, 19, 7, labels=labels)


@pytest.mark.parametrize("combo", ALL, indirect=True)
def test_group_ids_several_positives_per_row(combo):
    """Several captions per image: every pair with equal ids is positive."""
    row_groups = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5], device=combo.device)
    col_groups = torch.tensor([5, 0, 1, 1, 2, 9, 3, 4, 4, 0, 7, 2], device=combo.device)
    check(sigmoid_combo(combo), 10, 12, 8, row_groups=row_groups, col_groups=col_groups)


@pytest.mark.parametrize("combo", ALL, indirect=True)
def test_confident_pairs_keep_their_tiny_loss(combo):
    """At |ℓ| ~ 30 each pair's loss is ~e^-30: no softplus(ℓ) − ℓ cancellation in any backend."""
    check(sigmoid_combo(combo), 9, 9, 4, scale=60.0, bias=0.0)


@pytest.mark.parametrize("combo", ALL, indirect=True)
def test_no_grad_is_the_same_value(combo):
    combo = sigmoid_combo(combo)
    a, b = combo.inputs(21, 23, 9, seed=3)
    with torch.no_grad():
        quiet = tilecl.sigmoid_loss(a, b, 10.0, -4.0, backend=combo.backend)
    loud = tilecl.sigmoid_loss(a, b, 10.0, -4.0, backend=combo.backend)
    assert_rel(quiet, loud.detach(), 1e-6 if combo.dtype != torch.float64 else 1e-14, "no_grad loss")


def test_open_clip_siglip_step_replayed():
    """open_clip's SigLipLoss formula as it is written there, against SigLipLoss: value and gradients."""

    def open_clip_siglip(image_features, text_features, logit_scale, logit_bias):
        logits = logit_scale * image_features @ text_features.T + logit_bias
        n = image_features.shape[0]
        labels = -torch.ones((n, n), dtype=image_features.dtype) + 2 * torch.eye(
            n, dtype=image_features.dtype
        )
        return -torch.nn.functional.logsigmoid(labels * logits).sum() / n

    a, b = make_inputs(24, 24, 8, device="cpu", seed=1)
    log_scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    ours = tilecl.SigLipLoss(backend="torch")(a, b, log_scale.exp(), bias, output_dict=True)
    assert set(ours) == {"contrastive_loss"}
    theirs = open_clip_siglip(a, b, log_scale.exp(), bias)
    leaves = (a, b, log_scale, bias)
    for x, y, name in zip(
        torch.autograd.grad(ours["contrastive_loss"], leaves), torch.autograd.grad(theirs, leaves), "abst"
    ):
        assert_rel(x, y, 1e-12, name)
    assert_rel(ours["contrastive_loss"], theirs, 1e-13, "loss")


@pytest.mark.parametrize(
    "dist_impl,expected",
    [
        (None, "ring"),
        ("bidir", "ring"),
        ("shift", "ring"),
        ("reduce", "gather"),
        ("gather", "gather"),
        ("ring", "ring"),
    ],
)
def test_open_clip_dist_impl_names(dist_impl, expected):
    assert tilecl.SigLipLoss(dist_impl=dist_impl).dist_impl == expected


def test_deterministic_triton_sweep_is_reproducible_and_agrees():
    """No float atomics under use_deterministic_algorithms: bitwise equal twice, close to the default."""
    if BACKENDS["triton"].not_supported_reasons(torch.device("cpu"), torch.float32, "sigmoid") and not (
        torch.cuda.is_available()
    ):
        pytest.skip("triton cannot run here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = make_inputs(40, 50, 24, dtype=torch.float32, device=device, seed=2)
    default = run_sigmoid(lambda *x: tilecl.sigmoid_loss(*x, backend="triton"), a, b, 10.0, -3.0)
    torch.use_deterministic_algorithms(True)
    try:
        first = run_sigmoid(lambda *x: tilecl.sigmoid_loss(*x, backend="triton"), a, b, 10.0, -3.0)
        second = run_sigmoid(lambda *x: tilecl.sigmoid_loss(*x, backend="triton"), a, b, 10.0, -3.0)
    finally:
        torch.use_deterministic_algorithms(False)
    for x, y, z, name in zip(first, second, default, NAMES):
        assert torch.equal(x, y), name
        assert_rel(x, z, 1e-6, name, atol=1e-7)


def test_a_retained_graph_gives_the_same_gradients_twice():
    """The fused path saves the gradients in the forward; a second backward must not rescale them again."""
    a, b = make_inputs(9, 11, 4, device="cpu", seed=5)
    loss = tilecl.sigmoid_loss(a, b, 10.0, -3.0, backend="torch")
    first = torch.autograd.grad(loss, (a, b), retain_graph=True)
    second = torch.autograd.grad(loss, (a, b))
    for x, y in zip(first, second):
        assert torch.equal(x, y)
