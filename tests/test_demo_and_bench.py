"""The demo, the memory probe and the benchmark tooling run end to end (small sizes)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.demo import run_demo
from experiments.memory import peak_extra_memory_cpu

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_trains_and_reports_memory(capsys):
    out = run_demo(epochs=15, batch_size=256, memory_n=2048, memory_d=32)
    assert out["r1_after"] > out["r1_before"]
    assert out["digit_r1_after"] > 0.3
    mem = out["memory"]
    assert mem["tilecl"]["loss"] == pytest.approx(mem["naive"]["loss"], rel=1e-5)
    assert mem["tilecl"]["peak_extra_bytes"] < mem["naive"]["peak_extra_bytes"]
    assert "R@1" in capsys.readouterr().out


@pytest.mark.slow
def test_memory_probe_sees_the_naive_matrix():
    n = 4096
    naive = peak_extra_memory_cpu("naive", n, 16)
    tiled = peak_extra_memory_cpu("tilecl", n, 16)
    assert naive["peak_extra_bytes"] > 2 * n * n * 4  # at least two N x N float32 buffers
    assert tiled["peak_extra_bytes"] < n * n * 4  # never one


@pytest.mark.slow
def test_bench_table_and_plot(tmp_path):
    rows = [
        {"provider": p, "n": n, "d": 8, "time_s": t, "peak_extra_bytes": m, "efficiency": 0.5}
        for p, n, t, m in [("naive", 64, 2.0, 2**25), ("tilecl", 64, 1.0, 2**20), ("tilecl", 128, 3.0, 2**21)]
    ]
    rows[1]["time_ratio_to_naive"] = 0.5
    data = {"machine": {"cpu": "x", "cores": 2, "torch": "t", "torch_threads": 2}, "matmul_flops": {"8": 1e9}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({**data, "rows": rows}))
    table = subprocess.run(
        [sys.executable, "-m", "bench.table", "--json", str(path)], cwd=ROOT, capture_output=True, text=True
    )
    assert table.returncode == 0, table.stderr
    assert "| 64 | 8 | 2 s | 1 s | 0.50 |" in table.stdout
    png = tmp_path / "r.png"
    plot = subprocess.run(
        [sys.executable, "-m", "bench.plot", "--json", str(path), "--out", str(png)],
        cwd=ROOT,
        capture_output=True,
    )
    assert plot.returncode == 0 and png.stat().st_size > 0


@pytest.mark.slow
def test_bench_plot_draws_every_committed_result_file(tmp_path):
    """python -m bench.plot --out DIR: one PNG per result file in bench/results/ that has a figure."""
    from bench.plot import NOT_PLOTTED, RESULTS, main

    main(["--out", str(tmp_path)])
    expected = {p.stem + ".png" for p in RESULTS.glob("*.json") if p.name not in NOT_PLOTTED}
    assert len(expected) >= 8
    assert {p.name for p in tmp_path.iterdir()} == expected
    for name in expected:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_reproduction_figures_redraw_from_json_with_zoomed_accuracy_axes(tmp_path):
    """The digits and modality figures come back from docs/results/*.json, their y axes not from 0."""
    from experiments.reproduce import REPLOTTABLE, replot

    for name in REPLOTTABLE:
        data = json.loads((ROOT / "docs" / "results" / f"{name}.json").read_text())
        png = tmp_path / f"{name}.png"
        (r1_low, r1_high), (probe_low, probe_high) = replot(
            str(ROOT / "docs" / "results" / f"{name}.json"), str(png)
        )
        assert png.stat().st_size > 0
        probes = [v for m in data["methods"].values() for v in m["probe"]]
        assert 0 < probe_low < min(probes) and max(probes) < probe_high < 1
        assert probe_high - probe_low < 0.1, "close accuracies must be told apart"
        assert r1_low > 0


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["gather", "ring"])
def test_distributed_bench_measures_its_traffic(impl):
    """A tiny run of the distributed bench: the loopback carries at least the designed payload."""
    from bench.test_distributed_cpu import run_ranks

    row = run_ranks(impl, 2, 256, 32)
    assert row["time_s"] > 0 and row["peak_extra_bytes"] >= 0
    assert row["loopback_bytes_per_rank"] >= row["model_bytes_per_rank"] > 0


def test_distributed_table_prints_the_committed_results():
    table = subprocess.run(
        [sys.executable, "-m", "bench.table", "--distributed"], cwd=ROOT, capture_output=True, text=True
    )
    assert table.returncode == 0, table.stderr
    assert "| ring |" in table.stdout and "| gather |" in table.stdout


@pytest.mark.slow
def test_gpu_check_dry_run_reports_every_step(tmp_path):
    """make gpu-check GPU_CHECK_DRY=1: every step reports, the CSV has Liger-Kernel's columns."""
    from bench.gpu_bench import COLUMNS

    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--dry", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (tmp_path / "summary.md").read_text()
    for step in ("env", "build", "tests", "oracle-on-cupy", "sanitizer", "benchmark"):
        assert f"| {step} | " in summary, step
    assert "| fail |" not in summary
    assert (tmp_path / "env.json").exists() and list(tmp_path.glob("gpu_bench_*.png"))
    with open(tmp_path / "gpu_bench.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == COLUMNS
    assert {r["kernel_provider"] for r in rows} >= {
        "naive",
        "tilecl-torch",
        "tilecl-triton",
        "tilecl-cuda-emu",
    }
    assert {r["kernel_operation_mode"] for r in rows} == {"forward", "backward", "full"}
    siglip = {r["kernel_provider"] for r in rows if r["kernel_name"] == "siglip_loss"}
    assert siglip >= {"naive", "tilecl-torch", "tilecl-triton", "tilecl-triton-deterministic"}
    assert "| loss | provider |" in summary and "| siglip_loss | naive |" in summary  # each row's loss


def test_a_failed_gpu_check_step_says_what_failed(tmp_path):
    """The summary names the failing step's last error, not only its exit status."""
    from bench.gpu_check import _run

    status, detail = _run([sys.executable, "-c", "import not_a_module_here"], tmp_path / "step.log", 60)
    assert status == "fail"
    assert detail.startswith("exit 1: ModuleNotFoundError: No module named 'not_a_module_here'")
    assert detail.endswith("(see step.log)")


def test_small_batch_bench_measures_every_kind_of_input(tmp_path):
    """python -m bench.small_batch: tilecl and the naive loss on every kind of input, interleaved."""
    from bench import small_batch

    out = tmp_path / "small.json"
    small_batch.main(["--sizes", "16", "--dims", "8", "--rounds", "5", "--out", str(out)])
    found = json.loads(out.read_text())
    rows = found["rows"]
    clip = [(r["features"], r["scale"]) for r in rows if r["loss"] == "clip"]
    assert clip == list(small_batch.INPUTS)
    assert {r["loss"] for r in rows} == {"clip", "siglip", "supcon"}
    assert all(r["ratio"] > 0 and r["rounds"] >= 5 for r in rows)
    assert set(found["counts_n128"]) == {"clip", "siglip", "supcon"}
