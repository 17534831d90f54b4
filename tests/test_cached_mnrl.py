"""The cached MNRL drop-in against sentence-transformers' own, on a tiny random BERT (no download).

``tilecl.integrations.sentence_transformers.CachedMultipleNegativesRankingLoss``
must give the loss and parameter gradients of
``sentence_transformers``' ``CachedMultipleNegativesRankingLoss`` (float32,
mini-batches smaller than the batch, with and without hard negatives, by
row count and by token budget), and with dropout on the gradients of the
plain autograd step that embeds the same mini-batches in the same order.
"""

from __future__ import annotations

import pytest
import sentence_transformers.sentence_transformer.losses as st_losses
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.losses.gradcache import _create_minibatch, _minibatch_ranges
from torch import nn

from bench.gradcache_minilm import tiny_sentence_transformer
from tilecl.integrations import sentence_transformers as tilecl_st

VOCAB, HIDDEN, N = 64, 16, 10


def tiny_model(dropout: float = 0.0, seed: int = 0) -> SentenceTransformer:
    torch.manual_seed(seed)
    model = tiny_sentence_transformer(VOCAB, HIDDEN, dropout)
    model.train()
    return model


def column(seed: int, n: int = N, lengths: tuple[int, int] = (2, 10)) -> dict:
    """A tokenized column: right-padded token ids and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(*lengths, (n,), generator=g)
    width = int(counts.max())
    mask = (torch.arange(width) < counts[:, None]).long()
    ids = torch.randint(1, VOCAB, (n, width), generator=g) * mask
    return {"input_ids": ids, "attention_mask": mask}


def step(loss: nn.Module, model: nn.Module, features: list, seed: int = 5) -> tuple:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    value = loss(features, None)
    value.backward()
    return value.detach(), {
        name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None
    }


def assert_close(ours: tuple, theirs: tuple, rel: float) -> None:
    loss, grads = ours
    want_loss, want_grads = theirs
    assert abs(float(loss) - float(want_loss)) <= rel * abs(float(want_loss)), (loss, want_loss)
    assert grads.keys() == want_grads.keys() and grads
    # the attention key bias's gradient is zero in exact arithmetic (the softmax ignores a per-query shift):
    # each parameter's error is relative to its gradient, floored at a thousandth of the whole gradient's
    floor = 1e-3 * float(torch.cat([w.flatten() for w in want_grads.values()]).norm())
    for name, g in grads.items():
        w = want_grads[name]
        err = float((g - w).norm()) / max(float(w.norm()), floor)
        assert err <= rel, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("negatives", [0, 1], ids=["pairs", "triplets"])
@pytest.mark.parametrize(
    "split", [{"mini_batch_size": 4}, {"mini_batch_num_tokens": 18}], ids=["rows", "tokens"]
)
def test_matches_sentence_transformers_cached_mnrl(negatives, split):
    model = tiny_model(dropout=0.0)
    # anchors longer than the token budget: each alone in a mini-batch, as sentence-transformers does
    features = [column(seed, lengths=(2, 23 if seed == 1 else 10)) for seed in range(1, 3 + negatives)]
    if "mini_batch_num_tokens" in split:
        assert int(features[0]["attention_mask"].sum(1).max()) > split["mini_batch_num_tokens"]
    calls: list = []
    model.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0]["input_ids"].shape)))
    ours = tilecl_st.CachedMultipleNegativesRankingLoss(model, backend="torch", **split)
    theirs = st_losses.CachedMultipleNegativesRankingLoss(model, **split)
    got = step(ours, model, features)
    ours_calls, calls[:] = list(calls), []
    want = step(theirs, model, features)
    # the same mini-batches (rows and trimmed widths), each embedded twice
    assert ours_calls == calls and len(calls) > 2 * (2 + negatives)
    assert_close(got, want, rel=1e-5)


def test_the_gte_joint_softmax_with_hardness_matches_sentence_transformers_cached_mnrl():
    """The full MNRL (all four directions, one joint softmax, hardness-weighted negatives) through the
    cache, against sentence-transformers' cached loss with the same options."""
    model = tiny_model(dropout=0.0)
    features = [column(seed) for seed in (1, 2, 3)]
    options = dict(
        mini_batch_size=4,
        directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
        partition_mode="joint",
        hardness_mode="in_batch_negatives",
        hardness_strength=2.0,
    )
    ours = tilecl_st.CachedMultipleNegativesRankingLoss(model, backend="torch", **options)
    theirs = st_losses.CachedMultipleNegativesRankingLoss(model, **options)
    assert_close(step(ours, model, features), step(theirs, model, features), rel=1e-5)


