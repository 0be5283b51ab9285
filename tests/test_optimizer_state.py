"""keep-optimizer-state: a site's AdamW moments go on from round to round in the run's Flower
context (which Flower hands to whichever ClientApp handles the next message), never in the
reply; on by default for causal-lm (auto), off for seq-cls; moments that do not fit are dropped
with a log line; refused with DP."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context
from support.run_configs import completion_site_config, site_context

from fedtune.client.optimizer_state import STATE_KEY, ContextOptimizerStore, restore_optimizer
from fedtune.client.site_client import SiteClient
from fedtune.config import RunSettings, default_run_config
from fedtune.errors import ConfigError


def run_config(tiny_llama_dir: Path, completion_data: dict[str, Path], **run: Any) -> dict[str, Any]:
    return completion_site_config(tiny_llama_dir, completion_data, **{"local-steps": 3, **run})


new_context = site_context


def steps_kept(context: Context) -> list[float]:
    kept = ContextOptimizerStore(context).load()
    assert kept is not None
    return [float(v) for k, v in kept.items() if k.endswith(".step")]


def test_site_keeps_adam_moments_in_the_run_context_across_rounds(
    tiny_llama_dir: Path, completion_data: dict[str, Path]
) -> None:
    config = run_config(tiny_llama_dir, completion_data, **{"keep-optimizer-state": True})
    settings, context = RunSettings.from_run_config(config), new_context(config)
    client = SiteClient(settings, context)
    start = client.get_parameters({})
    reply, _, _ = client.fit(start, {"server-round": 1, "num-rounds": 2})
    assert len(reply) == len(start)  # the reply is the adapter, nothing of the optimizer
    assert steps_kept(context) and set(steps_kept(context)) == {3.0}
    first = ContextOptimizerStore(context).load()
    assert first is not None and len(first) == 3 * len(start)  # exp_avg, exp_avg_sq, step per trained tensor

    # Flower makes a new ClientApp object per message: only the context carries the moments.
    SiteClient(settings, context).fit(reply, {"server-round": 2, "num-rounds": 2})
    assert set(steps_kept(context)) == {6.0}  # AdamW went on counting: it did not restart
    second = ContextOptimizerStore(context).load()
    assert second is not None
    assert any(not np.array_equal(first[k], second[k]) for k in first if k.endswith(".exp_avg"))


def test_switched_off_nothing_is_kept(tiny_llama_dir: Path, completion_data: dict[str, Path]) -> None:
    config = run_config(tiny_llama_dir, completion_data, **{"keep-optimizer-state": False})
    assert default_run_config()["keep-optimizer-state"] == "auto"
    context = new_context(config)
    client = SiteClient(RunSettings.from_run_config(config), context)
    client.fit(client.get_parameters({}), {"server-round": 1, "num-rounds": 1})
    assert STATE_KEY not in context.state.array_records


def test_kept_moments_that_do_not_fit_start_adam_afresh(caplog: pytest.LogCaptureFixture) -> None:
    params = [torch.nn.Parameter(torch.zeros(4, 2)), torch.nn.Parameter(torch.zeros(3))]
    optimizer = torch.optim.AdamW(params)
    wrong = {
        "0.exp_avg": np.zeros((2, 4), np.float32),
        "0.exp_avg_sq": np.zeros((2, 4), np.float32),
        "0.step": np.array(1.0, np.float32),
    }
    with caplog.at_level(logging.WARNING, logger="fedtune.site"):
        assert not restore_optimizer(optimizer, params, wrong, "site-0")
    assert "site-0: kept optimizer state does not fit this model" in caplog.text
    assert not optimizer.state  # nothing half-restored


def test_keep_optimizer_state_with_dp_is_refused() -> None:
    with pytest.raises(ConfigError, match="keep-optimizer-state"):
        RunSettings.from_run_config(
            {**default_run_config(), "keep-optimizer-state": True, "dp": True, "dp-noise-multiplier": 1.0}
        )
