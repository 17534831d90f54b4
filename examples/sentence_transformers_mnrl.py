"""sentence-transformers' ``SentenceTransformerTrainer`` with tilecl's MultipleNegativesRankingLoss.

::

    torchrun --standalone --nproc-per-node 2 examples/sentence_transformers_mnrl.py
    python examples/sentence_transformers_mnrl.py --model path/to/a/sentence-transformer

``gather_across_devices=True`` makes each rank's anchors score against every
rank's candidates, tile by tile (sentence-transformers' own loss forms each
rank's ``N_local x N_global`` scores); each rank's embeddings receive
``world_size ×`` the global loss's gradient, so the gradient DDP averages is
the single-process gradient of the loss over the global batch. The default
model is a tiny randomly initialized BERT with a word-level vocabulary, built
on the spot (nothing is downloaded); the pairs are synthetic ("a small red
circle, number 7" ↔ "7: circle, red, small").
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
from typing import Any

import torch

from tilecl.integrations.sentence_transformers import MultipleNegativesRankingLoss

COLOURS = ("red", "blue", "green", "yellow", "black", "white")
SHAPES = ("circle", "square", "triangle", "star", "line")
SIZES = ("small", "big", "tiny")


def pairs(n: int = 512, seed: int = 0) -> dict[str, list[str]]:
    """``n`` distinct (anchor, positive) descriptions of one object, worded two ways."""
    objects = [(s, c, h, k) for s in SIZES for c in COLOURS for h in SHAPES for k in range(12)]
    random.Random(seed).shuffle(objects)
    chosen = objects[:n]
    return {
        "anchor": [f"a {s} {c} {h} , number {k}" for s, c, h, k in chosen],
        "positive": [f"{k} : {h} , {c} , {s}" for s, c, h, k in chosen],
    }


def tiny_model(directory: str) -> Any:
    """A randomly initialized one-layer BERT over the pairs' words, mean-pooled; no download."""
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "number", ",", ":"]
    words += [*COLOURS, *SHAPES, *SIZES, *(str(k) for k in range(12))]
    tokenizer = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    config = transformers.BertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,  # dropout off: one process and several draw the same step
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return SentenceTransformer(modules=[Transformer(directory), Pooling(32)], device="cpu")


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help='"tiny" or a sentence-transformers model path')
    parser.add_argument("--batch", type=int, default=32, help="pairs per rank and step")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--cpu", action="store_true", help="CPU processes (gloo) even with GPUs")
    parser.add_argument("--float64", action="store_true", help="the tests' exact comparisons")
    parser.add_argument("--out", help="write losses.json and first_grads.pt here (rank 0)")
    args = parser.parse_args(argv)

    import sys

    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from transformers import TrainerCallback

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the toy helpers beside this file
    from toy import end_process_group, gradients, save_run

    class Record(TrainerCallback):
        """The logged loss of every step and the gradients of the first (DDP has averaged them)."""

        def __init__(self) -> None:
            self.losses: list[float] = []
            self.first_grads: dict[str, torch.Tensor] = {}

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not self.first_grads:
                model = kwargs["model"]
                self.first_grads = gradients(getattr(model, "module", model))

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    with tempfile.TemporaryDirectory() as scratch:
        device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
        model = tiny_model(scratch) if args.model == "tiny" else SentenceTransformer(args.model)
        model.to(device)
        if args.float64:
            model.to(torch.float64)
        record = Record()
        trainer = SentenceTransformerTrainer(
            model=model,
            args=SentenceTransformerTrainingArguments(
                output_dir=os.path.join(scratch, "run"),
                per_device_train_batch_size=args.batch,
                max_steps=args.steps,
                learning_rate=args.lr,
                warmup_steps=0,
                max_grad_norm=0.0,  # no clipping: the recorded gradients are the loss's
                logging_steps=1,
                save_strategy="no",
                report_to="none",
                use_cpu=args.cpu or not torch.cuda.is_available(),
                seed=0,
                disable_tqdm=True,
            ),
            train_dataset=Dataset.from_dict(pairs()),
            loss=MultipleNegativesRankingLoss(model, gather_across_devices=True),
            callbacks=[record],
        )
        trainer.train()
        del trainer  # with its DDP wrapper, before the group goes
    if int(os.environ.get("RANK", "0")) == 0:
        losses = record.losses
        print(f"MNRL: loss {losses[0]:.4f} → {losses[-1]:.4f} over {len(losses)} steps")
    save_run(args.out, record.losses, record.first_grads)
    end_process_group()
    return record.losses


if __name__ == "__main__":
    main()
