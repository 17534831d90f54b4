"""Gradient caching (Gao et al. 2021): giant contrastive batches with a mini-batch's activations.

The tiled losses need ``O(N·D)`` memory, so the encoders' activations cap the
batch. :class:`GradCache` splits the step in three, exactly:

1. :meth:`GradCache.embed` runs every tower over its input mini-batch by
   mini-batch without an autograd graph and keeps only the embeddings ``z``;
2. the caller computes any loss of the embeddings (any tilecl loss, or any
   function of them) and calls ``loss.backward()``;
3. that backward reaches the embeddings' node, which receives ``dL/dz`` and
   re-embeds each mini-batch with autograd (same RNG state, same autocast
   state) and back-propagates the slice of ``dL/dz`` into the towers'
   parameters — a reentrant ``torch.autograd.backward`` per mini-batch, as
   ``torch.utils.checkpoint``'s reentrant form does.

Because step 3 is an ordinary node of the loss's graph, whatever drives
``backward`` (``GradScaler.scale(loss).backward()``, ``accelerator.backward``,
gradient accumulation over steps) works unchanged, and the parameters'
``.grad`` accumulate as after the plain step.

Peak activation memory is one mini-batch of one tower; the price is a second
forward of every tower.

Across ranks, every re-embedding but a wrapper's last runs without its
gradient reduction, so each wrapper reduces once per step, the accumulated
gradient (see :class:`GradCache`): ``DistributedDataParallel.no_sync``, FSDP2's
``set_requires_gradient_sync``. DeepSpeed engines whose ZeRO reduces each
gradient during the backward are refused.

Built on it: :class:`tilecl.integrations.sentence_transformers.CachedMultipleNegativesRankingLoss`
(sentence-transformers' cached MNRL, single process) and ``examples/clip_gradcache.py``
(an open_clip-style step). Each re-embedding is checked against the embedding the loss saw
(a tower that computes differently with gradients than under ``torch.no_grad()`` raises). Not
supported: inputs that require grad, ``torch.autograd.grad`` / ``backward(inputs=...)`` (refused:
the re-embedding runs only in a full ``.backward()``), double backward, and ``torch.compile`` of
:meth:`GradCache.embed` (a graph break by nature; ``fullgraph=True`` refuses it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import inspect
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import validation as v
from ._compat import fsdp_reduces_gradients

__all__ = ["GradCache"]

#: one tower's input: a tensor ``(N, ...)`` or a mapping of tensors ``(N, ...)`` (a tokenizer's output)
Input = Union[torch.Tensor, Mapping[str, torch.Tensor]]

#: the modules whose output depends on the mini-batch split when they use batch statistics: every
#: BatchNorm (the base class: subclasses such as apex's SyncBatchNorm too)
_BatchNorm = nn.modules.batchnorm._BatchNorm


def _split_dependent(module: nn.Module) -> Optional[str]:
    """Why ``module``'s forward depends on how the batch is split into mini-batches (``None``: it
    does not): batch statistics in the output, or running statistics updated by every forward
    (once per mini-batch, and again by the re-embedding)."""
    if isinstance(module, _BatchNorm) and (module.training or module.running_mean is None):
        return (
            "a BatchNorm using batch statistics (train mode or track_running_stats=False): its output "
            "depends on how the batch is split into mini-batches"
        )
    running = [name for name, _ in module.named_buffers(recurse=False) if name.startswith("running_")]
    if module.training and (getattr(module, "track_running_stats", False) or running):
        return (
            "a module in train mode that tracks running statistics: each mini-batch's forward, and "
            "the re-embedding's, updates them"
        )
    return None


#: the largest difference between a re-embedding and its cached embedding that is rounding (relative
#: to the cached embedding's largest magnitude): kernels chosen differently with and without
#: gradients round differently, a different computation differs by far more
_REPLAY_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 6e-2}


#: why :meth:`GradCache.embed` is not traced by torch.compile
COMPILE_REFUSAL = (
    "GradCache.embed cannot run inside torch.compile: it is a graph break by nature (it runs each "
    "tower mini-batch by mini-batch, snapshots the random streams and replays the towers in the "
    "backward); call it outside the compiled function and compile the towers or the loss instead"
)

#: a snapshot of the random streams: the CPU generator, then each accelerator device's
RngState = tuple[torch.Tensor, tuple[tuple[torch.device, torch.Tensor], ...]]


def _device_module(device: torch.device) -> Any:
    return getattr(torch, device.type)


def _rng_state(devices: Sequence[torch.device]) -> RngState:
    states = []
    for device in devices:
        module = _device_module(device)
        states.append(
            (device, module.get_rng_state(device) if device.index is not None else module.get_rng_state())
        )
    return torch.get_rng_state(), tuple(states)


def _set_rng_state(state: RngState) -> None:
    cpu, devices = state
    torch.set_rng_state(cpu)
    for device, device_state in devices:
        module = _device_module(device)
        if device.index is not None:
            module.set_rng_state(device_state, device)
        else:
            module.set_rng_state(device_state)


def _autocast_state(device_type: str) -> Optional[tuple[bool, torch.dtype]]:
    """``(enabled, dtype)`` of autocast on ``device_type``; None where autocast does not exist."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        try:
            return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
        except RuntimeError:
            return None
    # torch 2.3 has only the per-device functions
    if device_type == "cpu":  # pragma: no cover - depends on the installed torch
        return torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    if device_type == "cuda":  # pragma: no cover - depends on the installed torch
        return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
    return None  # pragma: no cover - depends on the installed torch


