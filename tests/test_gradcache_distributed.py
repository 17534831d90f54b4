"""tilecl.GradCache across ranks: gloo on loopback, DDP and FSDP2 towers, every rank holding a shard.

Each rank embeds its shard of a global batch with :class:`tilecl.GradCache`,
computes a tilecl loss with ``process_group=`` and calls ``backward``; the
towers' gradients after the step (DDP's average, FSDP2's averaged shards
gathered) must equal the single-process step on the concatenated batch (float64,
≤ 1e-10 relative: tilecl's gradient convention makes the rank-average the
global loss's gradient), and each wrapper must reduce once per step — counted
with a DDP comm hook, and by wrapping FSDP2's reduce.

One spawn per world size runs every case; ranks split their shards into
different numbers of mini-batches where the wrapper allows it (DDP).
"""

from __future__ import annotations

import contextlib
import datetime
import functools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

import tilecl
from utils import assert_rel

N_PER_RANK, D_IN, D = 7, 6, 4
SCALE, BIAS = 10.0, -2.0
STEPS = 2


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D_IN, 16), nn.Tanh(), nn.Linear(16, D)).double()

    def forward(self, x):
        return F.normalize(self.net(x), dim=-1)


def loss_of(name: str, za, zb, group=None):
    kwargs = {} if group is None else {"process_group": group}
    if name == "clip gather":
        return tilecl.contrastive_loss(za, zb, SCALE, backend="torch", dist_impl="gather", **kwargs)
    if name == "clip ring":
        return tilecl.contrastive_loss(za, zb, SCALE, backend="torch", dist_impl="ring", **kwargs)
    if name == "sigmoid":
        return tilecl.sigmoid_loss(za, zb, SCALE, BIAS, backend="torch", **kwargs)
    assert name == "sigmoid ring"
    return tilecl.sigmoid_loss(za, zb, SCALE, BIAS, backend="torch", dist_impl="ring", **kwargs)


#: case → (wrapper, layout: two towers or one shared by both inputs, loss)
CASES = {
    "ddp two clip gather": ("ddp", "two", "clip gather"),
    "ddp two clip ring": ("ddp", "two", "clip ring"),
    "ddp two sigmoid": ("ddp", "two", "sigmoid"),
    "ddp shared clip gather": ("ddp", "shared", "clip gather"),
    "ddp shared sigmoid ring": ("ddp", "shared", "sigmoid ring"),
    "fsdp2 two clip gather": ("fsdp2", "two", "clip gather"),
    "fsdp2 shared sigmoid": ("fsdp2", "shared", "sigmoid"),
}


def fsdp2_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
        from torch.distributed.fsdp._fully_shard import _fsdp_param_group

        return hasattr(_fsdp_param_group, "foreach_reduce")
    except ImportError:
        return False


def make_towers(layout: str) -> list[MLP]:
    torch.manual_seed(0)
    first = MLP()
    return [first, first] if layout == "shared" else [first, MLP()]


