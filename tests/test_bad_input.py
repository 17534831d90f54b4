"""Every bad input of DESIGN.md raises a clear error naming the argument, before any compute."""

from __future__ import annotations

import pytest
import torch

import tilecl
from tilecl import _blockwise


@pytest.fixture(autouse=True)
def no_compute(monkeypatch):
    """Fail loudly if a kernel starts before the error is raised."""

    def boom(*args, **kwargs):
        raise AssertionError("a kernel ran before the bad input was rejected")

    monkeypatch.setattr(_blockwise, "lse_stats", boom)
    monkeypatch.setattr(_blockwise, "offset_backward", boom)
    from tilecl import backends

    monkeypatch.setitem(backends._BACKENDS, "torch", backends.Backend("torch", boom, boom))


def feats(n=4, d=3, dtype=torch.float32, device="cpu"):
    return torch.randn(n, d, dtype=dtype, device=device)


CASES = [
    (
        "mismatched D",
        lambda: tilecl.contrastive_loss(feats(4, 3), feats(4, 5)),
        ValueError,
        "feature dimension",
    ),
    (
        "mismatched dtype",
        lambda: tilecl.contrastive_loss(feats(), feats(dtype=torch.float64)),
        TypeError,
        "same dtype",
    ),
    (
        "a is 1-D",
        lambda: tilecl.contrastive_loss(torch.randn(4), feats()),
        ValueError,
        "a must be 2-D",
    ),
    (
        "b is 3-D",
        lambda: tilecl.contrastive_loss(feats(), torch.randn(2, 4, 3)),
        ValueError,
        "b must be 2-D",
    ),
    (
        "empty a",
        lambda: tilecl.contrastive_loss(feats(0), feats()),
        ValueError,
        "a is an empty batch",
    ),
    (
        "empty b",
        lambda: tilecl.contrastive_loss(feats(), feats(0), symmetric=False),
        ValueError,
        "b is an empty batch",
    ),
    (
        "D = 0",
        lambda: tilecl.contrastive_loss(feats(4, 0), feats(4, 0)),
        ValueError,
        "feature dimension 0",
    ),
    (
        "integer features",
        lambda: tilecl.contrastive_loss(torch.ones(4, 3, dtype=torch.long), feats()),
        TypeError,
        "a must be float",
    ),
    (
        "not a tensor",
        lambda: tilecl.contrastive_loss([[1.0]], feats()),
        TypeError,
        "a must be a torch.Tensor",
    ),
    (
        "label too large",
        lambda: tilecl.contrastive_loss(feats(), feats(), labels=torch.tensor([0, 1, 2, 4])),
        ValueError,
        "labels must lie in",
    ),
    (
        "negative label",
        lambda: tilecl.contrastive_loss(feats(), feats(), labels=torch.tensor([0, -1, 2, 3])),
        ValueError,
        "labels must lie in",
    ),
    (
        "labels wrong shape",
        lambda: tilecl.contrastive_loss(feats(), feats(), labels=torch.tensor([0, 1])),
        ValueError,
        "labels must have shape",
    ),
    (
        "float labels",
        lambda: tilecl.contrastive_loss(feats(), feats(), labels=torch.zeros(4)),
        TypeError,
        "labels must be an integer",
    ),
    (
        "symmetric with M < N",
        lambda: tilecl.contrastive_loss(feats(5), feats(3)),
        ValueError,
        "symmetric=True needs",
    ),
    (
        "inf logit_scale",
        lambda: tilecl.contrastive_loss(feats(), feats(), float("inf")),
        ValueError,
        "logit_scale must be finite",
    ),
    (
        "nan logit_scale tensor",
        lambda: tilecl.contrastive_loss(feats(), feats(), torch.tensor(float("nan"))),
        ValueError,
        "logit_scale must be finite",
    ),
    (
        "vector logit_scale",
        lambda: tilecl.contrastive_loss(feats(), feats(), torch.ones(2)),
        ValueError,
        "logit_scale must be a scalar",
    ),
    (
        "string logit_scale",
        lambda: tilecl.contrastive_loss(feats(), feats(), "1"),
        TypeError,
        "logit_scale must be a float",
    ),
    (
        "bad reduction",
        lambda: tilecl.contrastive_loss(feats(), feats(), reduction="avg"),
        ValueError,
        "reduction must be one of",
    ),
    (
        "unknown backend",
        lambda: tilecl.contrastive_loss(feats(), feats(), backend="magic"),
        ValueError,
        "backend must be",
    ),
    (
        # CPU tensors here: "cuda" is either not built or refuses them, before any launch
        "unavailable backend",
        lambda: tilecl.contrastive_loss(feats(), feats(), backend="cuda"),
        RuntimeError,
        "not available|needs CUDA tensors",
    ),
    (
        "nt_xent unequal views",
        lambda: tilecl.nt_xent_loss(feats(4), feats(5)),
        ValueError,
        "same number of samples",
    ),
    (
        "nt_xent temperature 0",
        lambda: tilecl.nt_xent_loss(feats(), feats(), 0.0),
        ValueError,
        "temperature must be",
    ),
    (
        "nt_xent mismatched D",
        lambda: tilecl.nt_xent_loss(feats(4, 3), feats(4, 2)),
        ValueError,
        "z1 and z2",
    ),
    (
        "ClipLoss names its arguments",
        lambda: tilecl.ClipLoss()(feats(4, 3), feats(4, 2), 1.0),
        ValueError,
        "image_features and text_features",
    ),
    ("ClipLoss dist_impl", lambda: tilecl.ClipLoss(world_size=2, dist_impl="tree"), ValueError, "dist_impl"),
    ("NTXentLoss world_size", lambda: tilecl.NTXentLoss(world_size=0), ValueError, "world_size"),
    (
        "ClipLoss world_size > 1 without a process group",
        lambda: tilecl.ClipLoss(world_size=2)(feats(), feats(), 1.0),
        RuntimeError,
        "initialized default process group",
    ),
    (
        "InfoNCELoss temperature",
        lambda: tilecl.InfoNCELoss(temperature=-1.0),
        ValueError,
        "temperature must be",
    ),
    (
        "InfoNCELoss negatives D",
        lambda: tilecl.InfoNCELoss()(feats(), feats(), negatives=feats(3, 7)),
        ValueError,
        "b and negatives",
    ),
    (
        "NTXentLoss reduction",
        lambda: tilecl.NTXentLoss(reduction="mean "),
        ValueError,
        "reduction must be one of",
    ),
]


@pytest.mark.parametrize("call,error,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_before_compute(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_mismatched_device():
    meta = torch.empty(4, 3, device="meta")
    with pytest.raises(ValueError, match="same device"):
        tilecl.contrastive_loss(feats(), meta)