def _tensors(x: Input) -> list[tuple[str, torch.Tensor]]:
    return list(x.items()) if isinstance(x, Mapping) else [("", x)]


def _rows(x: Input, start: int, stop: int, device: torch.device) -> Input:
    if isinstance(x, Mapping):
        return {k: t[start:stop].to(device) for k, t in x.items()}
    return x[start:stop].to(device)


def _to(x: Input, device: torch.device) -> Input:
    if isinstance(x, Mapping):
        return {k: t.to(device) for k, t in x.items()}
    return x.to(device)


def _call(tower: nn.Module, x: Input) -> Any:
    return tower(**x) if isinstance(x, Mapping) else tower(x)


def _check_count(value: Any, name: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"GradCache: {name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"GradCache: {name} must be positive, got {value}")
    return value


class _MethodTower(nn.Module):
    """A bound method of a module as a tower (open_clip's ``model.encode_image``): the module is its
    submodule, so its parameters, modes and wrappers are the tower's."""

    def __init__(self, owner: nn.Module, method: str) -> None:
        super().__init__()
        self.owner, self.method = owner, method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.owner, self.method)(*args, **kwargs)


def _tower(tower: Any, i: int) -> nn.Module:
    if isinstance(tower, nn.Module):
        return tower
    if inspect.ismethod(tower) and isinstance(tower.__self__, nn.Module):
        return _MethodTower(tower.__self__, tower.__name__)
    raise TypeError(
        f"GradCache: tower {i} must be an nn.Module or a bound method of one (model.encode_image), got "
        f"{type(tower).__name__}"
    )


def _towers_of(towers: Any) -> tuple[nn.Module, ...]:
    if isinstance(towers, nn.ModuleList):
        found: tuple[Any, ...] = tuple(towers)
    elif isinstance(towers, nn.Module) or inspect.ismethod(towers):
        found = (towers,)
    elif isinstance(towers, Sequence) and not isinstance(towers, (str, bytes)):
        found = tuple(towers)
    else:
        raise TypeError(
            "GradCache: towers must be an nn.Module (or a bound method of one, as model.encode_image) or "
            f"a sequence of them, got {type(towers).__name__}"
        )
    if not found:
        raise ValueError("GradCache: towers is empty")
    return tuple(_tower(tower, i) for i, tower in enumerate(found))


def _split(
    n: int, max_rows: Optional[int], budget: Optional[int], tokens: Optional[list[int]], name: str
) -> list[tuple[int, int]]:
    """Consecutive ``(start, stop)`` row ranges covering ``range(n)``, greedy in row order.

    A mini-batch closes when the next row would take it past ``max_rows``
    rows or past ``budget`` tokens (``tokens[i]`` = row ``i``'s count).
    Greedy is the fewest mini-batches any split into consecutive ranges can
    have.
    """
    if tokens is None:
        assert max_rows is not None
        return [(start, min(start + max_rows, n)) for start in range(0, n, max_rows)]
    assert budget is not None
    ranges: list[tuple[int, int]] = []
    start, used = 0, 0
    for i, count in enumerate(tokens):
        if count > budget:
            raise ValueError(
                f"GradCache: row {i} of {name} has {count} tokens, more than tokens_per_mini_batch={budget}"
            )
        if i > start and (used + count > budget or (max_rows is not None and i - start >= max_rows)):
            ranges.append((start, i))
            start, used = i, 0
        used += count
    ranges.append((start, n))
    return ranges


