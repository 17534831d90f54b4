"""Every loss on every backend, device and dtype (the matrix of ``tests/utils.py``) against the oracle.

Written once: each test takes a ``combo`` — torch, reference, triton (under
Triton's interpreter on CPU tensors), cuda-emu (the CUDA C++ source through the
CPU emulation) and, on a machine with CUDA, torch, reference, triton and cuda
on CUDA tensors. The shapes cross several tiles and feature chunks of every
backend (the torch backend runs with ~20 x 20 tiles here, the interpreter with
16 x 16, the CUDA kernels with 64 x 64 and 32-wide feature chunks), with
ragged edges. Values and all three gradients (``a``, ``b``, ``logit_scale``)
must meet the error rule: ``≤ 2×`` naive PyTorch's error in the same dtype.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tilecl
from tilecl.backends import BACKENDS, FLOAT_DTYPES, OffsetTerms, Scores, resolve_backend
from tilecl.testing import oracle as reference
from tilecl.testing.naive import naive_contrastive_loss, naive_nt_xent_loss
from utils import (
    CROSSING_TILES,
    NAMES,
    Combo,
    assert_all_close_by_rule,
    assert_close_by_rule,
    assert_rel,
    host,
    make_inputs,
    matrix,
    max_error,
    oracle,
    run,
)

ALL = matrix()
#: the emulated cells in make test only: tests whose kernel paths the fast tests on ALL already take
ALL_EMULATED_SLOW = matrix(emulated_slow=True)
#: with the reference backend: what the primitive-level property tests and the listing check take
EVERY = matrix(with_oracle=True)
LOW = matrix(dtypes=(torch.float32, torch.bfloat16, torch.float16))
# (1, 1, 1): one element; (13, 17, 5): hard-negative columns, primes; (37, 45, 40): two 32-wide
# feature chunks; CROSSING_TILES: several of the cell's tiles, ragged everywhere (Combo.crossing_shape)
SHAPES = [(1, 1, 1), (13, 17, 5), (37, 45, 40), CROSSING_TILES]


def loss_fn(combo: Combo):
    def on_backend(a, b, s, **kw):
        return tilecl.contrastive_loss(a, b, s, backend=combo.backend, **kw)

    return on_backend


@pytest.mark.parametrize("combo", ALL, indirect=True)
@pytest.mark.parametrize("n,m,d", SHAPES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_values_and_gradients(combo, n, m, d, symmetric):
    n, m, d = combo.crossing_shape() if n is None else (n, m, d)
    a, b = combo.inputs(n, m, d, seed=n + d)
    ours = run(loss_fn(combo), a, b, 12.0, symmetric=symmetric)
    naive = run(naive_contrastive_loss, a, b, 12.0, symmetric=symmetric)
    assert ours[0].dtype == combo.result_dtype  # the reference backend's statistics stay float64
    assert ours[1].dtype == ours[2].dtype == combo.dtype
    assert ours[1].device == a.device
    assert_all_close_by_rule(ours, naive, oracle(a, b, 12.0, symmetric=symmetric), combo)


def nearly_saturated(combo: Combo, n: int, d: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit pairs a little apart: at scale 100 each row's loss ``LSE − S⁺`` is far below one ulp of
    ``LSE`` (7.6e-6 in float32 at |S| ≈ 100)."""
    gen = torch.Generator().manual_seed(n + d)
    a = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(
        a + noise * torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1
    )
    return tuple(x.to(combo.device, combo.dtype).requires_grad_() for x in (a, b))  # type: ignore[return-value]


