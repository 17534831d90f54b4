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
import itertools
import math
import warnings
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

    def distill(z1, z2, scale):
        # a teacher of another width; both losses in one value (distinct weights keep both visible)
        teacher = (inputs["u1"][:, :3], inputs["u2"][:, :3])
        contrastive, distilled = tilecl.distill_clip_loss(
            z1, z2, scale, *teacher, 2.5, backend="torch", **dist_kwargs
        )
        return contrastive + 3 * distilled

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

    def mnrl_gte_hardness(a, positives, u1):
        # the GTE joint softmax over all four directions, hardness-weighted negatives
        from tilecl.integrations.sentence_transformers import MultipleNegativesRankingLoss

        loss = MultipleNegativesRankingLoss(
            nn.Identity(), gather_across_devices="process_group" in dist_kwargs,
            directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
            hardness_mode="all_negatives", hardness_strength=2.0,
            dist_impl=dist_kwargs.get("dist_impl", "gather"), backend="torch",
        )  # fmt: skip
        return loss.compute_loss_from_embeddings([a, positives, u1])

    return {
        "MNRL hard negatives": (mnrl_hard_negatives, ("a", "positives", "u1")),
        "MNRL GTE joint hardness": (mnrl_gte_hardness, ("a", "positives", "u1")),
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
        "distill": (distill, ("z1", "z2", "scale")),
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
        # DDP's reducer holds the group and gloo work; dropped (and its cycles collected) while the
        # group is alive, not at interpreter shutdown, where its threads' teardown aborts the process
        del ddp, loss
        gc.collect()
    torch.save(grads, f"{out}.{rank}")
    dist.barrier()
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


#: (N, hard negatives) per rank: uneven batches, and (slow) a rank of a single row
UNEVEN = {
    "2 ranks": [(2, 1), (6, 3)],
    "3 ranks, one row on one": [(4, 2), (1, 0), (5, 1)],
    "4 ranks, an empty one": [(0, 0), (5, 2), (17, 3), (64, 1)],
}


def uneven_batch(layout: list[tuple[int, int]], seed: int = 3) -> dict[str, torch.Tensor]:
    """Every input of every case for ranks holding ``layout``'s (N, hard negatives) each, concatenated."""
    gen = torch.Generator().manual_seed(seed)
    ns, ms = [n for n, _ in layout], [n + extra for n, extra in layout]
    n, m = sum(ns), sum(ms)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    starts = [sum(ms[:r]) for r in range(len(layout))]
    local_labels = [(torch.arange(nr) * 3 + r) % mr for r, (nr, mr) in enumerate(zip(ns, ms))]
    return {
        **{k: randn(n, D) for k in ("a", "positives", "z1", "z2", "u1", "u2")},
        "b": randn(m, D),
        "log_u_rows": randn(n) - 2,
        "log_u_cols": randn(n) - 2,
        "local_labels": torch.cat(local_labels),
        "pair_cols": torch.cat([start + torch.arange(nr) for start, nr in zip(starts, ns)]),
        "labels": torch.cat([start + x for start, x in zip(starts, local_labels)]),
        "row_groups": torch.randint(0, 6, (n,), generator=gen),
        "col_groups": torch.randint(0, 6, (m,), generator=gen),
        "weights": torch.rand(n, generator=gen, dtype=torch.float64).index_fill_(0, torch.tensor([1]), 0.0),
    }


def uneven_shard(x: torch.Tensor, rank: int, sizes: list[int]) -> torch.Tensor:
    start = sum(sizes[:rank])
    return x[start : start + sizes[rank]].clone()


def _uneven_worker(rank: int, world: int, store: str, out: str, layout: list, impl: str) -> None:
    _init(rank, world, store)
    everything = uneven_batch(layout)
    ns, ms = [n for n, _ in layout], [n + extra for n, extra in layout]
    inputs = {k: uneven_shard(x, rank, ms if k in ("b", "col_groups") else ns) for k, x in everything.items()}
    inputs["scale"] = torch.tensor(SCALE, dtype=torch.float64)
    inputs["bias"] = torch.tensor(BIAS, dtype=torch.float64)
    labels = {"pair": torch.arange(ns[rank]), "default": None, "custom": inputs["local_labels"]}
    results = evaluate(inputs, labels, process_group=dist.group.WORLD, dist_impl=impl)
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "layout",
    ["2 ranks"] + [pytest.param(name, marks=pytest.mark.slow) for name in list(UNEVEN)[1:]],
)
def test_uneven_batches_give_the_loss_of_the_concatenated_batch(layout, impl, tmp_path):
    """Every loss, both exchanges, ranks holding different numbers of rows and hard negatives: the
    global loss of the concatenation on every rank, and each rank's gradients ``world ×`` the global
    loss's with respect to its own rows (DDP's average is then the single-process gradient)."""
    sizes = UNEVEN[layout]
    world = len(sizes)
    everything = uneven_batch(sizes)
    inputs = dict(everything, scale=torch.tensor(SCALE, dtype=torch.float64))
    inputs["bias"] = torch.tensor(BIAS, dtype=torch.float64)
    pair = everything["pair_cols"]
    reference = evaluate(inputs, {"pair": pair, "default": pair, "custom": everything["labels"]})
    ns, ms = [n for n, _ in sizes], [n + extra for n, extra in sizes]
    spawned = spawn(_uneven_worker, world, tmp_path, sizes, impl)
    for case, (ref_loss, ref_grads) in reference.items():
        for rank, res in enumerate(spawned):
            loss, grads = res[case]
            assert_rel(loss, ref_loss, 1e-10, f"{case} loss on rank {rank}")
            for name, grad in grads.items():
                if name in REPLICATED:
                    continue
                want = uneven_shard(ref_grads[name], rank, ms if name == "b" else ns)
                assert grad.shape == want.shape, f"{case} grad {name} on rank {rank}"
                if want.numel():
                    assert_rel(grad / world, want, 1e-10, f"{case} grad {name} on rank {rank}")
        for name in REPLICATED & set(ref_grads):
            average = sum(res[case][1][name] for res in spawned) / world
            assert_rel(average, ref_grads[name], 1e-10, f"{case} grad {name} (rank average)")


