"""The CUDA C++ kernels (csrc/) against the oracle, run through the CPU emulation (backend="cuda-emu").

The emulation compiles the same kernel source with g++ (built once per source hash under
build/cuda-emu/) and runs it with one fiber per CUDA thread; half and bfloat16 take the sm_80
tensor-core (WMMA) path. Tiles are 64 x 64 with 32-wide feature chunks and 512 gradient
features per block (X staged in 8- or 16-row chunks), so the larger shapes here span several row
and column tiles, feature chunks, X chunks and (WIDE) gradient blocks, with ragged edges
everywhere.

Race detection: the emulation runs the fibers of a block in one order between synchronization
points; the oracle tests run under the forward (thread 0 first) and the reverse order, and the
results must be bitwise the same under every order (a shuffled one included), which a missing
barrier breaks. The FMA path the 16-bit types take below sm_80 runs through a second emulation
module built without tensor cores.

The last tests compile the real extension with nvcc for sm_80 and sm_90, warnings as errors, and
check ptxas's report: no spills, shared memory within the static limit, tensor-core instructions
in the 16-bit kernels; and build, link and import the real extension (warnings as errors).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_contrastive import check_nt_xent_by_rule, make_inputs, oracle, run

import tilecl
from conftest import assert_close_by_rule, assert_rel
from tilecl import _cuda_build, reference
from tilecl.backends import resolve_backend
from tilecl.cuda_backend import emulation_settings
from tilecl.naive import naive_contrastive_loss

LOW = [torch.float32, torch.bfloat16, torch.float16]
NAMES = ("loss", "grad_a", "grad_b", "grad_scale")
# (1, 1, 1): a single element; (37, 45, 40): one tile, two feature chunks, ragged;
# (70, 130, 150): 2 x 3 tiles, 5 feature chunks, ragged gradient X chunks
SHAPES = [(1, 1, 1), (37, 45, 40), (70, 130, 150)]
# D above the gradient blocks' width (DOUT = 512): 2 feature blocks along grid.y, the last one
# ragged; 2 x 2 tiles, the last ones ragged (2 and 6 lines: most X chunks skipped)
WIDE = (66, 70, 600)

missing = _cuda_build.emulation_buildable()
pytestmark = pytest.mark.skipif(missing is not None, reason=f"cuda-emu cannot be built here: {missing}")


@pytest.fixture(scope="module")
def emu():
    return _cuda_build.load_emulation()


@pytest.fixture(params=["forward", "reverse"])
def schedule(request):
    """Run a test with the fibers in thread order and in reverse thread order."""
    with emulation_settings(schedule=request.param):
        yield request.param


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("n,m,d", SHAPES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_oracle_by_rule(dtype, n, m, d, symmetric, schedule):
    if symmetric and m < n:
        pytest.skip("symmetric needs M >= N")
    a, b = make_inputs(n, m, d, dtype=dtype, seed=n + d)
    ours = run(tilecl.contrastive_loss, a, b, 12.0, symmetric=symmetric, backend="cuda-emu")
    naive = run(naive_contrastive_loss, a, b, 12.0, symmetric=symmetric)
    ref = oracle(a, b, 12.0, symmetric=symmetric)
    for name, x, y, r in zip(NAMES, ours, naive, ref):
        if name in ("grad_a", "grad_b"):
            assert x.dtype == dtype
        assert_close_by_rule(x, y, r, dtype, name)


@pytest.mark.parametrize("dtype", LOW)
def test_wide_d_spans_several_gradient_blocks(dtype, schedule):
    n, m, d = WIDE
    a, b = make_inputs(n, m, d, dtype=dtype, seed=9)
    ours = run(tilecl.contrastive_loss, a, b, 12.0, symmetric=True, backend="cuda-emu")
    naive = run(naive_contrastive_loss, a, b, 12.0, symmetric=True)
    ref = oracle(a, b, 12.0, symmetric=True)
    for name, x, y, r in zip(NAMES, ours, naive, ref):
        assert_close_by_rule(x, y, r, dtype, name)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_labels_hard_negatives_reductions(dtype, symmetric, reduction):
    # M > N: hard-negative columns; repeated labels share a column in the symmetric direction
    n, m = 11, 83
    a, b = make_inputs(n, m, 20, dtype=dtype, seed=3)
    labels = torch.tensor([18, 0, 3, 3, 7, 10, 1, 2, 70, 16, 4])
    upstream = torch.linspace(-1, 1, n) if reduction == "none" else None
    kw = dict(labels=labels, symmetric=symmetric, reduction=reduction)
    ours = run(tilecl.contrastive_loss, a, b, 5.0, upstream, backend="cuda-emu", **kw)
    naive = run(naive_contrastive_loss, a, b, 5.0, upstream, **kw)
    ref = oracle(a, b, 5.0, upstream, labels=labels.numpy(), symmetric=symmetric, reduction=reduction)
    for name, x, y, r in zip(NAMES, ours, naive, ref):
        assert_close_by_rule(x, y, r, dtype, name)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("symmetric", [True, False])
def test_extreme_logits_unnormalized(dtype, symmetric):
    a, b = make_inputs(24, 69, 16, dtype=dtype, seed=5, spread=3.0, normalize=False)
    ours = run(tilecl.contrastive_loss, a, b, 100.0, symmetric=symmetric, backend="cuda-emu")
    assert all(torch.isfinite(x).all() for x in ours)
    naive = run(naive_contrastive_loss, a, b, 100.0, symmetric=symmetric)
    ref = oracle(a, b, 100.0, symmetric=symmetric)
    for name, x, y, r in zip(NAMES, ours, naive, ref):
        assert_close_by_rule(x, y, r, dtype, name)


@pytest.mark.parametrize("dtype", LOW)
def test_nt_xent_excludes_the_diagonal(dtype):
    check_nt_xent_by_rule("cuda-emu", dtype, 35, 24, 0.1)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("symmetric", [True, False])
def test_gamma_surrogate_weights(dtype, symmetric):
    a, b = make_inputs(40, 40, 20, dtype=dtype, seed=2)
    gen = torch.Generator().manual_seed(0)
    log_u, log_uc = torch.randn(40, generator=gen), torch.randn(40, generator=gen)
    kw = dict(symmetric=symmetric)
    loss = tilecl.gamma_contrastive_loss(a, b, log_u, log_uc, 6.0, backend="cuda-emu", **kw)
    ref = reference.gamma_contrastive_loss(
        a.detach().double().numpy(), b.detach().double().numpy(), log_u.double().numpy(),
        log_uc.double().numpy(), 6.0, **kw,
    )  # fmt: skip
    torch_loss = tilecl.gamma_contrastive_loss(a, b, log_u, log_uc, 6.0, backend="torch", **kw)
    ours = (loss, *torch.autograd.grad(loss, (a, b)))
    same_dtype = (torch_loss, *torch.autograd.grad(torch_loss, (a, b)))
    for name, x, y, r in zip(NAMES, ours, same_dtype, ref):
        assert_close_by_rule(x, y, r, dtype, name)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("n,d", [(2, 1), (23, 17), (67, 9)])
def test_uniformity(dtype, n, d):
    gen = torch.Generator().manual_seed(n)
    z = (2 * torch.randn(n, d, generator=gen)).to(dtype).requires_grad_()
    loss = tilecl.uniformity_loss(z, 2.0, backend="cuda-emu")
    (grad,) = torch.autograd.grad(loss, z)
    ref = reference.uniformity_loss(z.detach().double().numpy(), t=2.0)
    if dtype == torch.float32:
        assert_rel(loss, ref.loss, 2e-5, "loss", atol=2e-5)
        assert_rel(grad, ref.grads[0], 2e-5, "grad", atol=2e-5)
    torch_loss = tilecl.uniformity_loss(z, 2.0, backend="torch")
    (torch_grad,) = torch.autograd.grad(torch_loss, z)
    assert_close_by_rule(loss, torch_loss, ref.loss, dtype, "loss")
    assert_close_by_rule(grad, torch_grad, ref.grads[0], dtype, "grad")


def test_primitives_match_the_reference_backend():
    """lse_stats / offset_backward directly, with every kind of missing term."""
    emu, ref = (
        resolve_backend("cuda-emu", torch.device("cpu")),
        resolve_backend("reference", torch.device("cpu")),
    )
    n, m, d = 45, 71, 33
    a, b = (x.detach().float() for x in make_inputs(n, m, d, seed=1, normalize=False))
    scale = torch.tensor(3.0)
    targets = torch.randint(0, m, (n,), generator=torch.Generator().manual_seed(0))
    for exclude in (False, True):
        for col_count in (0, 30, m):
            ours = emu.lse_stats(a, b, scale, targets, col_count, exclude)
            want = ref.lse_stats(a, b, scale, targets, col_count, exclude)
            for name, x, y in zip(("row_lse", "col_lse", "positive"), ours, want):
                assert x.dtype == torch.float32 and x.shape == y.shape
                finite = torch.isfinite(y)
                assert torch.equal(torch.isneginf(x), torch.isneginf(y)), name  # excluded: -inf, not NaN
                if finite.any():
                    assert_rel(x[finite], y[finite].numpy(), 1e-6, name)
        row_lse, col_lse, _ = ref.lse_stats(a, b, scale, targets, 30, exclude)
        c = row_lse.float().clone()
        c[3], c[7] = -math.inf, math.inf  # a non-finite row offset counts as 0 (the reference's rule)
        g = torch.linspace(0.5, 1.5, n)
        g[5] = 0.0
        r = col_lse.float().clone()
        r[2], r[4] = math.inf, -math.inf  # no term in these columns, whatever the multiplier
        h = torch.linspace(1.0, 0.1, 30)
        h[6] = 0.0
        # keep the rows' exps finite: offsets c = 0 next to logits up to scale·|a||b|
        a_small, b_small = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
        ours = emu.offset_backward(a_small, b_small, scale, c, g, r, h, exclude)
        want = ref.offset_backward(a_small, b_small, scale, c, g, r, h, exclude)
        for name, x, y in zip(("grad_a", "grad_b", "grad_scale"), ours, want):
            assert torch.isfinite(x).all(), name
            assert_rel(x, y.numpy(), 2e-6, name, atol=1e-6)


def test_fully_masked_rows_and_columns_are_minus_inf_not_nan():
    emu = resolve_backend("cuda-emu", torch.device("cpu"))
    a, b = torch.randn(1, 5), torch.randn(1, 5)
    row, col, pos = emu.lse_stats(a, b, torch.tensor(2.0), torch.zeros(1, dtype=torch.long), 1, True)
    assert row.item() == col.item() == pos.item() == -math.inf
    grad_a, grad_b, grad_scale = emu.offset_backward(
        a, b, torch.tensor(2.0), row, torch.ones(1), col, torch.ones(1), True
    )
    assert not grad_a.any() and not grad_b.any() and grad_scale.item() == 0.0


@pytest.mark.parametrize("dtype", LOW)
def test_results_do_not_depend_on_the_scheduling_order(dtype):
    """Forward, reverse and shuffled fiber orders give bitwise the same results: no race between
    synchronization points (a missing barrier makes the result depend on the order)."""
    a, b = make_inputs(70, 130, 150, dtype=dtype, seed=6)
    results = {}
    for order, seed in (("forward", 0), ("reverse", 0), ("shuffled", 1)):
        with emulation_settings(schedule=order, seed=seed):
            results[order] = run(tilecl.contrastive_loss, a, b, 8.0, symmetric=True, backend="cuda-emu")
    for order in ("reverse", "shuffled"):
        for name, x, y in zip(NAMES, results[order], results["forward"]):
            assert torch.equal(x, y), (order, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,m,d", [(37, 45, 40), (70, 130, 150), WIDE])
def test_fma_path_of_16_bit_types_below_sm80(dtype, n, m, d):
    """The pre-sm_80 path (TILECL_TENSOR_CORES 0: 16-bit inputs through the FMA loop) against the
    oracle, and against the tensor-core path, which it matches bitwise except grad_scale (the
    emulated WMMA accumulates in the same k order; only the partials' summation order differs)."""
    a, b = make_inputs(n, m, d, dtype=dtype, seed=n + d)
    with emulation_settings(tensor_cores=False):
        assert _cuda_build.load_emulation(tensor_cores=False).TENSOR_CORES is False
        ours = run(tilecl.contrastive_loss, a, b, 12.0, symmetric=True, backend="cuda-emu")
    naive = run(naive_contrastive_loss, a, b, 12.0, symmetric=True)
    ref = oracle(a, b, 12.0, symmetric=True)
    for name, x, y, r in zip(NAMES, ours, naive, ref):
        assert_close_by_rule(x, y, r, dtype, name)
    mma = run(tilecl.contrastive_loss, a, b, 12.0, symmetric=True, backend="cuda-emu")
    for name, x, y in zip(NAMES, ours, mma):
        if name == "grad_scale":
            assert_rel(x, y.double().numpy(), 1e-5, name, atol=1e-6)
        else:
            assert torch.equal(x, y), name


def test_bitwise_reproducible():
    a, b = make_inputs(70, 130, 150, dtype=torch.bfloat16, seed=4)
    first = run(tilecl.contrastive_loss, a, b, 8.0, backend="cuda-emu")
    second = run(tilecl.contrastive_loss, a, b, 8.0, backend="cuda-emu")
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def test_non_contiguous_and_strided_inputs():
    base = torch.randn(50, 80)
    a = base[:40, ::2]  # column stride 2: copied to a unit column stride
    b = base[3:43, 10:50]  # row stride 80, unit column stride: passed as is
    kw = dict(symmetric=True)
    ours = run(tilecl.contrastive_loss, a.clone().requires_grad_(), b.clone().requires_grad_(), 4.0,
               backend="cuda-emu", **kw)  # fmt: skip
    a2, b2 = a.contiguous().requires_grad_(), b.contiguous().requires_grad_()
    want = run(tilecl.contrastive_loss, a2, b2, 4.0, backend="torch", **kw)
    for name, x, y in zip(NAMES, ours, want):
        assert_rel(x, y.detach().numpy(), 1e-5, name, atol=1e-6)
    # the view itself reaches the kernel with its row stride
    emu = resolve_backend("cuda-emu", torch.device("cpu"))
    targets = torch.arange(40)
    stats = emu.lse_stats(a.contiguous(), b, torch.tensor(4.0), targets, 40)
    dense = emu.lse_stats(a.contiguous(), b.contiguous(), torch.tensor(4.0), targets, 40)
    for x, y in zip(stats, dense):
        assert torch.equal(x, y)


def test_bad_inputs_raise_before_any_launch():
    emu = resolve_backend("cuda-emu", torch.device("cpu"))
    a, b = torch.randn(4, 3), torch.randn(5, 3)
    t = torch.zeros(4, dtype=torch.long)
    with pytest.raises(TypeError, match="backend='torch' for float64"):
        tilecl.contrastive_loss(a.double(), b.double()[:4], backend="cuda-emu")
    with pytest.raises(ValueError, match="share dtype"):
        emu.lse_stats(a, b.half(), torch.tensor(1.0), t, 0)
    with pytest.raises(ValueError, match="feature dimension"):
        emu.lse_stats(a, torch.randn(5, 2), torch.tensor(1.0), t, 0)
    with pytest.raises(ValueError, match="col_count"):
        emu.lse_stats(a, b, torch.tensor(1.0), t, 6)
    with pytest.raises(ValueError, match="targets"):
        emu.lse_stats(a, b, torch.tensor(1.0), t[:3], 0)
    with pytest.raises(ValueError, match="scale must be finite"):
        emu.lse_stats(a, b, torch.tensor(math.nan), t, 0)
    with pytest.raises(ValueError, match="row_mult"):
        emu.offset_backward(
            a, b, torch.tensor(1.0), torch.zeros(4), torch.zeros(3), torch.zeros(0), torch.zeros(0)
        )
    with pytest.raises(ValueError, match="col_offset"):
        emu.offset_backward(
            a, b, torch.tensor(1.0), torch.zeros(4), torch.zeros(4), torch.zeros(6), torch.zeros(6)
        )
    with pytest.raises(RuntimeError, match="needs CPU tensors"):
        tilecl.contrastive_loss(
            torch.randn(3, 2, device="meta"), torch.randn(3, 2, device="meta"), backend="cuda-emu"
        )


def test_missing_extension_says_how_to_build_it():
    from tilecl.cuda_backend import cuda_built

    if cuda_built():
        pytest.skip("tilecl._cuda is built here")
    with pytest.raises(RuntimeError, match="make cuda"):
        resolve_backend("cuda", torch.device("cuda"))


# --------------------------------------------------------------------------- the emulation layer itself


def test_emulated_collectives(emu):
    out = torch.tensor(emu.selftest_collectives(2)).view(2, 64, 7)
    lanes = torch.arange(64)
    warp_sums = torch.where(lanes < 32, 496, 496 + 32 * 32)  # Σ lanes of each warp
    down = torch.where(lanes % 32 == 31, lanes, lanes + 1)  # the last lane keeps its own value
    for block in range(2):
        assert torch.equal(out[block, :, 0], warp_sums)
        assert torch.equal(out[block, :, 1], down)
        assert (out[block, :, 2] == np.int32(np.uint32(0xAAAAAAAA))).all()  # odd lanes
        assert torch.equal(out[block, :, 3], (lanes < 32).int())  # lane 5 is in warp 0 only
        assert (out[block, :, 4] == 1).all()
        assert (out[block, :, 5] == 64).all()  # every atomicAdd landed before the barrier released
        assert (out[block, :, 6] == 2016 + block).all()


def test_emulation_reports_divergent_barriers_and_misaligned_wmma(emu):
    with pytest.raises(RuntimeError, match="not reached by every thread"):
        emu.selftest_divergent_barrier()
    with pytest.raises(RuntimeError, match="256-bit aligned"):
        emu.selftest_misaligned_wmma()


@pytest.mark.parametrize("kind", [0, 1, 2, 3, 4])
def test_emulation_reports_divergent_warp_collectives(emu, kind):
    """WMMA calls and shuffles are warp rendezvous points: every lane must arrive through the same call."""
    match = "not reached by every lane" if kind in (0, 2) else "divergent warp synchronization"
    with pytest.raises(RuntimeError, match=match):
        emu.selftest_divergent_warp(kind)


def test_reverse_order_exposes_a_missing_barrier(emu):
    """Thread 0 writes shared memory that thread 127 reads without a barrier between: the forward
    order hides the race (thread 0 runs first), the reverse order reads the stale value."""
    seen = {}
    for order in ("forward", "reverse", "shuffled"):
        emu.set_schedule(order, 3)
        try:
            seen[order] = (emu.selftest_missing_barrier(False), emu.selftest_missing_barrier(True))
        finally:
            emu.set_schedule("forward", 0)
    assert seen["forward"] == (42, 42)
    assert seen["reverse"] == (0, 42)  # the race shows; with the barrier the result is right
    assert seen["shuffled"][1] == 42
    with pytest.raises(ValueError, match="schedule must be"):
        with emulation_settings(schedule="backwards"):
            pass


def test_emulated_16_bit_conversions_round_like_torch(emu):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=gen) * torch.logspace(-9, 6, 20000)
    edges = [65504.0, 65519.99, 65520.0, 1e-8, 2.98e-8, 5.96e-8, 6.1e-5, math.inf, -math.inf, 3e38, -0.0]
    x = torch.cat([x, torch.tensor(edges)])
    half = torch.tensor(emu.float_to_half_bits(x.tolist())).to(torch.int16)
    assert torch.equal(half, x.half().view(torch.int16))
    bf16 = torch.tensor(emu.float_to_bf16_bits(x.tolist())).to(torch.int16)
    assert torch.equal(bf16, x.bfloat16().view(torch.int16))
    bits = [v for v in range(65536) if not ((v >> 10) & 31 == 31 and v & 1023)]  # every non-NaN half
    back = torch.tensor(emu.half_bits_to_float(bits))
    assert torch.equal(
        back, torch.tensor(bits, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    )


def test_emulated_wmma_product(emu):
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(16, 16, generator=gen), torch.randn(16, 16, generator=gen)
    c = torch.tensor(emu.selftest_wmma(a.flatten().tolist(), b.t().flatten().tolist())).view(16, 16)
    want = a.half().double() @ b.half().double()
    assert (c.double() - want).abs().max() < 1e-5


# --------------------------------------------------------------------------- the real extension, compiled


@pytest.fixture(scope="module")
def nvcc_report():
    if _cuda_build.find_nvcc() is None:
        pytest.skip("nvcc not found")
    return _cuda_build.nvcc_report()


def test_nvcc_builds_every_kernel_for_sm80_and_sm90_without_warnings(nvcc_report):
    combos = {(k["name"], k["dtype"], k["arch"]) for k in nvcc_report["kernels"]}
    names = {"row_stats", "col_stats", "grad_rows", "grad_cols", "sum_partials"}
    assert combos == {
        (name, dtype, arch)
        for name in names
        for dtype in ("float32", "float16", "bfloat16")
        for arch in ("sm_80", "sm_90")
    }
    assert "-Werror" in nvcc_report["flags"]


def test_zero_spills_and_shared_memory_within_the_static_limit(nvcc_report):
    for k in nvcc_report["kernels"]:
        where = (k["name"], k["dtype"], k["arch"])
        assert k["spill_store_bytes"] == k["spill_load_bytes"] == 0, where
        assert k["stack_bytes"] == 0, where
        assert 0 < k["registers"] <= 255, where
        assert 0 < k["shared_bytes"] <= 48 * 1024, where


def test_tensor_cores_in_the_16_bit_kernels(nvcc_report):
    for k in nvcc_report["kernels"]:
        uses = k["tensor_core_instructions"] > 0
        expected = k["dtype"] != "float32" and k["name"] != "sum_partials"
        assert uses == expected, (k["name"], k["dtype"], k["arch"], k["tensor_core_instructions"])


def test_real_extension_builds_links_and_imports():
    """tilecl._cuda built as setup.py builds it (nvcc objects, host-compiled bindings.cpp, nvcc link),
    warnings as errors in both compilers, and imported in a fresh process: no GPU is needed to
    import it (static cudart loads the driver on the first CUDA call)."""
    if _cuda_build.find_nvcc() is None:
        pytest.skip("nvcc not found")
    library = _cuda_build.build_extension_cached()
    probe = (
        "import importlib.util, json, sys\n"
        "spec = importlib.util.spec_from_file_location('tilecl._cuda', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "info = {'names': dir(module), 'emulated': module.EMULATED, 'archs': module.ARCHS}\n"
        "print(json.dumps(info))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(library)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout.splitlines()[-1])
    assert {"lse_stats", "offset_backward", "workspace_floats"} <= set(info["names"])
    assert info["emulated"] is False and info["archs"] == "80,90"


def test_capability_check_of_the_real_extension():
    from tilecl.cuda_backend import runs_on

    built = [(8, 0), (9, 0)]
    assert runs_on((8, 0), built) and runs_on((8, 6), built) and runs_on((8, 9), built)
    assert runs_on((9, 0), built) and runs_on((10, 0), built)  # the sm_90 PTX JIT-compiles
    assert not runs_on((7, 5), built) and not runs_on((7, 0), built)
    assert runs_on((7, 0), None) and not runs_on((6, 1), None)


def test_sizes_past_the_32_bit_tile_loops_are_refused():
    from tilecl.cuda_backend import MAX_DIM

    assert MAX_DIM == 2**31 - 64
    emu = resolve_backend("cuda-emu", torch.device("cpu"))
    huge = torch.zeros(1, 1).expand(MAX_DIM + 1, 1)  # a stride-0 view: no memory behind it
    with pytest.raises(ValueError, match="2\\^31 - 64"):
        emu.lse_stats(huge, torch.zeros(3, 1), torch.tensor(1.0), torch.zeros(1, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="2\\^31 - 64"):
        emu.lse_stats(torch.zeros(3, 1), huge, torch.tensor(1.0), torch.zeros(3, dtype=torch.long), 0)