@pytest.mark.parametrize("combo", ALL, indirect=True)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("noise", [0.25, 0.35])
def test_a_nearly_saturated_batch(combo, symmetric, noise):
    """A nearly saturated row's loss (1e-5 < ℓ < 1e-2 at scale 100) takes its LSE's rounding
    residual (LseStats.row_lse_low) as well: its error is within 2x the full-matrix loss's plus four
    ulps of 1 in the accumulation dtype (the resolution of ``Σ exp(S − max)``, a sum near 1), where
    ``LSE − S⁺`` alone was off by up to half an ulp of |S| ≈ 100 (3.8e-6 in float32): a loss of
    1e-3 to 0.4 %, one below 4e-6 rounded to 0."""
    n, _, d = combo.crossing_shape()
    a, b = nearly_saturated(combo, n, max(d, 16), noise)
    per_row = dict(symmetric=symmetric, reduction="none", grad_output=torch.ones(n, dtype=torch.float64))
    ours = run(loss_fn(combo), a, b, 100.0, **per_row)[0].detach().double().cpu()
    naive = run(naive_contrastive_loss, a, b, 100.0, **per_row)[0].detach().double().cpu()
    want = torch.as_tensor(oracle(a, b, 100.0, **per_row)[0])
    saturated = (want > 1e-5) & (want < 1e-2)
    assert saturated.any(), "no nearly saturated row: the inputs do not test what they should"
    error, naive_error = ((x - want).abs()[saturated].max() for x in (ours, naive))
    resolution = 4 * torch.finfo(combo.result_dtype).eps
    assert error <= 2 * naive_error + resolution, (float(error), float(naive_error))


@pytest.mark.parametrize("combo", matrix(dtypes=(torch.float64, torch.float32)), indirect=True)
@pytest.mark.parametrize("symmetric", [True, False])
def test_rows_with_zero_weight_at_large_logits(combo, symmetric):
    """A masked row (upstream weight 0) whose logits overflow exp: its term is 0, not exp(S)·0 = inf·0."""
    a, b = combo.inputs(12, 12, 6, seed=3)
    with torch.no_grad():
        b.copy_(a + 0.01 * b)  # a_i·b_i ≈ 1: S_ii ≈ scale, past exp's overflow (88.7 / 709.8)
    scale = 100.0 if combo.dtype == torch.float32 else 800.0
    mask = torch.tensor([1.0, 0.0] * 6, dtype=torch.float64)
    kw = dict(symmetric=symmetric, reduction="none")
    ours = run(loss_fn(combo), a, b, scale, mask, **kw)
    assert all(torch.isfinite(x).all() for x in ours)
    ref = oracle(a, b, scale, mask, symmetric=symmetric, reduction="none")
    # saturated rows: LSE − S⁺ and softmax − onehot cancel; LSE is one rounding of a value near the
    # scale, so the error is a few ulp of the scale (the naive log-softmax cancels a little better)
    for name, x, r in zip(NAMES, ours, ref):
        assert_rel(x, r, 0.0, name, atol=16 * torch.finfo(combo.dtype).eps * scale)


@pytest.mark.parametrize("combo", ALL, indirect=True)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("poison", ["nan-in-a", "inf-in-b"])
def test_nan_and_inf_inputs_propagate_like_the_full_matrix_loss(combo, symmetric, poison):
    """A NaN or inf feature makes exactly the values the naive loss makes non-finite non-finite:
    never a finite (wrong) gradient that a scaler or clipping would then apply."""
    a, b = combo.inputs(13, 17, 5, seed=7)
    with torch.no_grad():
        if poison == "nan-in-a":
            a[3, 1] = math.nan
        else:
            b[2, 0] = math.inf
    ours = run(loss_fn(combo), a, b, 3.0, symmetric=symmetric)
    naive = run(naive_contrastive_loss, a, b, 3.0, symmetric=symmetric)
    for name, x, y in zip(NAMES, ours, naive):
        assert not torch.isfinite(y).all(), name  # the poison reaches every output of the naive loss
        assert torch.equal(torch.isfinite(x), torch.isfinite(y)), f"{name}: finite where naive is not"


