"""``torch.compile(fullgraph=True)`` through every loss, and the registered ops under ``opcheck``.

For each loss: zero graph breaks (``torch._dynamo.explain``), a compiled loss
(inductor) equal to eager — value and every gradient within 1e-6 relative in
float32 —, at most one recompile over the batch sizes 96, 128, 160 and 200,
value checks that still fire when the compiled graph runs, and ``meta``
inputs that give the right shapes. The losses over the primitives run on the
float32 cells of the test matrix (torch; Triton under its interpreter; CUDA
where there is a GPU); the Gram-matrix losses have no backend.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import tilecl
from tilecl.backends import BACKENDS
from tilecl.backends.ops import OPS, SWEEP_OPS, lse_stats_op
from utils import Combo, assert_rel, matrix

D = 16
SIZES = (96, 128, 160, 200)
COMPILED = matrix(dtypes=(torch.float32,), backends=("torch", "triton", "cuda"), emulated_slow=True)


@dataclasses.dataclass(frozen=True)
class Case:
    """A loss and a factory of its inputs: ``make(n, device, backend) -> (fn, args)``."""

    name: str
    make: Callable[[int, str, str], tuple[Callable[..., torch.Tensor], tuple[Any, ...]]]
    #: the loss runs on the primitives, so on every backend of the matrix
    on_backends: bool = True
    #: also under Triton's CPU interpreter (slow): one case per way of using the primitives
    interpreted: bool = False


def _features(n: int, device: str, seed: int, count: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.nn.functional.normalize(torch.randn(n, D, generator=gen), dim=1).to(device).requires_grad_()
        for _ in range(count)
    ]


def _scale(device: str) -> torch.Tensor:
    return torch.tensor(8.0, device=device, requires_grad=True)


def _clip(n, device, backend):
    a, b = _features(n, device, n)
    return (lambda a, b, s: tilecl.contrastive_loss(a, b, s, backend=backend)), (a, b, _scale(device))


def _labels_and_negatives(n, device, backend):
    a, b, negatives = _features(n, device, n, 3)
    labels = torch.randperm(n, generator=torch.Generator().manual_seed(n)).to(device)

    def loss(a, b, s, labels, negatives):
        return tilecl.contrastive_loss(
            a, b, s, labels=labels, negatives=negatives[:8], symmetric=False, backend=backend
        )

    return loss, (a, b, _scale(device), labels, negatives)


def _clip_module(n, device, backend):
    a, b = _features(n, device, n)
    return tilecl.ClipLoss(backend=backend), (a, b, _scale(device))


def _info_nce_module(n, device, backend):
    a, b = _features(n, device, n)
    module = tilecl.InfoNCELoss(0.1, learn_temperature=True, backend=backend).to(device)
    return module, (a, b)


def _nt_xent(n, device, backend):
    return tilecl.NTXentLoss(0.3, backend=backend), tuple(_features(n, device, n))


def _gamma(n, device, backend):
    a, b = _features(n, device, n)
    gen = torch.Generator().manual_seed(n)
    log_u = [torch.randn(n, generator=gen).to(device) for _ in range(2)]
    return (lambda a, b, s, u, w: tilecl.gamma_contrastive_loss(a, b, u, w, s, backend=backend)), (
        a,
        b,
        _scale(device),
        *log_u,
    )


def _gamma_module(n, device, backend):
    a, b = _features(n, device, n)
    index = torch.randperm(1000, generator=torch.Generator().manual_seed(n))[:n].to(device)
    index[1] = index[0]  # a duplicate index: the E-step's grouping runs
    module = tilecl.GammaContrastiveLoss(1000, estimator="mean", backend=backend).to(device)
    return module, (a, b, index, _scale(device))


def _siglip(n, device, backend):
    a, b = _features(n, device, n)
    bias = torch.tensor(-4.0, device=device, requires_grad=True)
    return tilecl.SigLipLoss(backend=backend), (a, b, _scale(device), bias)


def _siglip_groups_per_row(n, device, backend):
    a, b = _features(n, device, n)
    groups = (torch.arange(n) // 3).to(device)

    def loss(a, b, s, groups):
        return tilecl.sigmoid_loss(
            a, b, s, -2.0, row_groups=groups, col_groups=groups, reduction="none", backend=backend
        ).sum()

    return loss, (a, b, _scale(device), groups)


def _uniformity(n, device, backend):
    return (lambda z: tilecl.uniformity_loss(z, backend=backend)), tuple(_features(n, device, n, 1))


def _separation(n, device, backend):
    def loss(*z):
        return tilecl.feature_separation_loss(*z, 0.2, backend=backend)

    return loss, tuple(_features(n, device, n, 6))


def _geometric(n, device, backend):
    return tilecl.geometric_consistency_loss, tuple(_features(n, device, n, 4))


def _bridge(n, device, backend):
    z = _features(n, device, n, 3)
    t = torch.rand(n, generator=torch.Generator().manual_seed(n)).to(device)
    return tilecl.brownian_bridge_loss, (*z, t)


def _masked_weighted_clip(n, device, backend):
    a, b = _features(n, device, n)
    groups = (torch.arange(n) // 3).to(device)  # three of a kind: two false negatives per row
    weights = torch.rand(n, generator=torch.Generator().manual_seed(n)).to(device)

    def loss(a, b, s, groups, weights):
        return tilecl.contrastive_loss(
            a, b, s, row_groups=groups, col_groups=groups, weights=weights, backend=backend
        )

    return loss, (a, b, _scale(device), groups, weights)


def _supcon(n, device, backend):
    labels = (torch.arange(n) % 7).to(device)
    labels[0] = 100  # an anchor without a positive
    return tilecl.SupConLoss(0.2, backend=backend), (*_features(n, device, n, 1), labels)


CASES = [
    Case("clip", _clip, interpreted=True),
    Case("labels-hard-negatives", _labels_and_negatives),
    Case("ClipLoss", _clip_module),
    Case("InfoNCELoss-learnable", _info_nce_module),
    Case("NTXentLoss", _nt_xent, interpreted=True),
    Case("gamma-surrogate", _gamma),
    Case("GammaContrastiveLoss", _gamma_module, interpreted=True),
    Case("SigLipLoss", _siglip, interpreted=True),
    Case("sigmoid-groups-none", _siglip_groups_per_row),
    Case("masked-weighted-clip", _masked_weighted_clip, interpreted=True),
    Case("SupConLoss", _supcon),
    Case("uniformity", _uniformity, interpreted=True),
    Case("feature-separation", _separation),
    Case("geometric-consistency", _geometric, on_backends=False),
    Case("brownian-bridge", _bridge, on_backends=False),
]


def _cells() -> list[Any]:
    """Every case on every float32 cell of the matrix (one cell for the backend-free losses)."""
    params = []
    for case in CASES:
        for cell in COMPILED if case.on_backends else COMPILED[:1]:
            combo = cell.values[0]
            params.append(pytest.param(case, combo, id=f"{case.name}-{combo.id}", marks=cell.marks))
    return params


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _skip_unless_runnable(combo: Combo, case: Case) -> None:
    reasons = combo.reasons()
    if reasons:
        pytest.skip(f"{combo.backend}/{combo.device}: {'; '.join(reasons)}")
    if combo.backend == "triton" and combo.device == "cpu" and not case.interpreted:
        pytest.skip("under the interpreter, one case per way of using the primitives (all of them on a GPU)")


def _leaves(fn: Any, args: tuple[Any, ...]) -> list[torch.Tensor]:
    """The tensors that get gradients: the inputs that require grad and the module's parameters."""
    params = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []
    return [x for x in args if isinstance(x, torch.Tensor) and x.requires_grad] + params


