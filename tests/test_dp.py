"""Sample-level DP-SGD at the sites: ε is reported every round, grows, and the
coordinator stops before the configured budget is exceeded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from fedtune.simulation import project_run_config, run_simulation

NOISE, BATCH, STEPS, DELTA = 1.0, 16, 4, 1e-5
SITE_TRAIN = 96  # 240 rows, IID over 2 sites, 20 % held out for validation


def _epsilon_after(rounds: int) -> float:
    acc = RDPAccountant()
    for _ in range(rounds * STEPS):
        acc.step(noise_multiplier=NOISE, sample_rate=BATCH / SITE_TRAIN)
    return acc.get_epsilon(DELTA)


@pytest.mark.timeout(600)
def test_dp_epsilon_grows_and_run_stops_at_budget(tmp_path: Path, tiny_bert_dir: Path, sentiment_data: dict[str, Path]) -> None:
    budget = (_epsilon_after(2) + _epsilon_after(3)) / 2  # rounds 1-2 fit, a 3rd would not
    config = {**project_run_config(), "model": str(tiny_bert_dir), "data-path": str(sentiment_data["train"]),
              "labels-file": str(sentiment_data["labels"]), "central-eval-path": str(sentiment_data["test"]),
              "partitioning": "iid", "val-fraction": 0.2, "num-rounds": 4, "local-steps": STEPS, "batch-size": BATCH,
              "learning-rate": 0.05, "dp": True, "dp-noise-multiplier": NOISE, "dp-delta": DELTA,
              "dp-epsilon-budget": budget, "output-dir": str(tmp_path / "runs"), "run-name": "dp",
              "site-state-dir": str(tmp_path / "site-state")}
    run_simulation(config, num_sites=2)
    run_dir = tmp_path / "runs" / "dp"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]  # stopped before round 3 would pass the budget
    eps = [r["dp_epsilon_max"] for r in records]
    assert eps[0] < eps[1] <= budget
    for rnd, rec in enumerate(records, start=1):
        for site in rec["sites"].values():
            assert site["dp_sample_rate"] == pytest.approx(BATCH / SITE_TRAIN)
            assert site["dp_epsilon"] == pytest.approx(_epsilon_after(rnd), rel=1e-6)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["central"] is not None  # the final adapter was still evaluated
    report = (run_dir / "report.md").read_text()
    assert "worst site epsilon" in report and f"of budget {budget}" in report
