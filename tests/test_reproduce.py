"""The reproduction CLI's experiments run end to end and show the effect at small scale."""

from __future__ import annotations

import json

import pytest

from tilecl.__main__ import main
from tilecl.reproduce import SyntheticConfig, final_theta, finite_sample_mle, make_data, train_theta


@pytest.mark.slow
def test_synthetic_bias_is_visible_in_a_short_run():
    """One seed, 3000 steps: minibatch InfoNCE overshoots θ* = 1, gamma-EM lands far closer."""
    cfg = SyntheticConfig(steps=3000, average_last=1000, gamma=0.05)
    data = make_data(cfg, 0)
    assert 0.9 < finite_sample_mle(data) < 1.1
    infonce = final_theta(cfg, train_theta(cfg, data, "infonce", 0))
    gamma = final_theta(cfg, train_theta(cfg, data, "gamma-mean", 0))
    assert infonce > 1.3
    assert abs(gamma - 1.0) < abs(infonce - 1.0) / 2


@pytest.mark.slow
def test_synthetic_cli_writes_json_and_plot(tmp_path):
    out_json, out_png = tmp_path / "s.json", tmp_path / "s.png"
    main(
        [
            "reproduce",
            "synthetic",
            "--seeds",
            "2",
            "--steps",
            "60",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
        ]
    )
    data = json.loads(out_json.read_text())
    assert data["optimum"] == 1.0 and "mle" in data and "config" in data
    assert set(data["methods"]) == {"infonce", "gamma-sample", "gamma-mean"}
    assert all(len(m["final_theta"]) == 2 for m in data["methods"].values())
    assert out_png.stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "experiment,methods",
    [
        ("digits", {"infonce-B", "infonce-4B", "gamma-B"}),
        ("modality", {"clip", "clip+separation", "clip+bridge", "clip+geometric"}),
    ],
)
def test_real_data_cli_writes_json_and_plot(experiment, methods, tmp_path):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    main(
        [
            "reproduce",
            experiment,
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
        ]
    )
    data = json.loads(out_json.read_text())
    assert set(data["methods"]) == methods
    if experiment == "digits":
        assert 0 <= data["methods"]["gamma-B"]["probe_mean"] <= 1
    assert out_png.stat().st_size > 0