def _sync_owners(module: nn.Module) -> list[nn.Module]:
    """The outermost wrappers in ``module`` (itself too) that reduce gradients across ranks in backward.

    ``DistributedDataParallel`` (``no_sync``) and FSDP2 modules (``fully_shard``:
    ``set_requires_gradient_sync``, which recurses into the nested ones).
    """
    if isinstance(module, DistributedDataParallel) or callable(
        getattr(module, "set_requires_gradient_sync", None)
    ):
        return [module]
    return [owner for child in module.children() for owner in _sync_owners(child)]


@contextlib.contextmanager
def _without_sync(owners: Sequence[nn.Module]) -> Any:
    """Run a mini-batch's forward and backward with the gradient reduction of ``owners`` off."""
    with contextlib.ExitStack() as stack:
        for owner in owners:
            if isinstance(owner, DistributedDataParallel):
                # DDP decides in the forward: no_sync must hold while the re-embedding's forward runs
                stack.enter_context(owner.no_sync())
            else:
                before = fsdp_reduces_gradients(owner)
                owner.set_requires_gradient_sync(False)  # type: ignore[operator]
                stack.callback(owner.set_requires_gradient_sync, before)  # type: ignore[arg-type]
        yield


def _deepspeed_refusal(tower: nn.Module) -> Optional[str]:
    """Why a tower cannot take one backward per mini-batch in a step, or None (deepspeed is not imported)."""
    for module in tower.modules():
        names = {(c.__module__.split(".")[0], c.__name__) for c in type(module).__mro__}
        if ("deepspeed", "DeepSpeedEngine") not in names:
            continue
        try:
            stage = int(module.zero_optimization_stage())  # type: ignore[operator]
        except Exception:
            stage = None
        try:
            overlap = bool(module.zero_overlap_comm())  # type: ignore[operator]
        except Exception:
            overlap = False
        if stage is None or stage >= 2 or (stage == 1 and overlap):
            what = "ZeRO stage unknown" if stage is None else f"ZeRO stage {stage}"
            if stage == 1:
                what += " with overlap_comm"
            return (
                f"a DeepSpeed engine ({what}) reduces each parameter's gradient in the backward that "
                "produces it and refuses a second one in the same step ('Gradient computed twice for "
                "this partition'), and the re-embedding runs one backward per mini-batch; use ZeRO stage "
                "0 or 1 (without overlap_comm), DistributedDataParallel, or FSDP2"
            )
    if any(hasattr(p, "ds_id") for p in tower.parameters()):
        return (
            "its parameters are partitioned by DeepSpeed ZeRO stage 3, which reduces each gradient in the "
            "backward that produces it and refuses a second one in the same step, and the re-embedding "
            "runs one backward per mini-batch; use DistributedDataParallel or FSDP2"
        )
    return None


