"""Run settings: parsing Flower's flat config, clear errors, strategy choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fedtune.server.strategies import build_strategy, weighted_metrics
from flwr.common import ndarrays_to_parameters
from flwr.server.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

from fedtune.config import RunSettings, project_run_config
from fedtune.errors import ConfigError
from fedtune.schedule import lr_factor, round_progress


def test_pyproject_defaults_parse() -> None:
    settings = RunSettings.from_run_config(project_run_config())
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
    ("name", "cls"), [("fedavg", FedAvg), ("fedavgm", FedAvgM), ("fedprox", FedProx), ("fedadam", FedAdam), ("fedyogi", FedYogi)]
)
def test_strategy_by_name(name: str, cls: type) -> None:
    params = ndarrays_to_parameters([np.zeros(3, np.float32)])
    strategy = build_strategy(RunSettings(strategy=name), params, None, lambda r: {}, lambda r: {})
    assert type(strategy) is cls


def test_weighted_metrics_weights_by_examples() -> None:
    out = weighted_metrics([(1, {"acc": 1.0, "site": "a", "num_examples": 1}), (3, {"acc": 0.0, "site": "b", "num_examples": 3})])
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

    RobertaModel(RobertaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=40)).save_pretrained(tmp_path)
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
