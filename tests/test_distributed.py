"""The distributed losses with real process groups: 2 and 4 CPU ranks, gloo on loopback.

Each test spawns the ranks; every rank computes its slice of a batch whose
concatenation is known, and the parent compares with the single-process loss
on the concatenated batch (float64, relative error ≤ 1e-10). One spawn per
(world, dist_impl) runs every loss, so the suite stays fast.

Gradient convention checked here (no DDP): each rank's input gradients are
``world ×`` the global loss's gradient w.r.t. its inputs, and the rank-average
of a replicated scale's gradient is the global one; the DDP test checks the
parameters after a real DistributedDataParallel backward.
"""

from __future__ import annotations

import datetime
import functools
import gc
import math
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import tilecl
from tilecl.modality import (
    brownian_bridge_loss,
    feature_separation_loss,
    geometric_consistency_loss,
    uniformity_loss,
)
from utils import assert_rel

N_PER_RANK, EXTRA, D = 5, 2, 4
M_PER_RANK = N_PER_RANK + EXTRA
SCALE = 3.0
BIAS = -2.0
IMPLS = ("gather", "ring")
#: the exchanges of the shared spawn (every loss at once): ring's in make test, gather's in test-fast too
SPAWNED_IMPLS = ["gather", pytest.param("ring", marks=pytest.mark.slow)]
#: inputs every rank holds the same copy of (their gradients are averaged across ranks)
REPLICATED = {"scale", "bias"}
#: open_clip's SigLipLoss(dist_impl=...) name for each exchange
OPEN_CLIP_NAMES = {"gather": "reduce", "ring": "bidir"}


