"""The training recipes of examples/, each run as users run it: two CPU processes under torchrun
(gloo), then one process with the two ranks' batches together.

Each recipe must train (its loss falls) and its first step must be the single-process step: the
gradients after the framework's reduction (DDP's average, FSDP2's reduce-scatter) equal, in
float64, those of one process on the global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BATCH = 16  # pairs per rank
STEPS = 20

#: name → (script, extra arguments, the optional package it needs)
RECIPES = {
    "torchrun ddp clip": ("ddp_torchrun.py", ["--loss", "clip"], None),
    "torchrun ddp siglip ring": ("ddp_torchrun.py", ["--loss", "siglip", "--dist-impl", "ring"], None),
    "torchrun fsdp2 siglip": ("ddp_torchrun.py", ["--loss", "siglip", "--fsdp2"], "torch.distributed.fsdp"),
    "accelerate clip": ("accelerate_clip.py", ["--loss", "clip"], "accelerate"),
    "lightning clip": ("lightning_clip.py", ["--loss", "clip"], "lightning"),
    "sentence-transformers trainer mnrl": ("sentence_transformers_mnrl.py", [], "datasets"),
}


def run(script: str, args: list[str], processes: int, out: Path) -> dict:
    command = [str(ROOT / "examples" / script), *args, "--cpu", "--float64", "--out", str(out)]
    if processes > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *command]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(
        [sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    losses = json.loads((out / "losses.json").read_text())
    return {"losses": losses, "grads": torch.load(out / "first_grads.pt")}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_trains_and_its_first_step_is_the_single_process_step(name, tmp_path):
    script, args, needs = RECIPES[name]
    if needs is not None:
        pytest.importorskip(needs)
    ranks = run(script, [*args, "--batch", str(BATCH), "--steps", str(STEPS)], 2, tmp_path / "ranks")
    one = run(script, [*args, "--batch", str(2 * BATCH), "--steps", "1"], 1, tmp_path / "one")

    losses = ranks["losses"]
    assert len(losses) == STEPS
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    assert abs(losses[0] - one["losses"][0]) <= 1e-10 * abs(one["losses"][0])

    want, got = one["grads"], ranks["grads"]
    assert sorted(got) == sorted(want)
    # against the largest gradient: some entries are zero up to rounding (a key bias's)
    scale = max(float(g.abs().max()) for g in want.values())
    for key, expected in want.items():
        assert got[key].shape == expected.shape, key
        error = float((got[key] - expected).abs().max())
        assert error <= 1e-10 * scale, f"{name}: {key} differs by {error:.3g} (largest gradient {scale:.3g})"