def _loss_and_grads(fn: Any, args: tuple[Any, ...]) -> list[torch.Tensor]:
    loss = fn(*args)
    return [loss.detach(), *torch.autograd.grad(loss, _leaves(fn, args))]


@pytest.mark.parametrize("case,combo", _cells())
def test_no_graph_breaks(case, combo):
    _skip_unless_runnable(combo, case)
    fn, args = case.make(64, combo.device, combo.backend)
    explained = torch._dynamo.explain(fn)(*args)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("case,combo", _cells())
def test_compiled_equals_eager(case, combo):
    """inductor with ``fullgraph=True``: the loss and every gradient within 1e-6 relative of eager."""
    _skip_unless_runnable(combo, case)
    fn, args = case.make(64, combo.device, combo.backend)
    twin = copy.deepcopy(fn) if isinstance(fn, torch.nn.Module) else fn
    eager = _loss_and_grads(fn, args)
    compiled = _loss_and_grads(torch.compile(twin, fullgraph=True), args)
    for i, (x, y) in enumerate(zip(compiled, eager)):
        assert_rel(x, y, 1e-6, f"{case.name} output {i}", atol=1e-7)
    if isinstance(fn, tilecl.GammaContrastiveLoss):  # the memory update compiled too
        for name, buffer in fn.named_buffers():
            assert torch.equal(buffer, dict(twin.named_buffers())[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("case,combo", _cells())
def test_changing_the_batch_size_recompiles_at_most_once(case, combo):
    _skip_unless_runnable(combo, case)
    if combo.device == "cpu" and combo.backend == "triton":
        pytest.skip("what recompiles is the trace around the opaque op, whichever backend: torch covers it")
    counter = CompileCounter()
    compiled: Any = None
    for n in SIZES:
        fn, args = case.make(n, combo.device, combo.backend)
        if compiled is None:
            compiled = torch.compile(fn, backend=counter, fullgraph=True)
        _loss_and_grads(compiled, args)
    assert counter.frame_count <= 2


@pytest.mark.slow
def test_a_compiled_training_step_equals_eager():
    """A two-tower model with a learnable scale: three SGD steps, compiled (model + loss) and eager."""

    class TwoTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.image, self.text = torch.nn.Linear(12, D), torch.nn.Linear(10, D)
            self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))
            self.loss = tilecl.ClipLoss(backend="torch")

        def forward(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
            a = torch.nn.functional.normalize(self.image(images), dim=1)
            b = torch.nn.functional.normalize(self.text(texts), dim=1)
            return self.loss(a, b, self.logit_scale.exp())

    torch.manual_seed(0)
    eager = TwoTower()
    compiled = copy.deepcopy(eager)
    step = torch.compile(compiled, fullgraph=True)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (eager, compiled)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        images, texts = torch.randn(48, 12, generator=gen), torch.randn(48, 10, generator=gen)
        for run, optimizer in zip((eager, step), optimizers):
            optimizer.zero_grad()
            run(images, texts).backward()
            optimizer.step()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert_rel(q, p, 1e-6, name, atol=1e-7)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(scale=-1.0), "logit_scale must be finite and > 0"),
        (dict(scale=float("nan")), "logit_scale must be finite and > 0"),
        # inductor's own bounds check on the gather of the labels may fire first
        (dict(label=40), r"labels must lie in \[0, M\)|index out of bounds"),
    ],
)
def test_value_checks_fire_inside_a_compiled_graph(bad, match):
    """No host read under compilation: the checks are device assertions, raised when the graph runs."""
    a, b = _features(32, "cpu", 0)
    labels = torch.arange(32)
    labels[3] = bad.get("label", 3)
    scale = torch.tensor(bad.get("scale", 8.0))
    compiled = torch.compile(lambda a, b, s, y: tilecl.contrastive_loss(a, b, s, labels=y), fullgraph=True)
    with pytest.raises(RuntimeError, match=match):
        compiled(a, b, scale, labels)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CASES])
