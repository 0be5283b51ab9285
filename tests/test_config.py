"""Run settings: parsing Flower's flat config, clear errors, strategy choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters
from flwr.server.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

from fedtune.config import RunSettings, default_run_config
from fedtune.errors import ConfigError
from fedtune.schedule import lr_factor, round_progress
from fedtune.server.strategies import build_strategy, weighted_metrics

REPO = Path(__file__).resolve().parent.parent


def test_pyproject_table_is_the_declarations_written_out() -> None:
    """pyproject's [tool.flwr.app.config] is written from fedtune/config.py: same keys, same
    defaults, same help (`fedtune settings --write-pyproject pyproject.toml` after a change)."""
    from fedtune.run_config_table import TABLE, differences, render_table

    assert differences(REPO / "pyproject.toml") == []
    text = (REPO / "pyproject.toml").read_text()
    assert text[text.index(TABLE) :] == render_table()


def test_one_default_changed_in_one_place_shows_everywhere(tmp_path: Path) -> None:
    """Change lora-r's default in fedtune/config.py alone (a copy of the core): RunSettings(),
    `fedtune simulate --help` and `fedtune settings` show it, the consistency check names the
    stale pyproject in one line, and writing the table brings pyproject along."""
    import shutil
    import subprocess
    import sys

    core = tmp_path / "fedtune"
    shutil.copytree(REPO / "fedtune", core, ignore=shutil.ignore_patterns("__pycache__"))
    config = core / "config.py"
    declared = 'lora_r: int = setting(8, "LoRA rank"'
    assert config.read_text().count(declared) == 1
    config.write_text(config.read_text().replace(declared, declared.replace("(8,", "(12,")))
    pyproject = tmp_path / "pyproject.toml"
    shutil.copy(REPO / "pyproject.toml", pyproject)

    def run(code: str) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path), "HOME": str(tmp_path)}
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
        )

    probe = run(
        "import fedtune.config as c; from fedtune.config import RunSettings; print(c.__file__); "
        "print(RunSettings().lora_r)"
    )
    assert probe.stdout.split() == [str(config), "12"], probe.stderr[-2000:]
    cli = "import sys; from fedtune.cli import main; sys.exit(main(sys.argv[1:]))"
    help_text = run(f"import sys; sys.argv[1:] = ['simulate', '--help']; {cli}")
    assert "  lora-r = 12: LoRA rank" in help_text.stdout, help_text.stderr[-2000:]
    check = run(f"import sys; sys.argv[1:] = ['settings', '--check-pyproject', {str(pyproject)!r}]; {cli}")
    assert check.returncode == 1 and check.stderr.count("\n") == 1, check.stderr
    assert "lora-r: pyproject has 8, fedtune/config.py declares 12" in check.stderr
    write = run(f"import sys; sys.argv[1:] = ['settings', '--write-pyproject', {str(pyproject)!r}]; {cli}")
    assert write.returncode == 0, write.stderr
    import tomllib

    assert tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]["lora-r"] == 12
    assert (
        run(f"import sys; sys.argv[1:] = ['settings', '--check-pyproject', {str(pyproject)!r}]; {cli}").returncode == 0
    )


def test_pyproject_defaults_parse() -> None:
    settings = RunSettings.from_run_config(default_run_config())
    assert settings.task == "seq-cls" and settings.lora_r == 8
    assert len(settings.label_list()) == 77


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("task", "translation", "must be one of seq-cls, causal-lm"),
        ("lora-r", 0, "must be at least 1"),
        ("lora-r", 2.5, "expected int"),
        ("val-fraction", 1.0, "must be in [0, 1)"),
        ("strategy", "fedsgd", "must be one of"),
        ("dirichlet-alpha", 0, "must be > 0"),
        ("ffa-head-rank", 16, "applies to seq-cls runs with ffa-lora = true"),
        ("dp-batch-size", -1, "must be 0 (use batch-size) or at least 1"),
        ("min-local-steps", -1, "must be 0 (no floor) or a count"),
        ("dp-local-epochs", -1.0, "must be 0 (use local-epochs) or > 0"),
        ("dp-mode", "central", "must be one of local, distributed"),
        ("dp-accountant", "gdp", "must be one of rdp, prv"),
        ("dp-sample-rate", 0.0, "is a Poisson sampling rate in (0, 1]"),
        ("lora-dropout", 1.0, "must be in [0, 1)"),
        ("warmup-fraction", -0.1, "must be in [0, 1)"),
        ("weight-decay", -0.01, "must be >= 0"),
        ("secagg-max-weight", -5.0, "must be 0 (from the census) or > 0"),
        ("secagg-modulus-range", 2**33, "must be in [2, 4.29497e+09]"),
        ("secagg-clipping-range", 0.0, "must be > 0"),
        ("local-steps", -3, "must be 0 (use local-epochs) or a count"),
    ],
)
def test_bad_values_name_the_key(key: str, value: object, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        RunSettings.from_run_config({key: value})
    assert str(info.value).startswith(f"config '{key}':") and words in str(info.value)


def test_label_list_from_string_and_file(tmp_path: Path) -> None:
    assert RunSettings(labels="a, b ,c").label_list() == ["a", "b", "c"]
    (tmp_path / "labels.txt").write_text("x\ny\n")
    assert RunSettings(labels_file=str(tmp_path / "labels.txt")).label_list() == ["x", "y"]
    with pytest.raises(ConfigError, match="duplicates"):
        RunSettings(labels="a,a").label_list()
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(ConfigError, match=r"bad.json:1: bad JSON"):
        RunSettings(labels_file=str(tmp_path / "bad.json")).label_list()
    assert RunSettings(task="causal-lm").label_list() == []


@pytest.mark.parametrize(
    ("name", "cls"),
    [("fedavg", FedAvg), ("fedavgm", FedAvgM), ("fedprox", FedProx), ("fedadam", FedAdam), ("fedyogi", FedYogi)],
)
def test_strategy_by_name(name: str, cls: type) -> None:
    params = ndarrays_to_parameters([np.zeros(3, np.float32)])
    strategy = build_strategy(RunSettings(strategy=name), params, None, lambda r: {}, lambda r: {})
    assert type(strategy) is cls


@pytest.mark.parametrize(
    ("name", "run", "attributes"),
    [
        (
            "fedavgm",
            {"server-learning-rate": 0.7, "server-momentum": 0.9},
            {"server_learning_rate": 0.7, "server_momentum": 0.9},
        ),
        ("fedprox", {"proximal-mu": 0.25}, {"proximal_mu": 0.25}),
        ("fedadam", {"fedopt-eta": 0.03, "fedopt-tau": 0.002}, {"eta": 0.03, "tau": 0.002}),
        ("fedyogi", {"fedopt-eta": 0.04, "fedopt-tau": 0.005}, {"eta": 0.04, "tau": 0.005}),
    ],
)
def test_strategy_settings_reach_flowers_strategy(name: str, run: dict, attributes: dict) -> None:
    params = ndarrays_to_parameters([np.zeros(3, np.float32)])
    settings = RunSettings.from_run_config({**default_run_config(), "strategy": name, **run})
    strategy = build_strategy(settings, params, None, lambda r: {}, lambda r: {})
    assert {k: getattr(strategy, k) for k in attributes} == attributes


def test_weighted_metrics_weights_by_examples() -> None:
    out = weighted_metrics(
        [(1, {"acc": 1.0, "site": "a", "num_examples": 1}), (3, {"acc": 0.0, "site": "b", "num_examples": 3})]
    )
    assert out == {"acc": 0.25}


def test_lr_schedule_continues_across_rounds() -> None:
    # The LR at the start of round 2 equals the LR at the end of round 1: one schedule.
    end_r1 = lr_factor(round_progress(1, 10, 10, 4), "linear", 0.0)
    start_r2 = lr_factor(round_progress(2, 0, 10, 4), "linear", 0.0)
    assert end_r1 == pytest.approx(start_r2) == pytest.approx(0.75)
    assert lr_factor(0.0, "linear", 0.1) < 0.01 and lr_factor(0.1, "linear", 0.1) == pytest.approx(1.0)
    assert lr_factor(1.0, "cosine", 0.0) == pytest.approx(0.0, abs=1e-9)


def test_low_rank_head_refuses_a_head_with_hidden_layers(tmp_path: Path) -> None:
    """RoBERTa's head has a fresh dense layer before its output: a low-rank head would
    leave that layer at random, so ffa-head-rank names the problem instead."""
    from transformers import RobertaConfig, RobertaModel

    from fedtune.model import LoraSettings, build_lora_model

    RobertaModel(
        RobertaConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=40,
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as info:
        build_lora_model(str(tmp_path), "seq-cls", LoraSettings(freeze_a=True, head_rank=4), ["a", "b"])
    assert str(info.value).startswith("config 'ffa-head-rank':") and "RobertaClassificationHead" in str(info.value)


def test_distributed_dp_needs_secagg_and_the_head_only_recipe() -> None:
    dp = {"dp": True, "dp-target-epsilon": 8.0, "dp-mode": "distributed", "dp-head-only": True}
    with pytest.raises(ConfigError, match=r"^config 'dp-mode': 'distributed' adds noise shares that only SecAgg\+"):
        RunSettings.from_run_config({**dp, "secagg": False})
    with pytest.raises(ConfigError, match=r"^config 'dp-mode': 'distributed' trains the seq-cls head only"):
        RunSettings.from_run_config({**dp, "secagg": True, "dp-head-only": False})
    assert RunSettings.from_run_config({**dp, "secagg": True}).head_only
    with pytest.raises(ConfigError, match=r"^config 'secagg-num-shares': dp-mode = distributed needs every site"):
        RunSettings.from_run_config({**dp, "secagg": True, "secagg-num-shares": 0.5})


def test_rules_that_need_the_site_count_and_zero_means_fallbacks() -> None:
    settings = RunSettings.from_run_config({"secagg-quantization-range": 2**30})
    settings.check_for_sites(3)
    with pytest.raises(ConfigError, match=r"^config 'secagg-quantization-range': 4 sites x 1073741824 levels overflow"):
        settings.check_for_sites(4)
    RunSettings.from_run_config({"secagg": False, "secagg-quantization-range": 2**30}).check_for_sites(4)
    zeros = RunSettings.from_run_config({"dp-batch-size": 0, "dp-learning-rate": 0, "dp-local-epochs": 0})
    assert (zeros.dp_batch, zeros.dp_peak_learning_rate, zeros.dp_epochs) == (32, 0.01, 0.5)
    set_ = RunSettings()
    assert (set_.dp_batch, set_.dp_peak_learning_rate, set_.dp_epochs) == (512, 0.1, 2.0)
