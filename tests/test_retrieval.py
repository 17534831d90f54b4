"""The real-model experiment (python -m experiments retrieval): its corpus, its metrics, and a --quick run
of the whole pipeline on the packaged all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import math

import pytest
import torch

from experiments.__main__ import main
from experiments.docstrings import build_corpus, first_sentence, held_out
from experiments.retrieval import _metrics, freeze_below, load_model


@pytest.fixture(scope="module")
def corpus():
    return build_corpus()


def test_first_sentence_ends_at_a_full_stop_before_a_capital():
    assert first_sentence("Return the items, e.g. keys and values. More text here.") == (
        "Return the items, e.g. keys and values."
    )
    assert first_sentence("Open a file\n    for reading, return its handle.\n\nDetails.") == (
        "Open a file for reading, return its handle."
    )
    assert first_sentence("Too short.") is None
    assert first_sentence(" ".join(["word"] * 60)) is None


def test_the_corpus_is_split_by_module_and_numbers_equal_sentences_alike(corpus):
    assert len(corpus.train) > 1000 and len(corpus.held_out) > 300
    train_modules = {pair.module for pair in corpus.train}
    held_modules = {pair.module for pair in corpus.held_out}
    assert not train_modules & held_modules
    assert all(held_out(module) for module in held_modules)
    pairs = corpus.train + corpus.held_out
    assert len({pair.name for pair in pairs}) == len(pairs)
    group_of: dict[str, int] = {}
    for pair in pairs:
        assert group_of.setdefault(pair.doc, pair.doc_group) == pair.doc_group
    assert len(set(group_of.values())) == len(group_of)
    assert 0 < corpus.duplicate_docs < len(pairs) // 4


def test_metrics_count_an_equal_sentence_as_right():
    # query 0's right candidates are 0 and 2 (one sentence); candidate 1 scores higher than both
    scores = torch.tensor([[0.5, 0.9, 0.7], [0.1, 0.8, 0.9], [0.3, 0.2, 0.1]])
    groups = torch.tensor([0, 1, 0])
    metrics = _metrics(scores, groups, groups)
    # ranks: query 0 → 2 (0.7 after 0.9), query 1 → 2, query 2 → 1 (0.3 is its group's best)
    assert metrics.r1 == pytest.approx(1 / 3)
    assert metrics.r10 == 1.0
    assert metrics.mrr == pytest.approx((0.5 + 0.5 + 1.0) / 3)


def test_only_the_top_layers_train():
    model = load_model(20)
    params = freeze_below(model, 2)
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    assert params and all(".layer.4." in name or ".layer.5." in name for name in names), sorted(names)
    assert any(".layer.4." in name for name in names) and any(".layer.5." in name for name in names)


@pytest.mark.slow
def test_quick_run_fine_tunes_and_evaluates_every_arm(tmp_path):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    main(["retrieval", "--quick", "--json", str(out_json), "--plot", str(out_png)])
    result = json.loads(out_json.read_text())
    held = result["corpus"]["held_out_pairs"]
    zero = result["zero_shot"]["n2d"]
    # a pretrained sentence encoder finds the right sentence far above chance (10 / held-out pairs)
    assert zero["r10"] > 5 * (10 / held) and zero["r1"] > 0.15
    best = result["best_main_arm"]
    assert set(result["summary"]) == {"infonce@16", "infonce@48", "gamma@16", f"{best}+gc", f"{best}+fn-mask"}
    for run in result["runs"]:
        assert all(math.isfinite(loss) for loss in run["losses"]), run["arm"]
        for direction in ("n2d", "d2n"):
            metrics = run[direction]
            assert 0.0 <= metrics["r1"] <= metrics["r10"] <= 1.0
            assert metrics["r1"] <= metrics["mrr"] <= 1.0
        # fine-tuning for a few steps keeps the pretrained model's retrieval (a broken step would not)
        assert run["n2d"]["r10"] > zero["r10"] - 0.1, run["arm"]
    steps = {run["arm"]: run["steps"] for run in result["runs"]}
    assert steps["infonce@16"] == math.ceil(result["corpus"]["train_pairs"] / 16)
    assert out_png.stat().st_size > 0