def test_with_dropout_the_gradients_are_the_plain_steps():
    """GradCache's exactness: the plain step embeds the same mini-batches in the same order, with autograd."""
    model = tiny_model(dropout=0.2)
    features = [column(seed) for seed in (1, 2, 3)]
    cached = tilecl_st.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4, backend="torch")
    plain = tilecl_st.MultipleNegativesRankingLoss(model, backend="torch")

    class PlainStep(nn.Module):
        def forward(self, features, labels):
            embeddings = []
            for f in features:
                ranges = _minibatch_ranges(f, 4)
                embeddings.append(
                    torch.cat([model(_create_minibatch(f, b, e))["sentence_embedding"] for b, e in ranges])
                )
            return plain.compute_loss_from_embeddings(embeddings, labels)

    ours = step(cached, model, features)
    want = step(PlainStep(), model, features)
    assert_close(ours, want, rel=1e-6)
    # a different dropout draw gives a different step: the dropout is live
    other = step(cached, model, features, seed=6)
    assert abs(float(other[0]) - float(ours[0])) > 1e-4
    # and sentence-transformers' cached loss draws the same masks
    theirs = st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4)
    assert_close(ours, step(theirs, model, features), rel=1e-5)


@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
def test_options_of_the_uncached_adapter_carry_over(symmetric):
    """Masking and the symmetric loss: the cached value and gradients are the uncached adapter's."""
    model = tiny_model(dropout=0.0)
    features = [column(seed) for seed in (1, 2, 3)]
    features[0]["input_ids"][4] = features[0]["input_ids"][7]  # a duplicate anchor: its pairs are masked
    features[0]["attention_mask"][4] = features[0]["attention_mask"][7]
    options = dict(symmetric=symmetric, mask_false_negatives="text", backend="torch")
    cached = tilecl_st.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3, **options)
    plain = tilecl_st.MultipleNegativesRankingLoss(model, **options)
    got = step(cached, model, features)
    assert_close(got, step(plain, model, features), rel=1e-5)
    unmasked = tilecl_st.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3, symmetric=symmetric)
    assert abs(float(step(unmasked, model, features)[0]) - float(got[0])) > 1e-4
    with torch.no_grad():  # evaluation: a plain value, nothing kept for a backward
        value = cached(features, None)
    assert not value.requires_grad
    torch.testing.assert_close(value, got[0], rtol=1e-5, atol=0)


def test_constructor_mirrors_sentence_transformers_and_refuses_bad_sizes():
    import inspect

    ours = inspect.signature(tilecl_st.CachedMultipleNegativesRankingLoss).parameters
    theirs = inspect.signature(st_losses.CachedMultipleNegativesRankingLoss).parameters
    positional = [n for n, p in ours.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == list(theirs)
    for name in theirs:
        if name != "model":
            assert ours[name].default == theirs[name].default, name
    model = tiny_model()
    loss = tilecl_st.CachedMultipleNegativesRankingLoss(model, mini_batch_size=8, mini_batch_num_tokens=100)
    assert loss.get_config_dict()["mini_batch_size"] == 8
    assert loss.get_config_dict()["mini_batch_num_tokens"] == 100
    with pytest.raises(ValueError, match="mini_batch_size"):
        tilecl_st.CachedMultipleNegativesRankingLoss(model, mini_batch_size=0)
    with pytest.raises(ValueError, match="mini_batch_num_tokens"):
        tilecl_st.CachedMultipleNegativesRankingLoss(model, mini_batch_num_tokens=0)
    with pytest.raises(ValueError, match="at least 2 inputs"):
        tilecl_st.CachedMultipleNegativesRankingLoss(model)([column(1)], None)
    no_mask = {"input_ids": column(1)["input_ids"]}
    with pytest.raises(ValueError, match="token counts"):
        tilecl_st.CachedMultipleNegativesRankingLoss(model, mini_batch_num_tokens=10)(
            [no_mask, no_mask], None
        )


def test_the_progress_bar_covers_the_re_embedding_too(capsys):
    """show_progress_bar: sentence-transformers' bar over the first pass, and one over the backward's
    re-embedding, which is the longer wait."""
    model = tiny_model()
    loss = tilecl_st.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4, show_progress_bar=True)
    step(loss, model, [column(1), column(2)])
    err = capsys.readouterr().err
    assert "GradCache: embed" in err and "GradCache: re-embed (backward)" in err
