"""The Triton kernels (backend="triton") against the oracle.

Without a GPU they run under Triton's interpreter on CPU tensors (conftest
sets TRITON_INTERPRET=1), with 16x16 tiles and 16-wide feature chunks so
that even these small shapes cross several tiles and chunks: every kernel
line executes here. Sizes stay small because the interpreter is slow.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_contrastive import check_nt_xent_by_rule, make_inputs, oracle, run

import tilecl
from conftest import assert_close_by_rule
from tilecl import reference
from tilecl.naive import naive_contrastive_loss

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
    reason="unreachable: conftest sets TRITON_INTERPRET=1 when there is no GPU",
)
LOW = [torch.float32, torch.bfloat16, torch.float16]
NAMES = ("loss", "grad_a", "grad_b", "grad_scale")


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (13, 17, 5), (31, 31, 37), (20, 45, 70)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_oracle_by_rule(dtype, n, m, d, symmetric):
    a, b = make_inputs(n, m, d, dtype=dtype, seed=n + d)
    ours = run(tilecl.contrastive_loss, a, b, 12.0, symmetric=symmetric, backend="triton")
    naive = run(naive_contrastive_loss, a, b, 12.0, symmetric=symmetric)
    ref = oracle(a, b, 12.0, symmetric=symmetric)
    for name, x, y, r in zip(NAMES, ours, naive, ref):
        assert_close_by_rule(x, y, r, dtype, name)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_labels_hard_negatives_reductions(symmetric, reduction):
    a, b = make_inputs(11, 19, 20, dtype=torch.float32, seed=3)
    labels = torch.tensor([18, 0, 3, 3, 7, 10, 1, 2, 5, 16, 4])
    upstream = torch.linspace(-1, 1, 11) if reduction == "none" else None
    kw = dict(labels=labels, symmetric=symmetric, reduction=reduction)
    ours = run(tilecl.contrastive_loss, a, b, 5.0, upstream, backend="triton", **kw)
    naive = run(naive_contrastive_loss, a, b, 5.0, upstream, **kw)
    ref = oracle(a, b, 5.0, upstream, labels=labels.numpy(), symmetric=symmetric, reduction=reduction)
    for name, x, y, r in zip(NAMES, ours, naive, ref):
        assert_close_by_rule(x, y, r, torch.float32, name)


@pytest.mark.parametrize("symmetric", [True, False])
def test_extreme_logits_unnormalized(symmetric):
    a, b = make_inputs(24, 29, 16, dtype=torch.float32, seed=5, spread=3.0, normalize=False)
    ours = run(tilecl.contrastive_loss, a, b, 100.0, symmetric=symmetric, backend="triton")
    assert all(torch.isfinite(x).all() for x in ours)
    naive = run(naive_contrastive_loss, a, b, 100.0, symmetric=symmetric)
    ref = oracle(a, b, 100.0, symmetric=symmetric)
    for name, x, y, r in zip(NAMES, ours, naive, ref):
        assert_close_by_rule(x, y, r, torch.float32, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nt_xent(dtype):
    check_nt_xent_by_rule("triton", dtype, 18, 24, 0.1)


def test_gamma_surrogate_weights():
    a, b = make_inputs(14, 14, 20, dtype=torch.float32, seed=2)
    gen = torch.Generator().manual_seed(0)
    log_u, log_uc = torch.randn(14, generator=gen), torch.randn(14, generator=gen)
    loss = tilecl.gamma_contrastive_loss(a, b, log_u, log_uc, 6.0, backend="triton")
    ref = reference.gamma_contrastive_loss(
        a.detach().double().numpy(), b.detach().double().numpy(), log_u.double().numpy(),
        log_uc.double().numpy(), 6.0,
    )  # fmt: skip
    torch_loss = tilecl.gamma_contrastive_loss(a, b, log_u, log_uc, 6.0, backend="torch")
    ours = (loss, *torch.autograd.grad(loss, (a, b)))
    same_dtype = (torch_loss, *torch.autograd.grad(torch_loss, (a, b)))
    for name, x, y, r in zip(NAMES, ours, same_dtype, ref):
        assert_close_by_rule(x, y, r, torch.float32, name)


def test_deterministic_backward_is_bitwise_reproducible_and_matches():
    a, b = make_inputs(21, 26, 33, dtype=torch.float32, seed=4)
    default = run(tilecl.contrastive_loss, a, b, 8.0, backend="triton")
    torch.use_deterministic_algorithms(True)
    try:
        first = run(tilecl.contrastive_loss, a, b, 8.0, backend="triton")
        second = run(tilecl.contrastive_loss, a, b, 8.0, backend="triton")
    finally:
        torch.use_deterministic_algorithms(False)
    for x, y, z in zip(first, second, default):
        assert torch.equal(x, y)
        np.testing.assert_allclose(x.detach().numpy(), z.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_float64_is_refused_with_a_pointer_to_torch():
    a, b = make_inputs(3, 3, 2)
    with pytest.raises(TypeError, match="backend='torch' for float64"):
        tilecl.contrastive_loss(a, b, 1.0, backend="triton")
