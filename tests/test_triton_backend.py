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