def global_batch(world: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every input of every case, for the concatenated batch (rank r holds rows r·n … (r+1)·n − 1)."""
    gen = torch.Generator().manual_seed(seed)
    n, m = world * N_PER_RANK, world * M_PER_RANK

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    local_labels = [(torch.arange(N_PER_RANK) * 3 + r) % M_PER_RANK for r in range(world)]
    return {
        "a": randn(n, D),
        "b": randn(m, D),  # each rank's b: its N pairs, then its EXTRA hard negatives
        "positives": randn(n, D),
        "log_u_rows": randn(n) - 2,
        "log_u_cols": randn(n) - 2,
        "z1": randn(n, D),
        "z2": randn(n, D),
        "u1": randn(n, D),
        "u2": randn(n, D),
        "local_labels": torch.cat(local_labels),
        "pair_cols": torch.cat([r * M_PER_RANK + torch.arange(N_PER_RANK) for r in range(world)]),
        "labels": torch.cat([r * M_PER_RANK + x for r, x in enumerate(local_labels)]),
        # SigLIP group ids (global): several positives per row, across ranks
        "row_groups": torch.randint(0, 6, (n,), generator=gen),
        "col_groups": torch.randint(0, 6, (m,), generator=gen),
        # per-pair weights, one of them 0
        "weights": torch.rand(n, generator=gen, dtype=torch.float64).index_fill_(0, torch.tensor([1]), 0.0),
    }


def modality_views(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The augmented and independent features ModalityStructureLoss takes, from the batch's tensors."""
    return {
        "z_v_aug": x["a"],
        "z_t_aug": x["positives"],
        "zi_v": x["u1"],
        "zi_t": x["u2"],
        "zi_v_aug": x["u2"].flip(1),
        "zi_t_aug": x["u1"].flip(1),
    }


def shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    per_rank = x.shape[0] // world
    return x[rank * per_rank : (rank + 1) * per_rank].clone()


def cases(inputs: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], **dist_kwargs):
    """name → (loss function of the tensors it differentiates, their names); the same on one rank or many."""
    s = SCALE

    def clip(a, b):
        return tilecl.contrastive_loss(a, b, s, labels=labels["pair"], backend="torch", **dist_kwargs)

    def clip_default_labels(a, b):
        # on a rank: pairs are the first N columns, hard negatives the rest (column stats on part of b)
        return tilecl.contrastive_loss(a, b, s, labels=labels["default"], backend="torch", **dist_kwargs)

    def infonce_sum(a, b, scale):
        return tilecl.contrastive_loss(
            a,
            b,
            scale,
            labels=labels["custom"],
            symmetric=False,
            reduction="sum",
            backend="torch",
            **dist_kwargs,
        )

    def decoupled(a, b, positives):
        return tilecl.contrastive_loss(
            a, b, s, positives=positives, symmetric=False, backend="torch", **dist_kwargs
        )

    def gamma(a, b):
        return tilecl.gamma_contrastive_loss(
            a,
            b,
            inputs["log_u_rows"],
            inputs["log_u_cols"],
            s,
            labels=labels["pair"],
            backend="torch",
            **dist_kwargs,
        )

    def nt_xent(z1, z2):
        return tilecl.nt_xent_loss(z1, z2, 0.5, backend="torch", **dist_kwargs)

    def uniformity(z1):
        return uniformity_loss(z1, 2.0, backend="torch", **dist_kwargs)

    group_only = {k: x for k, x in dist_kwargs.items() if k == "process_group"}

    def geometric(z1, z2, a, positives):
        return geometric_consistency_loss(z1, z2, a, positives, **group_only)

    def bridge(z1, z2, a):
        return brownian_bridge_loss(z1, z2, a, 0.3, **group_only)

    def separation(z1, z2, a, positives, u1, u2):
        return feature_separation_loss(z1, z2, a, positives, u1, u2, 0.2, backend="torch", **dist_kwargs)

    def sigmoid(a, b, scale, bias):
        return tilecl.sigmoid_loss(
            a, b, scale, bias, labels=labels["default"], backend="torch", **dist_kwargs
        )

    def sigmoid_labels_sum(a, b, scale):
        return tilecl.sigmoid_loss(
            a, b, scale, -1.0, labels=labels["custom"], reduction="sum", backend="torch", **dist_kwargs
        )

    def sigmoid_groups(a, b, bias):
        return tilecl.sigmoid_loss(
            a,
            b,
            s,
            bias,
            row_groups=inputs.get("row_groups"),
            col_groups=inputs.get("col_groups"),
            backend="torch",
            **dist_kwargs,
        )

    groups = {"row_groups": inputs.get("row_groups"), "col_groups": inputs.get("col_groups")}

    def clip_masked_weighted(a, b):
        # false negatives are global: a column of another rank in a row's group leaves its softmaxes
        return tilecl.contrastive_loss(
            a, b, s, labels=labels["pair"], weights=inputs.get("weights"), backend="torch", **groups,
            **dist_kwargs,
        )  # fmt: skip

    def clip_default_labels_masked(a, b):
        # the kept (positive) columns are rank-local; with column statistics on part of b the
        # gathered layout moves the hard negatives, and the kept columns must follow
        return tilecl.contrastive_loss(
            a, b, s, labels=labels["default"], backend="torch", **groups, **dist_kwargs
        )

    def nt_xent_masked(z1, z2):
        return tilecl.nt_xent_loss(
            z1, z2, 0.5, groups=inputs.get("row_groups"), weights=inputs.get("weights"), backend="torch",
            **dist_kwargs,
        )  # fmt: skip

    def supcon(z1):
        # classes are global: every rank's samples of a class are positives
        return tilecl.supcon_loss(z1, inputs.get("row_groups"), 0.3, backend="torch", **dist_kwargs)

    def supcon_two_tower(a, b):
        return tilecl.supcon_loss(
            a, inputs.get("row_groups"), 0.3, columns=b, column_labels=inputs.get("col_groups"),
            weights=inputs.get("weights"), backend="torch", **dist_kwargs,
        )  # fmt: skip

    def gamma_masked(a, b):
        return tilecl.gamma_contrastive_loss(
            a, b, inputs["log_u_rows"], inputs["log_u_cols"], s, labels=labels["pair"], backend="torch",
            **groups, **dist_kwargs,
        )  # fmt: skip

    def mnrl_hard_negatives(a, positives, u1):
        # sentence-transformers' MNRL with a hard-negative column: each rank's negatives stay in its
        # gathered block, aligned with their anchors (the loss is the concatenated batch's)
        # imported here: every spawned rank imports this module, and sentence-transformers costs seconds
        from tilecl.integrations.sentence_transformers import MultipleNegativesRankingLoss

        loss = MultipleNegativesRankingLoss(
            nn.Identity(), gather_across_devices="process_group" in dist_kwargs,
            dist_impl=dist_kwargs.get("dist_impl", "gather"), backend="torch",
        )  # fmt: skip
        return loss.compute_loss_from_embeddings([a, positives, u1])

    return {
        "MNRL hard negatives": (mnrl_hard_negatives, ("a", "positives", "u1")),
        "clip masked weighted": (clip_masked_weighted, ("a", "b")),
        "clip default labels masked": (clip_default_labels_masked, ("a", "b")),
        "nt-xent masked weighted": (nt_xent_masked, ("z1", "z2")),
        "supcon": (supcon, ("z1",)),
        "supcon two-tower weighted": (supcon_two_tower, ("a", "b")),
        "gamma masked": (gamma_masked, ("a", "b")),
        "clip": (clip, ("a", "b")),
        "clip default labels": (clip_default_labels, ("a", "b")),
        "infonce labels sum": (infonce_sum, ("a", "b", "scale")),
        "decoupled positives": (decoupled, ("a", "b", "positives")),
        "gamma surrogate": (gamma, ("a", "b")),
        "nt-xent": (nt_xent, ("z1", "z2")),
        "uniformity": (uniformity, ("z1",)),
        "geometric consistency": (geometric, ("z1", "z2", "a", "positives")),
        "brownian bridge": (bridge, ("z1", "z2", "a")),
        "feature separation": (separation, ("z1", "z2", "a", "positives", "u1", "u2")),
        "sigmoid": (sigmoid, ("a", "b", "scale", "bias")),
        "sigmoid labels sum": (sigmoid_labels_sum, ("a", "b", "scale")),
        "sigmoid groups": (sigmoid_groups, ("a", "b", "bias")),
    }


