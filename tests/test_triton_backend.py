"""What belongs to the Triton backend: its deterministic backward (the matrix covers correctness).

Without a GPU the kernels run under Triton's interpreter on CPU tensors
(conftest sets TRITON_INTERPRET=1); with one, on CUDA tensors.
"""

from __future__ import annotations

import pytest
import torch

import tilecl
from tilecl.backends import BACKENDS
from utils import assert_rel, make_inputs, run

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
REASONS = BACKENDS["triton"].not_supported_reasons(DEVICE, torch.float32)
pytestmark = pytest.mark.skipif(bool(REASONS), reason=f"triton/{DEVICE.type}: {'; '.join(REASONS)}")


def test_deterministic_backward_is_bitwise_reproducible_and_matches():
    a, b = make_inputs(21, 26, 33, dtype=torch.float32, device=DEVICE, seed=4)
    default = run(tilecl.contrastive_loss, a, b, 8.0, backend="triton")
    torch.use_deterministic_algorithms(True)
    try:
        first = run(tilecl.contrastive_loss, a, b, 8.0, backend="triton")
        second = run(tilecl.contrastive_loss, a, b, 8.0, backend="triton")
    finally:
        torch.use_deterministic_algorithms(False)
    for name, x, y, z in zip(("loss", "grad_a", "grad_b", "grad_scale"), first, second, default):
        assert torch.equal(x, y), name
        assert_rel(x, z, 1e-5, name, atol=1e-6)


def test_sizes_past_the_32_bit_tile_indices_are_refused_before_a_launch():
    """Address products are int64 (test_inspect.py); the tile indices themselves stay int32."""
    from tilecl.backends import Scores
    from tilecl.backends import triton as triton_backend

    limit = triton_backend.MAX_DIM
    assert limit == 2**31 - 512
    huge = torch.zeros(1, 1, device=DEVICE).expand(limit + 1, 1)  # a stride-0 view: no memory behind it
    fits = torch.zeros(1, 1, device=DEVICE).expand(limit, 1)
    small = torch.zeros(3, 1, device=DEVICE)
    one = torch.tensor(1.0, device=DEVICE)
    for a, b in ((huge, small), (small, huge)):
        with pytest.raises(ValueError, match="2\\^31 - 512"):
            targets = torch.zeros(1, dtype=torch.long, device=DEVICE).expand(a.shape[0])
            triton_backend.lse_stats(Scores(a, b, one), targets, 0)
    triton_backend._check(fits, small)  # the boundary itself is accepted (no launch: a check only)


def test_float32_to_bfloat16_rounds_to_nearest_even_as_on_a_gpu():
    """The bf16 kernels round their fp32 ``G`` (and their inputs' products) to bfloat16: checked on
    the CPU, the interpreter must round as a GPU does (to nearest, ties to even), not truncate
    (``utils.round_bf16_like_the_hardware``, installed by conftest)."""
    import triton
    import triton.language as tl

    @triton.jit
    def to_bf16(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        inside = offsets < n
        tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=inside).to(tl.bfloat16), mask=inside)

    # truncation gives 0.015564; 1 + 2^-8 and 1 + 3·2^-8 are ties (to even: 1 and 1 + 2^-6);
    # the largest float32 rounds up to inf; a subnormal
    values = [0.015624999, 1.00390625, 1.01171875, -2.3, 3.4028235e38, 1e-40, 0.0, -1.0]
    x = torch.tensor(values, dtype=torch.float32, device=DEVICE)
    y = torch.empty(len(values), dtype=torch.bfloat16, device=DEVICE)
    to_bf16[(1,)](x, y, len(values), BLOCK=8)
    want = x.to(torch.bfloat16)
    assert torch.equal(y.float(), want.float()), (y, want)
