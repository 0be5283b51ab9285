"""train-epochs: the run's budget in epochs of the sites' data, turned by the coordinator into
rounds, local steps and each site's batch from the census; the sites take the plan from each
training message only within bounds; AdamW's moments are kept across rounds for causal-LM
runs and never under DP-SGD."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
from support.crashing_coordinator import rounds_done, simulate
from support.run_configs import completion_site_config, site_context

from fedtune.cli.simulation import run_simulation
from fedtune.client.optimizer_state import STATE_KEY
from fedtune.client.site_client import SiteClient
from fedtune.config import AUTO_TRAIN_EPOCHS, RunSettings, default_run_config
from fedtune.errors import ConfigError, FedtuneError
from fedtune.run_budget import (
    MAX_PLANNED_STEPS,
    plan_budget,
    read_round_plan,
    sampling_fraction,
    saved_plan,
    sites_trained_per_round,
)


@pytest.mark.parametrize(
    ("counts", "epochs", "batch", "site_batch", "rounds", "steps"),
    [
        ([250, 240, 260, 250], 3.0, 16, 4, 18, 10),  # the shape: 1,000 pairs over 4 small sites
        ([125] * 8, 3.0, 16, 2, 18, 10),  # 8 sites: each takes 2 of the 16
        ([3334, 3335, 3334], 0.72, 16, 5, 20, 24),  # bench/llm.py's budget on Banking77: the round cap
        ([40], 1.0, 16, 16, 1, 3),  # one tiny site: one short round
    ],
)
def test_plan_for_site_sizes(
    counts: list[int], epochs: float, batch: int, site_batch: int, rounds: int, steps: int
) -> None:
    plan = plan_budget(epochs, counts, batch, min_round_steps=10, max_rounds=20)
    assert (plan.site_batch, plan.num_rounds, plan.local_steps) == (site_batch, rounds, steps)
    budget = epochs * sum(counts)
    one_step = plan.sites_per_round * plan.site_batch
    # the plan spends the budget, within half a step a round (and one step's rounding)
    assert abs(plan.samples - budget) <= (plan.num_rounds / 2 + 1) * one_step
    # one averaged step sees about one central batch, so the central run's step count is kept
    assert abs(one_step - batch) <= plan.sites_per_round / 2
    assert plan.local_steps >= 10 or plan.num_rounds == 1


def test_a_large_budget_is_capped_in_rounds_not_in_work() -> None:
    plan = plan_budget(5.0, [20_000] * 4, 16, 10, 20)
    assert plan.num_rounds == 20 and plan.local_steps == 1250
    assert plan.samples == pytest.approx(5.0 * 80_000, rel=0.001)


def test_plan_counts_only_the_sites_trained_per_round() -> None:
    full = plan_budget(2.0, [500] * 4, 16, 10, 20)
    half = plan_budget(2.0, [500] * 4, 16, 10, 20, fraction_train=0.5)
    assert (full.sites_per_round, half.sites_per_round) == (4, 2)
    assert half.site_batch == 8 and half.samples == pytest.approx(2.0 * 2000, rel=0.05)


@pytest.mark.parametrize(
    ("sites", "fraction", "min_sites"), [(7, 0.5, 2), (10, 0.3, 2), (5, 0.1, 2), (8, 0.5, 1), (3, 1.0, 3)]
)
def test_the_plan_counts_the_sites_flower_samples(sites: int, fraction: float, min_sites: int) -> None:
    """The plan divides the batch over the sites Flower's strategy will sample, so it rounds
    the share as that strategy does (7 sites at 0.5: 3, not 4)."""
    from flwr.server.strategy import FedAvg

    flower = FedAvg(fraction_fit=fraction, min_fit_clients=min_sites).num_fit_clients(sites)[0]
    assert sites_trained_per_round(sites, fraction, min_sites) == flower
    plan = plan_budget(3.0, [200] * sites, 16, 10, 20, fraction_train=fraction, min_sites=min_sites)
    assert plan.sites_per_round == flower


def test_a_site_batch_floor_trains_fewer_sites_a_round_at_a_larger_batch() -> None:
    """8 sites at batch 16 would train at batch 2 each; a floor of 4 samples 4 sites a round at
    batch 4 (the budget's samples and the server's rate as for 4 sites); 4 sites keep batch 4."""
    eight = plan_budget(3.0, [119] * 8, 16, 10, 20, min_site_batch=4)
    assert (eight.sites_per_round, eight.site_batch, eight.server_rate) == (4, 4, 2.0)
    assert eight.samples == pytest.approx(3.0 * 8 * 119, rel=0.06)
    assert plan_budget(3.0, [238] * 4, 16, 10, 20, min_site_batch=4) == plan_budget(3.0, [238] * 4, 16, 10, 20)
    assert plan_budget(3.0, [119] * 8, 16, 10, 20, min_site_batch=4, min_sites=6).sites_per_round == 6
    assert plan_budget(3.0, [119] * 8, 16, 10, 20, min_site_batch=32).sites_per_round == 1


def test_the_coordinator_samples_the_planned_sites_and_steps_the_planned_rate() -> None:
    from fedtune.server.app import _planned_settings

    settings = RunSettings.from_run_config({**default_run_config(), "strategy": "fedavg"})
    plan = plan_budget(3.0, [119] * 8, 16, 10, 20, min_site_batch=4)
    planned = _planned_settings(settings, plan, 8)
    assert (planned.num_rounds, planned.local_steps) == (plan.num_rounds, plan.local_steps)
    assert planned.fraction_train == sampling_fraction(4, 8) and int(8 * planned.fraction_train) == 4
    assert (planned.strategy, planned.server_learning_rate, planned.server_momentum) == ("fedavgm", 2.0, 0.0)
    everyone = _planned_settings(settings, plan_budget(3.0, [238] * 4, 16, 10, 20), 4)
    assert everyone.fraction_train == 1.0


@pytest.mark.parametrize(("per_round", "sites"), [(k, n) for n in range(1, 17) for k in range(1, n + 1)])
def test_flower_samples_the_sites_the_plan_counts(per_round: int, sites: int) -> None:
    from flwr.server.strategy import FedAvg

    strategy = FedAvg(fraction_fit=sampling_fraction(per_round, sites), min_fit_clients=1)
    assert strategy.num_fit_clients(sites)[0] == per_round


@pytest.mark.parametrize(
    ("sites", "batch", "rate"),
    [(1, 16, 1.0), (2, 16, math.sqrt(2)), (3, 16, math.sqrt(16 / 5)), (4, 16, 2.0), (8, 16, 2.0), (32, 16, 2.0)],
)
def test_the_server_rate_makes_up_the_batch_split(sites: int, batch: int, rate: float) -> None:
    """Auto: sqrt(batch / site batch), the square-root rule for Adam, at most 2; a set rate is kept."""
    plan = plan_budget(3.0, [200] * sites, batch, 10, 20)
    assert plan.server_rate == pytest.approx(rate, abs=1e-4)
    assert plan_budget(3.0, [200] * sites, batch, 10, 20, server_rate=1.0).server_rate == 1.0
    assert plan_budget(3.0, [200] * sites, batch, 10, 20, server_rate=2.83).server_rate == 2.83


def test_a_saved_plan_reads_back_and_a_bad_one_is_refused() -> None:
    plan = plan_budget(3.0, [250, 240, 260, 250], 16, 10, 20)
    data = {**asdict(plan), "samples": plan.samples}
    assert saved_plan(json.loads(json.dumps(data))) == plan
    old = {k: v for k, v in data.items() if k != "server_rate"}  # saved before the server rate: plain FedAvg
    assert saved_plan(old) == replace(plan, server_rate=1.0)
    for key, value in (("num_rounds", 0), ("local_steps", "10"), ("site_batch", True), ("server_rate", -1)):
        with pytest.raises(FedtuneError, match=f"budget.json: {key} .* is not a positive"):
            saved_plan({**data, key: value})
    with pytest.raises(FedtuneError, match="not a JSON object"):
        saved_plan([1, 2])


def test_plan_without_examples_is_refused_in_one_line() -> None:
    with pytest.raises(FedtuneError, match="no site reported training examples"):
        plan_budget(3.0, [], 16, 10, 20)
    with pytest.raises(FedtuneError, match="must be > 0 epochs"):
        plan_budget(0.0, [10], 16, 10, 20)


@pytest.mark.parametrize(
    "config",
    [
        {"local-steps": True},
        {"local-steps": 2.5},
        {"local-steps": "30"},
        {"local-steps": 0},
        {"local-steps": MAX_PLANNED_STEPS + 1},
        {"batch-size": -4},
        {"batch-size": 10**9},
    ],
)
def test_a_plan_from_a_message_is_bounded(config: dict[str, Any]) -> None:
    key = next(iter(config))
    with pytest.raises(FedtuneError, match=f"the coordinator's {key} .* is not an integer in 1\\.\\."):
        read_round_plan(config, 16)


def test_a_planned_batch_above_the_runs_is_refused() -> None:
    """The site's memory plan checked the run's batch-size before round 1: a coordinator
    cannot raise it later through the plan."""
    assert read_round_plan({"batch-size": 16}, 16) == {"batch-size": 16}
    with pytest.raises(FedtuneError, match="batch-size 17 is not an integer in 1..16 .*memory plan"):
        read_round_plan({"batch-size": 17}, 16)


def test_a_message_without_a_plan_changes_nothing() -> None:
    assert read_round_plan({"server-round": 3, "num-rounds": 9}, 16) == {}
    assert read_round_plan({"local-steps": 30, "batch-size": 4}, 16) == {"local-steps": 30, "batch-size": 4}


def settings(**run: Any) -> RunSettings:
    return RunSettings.from_run_config({**default_run_config(), **run})


def test_auto_budget_and_optimizer_state_follow_the_task() -> None:
    llm = settings(task="causal-lm")
    assert llm.budget_epochs == AUTO_TRAIN_EPOCHS and llm.keeps_optimizer_state
    assert settings(task="causal-lm", **{"local-steps": 25}).budget_epochs == 0  # work set by hand
    assert settings(task="causal-lm", **{"train-epochs": "off"}).budget_epochs == 0
    assert settings(task="causal-lm", **{"train-epochs": 5}).budget_epochs == 5.0  # TOML's number
    cls = settings()
    assert cls.budget_epochs == 0 and not cls.keeps_optimizer_state
    assert settings(**{"keep-optimizer-state": True}).keeps_optimizer_state  # TOML's true
    assert not settings(task="causal-lm", **{"keep-optimizer-state": False}).keeps_optimizer_state


def test_dp_runs_keep_the_optimizer_reset_and_have_no_budget() -> None:
    dp = settings(task="causal-lm", dp=True, **{"dp-noise-multiplier": 1.0})
    assert not dp.keeps_optimizer_state and dp.budget_epochs == 0
    with pytest.raises(ConfigError, match="train-epochs': DP-SGD's work is dp-local-epochs"):
        settings(task="causal-lm", dp=True, **{"dp-noise-multiplier": 1.0, "train-epochs": 3})


@pytest.mark.parametrize(
    ("run", "message"),
    [
        ({"train-epochs": "three"}, 'must be "auto", "off" or a number of epochs'),
        ({"train-epochs": 0}, "must be in \\(0, 1000\\] epochs"),
        ({"train-epochs": "nan"}, "must be in \\(0, 1000\\] epochs"),
        ({"train-epochs": 3, "local-steps": 10}, "derives local-steps from the budget"),
        ({"keep-optimizer-state": "sometimes"}, "must be one of auto, true, false"),
        ({"budget-server-rate": "fast"}, 'must be "auto" or a number'),
        ({"budget-server-rate": 0}, "must be in \\(0, 100\\]"),
    ],
)
def test_bad_budget_settings_are_refused_in_one_line(run: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        settings(task="causal-lm", **run)
    assert "\n" not in str(err.value)


site_config = completion_site_config
new_context = site_context


def test_a_site_trains_the_plan_it_is_sent(tiny_llama_dir: Path, completion_data: dict[str, Path]) -> None:
    config = site_config(tiny_llama_dir, completion_data)
    client = SiteClient(RunSettings.from_run_config(config), new_context(config))
    start = client.get_parameters({})
    _, _, metrics = client.fit(start, {"server-round": 1, "num-rounds": 2, "local-steps": 3, "batch-size": 2})
    assert metrics["steps"] == 3
    with pytest.raises(FedtuneError, match="the coordinator's local-steps 1000000000"):
        client.fit(start, {"server-round": 1, "num-rounds": 2, "local-steps": 10**9, "batch-size": 2})


def test_a_dp_site_keeps_no_optimizer_state(tiny_llama_dir: Path, completion_data: dict[str, Path]) -> None:
    config = site_config(
        tiny_llama_dir, completion_data, dp=True, **{"dp-noise-multiplier": 1.0, "dp-batch-size": 8, "local-steps": 2}
    )
    context = new_context(config)
    client = SiteClient(RunSettings.from_run_config(config), context)
    client.fit(client.get_parameters({}), {"server-round": 1, "num-rounds": 2})
    assert STATE_KEY not in context.state.array_records


@pytest.mark.timeout(600)
def test_a_budgeted_federation_runs_the_plan(
    tmp_path: Path, tiny_llama_dir: Path, completion_data: dict[str, Path]
) -> None:
    config = {
        **site_config(tiny_llama_dir, completion_data),
        "train-epochs": "0.5",
        "budget-local-steps": 5,
        "output-dir": str(tmp_path / "runs"),
        "run-name": "budget",
    }
    run_simulation(config, num_sites=2)
    run_dir = tmp_path / "runs" / "budget"
    plan = json.loads((run_dir / "budget.json").read_text())
    examples = plan["examples"]
    assert 0 < examples <= 200 and plan["site_batch"] == 4  # batch 8 over 2 sites
    assert plan["num_rounds"] * plan["local_steps"] == pytest.approx(
        math.ceil(0.5 * examples / 8), abs=plan["num_rounds"]
    )
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(1, plan["num_rounds"] + 1))
    assert all(site["steps"] == plan["local_steps"] for r in records for site in r["sites"].values())
    ran = json.loads((run_dir / "run.json").read_text())["settings"]
    assert ran["num-rounds"] == plan["num_rounds"]
    # batch 8 over 2 sites: the server steps sqrt(2) x the sites' mean update (FedAvgM, no momentum)
    assert plan["server_rate"] == pytest.approx(math.sqrt(2), abs=1e-4)
    assert ran["strategy"] == "fedavgm" and ran["server-learning-rate"] == plan["server_rate"]
    assert ran["server-momentum"] == 0


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_resumed_run_keeps_the_plan_it_started_with(
    tmp_path: Path, tiny_llama_dir: Path, completion_data: dict[str, Path]
) -> None:
    """The coordinator dies after round 1; by the resume the sites hold half the data, so a
    new census would plan fewer rounds (and the resume would be refused for a changed
    num-rounds). The resume trains the saved plan instead, each round once."""
    out = tmp_path / "runs"
    rows = completion_data["train"].read_text().splitlines(keepends=True)
    half = tmp_path / "half.jsonl"
    half.write_text("".join(rows[: len(rows) // 2]))
    config = {
        **site_config(tiny_llama_dir, completion_data),
        "train-epochs": "0.5",
        "budget-local-steps": 5,
        "site-state-dir": str(tmp_path / "site-state"),
    }
    config = {k: v for k, v in config.items() if k not in ("output-dir", "run-name")}
    crashed = simulate(out, "budget", config, crash_after=1)
    assert crashed.returncode == 137, crashed.stdout[-3000:]
    plan = json.loads((out / "budget" / "budget.json").read_text())
    assert plan["num_rounds"] == 2 and rounds_done(out / "budget") == [1]
    resumed = simulate(out, "budget", {**config, "data-path": str(half)}, resume=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resuming the run's plan" in resumed.stdout
    assert rounds_done(out / "budget") == [1, 2]
    assert json.loads((out / "budget" / "budget.json").read_text()) == plan
    records = [json.loads(x) for x in (out / "budget" / "metrics.jsonl").read_text().splitlines()]
    assert all(site["steps"] == plan["local_steps"] for r in records for site in r["sites"].values())
