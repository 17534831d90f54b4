"""Static checks of the Triton kernels, compiled ahead of time for sm_80 and sm_90 (no GPU needed).

The compilation runs in a child process: this test process runs Triton's
interpreter (TRITON_INTERPRET=1), whose kernels cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tilecl.inspect_kernels import SHARED_LIMIT
from tilecl.kernels import pass_count


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "tilecl", "inspect", "--json", str(path)], env=env, check=True)
    return json.loads(path.read_text())


def test_every_kernel_config_and_arch_compiles(report):
    combos = {
        (k["name"], k["arch"], k["dtype"], json.dumps(k["config"], sort_keys=True)) for k in report["kernels"]
    }
    assert len(combos) == len(report["kernels"]) == 5 * 2 * 9
    assert report["passes"] == {"default": 5, "deterministic": 6}


def test_tensor_cores_for_half_types_on_both_archs(report):
    half = [k for k in report["kernels"] if k["dtype"] in ("float16", "bfloat16")]
    assert {k["arch"] for k in half} == {"sm_80", "sm_90"}
    missing = [(k["name"], k["arch"], k["dtype"]) for k in half if k["tensor_core_instructions"] == 0]
    assert not missing, f"no mma/wgmma in {missing}"


def test_zero_spills_and_shared_memory_within_limits(report):
    spills = [
        (k["name"], k["arch"], k["dtype"], k["spill_bytes"]) for k in report["kernels"] if k["spill_bytes"]
    ]
    assert not spills
    for k in report["kernels"]:
        assert 0 < k["shared_bytes"] <= SHARED_LIMIT[int(k["arch"][3:])]
        assert 0 < k["registers"] <= 255


def test_pass_counts():
    assert pass_count(512, 512, deterministic=False) == 5
    assert pass_count(512, 512, deterministic=True) == 6
    # each further 512-wide feature chunk recomputes S once more (twice when deterministic)
    assert pass_count(1024, 512, deterministic=False) == 6
    assert pass_count(1024, 512, deterministic=True) == 8
