"""tilecl.GradCache: the towers' gradients equal the plain step's for every loss; misuse raises early."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tilecl

N, D = 12, 4


class MLP(nn.Module):
    """A tensor tower ``(rows, 6) → (rows, D)``, L2-normalized; records the autocast state of each call."""

    def __init__(self, dropout: float = 0.0, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, D)).to(dtype)
        self.calls: list[tuple[bool, torch.dtype, bool]] = []

    def forward(self, x):
        self.calls.append(
            (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), torch.is_grad_enabled())
        )
        return F.normalize(self.net(x), dim=-1)


class Bag(nn.Module):
    """A text tower over a tokenizer's output: masked mean of token embeddings, dropout, a projection."""

    def __init__(self, vocab: int = 20, dropout: float = 0.0):
        super().__init__()
        self.embedding = nn.Embedding(vocab, 8).double()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(8, D).double()

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).double()
        pooled = (self.embedding(input_ids) * mask).sum(1) / mask.sum(1).clamp_min(1)
        return F.normalize(self.proj(self.dropout(pooled)), dim=-1)


def images(n: int = N, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def texts(lengths=(3, 7, 2, 5, 5, 1, 6, 4, 2, 7, 3, 3), width: int = 7, seed: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 20, (len(lengths), width), generator=g)
    mask = (torch.arange(width) < torch.tensor(lengths).unsqueeze(1)).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def plain_embed(towers, inputs, ranges):
    """The plain step's forward: the same mini-batches, the same order, with autograd."""
    out = []
    for tower, x, spans in zip(towers, inputs, ranges):
        rows = []
        for start, stop in spans:
            if isinstance(x, dict):
                rows.append(tower(**{k: t[start:stop] for k, t in x.items()}))
            else:
                rows.append(tower(x[start:stop]))
        out.append(torch.cat(rows))
    return out


class Head(nn.Module):
    """The loss's own parameters (a learnable scale and bias), which the plain path differentiates too."""

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0), dtype=torch.float64))
        self.bias = nn.Parameter(torch.tensor(-2.0, dtype=torch.float64))


GROUPS = torch.tensor([0, 1, 2, 3, 0, 4, 5, 6, 7, 1, 8, 9])
WEIGHTS = torch.linspace(0.5, 2.0, N, dtype=torch.float64)
LOG_U = torch.linspace(-1.0, 1.0, N, dtype=torch.float64)
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 4, 4, 5, 5])

LOSSES = {
    "contrastive": lambda za, zb, h: tilecl.contrastive_loss(za, zb, h.log_scale.exp()),
    "sigmoid": lambda za, zb, h: tilecl.sigmoid_loss(za, zb, h.log_scale.exp(), h.bias),
    "nt_xent": lambda za, zb, h: tilecl.nt_xent_loss(za, zb, 0.5),
    "supcon": lambda za, zb, h: tilecl.supcon_loss(torch.cat([za, zb]), torch.cat([LABELS, LABELS]), 0.1),
    "masked_weighted": lambda za, zb, h: tilecl.contrastive_loss(
        za, zb, h.log_scale.exp(), row_groups=GROUPS, col_groups=GROUPS, weights=WEIGHTS
    ),
    "hard_negatives": lambda za, zb, h: tilecl.contrastive_loss(
        za, zb, h.log_scale.exp(), negatives=F.normalize(zb.roll(1, 0) + za, dim=-1)
    ),
    "geometric_consistency": lambda za, zb, h: tilecl.geometric_consistency_loss(za, zb),
    "gamma": lambda za, zb, h: tilecl.gamma_contrastive_loss(za, zb, LOG_U, LOG_U.flip(0), h.log_scale.exp()),
    # only za reaches the loss: tower b gets no gradient (None), as in the plain step
    "uniformity": lambda za, zb, h: tilecl.uniformity_loss(za),
}


def make_setup(name: str):
    torch.manual_seed(0)
    if name == "no_dropout":  # plain step: the whole batch at once
        towers = [MLP(), MLP()]
        return towers, [images(seed=1), images(seed=2)], 5, True
    if name == "dropout_text":
        towers = [MLP(dropout=0.3), Bag(dropout=0.2)]
        return towers, [images(), texts()], 5, False
    shared = MLP(dropout=0.3)
    return [shared, shared], [images(seed=1), images(seed=2)], 5, False


