"""Saving and restoring a Flower strategy's own state with each checkpoint, so a
resumed run continues FedAdam/FedYogi moments and FedAvgM momentum where they were."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.server.strategy import Strategy

STATE_FILE = "strategy_state.npz"
# The attributes Flower's legacy FedOpt (FedAdam, FedYogi, FedAdagrad) and FedAvgM keep.
STATE_ATTRIBUTES = ("current_weights", "m_t", "v_t", "momentum_vector")


def save_strategy_state(strategy: Strategy, folder: Path) -> Path | None:
    """Write the strategy's array state next to the round's adapter (none: no file)."""
    arrays: dict[str, np.ndarray] = {}
    for name in STATE_ATTRIBUTES:
        value = getattr(strategy, name, None)
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
    for name in STATE_ATTRIBUTES:
        if f"{name}.count" in data and hasattr(strategy, name):
            count = int(data[f"{name}.count"])
            setattr(strategy, name, [data[f"{name}.{i:04d}"] for i in range(count)])
            restored.append(name)
    return restored