def evaluate(inputs: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], **dist_kwargs) -> dict:
    out = {}
    for name, (fn, wrt) in cases(inputs, labels, **dist_kwargs).items():
        leaves = [inputs[k].clone().requires_grad_() for k in wrt]
        loss = fn(*leaves)
        out[name] = (loss.detach(), dict(zip(wrt, torch.autograd.grad(loss, leaves))))
    return out


def _init(rank: int, world: int, store: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )


def spawn(worker, world: int, tmp_path, *args) -> list:
    store, out = str(tmp_path / "store"), str(tmp_path / "out")
    mp.spawn(worker, args=(world, store, out, *args), nprocs=world, join=True)
    return [torch.load(f"{out}.{r}") for r in range(world)]


GAMMA_STEPS = 2


def gamma_indices(world: int) -> list[torch.Tensor]:
    return [torch.arange(world * N_PER_RANK), torch.arange(world * N_PER_RANK) * 3 % 50]


def run_gamma_module(module, a_all, b_all, indices, rows=slice(None)) -> list[dict]:
    """Two training steps (the second revisits some samples); loss, grads and the memory after each."""
    results = []
    for step, index in enumerate(indices):
        a = (a_all[rows] * (1 + step)).clone().requires_grad_()
        b = b_all[rows].clone().requires_grad_()
        loss = module(a, b, index[rows], 2.0)
        grad_a, grad_b = torch.autograd.grad(loss, (a, b))
        state = {k: t.clone() for k, t in module.state_dict().items()}
        results.append(
            {"loss": loss.detach(), "a": grad_a, "b": grad_b, "infonce": module.last_infonce, **state}
        )
    return results


def _all_losses_worker(rank: int, world: int, store: str, out: str, impl: str) -> None:
    _init(rank, world, store)
    everything = global_batch(world)
    inputs = {
        k: shard(everything[k], rank, world) for k in ("a", "b", "positives", "log_u_rows", "log_u_cols")
    }
    inputs.update({k: shard(everything[k], rank, world) for k in ("z1", "z2", "u1", "u2")})
    inputs.update({k: shard(everything[k], rank, world) for k in ("row_groups", "col_groups", "weights")})
    inputs["scale"] = torch.tensor(SCALE, dtype=torch.float64)
    inputs["bias"] = torch.tensor(BIAS, dtype=torch.float64)
    labels = {
        "pair": torch.arange(N_PER_RANK),
        "default": None,
        "custom": shard(everything["local_labels"], rank, world),
    }
    group = dist.group.WORLD
    results = evaluate(inputs, labels, process_group=group, dist_impl=impl)

    pairs = inputs["b"][:N_PER_RANK]
    results["ClipLoss"] = tilecl.ClipLoss(rank=rank, world_size=world, dist_impl=impl)(
        inputs["a"], pairs, SCALE
    )
    results["NTXentLoss"] = tilecl.NTXentLoss(world_size=world, dist_impl=impl)(inputs["z1"], inputs["z2"])
    siglip = tilecl.SigLipLoss(rank=rank, world_size=world, dist_impl=OPEN_CLIP_NAMES[impl])
    results["SigLipLoss"] = siglip(inputs["a"], pairs, SCALE, BIAS)
    structure = tilecl.ModalityStructureLoss(world_size=world, dist_impl=impl, backend="torch")
    results["ModalityStructureLoss"] = structure(
        inputs["z1"], inputs["z2"], SCALE, **modality_views(inputs), output_dict=True
    )
    gamma_module = tilecl.GammaContrastiveLoss(
        50, gamma=0.5, estimator="mean", process_group=group, dist_impl=impl, backend="torch"
    ).double()
    rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
    pairs_all = everything["b"].view(world, M_PER_RANK, D)[:, :N_PER_RANK].reshape(-1, D)
    results["gamma module"] = run_gamma_module(
        gamma_module, everything["a"], pairs_all, gamma_indices(world), rows
    )
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


