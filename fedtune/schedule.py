"""Learning-rate schedule over the whole federation, so it continues across rounds."""

from __future__ import annotations

import math


def lr_factor(progress: float, schedule: str, warmup_fraction: float) -> float:
    """Multiplier on the base LR at `progress` in [0, 1] of all rounds' training.

    Linear warm-up over `warmup_fraction`, then linear or cosine decay to 0, or constant.
    """
    progress = min(max(progress, 0.0), 1.0)
    if warmup_fraction > 0 and progress < warmup_fraction:
        return (progress + 1e-8) / warmup_fraction
    if schedule == "constant":
        return 1.0
    rest = (progress - warmup_fraction) / max(1.0 - warmup_fraction, 1e-8)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * rest))
    return max(0.0, 1.0 - rest)


def round_progress(server_round: int, step: int, steps_in_round: int, num_rounds: int) -> float:
    """Fraction of the federation's training done at `step` of global round `server_round`."""
    return ((server_round - 1) + step / max(steps_in_round, 1)) / max(num_rounds, 1)
