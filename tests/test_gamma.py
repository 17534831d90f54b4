"""The gamma-augmented loss: functional surrogate, E-step memory, module, invariants, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tilecl
from tilecl.gamma import em_update, gamma_log_weights
from tilecl.testing import oracle as reference
from utils import assert_rel


def inputs(n, m, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.randn(m, d, generator=gen, dtype=torch.float64), dim=1)
    log_u = torch.randn(n, generator=gen, dtype=torch.float64)
    log_uc = torch.randn(n, generator=gen, dtype=torch.float64)
    return a.requires_grad_(), b.requires_grad_(), log_u, log_uc


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (7, 7, 3), (11, 16, 5)])
def test_surrogate_matches_oracle(symmetric, reduction, n, m, d, tile_bytes):
    a, b, log_u, log_uc = inputs(n, m, d, seed=n + m)
    s = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    loss = tilecl.gamma_contrastive_loss(
        a,
        b,
        log_u,
        log_uc if symmetric else None,
        s,
        symmetric=symmetric,
        reduction=reduction,
        backend="torch",
    )
    upstream = torch.linspace(-1, 2, n, dtype=torch.float64) if reduction == "none" else None
    ga, gb, gs = torch.autograd.grad(loss, (a, b, s), grad_outputs=upstream)
    ref = reference.gamma_contrastive_loss(
        a.detach().numpy(), b.detach().numpy(), log_u.numpy(), log_uc.numpy() if symmetric else None, 6.0,
        symmetric=symmetric, reduction=reduction, grad_output=None if upstream is None else upstream.numpy(),
    )  # fmt: skip
    for name, x, r in zip(("loss", "grad_a", "grad_b", "grad_s"), (loss, ga, gb, gs), ref):
        assert_rel(x, r, 1e-10, name)


def test_surrogate_with_labels_shared_columns_and_positives(tile_bytes):
    a, b, log_u, log_uc = inputs(6, 9, 4, seed=3)
    labels = torch.tensor([8, 2, 2, 0, 5, 2])  # column 2 is three pairs' positive
    loss = tilecl.gamma_contrastive_loss(a, b, log_u, log_uc, 3.0, labels=labels, backend="torch")
    ref = reference.gamma_contrastive_loss(
        a.detach().numpy(), b.detach().numpy(), log_u.numpy(), log_uc.numpy(), 3.0, labels=labels.numpy()
    )
    assert_rel(loss, ref.loss, 1e-10, "loss")
    for name, x, r in zip(("grad_a", "grad_b"), grads(loss, a, b), (ref.grad_a, ref.grad_b)):
        assert_rel(x, r, 1e-10, name)
    p = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    loss = tilecl.gamma_contrastive_loss(
        a, b, log_u, None, 3.0, symmetric=False, positives=p, backend="torch"
    )
    ref = reference.gamma_contrastive_loss(
        a.detach().numpy(), b.detach().numpy(), log_u.numpy(), None, 3.0, symmetric=False,
        positives=p.detach().numpy(),
    )  # fmt: skip
    assert_rel(loss, ref.loss, 1e-10, "loss")
    for name, x, r in zip(
        ("a", "b", "p"), grads(loss, a, b, p), (ref.grad_a, ref.grad_b, ref.grad_positives)
    ):
        assert_rel(x, r, 1e-10, name)


def test_decoupled_infonce_matches_oracle(tile_bytes):
    a, b, _, _ = inputs(5, 8, 3, seed=4)
    p = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    loss = tilecl.contrastive_loss(a, b, s, symmetric=False, positives=p, backend="torch")
    ref = reference.contrastive_loss(
        a.detach().numpy(), b.detach().numpy(), 2.0, symmetric=False, positives=p.detach().numpy()
    )
    ours = (loss, *grads(loss, a, b, s, p))
    for name, x, r in zip(("loss", "a", "b", "s", "p"), ours, (ref.loss, *ref[1:4], ref.grad_positives)):
        assert_rel(x, r, 1e-10, name)


@pytest.mark.parametrize("symmetric", [True, False])
def test_alpha1_gamma1_mean_estimator_gives_exactly_the_infonce_gradient(symmetric, tile_bytes):
    a, b, _, _ = inputs(9, 12 if not symmetric else 9, 5, seed=7)
    s = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    module = tilecl.GammaContrastiveLoss(50, alpha=1.0, gamma=1.0, estimator="mean", symmetric=symmetric)
    index = torch.randperm(50)[:9]
    surrogate = module(a, b, index, s)
    g_gamma = grads(surrogate, a, b, s)
    infonce = tilecl.contrastive_loss(a, b, s, symmetric=symmetric)
    g_info = grads(infonce, a, b, s)
    for x, y in zip(g_gamma, g_info):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(module.last_infonce, infonce.detach())


def test_module_step_matches_oracle_e_step_and_m_step():
    gen = torch.Generator().manual_seed(0)
    module = tilecl.GammaContrastiveLoss(20, alpha=1.5, gamma=0.3, estimator="sample", generator=gen)
    ref_memory = {d: (np.zeros(20), np.zeros(20, dtype=bool)) for d in ("rows", "cols")}
    for step, index in enumerate([torch.tensor([3, 7, 1, 3, 9]), torch.tensor([7, 0, 3, 12, 19])]):
        a, b, _, _ = inputs(5, 5, 4, seed=10 + step)
        loss = module(a, b, index, 4.0)
        ga, gb = grads(loss, a, b)
        s = 4.0 * a.detach().numpy() @ b.detach().numpy().T
        log_d = {"rows": reference.logsumexp(s, 1) - np.log(5), "cols": reference.logsumexp(s, 0) - np.log(5)}
        for direction in ("rows", "cols"):
            mem, vis = reference.gamma_em_update(*ref_memory[direction], index.numpy(), log_d[direction], 0.3)
            ref_memory[direction] = (mem, vis)
            torch.testing.assert_close(
                getattr(module, f"log_memory_{direction}"), torch.tensor(mem), rtol=1e-12, atol=0
            )
            assert torch.equal(getattr(module, f"visited_{direction}"), torch.tensor(vis))
        log_u, log_uc = module.last_log_u
        ref = reference.gamma_contrastive_loss(
            a.detach().numpy(), b.detach().numpy(), log_u.numpy(), log_uc.numpy(), 4.0
        )
        assert_rel(loss, ref.loss, 1e-10, "loss")
        assert_rel(ga, ref.grad_a, 1e-10, "grad_a")
        assert_rel(gb, ref.grad_b, 1e-10, "grad_b")


def test_first_visit_takes_batch_value_and_duplicates_are_averaged():
    log_memory = torch.tensor([5.0, 5.0, 5.0], dtype=torch.float64)
    visited = torch.tensor([False, True, False])
    index = torch.tensor([0, 1, 0])
    log_d = torch.log(torch.tensor([1.0, 4.0, 3.0], dtype=torch.float64))
    at_batch = em_update(log_memory, visited, index, log_d, 0.25)
    first, second = math.log(2.0), math.log(0.75 * math.exp(5) + 0.25 * 4)  # index 0: mean of 1 and 3
    torch.testing.assert_close(at_batch, torch.tensor([first, second, first], dtype=torch.float64))
    assert log_memory.tolist() == [5.0, 5.0, 5.0]  # the function never writes the memory


def test_step_is_deterministic_given_memory_and_seed():
    def run(estimator, seed):
        module = tilecl.GammaContrastiveLoss(
            30, gamma=0.5, estimator=estimator, generator=torch.Generator().manual_seed(seed)
        )
        outs = []
        for step in range(3):
            a, b, _, _ = inputs(6, 6, 3, seed=step)
            loss = module(a, b, torch.arange(6) * 5 % 30, 3.0)
            outs.append((loss.detach(), *grads(loss, a, b), module.log_memory_rows.clone()))
        return outs

    for estimator in ("mean", "sample"):
        for x, y in zip(run(estimator, 1), run(estimator, 1)):
            for p, q in zip(x, y):
                assert torch.equal(p, q)
    assert not torch.equal(run("sample", 1)[-1][0], run("sample", 2)[-1][0])


def test_sampled_weights_average_to_the_mean_estimator():
    log_memory = torch.log(torch.tensor([0.5, 2.0, 10.0], dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([gamma_log_weights(log_memory, 2.5, "sample", gen).exp() for _ in range(20000)])
    mean_weight = gamma_log_weights(log_memory, 2.5, "mean").exp()
    # Gamma(α, rate D): mean α/D, sd sqrt(α)/D; 5 standard errors
    tolerance = 5 * math.sqrt(2.5) / log_memory.exp() / math.sqrt(20000)
    assert torch.all((draws.mean(0) - mean_weight).abs() < tolerance)


def test_state_dict_round_trip_and_eval_mode_freezes_memory():
    module = tilecl.GammaContrastiveLoss(10, gamma=0.5, estimator="mean")
    a, b, _, _ = inputs(4, 4, 3)
    module(a, b, torch.tensor([1, 2, 3, 4]), 2.0)
    state = {k: t.clone() for k, t in module.state_dict().items()}
    assert set(state) == {
        "log_memory_rows",
        "visited_rows",
        "log_memory_cols",
        "visited_cols",
        "_extra_state",
    }
    restored = tilecl.GammaContrastiveLoss(10, gamma=0.5, estimator="mean")
    restored.load_state_dict(state)
    for k, t in restored.state_dict().items():
        assert torch.equal(t, state[k])
    restored.eval()
    restored(a, b, torch.tensor([5, 6, 7, 8]), 2.0)
    for k, t in restored.state_dict().items():
        assert torch.equal(t, state[k])


BAD_MODULES = [
    (dict(num_samples=0), ValueError, "num_samples"),
    (dict(num_samples=5, gamma=0.0), ValueError, "gamma must lie"),
    (dict(num_samples=5, gamma=1.5), ValueError, "gamma must lie"),
    (dict(num_samples=5, alpha=0.0), ValueError, "alpha must be"),
    (dict(num_samples=5, estimator="median"), ValueError, "estimator must be"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_MODULES)
def test_bad_constructor_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        tilecl.GammaContrastiveLoss(**kwargs)


@pytest.mark.parametrize(
    "index,error,message",
    [
        (torch.tensor([0, 1, 2, 10]), ValueError, "index must lie in"),
        (torch.tensor([0, 1, -1, 2]), ValueError, "index must lie in"),
        (torch.tensor([0, 1, 2]), ValueError, "index must have shape"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), TypeError, "index must be an int64"),
    ],
)
def test_bad_index_raises_and_leaves_memory_unchanged(index, error, message):
    module = tilecl.GammaContrastiveLoss(10, gamma=0.5)
    a, b, _, _ = inputs(4, 4, 3)
    module(a, b, torch.tensor([0, 1, 2, 3]), 2.0)
    before = {k: t.clone() for k, t in module.state_dict().items()}
    with pytest.raises(error, match=message):
        module(a, b, index, 2.0)
    with pytest.raises(ValueError, match="logit_scale must be finite"):
        module(a, b, torch.tensor([4, 5, 6, 7]), float("nan"))
    for k, t in module.state_dict().items():
        assert torch.equal(t, before[k])


def test_functional_bad_log_weights():
    a, b, log_u, _ = inputs(4, 4, 3)
    with pytest.raises(ValueError, match="log_u_cols is required"):
        tilecl.gamma_contrastive_loss(a, b, log_u, None, 1.0)
    with pytest.raises(ValueError, match="log_u_rows must have shape"):
        tilecl.gamma_contrastive_loss(a, b, log_u[:2], log_u, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        tilecl.gamma_contrastive_loss(a, b, log_u * float("nan"), log_u, 1.0)
    with pytest.raises(ValueError, match="positives"):
        tilecl.contrastive_loss(a, b, 1.0, positives=a)  # symmetric with decoupled positives


# --------------------------------------------------------------------------- reliability


def test_a_non_finite_batch_never_writes_the_memory_and_names_its_indices():
    """One NaN row used to commit NaN into that row's and the whole batch's column entries, and the
    γ-mixing kept it forever (every later step on those indices NaN, silently)."""
    module = tilecl.GammaContrastiveLoss(10, gamma=0.5, estimator="mean", backend="torch")
    a, b, _, _ = inputs(4, 4, 3, seed=5)
    module(a, b, torch.tensor([0, 1, 2, 3]), 2.0)
    before = {k: t.clone() for k, t in module.state_dict().items()}
    poisoned = a.detach().clone()
    poisoned[1, 0] = math.nan
    with pytest.warns(RuntimeWarning, match=r"dataset indices \[1, 5, 6, 7\]"):
        loss = module(poisoned, b, torch.tensor([6, 1, 5, 7]), 2.0)
    assert not torch.isfinite(loss)
    for k, t in module.state_dict().items():
        assert torch.equal(t, before[k]), k
    assert int(module.skipped_updates) == 1
    # the next clean step on the same indices is finite
    assert torch.isfinite(module(a, b, torch.tensor([6, 1, 5, 7]), 2.0))
    assert torch.isfinite(module.log_memory_rows).all() and torch.isfinite(module.log_memory_cols).all()


def test_a_corrupted_memory_is_refused_like_bad_log_weights():
    module = tilecl.GammaContrastiveLoss(10, estimator="mean", backend="torch")
    a, b, _, _ = inputs(4, 4, 3, seed=5)
    module(a, b, torch.tensor([0, 1, 2, 3]), 2.0)
    with torch.no_grad():
        module.log_memory_rows[2] = math.nan  # e.g. a checkpoint written by an older version
    before = {k: t.clone() for k, t in module.state_dict().items()}
    with pytest.raises(ValueError, match="log_memory_rows at the batch's indices must not contain NaN"):
        module(a, b, torch.tensor([0, 1, 2, 3]), 2.0)
    for k, t in module.state_dict().items():  # nothing written by the call that raised
        assert torch.equal(t, before[k]) or (t.isnan() == before[k].isnan()).all(), k


@pytest.mark.parametrize(
    "cast", [lambda m: m.float(), lambda m: m.half(), lambda m: m.bfloat16(), lambda m: m.to(torch.float32)]
)
def test_module_casts_keep_the_memory_float64_and_training_works(cast):
    """model.half() and friends used to convert the memory (rounding it) and break every later step."""
    module = tilecl.GammaContrastiveLoss(10, gamma=0.5, estimator="mean", backend="torch")
    a, b, _, _ = inputs(4, 4, 3, seed=5)
    module(a, b, torch.tensor([0, 1, 2, 3]), 2.0)
    before = module.log_memory_rows.clone()
    assert cast(module) is module
    assert module.log_memory_rows.dtype == module.log_memory_cols.dtype == torch.float64
    assert torch.equal(module.log_memory_rows, before)  # not rounded through the cast dtype
    module(a.float(), b.float(), torch.tensor([2, 3, 4, 5]), 2.0)
    assert set(module.state_dict()) >= {"log_memory_rows", "log_memory_cols"}


def test_checkpoint_restores_the_sampling_generator():
    def make():
        return tilecl.GammaContrastiveLoss(10, generator=torch.Generator().manual_seed(3), backend="torch")

    a, b, _, _ = inputs(4, 4, 3, seed=5)
    module = make()
    module(a, b, torch.tensor([0, 1, 2, 3]), 2.0)
    checkpoint = {k: t.clone() for k, t in module.state_dict().items()}
    expected = module(a, b, torch.tensor([4, 5, 6, 7]), 2.0)
    resumed = make()
    resumed.load_state_dict(checkpoint)
    assert torch.equal(resumed(a, b, torch.tensor([4, 5, 6, 7]), 2.0), expected)


def test_meta_init_then_to_empty_and_share_memory_move_the_memory():
    with torch.device("meta"):
        module = tilecl.GammaContrastiveLoss(10, backend="torch")
    module.to_empty(device="cpu")
    assert module.log_memory_rows.device.type == "cpu" and module.log_memory_rows.dtype == torch.float64
    module.share_memory()
    assert module.log_memory_rows.is_shared() and module.visited_rows.is_shared()


def test_a_checkpoint_without_the_generator_state_still_loads():
    module = tilecl.GammaContrastiveLoss(10, generator=torch.Generator().manual_seed(0), backend="torch")
    old = {k: t for k, t in module.state_dict().items() if k != "_extra_state"}  # written by 0.1.0
    tilecl.GammaContrastiveLoss(10, generator=torch.Generator(), backend="torch").load_state_dict(old)


def test_the_private_torch_fallbacks_behave_like_the_private_ops():
    """_compat's fallbacks (used only if torch drops DelayedError or _standard_gamma), run directly."""
    from tilecl import _compat

    draws = _compat._marsaglia_tsang(
        torch.full((40000,), 0.5, dtype=torch.float64), torch.Generator().manual_seed(1)
    )
    assert (draws > 0).all()
    assert abs(float(draws.mean()) - 0.5) < 0.02 and abs(float(draws.var()) - 0.5) < 0.05  # Gamma(α, 1): α, α
    x = torch.ones(3, requires_grad=True)
    (guarded,) = _compat._RefuseGradient.apply("no second derivative", x * 2)
    with pytest.raises(RuntimeError, match="no second derivative"):
        guarded.sum().backward()
