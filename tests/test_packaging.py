"""What a user installs: the wheel and the sdist carry every module of the tree, the sdist builds the
CUDA extension, a build without it says so.

The install checks build from a copy of the checkout (so nothing is written into it and no stale
``build/`` can fill a gap), install with ``pip --target`` and import from a ``python -S`` child:
without ``site`` the editable install's finder is never loaded, so every ``tilecl`` module it
imports comes from the install or not at all.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from tilecl import _cuda_build
from utils import extension_in_a_fresh_process

ROOT = Path(__file__).resolve().parents[1]
#: top-level entries of the checkout that are tools' state or build output, never sources
_NOT_SOURCE_AT_ROOT = {"build", "dist", "results", "gpu-check"}
_NOT_SOURCE = shutil.ignore_patterns("__pycache__", "*.py[cod]", "*.so", "*.egg-info")


def _ignore(directory: str, names: list[str]) -> set[str]:
    ignored = set(_NOT_SOURCE(directory, names))
    if Path(directory) == ROOT:
        ignored |= {n for n in names if n.startswith(".") or n in _NOT_SOURCE_AT_ROOT}
    return ignored


def expected_modules(root: Path = ROOT) -> list[str]:
    """Every module of the source tree at ``root``, by the name it is installed under."""
    names = []
    for path in sorted((root / "python").glob("tilecl/**/*.py")):
        parts = path.relative_to(root / "python").with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    # kernels/ is the namespace package tilecl.kernels (no __init__.py: see test_the_kernels_folder_...)
    names += [f"tilecl.kernels.{path.stem}" for path in sorted((root / "kernels").glob("*.py"))]
    return names


def _run(command: list, **kwargs) -> None:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


#: no network (the build needs only setuptools and wheel, which the dev extra installs), no CUDA build
BUILD_ENV = {**os.environ, "TILECL_SKIP_CUDA_BUILD": "1"}
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]


def _wheel(source: Path, out: Path) -> Path:
    _run([*PIP, "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)], env=BUILD_ENV)
    (wheel,) = out.glob("tilecl-*.whl")
    return wheel


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory) -> Path:
    """A copy of the checkout's sources (untracked new files included: they are what gets forgotten)."""
    tree = tmp_path_factory.mktemp("checkout") / "tilecl"
    shutil.copytree(ROOT, tree, ignore=_ignore)
    return tree


@pytest.fixture(scope="module")
def sdist(source_tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sdist")
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(out)], cwd=source_tree, env=BUILD_ENV)
    (archive,) = out.glob("tilecl-*.tar.gz")
    return archive


def _sdist_names(sdist: Path) -> set[str]:
    with tarfile.open(sdist) as archive:
        return {Path(name).relative_to(Path(name).parts[0]).as_posix() for name in archive.getnames()}


def test_the_sdist_carries_the_cuda_sources_and_the_test_fixtures(sdist):
    names = _sdist_names(sdist)
    csrc = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").iterdir() if p.is_file()}
    assert csrc and csrc <= names, sorted(csrc - names)
    assert {"csrc/bindings.cpp", "csrc/cuda_emu.h"} <= names
    assert {"tests/conftest.py", "tests/utils.py", "kernels/stats.py", "LICENSE"} <= names


def test_the_sdist_carries_what_its_tests_and_its_readme_need(sdist):
    names = _sdist_names(sdist)
    # the tests it ships import bench/, experiments/, tools/ and examples/; the README shows docs/figures/
    for folder in ("bench", "experiments", "tools", "examples", "docs/figures"):
        files = {
            p.relative_to(ROOT).as_posix()
            for p in (ROOT / folder).rglob("*")
            if p.is_file() and not _ignore(str(p.parent), [p.name])
        }
        assert files and files <= names, (folder, sorted(files - names))
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".so"))]


#: run by ``python -S`` in a fresh environment: import every module, one loss, one adapter
_CHECK = r"""
import importlib, json, sys, traceback
failed = {}
for name in json.loads(sys.argv[1]):
    try:
        importlib.import_module(name)
    except Exception:
        failed[name] = traceback.format_exc(limit=-3)
import torch
import tilecl
from tilecl.integrations.pytorch_metric_learning import SupConLoss
from pytorch_metric_learning.losses import SupConLoss as PmlSupConLoss

gen = torch.Generator().manual_seed(0)
a = torch.randn(12, 8, generator=gen, requires_grad=True)
b = torch.randn(12, 8, generator=gen, requires_grad=True)
loss = tilecl.contrastive_loss(a, b, 10.0)
loss.backward()
x = torch.randn(16, 8, generator=gen, dtype=torch.float64, requires_grad=True)
labels = torch.arange(16) % 4
ours = SupConLoss(0.1, backend="torch")(x, labels)
ours.backward()
files = {n: getattr(m, "__file__", None) for n, m in sys.modules.items() if n.split(".")[0] == "tilecl"}
print(json.dumps({
    "tilecl": tilecl.__file__,
    "files": files,
    "failed": failed,
    "loss": float(loss),
    "grads_finite": all(bool(torch.isfinite(t.grad).all()) for t in (a, b, x)),
    "adapter": float(ours),
    "pml": float(PmlSupConLoss(0.1)(x, labels)),
}))
"""