@functools.cache
def _spawned(world: int, impl: str, tmp_root: str):
    import pathlib

    path = pathlib.Path(tmp_root) / f"{world}-{impl}"
    path.mkdir()
    return spawn(_all_losses_worker, world, path, impl)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ranks"))
    return lambda world, impl: _spawned(world, impl, root)


@functools.cache
def single_process(world: int) -> dict:
    everything = global_batch(world)
    inputs = dict(everything, scale=torch.tensor(SCALE, dtype=torch.float64))
    inputs["bias"] = torch.tensor(BIAS, dtype=torch.float64)
    pair = everything["pair_cols"]
    return evaluate(inputs, {"pair": pair, "default": pair, "custom": everything["labels"]})


@pytest.mark.parametrize("impl", SPAWNED_IMPLS)
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", list(cases({}, {}).keys()))
def test_every_loss_matches_single_process(case, world, impl, spawned):
    ref_loss, ref_grads = single_process(world)[case]
    for rank, res in enumerate(spawned(world, impl)):
        loss, grads = res[case]
        assert_rel(loss, ref_loss, 1e-10, f"{case} value on rank {rank}")
        for name, grad in grads.items():
            if name in REPLICATED:
                continue
            # convention: each rank holds world x the gradient of the global loss w.r.t. its inputs
            want = shard(ref_grads[name], rank, world)
            assert_rel(grad / world, want, 1e-10, f"{case} grad {name} on rank {rank}")
    for name in REPLICATED & set(ref_grads):
        # a replicated scale or bias: the rank-average (what DDP computes) is the global gradient
        average = sum(res[case][1][name] for res in spawned(world, impl)) / world
        assert_rel(average, ref_grads[name], 1e-10, f"{case} grad {name}")


@pytest.mark.parametrize("impl", SPAWNED_IMPLS)
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_modules_use_the_default_group(world, impl, spawned):
    everything = global_batch(world)
    pairs_all = everything["b"].view(world, M_PER_RANK, D)[:, :N_PER_RANK].reshape(-1, D)
    clip = tilecl.contrastive_loss(everything["a"], pairs_all, SCALE)
    nt_xent = tilecl.nt_xent_loss(everything["z1"], everything["z2"], 0.5)
    structure = tilecl.ModalityStructureLoss(backend="torch")(
        everything["z1"], everything["z2"], SCALE, **modality_views(everything), output_dict=True
    )
    siglip = tilecl.sigmoid_loss(everything["a"], pairs_all, SCALE, BIAS)
    for res in spawned(world, impl):
        assert_rel(res["SigLipLoss"], siglip, 1e-10, "SigLipLoss on every rank")
        assert_rel(res["ClipLoss"], clip, 1e-10, "ClipLoss on every rank")
        assert_rel(res["NTXentLoss"], nt_xent, 1e-10, "NTXentLoss on every rank")
        assert structure.keys() == res["ModalityStructureLoss"].keys()
        for part, value in structure.items():
            assert_rel(res["ModalityStructureLoss"][part], value, 1e-10, f"ModalityStructureLoss {part}")


