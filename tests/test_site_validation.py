"""A causal-LM site's per-round validation: its greedy exact match decodes at most
`site-val-max-examples` of its validation pairs (0: `eval-max-examples`, 0 there: all),
while the loss still covers every pair."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.run_configs import completion_site_config, site_context

from fedtune.client.site_client import SiteClient
from fedtune.config import RunSettings


@pytest.mark.parametrize(
    ("run", "generated"),
    [
        ({}, 20),  # all of partition 0's 20 validation pairs (100 pairs, val-fraction 0.2)
        ({"eval-max-examples": 6}, 6),  # the central cap applies to the sites too, as before
        ({"eval-max-examples": 6, "site-val-max-examples": 3}, 3),  # the sites' own cap wins
    ],
)
def test_a_site_decodes_at_most_its_validation_cap(
    tiny_llama_dir: Path, completion_data: dict[str, Path], run: dict[str, int], generated: int
) -> None:
    config = completion_site_config(tiny_llama_dir, completion_data, **{"eval-max-new-tokens": 2, **run})
    client = SiteClient(RunSettings.from_run_config(config), site_context(config))
    loss, examples, metrics = client.evaluate(client.get_parameters({}), {"server-round": 1})
    assert examples == 20 and loss > 0
    assert metrics["val_generated"] == generated
