"""What a newcomer runs into first: the log-scale passed for the scale, an empty memory queue."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import tilecl


def _pair(n: int = 6, d: int = 4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(
        n, d, generator=g, dtype=torch.float64
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda a, b, s: tilecl.ClipLoss()(a, b, s),
        lambda a, b, s: tilecl.SigLipLoss()(a, b, s, torch.tensor(-10.0, dtype=torch.float64)),
        lambda a, b, s: tilecl.contrastive_loss(a, b, s),
    ],
    ids=["ClipLoss", "SigLipLoss", "contrastive_loss"],
)
def test_open_clips_log_scale_parameter_warns_naming_the_exp(call):
    a, b = _pair()
    log_scale = nn.Parameter(torch.tensor(2.66, dtype=torch.float64))  # open_clip's log(1/0.07)
    with pytest.warns(
        UserWarning, match=r"logit_scale .* value 2\.66.*model\.logit_scale\.exp\(\)"
    ) as caught:
        call(a, b, log_scale)
    assert caught[0].filename == __file__  # points at the user's call, not into tilecl or torch
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(a, b, log_scale.exp())  # the exponentiated scale: no warning
        call(a, b, 14.3)
        call(a, b, nn.Parameter(torch.tensor(14.3, dtype=torch.float64)))  # a learned scale itself


def test_an_empty_batch_of_negatives_is_no_negatives():
    a, b = _pair()
    queue = tilecl.MemoryQueue(16, 4, dtype=torch.float64)
    memory = queue.entries()  # the first step: nothing in the queue yet
    assert memory.embeddings.shape == (0, 4)
    with_empty = tilecl.contrastive_loss(a, b, 3.0, negatives=memory.embeddings)
    assert torch.equal(with_empty, tilecl.contrastive_loss(a, b, 3.0))
    module = tilecl.InfoNCELoss(temperature=0.5)(a, b, negatives=memory.embeddings)
    assert torch.equal(module, tilecl.InfoNCELoss(temperature=0.5)(a, b))
    with pytest.raises(ValueError, match="b and negatives must have the same feature dimension"):
        tilecl.contrastive_loss(a, b, 3.0, negatives=torch.zeros(0, 5, dtype=torch.float64))
