"""Shared fixtures and the tolerance rule.

Tolerance rule (as flash-attention's tests): a backend's error against the
float64 oracle must be at most ``2×`` the error of naive PyTorch computed in the
same dtype, plus a small absolute slack relative to the reference's magnitude.
"""

from __future__ import annotations

import os

import torch

# No GPU: the Triton kernels run under Triton's CPU interpreter (read when triton is first imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tilecl import _blockwise  # noqa: E402

#: absolute slack, as a fraction of the largest reference value, per input dtype
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}


@pytest.fixture(params=[64, 4096, 1 << 20], ids=["tiles-2x4", "tiles-mid", "one-tile"])
def tile_bytes(request, monkeypatch):
    """Run a test with tiny tiles (many edge tiles), medium tiles and a single tile."""
    monkeypatch.setattr(_blockwise, "TILE_BYTES", request.param)
    return request.param


@pytest.fixture
def tiny_tiles(monkeypatch):
    monkeypatch.setattr(_blockwise, "TILE_BYTES", 64)


def max_error(x, reference) -> float:
    x = x.detach().double().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    return float(np.max(np.abs(x - np.asarray(reference, dtype=np.float64))))


def assert_close_by_rule(ours, naive, reference, dtype: torch.dtype, what: str) -> None:
    """``|ours − ref| ≤ 2·|naive − ref| + atol·max|ref|`` (elementwise maxima)."""
    scale = float(np.max(np.abs(np.asarray(reference, dtype=np.float64)))) + 1e-30
    ours_err = max_error(ours, reference)
    naive_err = max_error(naive, reference)
    bound = 2 * naive_err + ATOL[dtype] * scale
    assert ours_err <= bound, f"{what}: error {ours_err:.3e} > 2 x naive {naive_err:.3e} + atol ({dtype})"


def assert_rel(ours, reference, rel: float, what: str, atol: float = 1e-15) -> None:
    """Max error relative to the largest reference entry, plus ``atol``.

    ``atol`` covers gradients that are tiny only because large terms cancel
    (a saturated softmax minus its one-hot target): pass the terms' magnitude
    times a few eps there.
    """
    scale = float(np.max(np.abs(np.asarray(reference, dtype=np.float64))))
    err = max_error(ours, reference)
    assert err <= rel * scale + atol, (
        f"{what}: error {err:.3e} > {rel:.1e} x max|ref| {scale:.3e} + {atol:.1e}"
    )
