"""The MiniLM GradCache benchmark, run end to end on a tiny random BERT (no download).

``python -m bench.gradcache_minilm`` measures the real model outside
``make test``; here its every path runs: a fresh worker process per
(provider, N), the rotation of providers, the results file and the merge
of a later invocation into it. Without dropout the three providers train
the same model on the same batch, so their losses must agree.
"""

from __future__ import annotations

import json
import math

import pytest

from bench import gradcache_minilm

pytestmark = pytest.mark.slow


def test_every_provider_runs_and_computes_the_same_loss(tmp_path):
    out = tmp_path / "gradcache_tiny.json"
    gradcache_minilm.main(["--model", "tiny", "--sizes", "24", "40", "--mini-batch", "16", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["n"], r["provider"]) for r in rows] == [
        (n, p) for n in (24, 40) for p in gradcache_minilm.PROVIDERS
    ]
    assert all("error" not in r for r in rows), rows
    for n in (24, 40):
        losses = [r["loss"] for r in rows if r["n"] == n]
        assert all(math.isclose(loss, losses[0], rel_tol=1e-5) for loss in losses), losses
    assert all(r["seconds"] > 0 and r["peak_rss_growth_mib"] >= 0 for r in rows)

    # a later invocation replaces its own (provider, N) and keeps the others
    gradcache_minilm.main(
        ["--model", "tiny", "--sizes", "40", "--providers", "tilecl", "--mini-batch", "16", "--out", str(out)]
    )
    again = json.loads(out.read_text())["rows"]
    assert [(r["n"], r["provider"]) for r in again] == [(r["n"], r["provider"]) for r in rows]
    assert [r for r in again if r["n"] == 24] == [r for r in rows if r["n"] == 24]
