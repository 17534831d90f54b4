"""``python -m experiments demo``: a two-tower model on the two halves of digits images, with ClipLoss.

Each 8x8 scikit-learn digit is cut into its left and right halves (32 pixels
each): the two "modalities". Two small towers embed the halves; tilecl.ClipLoss
pulls matching halves together. Cross-view retrieval R@1 (does the left half
find its own right half among all held-out right halves?) is printed before
and after training, then the peak memory of the loss against the naive
full-matrix loss at a large batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

import tilecl

from .memory import peak_extra_memory_cpu


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread for the block (or the decorated function).

    The experiments run tens of thousands of tiny steps: a second thread buys nothing there, and
    its OpenMP workers spin, waiting for work, on the cores the first one needs (10-13x slower on
    two shared cores). The memory probe's child processes keep torch's default.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class DigitViews:
    """Left/right halves of the digits, split into train and held-out test sets."""

    left_train: torch.Tensor
    right_train: torch.Tensor
    left_test: torch.Tensor
    right_test: torch.Tensor
    labels_train: np.ndarray
    labels_test: np.ndarray


def load_digit_views(seed: int = 0, test_fraction: float = 0.25) -> DigitViews:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # (1797, 8, 8), pixel values 0..16
    left = images[:, :, :4].reshape(len(images), -1)
    right = images[:, :, 4:].reshape(len(images), -1)
    split = train_test_split(
        left,
        right,
        digits.target,
        test_size=test_fraction,
        random_state=seed,
        stratify=digits.target,
    )
    lt, le, rt, re_, yt, ye = split
    as_tensor = torch.from_numpy
    return DigitViews(as_tensor(lt), as_tensor(rt), as_tensor(le), as_tensor(re_), yt, ye)


class Tower(nn.Module):
    """A small MLP mapping one view to the unit sphere."""

    def __init__(self, in_dim: int = 32, hidden: int = 128, out_dim: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.net(x), dim=-1)


class TwoTower(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.left = Tower()
        self.right = Tower()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's init


@torch.no_grad()
def linear_probe_accuracy(model: TwoTower, views: DigitViews, seed: int = 0) -> float:
    """Held-out accuracy of a logistic regression on the frozen embeddings ``[z_left, z_right]``."""
    from sklearn.linear_model import LogisticRegression

    def embed(left: torch.Tensor, right: torch.Tensor) -> np.ndarray:
        return torch.cat([model.left(left), model.right(right)], dim=1).numpy()

    probe = LogisticRegression(max_iter=2000, random_state=seed)
    probe.fit(embed(views.left_train, views.right_train), views.labels_train)
    return float(probe.score(embed(views.left_test, views.right_test), views.labels_test))


@torch.no_grad()
def retrieval_r1(
    model: TwoTower, left: torch.Tensor, right: torch.Tensor, labels: np.ndarray | None = None
) -> float:
    """Fraction of left halves whose nearest right half (cosine) is their own.

    With ``labels``: the fraction whose nearest right half shows the same digit.
    """
    nearest = (model.left(left) @ model.right(right).T).argmax(dim=1).numpy()
    if labels is None:
        return float(np.mean(nearest == np.arange(len(left))))
    return float(np.mean(labels[nearest] == labels))


def train(
    model: TwoTower,
    views: DigitViews,
    epochs: int,
    batch_size: int,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
    gamma_loss: Optional[tilecl.GammaContrastiveLoss] = None,
) -> list[float]:
    """CLIP training of both towers and the temperature; returns the per-epoch mean InfoNCE.

    With ``gamma_loss`` the towers are trained on its surrogate (gamma-EM,
    indexed by the training pair's position) instead of ``tilecl.ClipLoss``.
    """
    from tqdm.auto import tqdm

    loss_fn = tilecl.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    n = len(views.left_train)
    history = []
    name = "tilecl.ClipLoss" if gamma_loss is None else "tilecl.GammaContrastiveLoss"
    bar = tqdm(range(epochs), desc=f"training ({name})", disable=not progress, unit="epoch")
    for _ in bar:
        order = torch.randperm(n, generator=gen)
        losses = []
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            left, right = model.left(views.left_train[idx]), model.right(views.right_train[idx])
            scale = model.logit_scale.exp().clamp(max=100)
            if gamma_loss is None:
                loss = loss_fn(left, right, scale)
                infonce = loss.detach()
            else:
                loss = gamma_loss(left, right, idx, scale)
                infonce = gamma_loss.last_infonce
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(infonce.item())
        history.append(float(np.mean(losses)))
        bar.set_postfix(loss=f"{history[-1]:.3f}", temperature=f"{1 / model.logit_scale.exp().item():.3f}")
    return history


def _mib(x: float) -> str:
    return f"{x / 2**20:,.0f} MiB"


@one_thread()
def run_demo(epochs: int = 150, batch_size: int = 256, memory_n: int = 16384, memory_d: int = 128) -> dict:
    views = load_digit_views()
    model = TwoTower()
    print("tilecl demo: CLIP-style two-tower model on the two halves of scikit-learn's digits")
    print(
        f"  {len(views.left_train)} training pairs, {len(views.left_test)} held-out pairs, 32 pixels per half"
    )
    test = (views.left_test, views.right_test)
    before = retrieval_r1(model, *test)
    before_digit = retrieval_r1(model, *test, views.labels_test)
    chance = 1 / len(views.left_test)
    print(
        f"  held-out retrieval R@1 before training: exact pair {before:.1%} (chance {chance:.1%}), "
        f"same digit {before_digit:.1%} (chance ~10%)"
    )
    train(model, views, epochs=epochs, batch_size=batch_size)
    after = retrieval_r1(model, *test)
    after_digit = retrieval_r1(model, *test, views.labels_test)
    print(f"  held-out retrieval R@1 after training:  exact pair {after:.1%}, same digit {after_digit:.1%}")
    print("  (many half-digits are near-identical across images, so exact-pair R@1 stays modest)")

    print(f"\nPeak extra memory of one symmetric CLIP fwd+bwd at N={memory_n:,}, D={memory_d}, float32")
    print("  (each measured in a fresh process: peak RSS growth after the inputs are allocated)")
    print("  measuring tilecl.ClipLoss ...", flush=True)
    tiled = peak_extra_memory_cpu("tilecl", memory_n, memory_d)
    print("  measuring the naive full-matrix loss (about a minute: it forms N x N matrices) ...", flush=True)
    naive = peak_extra_memory_cpu("naive", memory_n, memory_d)
    matrix, grads = memory_n * memory_n * 4, 2 * memory_n * memory_d * 4
    print(
        f"  naive full-matrix loss: {_mib(naive['peak_extra_bytes']):>10}  (one N x N matrix: {_mib(matrix)})"
    )
    print(
        f"  tilecl.ClipLoss:        {_mib(tiled['peak_extra_bytes']):>10}  (gradients alone: {_mib(grads)})"
    )
    print(f"  same loss value: {tiled['loss']:.6f} vs {naive['loss']:.6f}")
    return {
        "r1_before": before,
        "r1_after": after,
        "digit_r1_before": before_digit,
        "digit_r1_after": after_digit,
        "memory": {"tilecl": tiled, "naive": naive},
    }