@pytest.mark.parametrize("combo", ALL_EMULATED_SLOW, indirect=True)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_labels_hard_negatives_reductions(combo, symmetric, reduction):
    # M > N: hard-negative columns; repeated labels share a column in the symmetric direction
    n, m = 11, 83
    a, b = combo.inputs(n, m, 20, seed=3)
    labels = torch.tensor([18, 0, 3, 3, 7, 10, 1, 2, 70, 16, 4], device=a.device)
    upstream = torch.linspace(-1, 1, n, dtype=torch.float64) if reduction == "none" else None
    kw = dict(labels=labels, symmetric=symmetric, reduction=reduction)
    ours = run(loss_fn(combo), a, b, 5.0, upstream, **kw)
    naive = run(naive_contrastive_loss, a, b, 5.0, upstream, **kw)
    ref = oracle(
        a, b, 5.0, upstream, labels=host(labels).astype(int), symmetric=symmetric, reduction=reduction
    )
    assert_all_close_by_rule(ours, naive, ref, combo)


@pytest.mark.parametrize("combo", matrix(dtypes=(torch.float64, torch.float32)), indirect=True)
@pytest.mark.parametrize("symmetric", [True, False])
def test_extreme_logits_unnormalized(combo, symmetric):
    """logit_scale 100 on unnormalized inputs: |S| in the thousands (the exact fallbacks run)."""
    a, b = combo.inputs(24, 69, 16, seed=5, spread=3.0, normalize=False)
    assert float((100 * host(a) @ host(b).T).__abs__().max()) > 1000
    ours = run(loss_fn(combo), a, b, 100.0, symmetric=symmetric)
    assert all(torch.isfinite(x).all() for x in ours)
    naive = run(naive_contrastive_loss, a, b, 100.0, symmetric=symmetric)
    assert_all_close_by_rule(ours, naive, oracle(a, b, 100.0, symmetric=symmetric), combo)


@pytest.mark.parametrize("combo", matrix(dtypes=(torch.float64, torch.float32)), indirect=True)
def test_extreme_logits_with_columns_nobody_points_to(combo):
    """Symmetric loss whose labels skip columns: those columns carry no term and must not poison G."""
    a, b = combo.inputs(12, 20, 8, seed=8, spread=3.0, normalize=False)
    labels = torch.tensor([19, 0, 3, 3, 7, 10, 1, 2, 5, 16, 4, 4], device=a.device)
    kw = dict(labels=labels, symmetric=True)
    ours = run(loss_fn(combo), a, b, 100.0, **kw)
    assert all(torch.isfinite(x).all() for x in ours)
    naive = run(naive_contrastive_loss, a, b, 100.0, **kw)
    ref = oracle(a, b, 100.0, labels=host(labels).astype(int), symmetric=True)
    assert_all_close_by_rule(ours, naive, ref, combo)


@pytest.mark.parametrize("combo", ALL, indirect=True)
@pytest.mark.parametrize("n", [1, 35])
def test_nt_xent(combo, n):
    """The self-similarity excluded (a diagonal through several tiles), partners as positives."""
    z1, z2 = combo.inputs(n, n, 24, seed=9, normalize=False)
    temperature = 0.1 if combo.dtype != torch.float64 else 0.02
    ours = tilecl.nt_xent_loss(z1, z2, temperature, backend=combo.backend)
    naive = naive_nt_xent_loss(z1, z2, temperature)
    ref = reference.nt_xent_loss(host(z1), host(z2), temperature)
    grads, naive_grads = torch.autograd.grad(ours, (z1, z2)), torch.autograd.grad(naive, (z1, z2))
    assert_all_close_by_rule((ours, *grads), (naive, *naive_grads), ref, combo, ("loss", "z1", "z2"))


def naive_gamma_loss(a, b, log_u, log_uc, scale, symmetric):
    """The gamma surrogate with ``S`` stored whole, in the inputs' dtype."""
    logits = scale * a @ b.t()
    n, m = a.shape[0], b.shape[0]
    positive = logits.diagonal()
    per_pair = torch.exp(log_u.to(logits) + torch.logsumexp(logits, 1) - math.log(m)) - positive
    if symmetric:
        col = torch.exp(log_uc.to(logits) + torch.logsumexp(logits, 0)[:n] - math.log(n))
        per_pair = (per_pair + col - positive) / 2
    return per_pair.mean()