def batch(world: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    n = world * N_PER_RANK
    return (
        torch.randn(n, D_IN, generator=gen, dtype=torch.float64),
        torch.randn(n, D_IN, generator=gen, dtype=torch.float64),
    )


def shard(x: torch.Tensor, rank: int) -> torch.Tensor:
    return x[rank * N_PER_RANK : (rank + 1) * N_PER_RANK].clone()


def distinct(modules) -> list[nn.Module]:
    out: list[nn.Module] = []
    for m in modules:
        if all(m is not seen for seen in out):
            out.append(m)
    return out


def grads_of(modules) -> list[torch.Tensor]:
    out = []
    for m in distinct(modules):
        for p in m.parameters():
            g = p.grad
            out.append(g.full_tensor() if hasattr(g, "full_tensor") else g.clone())
    return out


def zero(modules) -> None:
    for m in distinct(modules):
        m.zero_grad(set_to_none=True)


def counting_hook(state: list, bucket):
    state.append(bucket.index())
    return default_hooks.allreduce_hook(None, bucket)


def _init(rank: int, world: int, store: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )


def wrap(kind: str, towers: list[MLP], rank: int, world: int):
    """The towers as the ranks run them, and per wrapper a list that grows by one per gradient reduction."""
    wrappers: dict[int, nn.Module] = {}
    counters: list[list] = []
    for tower in distinct(towers):
        if kind == "ddp":
            wrapped: nn.Module = DistributedDataParallel(
                tower, find_unused_parameters=False, static_graph=False
            )
            counter: list = []
            wrapped.register_comm_hook(counter, counting_hook)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            wrapped = fully_shard(tower, mesh=init_device_mesh("cpu", (world,)))
            counter = []
            FSDP_REDUCES.append((tower, counter))
        wrappers[id(tower)] = wrapped
        counters.append(counter)
    return [wrappers[id(t)] for t in towers], counters


#: (FSDP2 module, its reductions): filled by the wrapper around FSDP2's foreach_reduce
FSDP_REDUCES: list[tuple[nn.Module, list]] = []


def count_fsdp2_reduces() -> None:
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    original = _fsdp_param_group.foreach_reduce

    def counted(fsdp_params, *args, **kwargs):
        param = fsdp_params[0].sharded_param
        for tower, counter in FSDP_REDUCES:
            if any(param is p for p in tower.parameters()):
                counter.append(1)
        return original(fsdp_params, *args, **kwargs)

    _fsdp_param_group.foreach_reduce = counted


def _worker(rank: int, world: int, store: str, out: str, with_fsdp2: bool) -> None:
    _init(rank, world, store)
    group = dist.group.WORLD
    if with_fsdp2:
        count_fsdp2_reduces()
    results: dict = {}
    for name, (kind, layout, loss_name) in CASES.items():
        if kind == "fsdp2" and not with_fsdp2:
            continue
        towers = make_towers(layout)
        wrapped, counters = wrap(kind, towers, rank, world)
        # DDP: the ranks split their shards differently (DDP runs no collective in a forward that
        # could mismatch); FSDP2 all-gathers in every forward, so every rank runs as many mini-batches
        size = 3 + rank % 2 if kind == "ddp" else 3
        cache = tilecl.GradCache(wrapped, mini_batch_size=size)
        steps = []
        for step in range(STEPS):
            x_all, y_all = batch(world, step)
            x, y = shard(x_all, rank), shard(y_all, rank)
            before = [len(c) for c in counters]
            za, zb = cache.embed(x, y)
            loss = loss_of(loss_name, za, zb, group)
            loss.backward()
            steps.append(
                {
                    "loss": loss.detach(),
                    "grads": grads_of(towers),
                    "reductions": [len(c) - b for c, b in zip(counters, before)],
                    "mini_batches": [len(r) for r in cache.mini_batches(x, y)],
                }
            )
            zero(towers)
        results[name] = steps

    # the caller's own no_sync around a step (accumulation over steps): no reduction in that step,
    # then the next step reduces both steps' gradients, as with the plain DDP step
    towers = make_towers("two")
    wrapped, counters = wrap("ddp", towers, rank, world)
    cache = tilecl.GradCache(wrapped, mini_batch_size=3 + rank % 2)
    counts = []
    for step in range(STEPS):
        x_all, y_all = batch(world, step)
        before = [len(c) for c in counters]
        with contextlib.ExitStack() as stack:
            if step == 0:
                for w in distinct(wrapped):
                    stack.enter_context(w.no_sync())
            za, zb = cache.embed(shard(x_all, rank), shard(y_all, rank))
            loss_of("clip gather", za, zb, group).backward()
        counts.append([len(c) - b for c, b in zip(counters, before)])
    results["accumulated"] = {"grads": grads_of(towers), "reductions": counts}

    # the counter sees every reduction: two plain DDP backwards without no_sync reduce twice
    (control,), (counter,) = wrap("ddp", make_towers("shared")[:1], rank, world)
    x_all, _ = batch(world, 0)
    x = shard(x_all, rank)
    control(x[:3]).sum().backward()
    control(x[3:]).sum().backward()
    results["control"] = len(counter)

    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


@functools.cache
def _spawned(world: int, tmp_root: str):
    """Every rank's results, or the exception the spawn raised (kept: one spawn per world, pass or fail)."""
    import pathlib

    path = pathlib.Path(tmp_root) / str(world)
    path.mkdir()
    store, out = str(path / "store"), str(path / "out")
    try:
        mp.spawn(_worker, args=(world, store, out, fsdp2_available()), nprocs=world, join=True)
    except Exception as error:
        return error
    return [torch.load(f"{out}.{r}") for r in range(world)]


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("gradcache-ranks"))

    def results(world: int) -> list:
        got = _spawned(world, root)
        if isinstance(got, Exception):
            raise got
        return got

    return results


@functools.cache
def single_process(world: int, layout: str, loss_name: str, step: int) -> dict:
    """The plain step on the concatenated batch: the whole batch at once, autograd through the towers."""
    towers = make_towers(layout)
    x_all, y_all = batch(world, step)
    loss = loss_of(loss_name, towers[0](x_all), towers[1](y_all))
    loss.backward()
    return {"loss": loss.detach(), "grads": grads_of(towers)}


WORLDS = [2, pytest.param(4, marks=pytest.mark.slow)]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", list(CASES))
def test_step_gradients_equal_single_process_and_reduce_once(case, world, spawned):
    kind, layout, loss_name = CASES[case]
    if kind == "fsdp2" and not fsdp2_available():
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    towers = 1 if layout == "shared" else 2
    for rank, res in enumerate(spawned(world)):
        for step in range(STEPS):
            got, want = res[case][step], single_process(world, layout, loss_name, step)
            where = f"{case}, rank {rank}, step {step}"
            assert_rel(got["loss"], want["loss"], 1e-10, f"{where}: loss")
            assert len(got["grads"]) == len(want["grads"]) == 4 * towers
            for i, (g, w) in enumerate(zip(got["grads"], want["grads"])):
                assert_rel(g, w, 1e-10, f"{where}: gradient {i}")
            # several mini-batches per input, yet one reduction per wrapper and step
            assert min(got["mini_batches"]) >= 2, got["mini_batches"]
            assert got["reductions"] == [1] * towers, (where, got["reductions"])
        if kind == "ddp" and world > 1:
            assert res[case][0]["mini_batches"] == ([3, 3] if rank % 2 == 0 else [2, 2])


@pytest.mark.parametrize("world", WORLDS)
def test_caller_no_sync_accumulates_then_one_reduction(world, spawned):
    want = [
        sum(g) for g in zip(*(single_process(world, "two", "clip gather", s)["grads"] for s in range(STEPS)))
    ]
    for rank, res in enumerate(spawned(world)):
        got = res["accumulated"]
        assert got["reductions"] == [[0, 0], [1, 1]], got["reductions"]
        for i, (g, w) in enumerate(zip(got["grads"], want)):
            assert_rel(g, w, 1e-10, f"accumulated gradient {i} on rank {rank}")


def test_the_counter_sees_every_reduction(spawned):
    assert all(res["control"] == 2 for res in spawned(2))
