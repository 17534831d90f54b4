"""An open_clip-style two-tower step with a giant batch: tilecl.GradCache instead of ``accum_freq``.

open_clip's ``--accum-freq k`` embeds the batch in ``k`` chunks without
gradients, then re-runs each chunk with gradients against the other chunks'
cached features, calling ``backward`` ``k`` times. :class:`tilecl.GradCache`
does the same job inside one ``loss.backward()``: the towers run mini-batch
by mini-batch without activations, the loss (``tilecl.ClipLoss`` or
``tilecl.SigLipLoss``, which never form the ``N x N`` logits) sees the whole
batch, and its backward re-embeds each mini-batch. The parameter update is
the plain full-batch step's (no dropout here; with dropout, the plain step
over the same mini-batches')::

    python examples/clip_gradcache.py --loss siglip --batch 512 --mini-batch 64
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import tilecl


class ImageTower(nn.Module):
    """A tiny image encoder: flattened pixels through an MLP, L2-normalized."""

    def __init__(self, pixels: int = 3 * 8 * 8, dim: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(pixels, 64), nn.GELU(), nn.Linear(64, dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(images), dim=-1)


class TextTower(nn.Module):
    """A tiny text encoder: masked mean of token embeddings, a projection, L2-normalized."""

    def __init__(self, vocab: int = 100, dim: int = 32) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, 48)
        self.proj = nn.Linear(48, dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(self.proj.weight.dtype)
        pooled = (self.embedding(input_ids) * mask).sum(1) / mask.sum(1).clamp_min(1)
        return F.normalize(self.proj(pooled), dim=-1)


class TwoTower(nn.Module):
    """open_clip's layout: two towers behind ``encode_image`` / ``encode_text``, a learnable log-scale
    and (for SigLIP) a bias. GradCache takes the two methods as they are (no wrapper modules)."""

    def __init__(self, loss: str) -> None:
        super().__init__()
        self.visual = ImageTower()
        self.text = TextTower()
        siglip = loss == "siglip"
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0 if siglip else 1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if siglip else None

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text(input_ids, attention_mask)


def make_loss(name: str) -> nn.Module:
    return tilecl.SigLipLoss() if name == "siglip" else tilecl.ClipLoss()


def contrastive(model: TwoTower, loss_fn: nn.Module, za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
    return loss_fn(za, zb, model.logit_scale.exp(), model.logit_bias)


def cached_step(
    model: TwoTower,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    texts: dict[str, torch.Tensor],
    mini_batch_size: int,
) -> float:
    """One optimizer step over the whole batch, the towers' activations one mini-batch at a time."""
    optimizer.zero_grad(set_to_none=True)
    cache = tilecl.GradCache([model.encode_image, model.encode_text], mini_batch_size=mini_batch_size)
    image_features, text_features = cache.embed(images, texts)
    loss = contrastive(model, loss_fn, image_features, text_features)
    loss.backward()  # re-embeds each mini-batch: the towers' .grad are the full batch's
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))  # open_clip's clamp after the step
    return float(loss.detach())


def plain_step(
    model: TwoTower,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    texts: dict[str, torch.Tensor],
) -> float:
    """The same step with the whole batch's activations kept (what the cached step must equal)."""
    optimizer.zero_grad(set_to_none=True)
    loss = contrastive(model, loss_fn, model.encode_image(images), model.encode_text(**texts))
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return float(loss.detach())


def accum_freq_gradients(
    model: TwoTower, loss_fn: nn.Module, images: torch.Tensor, texts: dict[str, torch.Tensor], accum_freq: int
) -> None:
    """open_clip's ``--accum-freq`` loop in miniature (``open_clip_train/train.py``): the chunks'
    features cached without gradients, then per chunk its features again with gradients, the whole
    batch's loss against the other chunks' cached features, and one ``backward`` each. The towers'
    gradients are the plain step's; the scale (and bias), live in every chunk's loss, gets the
    gradient ``accum_freq`` times."""
    chunks = [
        (images[rows], {k: v[rows] for k, v in texts.items()})
        for rows in torch.arange(images.shape[0]).chunk(accum_freq)
    ]
    with torch.no_grad():
        cached = [(model.encode_image(x), model.encode_text(**t)) for x, t in chunks]
    for j, (x, t) in enumerate(chunks):
        live = (model.encode_image(x), model.encode_text(**t))
        za, zb = (torch.cat([c[side] for c in cached[:j]] + [live[side]] + [c[side] for c in cached[j + 1 :]])
                  for side in (0, 1))  # fmt: skip
        contrastive(model, loss_fn, za, zb).backward()


def scale_gradient_ratios(loss_name: str = "clip", n: int = 64, accum_freq: int = 8) -> dict[str, float]:
    """The ``logit_scale`` gradient of a GradCache step and of an ``accum_freq`` step, each over the
    plain full-batch step's (float64)."""
    torch.manual_seed(0)
    model = TwoTower(loss_name).double()
    loss_fn = make_loss(loss_name)
    images, texts = batch(n, seed=1)
    images = images.double()

    def scale_gradient(step: Any) -> float:
        model.zero_grad(set_to_none=True)
        step()
        assert model.logit_scale.grad is not None
        return float(model.logit_scale.grad)

    def plain() -> None:
        contrastive(model, loss_fn, model.encode_image(images), model.encode_text(**texts)).backward()

    def cached() -> None:
        cache = tilecl.GradCache([model.encode_image, model.encode_text], mini_batch_size=n // accum_freq)
        contrastive(model, loss_fn, *cache.embed(images, texts)).backward()

    want = scale_gradient(plain)
    return {
        "gradcache": scale_gradient(cached) / want,
        "accum_freq": scale_gradient(lambda: accum_freq_gradients(model, loss_fn, images, texts, accum_freq))
        / want,
    }


def batch(
    n: int, seed: int, vocab: int = 100, width: int = 12
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Random images ``(n, 3, 8, 8)`` and right-padded token ids with their mask."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 8, 8, generator=g)
    lengths = torch.randint(2, width + 1, (n,), generator=g)
    mask = (torch.arange(width) < lengths[:, None]).long()
    ids = torch.randint(1, vocab, (n, width), generator=g) * mask
    return images, {"input_ids": ids, "attention_mask": mask}


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--loss", choices=["clip", "siglip"], default="clip")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--mini-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--compare-accum-freq", type=int, metavar="K", default=0,
        help="print the logit_scale gradient of GradCache and of open_clip's --accum-freq K loop, each "
        "over the plain full-batch step's, and exit",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.compare_accum_freq:
        ratios = scale_gradient_ratios(args.loss, args.batch, args.compare_accum_freq)
        print(f"logit_scale gradient / the plain step's: GradCache {ratios['gradcache']:.12f}, "
              f"accum_freq={args.compare_accum_freq} {ratios['accum_freq']:.12f}")  # fmt: skip
        return []
    torch.manual_seed(0)
    model = TwoTower(args.loss)
    loss_fn = make_loss(args.loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(args.steps):
        images, texts = batch(args.batch, seed=step)
        losses.append(cached_step(model, loss_fn, optimizer, images, texts, args.mini_batch))
        print(f"step {step}: loss {losses[-1]:.4f}")
    return losses


if __name__ == "__main__":
    main()
