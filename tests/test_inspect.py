"""Static checks of the GPU kernels, compiled ahead of time for sm_80 and sm_90 (no GPU needed), by
``python -m tools.inspect_kernels``.

The compilation runs in a child process: this test process runs Triton's
interpreter (TRITON_INTERPRET=1), whose kernels cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tilecl import _cuda_build
from tilecl.backends.triton import pass_count, sigmoid_pass_count
from tools import inspect_kernels
from tools.inspect_kernels import SHARED_LIMIT

ROOT = Path(__file__).resolve().parents[1]
#: compiling every kernel for sm_80 and sm_90 (nvcc included) takes minutes cold
slow = pytest.mark.slow


#: Triton kernels that move partials and multiply nothing: no tensor cores, shared memory or
#: address products (pointers step by a line)
MEMORY_BOUND = {"merge_stats"}
#: (kernel, dtype, arch) of the CUDA section; a kernel may be reported once per gradient form
CUDA_KERNELS = {
    (name, dtype, arch)
    for name in ("stats", "merge_stats", "grad_rows", "grad_cols", "sum_partials")
    for dtype in ("float32", "float16", "bfloat16")
    for arch in ("sm_80", "sm_90")
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "tools.inspect_kernels", "--json", str(path)]
    subprocess.run(command, env=env, check=True, cwd=ROOT)
    return json.loads(path.read_text())


@slow
def test_every_kernel_config_and_arch_compiles(report):
    combos = {
        (k["name"], k["arch"], k["dtype"], json.dumps(k["config"], sort_keys=True)) for k in report["kernels"]
    }
    assert len(combos) == len(report["kernels"]) == 11 * 2 * 9
    # one S pass for both statistics, then S, G·b and Gᵀ·a (deterministic: S once more for Gᵀ·a)
    assert report["passes"] == {"default": 4, "deterministic": 5}
    model = report["performance_model"]
    assert model["tilecl_bf16"]["passes"] == 4
    # the sigmoid loss is one sweep: S, G·b and Gᵀ·a (the deterministic one recomputes S for Gᵀ·a)
    assert report["sigmoid_passes"] == {"default": 3, "deterministic": 4}
    sigmoid = report["performance_model"]["sigmoid"]
    assert sigmoid["512"]["passes"] == 3 and sigmoid["512"]["speedup_vs_reported"] >= 2


@slow
def test_tensor_cores_for_half_types_on_both_archs(report):
    half = [k for k in report["kernels"] if k["dtype"] in ("float16", "bfloat16")]
    assert {k["arch"] for k in half} == {"sm_80", "sm_90"}
    missing = [
        (k["name"], k["arch"], k["dtype"])
        for k in half
        if k["tensor_core_instructions"] == 0 and k["name"] not in MEMORY_BOUND
    ]
    assert not missing, f"no mma/wgmma in {missing}"


@slow
def test_zero_spills_and_shared_memory_within_limits(report):
    spills = [
        (k["name"], k["arch"], k["dtype"], k["spill_bytes"]) for k in report["kernels"] if k["spill_bytes"]
    ]
    assert not spills
    for k in report["kernels"]:
        assert 0 < k["shared_bytes"] <= SHARED_LIMIT[int(k["arch"][3:])] or k["name"] in MEMORY_BOUND
        assert 0 < k["registers"] <= 255


@slow
def test_every_address_product_is_64_bit(report):
    """index × stride over a tile is formed in int64: an int32 product wraps at N·D = 2^31
    (N = 4,194,304 rows at D = 512) and reads or stores gradients at wrong addresses."""
    for k in report["kernels"]:
        if k["name"] in MEMORY_BOUND:
            continue
        where = (k["name"], k["arch"], k["dtype"], k["config"]["BLOCK_DOUT"])
        assert k["address_products"] > 0, where
        assert k["address_products_i64"] == k["address_products"], where


@slow
def test_cuda_section_reports_every_kernel_without_spills(report):
    cuda = report["cuda"]
    if "skipped" in cuda:
        pytest.skip(cuda["skipped"])
    kernels = cuda["kernels"]
    assert {(k["name"], k["dtype"], k["arch"]) for k in kernels} == CUDA_KERNELS
    assert not [k for k in kernels if k["spill_store_bytes"] or k["spill_load_bytes"]]
    # the partials' merge stages nothing in shared memory
    assert all(0 < k["shared_bytes"] or k["name"] == "merge_stats" for k in kernels)
    assert all(k["shared_bytes"] <= 48 * 1024 and 0 < k["registers"] <= 255 for k in kernels)
    half = [
        k for k in kernels if k["dtype"] != "float32" and k["name"] not in ("sum_partials", "merge_stats")
    ]
    assert all(k["tensor_core_instructions"] > 0 for k in half)


@slow
def test_cuda_only_cli(tmp_path):
    path = tmp_path / "cuda.json"
    done = subprocess.run(
        [sys.executable, "-m", "tools.inspect_kernels", "--only", "cuda", "--json", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    report = json.loads(path.read_text())
    assert set(report) == {"cuda"}
    if "skipped" in report["cuda"]:
        assert done.returncode == 1 and report["cuda"]["skipped"] in done.stderr
    else:
        assert done.returncode == 0, done.stderr
        assert {(k["name"], k["dtype"], k["arch"]) for k in report["cuda"]["kernels"]} == CUDA_KERNELS


@pytest.mark.parametrize(
    "missing,reason",
    [("find_nvcc", "nvcc not found"), ("sources", "the csrc/ sources are not here")],
)
def test_cuda_only_without_nvcc_or_sources_says_why_and_fails(missing, reason, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(_cuda_build, missing, lambda: None if missing == "find_nvcc" else [])
    with pytest.raises(SystemExit) as exit_:
        inspect_kernels.main(["--only", "cuda", "--json", str(tmp_path / "cuda.json")])
    assert exit_.value.code == 1
    assert reason in capsys.readouterr().err
    assert reason in json.loads((tmp_path / "cuda.json").read_text())["cuda"]["skipped"]


def test_the_cli_help_shows_every_option_with_its_default():
    done = subprocess.run(
        [sys.executable, "-m", "tools.inspect_kernels", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "--only {triton,cuda} one section only (default: both sections)" in text
    assert "(default: no file)" in text


def test_sigmoid_pass_counts():
    assert sigmoid_pass_count(512, 512, deterministic=False) == 3
    assert sigmoid_pass_count(512, 512, deterministic=True) == 4
    assert sigmoid_pass_count(768, 512, deterministic=False) == 4


def test_pass_counts():
    assert pass_count(512, 512, deterministic=False) == 4
    assert pass_count(512, 512, deterministic=True) == 5
    # each further 512-wide feature chunk recomputes S once more (twice when deterministic)
    assert pass_count(1024, 512, deterministic=False) == 5
    assert pass_count(1024, 512, deterministic=True) == 7
