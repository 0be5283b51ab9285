"""Where a site keeps its DP accountant's history (noise multiplier, sample rate, steps)
between rounds: in the run's Flower context (a ClientApp process per message) or in the
site worker's memory, and always on the site's own disk (`NodeSettings.state_folder`), keyed by run id, so ε keeps counting across process restarts and
coordinator resumes. The run id arrives in a message, so it names no path: the file goes
under a fixed-format key made from it (`site_policy.run_key`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from flwr.app import ConfigRecord, Context

from .site_policy import check_site_name, run_key

if TYPE_CHECKING:
    from fedtune.config import RunSettings

    from .node_settings import NodeSettings

STATE_KEY = "fedtune.dp"
History = list[tuple[float, float, int]]


def history_file(node: NodeSettings, settings: RunSettings, run_id: str, site: str) -> Path:
    """The site's accountant file: STATE_DIR/<run key>/<site>-dp.json."""
    return node.state_folder(settings) / run_key(run_id) / f"{check_site_name(site)}-dp.json"


def _read(path: Path) -> History:
    return [tuple(x) for x in json.loads(path.read_text())] if path.exists() else []  # type: ignore[misc]


def _write(path: Path, history: History) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(history))
    os.replace(tmp, path)


class HistoryStore(Protocol):
    """Loads and saves one run's accountant history at one site."""

    def load(self, path: Path) -> History: ...

    def save(self, path: Path, history: History) -> None: ...


class ContextHistory:
    """The run's Flower context first (it travels with every message), then the disk."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def load(self, path: Path) -> History:
        record = self.context.state.config_records.get(STATE_KEY)
        if record is not None:
            return [tuple(x) for x in json.loads(str(record["history"]))]  # type: ignore[misc]
        return _read(path)

    def save(self, path: Path, history: History) -> None:
        self.context.state.config_records[STATE_KEY] = ConfigRecord({"history": json.dumps(history)})
        _write(path, history)


class MemoryHistory:
    """The site worker's: in memory for the run's life, read from disk after a restart."""

    def __init__(self) -> None:
        self.history: History | None = None

    def load(self, path: Path) -> History:
        if self.history is None:
            self.history = _read(path)
        return list(self.history)

    def save(self, path: Path, history: History) -> None:
        self.history = list(history)
        _write(path, history)
