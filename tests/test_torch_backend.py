"""What belongs to the torch backend: exactness in float64 whatever the tiling (``TILE_BYTES``).

The matrix (``test_losses.py``) checks every backend by the error rule; here the
torch backend's tiles are swept (many ragged tiles, medium tiles, one tile) and
float64 results must match the oracle to 1e-10, including a property test over
random shapes, scales and tilings and ``gradcheck``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tilecl
from tilecl.backends import torch as torch_backend
from tilecl.testing import oracle as reference
from utils import DEVICE, assert_rel, count_value_reads, host, make_inputs, oracle, run

SHAPES = [
    (1, 1, 1),  # N=1, D=1
    (1, 5, 3),  # one anchor, hard negatives
    (7, 7, 1),  # D=1
    (13, 13, 11),  # primes
    (17, 23, 5),  # M > N, primes
    (31, 31, 37),
]


@pytest.mark.parametrize("n,m,d", SHAPES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float64_matches_oracle(n, m, d, symmetric, reduction, tile_bytes):
    a, b = make_inputs(n, m, d)
    grad_output = torch.randn(n, dtype=torch.float64).to(DEVICE) if reduction == "none" else None
    kw = dict(symmetric=symmetric, reduction=reduction)
    ours = run(tilecl.contrastive_loss, a, b, 7.0, grad_output, backend="torch", **kw)
    ref = oracle(a, b, 7.0, grad_output, **kw)
    for name, x, r in zip(("loss", "grad_a", "grad_b", "grad_scale"), ours, ref):
        assert_rel(x, r, 1e-10, name)


@pytest.mark.parametrize("symmetric", [True, False])
def test_labels_and_hard_negatives_float64(symmetric, tile_bytes):
    n, m, d = 11, 19, 6
    a, b = make_inputs(n, m, d, seed=3)
    labels = torch.tensor([18, 0, 3, 3, 7, 10, 1, 2, 5, 16, 4], device=DEVICE)
    ours = run(tilecl.contrastive_loss, a, b, 4.0, labels=labels, symmetric=symmetric, backend="torch")
    ref = oracle(a, b, 4.0, labels=host(labels).astype(int), symmetric=symmetric)
    for name, x, r in zip(("loss", "grad_a", "grad_b", "grad_scale"), ours, ref):
        assert_rel(x, r, 1e-10, name)


@pytest.mark.parametrize("symmetric", [True, False])
def test_extreme_logits_unnormalized_float64(symmetric, tile_bytes):
    """logit_scale 100 on unnormalized inputs: |S| in the thousands (the exact fallbacks run)."""
    a, b = make_inputs(24, 29, 16, seed=5, spread=3.0, normalize=False)
    s_max = float((100 * host(a) @ host(b).T).__abs__().max())
    assert s_max > 1000
    ours = run(tilecl.contrastive_loss, a, b, 100.0, symmetric=symmetric, backend="torch")
    assert all(torch.isfinite(x).all() for x in ours)
    ref = oracle(a, b, 100.0, symmetric=symmetric)
    # values of order |S| lose ~|S|·eps to cancellation; compare against that magnitude
    assert abs(float(ours[0].detach()) - ref[0]) <= 1e-12 * s_max
    for name, x, r in zip(("grad_a", "grad_b", "grad_scale"), ours[1:], ref[1:]):
        assert_rel(x, r, 1e-10, name)


@pytest.mark.parametrize("n", [1, 2, 9, 20])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nt_xent_matches_oracle(n, reduction, tile_bytes):
    z1, z2 = make_inputs(n, n, 6, seed=n, normalize=False)
    loss = tilecl.nt_xent_loss(z1, z2, 0.2, reduction=reduction, backend="torch")
    gen = torch.Generator().manual_seed(n)
    upstream = torch.randn(loss.shape, generator=gen, dtype=torch.float64) if reduction == "none" else None
    if upstream is not None:
        upstream = upstream.to(DEVICE)
    g1, g2 = torch.autograd.grad(loss, (z1, z2), grad_outputs=upstream)
    ref = reference.nt_xent_loss(
        host(z1), host(z2), 0.2, reduction, None if upstream is None else host(upstream)
    )
    assert_rel(loss, ref.loss, 1e-10, "loss")
    # N = 1: the partner is the only candidate, the gradient is zero up to rounding
    assert_rel(g1, ref.grad_z1, 1e-10, "grad_z1", atol=1e-13)
    assert_rel(g2, ref.grad_z2, 1e-10, "grad_z2", atol=1e-13)


def test_nt_xent_tiny_temperature_float64(tile_bytes):
    """τ = 0.001 puts |S| near 1000 with the diagonal excluded (the exact fallbacks run)."""
    z1, z2 = make_inputs(16, 16, 8, seed=9, normalize=False)
    loss = tilecl.nt_xent_loss(z1, z2, 0.001, backend="torch")
    g1, g2 = torch.autograd.grad(loss, (z1, z2))
    ref = reference.nt_xent_loss(host(z1), host(z2), 0.001)
    assert abs(float(loss) - ref.loss) <= 1e-12 * 1000
    assert_rel(g1, ref.grad_z1, 1e-10, "grad_z1")
    assert_rel(g2, ref.grad_z2, 1e-10, "grad_z2")


def test_gradcheck_float64(tiny_tiles):
    a, b = make_inputs(5, 8, 3, seed=11, normalize=False)
    s = torch.tensor(2.0, dtype=torch.float64, device=DEVICE, requires_grad=True)
    labels = torch.tensor([7, 0, 2, 2, 5], device=DEVICE)
    for symmetric in (True, False):
        for reduction in ("mean", "sum", "none"):
            assert torch.autograd.gradcheck(
                lambda a_, b_, s_, sym=symmetric, red=reduction: tilecl.contrastive_loss(
                    a_, b_, s_, labels=labels, symmetric=sym, reduction=red, backend="torch"
                ),
                (a, b, s),
            )
    z1, z2 = make_inputs(4, 4, 3, seed=12, normalize=False)
    assert torch.autograd.gradcheck(lambda x, y: tilecl.nt_xent_loss(x, y, 0.4, backend="torch"), (z1, z2))


def test_scale_gradient_flows_to_parameter_shape():
    a, b = make_inputs(6, 6, 4)
    log_scale = torch.nn.Parameter(torch.tensor([1.5], dtype=torch.float64, device=DEVICE))
    tilecl.contrastive_loss(a, b, log_scale.exp(), backend="torch").backward()
    assert log_scale.grad.shape == (1,)


# derandomized: CI runs the same 60 examples every time (run locally with --hypothesis-seed to explore)
@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 24),
    extra=st.integers(0, 9),
    d=st.integers(1, 17),
    log_scale=st.floats(-3.0, 5.3),
    symmetric=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    tile=st.sampled_from([16, 200, 1 << 20]),
    seed=st.integers(0, 2**16),
)
def test_property_float64_matches_oracle(n, extra, d, log_scale, symmetric, reduction, tile, seed):
    """Any shape, any scale in [0.05, 200], any tiling: the oracle's value and gradients."""
    old = torch_backend.TILE_BYTES
    torch_backend.TILE_BYTES = tile
    try:
        a, b = make_inputs(n, n + extra, d, seed=seed, normalize=bool(seed % 2), spread=2.0)
        scale = float(np.exp(log_scale))
        grad_output = torch.ones(n, dtype=torch.float64, device=DEVICE) if reduction == "none" else None
        kw = dict(symmetric=symmetric, reduction=reduction)
        ours = run(tilecl.contrastive_loss, a, b, scale, grad_output, backend="torch", **kw)
        ref = oracle(a, b, scale, grad_output, **kw)
        norm = float(max(a.detach().abs().max(), b.detach().abs().max()))
        # per-term magnitudes of each output, for results that are small by cancellation
        term = (scale * norm**2, scale * norm, scale * norm, norm**2 * d)
        for name, x, r, t in zip(("loss", "grad_a", "grad_b", "grad_scale"), ours, ref, term):
            assert np.all(np.isfinite(host(x)))
            assert_rel(x, r, 1e-9, name, atol=1e-13 * t * n)
    finally:
        torch_backend.TILE_BYTES = old


