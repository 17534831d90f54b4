"""The distributed loss with real process groups: 2 and 4 CPU ranks, gloo on loopback.

Each test spawns the ranks; every rank computes its slice of a batch whose
concatenation is known, and the parent compares with the single-process loss
on the concatenated batch (float64, relative error ≤ 1e-10).
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tilecl
from conftest import assert_rel
from tilecl.distributed import gather_contrastive_loss

N_PER_RANK, EXTRA, D = 5, 2, 4


def global_batch(world: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(world * N_PER_RANK, D, generator=gen, dtype=torch.float64)
    b = torch.randn(world * (N_PER_RANK + EXTRA), D, generator=gen, dtype=torch.float64)
    return a, b


def _init(rank: int, world: int, store: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )


def _loss_worker(rank: int, world: int, store: str, out: str, symmetric: bool) -> None:
    _init(rank, world, store)
    a_all, b_all = global_batch(world)
    m = N_PER_RANK + EXTRA
    a = a_all[rank * N_PER_RANK : (rank + 1) * N_PER_RANK].clone().requires_grad_()
    b = b_all[rank * m : (rank + 1) * m].clone().requires_grad_()
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    # the functional entry point routes to the gather implementation
    loss = tilecl.contrastive_loss(
        a, b, scale, symmetric=symmetric, backend="torch", process_group=dist.group.WORLD
    )
    loss.backward()
    torch.save({"loss": loss.detach(), "a": a.grad, "b": b.grad, "s": scale.grad}, f"{out}.{rank}")
    dist.destroy_process_group()


def _unequal_worker(rank: int, world: int, store: str, out: str) -> None:
    _init(rank, world, store)
    a = torch.randn(3 + rank, D, dtype=torch.float64)
    try:
        gather_contrastive_loss(a, a.clone(), 1.0)
        message = "no error"
    except ValueError as error:
        message = str(error)
    torch.save(message, f"{out}.{rank}")
    dist.destroy_process_group()


def _ddp_worker(rank: int, world: int, store: str, out: str) -> None:
    _init(rank, world, store)
    torch.manual_seed(0)
    model = torch.nn.Linear(D, 3).double()
    log_scale = torch.nn.Parameter(torch.tensor(1.2, dtype=torch.float64))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    x_all, y_all = global_batch(world, seed=1)
    x = x_all[rank * N_PER_RANK : (rank + 1) * N_PER_RANK]
    y = y_all[: world * N_PER_RANK][rank * N_PER_RANK : (rank + 1) * N_PER_RANK]
    loss = gather_contrastive_loss(ddp(x), ddp(y), log_scale.exp(), backend="torch")
    loss.backward()
    # log_scale is outside DDP: average it as DDP averages the model's gradients
    dist.all_reduce(log_scale.grad)
    log_scale.grad /= world
    grads = {"loss": loss.detach(), "log_scale": log_scale.grad}
    grads.update({k: p.grad for k, p in model.named_parameters()})
    torch.save(grads, f"{out}.{rank}")
    dist.destroy_process_group()


def spawn(worker, world: int, tmp_path, *args) -> list:
    store, out = str(tmp_path / "store"), str(tmp_path / "out")
    mp.spawn(worker, args=(world, store, out, *args), nprocs=world, join=True)
    return [torch.load(f"{out}.{r}") for r in range(world)]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gather_matches_single_process(world, symmetric, tmp_path):
    results = spawn(_loss_worker, world, tmp_path, symmetric)
    a_all, b_all = global_batch(world)
    a_all.requires_grad_()
    b_all.requires_grad_()
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    m = N_PER_RANK + EXTRA
    labels = torch.cat([r * m + torch.arange(N_PER_RANK) for r in range(world)])
    ref = tilecl.contrastive_loss(a_all, b_all, scale, labels=labels, symmetric=symmetric, backend="torch")
    ga, gb, gs = torch.autograd.grad(ref, (a_all, b_all, scale))
    for rank, res in enumerate(results):
        assert_rel(res["loss"], ref.detach(), 1e-10, "loss on every rank")
        # convention: each rank holds world x its rows' gradient of the global loss
        assert_rel(res["a"] / world, ga[rank * N_PER_RANK : (rank + 1) * N_PER_RANK], 1e-10, "grad a")
        assert_rel(res["b"] / world, gb[rank * m : (rank + 1) * m], 1e-10, "grad b")
    # and the rank-average of the scale gradient (what DDP computes) is the global one
    assert_rel(sum(r["s"] for r in results) / world, gs, 1e-10, "grad logit_scale")


@pytest.mark.parametrize("world", [2])
def test_ddp_step_gradients_equal_single_process(world, tmp_path):
    results = spawn(_ddp_worker, world, tmp_path)
    torch.manual_seed(0)
    model = torch.nn.Linear(D, 3).double()
    log_scale = torch.nn.Parameter(torch.tensor(1.2, dtype=torch.float64))
    x_all, y_all = global_batch(world, seed=1)
    loss = tilecl.contrastive_loss(model(x_all), model(y_all[: world * N_PER_RANK]), log_scale.exp())
    loss.backward()
    for res in results:
        assert_rel(res["loss"], loss.detach(), 1e-10, "loss")
        assert_rel(res["log_scale"], log_scale.grad, 1e-10, "log_scale grad")
        for name, p in model.named_parameters():
            assert_rel(res[name], p.grad, 1e-10, name)


def test_unequal_batches_raise_the_same_error_on_every_rank(tmp_path):
    messages = spawn(_unequal_worker, 2, tmp_path)
    assert messages[0] == messages[1] and "equal (N, M) batch sizes" in messages[0]


def _clip_worker(rank: int, world: int, store: str, out: str) -> None:
    _init(rank, world, store)
    a_all, b_all = global_batch(world)
    a = a_all[rank * N_PER_RANK : (rank + 1) * N_PER_RANK]
    b = b_all[rank * N_PER_RANK : (rank + 1) * N_PER_RANK]
    loss = tilecl.ClipLoss(rank=rank, world_size=world)(a, b, 3.0, output_dict=True)
    torch.save(loss["contrastive_loss"], f"{out}.{rank}")
    dist.destroy_process_group()


def test_clip_loss_module_uses_the_default_group(tmp_path):
    values = spawn(_clip_worker, 2, tmp_path)
    a_all, b_all = global_batch(2)
    ref = tilecl.contrastive_loss(a_all, b_all[: 2 * N_PER_RANK], 3.0)
    for value in values:
        assert_rel(value, ref, 1e-10, "ClipLoss on every rank")


def _gamma_worker(rank: int, world: int, store: str, out: str) -> None:
    _init(rank, world, store)
    a_all, b_all = global_batch(world)
    module = tilecl.GammaContrastiveLoss(
        50, gamma=0.5, estimator="mean", process_group=dist.group.WORLD, backend="torch"
    ).double()
    results = []
    for step, index_all in enumerate(
        [torch.arange(world * N_PER_RANK), torch.arange(world * N_PER_RANK) * 3 % 50]
    ):
        rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        a = (a_all[rows] * (1 + step)).clone().requires_grad_()
        b = b_all[: world * N_PER_RANK][rows].clone().requires_grad_()
        loss = module(a, b, index_all[rows], 2.0)
        loss.backward()
        state = {k: t.clone() for k, t in module.state_dict().items()}
        results.append({"loss": loss.detach(), "a": a.grad, "b": b.grad, **state})
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_gamma_memory_and_gradients_match_single_process(world, tmp_path):
    results = spawn(_gamma_worker, world, tmp_path)
    a_all, b_all = global_batch(world)
    module = tilecl.GammaContrastiveLoss(50, gamma=0.5, estimator="mean", backend="torch").double()
    for step, index_all in enumerate(
        [torch.arange(world * N_PER_RANK), torch.arange(world * N_PER_RANK) * 3 % 50]
    ):
        a = (a_all * (1 + step)).clone().requires_grad_()
        b = b_all[: world * N_PER_RANK].clone().requires_grad_()
        loss = module(a, b, index_all, 2.0)
        ga, gb = torch.autograd.grad(loss, (a, b))
        for rank, per_step in enumerate(results):
            res = per_step[step]
            rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
            assert_rel(res["loss"], loss.detach(), 1e-10, "surrogate on every rank")
            assert_rel(res["a"] / world, ga[rows], 1e-10, "grad a")
            assert_rel(res["b"] / world, gb[rows], 1e-10, "grad b")
            for key, value in module.state_dict().items():
                if value.dtype == torch.bool:
                    assert torch.equal(res[key], value), key
                else:
                    assert_rel(res[key], value, 1e-12, key)


def _gamma_bad_index_worker(rank: int, world: int, store: str, out: str) -> None:
    _init(rank, world, store)
    module = tilecl.GammaContrastiveLoss(10, process_group=dist.group.WORLD).double()
    a = torch.randn(3, D, dtype=torch.float64)
    index = torch.tensor([0, 1, 2]) + (20 if rank == 1 else 0)  # rank 1 is out of range
    try:
        module(a, a.clone(), index, 1.0)
        message = "no error"
    except ValueError as error:
        message = str(error)
    unchanged = not module.visited_rows.any()
    torch.save((message, unchanged), f"{out}.{rank}")
    dist.destroy_process_group()


def test_gamma_bad_index_on_one_rank_raises_everywhere_and_leaves_memory(tmp_path):
    (m0, unchanged0), (m1, unchanged1) = spawn(_gamma_bad_index_worker, 2, tmp_path)
    assert "index" in m0 and "index must lie in" in m1
    assert unchanged0 and unchanged1
