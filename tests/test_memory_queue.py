"""The cross-batch memory: tilecl.MemoryQueue, and PML's CrossBatchMemory drop-in against the real one.

``CrossBatchMemory`` wraps tilecl's NTXentLoss / SupConLoss and must give pytorch-metric-learning's
values and gradients (float64, ≤ 1e-10) step after step, the memory wrapping round, with and without
``enqueue_mask``. The queue is checked for order, age, checkpoints, refusal of bad and non-finite
input, and as the negatives of a loss against the full-matrix loss with the same mask. Across ranks:
tests/test_distributed.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml

import tilecl
from tilecl.integrations import pytorch_metric_learning as ours
from utils import assert_rel

D = 6


def batches(steps: int, n: int, classes: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, D, generator=gen, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=gen),
        )
        for _ in range(steps)
    ]


@pytest.mark.parametrize("loss", ["supcon", "ntxent"])
@pytest.mark.parametrize("masked", [False, True], ids=["all-anchors", "enqueue-mask"])
def test_cross_batch_memory_matches_pml_step_by_step(loss, masked):
    temperature = 0.1 if loss == "supcon" else 0.07
    theirs = pml.CrossBatchMemory(
        pml.SupConLoss(temperature) if loss == "supcon" else pml.NTXentLoss(temperature), D, memory_size=23
    )
    mine = ours.CrossBatchMemory(
        ours.SupConLoss(temperature) if loss == "supcon" else ours.NTXentLoss(temperature), D, memory_size=23
    )
    for step, (x, labels) in enumerate(batches(5, 10, 4)):
        mask = (torch.arange(10) % 3 == step % 3) if masked else None
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        want = theirs(a, labels, enqueue_mask=mask)
        got = mine(b, labels, enqueue_mask=mask)
        assert_rel(got, want.detach(), 1e-10, f"{loss} step {step} loss")
        (grad_want,) = torch.autograd.grad(want, (a,))
        (grad_got,) = torch.autograd.grad(got, (b,))
        assert_rel(grad_got, grad_want, 1e-10, f"{loss} step {step} gradient")
        assert mine.queue_idx == theirs.queue_idx and mine.has_been_filled == theirs.has_been_filled
        assert torch.equal(mine.embedding_memory, theirs.embedding_memory)


def test_cross_batch_memory_with_every_row_enqueued_is_pmls_zero_loss():
    theirs = pml.CrossBatchMemory(pml.SupConLoss(), D, memory_size=8)
    mine = ours.CrossBatchMemory(ours.SupConLoss(), D, memory_size=8)
    x, labels = batches(1, 4, 2)[0]
    everything = torch.ones(4, dtype=torch.bool)
    got = mine(x.clone().requires_grad_(), labels, enqueue_mask=everything)
    want = theirs(x.clone().requires_grad_(), labels, enqueue_mask=everything)
    assert float(got) == float(want) == 0.0 and got.requires_grad
    assert mine.queue_idx == theirs.queue_idx == 4


def test_cross_batch_memory_refuses_what_it_cannot_do():
    # both sides qualified by module: PML's own SupConLoss is not "SupConLoss" to the reader
    with pytest.raises(
        TypeError,
        match=r"pytorch_metric_learning\.NTXentLoss or tilecl\.integrations\.pytorch_metric_learning\."
        r"SupConLoss, got pytorch_metric_learning\.losses\.supcon_loss\.SupConLoss",
    ):
        ours.CrossBatchMemory(pml.SupConLoss(), D)
    with pytest.raises(NotImplementedError, match="miner"):
        ours.CrossBatchMemory(ours.SupConLoss(), D, miner=object())
    memory = ours.CrossBatchMemory(ours.SupConLoss(), D, memory_size=4)
    with pytest.raises(ValueError, match="does not fit a memory of 4"):
        memory(torch.randn(5, D), torch.arange(5))
    with pytest.raises(ValueError, match="embedding_size = 6"):
        memory(torch.randn(3, 5), torch.arange(3))
    assert memory.queue_idx == 0 and not memory.embedding_memory.any()


def test_queue_keeps_the_newest_entries_oldest_first_and_drops_old_ones():
    queue = tilecl.MemoryQueue(5, 2, max_age=1)
    for step in range(3):
        queue.enqueue(torch.full((2, 2), float(step)), torch.tensor([10 * step, 10 * step + 1]))
    entries = queue.entries()  # slots hold steps 2, 1, 1, 2, 2 → the last two steps, oldest first
    assert entries.steps.tolist() == [1, 1, 2, 2] and entries.ids.tolist() == [10, 11, 20, 21]
    assert entries.embeddings[:, 0].tolist() == [1.0, 1.0, 2.0, 2.0]
    assert not entries.embeddings.requires_grad
    assert tilecl.MemoryQueue(5, 2, max_age=0).entries().embeddings.shape == (0, 2)


def test_a_resumed_queue_equals_an_uninterrupted_one():
    data = batches(6, 4, 100)
    whole = tilecl.MemoryQueue(9, D, max_age=3)
    for x, ids in data:
        whole.enqueue(x, ids)
    first = tilecl.MemoryQueue(9, D, max_age=3)
    for x, ids in data[:3]:
        first.enqueue(x, ids)
    resumed = tilecl.MemoryQueue(9, D, max_age=3)
    resumed.load_state_dict(first.state_dict())
    for x, ids in data[3:]:
        resumed.enqueue(x, ids)
    for got, want in zip(resumed.entries(), whole.entries()):
        assert torch.equal(got, want)


def test_bad_or_non_finite_input_writes_nothing():
    queue = tilecl.MemoryQueue(8, D)
    queue.enqueue(torch.randn(3, D), torch.arange(3))
    before = {k: t.clone() for k, t in queue.state_dict().items()}
    with pytest.raises(ValueError, match="D = 6"):
        queue.enqueue(torch.randn(3, D + 1), torch.arange(3))
    with pytest.raises(ValueError, match="ids"):
        queue.enqueue(torch.randn(3, D), torch.arange(4))
    bad = torch.randn(3, D)
    bad[1, 2] = float("nan")
    with pytest.warns(UserWarning, match="non-finite"):
        queue.enqueue(bad, torch.arange(3))
    for key, value in queue.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert int(queue.skipped_steps) == 1
    half = tilecl.MemoryQueue(8, D, dtype=torch.float16)
    with pytest.warns(UserWarning, match="non-finite"):
        half.enqueue(torch.full((2, D), 1e5), torch.arange(2))  # finite in float32, inf in float16
    assert int(half.step) == 0 and not half.embeddings.any()
    with pytest.raises(ValueError, match="max_age"):
        tilecl.MemoryQueue(8, D, max_age=-1)


def test_the_queue_as_masked_negatives_equals_the_full_matrix_loss():
    """Anchors against their positives then the queue; an entry with the anchor's id is not a negative."""
    queue = tilecl.MemoryQueue(16, D, dtype=torch.float64)
    (old, old_ids), (x, _) = batches(2, 12, 1000, seed=3)
    queue.enqueue(F.normalize(old, dim=1), old_ids % 7)  # ids 0..6: some match the batch's
    a = F.normalize(x, dim=1).requires_grad_()
    b = F.normalize(x.flip(1), dim=1)
    ids = torch.arange(12) % 7
    memory = queue.entries()
    loss = tilecl.contrastive_loss(
        a, b, 10.0, negatives=memory.embeddings, row_groups=ids, col_groups=torch.cat([ids, memory.ids]),
        symmetric=False,
    )  # fmt: skip
    logits = 10.0 * a @ torch.cat([b, memory.embeddings]).T
    columns = torch.cat([ids, memory.ids])
    false_negative = (ids[:, None] == columns[None, :]) & (
        torch.arange(columns.shape[0]) != torch.arange(12)[:, None]
    )
    want = F.cross_entropy(logits.masked_fill(false_negative, float("-inf")), torch.arange(12))
    assert_rel(loss, want.detach(), 1e-12, "loss")
    assert_rel(torch.autograd.grad(loss, a)[0], torch.autograd.grad(want, a)[0], 1e-12, "gradient")


def test_casts_keep_the_ids_steps_and_order():
    queue = tilecl.MemoryQueue(6, D)
    for x, ids in batches(3, 4, 100):
        queue.enqueue(x.float(), ids)
    before = queue.entries()
    doubled = queue.double()
    after = doubled.entries()
    assert after.embeddings.dtype == torch.float64 and after.ids.dtype == torch.int64
    assert torch.equal(after.ids, before.ids) and torch.equal(after.steps, before.steps)
    assert torch.equal(after.embeddings.float(), before.embeddings)
    doubled.enqueue(torch.randn(2, D, dtype=torch.float64), torch.tensor([7, 8]))
    assert doubled.entries().ids[-2:].tolist() == [7, 8]