@pytest.mark.parametrize("impl", SPAWNED_IMPLS)
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_gamma_memory_and_gradients_match_single_process(world, impl, spawned):
    everything = global_batch(world)
    pairs_all = everything["b"].view(world, M_PER_RANK, D)[:, :N_PER_RANK].reshape(-1, D)
    module = tilecl.GammaContrastiveLoss(50, gamma=0.5, estimator="mean", backend="torch").double()
    want = run_gamma_module(module, everything["a"], pairs_all, gamma_indices(world))
    for rank, res in enumerate(spawned(world, impl)):
        rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        for step in range(GAMMA_STEPS):
            got, ref = res["gamma module"][step], want[step]
            assert_rel(got["loss"], ref["loss"], 1e-10, "surrogate on every rank")
            assert_rel(got["infonce"], ref["infonce"], 1e-10, "last_infonce on every rank")
            assert_rel(got["a"] / world, ref["a"][rows], 1e-10, "grad a")
            assert_rel(got["b"] / world, ref["b"][rows], 1e-10, "grad b")
            for key in module.state_dict():
                if ref[key].dtype in (torch.bool, torch.uint8):  # visited flags, generator state
                    assert torch.equal(got[key], ref[key]), key
                else:
                    assert_rel(got[key], ref[key], 1e-12, key)


