"""The stand-ins the training recipes share: a paired data set and a two-tower model small enough
for a CPU test. Replace them with your data set and your towers; the recipes' wiring stays.

The pairs are learnable: ``y = tanh(x W) + noise`` for a fixed random ``W``, so the contrastive loss
falls within a few dozen steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

X_DIM, Y_DIM, EMBED_DIM = 16, 12, 16


def paired_data(n: int = 512, seed: int = 0, dtype: torch.dtype = torch.float32) -> TensorDataset:
    """``n`` (x, y) pairs: ``x ~ N(0, I)`` (an "image"), ``y`` its noisy nonlinear "caption"."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, X_DIM, generator=gen, dtype=torch.float64)
    w = torch.randn(X_DIM, Y_DIM, generator=gen, dtype=torch.float64) / math.sqrt(X_DIM)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(n, Y_DIM, generator=gen, dtype=torch.float64)
    return TensorDataset(x.to(dtype), y.to(dtype))


class TwoTower(nn.Module):
    """Image and text towers, L2-normalized outputs, and open_clip's learnable scale and bias.

    ``logit_scale`` and ``logit_bias`` are ``[1]``-shaped parameters, as in open_clip (FSDP2
    shards them as such); like open_clip's model, ``forward`` returns them (the scale
    exponentiated), so a sharded model hands the loss full values.
    """

    def __init__(self, init_scale: float = 10.0, init_bias: float = -10.0) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Linear(X_DIM, 32), nn.GELU(), nn.Linear(32, EMBED_DIM))
        self.text = nn.Linear(Y_DIM, EMBED_DIM)
        self.logit_scale = nn.Parameter(torch.full([1], math.log(init_scale)))
        self.logit_bias = nn.Parameter(torch.full([1], init_bias))

    def forward(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(N, X_DIM)``, ``(N, Y_DIM)`` → image and text features ``(N, EMBED_DIM)``, scale, bias."""
        image, text = F.normalize(self.image(x), dim=-1), F.normalize(self.text(y), dim=-1)
        return image, text, self.logit_scale.exp(), self.logit_bias


def recipe_arguments(doc: str) -> argparse.ArgumentParser:
    """The options every two-tower recipe shares; a recipe adds its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", choices=("clip", "siglip"), default="clip")
    parser.add_argument("--batch", type=int, default=32, help="pairs per rank and step")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--cpu", action="store_true", help="CPU processes (gloo) even with GPUs")
    parser.add_argument("--float64", action="store_true", help="the tests' exact comparisons")
    parser.add_argument("--out", help="write losses.json and first_grads.pt here (rank 0)")
    return parser


def save_run(out: Optional[str], losses: list[float], first_grads: dict[str, torch.Tensor]) -> None:
    """What the recipes' tests compare: the losses of every step and the first step's gradients
    (after the framework's reduction), written by rank 0 only."""
    if out is None or int(os.environ.get("RANK", "0")) != 0:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "losses.json"), "w") as f:
        json.dump(losses, f)
    torch.save({k: g.detach().clone() for k, g in first_grads.items()}, os.path.join(out, "first_grads.pt"))


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient by name (a sharded DTensor's full tensor)."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad
            out[name] = g.full_tensor() if hasattr(g, "full_tensor") else g.clone()
    return out


def end_process_group() -> None:
    """Tear the default process group down on every rank together, once the trainer is gone.

    Exiting with the group alive, or destroying it while a rank is still in a collective or a
    DDP reducer still holds it, aborts a process now and then ("terminate called without an
    active exception") on a loaded machine. Call it after dropping the references to the
    wrapped model.
    """
    gc.collect()  # DDP reducers in reference cycles go before the group
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
