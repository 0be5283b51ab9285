"""The coordinator's live plots: written for every round record, quietly when a round has no figures."""

from __future__ import annotations

import warnings
from pathlib import Path

from fedtune.run_folder import RoundRecord
from fedtune.server.plots import save_plots


def test_plots_of_a_skipped_round_are_written_without_a_warning(tmp_path: Path) -> None:
    records = [RoundRecord(round=1, skipped=True)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels" legend warning fails the test
        written = save_plots(records, tmp_path, "causal-lm")
    assert [p.name for p in written] == ["loss.png", "exact_match.png"]
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


def test_plots_name_each_site_and_the_global_series(tmp_path: Path) -> None:
    records = [
        RoundRecord(round=r, sites={"site-0": {"train_loss": 1.0 / r}}, aggregate={"val_loss": 0.5 / r})
        for r in (1, 2, 3)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = save_plots(records, tmp_path, "seq-cls")
    assert [p.name for p in written] == ["loss.png", "accuracy.png"]