def grads(modules) -> list:
    seen, out = set(), []
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(None if p.grad is None else p.grad.clone())
    return out


def assert_same_grads(got, want, rtol=1e-10):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            assert ((g - w).norm() / w.norm().clamp_min(1e-300)).item() <= rtol, (g, w)


def zero(modules):
    for m in modules:
        m.zero_grad(set_to_none=True)


@pytest.mark.parametrize("setup", ["no_dropout", "dropout_text", "shared"])
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_gradients_equal_the_plain_step(loss_name, setup):
    towers, inputs, size, full_batch = make_setup(setup)
    head = Head()
    loss_fn = LOSSES[loss_name]
    cache = tilecl.GradCache(towers, mini_batch_size=size)
    ranges = [[(0, N)]] * 2 if full_batch else cache.mini_batches(*inputs)

    torch.manual_seed(7)
    za_ref, zb_ref = plain_embed(towers, inputs, ranges)
    rng_after_forward = torch.get_rng_state()
    loss_fn(za_ref, zb_ref, head).backward()
    want = grads([*towers, head])

    zero([*towers, head])
    torch.manual_seed(7)
    za, zb = cache.embed(*inputs)
    assert torch.equal(torch.get_rng_state(), rng_after_forward)
    rng_after_embed = torch.get_rng_state()
    torch.testing.assert_close(za, za_ref.detach(), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(zb, zb_ref.detach(), rtol=1e-14, atol=1e-14)
    loss = loss_fn(za, zb, head)
    torch.testing.assert_close(loss, loss_fn(za_ref, zb_ref, head), rtol=1e-13, atol=1e-13)
    loss.backward()
    assert torch.equal(torch.get_rng_state(), rng_after_embed), (
        "the backward's replays must not move the stream"
    )
    assert_same_grads(grads([*towers, head]), want)


def test_the_mini_batches_are_those_documented_and_embed_splits_by_them():
    calls = []
    tower = MLP()
    tower.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    cache = tilecl.GradCache(tower, mini_batch_size=5)
    assert cache.mini_batches(images()) == [[(0, 5), (5, 10), (10, 12)]]
    (z,) = cache.embed(images())
    assert calls == [5, 5, 2]
    z.sum().backward()
    assert calls == [5, 5, 2, 5, 5, 2]


def test_scaled_backward_and_accumulation_over_steps():
    towers, inputs, size, _ = make_setup("dropout_text")
    cache = tilecl.GradCache(towers, mini_batch_size=size)

    def step(seed, scale=1.0, scaler=None):
        torch.manual_seed(seed)
        loss = tilecl.contrastive_loss(*cache.embed(*inputs), 10.0) * scale
        (scaler.scale(loss) if scaler is not None else loss).backward()

    step(3)
    once = grads(towers)
    zero(towers)
    step(3, scale=1024.0)
    assert_same_grads(grads(towers), [g * 1024 for g in once])
    zero(towers)
    step(3, scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    assert_same_grads(grads(towers), [g * 1024 for g in once])

    zero(towers)
    step(4)
    other = grads(towers)
    zero(towers)
    step(3)
    step(4)  # no zero_grad: .grad accumulates as after two plain steps
    assert_same_grads(grads(towers), [a + b for a, b in zip(once, other)], rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_is_replayed_in_the_backward_and_scaled(dtype):
    torch.manual_seed(0)
    towers = [MLP(dropout=0.3, dtype=torch.float32), MLP(dtype=torch.float32)]
    x, y = images().float(), images(seed=5).float()
    cache = tilecl.GradCache(towers, mini_batch_size=5)
    # fp16 trains with a GradScaler; its scale must reach the towers through the cached gradient
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, enabled=dtype == torch.float16)
    with torch.autocast("cpu", dtype=dtype):
        torch.manual_seed(1)
        za, zb = cache.embed(x, y)
        assert za.dtype == dtype
        loss = tilecl.contrastive_loss(za, zb, 10.0)
    scaler.scale(loss).backward()  # outside autocast, as the usual training loop does
    for tower in towers:
        forward = [c for c in tower.calls if not c[2]]
        replay = [c for c in tower.calls if c[2]]
        assert len(forward) == len(replay) == 3
        assert forward == [(True, dtype, False)] * 3
        assert replay == [(True, dtype, True)] * 3
    got = grads(towers)

    zero(towers)
    with torch.autocast("cpu", dtype=dtype):
        torch.manual_seed(1)
        za, zb = plain_embed(towers, [x, y], cache.mini_batches(x, y))
        loss = tilecl.contrastive_loss(za, zb, 10.0)
    scaler.scale(loss).backward()
    assert_same_grads(got, grads(towers), rtol=1e-2)  # 16-bit: summation order differs between the paths

    # and the other way round: embedded without autocast, the replay runs without it too
    tower = MLP()
    (z,) = tilecl.GradCache(tower, mini_batch_size=5).embed(images())
    with torch.autocast("cpu", dtype=dtype):
        z.sum().backward()
    assert {c[:2] for c in tower.calls} == {(False, torch.get_autocast_dtype("cpu"))}


def test_token_budget_splits_rows_in_order_within_the_budget():
    t = texts()
    lengths = t["attention_mask"].sum(1).tolist()
    assert lengths == [3, 7, 2, 5, 5, 1, 6, 4, 2, 7, 3, 3]
    assert tilecl.GradCache(Bag(), tokens_per_mini_batch=20).mini_batches(t) == [[(0, 4), (4, 9), (9, 12)]]
    tight = tilecl.GradCache(Bag(), tokens_per_mini_batch=10)
    assert tight.mini_batches(t) == [[(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)]]
    # both: the row cap closes a mini-batch too; an input without a mask goes by count
    cache = tilecl.GradCache([MLP(), Bag()], tokens_per_mini_batch=20, mini_batch_size=3)
    image_ranges, text_ranges = cache.mini_batches(images(), t)
    assert image_ranges == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert text_ranges == [(0, 3), (3, 6), (6, 9), (9, 12)]
    for budget in (7, 10, 13, 20):
        (ranges,) = tilecl.GradCache(Bag(), tokens_per_mini_batch=budget).mini_batches(t)
        assert [r[0] for r in ranges[1:]] == [r[1] for r in ranges[:-1]] and ranges[-1][1] == N
        for start, stop in ranges:
            assert sum(lengths[start:stop]) <= budget
            if stop < N:  # greedy: the next row would not fit
                assert sum(lengths[start : stop + 1]) > budget
    # padding does not count: the same rows padded wider split the same
    wide = {k: F.pad(v, (0, 5)) for k, v in t.items()}
    assert tight.mini_batches(wide) == tight.mini_batches(t)


@pytest.mark.parametrize("offload", [False, True], ids=["kept", "offload"])
def test_token_budget_and_offload_give_the_plain_gradients(offload):
    torch.manual_seed(0)
    towers = [MLP(dropout=0.3), Bag(dropout=0.2)]
    inputs = [images(), texts()]
    cache = tilecl.GradCache(towers, tokens_per_mini_batch=13, mini_batch_size=3, offload_inputs=offload)
    torch.manual_seed(3)
    tilecl.contrastive_loss(*plain_embed(towers, inputs, cache.mini_batches(*inputs)), 10.0).backward()
    want = grads(towers)
    zero(towers)
    torch.manual_seed(3)
    tilecl.contrastive_loss(*cache.embed(*inputs), 10.0).backward()
    assert_same_grads(grads(towers), want)


def test_under_no_grad_embed_returns_plain_embeddings():
    tower = MLP()
    with torch.no_grad():
        (z,) = tilecl.GradCache(tower, mini_batch_size=5).embed(images())
    assert not z.requires_grad and z.grad_fn is None
    torch.testing.assert_close(z, tower(images()).detach(), rtol=1e-14, atol=1e-14)


# --- misuse: one exception type per kind, raised before any forward ---


class Counting(MLP):
    def forward(self, x):
        self.count = getattr(self, "count", 0) + 1
        return super().forward(x)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"mini_batch_size": 0}, ValueError, "mini_batch_size must be positive"),
        ({"mini_batch_size": -3}, ValueError, "mini_batch_size must be positive"),
        ({"mini_batch_size": 2.5}, TypeError, "mini_batch_size must be an int"),
        ({"mini_batch_size": True}, TypeError, "mini_batch_size must be an int"),
        ({"tokens_per_mini_batch": 0}, ValueError, "tokens_per_mini_batch must be positive"),
        ({}, TypeError, "give mini_batch_size"),
        ({"mini_batch_size": 4, "offload_inputs": "yes"}, TypeError, "offload_inputs must be True or False"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        tilecl.GradCache(MLP(), **kwargs)


@pytest.mark.parametrize(
    "towers, error, match",
    [
        ("mlp", TypeError, "towers must be an nn.Module"),
        ([], ValueError, "towers is empty"),
        ([MLP(), 3], TypeError, "tower 1 must be an nn.Module"),
    ],
)
def test_bad_towers(towers, error, match):
    with pytest.raises(error, match=match):
        tilecl.GradCache(towers, mini_batch_size=4)


def _bad_inputs():
    t = texts()
    return [
        ("count", lambda: (images(),), ValueError, "1 inputs for 2 towers"),
        ("count", lambda: (images(), images(), images()), ValueError, "3 inputs for 2 towers"),
        ("lengths", lambda: (images(), images(n=N - 1)), ValueError, "different lengths"),
        ("type", lambda: (images(), images().tolist()), TypeError, "input 1 must be a tensor or a mapping"),
        ("dict", lambda: (images(), {"x": [1, 2]}), TypeError, r"input 1\['x'\] must be a tensor"),
        (
            "dict_lengths",
            lambda: (images(), {**t, "attention_mask": t["attention_mask"][:5]}),
            ValueError,
            "different",
        ),
        ("empty", lambda: (images(n=0), images(n=0)), ValueError, "empty"),
        ("scalar", lambda: (torch.tensor(1.0), torch.tensor(1.0)), ValueError, "0-d tensor"),
        ("grad", lambda: (images().requires_grad_(), images()), ValueError, "requires grad"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_inputs_raise_before_any_forward(case):
    _, make, error, match = case
    towers = [Counting(), Counting()]
    inputs = make()
    rng = torch.get_rng_state()
    with pytest.raises(error, match=match):
        tilecl.GradCache(towers, mini_batch_size=4).embed(*inputs)
    assert all(getattr(t, "count", 0) == 0 for t in towers)
    assert torch.equal(torch.get_rng_state(), rng)


def test_token_budget_misuse_raises_before_any_forward():
    towers = [Counting(), Bag()]
    with pytest.raises(ValueError, match="input 0 has no attention_mask"):
        tilecl.GradCache(towers, tokens_per_mini_batch=10).embed(images(), texts())
    with pytest.raises(ValueError, match="row 1 of input 1 has 7 tokens, more than tokens_per_mini_batch=6"):
        tilecl.GradCache(towers, tokens_per_mini_batch=6, mini_batch_size=4).embed(images(), texts())
    with pytest.raises(ValueError, match="must be \\(N, L\\)"):
        bad = {"input_ids": texts()["input_ids"], "attention_mask": torch.ones(N, 7, 1)}
        tilecl.GradCache(Bag(), tokens_per_mini_batch=10).embed(bad)
    assert getattr(towers[0], "count", 0) == 0


def test_batch_norm_using_batch_statistics_is_refused():
    bn = nn.Sequential(nn.Linear(6, D), nn.BatchNorm1d(D)).double()
    with pytest.raises(RuntimeError, match="BatchNorm .*depends on how the batch is split"):
        tilecl.GradCache(bn, mini_batch_size=4).embed(images())
    bn.eval()
    (z,) = tilecl.GradCache(bn, mini_batch_size=4).embed(images())  # running statistics: per sample
    z.sum().backward()
    no_stats = nn.Sequential(nn.BatchNorm1d(6, track_running_stats=False)).double().eval()
    with pytest.raises(RuntimeError, match="track_running_stats=False"):
        tilecl.GradCache(no_stats, mini_batch_size=4).embed(images())


def test_backward_twice_raises_and_leaves_the_gradients():
    tower = MLP()
    (z,) = tilecl.GradCache(tower, mini_batch_size=5).embed(images())
    loss = tilecl.uniformity_loss(z)
    loss.backward(retain_graph=True)
    first = grads([tower])
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
    assert_same_grads(grads([tower]), first, rtol=0)


@pytest.mark.parametrize("what", ["tensor", "mask"])
def test_inputs_modified_in_place_before_the_backward_raise(what):
    towers = [MLP(), Bag()]
    x, t = images(), texts()
    za, zb = tilecl.GradCache(towers, mini_batch_size=5).embed(x, t)
    if what == "tensor":
        x.mul_(2)
        match = "input 0 was modified in place"
    else:
        t["attention_mask"][0, 0] = 0
        match = "input 1 \\('attention_mask'\\) was modified in place"
    with pytest.raises(RuntimeError, match=match):
        tilecl.contrastive_loss(za, zb, 10.0).backward()
    assert all(g is None for g in grads(towers)), "nothing may be half-done"


def test_parameters_changed_before_the_backward_raise():
    tower = MLP()
    (z,) = tilecl.GradCache(tower, mini_batch_size=5).embed(images())
    with torch.no_grad():
        tower.net[0].weight.add_(1.0)  # an optimizer step between the passes
    with pytest.raises(RuntimeError, match="parameters or train/eval mode changed"):
        z.sum().backward()


def test_tower_outputs_are_checked():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    class Pooled(nn.Module):
        def forward(self, x):
            return x.sum(0)

    with pytest.raises(TypeError, match="tower 0 must return a tensor"):
        tilecl.GradCache(Pair(), mini_batch_size=5).embed(images())
    with pytest.raises(ValueError, match="one row per input row"):
        tilecl.GradCache(Pooled(), mini_batch_size=5).embed(images())


@pytest.mark.filterwarnings(r"ignore:Using backward\(\) with create_graph=True")
def test_create_graph_is_refused():
    (z,) = tilecl.GradCache(MLP(), mini_batch_size=5).embed(images())
    with pytest.raises(RuntimeError, match="create_graph"):
        z.pow(2).sum().backward(create_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("offload", [False, True], ids=["kept", "offload"])
def test_cuda_dropout_and_offload_give_the_plain_gradients(offload):
    """The CUDA generator is saved and replayed too; offloaded inputs come back to the tower's device."""
    torch.manual_seed(0)
    towers = [MLP(dropout=0.3).cuda(), Bag(dropout=0.2).cuda()]
    inputs = [images(), texts()]  # on CPU: moved per mini-batch (offload) or whole (kept)
    cache = tilecl.GradCache(towers, mini_batch_size=5, offload_inputs=offload)
    on_device = [images().cuda(), {k: v.cuda() for k, v in texts().items()}]
    torch.manual_seed(3)
    tilecl.contrastive_loss(*plain_embed(towers, on_device, cache.mini_batches(*inputs)), 10.0).backward()
    want = grads(towers)
    zero(towers)
    torch.manual_seed(3)
    za, zb = cache.embed(*inputs)
    after_embed = torch.cuda.get_rng_state()
    tilecl.contrastive_loss(za, zb, 10.0).backward()
    assert torch.equal(torch.cuda.get_rng_state(), after_embed)
    assert_same_grads(grads(towers), want)


# --- across ranks, without ranks: FSDP2's switch and DeepSpeed's refusal (real DDP and FSDP2 with gloo in
# tests/test_gradcache_distributed.py) ---


class FakeFSDP2(MLP):
    """Stands in for a ``fully_shard`` module: records the gradient-sync switch in force at each forward."""

    def __init__(self):
        super().__init__()
        self.sync = True
        self.seen: list[bool] = []
        self.switches: list[bool] = []

    def set_requires_gradient_sync(self, requires_gradient_sync, *, recurse=True):
        self.switches.append(requires_gradient_sync)
        self.sync = requires_gradient_sync

    def _get_fsdp_state(self):  # FSDP2's private state, as GradCache reads it
        return types.SimpleNamespace(_fsdp_param_groups=[types.SimpleNamespace(reduce_grads=self.sync)])

    def forward(self, x):
        if torch.is_grad_enabled():
            self.seen.append(self.sync)
        return super().forward(x)


@pytest.mark.parametrize("nested", [False, True], ids=["tower", "inside"])
def test_fsdp2_syncs_only_the_last_re_embedding_of_a_shared_tower(nested):
    fsdp = FakeFSDP2()
    tower = nn.Sequential(fsdp) if nested else fsdp
    other = FakeFSDP2()
    cache = tilecl.GradCache([tower, tower, other], mini_batch_size=5)  # 3 mini-batches per input
    x = [images(seed=s) for s in (1, 2, 3)]
    za, zb, zc = cache.embed(*x)
    assert fsdp.seen == [] and fsdp.switches == []
    (tilecl.contrastive_loss(za, zb, 10.0) + tilecl.uniformity_loss(zc)).backward()
    assert fsdp.seen == [False] * 5 + [True], "one reduction, in the shared tower's last backward"
    assert fsdp.switches == [False, True] * 5
    assert other.seen == [False, False, True]
    got = grads([tower, other])
    zero([tower, other])
    za, zb, zc = plain_embed([tower, tower, other], x, cache.mini_batches(*x))
    (tilecl.contrastive_loss(za, zb, 10.0) + tilecl.uniformity_loss(zc)).backward()
    assert_same_grads(got, grads([tower, other]))

    # the caller accumulating over steps (sync off): no re-embedding turns it on, and it stays off
    fsdp.set_requires_gradient_sync(False)
    fsdp.seen.clear()
    other.seen.clear()
    za, zb, _ = cache.embed(*x)
    tilecl.contrastive_loss(za, zb, 10.0).backward()  # tower `other` gets no gradient: not re-embedded
    assert fsdp.seen == [False] * 6 and fsdp.sync is False
    assert other.seen == []


def test_fsdp2_sync_is_restored_when_a_re_embedding_raises():
    class Failing(FakeFSDP2):
        def forward(self, x):
            if torch.is_grad_enabled():
                raise RuntimeError("boom")
            return super().forward(x)

    tower = Failing()
    (z,) = tilecl.GradCache(tower, mini_batch_size=5).embed(images())
    with pytest.raises(RuntimeError, match="boom"):
        z.sum().backward()
    assert tower.sync is True


def deepspeed_engine(stage, overlap=False, base=None):
    """A class named and placed as deepspeed's engine (deepspeed is not installed, nor imported)."""

    def __init__(self):
        nn.Module.__init__(self)
        self.module = Counting()

    engine = type(
        "DeepSpeedEngine",
        (nn.Module,),
        {
            "__module__": "deepspeed.runtime.engine",
            "__init__": __init__,
            "forward": lambda self, x: self.module(x),
            "zero_optimization_stage": lambda self: stage,
            "zero_overlap_comm": lambda self: overlap,
        },
    )
    return engine


@pytest.mark.parametrize(
    "stage, overlap, refused",
    [(0, False, False), (1, False, False), (1, True, True), (2, False, True), (3, False, True)],
)
def test_deepspeed_engines_reducing_in_the_backward_are_refused_at_embed(stage, overlap, refused):
    engine = deepspeed_engine(stage, overlap)()
    pipeline = type("PipelineEngine", (type(engine),), {"__module__": "deepspeed.runtime.pipe.engine"})()
    for tower in (engine, nn.Sequential(engine), pipeline):
        cache = tilecl.GradCache([MLP(), tower], mini_batch_size=5)
        if not refused:
            za, zb = cache.embed(images(), images(seed=2))
            tilecl.contrastive_loss(za, zb, 10.0).backward()
            continue
        with pytest.raises(RuntimeError, match=f"tower 1 .*ZeRO stage {stage}.*Gradient computed twice"):
            cache.embed(images(), images(seed=2))
        assert getattr(tower.module if hasattr(tower, "module") else tower[0].module, "count", 0) == 0


def test_zero3_partitioned_parameters_are_refused():
    tower = MLP()
    tower.net[0].weight.ds_id = 0  # what ZeRO stage 3 sets on every parameter it partitions
    with pytest.raises(RuntimeError, match="tower 0 .*ZeRO stage 3"):
        tilecl.GradCache(tower, mini_batch_size=5).embed(images())
    # a class that merely shares the name, outside deepspeed, is no engine
    lookalike = type("DeepSpeedEngine", (MLP,), {"zero_optimization_stage": lambda self: 3})()
    (z,) = tilecl.GradCache(lookalike, mini_batch_size=5).embed(images())
    z.sum().backward()


class ApexLikeSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm that is none of torch's public classes (as apex's SyncBatchNorm)."""

    def _check_input_dim(self, x):
        pass


class RunningMean(nn.Module):
    """Not a norm, yet it tracks a running statistic in train mode (each forward updates it)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(6, dtype=torch.float64))

    def forward(self, x):
        if self.training:
            self.running_mean.mul_(0.9).add_(0.1 * x.mean(0))
        return x


@pytest.mark.parametrize(
    "module, match",
    [
        (ApexLikeSyncBatchNorm(6).double(), "BatchNorm using batch statistics"),
        (
            nn.Sequential(
                nn.Unflatten(1, (3, 2)), nn.InstanceNorm1d(3, track_running_stats=True), nn.Flatten()
            ),
            "tracks running statistics",
        ),
        (RunningMean(), "tracks running statistics"),
    ],
    ids=["batchnorm-subclass", "instancenorm-running-stats", "running-buffer"],
)
def test_every_module_whose_output_or_state_depends_on_the_split_is_refused(module, match):
    tower = nn.Sequential(module, nn.Linear(6, D).double())
    state = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(RuntimeError, match=match):
        tilecl.GradCache(tower, mini_batch_size=4).embed(images())
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in state.items()), "nothing ran"
    tower.eval()  # running statistics read, not updated: per sample
    (z,) = tilecl.GradCache(tower, mini_batch_size=4).embed(images())
    tilecl.uniformity_loss(z).backward()


class Encoder(nn.Module):
    """A text tower whose eval-mode forward under no_grad takes nn.TransformerEncoder's fast path
    (nested tensors: 0 at padded positions), which computes something else than with gradients."""

    def __init__(self, nested: bool):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(20, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=nested)

    def forward(self, input_ids, attention_mask):
        # mean over every position, padded ones included: what the fast path changes
        return self.encoder(self.embedding(input_ids), src_key_padding_mask=attention_mask == 0).mean(1)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_a_re_embedding_that_differs_from_the_cached_embedding_raises():
    """The backward's re-embedding must reproduce what the loss saw; a tower that computes otherwise
    with gradients (here the encoder's no-grad fast path) would give the gradient of another function."""
    tower = Encoder(nested=True).eval()
    (z,) = tilecl.GradCache(tower, mini_batch_size=4).embed(texts())
    with pytest.raises(RuntimeError, match="tower 0's re-embedding of rows 0:4 differs .*TransformerEncoder"):
        tilecl.uniformity_loss(z).backward()
    exact = Encoder(nested=False).eval()
    (z,) = tilecl.GradCache(exact, mini_batch_size=4).embed(texts())
    tilecl.uniformity_loss(z).backward()
    (plain,) = plain_embed([exact], [texts()], [[(0, 4), (4, 8), (8, 12)]])
    want = torch.cat(
        [g.flatten() for g in torch.autograd.grad(tilecl.uniformity_loss(plain), list(exact.parameters()))]
    )
    got = torch.cat([p.grad.flatten() for p in exact.parameters()])
    assert float((got - want).norm() / want.norm()) <= 1e-4  # float32, fused and unfused kernels


def test_a_backward_restricted_to_some_tensors_is_refused():
    """``backward(inputs=...)`` and ``autograd.grad`` would skip the re-embedding (every ``.grad``
    left None, no error); they raise instead."""
    tower = MLP()
    (z,) = tilecl.GradCache(tower, mini_batch_size=5).embed(images())
    loss = tilecl.uniformity_loss(z)
    with pytest.raises(RuntimeError, match=r"backward\(inputs=\.\.\.\) and torch.autograd.grad"):
        loss.backward(inputs=list(tower.parameters()), retain_graph=True)
    with pytest.raises(RuntimeError, match=r"backward\(inputs=\.\.\.\) and torch.autograd.grad"):
        torch.autograd.grad(loss, list(tower.parameters()), retain_graph=True)
    assert all(g is None for g in grads([tower]))
    loss.backward()  # the full backward still runs
    assert all(g is not None for g in grads([tower]))


def test_embed_under_torch_compile_fullgraph_is_refused_clearly():
    tower = MLP()
    cache = tilecl.GradCache([tower, tower], mini_batch_size=5)

    def step(x):
        za, zb = cache.embed(x, x.clone())
        return tilecl.contrastive_loss(za, zb, 2.0)

    with pytest.raises(Exception, match="GradCache.embed cannot run inside torch.compile"):
        torch.compile(step, fullgraph=True)(images())
    # without fullgraph it is a graph break, run eagerly: the same loss (the compiled loss takes the
    # tiled ops, the eager one the one-tile path: equal to float64 rounding)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(step)(images()), step(images()), rtol=1e-12, atol=0)


def test_progress_bars_cover_both_passes(capsys):
    """``progress=True``: a bar over embed()'s mini-batches and one over the backward's re-embedding
    (the longer pass, which ran silent), each to its total."""
    towers = [MLP(), MLP()]
    za, zb = tilecl.GradCache(towers, mini_batch_size=5, progress=True).embed(images(), images(seed=2))
    tilecl.contrastive_loss(za, zb, 10.0).backward()
    err = capsys.readouterr().err
    assert "GradCache: embed" in err and "6/6" in err  # 2 towers x 3 mini-batches of 5, 5, 2 rows
    assert "GradCache: re-embed (backward)" in err
    with pytest.raises(TypeError, match="progress must be True or False"):
        tilecl.GradCache(MLP(), mini_batch_size=5, progress="yes")


class ClipLike(nn.Module):
    """open_clip's CLIP surface: encode_image / encode_text and a log-scale, no tower modules."""

    def __init__(self):
        super().__init__()
        self.visual, self.text = MLP(), Bag()
        self.logit_scale = nn.Parameter(torch.tensor(2.3, dtype=torch.float64))

    def encode_image(self, x):
        return self.visual(x)

    def encode_text(self, input_ids, attention_mask):
        return self.text(input_ids, attention_mask)


def test_bound_methods_of_a_model_are_towers():
    """``GradCache([model.encode_image, model.encode_text])``: no wrapper modules; the towers' and the
    scale's gradients are the plain step's."""
    model = ClipLike()
    x, t = images(), texts()
    za, zb = tilecl.GradCache([model.encode_image, model.encode_text], mini_batch_size=5).embed(x, t)
    tilecl.ClipLoss()(za, zb, model.logit_scale.exp()).backward()
    got = grads([model])
    model.zero_grad(set_to_none=True)
    spans = [[(0, 5), (5, 10), (10, 12)]] * 2
    pa, pb = plain_embed([model.encode_image, model.encode_text], [x, t], spans)
    tilecl.ClipLoss()(pa, pb, model.logit_scale.exp()).backward()
    assert_same_grads(got, grads([model]))
    with pytest.raises(TypeError, match="tower 0 must be an nn.Module or a bound method of one"):
        tilecl.GradCache([lambda x: x], mini_batch_size=5)


def test_batch_norm_per_mini_batch_is_accum_freqs_computation():
    """``batch_norm="per_mini_batch"`` (open_clip's ``accum_freq`` semantics, for ResNet towers): the
    gradients and running statistics of embedding each mini-batch on its own, with autograd — the
    statistics updated once per mini-batch, not again by the re-embedding."""
    import copy

    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(6, D), nn.BatchNorm1d(D), nn.Tanh()).double()
    plain = copy.deepcopy(bn)
    (z,) = tilecl.GradCache(bn, mini_batch_size=5, batch_norm="per_mini_batch").embed(images())
    tilecl.uniformity_loss(z).backward()
    (pz,) = plain_embed([plain], [images()], [[(0, 5), (5, 10), (10, 12)]])
    tilecl.uniformity_loss(pz).backward()
    assert_same_grads(grads([bn]), grads([plain]))
    for (name, got), want in zip(bn.named_buffers(), plain.buffers()):
        assert torch.equal(got, want), name  # running mean, var and the count: 3 updates, as plain
    assert int(bn[1].num_batches_tracked) == 3
    with pytest.raises(ValueError, match="batch_norm must be one of"):
        tilecl.GradCache(bn, mini_batch_size=5, batch_norm="sync")
