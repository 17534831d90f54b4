"""What a user installs: the sdist builds the CUDA extension, a build without it says so, the CLI
names the extra a command needs."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tilecl import _cuda_build
from utils import extension_in_a_fresh_process

ROOT = Path(__file__).resolve().parents[1]


def _sdist(tmp_path: Path) -> Path:
    subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env={**os.environ, "TILECL_SKIP_CUDA_BUILD": "1"},
    )
    (archive,) = (tmp_path / "dist").glob("tilecl-*.tar.gz")
    return archive


def test_the_sdist_carries_the_cuda_sources_and_the_test_fixtures(tmp_path):
    with tarfile.open(_sdist(tmp_path)) as archive:
        names = {Path(name).relative_to(Path(name).parts[0]).as_posix() for name in archive.getnames()}
    assert {"csrc/kernels.cuh", "csrc/bindings.cpp", "csrc/instantiate_half.cu", "csrc/cuda_emu.h"} <= names
    assert {"tests/conftest.py", "tests/utils.py", "kernels/contrastive.py", "LICENSE"} <= names


@pytest.mark.slow
def test_the_sdist_builds_the_cuda_extension_where_nvcc_is(tmp_path):
    if _cuda_build.find_nvcc() is None:
        pytest.skip("nvcc not found")
    with tarfile.open(_sdist(tmp_path)) as archive:
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


def test_a_build_without_the_extension_says_so_once(tmp_path):
    done = subprocess.run(
        [sys.executable, "setup.py", "build_py", "--build-lib", str(tmp_path / "lib")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "TILECL_SKIP_CUDA_BUILD": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("building without the CUDA C++ extension tilecl._cuda") == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "command,module,extra",
    [(["demo"], "sklearn", "demo"), (["reproduce", "synthetic", "--fast"], "tqdm", "demo")],
)
def test_the_cli_names_the_extra_a_command_needs(command, module, extra):
    # the package made unimportable, as on an install without the extra
    script = (
        f"import sys; sys.modules[{module!r}] = None; from tilecl.__main__ import main; main({command!r})"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 1
    assert f"pip install 'tilecl[{extra}]'" in done.stderr
    assert "Traceback" not in done.stderr
