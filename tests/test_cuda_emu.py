"""What belongs to the CUDA C++ backends: the emulation itself, its schedules, and the nvcc build.

The matrix (``test_losses.py``) checks the ``cuda-emu`` backend (and ``cuda`` on a GPU) against
the oracle like every other backend. Here: the shapes that span the CUDA kernels' own blocking
(64 x 64 tiles, 32-wide feature chunks, 512 gradient features per block along grid.y, X staged
in 8- or 16-row chunks), under the forward (thread 0 first) and the reverse fiber order.

Race detection: the emulation runs the fibers of a block in one order between synchronization
points; results must be bitwise the same under every order (a shuffled one included), which a
missing barrier breaks. The FMA path the 16-bit types take below sm_80 runs through a second
emulation module built without tensor cores.

The last tests compile the real extension with nvcc for sm_80 and sm_90, warnings as errors, and
check ptxas's report: no spills, shared memory within the static limit, tensor-core instructions
in the 16-bit kernels; and build, link and import the real extension (warnings as errors).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tilecl
from tilecl import _cuda_build
from tilecl.backends import OffsetTerms, Scores, resolve_backend
from tilecl.backends.cuda import MAX_DIM, cuda_built, emulation_settings, runs_on
from tilecl.testing.naive import naive_contrastive_loss, naive_sigmoid_loss
from utils import (
    NAMES,
    SIGMOID_NAMES,
    assert_all_close_by_rule,
    assert_rel,
    extension_in_a_fresh_process,
    make_inputs,
    oracle,
    run,
    run_sigmoid,
    sigmoid_oracle,
)

LOW = [torch.float32, torch.bfloat16, torch.float16]
CPU = torch.device("cpu")
# (70, 130, 150): 2 x 3 tiles, 5 feature chunks, ragged gradient X chunks
BLOCKED = (70, 130, 150)
# D above the gradient blocks' width (DOUT = 512): 2 feature blocks along grid.y, the last one
# ragged; 2 x 2 tiles, the last ones ragged (2 and 6 lines: most X chunks skipped)
WIDE = (66, 70, 600)

missing = _cuda_build.emulation_buildable()
pytestmark = pytest.mark.skipif(missing is not None, reason=f"cuda-emu cannot be built here: {missing}")


@pytest.fixture(scope="module")
def emu():
    return _cuda_build.load_emulation()


@pytest.fixture(params=["forward", pytest.param("reverse", marks=pytest.mark.slow)])
def schedule(request):
    """Run a test with the fibers in thread order and in reverse thread order (``make test``; the
    scheduling-order tests below compare the orders in ``make test-fast`` too)."""
    with emulation_settings(schedule=request.param):
        yield request.param


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("n,m,d", [BLOCKED, WIDE], ids=["blocked", "wide"])
def test_the_kernels_own_blocking(dtype, n, m, d, schedule):
    a, b = make_inputs(n, m, d, dtype=dtype, device=CPU, seed=9)
    ours = run(tilecl.contrastive_loss, a, b, 12.0, symmetric=True, backend="cuda-emu")
    naive = run(naive_contrastive_loss, a, b, 12.0, symmetric=True)
    assert_all_close_by_rule(ours, naive, oracle(a, b, 12.0, symmetric=True), dtype)


@pytest.mark.parametrize("dtype", LOW)
def test_results_do_not_depend_on_the_scheduling_order(dtype):
    """Forward, reverse and shuffled fiber orders give bitwise the same results: no race between
    synchronization points (a missing barrier makes the result depend on the order)."""
    a, b = make_inputs(*BLOCKED, dtype=dtype, device=CPU, seed=6)
    results = {}
    for order, seed in (("forward", 0), ("reverse", 0), ("shuffled", 1)):
        with emulation_settings(schedule=order, seed=seed):
            results[order] = run(tilecl.contrastive_loss, a, b, 8.0, symmetric=True, backend="cuda-emu")
    for order in ("reverse", "shuffled"):
        for name, x, y in zip(NAMES, results[order], results["forward"]):
            assert torch.equal(x, y), (order, name)


def sigmoid_on_emu(*args, **kw):
    return tilecl.sigmoid_loss(*args, backend="cuda-emu", **kw)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("n,m,d", [BLOCKED, WIDE], ids=["blocked", "wide"])
def test_the_sigmoid_form_in_the_kernels_own_blocking(dtype, n, m, d, schedule):
    """Several row and column tiles, feature chunks along grid.y: the row kernel's first chunk alone
    reports the losses and Σ G, every chunk its share of the products."""
    a, b = make_inputs(n, m, d, dtype=dtype, device=CPU, seed=9)
    ours = run_sigmoid(sigmoid_on_emu, a, b, 10.0, -3.0)
    naive = run_sigmoid(naive_sigmoid_loss, a, b, 10.0, -3.0)
    assert_all_close_by_rule(ours, naive, sigmoid_oracle(a, b, 10.0, -3.0), dtype, SIGMOID_NAMES)


@pytest.mark.parametrize("dtype", LOW)
def test_the_sigmoid_form_does_not_depend_on_the_scheduling_order(dtype):
    a, b = make_inputs(*BLOCKED, dtype=dtype, device=CPU, seed=6)
    results = {}
    for order, seed in (("forward", 0), ("reverse", 0), ("shuffled", 1)):
        with emulation_settings(schedule=order, seed=seed):
            results[order] = run_sigmoid(sigmoid_on_emu, a, b, 10.0, -3.0)
    for order in ("reverse", "shuffled"):
        for x, y in zip(results[order], results["forward"]):
            assert torch.equal(x, y), order


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,m,d", [(37, 45, 40), (70, 130, 150), WIDE])
def test_fma_path_of_16_bit_types_below_sm80(dtype, n, m, d):
    """The pre-sm_80 path (TILECL_TENSOR_CORES 0: 16-bit inputs through the FMA loop) against the
    oracle, and against the tensor-core path, which it matches bitwise except grad_scale (the
    emulated WMMA accumulates in the same k order; only the partials' summation order differs)."""
    a, b = make_inputs(n, m, d, dtype=dtype, device=CPU, seed=n + d)
    with emulation_settings(tensor_cores=False):
        assert _cuda_build.load_emulation(tensor_cores=False).TENSOR_CORES is False
        ours = run(tilecl.contrastive_loss, a, b, 12.0, symmetric=True, backend="cuda-emu")
    naive = run(naive_contrastive_loss, a, b, 12.0, symmetric=True)
    assert_all_close_by_rule(ours, naive, oracle(a, b, 12.0, symmetric=True), dtype)
    mma = run(tilecl.contrastive_loss, a, b, 12.0, symmetric=True, backend="cuda-emu")
    for name, x, y in zip(NAMES, ours, mma):
        if name == "grad_scale":
            assert_rel(x, y, 1e-5, name, atol=1e-6)
        else:
            assert torch.equal(x, y), name


def test_bitwise_reproducible():
    a, b = make_inputs(*BLOCKED, dtype=torch.bfloat16, device=CPU, seed=4)
    first = run(tilecl.contrastive_loss, a, b, 8.0, backend="cuda-emu")
    second = run(tilecl.contrastive_loss, a, b, 8.0, backend="cuda-emu")
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def test_a_row_strided_view_reaches_the_kernel_as_is():
    base = torch.randn(50, 80)
    a = base[:40, ::2]
    b = base[3:43, 10:50]  # row stride 80, unit column stride: passed with its stride, not copied
    emu = resolve_backend("cuda-emu", CPU, torch.float32)
    targets = torch.arange(40)
    stats = emu.lse_stats(Scores(a.contiguous(), b, torch.tensor(4.0)), targets, 40)
    dense = emu.lse_stats(Scores(a.contiguous(), b.contiguous(), torch.tensor(4.0)), targets, 40)
    for x, y in zip(stats, dense):
        assert torch.equal(x, y)


def test_bad_inputs_raise_before_any_launch():
    emu = resolve_backend("cuda-emu", CPU, torch.float32)
    a, b = torch.randn(4, 3), torch.randn(5, 3)
    t = torch.zeros(4, dtype=torch.long)
    one = torch.tensor(1.0)
    with pytest.raises(TypeError, match="backend='cuda-emu' cannot run torch.float64.*torch"):
        tilecl.contrastive_loss(a.double(), b.double()[:4], backend="cuda-emu")
    with pytest.raises(ValueError, match="share dtype"):
        emu.lse_stats(Scores(a, b.half(), one), t, 0)
    with pytest.raises(ValueError, match="feature dimension"):
        emu.lse_stats(Scores(a, torch.randn(5, 2), one), t, 0)
    with pytest.raises(ValueError, match="col_count"):
        emu.lse_stats(Scores(a, b, one), t, 6)
    with pytest.raises(ValueError, match="targets"):
        emu.lse_stats(Scores(a, b, one), t[:3], 0)
    with pytest.raises(ValueError, match="scale must be finite"):
        emu.lse_stats(Scores(a, b, torch.tensor(math.nan)), t, 0)
    with pytest.raises(ValueError, match="row_mult"):
        emu.sweep(
            Scores(a, b, one), OffsetTerms(torch.zeros(4), torch.zeros(3), torch.zeros(0), torch.zeros(0))
        )
    with pytest.raises(ValueError, match="col_offset"):
        emu.sweep(
            Scores(a, b, one), OffsetTerms(torch.zeros(4), torch.zeros(4), torch.zeros(6), torch.zeros(6))
        )
    with pytest.raises(RuntimeError, match="needs CPU tensors"):
        tilecl.contrastive_loss(
            torch.randn(3, 2, device="meta"), torch.randn(3, 2, device="meta"), backend="cuda-emu"
        )


def test_missing_extension_says_how_to_build_it(monkeypatch):
    """Neither built ahead of time nor compilable on first use (no nvcc): the error says how to get it."""
    if cuda_built():
        pytest.skip("tilecl._cuda is built here")
    monkeypatch.setattr(_cuda_build, "find_nvcc", lambda: None)
    with pytest.raises(RuntimeError, match="cannot be compiled here.*TILECL_FORCE_CUDA_BUILD=1.*make cuda"):
        resolve_backend("cuda", torch.device("cuda"), torch.float32)


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


#: kernels that fold partials and multiply no tiles
PARTIALS_ONLY = {"sum_partials", "merge_stats"}


@pytest.fixture(scope="module")
def nvcc_report():
    if _cuda_build.find_nvcc() is None:
        pytest.skip("nvcc not found")
    return _cuda_build.nvcc_report()


@pytest.mark.slow
def test_nvcc_builds_every_kernel_for_sm80_and_sm90_without_warnings(nvcc_report):
    combos = {(k["name"], k["dtype"], k["arch"]) for k in nvcc_report["kernels"]}
    names = {"stats", "merge_stats", "grad_rows", "grad_cols", "sum_partials"}
    assert combos == {
        (name, dtype, arch)
        for name in names
        for dtype in ("float32", "float16", "bfloat16")
        for arch in ("sm_80", "sm_90")
    }
    assert "-Werror" in nvcc_report["flags"]
    # each form has its own pair of gradient kernels (a template parameter, not a runtime flag)
    grads = {(k["name"], k["form"], k["dtype"], k["arch"]) for k in nvcc_report["kernels"] if "form" in k}
    assert grads == {
        (name, form, dtype, arch)
        for name in ("grad_rows", "grad_cols")
        for form in ("softmax", "sigmoid")
        for dtype in ("float32", "float16", "bfloat16")
        for arch in ("sm_80", "sm_90")
    }


@pytest.mark.slow
def test_zero_spills_and_shared_memory_within_the_static_limit(nvcc_report):
    for k in nvcc_report["kernels"]:
        where = (k["name"], k["dtype"], k["arch"])
        assert k["spill_store_bytes"] == k["spill_load_bytes"] == 0, where
        assert k["stack_bytes"] == 0, where
        assert 0 < k["registers"] <= 255, where
        # the partials' merge stages nothing in shared memory
        assert 0 < k["shared_bytes"] <= 48 * 1024 or k["name"] == "merge_stats", where


@pytest.mark.slow
def test_tensor_cores_in_the_16_bit_kernels(nvcc_report):
    for k in nvcc_report["kernels"]:
        uses = k["tensor_core_instructions"] > 0
        expected = k["dtype"] != "float32" and k["name"] not in PARTIALS_ONLY
        assert uses == expected, (k["name"], k["dtype"], k["arch"], k["tensor_core_instructions"])


@pytest.mark.slow
def test_real_extension_builds_links_and_imports():
    """tilecl._cuda built as setup.py builds it (nvcc objects, host-compiled bindings.cpp, nvcc link),
    warnings as errors in both compilers, and imported in a fresh process: no GPU is needed to
    import it (static cudart loads the driver on the first CUDA call)."""
    if _cuda_build.find_nvcc() is None:
        pytest.skip("nvcc not found")
    info = extension_in_a_fresh_process(_cuda_build.build_extension_cached())
    assert {"lse_stats", "sweep", "workspace_floats"} <= set(info["names"])
    assert {"SweepArgs", "OffsetForm", "SigmoidForm"} <= set(
        info["names"]
    )  # one sweep binding, a class per form
    assert info["emulated"] is False and info["archs"] == "80,90"


def test_capability_check_of_the_real_extension():
    built = [(8, 0), (9, 0)]
    assert runs_on((8, 0), built) and runs_on((8, 6), built) and runs_on((8, 9), built)
    assert runs_on((9, 0), built) and runs_on((10, 0), built)  # the sm_90 PTX JIT-compiles
    assert not runs_on((7, 5), built) and not runs_on((7, 0), built)
    assert runs_on((7, 0), None) and not runs_on((6, 1), None)


def test_sizes_past_the_32_bit_tile_loops_are_refused():
    assert MAX_DIM == 2**31 - 64
    emu = resolve_backend("cuda-emu", CPU, torch.float32)
    huge = torch.zeros(1, 1).expand(MAX_DIM + 1, 1)  # a stride-0 view: no memory behind it
    with pytest.raises(ValueError, match="2\\^31 - 64"):
        emu.lse_stats(Scores(huge, torch.zeros(3, 1), torch.tensor(1.0)), torch.zeros(1, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="2\\^31 - 64"):
        emu.lse_stats(Scores(torch.zeros(3, 1), huge, torch.tensor(1.0)), torch.zeros(3, dtype=torch.long), 0)
