"""The oracle itself: its analytic gradients against finite differences and autograd."""

import numpy as np
import pytest
import torch

from tilecl.testing import oracle as reference
from tilecl.testing.naive import naive_contrastive_loss, naive_nt_xent_loss


def numeric_grad(f, x, eps=1e-6):
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[idx] = eps
        grad[idx] = (f(x + step) - f(x - step)) / (2 * eps)
    return grad


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_contrastive_gradients_match_finite_differences(symmetric, reduction):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(7, 3))
    labels = np.array([3, 0, 6, 1, 1])
    s = 2.5

    def loss(a_, b_, s_):
        return reference.contrastive_loss(a_, b_, s_, labels, symmetric, reduction).loss

    out = reference.contrastive_loss(a, b, s, labels, symmetric, reduction)
    np.testing.assert_allclose(out.grad_a, numeric_grad(lambda x: loss(x, b, s), a), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(out.grad_b, numeric_grad(lambda x: loss(a, x, s), b), rtol=1e-6, atol=1e-8)
    fd = (loss(a, b, s + 1e-6) - loss(a, b, s - 1e-6)) / 2e-6
    np.testing.assert_allclose(out.grad_logit_scale, fd, rtol=1e-6)


def test_contrastive_matches_autograd_of_naive_loss_with_grad_output():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 4)), rng.normal(size=(9, 4))
    upstream = rng.normal(size=6)
    out = reference.contrastive_loss(a, b, 3.0, None, True, "none", grad_output=upstream)
    ta = torch.tensor(a, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    ts = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    loss = naive_contrastive_loss(ta, tb, ts, reduction="none")
    np.testing.assert_allclose(out.loss, loss.detach().numpy(), rtol=1e-13)
    loss.backward(torch.tensor(upstream))
    np.testing.assert_allclose(out.grad_a, ta.grad.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out.grad_b, tb.grad.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out.grad_logit_scale, ts.grad.item(), rtol=1e-12)


def test_nt_xent_matches_autograd_of_naive_loss():
    rng = np.random.default_rng(2)
    z1, z2 = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    out = reference.nt_xent_loss(z1, z2, 0.3)
    t1 = torch.tensor(z1, requires_grad=True)
    t2 = torch.tensor(z2, requires_grad=True)
    loss = naive_nt_xent_loss(t1, t2, 0.3)
    loss.backward()
    np.testing.assert_allclose(out.loss, loss.item(), rtol=1e-13)
    np.testing.assert_allclose(out.grad_z1, t1.grad.numpy(), rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(out.grad_z2, t2.grad.numpy(), rtol=1e-11, atol=1e-14)


def test_logsumexp_of_all_masked_is_minus_inf_not_nan():
    x = np.array([[-np.inf, -np.inf], [0.0, -np.inf]])
    np.testing.assert_array_equal(reference.logsumexp(x, axis=1), [-np.inf, 0.0])


def test_extreme_logits_stay_finite():
    rng = np.random.default_rng(3)
    a, b = 30 * rng.normal(size=(4, 8)), 30 * rng.normal(size=(4, 8))
    out = reference.contrastive_loss(a, b, 100.0)
    assert np.isfinite(out.loss) and np.all(np.isfinite(out.grad_a)) and np.all(np.isfinite(out.grad_b))