@dataclasses.dataclass
class _Step:
    """One :meth:`GradCache.embed` call: what the re-embedding in its backward needs."""

    towers: tuple[nn.Module, ...]
    #: the inputs as kept between the passes (the towers' devices, or CPU with offload)
    inputs: list[Input]
    devices: list[torch.device]
    #: per tower, its mini-batches: ``(start, stop)`` and the RNG state its forward started from
    batches: list[list[tuple[int, int, RngState]]]
    rng_devices: tuple[torch.device, ...]
    autocast: list[tuple[str, bool, torch.dtype]]
    autocast_cache: bool
    versions: list[int]
    tower_state: list[tuple[tuple[int, ...], tuple[bool, ...]]]
    #: the embeddings embed() returned (detached), which each re-embedding must reproduce
    embeddings: list[torch.Tensor] = dataclasses.field(default_factory=list)
    #: a progress bar over the re-embedding
    progress: bool = False
    #: batch_norm="per_mini_batch": the running statistics embed() left, restored after the replay
    running: list[tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=list)
    done: bool = False

    def input_versions(self) -> list[int]:
        return [t._version for x in self.inputs for _, t in _tensors(x)]

    def changed_input(self, versions: list[int]) -> Optional[str]:
        names = [
            f"input {i}" + (f" ({k!r})" if k else "")
            for i, x in enumerate(self.inputs)
            for k, _ in _tensors(x)
        ]
        for name, before, now in zip(names, versions, self.input_versions()):
            if before != now:
                return name
        return None

    def autocast_context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for device_type, enabled, dtype in self.autocast:
            stack.enter_context(
                torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=self.autocast_cache)
            )
        return stack

    def backward(self, grads: tuple[Optional[torch.Tensor], ...]) -> None:
        if self.done:
            raise RuntimeError(
                "GradCache: the embeddings' backward ran twice (backward through the same embed() "
                "result a second time, e.g. with retain_graph=True); call embed() again for a new step"
            )
        if torch.is_grad_enabled():
            raise RuntimeError(
                "GradCache: the re-embedding is differentiable once; create_graph=True is not supported"
            )
        changed = self.changed_input(self.versions)
        if changed is not None:
            raise RuntimeError(
                f"GradCache: {changed} was modified in place between embed() and backward(); "
                "the re-embedding would not see what the forward saw"
            )
        for i, (tower, state) in enumerate(zip(self.towers, self.tower_state)):
            if _tower_state(tower) != state:
                raise RuntimeError(
                    f"GradCache: tower {i}'s parameters or train/eval mode changed between embed() and "
                    "backward() (an optimizer step, .train()/.eval()); the cached gradient no longer applies"
                )
        self.done = True
        # the replays run on a fork of the random streams: the caller's stream stays where embed() left it
        outer = _rng_state(self.rng_devices)
        # each wrapper that reduces gradients across ranks reduces once, in its last mini-batch's backward
        # (over every tower it is part of): the others run without, accumulating into .grad
        owners = [_sync_owners(tower) for tower in self.towers]
        last: dict[int, tuple[int, int]] = {}
        for i, (grad, batches) in enumerate(zip(grads, self.batches)):
            if grad is not None:
                last.update({id(owner): (i, len(batches) - 1) for owner in owners[i]})
        # per re-embedded mini-batch, its largest difference from the cached rows (read once, at the end)
        differences: list[tuple[int, int, int, torch.Tensor]] = []
        total = sum(len(batches) for grad, batches in zip(grads, self.batches) if grad is not None)
        bar = _bar(self.progress, total, "GradCache: re-embed (backward)")
        try:
            for i, (tower, x, device, batches, grad) in enumerate(
                zip(self.towers, self.inputs, self.devices, self.batches, grads)
            ):
                if grad is None:  # this embedding did not reach the loss: no gradient, as in the plain step
                    continue
                cached = self.embeddings[i]
                for j, (start, stop, rng) in enumerate(batches):
                    _set_rng_state(rng)
                    unsynced = [owner for owner in owners[i] if last[id(owner)] != (i, j)]
                    with _without_sync(unsynced):
                        with torch.enable_grad(), self.autocast_context():
                            out = _call(tower, _rows(x, start, stop, device))
                        differences.append((i, start, stop, _difference(out.detach(), cached[start:stop])))
                        if out.requires_grad:
                            torch.autograd.backward(out, grad[start:stop])
                        del out
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            with torch.no_grad():
                for buffer, value in self.running:  # the replay updated them a second time
                    buffer.copy_(value)
            _set_rng_state(outer)
            # the inputs and RNG states are dead weight once the gradient is in .grad
            self.inputs, self.batches, self.embeddings = [], [], []
        _check_replay(differences)


#: GradCache's ``batch_norm`` modes
BATCH_NORM_MODES = ("refuse", "per_mini_batch")


