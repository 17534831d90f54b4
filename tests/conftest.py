"""Fixtures: the matrix cell of a test (``combo``), and the torch backend's tile sizes."""

from __future__ import annotations

import os

import torch

# No GPU: the Triton kernels run under Triton's CPU interpreter (read when triton is first imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tilecl.backends import torch as torch_backend  # noqa: E402
from utils import Combo, round_bf16_like_the_hardware  # noqa: E402

round_bf16_like_the_hardware()

#: the torch backend's tile budget inside the matrix: ~20 x 20 tiles, so small shapes cross several
MATRIX_TILE_BYTES = 4096


@pytest.fixture
def combo(request, monkeypatch) -> Combo:
    """The test's ``(backend, device, dtype)``; skipped with the backend's reason where it cannot run."""
    cell: Combo = request.param
    reasons = cell.reasons()
    if reasons:
        pytest.skip(f"{cell.backend}/{cell.device}: {'; '.join(reasons)}")
    monkeypatch.setattr(torch_backend, "TILE_BYTES", MATRIX_TILE_BYTES)
    return cell


@pytest.fixture(params=[64, 4096, 1 << 20], ids=["tiles-2x4", "tiles-mid", "one-tile"])
def tile_bytes(request, monkeypatch):
    """Run a test with tiny tiles (many edge tiles), medium tiles and a single tile."""
    monkeypatch.setattr(torch_backend, "TILE_BYTES", request.param)
    return request.param


@pytest.fixture
def tiny_tiles(monkeypatch):
    monkeypatch.setattr(torch_backend, "TILE_BYTES", 64)


@pytest.fixture(autouse=True)
def _grad_mode_is_restored():
    """A test that fails inside a traced custom op can leave autograd off for the worker; restoring it
    keeps one failure from failing every later test of the worker as "does not require grad"."""
    enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(enabled)