@pytest.mark.parametrize("combo", ALL_EMULATED_SLOW, indirect=True)
@pytest.mark.parametrize("symmetric", [True, False])
def test_gamma_surrogate_weights(combo, symmetric):
    a, b = combo.inputs(40, 47, 20, seed=2)
    gen = torch.Generator().manual_seed(0)
    log_u, log_uc = (torch.randn(40, generator=gen, dtype=torch.float64).to(a.device) for _ in range(2))
    log_u[3] = log_uc[5] = -math.inf  # u = 0: those pairs' terms drop out
    log_uc_or_none = log_uc if symmetric else None
    kw = dict(symmetric=symmetric)
    ours = run(
        lambda a_, b_, s, **k: tilecl.gamma_contrastive_loss(
            a_, b_, log_u, log_uc_or_none, s, backend=combo.backend, **k
        ),
        a, b, 6.0, **kw,
    )  # fmt: skip
    naive = run(lambda a_, b_, s, **k: naive_gamma_loss(a_, b_, log_u, log_uc, s, **k), a, b, 6.0, **kw)
    ref = reference.gamma_contrastive_loss(
        host(a), host(b), host(log_u), host(log_uc) if symmetric else None, 6.0, **kw
    )
    assert_all_close_by_rule(ours, naive, ref[:4], combo)


def naive_uniformity(z, t):
    """Wang & Isola's uniformity with every pairwise distance stored, in the input's dtype.

    Distances as ``torch.cdist`` computes them for more than 25 rows: ``‖x‖² + ‖y‖² − 2x·y``.
    """
    n = z.shape[0]
    norms = (z * z).sum(1)
    sq = norms[:, None] + norms[None, :] - 2 * z @ z.t()
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=z.device)
    return torch.logsumexp(-t * sq[off_diagonal], 0) - math.log(n * (n - 1))


@pytest.mark.parametrize("combo", ALL_EMULATED_SLOW, indirect=True)
@pytest.mark.parametrize("n,d", [(2, 1), (23, 17), (67, 9)])
def test_uniformity(combo, n, d):
    # unit rows, as the regularizers take them (unnormalized features: test_modality.py, float64)
    z, _ = combo.inputs(n, 1, d, seed=n)
    loss = tilecl.uniformity_loss(z, 2.0, backend=combo.backend)
    naive = naive_uniformity(z, 2.0)
    ref = reference.uniformity_loss(host(z), t=2.0)
    grads, naive_grads = torch.autograd.grad(loss, z), torch.autograd.grad(naive, z)
    assert_all_close_by_rule((loss, *grads), (naive, *naive_grads), (ref.loss, *ref.grads), combo)


#: error of the primitives themselves against the float64 reference on the same rounded inputs:
#: float32 accumulation, and the kernels round G to the input type before the second product
PRIMITIVE_REL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("combo", ALL, indirect=True)
def test_primitives_with_every_kind_of_missing_term(combo):
    """lse_stats / the softmax sweep directly against the reference backend."""
    device = torch.device(combo.device)
    ours = resolve_backend(combo.backend, device, combo.dtype)
    ref = resolve_backend("reference", device, combo.dtype)
    # 2 x 3 interpreter tiles, 2 feature chunks (the CUDA kernels' own blocking: test_cuda_emu.py)
    n, m, d = 29, 41, 21
    a, b = (x.detach() for x in combo.inputs(n, m, d, seed=1, normalize=False))
    scale = torch.tensor(3.0, device=device)
    targets = torch.randint(0, m, (n,), generator=torch.Generator().manual_seed(0)).to(device)
    rel = PRIMITIVE_REL[combo.dtype]
    for exclude in (False, True):
        for col_count in (0, 18, m):
            got = ours.lse_stats(Scores(a, b, scale, exclude), targets, col_count)
            want = ref.lse_stats(Scores(a, b, scale, exclude), targets, col_count)
            for name, x, y in zip(("row_lse", "col_lse", "positive"), got, want):
                assert x.shape == y.shape and x.device == device, name
                assert torch.equal(torch.isneginf(x), torch.isneginf(y)), name  # excluded: -inf, not NaN
                finite = torch.isfinite(y)
                if finite.any():
                    assert_rel(x[finite], y[finite], max(rel, 2e-6), name)
        row_lse, col_lse, *_ = ref.lse_stats(Scores(a, b, scale, exclude), targets, 18)
        c = row_lse.float().clone()
        c[3], c[7] = -math.inf, math.inf  # a non-finite row offset counts as 0 (the reference's rule)
        g = torch.linspace(0.5, 1.5, n, device=device)
        g[5] = 0.0
        r = col_lse.float().clone()
        r[2], r[4] = math.inf, -math.inf  # no term in these columns, whatever the multiplier
        h = torch.linspace(1.0, 0.1, 18, device=device)
        h[6] = 0.0
        # keep the rows' exps finite: offsets c = 0 next to logits up to scale·|a||b|
        a_unit, b_unit = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
        terms = OffsetTerms(c, g, r, h)
        got = ours.sweep(Scores(a_unit, b_unit, scale, exclude), terms)
        want = ref.sweep(Scores(a_unit, b_unit, scale, exclude), terms)
        for name, x, y in zip(("grad_a", "grad_b", "grad_scale"), got, want):
            assert torch.isfinite(x).all(), name
            assert_rel(x, y, rel, name, atol=rel)


