"""A run's training budget in epochs of the federation's data (`train-epochs`), turned into
rounds, local steps and each site's batch once the sites' example counts are known.

What a user compares a federation against is a plain `Trainer` run over the same data
for a few epochs. Three findings of `bench/llm.py` (SmolLM2-135M on Banking77, 3
non-IID sites) shape the plan, so that the federation does the Trainer's work in the
Trainer's number of optimizer steps:

- the number of steps, not the samples, limits a LoRA on such a budget: each site's batch
  is the run's batch over the sites trained per round, so that one averaged step sees
  about the samples of one central step;
- many short rounds beat few long ones on non-IID sites (20 x 30 steps: 0.852 exact match
  against 0.808 for 10 x 60 at the same samples; on 1,000 pairs over 4 sites, 18 x 10 steps
  gave 0.860 against 0.823 for 6 x 30): the plan makes as many rounds as the budget allows
  with at least `budget-local-steps` steps each, up to `budget-max-rounds` (each round costs
  a SecAgg+ exchange and the sites' validation);
- every site takes the same steps per round; the aggregate weighs each by its examples;
- the server steps `server_rate` times the sites' mean update: each site's AdamW normalises
  gradients from `batch / sites` samples, whose noise is `sites` times the central batch's,
  so once the noise dominates each site moves about 1/sqrt(sites) as far along the mean
  gradient as a central Adam step would (the square-root rule for Adam, Malladi et al.
  2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms"); the average
  keeps that shortfall and the server makes it up. Early on, while the gradient dominates,
  the sites' steps agree and a large rate overshoots: on 1,000 pairs over 8 sites
  (learning rate 0.004) sqrt(8) = 2.83 lost the first rounds (0.12 validation exact match
  at round 7 against 0.72 at 2.0 and 0.74 at 1), while 2.0 ended at 0.830 test exact match
  against 0.807 for plain FedAvg (over 4 sites 2.0 gave 0.873 against 0.850). Auto is
  therefore sqrt(batch / site batch) capped at MAX_AUTO_SERVER_RATE: 1 for one site, 2 for
  four or more at batch 16;
- a site's batch of 2 (8 sites at batch 16) is a noisy Adam step: with `budget-min-site-batch`
  the plan trains fewer sites a round, each on at least that batch (Flower samples which).
  On the same 8-site subset a floor of 4 (4 sites a round at batch 4, rate 2) reached 0.857
  test exact match against 0.830 (a trial, 2026-12-07; off by default until the bench says so).

Every value here that reaches a site arrives in a message: `read_round_plan` bounds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from fedtune.errors import FedtuneError

# What a site accepts from a message for its round (an honest plan stays far below).
MAX_PLANNED_STEPS = 100_000
MAX_PLANNED_BATCH = 4_096
MAX_AUTO_SERVER_RATE = 2.0  # above it the first rounds overshoot (see the module's docstring)


@dataclass(frozen=True)
class BudgetPlan:
    """The rounds, local steps and per-site batch that spend `samples` training samples."""

    epochs: float
    examples: int  # training examples over all sites that answered the census
    sites_per_round: int
    num_rounds: int
    local_steps: int
    site_batch: int
    server_rate: float = 1.0  # the server's step on the sites' mean update (FedAvgM's learning rate)

    @property
    def samples(self) -> int:
        """Training samples the plan spends: rounds x sites per round x steps x batch."""
        return self.num_rounds * self.sites_per_round * self.local_steps * self.site_batch

    def describe(self) -> str:
        return (
            f"{self.epochs:g} epochs of {self.examples:,} examples -> {self.num_rounds} rounds x "
            f"{self.sites_per_round} sites x {self.local_steps} steps x batch {self.site_batch} "
            f"= {self.samples:,} samples"
            + (f"; the server steps {self.server_rate:.3g} x the mean update" if self.server_rate != 1 else "")
        )


def _half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def sites_trained_per_round(sites: int, fraction_train: float, min_sites: int) -> int:
    """How many of `sites` Flower's strategies sample for training each round: the share
    rounded down (`int`, as `FedAvg.num_fit_clients` does), at least `min-sites`, at most
    the sites there are. The plan divides the batch by this number, so it must be Flower's."""
    return max(1, min(sites, max(int(sites * fraction_train), min_sites)))