def _bad_input_worker(rank: int, world: int, store: str, out: str, dist_impl: str) -> None:
    _init(rank, world, store)
    group = dist.group.WORLD
    module = tilecl.GammaContrastiveLoss(10, process_group=group, dist_impl=dist_impl).double()
    n = 3 if rank == 0 else 5  # uneven: the same errors whatever each rank holds
    a = torch.randn(n, D, dtype=torch.float64)
    index = torch.arange(n) + (20 if rank == 1 else 0)  # rank 1 is out of range
    odd = rank == 1  # every call below is well-formed on rank 0 only
    on = dict(process_group=group, dist_impl=dist_impl)

    def clip(**kw):
        return lambda: tilecl.contrastive_loss(a, a.clone(), 1.0, **{**on, **kw})

    negative = torch.ones(n, dtype=torch.float64).index_fill_(0, torch.tensor([1]), -1.0 if odd else 1.0)
    calls = {
        "gamma index": lambda: module(a, a.clone(), index, 1.0),
        "nt-xent temperature": lambda: tilecl.nt_xent_loss(a, a, -1.0 if odd else 0.5, **on),
        "reduction": clip(reduction="sum" if odd else "mean"),
        "reduction none": clip(reduction="none" if odd else "mean"),
        "feature dimension": lambda: tilecl.contrastive_loss(
            a[:, : 2 if odd else D], a[:, : 2 if odd else D].clone(), 1.0, **on
        ),
        "symmetric": clip(symmetric=not odd),
        "dist_impl": clip(dist_impl=IMPLS[1 - IMPLS.index(dist_impl)] if odd else dist_impl),
        "unavailable backend": clip(backend="cuda" if odd else "torch"),  # a RuntimeError on rank 1
        "ClipLoss pair": lambda: tilecl.ClipLoss(rank=rank, world_size=world, dist_impl=dist_impl)(
            a, a[:, :2] if odd else a, 1.0
        ),
        "uniformity t": lambda: uniformity_loss(a, 3.0 if odd else 2.0, **on),
        "sigmoid bias": lambda: tilecl.sigmoid_loss(a, a.clone(), 1.0, math.nan if odd else 0.0, **on),
        "supcon labels": lambda: tilecl.supcon_loss(
            a, torch.arange(n, dtype=torch.float64 if odd else torch.int64), 0.1, **on
        ),
        # group ids or weights on one rank only: different tensors would travel, so both raise
        "groups on one rank": clip(
            row_groups=torch.arange(n) if odd else None, col_groups=torch.arange(n) if odd else None
        ),
        "weights on one rank": clip(weights=torch.ones(n, dtype=torch.float64) if odd else None),
        "negative weight": clip(weights=negative),
        # the teacher's gradient is computed on one process only
        "teacher requires grad": lambda: tilecl.distill_clip_loss(
            a, a.clone(), 1.0, a.clone().requires_grad_(odd), a.clone(), 2.0, **on
        ),
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


@pytest.mark.parametrize("dist_impl", IMPLS)
def test_bad_input_on_one_rank_raises_everywhere_and_leaves_memory(dist_impl, tmp_path):
    """No hang and no transport abort: the failing rank raises its own error, the others say so —
    ranks holding different numbers of rows, both exchanges."""
    (m0, unchanged0, freed0), (m1, unchanged1, freed1) = spawn(_bad_input_worker, 2, tmp_path, dist_impl)
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
        "supcon labels",
        "teacher requires grad",
    ):
        assert "another rank" in m0[name], (name, m0[name])
    assert "dist_image_features requires grad" in m1["teacher requires grad"]
    assert "non-negative" in m1["negative weight"]
    # calls that are well-formed on each rank but differ between them: the same error on both
    for name, what in [
        ("reduction", "reduction"),
        ("feature dimension", "D"),
        ("symmetric", "symmetric"),
        ("dist_impl", "dist_impl"),
        ("uniformity t", "t"),
        ("groups on one rank", "masked"),
        ("weights on one rank", "weighted"),
    ]:
        assert m0[name] == m1[name] and f"the same {what}" in m0[name], (name, m0[name], m1[name])
    assert unchanged0 and unchanged1
    assert freed0 and freed1, "a failed call's inputs outlived it (a reference cycle through its exception)"


