"""A site's own privacy floor (its node config), enforced by the site's code whatever
the run config says: a run without SecAgg+, without DP, or with a larger δ or target ε
than the site allows is refused with one line; with DP on, the site trains no round
after which its own accountant's ε would pass its ceiling, and spends nothing on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.adapter_io import get_adapter_arrays
from fedtune.client.dp_history import MemoryHistory, history_file
from fedtune.client.node_settings import NodeSettings
from fedtune.client.privacy_floor import PrivacyFloorError
from fedtune.client.site_work import SiteWork
from fedtune.config import RunSettings, default_run_config


def work(tiny_bert_dir: Path, data: dict[str, Path], tmp_path: Path, node: dict, **run: object) -> SiteWork:
    config = {
        **default_run_config(),
        "model": str(tiny_bert_dir),
        "data-path": str(data["train"]),
        "labels-file": str(data["labels"]),
        "partitioning": "iid",
        "local-steps": 3,
        "batch-size": 16,
        "val-fraction": 0.2,
        **run,
    }
    node = {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path / "state"), **node}
    return SiteWork(RunSettings.from_run_config(config), NodeSettings.from_node_config(node), MemoryHistory())


def test_runs_asking_less_than_the_floor_are_refused(
    tiny_bert_dir: Path, sentiment_data: dict[str, Path], tmp_path: Path
) -> None:
    cases = [
        (
            {"require-secagg": True},
            {"secagg": False},
            "site site-0 requires SecAgg+ (node config require-secagg=true); the run has secagg=false",
        ),
        (
            {"max-epsilon": 8.0},
            {"dp": False},
            "site site-0 allows at most epsilon=8 (node config max-epsilon); the run has dp=false",
        ),
        (
            {"max-epsilon": 8.0, "max-delta": 1e-6},
            {"dp": True, "dp-noise-multiplier": 1.0, "dp-delta": 1e-5},
            "site site-0 allows at most delta=1e-06 (node config max-delta); the run has dp-delta=1e-05",
        ),
        (
            {"max-epsilon": 2.0},
            {"dp": True, "dp-target-epsilon": 6.0},
            "site site-0 allows at most epsilon=2 (node config max-epsilon); the run targets dp-target-epsilon=6",
        ),
    ]
    for node, run, message in cases:
        site = work(tiny_bert_dir, sentiment_data, tmp_path, node, **run)
        with pytest.raises(PrivacyFloorError) as err:
            site.properties({})
        assert str(err.value) == message
        with pytest.raises(PrivacyFloorError):
            site.fit([], {"server-round": 1, "num-rounds": 3})
        with pytest.raises(PrivacyFloorError):  # a refusal covers the run: evaluation too
            site.evaluate([], {})
    # What the floor allows trains.
    ok = work(tiny_bert_dir, sentiment_data, tmp_path, {"require-secagg": True}, secagg=True)
    labels = ok.labels({})
    _, n, _ = ok.fit(get_adapter_arrays(ok.model(labels)), {"server-round": 1, "num-rounds": 1})
    assert n > 0


def test_site_stops_at_its_own_epsilon_ceiling(
    tiny_bert_dir: Path, sentiment_data: dict[str, Path], tmp_path: Path
) -> None:
    from fedtune.client.dp_trainer import epsilon_after_round

    run = {"dp": True, "dp-noise-multiplier": 1.0, "dp-delta": 1e-5, "secagg": False}
    probe = work(tiny_bert_dir, sentiment_data, tmp_path, {}, **run)
    n = len(probe.site(probe.labels({})).train)
    _, one = epsilon_after_round(probe.settings, n, 5, [])
    # A ceiling the first round stays under and the second would pass.
    site = work(tiny_bert_dir, sentiment_data, tmp_path, {"max-epsilon": one * 1.2}, **run)
    arrays = get_adapter_arrays(site.model(site.labels({})), site.lora)
    config = {"server-round": 1, "num-rounds": 5, "run-id": "r1"}
    _, _, metrics = site.fit(arrays, config)
    assert metrics["dp_epsilon"] == pytest.approx(one, rel=1e-6) and metrics["dp_epsilon"] <= one * 1.2
    with pytest.raises(PrivacyFloorError, match=r"site site-0 stops before round 2: its epsilon would reach"):
        site.fit(arrays, {**config, "server-round": 2})
    spent = json.loads(history_file(site.node, site.settings, "r1", "site-0").read_text())
    assert sum(step[2] for step in spent) == 3  # round 1's 3 steps only: nothing spent on the refused round


def test_distributed_dp_ceiling_counts_all_shares_or_only_the_sites_own(
    tiny_bert_dir: Path, sentiment_data: dict[str, Path], tmp_path: Path
) -> None:
    """Under distributed DP the ceiling applies to the summed shares' epsilon; with
    own-noise-only it applies to the site's own shares (sigma / sqrt(t)), a stricter stop."""
    from fedtune.client.distributed_dp import epsilon_after_round
    from fedtune.client.secagg_setup import SETUP_KEY, SecAggSetup

    run = {
        "dp": True,
        "dp-noise-multiplier": 2.0,
        "dp-delta": 1e-5,
        "secagg": True,
        "dp-mode": "distributed",
        "dp-sample-rate": 0.5,
    }
    probe = work(tiny_bert_dir, sentiment_data, tmp_path, {}, **run)
    _, all_shares = epsilon_after_round(probe.settings, 5, [])
    _, own_shares = epsilon_after_round(probe.settings, 5, [], own_shares_of=2)
    assert own_shares > 1.5 * all_shares
    ceiling = (all_shares + own_shares) / 2  # round 1 fits on all shares, not on the site's own
    config = {"server-round": 1, "num-rounds": 5, "run-id": "d1", SETUP_KEY: SecAggSetup(2, 2, 2).to_json()}
    for own_only in (False, True):
        node = {"max-epsilon": ceiling, "own-noise-only": own_only, "state-dir": str(tmp_path / f"state-{own_only}")}
        site = work(tiny_bert_dir, sentiment_data, tmp_path, node, **run)
        arrays = get_adapter_arrays(site.model(site.labels({})), site.lora)
        if own_only:
            with pytest.raises(PrivacyFloorError, match=r"site site-0 stops before round 1: its epsilon would reach"):
                site.fit(arrays, config)
        else:
            _, weight, metrics = site.fit(arrays, config)
            assert metrics["dp_epsilon"] == pytest.approx(all_shares, rel=1e-6) and weight == round(0.5 * 96)
            assert metrics["dp_epsilon_own_noise"] == pytest.approx(own_shares, rel=1e-6) and own_shares > ceiling