@pytest.mark.parametrize("exclude_diagonal", [False, True])
@pytest.mark.parametrize("n", [1, 29, 70])
def test_one_tensor_on_both_sides_uses_the_mirrored_tiles(n, exclude_diagonal, tile_bytes):
    """``a is b`` (NT-Xent, one-tower SupCon): the tiles on and above the diagonal give the general
    sweep's statistics and the sum of its two gradients; rows without a term at huge logits stay 0."""
    from tilecl.backends.base import OffsetTerms, Scores

    gen = torch.Generator().manual_seed(n)
    a = torch.randn(n, 6, generator=gen, dtype=torch.float64).to(DEVICE)
    # logits up to ~300: e^S overflows float64's exp(K − 0)
    scale = torch.tensor(60.0, dtype=torch.float64, device=DEVICE)
    targets = torch.randint(0, n, (n,), generator=gen).to(DEVICE)
    general = Scores(a, a.clone(), scale, exclude_diagonal)
    mirrored = Scores(a, a, scale, exclude_diagonal, shared_operands=True)
    want, got = torch_backend.lse_stats(general, targets, 0), torch_backend.lse_stats(mirrored, targets, 0)
    # a target on an excluded diagonal (and n = 1's empty row) is -inf on both paths
    torch.testing.assert_close(got.row_lse, want.row_lse, rtol=1e-13, atol=0)
    torch.testing.assert_close(got.positive, want.positive, rtol=1e-13, atol=0)
    weights = torch.rand(n, generator=gen, dtype=torch.float64).to(DEVICE)
    weights[0] = 0.0  # a row without a term
    empty = torch.zeros(0, dtype=torch.float64, device=DEVICE)
    terms = OffsetTerms(want.row_lse, weights, empty, empty)
    ref = torch_backend.offset_backward(general, terms)
    out = torch_backend.offset_backward(mirrored, terms)
    assert torch.isfinite(out.grad_a).all() and not out.grad_b.any()
    assert_rel(out.grad_a, ref.grad_a + ref.grad_b, 1e-12, "grad of the shared tensor")
    assert_rel(out.grad_scale, ref.grad_scale, 1e-12, "grad scale")