def _running_statistics(towers: Sequence[nn.Module]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every running-statistics buffer of the towers' train-mode modules, with a copy of its value."""
    found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for tower in towers:
        for module in tower.modules():
            if not module.training:
                continue
            for name, buffer in module.named_buffers(recurse=False):
                if name.startswith("running_") or name == "num_batches_tracked":
                    found[id(buffer)] = (buffer, buffer.detach().clone())
    return list(found.values())


def _bar(enabled: bool, total: int, description: str) -> Any:
    """A tqdm bar over ``total`` mini-batches, or ``None``."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="mini-batch")


def _difference(replayed: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """``max|replayed − cached| / max|cached|`` (0-d, on the device: nothing waits for it here)."""
    if replayed.shape != cached.shape:
        return torch.tensor(math.inf)
    tolerance = _REPLAY_TOLERANCE.get(cached.dtype, 1e-3)
    # a NaN where both hold one is no difference; a NaN on one side only is (below); no host read
    difference = (replayed.to(cached.dtype) - cached).abs()
    error = torch.where(torch.isnan(difference), 0.0, difference).amax()
    finite = torch.where(torch.isfinite(cached), cached.abs(), 0.0)
    size = finite.amax().clamp_min(torch.finfo(cached.dtype).tiny)
    moved = (torch.isnan(replayed) != torch.isnan(cached)).any()
    return torch.where(moved, math.inf, error.float() / size.float() / tolerance)


def _check_replay(differences: list[tuple[int, int, int, torch.Tensor]]) -> None:
    """Raise where a re-embedding did not reproduce the embedding the loss saw: its gradient is then
    the gradient of another function (one host read for the whole backward)."""
    if not differences:
        return
    ratios = torch.stack([d.to("cpu", torch.float64) for *_, d in differences]).tolist()
    for (tower, start, stop, _), ratio in zip(differences, ratios):
        if ratio > 1:
            raise RuntimeError(
                f"GradCache: tower {tower}'s re-embedding of rows {start}:{stop} differs from what embed() "
                f"returned ({ratio:.3g}x the rounding tolerance), so the gradients in .grad are wrong. The "
                "tower computes differently with gradients than under torch.no_grad() — e.g. an eval-mode "
                "nn.TransformerEncoder's fast path, which outputs 0 at padded positions (build it with "
                "enable_nested_tensor=False, or pool over unpadded positions only) — or it is not "
                "deterministic for the same inputs and random state"
            )


def _tower_state(tower: nn.Module) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    return tuple(p._version for p in tower.parameters()), tuple(m.training for m in tower.modules())


class _ReEmbed(torch.autograd.Function):
    """Identity on the cached embeddings; its backward is the re-embedding.

    Its differentiable input is a dummy leaf, so the engine calls the backward
    whenever the loss's backward runs, with ``dL/dz`` for every embedding.
    """

    @staticmethod
    def forward(ctx: Any, step: _Step, count: int, dummy: torch.Tensor, *tensors: torch.Tensor) -> tuple:
        ctx.step, ctx.inputs = step, len(tensors)
        # an embedding the loss does not use gets None: its tower is skipped, its .grad stays as it was
        ctx.set_materialize_grads(False)
        return tensors[:count]

    @staticmethod
    def backward(ctx: Any, *grads: Optional[torch.Tensor]) -> tuple:
        if not torch.autograd._is_checkpoint_valid():
            # a backward restricted to some tensors: the re-embedding would fill every tower
            # parameter's .grad (and none of torch.autograd.grad's results)
            raise RuntimeError(
                "GradCache: the embeddings' backward runs only in a full loss.backward(): "
                "loss.backward(inputs=...) and torch.autograd.grad(loss, ...) are not supported (the "
                "re-embedding accumulates every tower parameter's gradient into .grad)"
            )
        ctx.step.backward(grads)
        return (None, None, None, *([None] * ctx.inputs))


class GradCache:
    """Embed a giant batch mini-batch by mini-batch; ``loss.backward()`` fills the towers' ``.grad`` exactly.

    Example::

        cache = tilecl.GradCache([image_tower, text_tower], mini_batch_size=256)
        za, zb = cache.embed(images, texts)          # (N, D) each, no activations kept
        loss = tilecl.contrastive_loss(za, zb, scale)
        loss.backward()                              # re-embeds each mini-batch; .grad as the plain step

    Args:
        towers: one ``nn.Module`` (one input), or a sequence of them, one per
            input of :meth:`embed`; a bound method of a module is one too
            (open_clip's ``[model.encode_image, model.encode_text]``: no wrapper
            modules). A tower may repeat (a shared encoder:
            ``[encoder, encoder]``), its gradients then add up. Each is called
            as ``tower(x)`` for a tensor input and ``tower(**x)`` for a mapping,
            and returns a tensor ``(rows, ...)``.
        mini_batch_size: at most this many rows per mini-batch.
        tokens_per_mini_batch: for mapping inputs holding an
            ``attention_mask`` ``(N, L)``: at most this many tokens per
            mini-batch, a row's tokens being its non-zero mask entries (padding
            is not counted). Rows stay in order; a mini-batch closes when the
            next row would take it past the budget (or past
            ``mini_batch_size`` rows, when both are given). The tensors are
            sliced as they are (not re-padded). Inputs without a mask use
            ``mini_batch_size``, which must then be given.
        offload_inputs: keep the inputs on CPU between the two passes and move
            each mini-batch to its tower's device when used (otherwise each
            input is moved whole to its tower's device once, in :meth:`embed`).
        progress: a progress bar (tqdm) over the mini-batches of :meth:`embed`,
            and one over the re-embedding in the backward (the longer pass).
        batch_norm: ``"refuse"`` (the default: a tower whose output or state
            depends on the split raises, gradient caching would not be exact) or
            ``"per_mini_batch"``: open_clip's ``accum_freq`` semantics for
            BatchNorm (e.g. ResNet towers) — each mini-batch normalized by its own
            statistics, the running statistics updated once per mini-batch by
            :meth:`embed` and left as they were by the re-embedding. The gradients
            are then those of the per-mini-batch computation, not of the full batch.

    Exactness: each mini-batch's forward starts from a saved RNG state (the CPU
    generator and the accelerator devices of the towers and inputs) and under
    the autocast state :meth:`embed` ran under; the re-embedding replays both,
    so dropout masks and autocast dtypes match and the gradients are those of
    the plain step that embeds the same mini-batches in the same order (tower
    by tower, mini-batches in row order). After :meth:`embed` the RNG streams
    stand where that plain forward would leave them; the backward replays on
    a fork and leaves them there.

    One backward per :meth:`embed`: compute every loss of the step from the
    embeddings, add them, and call ``backward`` once (a second backward
    through the same embeddings raises).

    Refused, before any forward: BatchNorm using batch statistics (train
    mode, or ``track_running_stats=False``), whose output depends on the
    split; inputs that require grad. Modules that update buffers in their
    forward (running statistics) update them twice.

    Across ranks (each rank embeds its shard; the loss takes
    ``process_group=``): a ``DistributedDataParallel`` tower (or one holding
    DDP modules) re-embeds every mini-batch but its last under ``no_sync()``,
    so its gradients are all-reduced once per step, accumulated — once over
    all the inputs it embeds when it is shared. DDP decides in the forward, and
    here the forward that counts is the re-embedding's: whether the last
    mini-batch reduces follows DDP's state when ``backward`` runs (inside the
    caller's own ``no_sync()`` around the backward, none does). Towers must be
    the DDP module itself, or contain it: a submodule of a DDP model called
    directly bypasses DDP and is never reduced. Ranks may split their shards
    into different numbers of mini-batches. Tested with gloo,
    ``find_unused_parameters=False``, ``static_graph=False``. FSDP2 modules
    (``fully_shard``, found by ``set_requires_gradient_sync``) get
    ``set_requires_gradient_sync(False)`` for every mini-batch but the last
    and their previous setting back after each (tested with gloo on CPU);
    FSDP2 all-gathers in every forward, so every rank must run as many
    mini-batches. A DeepSpeed engine whose ZeRO reduces every gradient in the
    backward that produces it (stage 2 or 3, or 1 with ``overlap_comm``) is
    refused with a ``RuntimeError`` at :meth:`embed`: it raises on a second
    backward in a step.
    """

    def __init__(
        self,
        towers: Union[nn.Module, Sequence[nn.Module]],
        *,
        mini_batch_size: Optional[int] = None,
        tokens_per_mini_batch: Optional[int] = None,
        offload_inputs: bool = False,
        progress: bool = False,
        batch_norm: str = "refuse",
    ) -> None:
        self.towers = _towers_of(towers)
        self.mini_batch_size = _check_count(mini_batch_size, "mini_batch_size")
        self.tokens_per_mini_batch = _check_count(tokens_per_mini_batch, "tokens_per_mini_batch")
        if self.mini_batch_size is None and self.tokens_per_mini_batch is None:
            raise TypeError("GradCache: give mini_batch_size, tokens_per_mini_batch, or both")
        v.check_flag(offload_inputs, "offload_inputs")
        self.offload_inputs = offload_inputs
        self.batch_norm = v.check_choice(batch_norm, "batch_norm", BATCH_NORM_MODES)
        v.check_flag(progress, "progress")
        if progress and importlib.util.find_spec("tqdm") is None:
            raise ImportError("GradCache(progress=True) draws its bars with tqdm (pip install tqdm)")
        self.progress = progress

    def mini_batches(self, *inputs: Input) -> list[list[tuple[int, int]]]:
        """Per input, the ``(start, stop)`` row ranges :meth:`embed` runs its tower over.

        Args:
            inputs: as :meth:`embed`.

        Returns:
            One list of consecutive ranges covering ``range(N)`` per input.
        """
        self._check_inputs(inputs)
        return [self._split(x, i) for i, x in enumerate(inputs)]

    def embed(self, *inputs: Input) -> tuple[torch.Tensor, ...]:
        """Embed every input with its tower, mini-batch by mini-batch, without keeping activations.

        Args:
            inputs: one per tower, each a tensor ``(N, ...)`` or a mapping of
                tensors ``(N, ...)`` (e.g. ``input_ids`` and
                ``attention_mask``), the same ``N`` for all.

        Returns:
            One embedding per input, ``(N, ...)`` (the tower's output rows
            concatenated), differentiable: the backward through them runs the
            re-embedding. Under ``torch.no_grad()`` plain tensors, nothing kept.
        """
        if torch.compiler.is_compiling():
            raise RuntimeError(COMPILE_REFUSAL)
        self._check_inputs(inputs)
        for i, tower in enumerate(self.towers):
            refusal = _deepspeed_refusal(tower)
            if refusal is not None:
                raise RuntimeError(
                    f"GradCache: tower {i} cannot be re-embedded mini-batch by mini-batch: {refusal}"
                )
        ranges = [self._split(x, i) for i, x in enumerate(inputs)]
        devices = [self._device_of(tower, x) for tower, x in zip(self.towers, inputs)]
        keep = torch.device("cpu") if self.offload_inputs else None
        kept = [_to(x, keep or device) for x, device in zip(inputs, devices)]
        rng_devices = self._rng_devices(kept, devices)
        device_types = ["cpu", *sorted({d.type for d in rng_devices})]
        autocast = []
        for device_type in device_types:
            state = _autocast_state(device_type)
            if state is not None:
                autocast.append((device_type, *state))
        step = _Step(
            towers=self.towers,
            inputs=kept,
            devices=devices,
            batches=[],
            rng_devices=rng_devices,
            autocast=autocast,
            autocast_cache=torch.is_autocast_cache_enabled(),
            versions=[],
            tower_state=[_tower_state(tower) for tower in self.towers],
            progress=self.progress,
        )
        step.versions = step.input_versions()

        embeddings = []
        bar = _bar(self.progress, sum(len(spans) for spans in ranges), "GradCache: embed")
        for i, (tower, x, device, spans) in enumerate(zip(self.towers, kept, devices, ranges)):
            outs, batches = [], []
            for start, stop in spans:
                rng = _rng_state(rng_devices)
                with torch.no_grad():
                    out = _call(tower, _rows(x, start, stop, device))
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"GradCache: tower {i} must return a tensor, got {type(out).__name__}")
                if out.dim() == 0 or out.shape[0] != stop - start:
                    raise ValueError(
                        f"GradCache: tower {i} returned shape {tuple(out.shape)} for {stop - start} rows; "
                        "it must return one row per input row"
                    )
                outs.append(out)
                batches.append((start, stop, rng))
                if bar is not None:
                    bar.update(1)
            embeddings.append(torch.cat(outs))
            step.batches.append(batches)
        if bar is not None:
            bar.close()
        changed = step.changed_input(step.versions)
        if changed is not None:
            raise RuntimeError(
                f"GradCache: a tower modified {changed} in place; the re-embedding could not replay it"
            )
        if not torch.is_grad_enabled():
            return tuple(embeddings)
        step.embeddings = [e.detach() for e in embeddings]
        if self.batch_norm == "per_mini_batch":
            step.running = _running_statistics(self.towers)
        dummy = torch.empty(0, requires_grad=True)
        # the towers' parameters are inputs of the node too, so a backward restricted to them
        # (backward(inputs=...), autograd.grad) reaches it, and it refuses that instead of being skipped
        parameters = {id(p): p for tower in self.towers for p in tower.parameters() if p.requires_grad}
        return _ReEmbed.apply(step, len(embeddings), dummy, *embeddings, *parameters.values())

    def _check_inputs(self, inputs: Sequence[Any]) -> None:
        if len(inputs) != len(self.towers):
            raise ValueError(
                f"GradCache: {len(inputs)} inputs for {len(self.towers)} towers; give one per tower"
            )
        lengths = []
        for i, x in enumerate(inputs):
            if isinstance(x, Mapping):
                if not x:
                    raise ValueError(f"GradCache: input {i} is an empty mapping")
                for key, t in x.items():
                    if not isinstance(t, torch.Tensor):
                        raise TypeError(
                            f"GradCache: input {i}[{key!r}] must be a tensor, got {type(t).__name__}"
                        )
            elif not isinstance(x, torch.Tensor):
                raise TypeError(
                    f"GradCache: input {i} must be a tensor or a mapping of tensors, got {type(x).__name__}"
                )
            sizes = set()
            for key, t in _tensors(x):
                name = f"input {i}" + (f"[{key!r}]" if key else "")
                if t.dim() == 0:
                    raise ValueError(f"GradCache: {name} must have a batch dimension, got a 0-d tensor")
                if t.requires_grad:
                    raise ValueError(
                        f"GradCache: {name} requires grad; inputs that require grad are not supported"
                    )
                sizes.add(t.shape[0])
            if len(sizes) != 1:
                raise ValueError(
                    f"GradCache: the tensors of input {i} have different lengths {sorted(sizes)}"
                )
            lengths.append(sizes.pop())
        if len(set(lengths)) != 1:
            raise ValueError(
                f"GradCache: the inputs have different lengths {lengths}; all towers embed N rows"
            )
        if lengths[0] == 0:
            raise ValueError("GradCache: the inputs are empty (N = 0)")
        if self.batch_norm == "per_mini_batch":
            return  # batch statistics per mini-batch, running statistics restored after the replay
        for i, tower in enumerate(self.towers):
            for name, module in tower.named_modules():
                why = _split_dependent(module)
                if why is not None:
                    raise RuntimeError(
                        f"GradCache: tower {i} has {why} ({name or type(module).__name__}), so gradient "
                        "caching cannot be exact; put it in eval mode or use a per-sample norm "
                        "(LayerNorm, GroupNorm)"
                    )

    def _split(self, x: Input, i: int) -> list[tuple[int, int]]:
        n = _tensors(x)[0][1].shape[0]
        mask = x.get("attention_mask") if isinstance(x, Mapping) else None
        if self.tokens_per_mini_batch is None or mask is None:
            if self.mini_batch_size is None:
                raise ValueError(
                    f"GradCache: input {i} has no attention_mask to count tokens in; give mini_batch_size "
                    "for it (tokens_per_mini_batch applies to mapping inputs with an attention_mask)"
                )
            return _split(n, self.mini_batch_size, None, None, f"input {i}")
        if mask.dim() != 2:
            raise ValueError(
                f"GradCache: input {i}['attention_mask'] must be (N, L), got {tuple(mask.shape)}"
            )
        tokens = mask.ne(0).sum(dim=1).tolist()
        return _split(n, self.mini_batch_size, self.tokens_per_mini_batch, tokens, f"input {i}")

    @staticmethod
    def _device_of(tower: nn.Module, x: Input) -> torch.device:
        first = next(itertools.chain(tower.parameters(), tower.buffers()), None)
        return first.device if first is not None else _tensors(x)[0][1].device

    def _rng_devices(self, kept: list[Input], devices: list[torch.device]) -> tuple[torch.device, ...]:
        # the devices a forward can draw on: where the towers and the inputs live
        found = {*devices}
        for tower in self.towers:
            found |= {p.device for p in itertools.chain(tower.parameters(), tower.buffers())}
        for x in kept:
            found |= {t.device for _, t in _tensors(x)}
        accelerators = {d for d in found if d.type not in ("cpu", "meta")}
        return tuple(sorted(accelerators, key=str))
