"""The kernels' forward: each tile of ``S`` computed once for its row and its column statistics.

A program (a block) walks a group of row blocks × a split of the column tiles;
the per-split row partials and the per-group column partials (updated in place
as the group's row blocks pass) are merged in a fixed order. Every cut must
give the oracle's statistics, bitwise alike from run to run. The Triton kernels
run under their interpreter and the CUDA C++ ones through the emulation on a
CPU-only machine, on the GPU otherwise.
"""

from __future__ import annotations

import pytest
import torch

from tilecl.backends import BACKENDS, Scores, reference
from utils import assert_rel, make_inputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNELS = ["triton", "cuda" if DEVICE.type == "cuda" else "cuda-emu"]


def _primitives(name: str):
    reasons = BACKENDS[name].not_supported_reasons(DEVICE, torch.float32)
    if reasons:
        pytest.skip(f"{name}/{DEVICE.type}: {'; '.join(reasons)}")
    return BACKENDS[name].load()


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("parts", [1, 2, 3, 64])
@pytest.mark.parametrize("case", ["plain", "hard_negatives", "diagonal_and_groups"])
def test_statistics_from_every_cut_of_s_match_the_oracle_bitwise_reproducibly(backend, parts, case):
    """One group and one split (a group of several blocks updates its column partials in place),
    several of each, and more parts than blocks; hard negatives (columns past ``col_count`` in
    the rows' statistics only), the diagonal and a group mask."""
    primitives = _primitives(backend)
    # the CUDA kernels' tiles are 64 x 64, the interpreter's 16 x 16: several of either each way
    n, m = (
        (150, 150 if case != "hard_negatives" else 200)
        if backend != "triton"
        else (45, 45 if case != "hard_negatives" else 70)
    )
    a, b = make_inputs(n, m, 20, dtype=torch.float32, device=DEVICE, seed=parts)
    mask: dict = {}
    if case == "diagonal_and_groups":
        groups = torch.arange(n, device=DEVICE) % 9
        # each row's positive the next row, as NT-Xent pairs views: the diagonal is not a positive
        kept = (torch.arange(n, device=DEVICE) + 1) % n
        mask = dict(row_groups=groups, col_groups=groups, kept_cols=kept)
    scores = Scores(a, b, torch.tensor(6.0, device=DEVICE), case == "diagonal_and_groups", **mask)
    # a row's positive is its kept column (a random one could be a masked entry: -inf both ways)
    targets = mask["kept_cols"] if mask else torch.randint(0, m, (n,), device=DEVICE)
    first = primitives.lse_stats(scores, targets, n, parts=parts)
    again = primitives.lse_stats(scores, targets, n, parts=parts)
    expected = reference.lse_stats(scores, targets, n)
    for name, x, y, z in zip(expected._fields, first, again, expected):
        assert torch.equal(x, y), name
        assert_rel(x.double(), z, 1e-5, name, atol=1e-5)
