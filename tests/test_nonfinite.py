"""Non-finite inputs: every loss, every backend, finite exactly where the full-matrix loss is finite.

For ``+inf``, ``-inf`` and NaN in one feature of each input, with and without
group masks, the loss (per row, ``reduction="none"`` where the loss has it)
and every gradient are compared element by element with the naive
full-matrix loss of :mod:`tilecl.testing.naive`: the same entries finite, the
same entries not. Never a finite (wrong) value where the full matrix has none
— a gradient scaler or a clipping step would apply it — and never a whole row,
tile or batch made non-finite that the full matrix keeps finite (users of
``reduction="none"`` drop the non-finite rows and train on the others).

The poisoned feature sits in row 2 (a positive pair's row), and the inputs are
built so that an infinite feature makes that row's logits, and its column's,
infinite of one sign: ``-inf`` logits everywhere in a row or column are the
case an "every entry excluded" rule would mistake for a masked row.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import pytest
import torch

import tilecl
from tilecl.testing import naive
from utils import Combo, matrix

N, D = 8, 5
GROUPS = torch.tensor([0, 1, 0, 2, 3, 2, 4, 5])  # rows 0, 2 and 3, 5 are two captions of one image
LABELS = torch.tensor([0, 1, 0, 1, 2, 2, 3, 3])
POISONS = [(side, value) for side in ("a", "b") for value in (math.inf, -math.inf, math.nan)]


def _inputs(combo: Combo) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive features (every dot product positive), so an infinite feature gives logits of one sign."""
    g = torch.Generator().manual_seed(3)
    a = torch.rand(N, D, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(N, D, generator=g, dtype=torch.float64) + 0.1
    return a.to(combo.device, combo.dtype), b.to(combo.device, combo.dtype)


def _contrastive(symmetric: bool) -> Callable[..., Any]:
    def call(fn: Callable[..., Any], a, b, scale, masked: bool, **kw: Any):
        groups = dict(row_groups=GROUPS.to(a.device), col_groups=GROUPS.to(a.device)) if masked else {}
        return fn(a, b, scale, symmetric=symmetric, reduction="none", **groups, **kw)

    return call


def _sigmoid(fn, a, b, scale, masked, **kw):
    groups = dict(row_groups=GROUPS.to(a.device), col_groups=GROUPS.to(a.device)) if masked else {}
    return fn(a, b, scale, -1.0, reduction="none", **groups, **kw)


def _nt_xent(fn, a, b, scale, masked, **kw):
    groups = dict(groups=GROUPS.to(a.device)) if masked else {}
    return fn(a, b, 0.5, reduction="none", **groups, **kw)


def _supcon(fn, a, b, scale, masked, **kw):
    # SupCon has no group mask; "masked" is its two-tower form
    labels = LABELS.to(a.device)
    if masked:
        return fn(a, labels, 0.5, columns=b, column_labels=labels, reduction="none", **kw)
    return fn(torch.cat([a, b]), torch.cat([labels, labels]), 0.5, reduction="none", **kw)


#: name → (the call, the naive loss, whether the loss differentiates the scale)
LOSSES = {
    "clip": (_contrastive(True), naive.naive_contrastive_loss, True),
    "infonce": (_contrastive(False), naive.naive_contrastive_loss, True),
    "sigmoid": (_sigmoid, naive.naive_sigmoid_loss, True),
    "nt_xent": (_nt_xent, naive.naive_nt_xent_loss, False),
    "supcon": (_supcon, naive.naive_supcon_loss, False),
}


def _outputs(call, fn, a, b, masked: bool, with_scale: bool, **kw) -> dict[str, torch.Tensor]:
    a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    scale = torch.tensor(3.0, dtype=torch.float64, device=a.device, requires_grad=with_scale)
    loss = call(fn, a, b, scale, masked, **kw)
    leaves = (a, b, scale) if with_scale else (a, b)
    grads = torch.autograd.grad(loss.sum(), leaves)
    return dict(zip(("loss", "grad_a", "grad_b", "grad_scale"), (loss.detach(), *grads)))


@pytest.mark.parametrize(
    "combo", matrix(dtypes=(torch.float64, torch.float32), with_oracle=True), indirect=True
)
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_finite_exactly_where_the_full_matrix_loss_is(combo, loss_name, masked):
    call, naive_fn, with_scale = LOSSES[loss_name]
    clean_a, clean_b = _inputs(combo)
    mismatches = []
    for side, value in POISONS:
        a, b = clean_a.clone(), clean_b.clone()
        (a if side == "a" else b)[2, 1] = value
        ours = _outputs(call, _on(loss_name, combo.backend), a, b, masked, with_scale)
        full = _outputs(call, naive_fn, a.double(), b.double(), masked, with_scale)
        assert not all(torch.isfinite(x).all() for x in full.values()), "the poison must reach the full loss"
        for name, want in full.items():
            got = ours[name]
            if not torch.equal(torch.isfinite(got).cpu(), torch.isfinite(want).cpu()):
                mismatches.append(
                    f"{side}[2,1]={value}: {name} non-finite at {_where(got)}, full matrix at {_where(want)}"
                )
    assert not mismatches, "\n".join(mismatches)


def _on(loss_name: str, backend: str) -> Callable[..., Any]:
    """tilecl's loss of that name on ``backend``."""
    fn = {
        "clip": tilecl.contrastive_loss,
        "infonce": tilecl.contrastive_loss,
        "sigmoid": tilecl.sigmoid_loss,
        "nt_xent": tilecl.nt_xent_loss,
        "supcon": tilecl.supcon_loss,
    }[loss_name]
    return lambda *args, **kw: fn(*args, backend=backend, **kw)


def _where(x: torch.Tensor) -> list:
    return (~torch.isfinite(x)).nonzero().tolist() if x.dim() else ([] if torch.isfinite(x) else ["*"])
