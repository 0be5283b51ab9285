"""Saving and restoring a Flower strategy's own state with each checkpoint, so a
resumed run continues FedAdam/FedYogi moments and FedAvgM momentum where they were.

Flower's legacy strategies keep that state in plain attributes that are not part of
its API (`FedOpt`: `current_weights`, `m_t`, `v_t`; `FedAvgM`: `momentum_vector`;
verified on Flower 1.41). `check_strategy_state` runs when the coordinator starts and
refuses to run if the strategy lacks one of them, so a Flower release that renames
one fails loudly instead of resuming with the moments silently reset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.server.strategy import FedAvgM, FedOpt, Strategy

from fedtune.errors import FedtuneError

STATE_FILE = "strategy_state.npz"
# The private attributes each legacy strategy family keeps its state in.
STATE_ATTRIBUTES: tuple[tuple[type, tuple[str, ...]], ...] = (
    (FedOpt, ("current_weights", "m_t", "v_t")),  # FedAdam, FedYogi, FedAdagrad
    (FedAvgM, ("momentum_vector",)),
)


def state_attributes(strategy: Strategy) -> tuple[str, ...]:
    """The attributes holding `strategy`'s state (none for stateless FedAvg/FedProx)."""
    return next((names for cls, names in STATE_ATTRIBUTES if isinstance(strategy, cls)), ())


def check_strategy_state(strategy: Strategy) -> None:
    """Refuse to start if Flower no longer keeps this strategy's state where we read it."""
    import flwr

    missing = [name for name in state_attributes(strategy) if not hasattr(strategy, name)]
    if missing:
        raise FedtuneError(
            f"{type(strategy).__name__} in Flower {flwr.__version__} has no {', '.join(missing)}: fedtune saves and "
            "resumes the strategy's state from these attributes (verified on Flower 1.41.x); install that version"
        )


def save_strategy_state(strategy: Strategy, folder: Path) -> Path | None:
    """Write the strategy's array state next to the round's adapter (none: no file)."""
    arrays: dict[str, np.ndarray] = {}
    for name in state_attributes(strategy):
        value = getattr(strategy, name)
        if value is None:
            continue
        arrays[f"{name}.count"] = np.asarray(len(value))
        for i, array in enumerate(value):
            arrays[f"{name}.{i:04d}"] = np.asarray(array)
    if not arrays:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{STATE_FILE}.tmp.npz"
    np.savez(tmp, **arrays)
    tmp.replace(folder / STATE_FILE)
    return folder / STATE_FILE


def load_strategy_state(strategy: Strategy, folder: Path) -> list[str]:
    """Restore what `save_strategy_state` wrote; returns the attributes restored."""
    path = folder / STATE_FILE
    if not path.exists():
        return []
    data = np.load(path)
    restored = []
    for name in state_attributes(strategy):
        if f"{name}.count" in data:
            count = int(data[f"{name}.count"])
            setattr(strategy, name, [data[f"{name}.{i:04d}"] for i in range(count)])
            restored.append(name)
    return restored
