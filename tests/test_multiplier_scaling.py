"""The 16-bit kernels keep their digits when the backward's multipliers are tiny (large N).

The multipliers are ~1/N (mean reduction), and the kernels round the gradient
tile ``G = g·exp(S − c) + …`` to the input type before the second tensor-core
product; in float16 such a ``G`` is subnormal at N in the tens of thousands.
The backends rescale the multipliers by a power of two, so the error stays at
float16's rounding whatever N is.
"""

from __future__ import annotations

import pytest
import torch

from conftest import max_error
from tilecl import _cuda_build
from tilecl.backends import resolve_backend

KERNEL_BACKENDS = [
    "triton",
    pytest.param(
        "cuda-emu",
        marks=pytest.mark.skipif(_cuda_build.emulation_buildable() is not None, reason="no cuda-emu build"),
    ),
]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("multiplier", [0.5, 1e-6, 1e-9])
def test_float16_gradient_with_tiny_multipliers(backend, multiplier):
    gen = torch.Generator().manual_seed(0)
    n, m, d = 40, 50, 32
    a = torch.randn(n, d, generator=gen).half()
    b = torch.randn(m, d, generator=gen).half()
    scale = torch.tensor(5.0)
    oracle, ours = resolve_backend("reference", a.device), resolve_backend(backend, a.device)
    row_lse, col_lse, _ = oracle.lse_stats(a, b, scale, torch.arange(n), n)
    row_mult = torch.full((n,), multiplier)
    col_mult = torch.full((n,), multiplier / 3)
    got = ours.offset_backward(a, b, scale, row_lse, row_mult, col_lse, col_mult)
    want = oracle.offset_backward(a, b, scale, row_lse, row_mult, col_lse, col_mult)
    for name, x, y in zip(("grad_a", "grad_b", "grad_scale"), got, want):
        relative = max_error(x, y) / float(y.abs().max())
        # G rounded to float16 (2^-11) and summed over ~50 terms: 1e-3 is a few roundings
        assert relative < 1e-3, f"{backend} {name} at multiplier {multiplier}: relative error {relative:.2e}"
