"""Backends declare themselves; dispatch, errors and ``explain_backend`` come from the declarations."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tilecl
from tilecl import backends
from tilecl.backends import BACKENDS, Backend, explain_backend, resolve_backend

PACKAGE = Path(tilecl.__file__).resolve().parent


def test_every_backend_is_declared_in_its_own_module():
    declared = {}
    for module in (backends.triton, backends.cuda, backends.torch, backends.reference):
        for value in vars(module).values():
            if isinstance(value, Backend):
                declared[value.name] = module.__name__
    assert set(declared) == set(BACKENDS), declared
    assert declared["cuda"] == declared["cuda-emu"] == "tilecl.backends.cuda"
    for name, backend in BACKENDS.items():
        assert backend.dtypes and backend.devices and backend.tolerances
        assert set(backend.tolerances) >= set(backend.dtypes), name
        assert set(backend.tiles) <= set(backend.devices) and set(backend.emulated_on) <= set(backend.devices)


def test_no_module_outside_a_backend_names_one():
    """Dispatch reads declarations: no `== "reference"`-style test of a backend's name elsewhere."""
    names = set(BACKENDS)
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "backends" and path.stem in {"triton", "cuda", "torch", "reference"}:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            sides = (node.left, *node.comparators)
            # a device type ("cuda", "cpu") is not a backend: only what names a backend counts
            about_a_backend = any(
                "backend" in ast.unparse(side) or "name" in ast.unparse(side) for side in sides
            )
            for side in sides:
                if about_a_backend and isinstance(side, ast.Constant) and side.value in names:
                    pytest.fail(f"{path.relative_to(PACKAGE)}:{node.lineno} compares with {side.value!r}")


def test_explain_backend_names_the_choice_and_every_reason():
    a, b = torch.randn(5, 3), torch.randn(7, 3)
    choice = explain_backend(a, b)
    assert choice.chosen == "torch" and choice.extent == 7
    text = str(choice)
    assert "runs on 'torch'" in text
    for name, reasons in choice.reasons.items():
        if name != "torch":
            assert f"  {name}: " in text
            for reason in reasons:
                assert reason.reason in text
    assert explain_backend(a.double(), backend="reference").chosen == "reference"
    assert tilecl.explain_backend is explain_backend


def test_a_refused_explicit_backend_lists_its_reasons(monkeypatch):
    small = dataclasses.replace(BACKENDS["torch"], max_extent=4)
    monkeypatch.setitem(BACKENDS, "torch", small)
    with pytest.raises(ValueError, match=r"backend='torch' cannot run .* up to 4, got 7 .*explain_backend"):
        resolve_backend("torch", torch.device("cpu"), torch.float32, extent=7)
    choice = explain_backend(torch.randn(7, 3), backend="torch")
    assert choice.chosen is None and "cannot run" in str(choice) and "up to 4, got 7" in str(choice)


def test_explain_refuses_a_name_that_is_no_backend():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        explain_backend(torch.randn(2, 2), backend="nope")


def test_auto_takes_torch_on_a_device_no_backend_declares():
    """As before the declarations: auto on another device type (mps, xpu...) is torch, whose own
    checks then apply."""
    choice = explain_backend(torch.empty(2, 2, device="meta"), backend="auto")
    assert choice.chosen == "torch"
    for device in ("mps", "xpu"):
        assert resolve_backend("auto", torch.device(device), torch.float32).name == "torch"


def test_backends_are_listed_in_autos_order():
    preferences = [b.preference for b in BACKENDS.values()]
    assert preferences == sorted(preferences)
    assert list(BACKENDS)[:2] == ["triton", "cuda"] and tilecl.available_backends()[-2:] == [
        "torch",
        "reference",
    ]


def test_auto_passes_over_what_cannot_run_and_says_so(monkeypatch):
    unusable = Backend(
        "unusable-first",
        (torch.float32,),
        {"cpu": lambda: "this machine lacks it"},
        lambda: None,
        lambda: BACKENDS["torch"].load(),
        auto_devices=("cpu",),
        preference=0,
    )
    monkeypatch.setitem(BACKENDS, unusable.name, unusable)
    choice = explain_backend(torch.randn(3, 2))
    assert choice.chosen == "torch"
    assert "unusable-first: this machine lacks it" in str(choice)
    assert resolve_backend("auto", torch.device("cpu"), torch.float32).name == "torch"


def test_import_tilecl_imports_no_oracle_demo_or_tool():
    code = "import sys, tilecl\nprint(' '.join(sorted(m for m in sys.modules if m.startswith('tilecl'))))"
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    modules = set(loaded.stdout.split())
    assert not {m for m in modules if m.startswith("tilecl.testing")}, modules
    for lab in ("demo", "reproduce", "memory", "inspect_kernels", "integrations"):
        assert f"tilecl.{lab}" not in modules
    assert not {m for m in modules if m.startswith("tilecl.kernels")}  # the triton backend's first use


@pytest.mark.parametrize(
    "a, b, error",
    [
        (torch.ones(4, 3, dtype=torch.int64), None, "TypeError: a must be float16"),
        (torch.ones(4, 3, dtype=torch.complex64), None, "TypeError: a must be float16"),
        (torch.ones(4, 3, dtype=torch.bool), None, "TypeError: a must be float16"),
        (torch.ones(4, 3).to(torch.float8_e4m3fn), None, "TypeError: a must be float16"),
        (torch.ones(3), None, "ValueError: a must be 2-D"),
        (torch.tensor(1.0), None, "ValueError: a must be 2-D"),
        (torch.ones(4, 3), torch.ones(4, 3, device="meta"), "ValueError: a and b must be on the same device"),
        (
            torch.ones(4, 3),
            torch.ones(4, 3, dtype=torch.float64),
            "TypeError: a and b must have the same dtype",
        ),
        (torch.ones(4, 3), torch.ones(4, 2), "ValueError: a and b must have the same feature dimension"),
    ],
    ids=["int64", "complex", "bool", "float8", "1-d", "0-d", "mixed-device", "mixed-dtype", "mixed-d"],
)
def test_explain_backend_reports_the_error_the_loss_raises(a, b, error):
    """Inputs the loss refuses are not "runs on 'torch'": the choice carries the loss's own error."""
    choice = explain_backend(a, b)
    assert choice.chosen is None and choice.refusal is not None and choice.refusal.startswith(error)
    assert f"cannot run: the loss raises {error}" in str(choice)
    kind = TypeError if error.startswith("TypeError") else ValueError
    with pytest.raises(kind):
        tilecl.contrastive_loss(a, a if b is None else b, 1.0)


def test_explain_backend_refuses_a_form_that_is_no_form():
    with pytest.raises(ValueError, match=r"form must be one of \('softmax', 'sigmoid'\), got 'cosine'"):
        explain_backend(torch.randn(2, 2), form="cosine")
    with pytest.raises(TypeError, match="a must be a torch.Tensor"):
        explain_backend([[1.0]])  # type: ignore[arg-type]