def _check_in_a_fresh_environment(site: Path, cwd: Path, modules: list[str]) -> subprocess.Popen:
    """The import check on ``site`` (tilecl from there only; torch and the adapters' libraries from
    this venv, which carries no ``tilecl`` when ``site`` is not loaded)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]])
    return subprocess.Popen(
        [sys.executable, "-S", "-c", _CHECK, json.dumps(modules)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _assert_complete(site: Path, check: subprocess.Popen, modules: list[str]) -> None:
    out, err = check.communicate(timeout=300)
    assert check.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert not result["failed"], "\n".join(f"{n}:\n{tb}" for n, tb in result["failed"].items())
    assert Path(result["tilecl"]).is_relative_to(site)
    outside = {n: f for n, f in result["files"].items() if f and not Path(f).is_relative_to(site)}
    assert not outside, outside
    assert set(modules) <= set(result["files"])
    assert (site / "tilecl" / "py.typed").is_file()
    assert result["grads_finite"] and result["loss"] > 0
    assert abs(result["adapter"] - result["pml"]) < 1e-9 * abs(result["pml"])


@pytest.mark.slow
def test_the_wheel_and_the_sdist_install_every_module(source_tree, sdist, tmp_path):
    wheel = _wheel(source_tree, tmp_path / "wheel")
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path / "unpacked", filter="data")
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    from_sdist = _wheel(unpacked, tmp_path / "wheel-from-sdist")
    sites = {"wheel": tmp_path / "site-wheel", "sdist": tmp_path / "site-sdist"}
    # the tree the wheel was built from: the checkout may gain files while this runs
    modules = expected_modules(source_tree)
    checks = {}
    for (kind, site), built in zip(sites.items(), (wheel, from_sdist)):
        _run([*PIP, "install", "--no-deps", "--no-index", "--target", str(site), str(built)])
        # cwd: a folder with nothing importable, outside the checkout
        (tmp_path / f"run-{kind}").mkdir()
        # both at once: most of the time is importing torch and the adapters' libraries
        checks[kind] = _check_in_a_fresh_environment(site, tmp_path / f"run-{kind}", modules)
    for kind, check in checks.items():
        _assert_complete(sites[kind], check, modules)


def test_the_expected_modules_are_the_trees():
    modules = expected_modules()
    assert {"tilecl", "tilecl.integrations.sentence_transformers", "tilecl.kernels.stats"} <= set(modules)
    assert {"tilecl.kernels.sweep", "tilecl.kernels.forms", "tilecl.kernels.scores"} <= set(modules)
    assert "tilecl.testing" in modules and "tilecl.backends" in modules
    assert not [m for m in modules if m.split(".")[-1] in ("demo", "reproduce", "memory", "inspect_kernels")]


#: run by ``python -S`` from a folder outside the checkout: the kernel modules, where they come from
_KERNELS = r"""
import importlib, json, sys
names = ["tilecl.kernels." + n for n in ("stats", "sweep", "forms", "scores")]
print(json.dumps({n: importlib.import_module(n).__file__ for n in names}))
"""


def test_the_editable_install_finds_the_kernels(source_tree, tmp_path):
    """setuptools' editable finder takes a package_dir folder for a package only by its __init__.py
    (pypa/setuptools#4943); setup.py's EditableWheel adds a finder for kernels/, which has none."""
    out, site = tmp_path / "editable", tmp_path / "site-editable"
    build = "import sys; from setuptools import build_meta; build_meta.build_editable(sys.argv[1])"
    _run([sys.executable, "-c", build, str(out)], cwd=source_tree, env=BUILD_ENV)
    (wheel,) = out.glob("tilecl-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    # the install's .pth files load its finders (ahead of this venv's own editable install's)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]])
    code = f"import site; site.addsitedir({str(site)!r})\n{_KERNELS}"
    run_in = tmp_path / "run-editable"  # outside the checkout
    run_in.mkdir()
    done = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=run_in, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    files = json.loads(done.stdout.strip().splitlines()[-1])
    assert {Path(f).resolve().parent for f in files.values()} == {(source_tree / "kernels").resolve()}


def test_the_kernels_folder_never_shadows_the_index_kernels_package():
    """From the checkout's root (pytest, ``python -m ...``) ``kernels`` is the index's package, which
    transformers imports, where it is installed: kernels/ is a namespace portion (no __init__.py), and
    a regular package anywhere on sys.path wins over one. Without it, the name is that portion."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    code = "import json, kernels as k; print(json.dumps([getattr(k, '__file__', None), list(k.__path__)]))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    file, path = json.loads(done.stdout)
    if _installed("kernels"):
        assert file is not None and not Path(file).is_relative_to(ROOT / "kernels"), file
    else:
        assert file is None and path == [str(ROOT / "kernels")]


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
def test_the_sdist_builds_the_cuda_extension_where_nvcc_is(sdist, tmp_path):
    if _cuda_build.find_nvcc() is None:
        pytest.skip("nvcc not found")
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path / "src", filter="data")
    (source,) = (tmp_path / "src").iterdir()
    env = {**os.environ, "TILECL_FORCE_CUDA_BUILD": "1", "TILECL_CUDA_ARCHS": "80"}
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
        + ["--target", str(tmp_path / "site"), str(source)],
        check=True,
        capture_output=True,
        env=env,
    )
    (library,) = (tmp_path / "site" / "tilecl").glob("_cuda*.so")
    info = extension_in_a_fresh_process(library)
    assert "lse_stats" in info["names"] and info["emulated"] is False and info["archs"] == "80"


def test_a_build_without_the_extension_says_so_once(source_tree, tmp_path):
    done = subprocess.run(
        [sys.executable, "setup.py", "build_py", "--build-lib", str(tmp_path / "lib")],
        cwd=source_tree,
        capture_output=True,
        text=True,
        env=BUILD_ENV,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("building without the CUDA C++ extension tilecl._cuda") == 1


def test_the_entry_point_says_which_backends_run_here_and_why_not(capsys):
    from tilecl.__main__ import main
    from tilecl.backends import BACKENDS

    main([])
    out = capsys.readouterr().out
    assert out.startswith("tilecl ")
    for name, backend in BACKENDS.items():
        (line,) = [line for line in out.splitlines() if line.split()[:1] == [name]]
        reasons = backend.not_supported_reasons(torch.device("cpu"), torch.float32)
        assert line.endswith(": yes") if not reasons else all(reason in line for reason in reasons)
    assert "backend='auto' takes 'torch' for cpu float32" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: tilecl ")


def test_python_m_tilecl_runs_outside_the_checkout(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "tilecl", "--help"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m tilecl ")


#: in a fresh environment on the installed wheel: the cuda-emu backend compiles the packaged sources
#: (tilecl/csrc) on first use, as backend="cuda" compiles them with nvcc for the local GPU
_FIRST_USE = r"""
import json, torch, tilecl
from tilecl import _cuda_build
a, b = torch.randn(6, 4, dtype=torch.float32), torch.randn(6, 4, dtype=torch.float32)
value = tilecl.contrastive_loss(a, b, 2.0, backend="cuda-emu")
print(json.dumps({"csrc": str(_cuda_build.CSRC), "loss": float(value),
                  "want": float(tilecl.contrastive_loss(a, b, 2.0, backend="torch"))}))
"""


@pytest.mark.slow
def test_the_wheel_is_pure_python_and_compiles_the_kernels_where_first_used(source_tree, tmp_path):
    """An index accepts the wheel (``py3-none-any``, even built where nvcc is), and it carries the
    kernels' sources, which compile where they are first used."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILECL_")}  # the default build
    _run([*PIP, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(source_tree)], env=env)
    (wheel,) = tmp_path.glob("tilecl-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    with zipfile.ZipFile(wheel) as archive:
        packaged = {Path(n).name for n in archive.namelist() if n.startswith("tilecl/csrc/")}
    assert {
        p.name for p in (ROOT / "csrc").iterdir() if p.suffix in {".cu", ".cuh", ".h", ".cpp"}
    } <= packaged
    site = tmp_path / "site"
    _run([*PIP, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)])
    run_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    # the checkout's build cache: the packaged sources hash as the checkout's, so a complete copy finds
    # the library the suite built (a missing file would change the hash and fail to compile)
    run_env.update(PYTHONPATH=os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]]),
                   TILECL_BUILD_DIR=str(_cuda_build.BUILD_ROOT))  # fmt: skip
    (tmp_path / "run").mkdir()
    done = subprocess.run(
        [sys.executable, "-S", "-c", _FIRST_USE], cwd=tmp_path / "run", env=run_env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(result["csrc"]).is_relative_to(site)
    assert abs(result["loss"] - result["want"]) <= 1e-5 * abs(result["want"])


def test_the_first_use_build_says_so_and_is_cached(tmp_path, monkeypatch, capsys):
    """``backend="cuda"`` compiles tilecl._cuda on first use for the GPU's architecture alone: one line
    says so and where it is cached, one how long it took; the next use loads the cached library."""
    builds = []

    def compile_stub(output: Path, temp_dir: Path, archs=None, strict=False) -> None:
        builds.append(archs)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_bytes(b"library")

    monkeypatch.setattr(_cuda_build, "BUILD_ROOT", tmp_path)
    monkeypatch.setattr(_cuda_build, "build_extension", compile_stub)
    monkeypatch.setattr(_cuda_build, "find_nvcc", lambda: "/usr/bin/true")
    first = _cuda_build.build_extension_jit(90)
    err = capsys.readouterr().err
    assert "compiling the CUDA C++ kernels for sm_90" in err and str(first.parent) in err
    assert "compiled tilecl._cuda for sm_90 in" in err
    assert builds == [[90]] and first.read_bytes() == b"library" and first.is_relative_to(tmp_path)
    assert _cuda_build.build_extension_jit(90) == first and builds == [[90]]  # cached: no second build
    assert capsys.readouterr().err == ""
    assert _cuda_build.build_extension_jit(80) != first and builds == [[90], [80]]  # per architecture
