"""ClipLoss as an open_clip drop-in; InfoNCELoss (learnable temperature, negatives); NTXentLoss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tilecl
from tilecl.backends import BACKENDS, resolve_backend
from tilecl.testing.naive import naive_contrastive_loss, naive_nt_xent_loss


def open_clip_loss(image_features, text_features, logit_scale, logit_bias=None):
    """open_clip's ClipLoss (world_size=1), written out."""
    logits_per_image = logit_scale * image_features @ text_features.T
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
    logits_per_text = logits_per_image.T
    labels = torch.arange(logits_per_image.shape[0])
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class TwoTower(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.image = torch.nn.Linear(6, 4).double()
        self.text = torch.nn.Linear(5, 4).double()
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=torch.float64))
        self.logit_bias = torch.nn.Parameter(torch.tensor(-1.0, dtype=torch.float64))

    def forward(self, x, y):
        return (
            F.normalize(self.image(x), dim=-1),
            F.normalize(self.text(y), dim=-1),
            self.logit_scale.exp(),
        )


def test_clip_loss_is_a_drop_in_for_open_clip_training_step():
    """The same SGD step with open_clip's loss and tilecl.ClipLoss gives the same parameters."""
    x, y = torch.randn(9, 6, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    results = []
    for loss_fn in (open_clip_loss, tilecl.ClipLoss()):
        model = TwoTower()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            loss = loss_fn(*model(x, y), model.logit_bias)
            loss.backward()
            opt.step()
        results.append((loss.detach(), [p.detach().clone() for p in model.parameters()]))
    (loss_a, params_a), (loss_b, params_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=1e-12)
    for pa, pb in zip(params_a, params_b):
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12)


def test_clip_loss_output_dict_and_open_clip_keywords():
    loss_fn = tilecl.ClipLoss(
        local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1
    )
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    out = loss_fn(a, b, torch.tensor(10.0), output_dict=True)
    assert set(out) == {"contrastive_loss"}
    torch.testing.assert_close(out["contrastive_loss"], loss_fn(a, b, 10.0))


def test_clip_loss_bias_gets_a_zero_gradient():
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    bias = torch.tensor(-10.0, requires_grad=True)
    loss = tilecl.ClipLoss()(a, b, 10.0, bias)
    loss.backward()
    assert bias.grad is not None and bias.grad.item() == 0.0
    torch.testing.assert_close(loss, open_clip_loss(a, b, 10.0, bias).detach())


def test_info_nce_learnable_temperature_training_step():
    torch.manual_seed(0)
    a = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    module = tilecl.InfoNCELoss(temperature=0.1, learn_temperature=True).double()
    assert [n for n, _ in module.named_parameters()] == ["log_scale"]
    loss = module(a, b)
    loss.backward()
    ref_scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    ref = naive_contrastive_loss(a, b, ref_scale.exp())
    ref.backward()
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(module.log_scale.grad, ref_scale.grad)
    before = module.temperature
    torch.optim.SGD(module.parameters(), lr=1.0).step()
    assert module.temperature != before


def test_info_nce_fixed_temperature_has_no_parameters_and_clamps():
    module = tilecl.InfoNCELoss(temperature=0.001)
    assert list(module.parameters()) == []
    assert module.temperature == pytest.approx(0.01)  # 1/τ clamped to max_scale=100


def test_info_nce_hard_negatives_match_naive():
    torch.manual_seed(1)
    a, b, neg = (torch.randn(6, 5, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for symmetric in (True, False):
        ours = tilecl.InfoNCELoss(temperature=0.2, symmetric=symmetric)(a, b, negatives=neg)
        ref = naive_contrastive_loss(a, torch.cat([b, neg]), 5.0, symmetric=symmetric)
        g_ours = torch.autograd.grad(ours, (a, b, neg))
        g_ref = torch.autograd.grad(ref, (a, b, neg))
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
        for x, y in zip(g_ours, g_ref):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_nt_xent_module_matches_naive():
    z1, z2 = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    torch.testing.assert_close(tilecl.NTXentLoss(0.3)(z1, z2), naive_nt_xent_loss(z1, z2, 0.3))


def test_available_backends_and_auto():
    names = tilecl.available_backends()
    assert "torch" in names and "reference" in names
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, torch.float32).name == "torch"
    on_cuda = resolve_backend("auto", cuda, torch.float32)
    on_cuda_by_preference = sorted(
        (b for b in BACKENDS.values() if "cuda" in b.auto_devices), key=lambda b: b.preference
    )
    runnable = [b.name for b in on_cuda_by_preference if not b.not_supported_reasons(cuda, torch.float32)]
    assert on_cuda.name == (runnable or ["torch"])[0]
    # float64 on CUDA tensors: the kernels do not take it, so auto dispatches to torch
    assert resolve_backend("auto", cuda, torch.float64).name == "torch"