def _every_primitive(
    device: str, dtype: torch.dtype, watch: Callable[[], Any] = contextlib.nullcontext
) -> None:
    """lse_stats (row and column statistics, plain and mirrored), offset_backward (row and column
    terms, plain and mirrored) and sigmoid_sweep, over many tiles, with and without a group mask;
    the inputs are made first, the primitives run inside ``watch()``."""
    from tilecl.backends.base import OffsetTerms, Scores, SigmoidTerms

    n, m, d = 40, 56, 8
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(k, d, generator=gen, dtype=dtype).to(device) for k in (n, m))
    scale, bias = torch.tensor(30.0, dtype=dtype).to(device), torch.tensor(-1.0).to(device)
    targets, ones = torch.arange(n).to(device), torch.ones(n, dtype=torch.float32).to(device)
    groups = (torch.arange(n) % 7).to(device), (torch.arange(m) % 7).to(device)
    keys = torch.arange(n).to(device), torch.arange(m).to(device)
    calls = []
    for masked in (False, True):
        for shared in (False, True):
            col_groups = groups[0] if shared else groups[1]
            kw = dict(row_groups=groups[0], col_groups=col_groups, kept_cols=targets) if masked else {}
            x = a if shared else b
            scores = Scores(a, x, scale, exclude_diagonal=shared, shared_operands=shared, **kw)
            calls.append((scores, 0 if shared and not masked else n))
    with watch():
        for scores, col_count in calls:
            row_lse, col_lse, *_ = torch_backend.lse_stats(scores, targets, col_count)
            torch_backend.offset_backward(scores, OffsetTerms(row_lse, ones, col_lse, ones[:col_count]))
        torch_backend.sigmoid_sweep(Scores(a, b, scale), SigmoidTerms(bias, *keys, ones), True)


def test_tile_loops_never_read_a_value_to_the_host(tiny_tiles, monkeypatch):
    """A read of a tensor's value (``.item()``, ``float()``, ``bool()``, ``.tolist()``, a shape that
    depends on values) stalls an accelerator's stream. On the meta device, where a tensor has no
    values, each of these raises: every primitive runs there through hundreds of tiles. On the CPU,
    where a read is free, the few reads that pick the faster exact paths are made once per call."""
    _every_primitive("meta", torch.float32)

    reads = count_value_reads(monkeypatch)
    _every_primitive("cpu", torch.float32)
    # 4 lse_stats + 4 offset_backward + 1 sigmoid_sweep, each over 100+ tiles of 64 bytes
    assert len(reads) <= 2 * 9, reads


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (the meta-device test stands in for it)"
)
def test_tile_loops_never_synchronize_a_cuda_stream(tiny_tiles):
    """On a GPU: the primitives run with PyTorch's synchronization check set to raise."""

    @contextlib.contextmanager
    def no_sync() -> Iterator[None]:
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    _every_primitive("cuda", torch.float32, no_sync)