def _ddp_worker(rank: int, world: int, store: str, out: str) -> None:
    _init(rank, world, store)
    x_all, y_all = global_batch(world, seed=1)["a"], global_batch(world, seed=2)["a"]
    grads = {}
    for impl in IMPLS:
        torch.manual_seed(0)
        model = torch.nn.Linear(D, 3).double()
        log_scale = torch.nn.Parameter(torch.tensor(1.2, dtype=torch.float64))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        x, y = shard(x_all, rank, world), shard(y_all, rank, world)
        loss = tilecl.ClipLoss(rank=rank, world_size=world, dist_impl=impl)(ddp(x), ddp(y), log_scale.exp())
        loss.backward()
        # log_scale is outside DDP: average it as DDP averages the model's gradients
        dist.all_reduce(log_scale.grad)
        log_scale.grad /= world
        grads[impl] = {"loss": loss.detach(), "log_scale": log_scale.grad}
        grads[impl].update({k: p.grad for k, p in model.named_parameters()})
        # a SigLIP step: learnable scale and bias outside DDP, averaged by hand
        model.zero_grad()
        bias = torch.nn.Parameter(torch.tensor(-1.5, dtype=torch.float64))
        log_scale.grad = None
        siglip = tilecl.SigLipLoss(rank=rank, world_size=world, dist_impl=OPEN_CLIP_NAMES[impl])
        loss = siglip(ddp(x), ddp(y), log_scale.exp(), bias)
        loss.backward()
        for p in (log_scale, bias):
            dist.all_reduce(p.grad)
            p.grad /= world
        grads[f"siglip {impl}"] = {"loss": loss.detach(), "log_scale": log_scale.grad, "bias": bias.grad}
        grads[f"siglip {impl}"].update({k: p.grad.clone() for k, p in model.named_parameters()})
    torch.save(grads, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_step_gradients_equal_single_process(tmp_path):
    world = 2
    results = spawn(_ddp_worker, world, tmp_path)
    torch.manual_seed(0)
    model = torch.nn.Linear(D, 3).double()
    log_scale = torch.nn.Parameter(torch.tensor(1.2, dtype=torch.float64))
    x_all, y_all = global_batch(world, seed=1)["a"], global_batch(world, seed=2)["a"]
    loss = tilecl.contrastive_loss(model(x_all), model(y_all), log_scale.exp())
    loss.backward()
    want = {"loss": loss.detach(), "log_scale": log_scale.grad}
    want.update({k: p.grad.clone() for k, p in model.named_parameters()})
    model.zero_grad()
    log_scale.grad = None
    bias = torch.nn.Parameter(torch.tensor(-1.5, dtype=torch.float64))
    siglip = tilecl.sigmoid_loss(model(x_all), model(y_all), log_scale.exp(), bias)
    siglip.backward()
    want_siglip = {"loss": siglip.detach(), "log_scale": log_scale.grad, "bias": bias.grad}
    want_siglip.update({k: p.grad.clone() for k, p in model.named_parameters()})
    for res in results:
        for impl in IMPLS:
            for key, expected in ((impl, want), (f"siglip {impl}", want_siglip)):
                for name, value in expected.items():
                    assert_rel(res[key][name], value, 1e-10, f"{key} {name}")


def _unequal_worker(rank: int, world: int, store: str, out: str) -> None:
    _init(rank, world, store)
    a = torch.randn(3 + rank, D, dtype=torch.float64)
    group = dist.group.WORLD
    labels = torch.arange(3 + rank) % 2
    messages = []
    for impl in IMPLS:
        for call in (
            lambda impl=impl: tilecl.contrastive_loss(a, a.clone(), 1.0, process_group=group, dist_impl=impl),
            lambda impl=impl: tilecl.sigmoid_loss(a, a.clone(), 1.0, process_group=group, dist_impl=impl),
            lambda impl=impl: tilecl.nt_xent_loss(a, a.clone(), process_group=group, dist_impl=impl),
            lambda impl=impl: tilecl.supcon_loss(a, labels, process_group=group, dist_impl=impl),
            lambda impl=impl: uniformity_loss(a, process_group=group, dist_impl=impl),
            lambda: geometric_consistency_loss(a, a.clone(), process_group=group),
        ):
            try:
                call()
                messages.append("no error")
            except ValueError as error:
                messages.append(str(error))
    torch.save(messages, f"{out}.{rank}")
    dist.destroy_process_group()


def test_unequal_batches_raise_the_same_error_on_every_rank(tmp_path):
    """Every loss, both exchanges: the same error, naming the sizes, before anything is exchanged."""
    messages = spawn(_unequal_worker, 2, tmp_path)
    assert messages[0] == messages[1]
    assert all("equal (N, M) batch sizes" in m for m in messages[0][:4])
    assert all("equal (N" in m and "batch sizes" in m for m in messages[0])
    assert "got [(3, 3), (4, 4)]" in messages[0][0] and "got [3, 4]" in messages[0][4]


def _bad_input_worker(rank: int, world: int, store: str, out: str) -> None:
    _init(rank, world, store)
    group = dist.group.WORLD
    module = tilecl.GammaContrastiveLoss(10, process_group=group).double()
    a = torch.randn(3, D, dtype=torch.float64)
    index = torch.tensor([0, 1, 2]) + (20 if rank == 1 else 0)  # rank 1 is out of range
    odd = rank == 1  # every call below is well-formed on rank 0 only

    def clip(**kw):
        return lambda: tilecl.contrastive_loss(a, a.clone(), 1.0, process_group=group, **kw)

    calls = {
        "gamma index": lambda: module(a, a.clone(), index, 1.0),
        "nt-xent temperature": lambda: tilecl.nt_xent_loss(a, a, -1.0 if odd else 0.5, process_group=group),
        "reduction": clip(reduction="sum" if odd else "mean"),
        "reduction none": clip(reduction="none" if odd else "mean"),
        "feature dimension": lambda: tilecl.contrastive_loss(
            a[:, : 2 if odd else D], a[:, : 2 if odd else D].clone(), 1.0, process_group=group
        ),
        "symmetric": clip(symmetric=not odd),
        "dist_impl": clip(dist_impl="ring" if odd else "gather"),
        "unavailable backend": clip(backend="cuda" if odd else "torch"),  # a RuntimeError on rank 1
        "ClipLoss pair": lambda: tilecl.ClipLoss(rank=rank, world_size=world)(a, a[:, :2] if odd else a, 1.0),
        "uniformity t": lambda: uniformity_loss(a, 3.0 if odd else 2.0, process_group=group),
        "sigmoid bias": lambda: tilecl.sigmoid_loss(
            a, a.clone(), 1.0, math.nan if odd else 0.0, process_group=group
        ),
        # group ids or weights on one rank only: different tensors would travel, so both raise
        "groups on one rank": clip(
            row_groups=torch.arange(3) if odd else None, col_groups=torch.arange(3) if odd else None
        ),
        "weights on one rank": clip(weights=torch.ones(3, dtype=torch.float64) if odd else None),
        "negative weight": clip(weights=torch.tensor([1.0, -1.0 if odd else 1.0, 1.0], dtype=torch.float64)),
    }
    messages = {}
    for name, call in calls.items():
        try:
            call()
            messages[name] = "no error"
        except Exception as error:
            messages[name] = f"{type(error).__name__}: {error}"
    freed = _a_failed_call_keeps_nothing_alive(group, odd)
    torch.save((messages, not module.visited_rows.any(), freed), f"{out}.{rank}")
    dist.destroy_process_group()


def _a_failed_call_keeps_nothing_alive(group, odd: bool) -> bool:
    """With the garbage collector off, the inputs of a call that raised are freed as soon as the
    caller drops them: no reference cycle through the raised exception keeps them, or the group,
    alive until a collection that may come only at interpreter shutdown (where tearing down
    gloo's threads aborts the process)."""
    gc.collect()
    gc.disable()
    try:
        x = torch.randn(3, D, dtype=torch.float64)
        alive = weakref.ref(x)
        try:
            tilecl.nt_xent_loss(x, x.clone(), -1.0 if odd else 0.5, process_group=group)
        except ValueError:
            pass
        del x
        return alive() is None
    finally:
        gc.enable()


def test_bad_input_on_one_rank_raises_everywhere_and_leaves_memory(tmp_path):
    """No hang and no transport abort: the failing rank raises its own error, the others say so."""
    (m0, unchanged0, freed0), (m1, unchanged1, freed1) = spawn(_bad_input_worker, 2, tmp_path)
    assert "index must lie in" in m1["gamma index"] and "temperature" in m1["nt-xent temperature"]
    assert "'mean' or 'sum'" in m1["reduction none"] and "backend='cuda'" in m1["unavailable backend"]
    assert "image_features and text_features" in m1["ClipLoss pair"]
    assert "logit_bias must be finite" in m1["sigmoid bias"]
    for name in (
        "gamma index",
        "nt-xent temperature",
        "reduction none",
        "unavailable backend",
        "ClipLoss pair",
        "sigmoid bias",
        "negative weight",
    ):
        assert "another rank" in m0[name], (name, m0[name])
    assert "non-negative" in m1["negative weight"]
    # calls that are well-formed on each rank but differ between them: the same error on both
    for name, what in [
        ("reduction", "reduction"),
        ("feature dimension", "D"),
        ("symmetric", "columns_with_statistics"),
        ("dist_impl", "dist_impl"),
        ("uniformity t", "t"),
        ("groups on one rank", "masked"),
        ("weights on one rank", "weighted"),
    ]:
        assert m0[name] == m1[name] and f"the same {what}" in m0[name], (name, m0[name], m1[name])
    assert unchanged0 and unchanged1
    assert freed0 and freed1, "a failed call's inputs outlived it (a reference cycle through its exception)"


def _subgroup_worker(rank: int, world: int, store: str, out: str) -> None:
    """Two groups whose local ranks differ from the global ones ({0, 2} and {1, 3}): ring peers map right."""
    _init(rank, world, store)
    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]  # every rank creates every group
    group = groups[rank % 2]
    everything = global_batch(world)
    a, b = shard(everything["a"], rank, world), shard(everything["b"], rank, world)
    results = {}
    for impl in IMPLS:
        a_leaf = a.clone().requires_grad_()
        loss = tilecl.contrastive_loss(a_leaf, b, SCALE, backend="torch", process_group=group, dist_impl=impl)
        (grad_a,) = torch.autograd.grad(loss, (a_leaf,))
        results[impl] = (loss.detach(), grad_a)
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_subgroups_with_their_own_rank_numbering(tmp_path):
    world = 4
    results = spawn(_subgroup_worker, world, tmp_path)
    everything = global_batch(world)
    for members in ([0, 2], [1, 3]):
        a = torch.cat([shard(everything["a"], r, world) for r in members]).requires_grad_()
        b = torch.cat([shard(everything["b"], r, world) for r in members])
        labels = torch.cat([i * M_PER_RANK + torch.arange(N_PER_RANK) for i in range(len(members))])
        ref = tilecl.contrastive_loss(a, b, SCALE, labels=labels, backend="torch")
        (ref_grad,) = torch.autograd.grad(ref, (a,))
        for i, rank in enumerate(members):
            for impl in IMPLS:
                loss, grad_a = results[rank][impl]
                assert_rel(loss, ref.detach(), 1e-10, f"{impl} subgroup loss on rank {rank}")
                want = ref_grad[i * N_PER_RANK : (i + 1) * N_PER_RANK]
                assert_rel(grad_a / len(members), want, 1e-10, f"{impl} subgroup grad on rank {rank}")
