"""What a small batch costs per call, counted (not timed): ATen operations and Python function calls.

On a GPU every ATen operation is a kernel launch (5-10 µs each), and at the
batch sizes people train with (32-1,024 per GPU) those launches and the Python
around them are the whole step of a loss. The counts are deterministic, so
this is not a timing test: ``bench/small_batch.py`` measures the times.
"""

from __future__ import annotations

import pytest
import torch

import tilecl
from bench.small_batch import counts
from utils import count_value_reads

#: Python function calls per symmetric CLIP fwd+bwd at N = 128 (cProfile's count: builtins and
#: torch's own Python included; 434 before the lean path, 149 now, the full-matrix loss 48): what
#: is left is the checks, the autograd Function and torch's own backward() (~35)
PYTHON_CALLS = 150


def test_a_small_batch_costs_fewer_ops_than_the_full_matrix_loss():
    """symmetric CLIP fwd+bwd at N = 128: no more ATen ops than the full-matrix loss (the bound of
    the issue is 1.5x) and at most :data:`PYTHON_CALLS` Python function calls."""
    found = counts("clip", n=128)
    mine, theirs = found["tilecl"], found["naive"]
    assert mine["aten"] <= theirs["aten"], found
    assert mine["python"] <= PYTHON_CALLS, found


def _small_batch(device: str) -> None:
    """CLIP (with hard negatives too), NT-Xent and SupCon on the one-tile path. (Labels and weights
    are left out: their eager checks read them on purpose, before any kernel.)"""
    gen = torch.Generator(device=device).manual_seed(0)
    a, b, extra = (torch.randn(n, 32, device=device, generator=gen).requires_grad_() for n in (64, 64, 16))
    tilecl.contrastive_loss(a, b, 14.3, backend="torch").backward()
    tilecl.contrastive_loss(a, b, 14.3, negatives=extra, backend="torch").backward()
    tilecl.nt_xent_loss(a, b, 0.5, backend="torch").backward()
    classes = torch.arange(64, device=device) % 8
    tilecl.supcon_loss(a, classes, 0.1, backend="torch").backward()


def test_the_small_batch_path_reads_no_value(monkeypatch):
    """The one-tile path asks the device for no value (on a GPU each read waits for the stream):
    counted on the CPU by the Tensor methods that read one."""
    _small_batch("cpu")  # warm-up, and the path is taken (the test below counts it)
    reads = count_value_reads(monkeypatch)
    _small_batch("cpu")
    assert reads == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CPU read count stands in for it)")
def test_the_small_batch_path_never_synchronizes_a_cuda_stream():
    torch.cuda.set_sync_debug_mode("error")
    try:
        _small_batch("cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
