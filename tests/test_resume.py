"""Crash-safe resume: the coordinator process dies (os._exit, like a kill -9, injected by
tests/support/crashing_coordinator.py) right after round 2 of 4; `fedtune simulate
--resume` runs rounds 3 and 4 once each, metrics.jsonl holds rounds 1-4 exactly once, FedAdam's moments and the sites' DP
accountants carry on, and the final adapter equals an uninterrupted run's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from safetensors.numpy import load_file
from support.crashing_coordinator import rounds_done as _rounds
from support.crashing_coordinator import simulate as _simulate
from support.run_configs import sentiment_config


def _base(tiny_bert_dir: Path, sentiment_data: dict[str, Path], tmp_path: Path) -> dict[str, object]:
    return {
        **sentiment_config(tiny_bert_dir, sentiment_data),
        "partitioning": "iid",
        "val-fraction": 0.2,
        "num-rounds": 4,
        "local-steps": 4,
        "batch-size": 16,
        "learning-rate": 0.05,
        "site-state-dir": str(tmp_path / "site-state"),
    }


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_resume_after_coordinator_crash_equals_uninterrupted_run(
    tmp_path: Path, tiny_bert_dir: Path, sentiment_data: dict[str, Path]
) -> None:
    # SecAgg+ off here: Flower's SecAgg+ quantises with stochastic rounding (unseeded), so two
    # SecAgg+ runs differ by up to one quantisation step per value, which FedAdam then
    # rescales; without it the resumed run must match the uninterrupted one to float precision.
    sets = {
        **_base(tiny_bert_dir, sentiment_data, tmp_path),
        "strategy": "fedadam",
        "fedopt-eta": 0.05,
        "secagg": False,
    }
    out = tmp_path / "runs"
    full = _simulate(out, "full", sets)
    assert full.returncode == 0, full.stdout[-3000:]

    crashed = _simulate(out, "crash", sets, crash_after=2)
    assert crashed.returncode == 137, crashed.stdout[-3000:]
    assert _rounds(out / "crash") == [1, 2] and not (out / "crash" / "final").exists()
    assert (out / "crash" / "round-002" / "strategy_state.npz").exists()  # FedAdam's m_t, v_t

    # Starting it again without --resume is refused; nothing is touched.
    again = _simulate(out, "crash", sets)
    assert again.returncode == 1 and "--resume" in again.stdout and _rounds(out / "crash") == [1, 2]

    resumed = _simulate(out, "crash", sets, resume=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "continues after round 2" in resumed.stdout and "restored strategy state" in resumed.stdout
    assert _rounds(out / "crash") == [1, 2, 3, 4]  # each round once
    for rnd in ("round-003", "round-004", "final"):
        a = load_file(str(out / "full" / rnd / "adapter_model.safetensors"))
        b = load_file(str(out / "crash" / rnd / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6, err_msg=f"{rnd} {key}")
    full_metrics = [json.loads(x) for x in (out / "full" / "metrics.jsonl").read_text().splitlines()]
    crash_metrics = [json.loads(x) for x in (out / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert [r["aggregate"].get("train_loss") for r in crash_metrics] == pytest.approx(
        [r["aggregate"].get("train_loss") for r in full_metrics], abs=1e-6
    )  # same LR schedule, same steps
    assert json.loads((out / "crash" / "run.json").read_text())["resumed"][0]["after_round"] == 2
    # A finished run cannot be resumed again.
    done = _simulate(out, "crash", sets, resume=True)
    assert done.returncode == 1 and "already done" in done.stdout


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("mode", ["local", "distributed"])
def test_resume_keeps_the_sites_dp_accountant(
    tmp_path: Path, tiny_bert_dir: Path, sentiment_data: dict[str, Path], mode: str
) -> None:
    noise, batch, steps, site_train = 1.0, 16, 4, 96  # 240 rows, IID over 2 sites, 20 % held out
    sets = {
        **_base(tiny_bert_dir, sentiment_data, tmp_path),
        "dp": True,
        "dp-noise-multiplier": noise,
        "dp-batch-size": batch,
    }
    if mode == "distributed":  # one step a round at q = 16/96, the server's Adam state restored from round 2
        sets.update({"dp-mode": "distributed", "secagg": True, "dp-sample-rate": batch / site_train})
        steps = 1
    out = tmp_path / "runs"
    assert _simulate(out, "dp", sets, crash_after=2).returncode == 137
    resumed = _simulate(out, "dp", sets, resume=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:]

    def epsilon_after(rounds: int) -> float:
        acc = RDPAccountant()
        for _ in range(rounds * steps):
            acc.step(noise_multiplier=noise, sample_rate=batch / site_train)
        return acc.get_epsilon(1e-5)

    records = [json.loads(x) for x in (out / "dp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    got = [r["dp_epsilon_max"] for r in records]
    assert got == pytest.approx([epsilon_after(r) for r in (1, 2, 3, 4)], rel=1e-6)  # no restart at round 3
    if mode == "distributed":  # the server's Adam moments were saved with round 2 and read back by the resume
        assert (out / "dp" / "round-002" / "strategy_state.npz").exists()
        assert "restored strategy state" in resumed.stdout