def test_meta_tensors_give_shapes(case):
    """No data, no kernel: the ops' fake implementations give every output and gradient shape."""
    fn, args = case.make(24, "cpu", "torch")
    meta = tuple(
        x.detach().to("meta").requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
        for x in args
    )
    fn = fn.to("meta") if isinstance(fn, torch.nn.Module) else fn
    loss = fn(*meta)
    assert loss.device.type == "meta" and loss.shape == ()
    grads = torch.autograd.grad(loss, _leaves(fn, meta))
    assert [g.shape for g in grads] == [x.shape for x in _leaves(fn, meta)]


@pytest.mark.parametrize("combo", matrix(with_oracle=True, emulated_slow=True), indirect=True)
def test_opcheck_every_registered_op(combo):
    """``torch.library.opcheck``: schema, fake implementation, autograd registration, AOT tracing."""
    assert {op._qualname for op in OPS} == {
        "tilecl::lse_stats",
        "tilecl::softmax_sweep",
        "tilecl::sigmoid_sweep",
    }
    n, m = 6, 9
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(k, 5, generator=gen).to(combo.device, combo.dtype) for k in (n, m))
    scale = torch.tensor(2.0, dtype=torch.float64, device=combo.device)
    targets = torch.randint(0, m, (n,), generator=gen).to(combo.device)
    # the group mask (false negatives): row and column ids, each row's kept column
    groups = (
        torch.randint(0, 3, (n,), generator=gen).to(combo.device),
        torch.randint(0, 3, (m,), generator=gen).to(combo.device),
        targets,
    )
    unmasked = (None,) * 3
    calls = [(a, b, False, unmasked, False), (a, b, True, unmasked, False), (a, b, False, groups, False)]
    # one tensor on both sides (NT-Xent's), which a backend may compute from S's symmetry
    calls.append((a, a, True, unmasked, True))
    for left, right, exclude_diagonal, mask, shared in calls:
        scores = (combo.backend, left, right, scale, exclude_diagonal, *mask, shared)
        forward = (*scores, targets.remainder(right.shape[0]), 0 if shared else n)
        torch.library.opcheck(lse_stats_op, forward)
        # realistic terms: the softmax's own offsets and 1/N weights (G ≤ 1 fits every dtype)
        row_lse, col_lse, *_ = lse_stats_op(*forward)
        terms = (row_lse, torch.full_like(row_lse, 1 / n), col_lse, torch.full_like(col_lse, 1 / n))
        torch.library.opcheck(SWEEP_OPS["softmax"], (*scores, *terms, None, None, True))
        # with the positives' one-hot in G (every softmax loss whose positive is a column of b)
        positives = (targets.remainder(right.shape[0]), torch.full_like(row_lse, 1 / n))
        torch.library.opcheck(SWEEP_OPS["softmax"], (*scores, *terms, *positives, True))
    if "sigmoid" not in BACKENDS[combo.backend].forms:
        return
    bias = torch.tensor(-3.0, dtype=torch.float64, device=combo.device)
    keys = torch.arange(n, device=combo.device), torch.arange(m, device=combo.device)
    weights = torch.ones(n, dtype=torch.float64 if combo.dtype == torch.float64 else torch.float32)
    for with_grads in (False, True):
        sweep = (
            combo.backend,
            a,
            b,
            scale,
            False,
            *(None,) * 3,
            False,
            bias,
            *keys,
            weights.to(combo.device),
            with_grads,
        )
        torch.library.opcheck(SWEEP_OPS["sigmoid"], sweep)
