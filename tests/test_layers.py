"""The package's layers: imports go down only, and no autograd Function sees a process group.

A call from a public loss to a kernel walks: the loss → ``tilecl.driver`` (checks, backend,
agreement, sharded primitives) → a Function → the primitives of ``tilecl.backends``; the loss then
takes the global value from the driver's run. These tests hold the code to that picture.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tilecl
import tilecl.integrations.pytorch_metric_learning
import tilecl.integrations.sentence_transformers  # noqa: F401  (their Functions, if any, are checked too)

PACKAGE = Path(tilecl.__file__).resolve().parent

#: module → layer; a module may import only from its own layer or below
LAYERS = {
    "tilecl._compat": 0,
    "tilecl._cuda_build": 0,
    "tilecl.validation": 0,
    # the distributed layer's collectives, below the backends: the sharded primitives exchange
    # through them too
    "tilecl.collectives": 1,
    "tilecl.backends.base": 1,
    "tilecl.backends.registry": 1,
    "tilecl.backends.torch": 2,
    "tilecl.backends.reference": 2,
    "tilecl.backends.triton": 2,
    "tilecl.backends.cuda": 2,
    "tilecl.backends.ops": 2,
    "tilecl.backends.sharded": 2,
    "tilecl.backends": 3,
    "tilecl.function": 4,
    "tilecl.distributed": 5,
    "tilecl.driver": 6,
    "tilecl.contrastive": 7,
    "tilecl.sigmoid": 7,
    "tilecl.supervised": 7,
    "tilecl.distill": 7,
    "tilecl.ranking": 7,
    "tilecl.memory_queue": 7,
    "tilecl.gamma": 8,
    "tilecl.modality": 8,
    "tilecl.modules": 9,
    "tilecl.gradcache": 9,
    "tilecl.integrations": 10,
    "tilecl.integrations.pytorch_metric_learning": 10,
    "tilecl.integrations.sentence_transformers": 10,
    "tilecl": 11,
    "tilecl.__main__": 12,
}
#: compiled, not a source file: the CUDA C++ extension sits below everything that loads it
EXTENSIONS = {"tilecl._cuda": 0}


def _module_name(path: Path) -> str:
    parts = ["tilecl", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """Every tilecl module ``path`` imports, anywhere in it (lazy imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("tilecl")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if not base.startswith("tilecl"):
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in LAYERS or full in EXTENSIONS else base)
    return found


def test_every_module_of_the_package_has_a_layer():
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py") if "testing" not in p.parts}
    assert modules == set(LAYERS), modules ^ set(LAYERS)


def test_imports_go_down_the_layers_only():
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        if name.startswith("tilecl.testing"):
            continue
        for target in _imports(path, name):
            assert not target.startswith("tilecl.testing"), f"{name} imports the oracles ({target})"
            if target.startswith("tilecl.kernels"):
                assert name == "tilecl.backends.triton", f"{name} imports the Triton source"
                continue
            layer = {**LAYERS, **EXTENSIONS}[target]
            assert layer <= LAYERS[name], f"{name} (layer {LAYERS[name]}) imports {target} (layer {layer})"


def test_only_the_driver_imports_the_sharded_primitives():
    """The backends hold primitives only: every collective a loss uses is the distributed layer's
    (:mod:`tilecl.distributed`, :mod:`tilecl.collectives`); above the backends only the driver
    lifts the primitives to a group."""
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        if name == "tilecl.driver" or name.startswith("tilecl.backends"):
            continue
        assert "tilecl.backends.sharded" not in _imports(path, name), (
            f"{name} imports tilecl.backends.sharded"
        )


def _autograd_functions() -> list[type]:
    found = []
    for name in LAYERS:
        module = __import__(name, fromlist=["_"])
        for _, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, torch.autograd.Function) and value.__module__ == name:
                found.append(value)
    return found


def test_no_autograd_function_takes_ranks_or_a_process_group():
    functions = _autograd_functions()
    assert {f.__name__ for f in functions} >= {
        "ContrastiveFunction",
        "SigmoidFunction",
        "_RowLogSumExp",
        "_Grams",
    }
    for function in functions:
        source = inspect.getsource(function.forward)
        parameters = inspect.signature(function.forward).parameters
        for parameter in parameters.values():
            assert parameter.name not in {"ranks", "group", "process_group"}, (function, parameter)
            assert "Ranks" not in str(parameter.annotation) and "ProcessGroup" not in str(
                parameter.annotation
            )
        assert "dist." not in source and "process_group" not in source, function


def test_import_tilecl_loads_no_compiler_no_triton_and_no_extension():
    """``import tilecl`` (and so ``python -m tilecl --help``) costs what importing its own modules
    costs: the compiler stack (``torch._dynamo``, which imports Triton), Triton and the CUDA C++
    extension load on first use only."""
    code = (
        "import sys, tilecl\n"
        "heavy = ('torch._dynamo', 'torch._inductor', 'triton', 'tilecl._cuda', 'tilecl.kernels')\n"
        "print(sorted({m for m in sys.modules if m.startswith(heavy) and m != 'tilecl._cuda_build'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_every_form_is_one_consistent_entry():
    """A form's entry drives its registered op, its fake, its paths across ranks and its 16-bit
    rescaling: every field it names is a field of its terms or result type."""
    from tilecl.backends.base import FORMS, form_of
    from tilecl.backends.ops import SWEEP_OPS

    assert set(SWEEP_OPS) == set(FORMS) == {"softmax", "sigmoid"}
    for name, form in FORMS.items():
        assert list(form.outputs) == list(form.result._fields), name
        assert set(form.values) <= set(form.outputs), name
        assert list(form.outputs.values()).count("MD") == 1, name  # the gradient of b, back to its owner
        named = (*form.column_terms, *form.home_terms, *form.column_pointers)
        assert set(named) | set(form.scaled_terms) | set(form.measured_terms) <= set(form.terms._fields), name
        assert set(form.column_terms.values()) <= {"cols", "stats"}, name
        assert SWEEP_OPS[name]._qualname == f"tilecl::{name}_sweep"
    with pytest.raises(ValueError, match="with_grads must be True"):
        FORMS["softmax"].check(False)
    with pytest.raises(TypeError, match="terms must be one of"):
        form_of((1, 2))
