"""Local work per round: the step floor for small sites, and where it does not apply."""

from __future__ import annotations

import dataclasses
import math

from fedtune.client.dp_trainer import dp_recipe
from fedtune.client.node_settings import NodeSettings
from fedtune.client.site_data import load_site_data
from fedtune.client.trainer import steps_for_round
from fedtune.config import RunSettings, default_run_config


def demo_settings() -> RunSettings:
    return RunSettings.from_run_config(default_run_config())


def test_small_sites_take_at_least_the_floor_of_steps() -> None:
    settings = demo_settings()
    assert settings.min_local_steps == 10 and settings.local_epochs == 0.5 and settings.batch_size == 32
    # 200 examples: half an epoch is 4 steps of 32; the floor makes it 10.
    assert math.ceil(0.5 * 200 / 32) == 4
    assert steps_for_round(settings, 200) == 10
    assert steps_for_round(dataclasses.replace(settings, min_local_steps=0), 200) == 4
    # An explicit local-steps wins over both.
    assert steps_for_round(dataclasses.replace(settings, local_steps=3), 200) == 3


def test_the_demo_sites_are_above_the_floor_so_the_demo_trains_as_before() -> None:
    settings = demo_settings()
    labels = settings.label_list()
    for part in range(3):
        site = load_site_data(settings, NodeSettings("simulated", partition_id=part, num_partitions=3), labels)
        before = math.ceil(settings.local_epochs * len(site.train) / settings.batch_size)
        assert before > settings.min_local_steps
        assert steps_for_round(settings, len(site.train)) == before


def test_dp_sgd_local_work_ignores_the_floor_because_each_step_spends_privacy() -> None:
    settings = dataclasses.replace(
        demo_settings(), dp=True, dp_target_epsilon=8.0, dp_batch_size=128, dp_local_epochs=0.5
    )
    recipe = dp_recipe(settings)
    assert recipe.min_local_steps == 0 and recipe.batch_size == 128
    assert steps_for_round(recipe, 200) == math.ceil(0.5 * 200 / 128) == 1
    # dp-local-epochs (default 2) is DP's own local work, in place of local-epochs.
    assert steps_for_round(dp_recipe(dataclasses.replace(settings, dp_local_epochs=2.0)), 200) == 4
