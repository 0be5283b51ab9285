"""A site's AdamW moments kept from one round to the next (`keep-optimizer-state`), so local
training resumes the optimizer where the site left it instead of restarting Adam every round.

Restarting costs a federation more than it looks: with zero moments, Adam's bias-corrected
first steps move every weight by about the full learning rate (m/sqrt(v) ~ sign(g)), and a
federation of R rounds pays that R times where central training pays it once, after a
warm-up. The global adapter still arrives fresh every round; only the site's own moments carry over,
and they never leave the site.

Where the moments live follows `dp_history.py`: in the run's Flower context (it goes with every
message to whichever ClientApp process handles it, in simulation and deployment alike) or in
the site worker's memory. Not on disk: a restarted site or a resumed run starts Adam afresh.
"""

from __future__ import annotations

import logging
from typing import Protocol, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context

log = logging.getLogger("fedtune.site")
STATE_KEY = "fedtune.optimizer"
MOMENTS = ("exp_avg", "exp_avg_sq", "step")
OptimizerArrays = dict[str, np.ndarray]


class OptimizerStore(Protocol):
    """Keeps one site's optimizer moments for one run."""

    def load(self) -> OptimizerArrays | None: ...

    def save(self, arrays: OptimizerArrays) -> None: ...


class ContextOptimizerStore:
    """In the run's Flower context, as an ArrayRecord."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def load(self) -> OptimizerArrays | None:
        record = self.context.state.array_records.get(STATE_KEY)
        return None if record is None else {name: array.numpy() for name, array in record.items()}

    def save(self, arrays: OptimizerArrays) -> None:
        self.context.state.array_records[STATE_KEY] = ArrayRecord(
            array_dict={name: Array(value) for name, value in arrays.items()}
        )


class MemoryOptimizerStore:
    """In the site worker's memory, for the run's life."""

    def __init__(self) -> None:
        self.arrays: OptimizerArrays | None = None

    def load(self) -> OptimizerArrays | None:
        return self.arrays

    def save(self, arrays: OptimizerArrays) -> None:
        self.arrays = dict(arrays)


def optimizer_arrays(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> OptimizerArrays:
    """The AdamW moments of `params`, by position: {"3.exp_avg": ..., "3.exp_avg_sq": ..., "3.step": ...}."""
    arrays: OptimizerArrays = {}
    for i, param in enumerate(params):
        for name, value in optimizer.state.get(param, {}).items():
            if name in MOMENTS:
                arrays[f"{i}.{name}"] = value.detach().cpu().numpy().copy()
    return arrays


def restore_optimizer(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], arrays: OptimizerArrays, site: str
) -> bool:
    """Put saved moments back into a fresh AdamW over the same parameters; False (and a log
    line) when they do not fit, e.g. another model or LoRA shape: training then starts afresh."""
    for i, param in enumerate(params):
        for name in MOMENTS[:2]:
            saved = arrays.get(f"{i}.{name}")
            if saved is None or tuple(saved.shape) != tuple(param.shape):
                log.warning(
                    "%s: kept optimizer state does not fit this model (%s of parameter %d); starting AdamW afresh",
                    site,
                    name,
                    i,
                )
                return False
    if len(arrays) != len(MOMENTS) * len(params):
        log.warning(
            "%s: kept optimizer state has %d tensors for %d parameters; starting AdamW afresh",
            site,
            len(arrays),
            len(params),
        )
        return False
    for i, param in enumerate(params):
        optimizer.state[param] = {
            name: torch.as_tensor(arrays[f"{i}.{name}"]).to(param.device if name != "step" else "cpu")
            for name in MOMENTS
        }
    return True