@pytest.mark.parametrize("combo", matrix(dtypes=(torch.float64, torch.float32)), indirect=True)
def test_softmax_sweep_at_scale_zero(combo):
    """Every logit 0 (the losses refuse logit_scale 0; the primitive still takes it):
    ``Σ G_ij a_i·b_j`` does not come from ``S``."""
    device = torch.device(combo.device)
    ours = resolve_backend(combo.backend, device, combo.dtype)
    ref = resolve_backend("reference", device, combo.dtype)
    a, b = (x.detach() for x in combo.inputs(19, 23, 7, seed=4))
    gen = torch.Generator().manual_seed(1)
    terms = OffsetTerms(*(torch.rand(k, generator=gen).to(device) for k in (19, 19, 23, 23)))
    scores = Scores(a, b, torch.tensor(0.0, device=device))
    for name, x, y in zip(("grad_a", "grad_b", "grad_scale"), ours.sweep(scores, terms),
                          ref.sweep(scores, terms)):  # fmt: skip
        assert_rel(x, y, PRIMITIVE_REL[combo.dtype], name, atol=1e-6)


@pytest.mark.parametrize("combo", EVERY, indirect=True)
def test_fully_masked_rows_and_columns_are_minus_inf_not_nan(combo):
    device = torch.device(combo.device)
    primitives = resolve_backend(combo.backend, device, combo.dtype)
    a, b = (x.detach() for x in combo.inputs(1, 1, 5, normalize=False))
    scale = torch.tensor(2.0, device=device)
    scores = Scores(a, b, scale, exclude_diagonal=True)
    row, col, pos, *_ = primitives.lse_stats(scores, torch.zeros(1, dtype=torch.long, device=device), 1)
    assert row.item() == col.item() == pos.item() == -math.inf
    ones = torch.ones(1, device=device)
    grad_a, grad_b, grad_scale = primitives.sweep(scores, OffsetTerms(row, ones, col, ones))
    assert not grad_a.any() and not grad_b.any() and grad_scale.item() == 0.0


@pytest.mark.parametrize("combo", matrix(dtypes=(torch.float16,)), indirect=True)
@pytest.mark.parametrize("multiplier", [0.5, 1e-6, 1e-9])
def test_float16_gradient_with_tiny_multipliers(combo, multiplier):
    """The multipliers are ~1/N; a float16 G rounded before the second product would be subnormal at
    large N. The backends rescale them by a power of two, so the error stays at float16's rounding."""
    device = torch.device(combo.device)
    n, m, d = 40, 50, 32
    a, b = (x.detach() for x in combo.inputs(n, m, d, normalize=False))
    scale = torch.tensor(5.0, device=device)
    ref, ours = resolve_backend("reference", device, a.dtype), resolve_backend(combo.backend, device, a.dtype)
    scores = Scores(a, b, scale)
    row_lse, col_lse, *_ = ref.lse_stats(scores, torch.arange(n, device=device), n)
    terms = OffsetTerms(row_lse, torch.full((n,), multiplier), col_lse, torch.full((n,), multiplier / 3))
    terms = OffsetTerms(*(x.to(device) for x in terms[:4]))
    got, want = ours.sweep(scores, terms), ref.sweep(scores, terms)
    for name, x, y in zip(("grad_a", "grad_b", "grad_scale"), got, want):
        relative = max_error(x, y) / float(y.abs().max())
        # G rounded to float16 (2^-11) and summed over ~50 terms: 1e-3 is a few roundings
        assert relative < 1e-3, f"{combo.id} {name} at multiplier {multiplier}: relative error {relative:.2e}"