DEAD_RANK_TIMEOUT_S = 20


def _dead_rank_worker(rank: int, world: int, store: str, out: str, dist_impl: str) -> None:
    """Rank 1 dies once the call's sizes are agreed, inside the exchange of the columns; rank 0 must
    fail, not wait past the group's timeout."""
    import os
    import time

    from tilecl.backends import sharded

    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=DEAD_RANK_TIMEOUT_S),
    )
    if rank == 1:

        def die(*args, **kwargs):
            os._exit(0)

        sharded.gather_plain = die  # the gather's first exchange of features
        sharded.dist.batch_isend_irecv = die  # the ring's
    a = torch.randn(3 + 2 * rank, D, dtype=torch.float64, requires_grad=True)
    start = time.monotonic()
    try:
        tilecl.contrastive_loss(
            a, a.detach().clone(), 2.0, process_group=dist.group.WORLD, dist_impl=dist_impl
        )
        outcome = "no error"
    except Exception as error:  # the transport's error, whatever its type
        outcome = f"{type(error).__name__}: {error}"
    torch.save((outcome, time.monotonic() - start), f"{out}.{rank}")
    os._exit(0)  # no teardown of a group whose peer is gone


@pytest.mark.parametrize("dist_impl", IMPLS)
def test_a_rank_dying_mid_exchange_fails_the_others_within_the_timeout(dist_impl, tmp_path):
    store, out = str(tmp_path / "store"), str(tmp_path / "out")
    mp.spawn(_dead_rank_worker, args=(2, store, out, dist_impl), nprocs=2, join=True)
    outcome, seconds = torch.load(f"{out}.0")
    assert outcome != "no error"
    assert seconds < DEAD_RANK_TIMEOUT_S + 10, (outcome, seconds)


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


