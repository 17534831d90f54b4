"""The adapters against the real libraries: pytorch-metric-learning's and sentence-transformers' losses.

Random embeddings, no model download: values and gradients equal the real
``pytorch_metric_learning.losses.SupConLoss`` / ``NTXentLoss`` and
``sentence_transformers`` ``MultipleNegativesRankingLoss`` (and its symmetric
form) in float64, and the masked forms equal a full-matrix masked cross
entropy. Both packages come with the ``dev`` extra.
"""

from __future__ import annotations

import pytest

# the dev extra installs both libraries: a missing one is a failure, not a skip
import pytorch_metric_learning.distances as pml_distances
import pytorch_metric_learning.losses as pml_losses
import pytorch_metric_learning.reducers as pml_reducers
import sentence_transformers.sentence_transformer.losses as st_losses
import sentence_transformers.util as st_util
import torch
import torch.nn.functional as F
from torch import nn

import tilecl
from tilecl.integrations import pytorch_metric_learning as tilecl_pml
from tilecl.integrations import sentence_transformers as tilecl_st
from utils import DEVICE, assert_all_close_by_rule, assert_rel, matrix

BACKENDS = ["torch", "triton"]


def loss_and_grads(fn, leaves, *args):
    loss = fn(*args)
    return (loss, *torch.autograd.grad(loss, leaves))


def assert_same(ours, theirs, rel=1e-12):
    for i, (x, y) in enumerate(zip(ours, theirs)):
        assert_rel(x, y, rel, f"output {i}")