@pytest.mark.parametrize("combo", matrix(dtypes=(torch.float64, torch.float32)), indirect=True)
def test_non_contiguous_and_strided_inputs_just_work(combo):
    base = torch.randn(30, 60, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    base = base.to(combo.device, combo.dtype)
    # column stride 2, row stride 60, transposed
    views = (base[:24, ::2], base[3:27, 10:40], base[:30, :24].t())
    for a, b in ((views[0], views[1]), (views[2], views[1])):
        assert not (a.is_contiguous() and b.is_contiguous())
        ours = run(loss_fn(combo), a.requires_grad_(), b.requires_grad_(), 4.0)
        want = run(loss_fn(combo), *(x.contiguous().detach().requires_grad_() for x in (a, b)), 4.0)
        for name, x, y in zip(NAMES, ours, want):
            assert_rel(x, y, 1e-5 if combo.dtype == torch.float32 else 1e-12, name, atol=1e-6)


@pytest.mark.parametrize("combo", matrix(dtypes=(torch.float32,)), indirect=True)
def test_double_backward_is_refused_clearly(combo):
    a, b = combo.inputs(4, 4, 3)
    loss = tilecl.contrastive_loss(a, b, 2.0, backend=combo.backend)
    (grad_a,) = torch.autograd.grad(loss, (a,), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_a.sum().backward()


#: one loss of each autograd Function (the shared softmax one, sigmoid fused and swept, the row
#: LSE of uniformity, the Grams of the geometric regularizer), of ``(a, b, scale)``
SECOND_ORDER_LOSSES = {
    "contrastive": lambda a, b, s: tilecl.contrastive_loss(a, b, s),
    "sigmoid": lambda a, b, s: tilecl.sigmoid_loss(a, b, s, -1.0),
    "sigmoid-none": lambda a, b, s: tilecl.sigmoid_loss(a, b, s, -1.0, reduction="none").sum(),
    "supcon": lambda a, b, s: tilecl.supcon_loss(torch.cat([a, b]), torch.arange(8) % 4, 0.5),
    "uniformity": lambda a, b, s: tilecl.uniformity_loss(torch.cat([a, b])),
    "geometric": lambda a, b, s: tilecl.geometric_consistency_loss(a, b),
}


@pytest.mark.parametrize("loss_name", list(SECOND_ORDER_LOSSES))
@pytest.mark.parametrize("wrt", ["a", "b", "scale"])
@pytest.mark.parametrize("only", [False, True], ids=["all-require-grad", "only-wrt"])
def test_differentiating_a_gradient_names_tilecl_for_any_input(loss_name, wrt, only):
    """``torch.autograd.grad`` of a gradient, with respect to any input, whichever inputs require
    grad: tilecl's message, not autograd's "appears to not have been used in the graph"."""
    a, b = make_inputs(4, 4, 3, dtype=torch.float64, device="cpu")
    scale = torch.tensor(2.0, dtype=torch.float64)
    inputs = {"a": a, "b": b, "scale": scale}
    for name, x in inputs.items():
        x.requires_grad_(not only or name == wrt)
    used = ("a", "b", "scale") if loss_name in ("contrastive", "sigmoid", "sigmoid-none") else ("a", "b")
    if wrt not in used:
        return
    loss = SECOND_ORDER_LOSSES[loss_name](a, b, scale)
    (grad,) = torch.autograd.grad(loss, (inputs[wrt],), create_graph=True)
    for target in [inputs[name] for name in used if inputs[name].requires_grad]:
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(grad.sum(), (target,), retain_graph=True)


@pytest.mark.parametrize("transform", ["grad", "vmap", "jacrev"])
@pytest.mark.parametrize("loss_name", list(SECOND_ORDER_LOSSES))
def test_torch_func_transforms_are_refused_naming_the_alternative(transform, loss_name):
    a, b = make_inputs(4, 4, 3, dtype=torch.float64, device="cpu")
    scale = torch.tensor(2.0, dtype=torch.float64)
    a, b = a.detach(), b.detach()

    def of_a(x):
        return SECOND_ORDER_LOSSES[loss_name](x, b, scale)

    call = {
        "grad": lambda: torch.func.grad(of_a)(a),
        "vmap": lambda: torch.func.vmap(of_a)(a[None].expand(2, -1, -1)),
        "jacrev": lambda: torch.func.jacrev(of_a)(a),
    }[transform]
    with pytest.raises(RuntimeError, match="torch.func transforms.*loss.backward"):
        call()


@pytest.mark.parametrize("name", list(BACKENDS))
def test_undeclared_dtypes_are_refused_with_the_backends_reason(name):
    """A dtype a backend does not declare raises TypeError before any kernel, naming who takes it."""
    backend = BACKENDS[name]
    for dtype in FLOAT_DTYPES:
        if dtype in backend.dtypes:
            continue
        a, b = make_inputs(3, 3, 2, dtype=dtype, device="cpu")
        reasons = backend.not_supported_reasons(torch.device("cpu"), dtype)
        error = TypeError if all("inputs, got" in r for r in reasons) else RuntimeError
        with pytest.raises(error, match=f"backend='{name}'.*{dtype}"):
            tilecl.contrastive_loss(a, b, 1.0, backend=name)


def test_the_matrix_lists_every_declared_combination():
    cells = {p.values[0].id for p in EVERY}
    for name, backend in BACKENDS.items():
        for device in backend.devices:
            for dtype in backend.dtypes:
                assert (Combo(name, device, dtype).id in cells) == (device != "meta")
    assert {
        "triton/cuda/float32",
        "cuda/cuda/bfloat16",
        "torch/cuda/float64",
        "cuda-emu/cpu/float16",
    } <= cells
    assert np.all([p.values[0].dtype in BACKENDS[p.values[0].backend].dtypes for p in EVERY])


@pytest.mark.parametrize("combo", ALL, indirect=True)
def test_gamma_module_step(combo):
    """GammaContrastiveLoss on every backend: the E-step memory holds the batch's ``log D̂`` and the
    M-step is the surrogate for the module's weights (the ``mean`` estimator: no draw)."""
    n, scale = 21, 4.0
    module = tilecl.GammaContrastiveLoss(40, gamma=1.0, estimator="mean", backend=combo.backend)
    module = module.to(combo.device)
    a, b = combo.inputs(n, n, 8, seed=11)
    index = torch.arange(n, device=a.device) + 5
    ours = run(lambda a_, b_, s: module(a_, b_, index, s), a, b, scale)
    log_u, log_uc = module.last_log_u
    ref = reference.gamma_contrastive_loss(host(a), host(b), host(log_u), host(log_uc), scale)
    naive = run(lambda a_, b_, s: naive_gamma_loss(a_, b_, log_u, log_uc, s, True), a, b, scale)
    assert_all_close_by_rule(ours, naive, ref[:4], combo)
    logits = scale * host(a) @ host(b).T
    want_rows = reference.logsumexp(logits, 1) - np.log(n)
    naive_rows = torch.logsumexp(scale * a.detach() @ b.detach().t(), 1) - math.log(n)
    assert_close_by_rule(module.log_memory_rows[index], naive_rows, want_rows, combo, "row memory")


def naive_feature_separation(z_v, z_t, zi_v, zi_t, zi_va, zi_ta, temperature, t):
    """``L_ortho + L^i_con + L^i_uni`` from full matrices, in the inputs' dtype."""
    ortho = ((z_v * zi_v).sum(1) ** 2 + (z_t * zi_t).sum(1) ** 2).mean()
    scale = 1.0 / temperature
    con = (naive_contrastive_loss(zi_v, zi_va, scale) + naive_contrastive_loss(zi_t, zi_ta, scale)) / 2
    return ortho + con + naive_uniformity(zi_v, t) + naive_uniformity(zi_t, t)


@pytest.mark.parametrize("combo", ALL, indirect=True)
def test_feature_separation(combo):
    """The regularizer whose parts run on a backend (in-modal InfoNCE, uniformity), against float64."""
    views = [combo.inputs(19, 1, 6, seed=k)[0] for k in range(6)]
    exact = [x.detach().double().cpu().requires_grad_() for x in views]
    loss = tilecl.feature_separation_loss(*views, 0.1, 2.0, backend=combo.backend)
    naive = naive_feature_separation(*views, 0.1, 2.0)
    want = naive_feature_separation(*exact, 0.1, 2.0)
    names = ("loss", "z_v", "zi_v", "zi_va")
    ours = (loss, *torch.autograd.grad(loss, (views[0], views[2], views[4])))
    theirs = (naive, *torch.autograd.grad(naive, (views[0], views[2], views[4])))
    exact_out = (want, *torch.autograd.grad(want, (exact[0], exact[2], exact[4])))
    assert_all_close_by_rule(ours, theirs, exact_out, combo, names)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_the_reference_backend_runs_every_loss(dtype):
    """The oracle at the primitive level is also a backend a user may pick: every loss runs on it,
    with float64 statistics whatever the inputs (so the value is that of the inputs cast to float64,
    up to what a loss computes in the inputs' dtype first, e.g. NT-Xent's normalization), and
    lands on the full-matrix loss."""
    a, b = make_inputs(9, 11, 6, dtype=dtype, device="cpu", seed=2)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2, 1])
    cases = [
        (lambda x, y: tilecl.contrastive_loss(x, y, 5.0, backend="reference"), naive_contrastive_loss),
        (lambda x, y: tilecl.nt_xent_loss(x, y[:9], 0.5, backend="reference"), None),
        (lambda x, y: tilecl.sigmoid_loss(x, y, 5.0, -2.0, backend="reference"), None),
        (lambda x, y: tilecl.supcon_loss(x, labels, 0.2, backend="reference"), None),
        (lambda x, y: tilecl.uniformity_loss(x, 2.0, backend="reference"), None),
    ]
    for ours, _ in cases:
        value = ours(a, b)
        exact = ours(a.double(), b.double())
        assert torch.isfinite(value)
        assert_rel(value, exact, 10 * torch.finfo(dtype).eps, "loss")
    naive = naive_contrastive_loss(a.double(), b.double(), 5.0)
    assert_rel(cases[0][0](a, b), naive, 1e-12, "contrastive against the full matrix")


