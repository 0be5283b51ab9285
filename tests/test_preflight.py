"""A run that would fail on a setting fails before round 1: `fedtune deploy run` and
`fedtune simulate` check the label set against the held-out file, every path, the
strategy's and the privacy settings, and the model first, each with one line and exit
code 1, and write no run folder (and, for a deployed run, launch nothing). Paths given
at launch resolve against the launching directory (the deployed case is run for real in
test_deploy.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.flower_env import child_env

REPO = Path(__file__).resolve().parent.parent
FEDTUNE = str(Path(sys.executable).parent / "fedtune")


@pytest.fixture()
def operator_dir(tmp_path: Path, sentiment_data: dict[str, Path]) -> Path:
    """Where the operator launches from: the label set, a held-out file with a label
    outside it, and a good one, under relative names."""
    folder = tmp_path / "operator"
    folder.mkdir()
    (folder / "labels.json").write_text(sentiment_data["labels"].read_text())
    (folder / "held-out.jsonl").write_text(sentiment_data["test"].read_text())
    (folder / "other-labels.jsonl").write_text(json.dumps({"text": "great card", "label": "card_arrival"}) + "\n")
    return folder


BAD = {
    "labels outside the label set": (
        'central-eval-path="other-labels.jsonl"',
        "other-labels.jsonl:1: field 'label': label 'card_arrival' is not in the coordinator's label set (2 labels)",
    ),
    "missing held-out file": ('central-eval-path="missing.jsonl"', "config 'central-eval-path': "),
    "missing labels file": ('labels-file="nope.json"', "config 'labels-file': "),
    "server momentum out of range": (
        'strategy="fedavgm" server-momentum=1.5',
        "config 'server-momentum': must be in [0, 1), got 1.5",
    ),
    "FedAdam without a step": ('strategy="fedadam" fedopt-eta=0.0', "config 'fedopt-eta': must be > 0, got 0.0"),
    "DP without noise": ("dp=true", "config 'dp': dp = true needs dp-noise-multiplier or dp-target-epsilon"),
    "model not offline": (
        'model="no-such-org/no-such-model"',
        "config 'model': 'no-such-org/no-such-model' is "
        "neither a local folder nor a Hugging Face id in the "
        "local cache",
    ),
}


def _one_line(out: subprocess.CompletedProcess[str], expected: str, where: Path) -> None:
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert expected in lines[0], lines[0]
    assert not (where / "runs").exists()  # no run folder, no round folder


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD))
def test_deploy_run_refuses_bad_settings_before_launching(
    case: str, operator_dir: Path, tmp_path: Path, tiny_bert_dir: Path
) -> None:
    setting, expected = BAD[case]
    config = f'model="{tiny_bert_dir}" labels-file="labels.json" central-eval-path="held-out.jsonl" run-name="bad"'
    deploy = tmp_path / "deploy"
    out = subprocess.run(
        [
            FEDTUNE,
            "deploy",
            "run",
            "--dir",
            str(deploy),
            "--app",
            str(REPO),
            "--run-config",
            config,
            "--run-config",
            setting,
        ],  # the later --run-config wins, as with flwr run
        capture_output=True,
        text=True,
        cwd=operator_dir,
        env=child_env(),
        timeout=300,
    )
    _one_line(out, expected, operator_dir)
    assert not deploy.exists()  # nothing launched, nothing recorded


@pytest.mark.parametrize(
    "case", ["labels outside the label set", "missing held-out file", "server momentum out of range"]
)
def test_simulate_refuses_bad_settings_before_round_one(
    case: str, operator_dir: Path, tiny_bert_dir: Path, sentiment_data: dict[str, Path]
) -> None:
    setting, expected = BAD[case]
    sets = [
        f"model={tiny_bert_dir}",
        "labels-file=labels.json",
        "central-eval-path=held-out.jsonl",
        f"data-path={sentiment_data['train']}",
        *setting.split(" "),
    ]
    out = subprocess.run(
        [
            FEDTUNE,
            "simulate",
            "--sites",
            "2",
            "--rounds",
            "1",
            "--run-name",
            "bad",
            *[x for s in sets for x in ("--set", s)],
        ],
        capture_output=True,
        text=True,
        cwd=operator_dir,
        env=child_env(),
        timeout=300,
    )
    _one_line(out, expected, operator_dir)


def test_deploy_run_pins_relative_paths_to_the_launching_directory(
    operator_dir: Path, tmp_path: Path, tiny_bert_dir: Path
) -> None:
    """With no SuperLink to reach, `flwr run` fails; the launched record shows what the
    installed app copy would have been given."""
    deploy = tmp_path / "deploy"
    config = f'model="{tiny_bert_dir}" labels-file="labels.json" central-eval-path="held-out.jsonl" run-name="rel"'
    subprocess.run(
        [FEDTUNE, "deploy", "run", "--dir", str(deploy), "--app", str(REPO), "--run-config", config],
        capture_output=True,
        text=True,
        cwd=operator_dir,
        env=child_env(),
        timeout=300,
    )
    import tomllib

    launched = tomllib.loads((deploy / "launched" / "rel.toml").read_text())
    assert launched["labels-file"] == str(operator_dir / "labels.json")
    assert launched["central-eval-path"] == str(operator_dir / "held-out.jsonl")
    assert launched["output-dir"] == str(operator_dir / "runs")