LABELINGS = {
    "two-views": lambda n, g: torch.arange(n // 2).repeat(2),
    "classes": lambda n, g: torch.randint(0, 7, (n,), generator=g),
    "with-singletons": lambda n, g: torch.cat(
        [torch.randint(0, 4, (n - 3,), generator=g), torch.tensor([10, 11, 12])]
    ),
}


@pytest.mark.parametrize("labeling", LABELINGS)
@pytest.mark.parametrize("name", ["SupConLoss", "NTXentLoss"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_pml_losses_match_the_real_ones(name, labeling, backend):
    g = torch.Generator().manual_seed(len(labeling) + len(name))
    dtype = torch.float64 if backend == "torch" else torch.float32
    x = torch.randn(36, 12, generator=g, dtype=dtype).to(DEVICE).requires_grad_()
    labels = LABELINGS[labeling](36, g).to(DEVICE)
    ours = getattr(tilecl_pml, name)(temperature=0.2, backend=backend)
    theirs = getattr(pml_losses, name)(temperature=0.2)
    rel = 1e-12 if dtype == torch.float64 else 2e-5
    assert_same(loss_and_grads(ours, (x,), x, labels), loss_and_grads(theirs, (x,), x, labels), rel)


def test_pml_supcon_two_tower_matches_ref_emb():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 8, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    ref = torch.randn(28, 8, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    labels = torch.randint(0, 5, (20,), generator=g).to(DEVICE)
    ref_labels = torch.randint(0, 5, (28,), generator=g).to(DEVICE)
    ours = tilecl_pml.SupConLoss(0.1, backend="torch")
    theirs = pml_losses.SupConLoss(0.1)
    assert_same(
        loss_and_grads(lambda *a: ours(*a[:2], None, *a[2:]), (x, ref), x, labels, ref, ref_labels),
        loss_and_grads(lambda *a: theirs(*a[:2], None, *a[2:]), (x, ref), x, labels, ref, ref_labels),
    )


def test_pml_no_positive_pair_is_a_zero_loss_in_the_graph():
    x = torch.randn(5, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    labels = torch.arange(5, device=DEVICE)
    for name in ("SupConLoss", "NTXentLoss"):
        ours = getattr(tilecl_pml, name)(backend="torch")(x, labels)
        assert float(ours.detach()) == float(getattr(pml_losses, name)()(x, labels).detach()) == 0.0
        (grad,) = torch.autograd.grad(ours, x)
        assert float(grad.abs().max()) == 0.0


@pytest.mark.parametrize("memory", [False, True], ids=["loss", "cross-batch-memory"])
def test_pml_supcon_averages_the_nonzero_anchors_as_pml(memory):
    """PML's AvgNonZeroReducer leaves out anchors whose loss is exactly 0 (here the well-separated
    class's anchors at τ = 0.01 in float64), not only those without a positive."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    x[1] = -x[0]  # class 0: opposite views, losses of ~100
    x[3] = x[2] * 50  # class 1: aligned views, far from class 0: its anchors' losses are exactly 0
    x = x.to(DEVICE).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1], device=DEVICE)
    ours, theirs = tilecl_pml.SupConLoss(0.01, backend="torch"), pml_losses.SupConLoss(0.01)
    if memory:
        ours = tilecl_pml.CrossBatchMemory(ours, 6, memory_size=8).to(DEVICE)
        theirs = pml_losses.CrossBatchMemory(theirs, 6, memory_size=8).to(DEVICE)
    per_anchor = tilecl.supcon_loss(x.detach(), labels, 0.01, reduction="none")
    assert int((per_anchor == 0).sum()) == 2 and int((per_anchor > 0).sum()) == 2  # the case at stake
    assert_same(loss_and_grads(ours, (x,), x, labels), loss_and_grads(theirs, (x,), x, labels), 1e-10)


def test_pml_supcon_of_one_class_is_pmls_zero():
    x = torch.randn(6, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    labels = torch.full((6,), 3, device=DEVICE)
    ours = tilecl_pml.SupConLoss(backend="torch")(x, labels)
    assert float(ours.detach()) == float(pml_losses.SupConLoss()(x, labels).detach()) == 0.0
    (grad,) = torch.autograd.grad(ours, x)
    assert float(grad.abs().max()) == 0.0


def test_pml_refuses_a_miner():
    x = torch.randn(4, 3)
    with pytest.raises(NotImplementedError, match="indices_tuple"):
        tilecl_pml.SupConLoss()(x, torch.tensor([0, 0, 1, 1]), indices_tuple=(torch.tensor([0]),) * 4)


#: PML's own default reducer of each loss (its get_default_reducer), which a user may pass explicitly
PML_DEFAULT_REDUCER = {"SupConLoss": "AvgNonZeroReducer", "NTXentLoss": "MeanReducer"}


@pytest.mark.parametrize("name", ["SupConLoss", "NTXentLoss"])
def test_pml_takes_its_defaults_passed_explicitly(name):
    assert type(getattr(pml_losses, name)().reducer).__name__ == PML_DEFAULT_REDUCER[name]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 6, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    labels = torch.randint(0, 5, (24,), generator=g).to(DEVICE)
    options = {
        "distance": pml_distances.CosineSimilarity(),
        "reducer": getattr(pml_reducers, PML_DEFAULT_REDUCER[name])(),
    }
    ours = getattr(tilecl_pml, name)(temperature=0.2, backend="torch", **options)
    theirs = getattr(pml_losses, name)(temperature=0.2, **options)
    assert_same(loss_and_grads(ours, (x,), x, labels), loss_and_grads(theirs, (x,), x, labels))


def _changed_cosine():
    distance = pml_distances.CosineSimilarity()
    distance.normalize_embeddings = False
    return distance


@pytest.mark.parametrize("name", ["SupConLoss", "NTXentLoss"])
@pytest.mark.parametrize(
    "argument,value",
    [
        ("distance", pml_distances.LpDistance()),
        ("distance", pml_distances.DotProductSimilarity()),
        ("distance", _changed_cosine()),
        ("reducer", pml_reducers.SumReducer()),
        ("reducer", "mean"),
    ],
    ids=["lp", "dot-product", "unnormalized-cosine", "sum", "a-string"],
)
def test_pml_refuses_another_distance_or_reducer_by_its_name(name, argument, value):
    with pytest.raises(ValueError, match=rf"^{name}\({argument}=") as error:
        getattr(tilecl_pml, name)(**{argument: value})
    assert "_TemperatureLoss" not in str(error.value)


@pytest.mark.parametrize("name", ["SupConLoss", "NTXentLoss"])
def test_pml_refuses_the_default_reducer_of_the_other_loss(name):
    other = next(r for n, r in PML_DEFAULT_REDUCER.items() if n != name)
    with pytest.raises(ValueError, match=rf"{name}\(reducer=.*{PML_DEFAULT_REDUCER[name]}"):
        getattr(tilecl_pml, name)(reducer=getattr(pml_reducers, other)())


@pytest.mark.parametrize("name", ["SupConLoss", "NTXentLoss"])
def test_pml_an_unknown_keyword_names_the_class_called(name):
    with pytest.raises(TypeError, match=name) as error:
        getattr(tilecl_pml, name)(embedding_regularizer=None)
    assert "_TemperatureLoss" not in str(error.value)


def test_positive_pairs_are_every_ordered_same_label_pair():
    labels = torch.tensor([3, 1, 3, 3, 2, 1])
    anchors, partners = tilecl_pml.positive_pairs(labels)
    want = {(i, j) for i in range(6) for j in range(6) if i != j and labels[i] == labels[j]}
    assert set(zip(anchors.tolist(), partners.tolist())) == want and len(anchors) == len(want)


# --------------------------------------------------------------------------- sentence-transformers


class BagOfTokens(nn.Module):
    """A stand-in SentenceTransformer: mean token embedding of the unpadded tokens (no download)."""

    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim, dtype=torch.float64)

    def forward(self, features: dict) -> dict:
        mask = features["attention_mask"].to(torch.float64)[..., None]
        pooled = (self.embedding(features["input_ids"]) * mask).sum(1) / mask.sum(1)
        return {**features, "sentence_embedding": pooled}


def tokenized(texts: list[list[int]]) -> dict:
    width = max(len(t) for t in texts)
    ids = torch.tensor([t + [0] * (width - len(t)) for t in texts])
    mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in texts])
    return {"input_ids": ids, "attention_mask": mask}


def columns_of_embeddings(n: int, k: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(n, 10, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_() for _ in range(2 + k)
    ]


@pytest.mark.parametrize("negatives", [0, 1, 2])
@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
@pytest.mark.parametrize("similarity", ["cos_sim", "dot_score"])
@pytest.mark.parametrize("gather", [False, True], ids=["local", "gather without a process group"])
def test_mnrl_matches_sentence_transformers(gather, negatives, symmetric, similarity):
    """``gather_across_devices=True`` in one process without a process group is a world of one, as
    sentence-transformers' own (a Trainer script run without a launcher)."""
    columns = columns_of_embeddings(14, negatives, seed=negatives)
    directions = ("query_to_doc", "doc_to_query") if symmetric else ("query_to_doc",)
    options = dict(
        scale=20.0 if similarity == "cos_sim" else 0.5,
        similarity_fct=getattr(st_util, similarity),
        directions=directions,
        partition_mode="per_direction" if symmetric else "joint",
        gather_across_devices=gather,
    )
    ours = tilecl_st.MultipleNegativesRankingLoss(nn.Identity(), **options, backend="torch")
    theirs = st_losses.MultipleNegativesRankingLoss(nn.Identity(), **options)
    assert_same(
        loss_and_grads(ours.compute_loss_from_embeddings, columns, columns, None),
        loss_and_grads(theirs.compute_loss_from_embeddings, columns, columns, None),
    )


def test_mnrl_forward_through_a_model_matches_sentence_transformers():
    torch.manual_seed(0)
    model = BagOfTokens()
    g = torch.Generator().manual_seed(2)
    features = [
        tokenized(
            [
                torch.randint(1, 50, (int(torch.randint(2, 7, (), generator=g)),), generator=g).tolist()
                for _ in range(9)
            ]
        )
        for _ in range(3)
    ]
    ours = tilecl_st.MultipleNegativesRankingLoss(model, backend="torch")(features, None)
    (ours_grad,) = torch.autograd.grad(ours, model.embedding.weight)
    theirs = st_losses.MultipleNegativesRankingLoss(model)(features, None)
    (theirs_grad,) = torch.autograd.grad(theirs, model.embedding.weight)
    assert_same((ours, ours_grad), (theirs, theirs_grad))


def masked_cross_entropy(anchors, candidates, scale, row_groups, col_groups, symmetric=False):
    """The full-matrix masked MNRL: same-group candidates other than the positive leave the softmax."""
    n, device = anchors.shape[0], anchors.device
    logits = scale * F.normalize(anchors, dim=1) @ F.normalize(candidates, dim=1).t()
    same = row_groups[:, None] == col_groups[None, :]
    pairs = torch.eye(n, candidates.shape[0], dtype=torch.bool, device=device)
    logits = logits.masked_fill(same & ~pairs, float("-inf"))
    forward = F.cross_entropy(logits, torch.arange(n, device=device))
    if not symmetric:
        return forward
    return (forward + F.cross_entropy(logits[:, :n].t(), torch.arange(n, device=device))) / 2


@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
def test_mnrl_masks_duplicate_texts(symmetric):
    """Two anchors with one positive text, an anchor asked twice, a hard negative that is a positive."""
    model = BagOfTokens()
    anchors = [[1, 2], [3, 4], [1, 2], [5], [6, 7], [8]]
    positives = [[10, 11], [12], [13], [14, 15], [12], [16]]
    negatives = [[20], [14, 15], [21], [22], [23, 24], [25]]
    features = [tokenized(anchors), tokenized(positives), tokenized(negatives)]
    loss = tilecl_st.MultipleNegativesRankingLoss(
        model, symmetric=symmetric, mask_false_negatives="text", backend="torch"
    )
    ours = loss(features, None)
    # pairs 0 and 2 share an anchor text, 1 and 4 a positive; negative 1 is pair 3's positive
    rows = torch.tensor([0, 1, 0, 3, 1, 5])
    cols = torch.cat([rows, torch.tensor([100, 3, 101, 102, 103, 104])])
    with torch.no_grad():
        embedded = [model(f)["sentence_embedding"] for f in features]
    want = masked_cross_entropy(embedded[0], torch.cat(embedded[1:]), 20.0, rows, cols, symmetric)
    assert_rel(ours, want, 1e-12, "masked loss")
    assert tilecl_st.pair_groups_from_keys(
        [tuple(t) for t in anchors], [tuple(t) for t in positives], [[tuple(t) for t in negatives]]
    ) == (rows.tolist(), [*rows.tolist(), 6, 3, 7, 8, 9, 10])


def test_mnrl_masks_by_a_group_column():
    columns = columns_of_embeddings(10, 1, seed=5)
    groups = torch.tensor([0, 1, 0, 2, 3, 3, 4, 5, 6, 1], device=DEVICE)
    loss = tilecl_st.MultipleNegativesRankingLoss(
        nn.Identity(), mask_false_negatives="labels", backend="torch"
    )
    ours = loss.compute_loss_from_embeddings(columns, groups)
    never = torch.full((10,), -1, device=DEVICE)  # hard negatives are never masked
    want = masked_cross_entropy(columns[0], torch.cat(columns[1:]), 20.0, groups, torch.cat([groups, never]))
    assert_rel(ours, want, 1e-12, "masked loss")
    with pytest.raises(ValueError, match="label column"):
        loss.compute_loss_from_embeddings(columns, None)


#: every direction set sentence-transformers takes (query_to_doc is required), with the partition
#: modes it allows (per_direction only where every direction holds the positive)
DIRECTION_SETS = [
    (("query_to_doc",) + extra, mode)
    for extra in [(), ("query_to_query",), ("doc_to_query",), ("doc_to_doc",),
                  ("query_to_query", "doc_to_query"), ("doc_to_query", "doc_to_doc"),
                  ("query_to_query", "doc_to_doc"), ("query_to_query", "doc_to_query", "doc_to_doc")]
    for mode in ("joint", "per_direction")
    if mode == "joint" or not set(extra) & {"query_to_query", "doc_to_doc"}
]  # fmt: skip


@pytest.mark.parametrize(
    "directions,mode", DIRECTION_SETS, ids=lambda x: "+".join(x) if isinstance(x, tuple) else x
)
@pytest.mark.parametrize("hardness", [None, "in_batch_negatives", "hard_negatives", "all_negatives"])
@pytest.mark.parametrize("negatives", [0, 2])
@pytest.mark.parametrize("similarity", ["cos_sim", "dot_score"])
def test_mnrl_every_direction_partition_and_hardness_matches_sentence_transformers(
    directions, mode, hardness, negatives, similarity
):
    """sentence-transformers 6's full MNRL: the GTE joint softmax, the same-type directions and
    hardness-weighted negatives, against the real loss (values and gradients, float64)."""
    columns = columns_of_embeddings(11, negatives, seed=7 + negatives)
    options = dict(
        scale=20.0 if similarity == "cos_sim" else 0.5,
        similarity_fct=getattr(st_util, similarity),
        directions=directions,
        partition_mode=mode,
        hardness_mode=hardness,
        hardness_strength=0.0 if hardness is None else 3.0,
    )
    ours = tilecl_st.MultipleNegativesRankingLoss(nn.Identity(), **options, backend="torch")
    theirs = st_losses.MultipleNegativesRankingLoss(nn.Identity(), **options)
    assert_same(
        loss_and_grads(ours.compute_loss_from_embeddings, columns, columns, None),
        loss_and_grads(theirs.compute_loss_from_embeddings, columns, columns, None),
        rel=1e-10,
    )


@pytest.mark.parametrize("combo", matrix(), indirect=True)
def test_the_full_mnrl_on_every_backend(combo):
    """The blocks of the multi-direction loss (own scales, masks, the diagonal) on each backend of the
    matrix: within 2× sentence-transformers' own error in the same dtype of its float64 value
    (16-bit embeddings: sentence-transformers computes them in float32, and so do we)."""
    options = dict(
        scale=20.0,
        directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
        hardness_mode="hard_negatives",
        hardness_strength=3.0,
    )
    ours = tilecl_st.MultipleNegativesRankingLoss(nn.Identity(), **options, backend=combo.backend)
    theirs = st_losses.MultipleNegativesRankingLoss(nn.Identity(), **options)
    exact = columns_of_embeddings(13, 1, seed=11)
    leaves = [x.detach().to(device=combo.device, dtype=combo.dtype).requires_grad_() for x in exact]
    rounded = [x.detach().double().requires_grad_() for x in leaves]  # the same inputs, in float64
    assert_all_close_by_rule(
        loss_and_grads(ours.compute_loss_from_embeddings, leaves, leaves, None),
        loss_and_grads(theirs.compute_loss_from_embeddings, leaves, leaves, None),
        loss_and_grads(theirs.compute_loss_from_embeddings, rounded, rounded, None),
        combo,
        ("loss", "grad_anchors", "grad_positives", "grad_negatives"),
    )


def test_mnrl_refuses_what_it_cannot_tile():
    with pytest.raises(NotImplementedError, match="similarity_fct"):
        tilecl_st.MultipleNegativesRankingLoss(nn.Identity(), similarity_fct=lambda a, b: a @ b.t())
    # what sentence-transformers refuses, refused alike
    with pytest.raises(ValueError, match="query_to_doc"):
        tilecl_st.MultipleNegativesRankingLoss(nn.Identity(), directions=("doc_to_query",))
    with pytest.raises(ValueError, match="per_direction"):
        tilecl_st.MultipleNegativesRankingLoss(
            nn.Identity(), directions=("query_to_doc", "query_to_query"), partition_mode="per_direction"
        )
    with pytest.raises(ValueError, match="hardness_mode"):
        tilecl_st.MultipleNegativesRankingLoss(nn.Identity(), hardness_mode="hardest", hardness_strength=1.0)
    with pytest.raises(ValueError, match="hardness_strength"):
        tilecl_st.MultipleNegativesRankingLoss(nn.Identity(), hardness_strength=-1.0)
    # tilecl's own false-negative masking is for the contrastive directions
    with pytest.raises(NotImplementedError, match="mask_false_negatives"):
        tilecl_st.MultipleNegativesRankingLoss(
            nn.Identity(), directions=("query_to_doc", "query_to_query"), mask_false_negatives="labels"
        )
    with pytest.raises(ValueError, match="mask_false_negatives"):
        tilecl_st.MultipleNegativesRankingLoss(nn.Identity(), mask_false_negatives="yes")