KERNELS_16_BIT = matrix(dtypes=(torch.bfloat16, torch.float16), backends=("triton", "cuda", "cuda-emu"))


@pytest.mark.parametrize("combo", KERNELS_16_BIT, indirect=True)
@pytest.mark.parametrize("symmetric", [True, False])
def test_saturated_rows_have_exactly_zero_gradient_in_16_bit(combo, symmetric):
    """Scale 1000 on ``b = a``: every row's softmax is its positive's one-hot, the loss is exactly 0
    and so is the full-matrix cross entropy's gradient. The kernels subtract the one-hot inside the
    fp32 tile, before ``G`` is rounded to 16 bits for the products: not one digit survives. (The
    torch backend computes ``G`` in float32 and gets within an ulp of 0, not 0: its single-exp
    tiles form ``g + u·v`` with one rounding.)"""
    a, _ = combo.inputs(48, 48, 32, seed=0)  # 1/48, each row's weight, is not a bfloat16 number
    b = a.detach().clone().requires_grad_()
    loss, grad_a, grad_b, _ = run(loss_fn(combo), a, b, 1000.0, symmetric=symmetric)
    assert float(loss) == 0.0
    assert not grad_a.any() and not grad_b.any(), (grad_a.abs().max(), grad_b.abs().max())
