"""Modality-structure regularizers against the oracle: values, gradients, cancellation, large N."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tilecl
from tilecl import modality
from tilecl.testing import oracle as reference
from utils import assert_rel


def unit(n, d, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (
        F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1).to(dtype).requires_grad_()
    )


def np64(*xs):
    return [x.detach().double().numpy() for x in xs]


@pytest.mark.parametrize("n,d", [(2, 1), (9, 4), (23, 17)])
@pytest.mark.parametrize("normalized", [True, False])
def test_uniformity_matches_oracle_float64(n, d, normalized, tile_bytes):
    """Exact in float64 whatever the tiling, unnormalized features included (every backend and
    dtype on unit features: the matrix, test_losses.py)."""
    z = unit(n, d, seed=n + d)
    if not normalized:
        z = (3 * z.detach()).requires_grad_()
    loss = tilecl.uniformity_loss(z, 2.0, backend="torch")
    (grad,) = torch.autograd.grad(loss, z)
    ref = reference.uniformity_loss(*np64(z), t=2.0)
    assert_rel(loss, ref.loss, 1e-10, "loss", atol=1e-10)
    assert_rel(grad, ref.grads[0], 1e-10, "grad", atol=1e-10)
    pdist = torch.pdist(z.detach()).pow(2).mul(-2.0).exp().mean().log()
    torch.testing.assert_close(loss.detach(), pdist, rtol=1e-12, atol=1e-12)


def test_uniformity_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2 samples"):
        tilecl.uniformity_loss(torch.randn(1, 3))
    with pytest.raises(ValueError, match="t must be"):
        tilecl.uniformity_loss(torch.randn(4, 3), t=0.0)


@pytest.mark.parametrize("augmented", [False, True])
def test_geometric_consistency_matches_oracle(augmented, monkeypatch):
    monkeypatch.setattr(modality, "GRAM_CHUNK_ROWS", 5)  # several chunks
    zs = [unit(17, 6, seed=k) for k in range(4 if augmented else 2)]
    loss = tilecl.geometric_consistency_loss(*zs)
    grads = torch.autograd.grad(loss, zs)
    ref = reference.geometric_consistency_loss(*np64(*zs))
    assert_rel(loss, ref.loss, 1e-12, "loss")
    for k, (g, r) in enumerate(zip(grads, ref.grads)):
        assert_rel(g, r, 1e-12, f"grad {k}")


def test_geometric_consistency_near_consistent_geometry_float32():
    """Text = vision + 1e-4 noise: L_gc is tiny, the naive float32 formula loses it.

    The oracle runs in float64 on the same float32 inputs, so what is measured
    is the arithmetic, not the rounding of the inputs.
    """
    n, d = 512, 32
    gen = torch.Generator().manual_seed(2)
    z_v = unit(n, d, seed=1).detach().float()
    noise = 1e-4 * torch.randn(n, d, dtype=torch.float64, generator=gen)
    z_t = F.normalize(z_v.double() + noise, dim=1).float()
    ref = reference.geometric_consistency_loss(*np64(z_v, z_t))
    ours = tilecl.geometric_consistency_loss(z_v, z_t)
    s_vt = z_v @ z_t.T
    naive = (((s_vt - s_vt.T) ** 2).sum() + ((z_v @ z_v.T - z_t @ z_t.T) ** 2).sum()) / n
    assert abs(float(ours) - ref.loss) <= 1e-5 * abs(ref.loss)  # float64 Grams: float32 output rounding only
    assert abs(float(naive) - ref.loss) > 10 * abs(float(ours) - ref.loss)


@pytest.mark.slow
def test_geometric_consistency_large_n_bounded_memory():
    """N = 131,072, d = 128: O(d²) Grams, never N×N (64 GiB per float32 matrix)."""
    n, d = 131_072, 128
    gen = torch.Generator().manual_seed(0)
    z_v = F.normalize(torch.randn(n, d, generator=gen), dim=1).requires_grad_()
    z_t = F.normalize(torch.randn(n, d, generator=gen), dim=1).requires_grad_()
    loss = tilecl.geometric_consistency_loss(z_v, z_t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z_v.grad).all() and torch.isfinite(z_t.grad).all()
    # check against a cheap identity: with independent random features, E[L_gc] ≈ 3·N/d
    assert 0.5 * 3 * n / d < float(loss.detach()) < 2 * 3 * n / d


@pytest.mark.parametrize("sampled_t", [False, True])
def test_brownian_bridge_matches_oracle(sampled_t):
    z_v, z_t, z_a = unit(11, 5, 1), unit(11, 5, 2), unit(11, 5, 3)
    t = torch.rand(11, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) if sampled_t else 0.25
    loss = tilecl.brownian_bridge_loss(z_v, z_t, z_a, t)
    grads = torch.autograd.grad(loss, (z_v, z_t, z_a))
    ref = reference.brownian_bridge_loss(*np64(z_v, z_t, z_a), t=t.numpy() if sampled_t else t)
    assert_rel(loss, ref.loss, 1e-12, "loss")
    for g, r in zip(grads, ref.grads):
        assert_rel(g, r, 1e-12, "grad")
    with pytest.raises(ValueError, match="t must lie"):
        tilecl.brownian_bridge_loss(z_v, z_t, z_a, 1.5)


def test_feature_separation_is_the_sum_of_its_parts(tile_bytes):
    z_v, z_t, zi_v, zi_t, zi_va, zi_ta = (unit(13, 6, k) for k in range(6))
    loss = tilecl.feature_separation_loss(z_v, z_t, zi_v, zi_t, zi_va, zi_ta, 0.1, 2.0, backend="torch")
    ortho = float(
        np.mean(np.sum(np64(z_v)[0] * np64(zi_v)[0], 1) ** 2 + np.sum(np64(z_t)[0] * np64(zi_t)[0], 1) ** 2)
    )
    con = (
        reference.contrastive_loss(*np64(zi_v, zi_va), 10.0).loss
        + reference.contrastive_loss(*np64(zi_t, zi_ta), 10.0).loss
    ) / 2
    uni = reference.uniformity_loss(*np64(zi_v)).loss + reference.uniformity_loss(*np64(zi_t)).loss
    assert_rel(loss, ortho + con + uni, 1e-10, "loss")
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(loss, (z_v, zi_v, zi_va)))


def test_modality_structure_loss_parts_and_training_step():
    z_v, z_t, z_va, z_ta, zi_v, zi_t, zi_va, zi_ta = (unit(12, 5, k) for k in range(8))
    module = tilecl.ModalityStructureLoss()
    out = module(
        z_v, z_t, 14.0, z_v_aug=z_va, z_t_aug=z_ta, zi_v=zi_v, zi_t=zi_t, zi_v_aug=zi_va, zi_t_aug=zi_ta,
        output_dict=True,
    )  # fmt: skip
    assert set(out) == {"loss", "contrastive_loss", "separation_loss", "bridge_loss", "geometric_loss"}
    torch.testing.assert_close(out["loss"], sum(v for k, v in out.items() if k != "loss"))
    out["loss"].backward()
    assert z_v.grad is not None and zi_v.grad is not None and z_va.grad is not None
    only_clip = tilecl.ModalityStructureLoss(lambda_gc=0)(z_v, z_t, 14.0)
    torch.testing.assert_close(only_clip, tilecl.contrastive_loss(z_v, z_t, 14.0))
    with pytest.raises(ValueError, match="lambda_br"):
        tilecl.ModalityStructureLoss(lambda_br=-1.0)


def test_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match="z_t must have the shape"):
        tilecl.geometric_consistency_loss(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="pass both"):
        tilecl.geometric_consistency_loss(torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3))