def _mesh_worker(rank: int, world: int, store: str, out: str) -> None:
    """A 2×2 mesh ("dp", "tp"): the two ranks of a "tp" row hold the same samples, shard ``rank // 2``."""
    from torch.distributed.device_mesh import init_device_mesh

    _init(rank, world, store)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    everything = global_batch(2)
    a, b = shard(everything["a"], rank // 2, 2), shard(everything["positives"], rank // 2, 2)
    z1, z2 = shard(everything["z1"], rank // 2, 2), shard(everything["z2"], rank // 2, 2)
    calls = {
        "clip gather": lambda x, y: tilecl.contrastive_loss(x, y, SCALE, device_mesh=mesh, mesh_dim="dp"),
        "clip ring, dimension index": lambda x, y: tilecl.contrastive_loss(
            x, y, SCALE, device_mesh=mesh, mesh_dim=0, dist_impl="ring"
        ),
        "ClipLoss": lambda x, y: tilecl.ClipLoss(world_size=2, device_mesh=mesh, mesh_dim="dp")(x, y, SCALE),
        "SigLipLoss": lambda x, y: tilecl.SigLipLoss(device_mesh=mesh, mesh_dim="dp", dist_impl="shift")(
            x, y, SCALE, BIAS
        ),
        "NTXentLoss": lambda x, y: tilecl.NTXentLoss(0.5, device_mesh=mesh, mesh_dim="dp")(x, y),
        "gamma": lambda x, y: tilecl.GammaContrastiveLoss(
            4 * N_PER_RANK, estimator="mean", device_mesh=mesh, mesh_dim="dp"
        ).double()(x, y, torch.arange(N_PER_RANK) + N_PER_RANK * (rank // 2), SCALE),
        # the mistake the mesh avoids: the world group counts every sample twice
        "world group": lambda x, y: tilecl.contrastive_loss(x, y, SCALE, process_group=dist.group.WORLD),
    }
    results = {}
    for name, call in calls.items():
        x, y = (z1, z2) if name == "NTXentLoss" else (a, b)
        x = x.clone().requires_grad_()
        loss = call(x, y)
        (grad,) = torch.autograd.grad(loss, (x,))
        results[name] = (loss.detach(), grad)
    errors = {}
    for name, kwargs in {
        "no mesh_dim on a 2-D mesh": dict(device_mesh=mesh),
        "unknown name": dict(device_mesh=mesh, mesh_dim="pp"),
        "index out of range": dict(device_mesh=mesh, mesh_dim=2),
        "both group and mesh": dict(device_mesh=mesh, mesh_dim="dp", process_group=dist.group.WORLD),
    }.items():
        try:
            tilecl.contrastive_loss(a, b, SCALE, **kwargs)
            errors[name] = "no error"
        except (TypeError, ValueError) as error:
            errors[name] = f"{type(error).__name__}: {error}"
    try:
        tilecl.ClipLoss(world_size=4, device_mesh=mesh, mesh_dim="dp")
        errors["world_size of another group"] = "no error"
    except ValueError as error:
        errors["world_size of another group"] = f"ValueError: {error}"
    torch.save((results, errors), f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_device_mesh_gathers_over_the_data_parallel_dimension_only(tmp_path):
    """Ranks that replicate samples along "tp" see the loss of the two distinct shards, and each
    gets ``dp size ×`` the global loss's gradient of its rows, as a dp-only run would."""
    results = spawn(_mesh_worker, 4, tmp_path)
    everything = global_batch(2)
    a, b, z1, z2 = (everything[k] for k in ("a", "positives", "z1", "z2"))
    a, z1 = a.clone().requires_grad_(), z1.clone().requires_grad_()
    gamma = tilecl.GammaContrastiveLoss(4 * N_PER_RANK, estimator="mean").double()
    reference = {
        "clip": tilecl.contrastive_loss(a, b, SCALE),
        "siglip": tilecl.sigmoid_loss(a, b, SCALE, BIAS),
        "ntxent": tilecl.nt_xent_loss(z1, z2, 0.5),
        "gamma": gamma(a, b, torch.arange(2 * N_PER_RANK), SCALE),
    }
    expected = {"clip gather": "clip", "clip ring, dimension index": "clip", "ClipLoss": "clip"}
    expected.update({"SigLipLoss": "siglip", "NTXentLoss": "ntxent", "gamma": "gamma"})
    for rank, (res, errors) in enumerate(results):
        for name, ref_name in expected.items():
            ref = reference[ref_name]
            leaf = z1 if ref_name == "ntxent" else a
            (ref_grad,) = torch.autograd.grad(ref, (leaf,), retain_graph=True)
            loss, grad = res[name]
            assert_rel(loss, ref.detach(), 1e-10, f"{name} loss on rank {rank}")
            want = shard(ref_grad, rank // 2, 2)
            assert_rel(grad / 2, want, 1e-10, f"{name} grad on rank {rank}")
        assert abs(float(res["world group"][0]) - float(reference["clip"].detach())) > 1e-3
        assert (
            errors["no mesh_dim on a 2-D mesh"].startswith("ValueError")
            and "mesh_dim" in errors["no mesh_dim on a 2-D mesh"]
        )
        assert "'pp'" in errors["unknown name"] and "out of range" in errors["index out of range"]
        assert "not both" in errors["both group and mesh"]
        assert "world_size=4" in errors["world_size of another group"]


def test_mesh_arguments_are_checked_before_any_exchange():
    a = torch.randn(3, D)
    with pytest.raises(ValueError, match="mesh_dim='dp' needs a device_mesh"):
        tilecl.contrastive_loss(a, a, 1.0, mesh_dim="dp")
    with pytest.raises(TypeError, match="device_mesh must be a torch.distributed DeviceMesh"):
        tilecl.sigmoid_loss(a, a, 1.0, 0.0, device_mesh="dp")
    with pytest.raises(TypeError, match="device_mesh"):
        tilecl.ClipLoss(device_mesh=object())


def _queue_worker(rank: int, world: int, store: str, out: str) -> None:
    _init(rank, world, store)
    queue = tilecl.MemoryQueue(7, D, process_group=dist.group.WORLD)
    n = 2 + rank  # uneven
    x = torch.full((n, D), float(rank))
    queue.enqueue(x, torch.arange(n) + 10 * rank)
    bad = x.clone()
    if rank == 1:
        bad[0, 0] = float("inf")  # one rank's non-finite row: no rank writes the step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        queue.enqueue(bad, torch.arange(n))
    try:
        queue.enqueue(x[:, :2] if rank == 0 else x, torch.arange(n))  # bad shape on one rank
        error = "no error"
    except ValueError as failure:
        error = str(failure)
    torch.save((tuple(queue.entries()), len(caught), error), f"{out}.{rank}")
    dist.destroy_process_group()


def test_the_memory_queue_holds_every_ranks_rows_on_every_rank(tmp_path):
    results = spawn(_queue_worker, 2, tmp_path)
    for rank, ((embeddings, ids, _), warned, error) in enumerate(results):
        assert ids.tolist() == [0, 1, 10, 11, 12], rank
        assert embeddings[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
        assert warned == 1 and error != "no error", (rank, error)


def _different_calls_worker(rank: int, world: int, store: str, out: str) -> None:
    """Each rank makes a different call (every ordered pair of losses, queues of different dtypes);
    per-pair weights of different dtypes on the ranks, which are the same call."""
    _init(rank, world, store)
    group = dist.group.WORLD
    n, d = 3, 4
    a = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    classes = torch.arange(n) % 2
    losses = {
        "contrastive": lambda: tilecl.contrastive_loss(a, a.clone(), 2.0, process_group=group),
        "sigmoid": lambda: tilecl.sigmoid_loss(a, a.clone(), 2.0, -1.0, process_group=group),
        "nt_xent": lambda: tilecl.nt_xent_loss(a, a.clone(), 0.5, process_group=group),
        "supcon": lambda: tilecl.supcon_loss(a, classes, 0.1, process_group=group),
        "distill": lambda: tilecl.distill_clip_loss(
            a, a.clone(), 2.0, a.clone(), a.clone(), 3.0, process_group=group
        ),
        "uniformity": lambda: uniformity_loss(a, 2.0, process_group=group),
    }
    messages = {}
    for first, second in itertools.permutations(losses, 2):
        try:
            losses[first if rank == 0 else second]()
            messages[first, second] = "no error"
        except Exception as error:
            messages[first, second] = f"{type(error).__name__}: {error}"
    queue = tilecl.MemoryQueue(8, d, dtype=torch.float32 if rank == 0 else torch.float16, process_group=group)
    try:
        queue.enqueue(a.float(), torch.arange(n))
        messages["queue dtype"] = "no error"
    except Exception as error:
        messages["queue dtype"] = f"{type(error).__name__}: {error}; written {int(queue.step)}"
    # rank 0: 3 rows, float64 weights; rank 1: no rows, float32 weights (torch.ones(0))
    rows = a if rank == 0 else a[:0]
    weights = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64) if rank == 0 else torch.ones(0)
    weighted = tilecl.contrastive_loss(rows, rows.clone(), 2.0, weights=weights, process_group=group)
    torch.save((messages, float(weighted)), f"{out}.{rank}")
    dist.destroy_process_group()


def test_ranks_making_different_calls_raise_the_same_error_and_none_aborts(tmp_path):
    """The agreement's first exchange has one size for every call: two ranks that call different
    losses (or enqueue into queues of different dtypes) both raise, naming what each rank called,
    where a signature of another length would make the transport abort the process."""
    results = spawn(_different_calls_worker, 2, tmp_path)
    (mine, value0), (theirs, value1) = results
    assert mine == theirs
    for (first, second), message in ((k, m) for k, m in mine.items() if isinstance(k, tuple)):
        assert message.startswith("ValueError: the ranks made different calls"), (first, second, message)
    assert "queue_dtype" in mine["queue dtype"] and mine["queue dtype"].endswith("written 0")
    a = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    weights = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    want = tilecl.contrastive_loss(a, a.clone(), 2.0, weights=weights)
    assert value0 == value1 and abs(value0 - float(want)) <= 1e-12 * abs(float(want))