def sampling_fraction(per_round: int, sites: int) -> float:
    """The `fraction-train` under which Flower samples `per_round` of `sites` (its `int`
    rounding down is kept off the boundary by half a site)."""
    return 1.0 if per_round >= sites else (per_round + 0.5) / sites


def plan_budget(
    epochs: float,
    site_examples: Sequence[int],
    batch_size: int,
    min_round_steps: int,
    max_rounds: int,
    fraction_train: float = 1.0,
    server_rate: float | None = None,
    min_sites: int = 1,
    min_site_batch: int = 0,
) -> BudgetPlan:
    """The plan for `epochs` of the sites' data: each site's batch is `batch_size` over the
    sites trained per round (`sites_trained_per_round`), the run's steps are the budget over
    the samples of one averaged step, cut into as many rounds of at least `min_round_steps`
    as there are, at most `max_rounds`. With `min_site_batch`, fewer sites train a round
    where the batch's split would fall below it (`sampling_fraction` is what Flower then
    needs). The server's step on the mean update is `server_rate`, or (None) the square
    root of the batch's split, sqrt(batch_size / site batch), at most MAX_AUTO_SERVER_RATE."""
    if epochs <= 0:
        raise FedtuneError(f"train-epochs: a budget must be > 0 epochs, got {epochs}")
    examples = int(sum(site_examples))
    if not site_examples or examples <= 0:
        raise FedtuneError("train-epochs: no site reported training examples, so there is no budget to plan")
    per_round = sites_trained_per_round(len(site_examples), fraction_train, min_sites)
    if min_site_batch and batch_size / per_round < min_site_batch:  # fewer sites a round, each on more samples
        per_round = min(per_round, max(1, min_sites, batch_size // min_site_batch))
    site_batch = max(1, _half_up(batch_size / per_round))
    total_steps = max(1, math.ceil(epochs * examples / (site_batch * per_round)))
    num_rounds = max(1, min(max_rounds, total_steps // max(1, min_round_steps)))
    local_steps = max(1, _half_up(total_steps / num_rounds))  # within half a step a round of the budget
    rate = min(MAX_AUTO_SERVER_RATE, math.sqrt(batch_size / site_batch)) if server_rate is None else server_rate
    return BudgetPlan(epochs, examples, per_round, num_rounds, local_steps, site_batch, round(rate, 4))


def saved_plan(data: Any) -> BudgetPlan:
    """The plan a run folder's budget.json holds (a resume trains the plan the run started
    with, whatever the census says now); a plan saved before `server_rate` existed ran at 1.
    Raises FedtuneError naming what is wrong with the file."""
    if not isinstance(data, Mapping):
        raise FedtuneError("budget.json: not a JSON object")
    integers = ("examples", "sites_per_round", "num_rounds", "local_steps", "site_batch")
    values: dict[str, Any] = {}
    for key in integers:
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FedtuneError(f"budget.json: {key} {value!r} is not a positive integer")
        values[key] = value
    for key, default in (("epochs", None), ("server_rate", 1.0)):
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise FedtuneError(f"budget.json: {key} {value!r} is not a positive number")
        values[key] = float(value)
    return BudgetPlan(**values)


def round_plan_config(plan: BudgetPlan) -> dict[str, int]:
    """What each training message carries to the sites (the rest is in the run config)."""
    return {"local-steps": plan.local_steps, "batch-size": plan.site_batch}


def read_round_plan(config: Mapping[str, Any], run_batch: int) -> dict[str, int]:
    """The coordinator's plan from a training message, each value checked and bounded;
    empty when the run has no budget. The plan divides the run's batch-size over the sites,
    so a planned batch above `run_batch` (what the site's memory plan checked before round 1)
    is refused too. Raises FedtuneError naming the bad value."""
    plan: dict[str, int] = {}
    ceilings = (
        ("local-steps", MAX_PLANNED_STEPS, ""),
        (
            "batch-size",
            min(MAX_PLANNED_BATCH, run_batch),
            " (the run's batch-size, which this site's memory plan checked)",
        ),
    )
    for key, ceiling, why in ceilings:
        if key not in config:
            continue
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= ceiling:
            raise FedtuneError(f"the coordinator's {key} {value!r} is not an integer in 1..{ceiling}{why}")
        plan[key] = value
    return plan
