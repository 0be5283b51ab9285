"""Several devices at one site (client/site_ranks.py): two gloo ranks on this CPU train a
round whose adapter equals one process's on the same global batches and seed, for a
classifier and for a causal LM (loss weighted by labelled tokens); the flags refuse
what cannot run, in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from support.tiny_models import save_tiny_bert

from fedtune.adapter_io import get_adapter_arrays
from fedtune.client.dp_history import MemoryHistory
from fedtune.client.node_settings import NodeSettings
from fedtune.client.site_ranks import RankGroup
from fedtune.client.site_work import SiteWork
from fedtune.config import RunSettings, default_run_config
from fedtune.errors import FedtuneError


def _round(settings: RunSettings, ranks: RankGroup | None, start: list[np.ndarray]) -> list[np.ndarray]:
    node = NodeSettings("simulated", partition_id=0, num_partitions=1)
    work = SiteWork(settings, node, MemoryHistory(), ranks=ranks)
    arrays, _, metrics = work.fit([a.copy() for a in start], {"server-round": 1, "num-rounds": 1})
    assert metrics["steps"] == settings.local_steps
    return [np.array(a, copy=True) for a in arrays]


def _one_and_two_ranks(settings: RunSettings, tmp_path: Path) -> tuple[list[np.ndarray], list[np.ndarray], list]:
    node = NodeSettings("simulated", partition_id=0, num_partitions=1)
    probe = SiteWork(settings, node, MemoryHistory())
    labels = probe.labels({})
    start = [np.array(a, copy=True) for a in get_adapter_arrays(probe.model(labels), settings.lora_settings())]
    one = _round(settings, None, start)
    threads = torch.get_num_threads()
    group = RankGroup(2, tmp_path / "rendezvous").start()
    try:
        two = _round(settings, group, start)
    finally:
        group.stop()
        torch.set_num_threads(threads)
    assert all(h.returncode == 0 for h in group.helpers)
    return one, two, start


def _settings(**overrides: Any) -> RunSettings:
    return RunSettings.from_run_config({**default_run_config(), "central-eval-path": "", "secagg": False, **overrides})


@pytest.mark.timeout(300)
def test_two_gloo_ranks_train_the_one_process_adapter(tmp_path: Path, sentiment_data: dict[str, Path]) -> None:
    model = save_tiny_bert(tmp_path / "bert", dropout=0.0)  # dropout would draw different masks per slice
    settings = _settings(
        model=str(model),
        **{
            "data-path": str(sentiment_data["train"]),
            "labels-file": str(sentiment_data["labels"]),
            "local-steps": 4,
            "batch-size": 9,  # slices of 5 and 4: the loss weights, not equal halves, make it exact
            "lora-dropout": 0.0,
            "learning-rate": 0.05,
        },
    )
    one, two, start = _one_and_two_ranks(settings, tmp_path)
    assert max(float(np.abs(a - s).max()) for a, s in zip(one, start)) > 1e-3  # it trained
    for a, b in zip(one, two, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.timeout(300)
def test_two_gloo_ranks_train_the_one_process_causal_lm_adapter(
    tmp_path: Path, tiny_llama_dir: Path, completion_data: dict[str, Path]
) -> None:
    settings = _settings(
        model=str(tiny_llama_dir),
        task="causal-lm",
        **{
            "data-path": str(completion_data["train"]),
            "labels-file": "",
            "local-steps": 3,
            "batch-size": 7,
            "lora-dropout": 0.0,
            "learning-rate": 0.05,
        },
    )
    one, two, start = _one_and_two_ranks(settings, tmp_path)
    assert max(float(np.abs(a - s).max()) for a, s in zip(one, start)) > 1e-3
    for a, b in zip(one, two, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_ranks_refuse_dp_and_bad_device_counts(tmp_path: Path, sentiment_data: dict[str, Path]) -> None:
    from fedtune.client.site_ranks import RankShard, check_devices

    with pytest.raises(FedtuneError, match="--devices must be at least 1"):
        check_devices(0)
    dp = _settings(dp=True, **{"data-path": str(sentiment_data["train"]), "dp-noise-multiplier": 1.0})
    with pytest.raises(FedtuneError, match="one device per site"):
        SiteWork(dp, NodeSettings("simulated"), MemoryHistory(), ranks=RankShard(1, 2))
    assert json.dumps(RankShard(1, 3).split(list(range(7)))) == "[1, 4]"
