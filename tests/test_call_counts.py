"""What a small batch costs per call, counted (not timed): ATen operations and Python function calls.

On a GPU every ATen operation is a kernel launch (5-10 µs each), and at the
batch sizes people train with (32-1,024 per GPU) those launches and the Python
around them are the whole step of a loss. The counts are deterministic, so
this is not a timing test: ``bench/small_batch.py`` measures the times.
"""

from __future__ import annotations

import pytest

from bench.small_batch import counts


@pytest.mark.parametrize("kind", ["clip", "supcon"])
def test_a_small_batch_costs_no_more_ops_than_the_full_matrix_loss(kind):
    """symmetric CLIP and SupCon fwd+bwd at N = 128: at most 1.5x the full-matrix loss's ATen ops
    (in fact fewer) and at most 150 Python function calls."""
    found = counts(kind, n=128)
    mine, theirs = found["tilecl"], found["naive"]
    assert mine["aten"] <= 1.5 * theirs["aten"], found
    assert mine["python"] <= 150, found
