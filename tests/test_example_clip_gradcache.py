"""examples/clip_gradcache.py: the GradCache step is the plain full-batch step, for CLIP and SigLIP."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parent.parent / "examples" / "clip_gradcache.py"
spec = importlib.util.spec_from_file_location("clip_gradcache", PATH)
assert spec is not None and spec.loader is not None
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_the_cached_step_is_the_plain_full_batch_step(loss_name):
    torch.manual_seed(0)
    model = example.TwoTower(loss_name).double()
    twin = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    loss_fn = example.make_loss(loss_name)
    images, texts = example.batch(48, seed=1)
    images = images.double()
    cached = example.cached_step(
        model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.5), images, texts, mini_batch_size=10
    )
    plain = example.plain_step(twin, loss_fn, torch.optim.SGD(twin.parameters(), lr=0.5), images, texts)
    assert cached == pytest.approx(plain, rel=1e-12)
    for (name, p), q, p0 in zip(model.named_parameters(), twin.parameters(), start):
        update, want = p.detach() - p0, q.detach() - p0
        assert float(want.norm()) > 0, f"{name} did not move"
        assert float((update - want).norm() / want.norm()) <= 1e-10, name


def test_the_example_runs():
    losses = example.main(["--loss", "siglip", "--batch", "64", "--mini-batch", "16", "--steps", "2"])
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_the_scale_gradient_is_the_plain_steps_where_accum_freqs_is_k_times(loss_name):
    """open_clip's accum_freq loop (a copy in miniature) backpropagates the whole batch's loss once per
    chunk, each time through the live logit_scale: its gradient comes out accum_freq times the plain
    step's. GradCache's is the plain step's."""
    ratios = example.scale_gradient_ratios(loss_name, n=48, accum_freq=8)
    assert ratios["gradcache"] == pytest.approx(1.0, rel=1e-12)
    assert ratios["accum_freq"] == pytest.approx(8.0, rel=1e-12)
