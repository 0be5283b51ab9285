"""A round's record (one line of metrics.jsonl) as the flat, named scalars a tracker logs:
what the report holds, one name per value, so TensorBoard and MLflow show the same curves."""

from __future__ import annotations

import math
import re
from typing import Any

from fedtune.run_folder import RoundRecord

_NOT_A_METRIC = frozenset({"node_id", "site"})  # identifiers the sites' metrics carry
MAX_NAME = 200  # names hold site names and the sites' metric keys: bounded for the trackers' limits
_UNSAFE = re.compile(r"[^\w\-./ ]")  # what MLflow and TensorBoard both accept in a name


def scalar_name(*parts: str) -> str:
    """A tracker's name for a value: the parts joined with '/', odd characters replaced."""
    return _UNSAFE.sub("_", "/".join(parts))[:MAX_NAME]


def _numbers(prefix: str, values: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in values.items():
        if key in _NOT_A_METRIC or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(float(value)):
            out[scalar_name(prefix, str(key))] = float(value)
    return out


def round_scalars(record: RoundRecord) -> dict[str, float]:
    """Every numeric value of the round: `global/` (the sites' weighted validation and
    training), `central/` (the held-out evaluation), `site/NAME/` (what each site released),
    `privacy/` (epsilon, the worst site's and each site's), `traffic/` (bytes), `time/`
    (the round, and the stages of a deployed one) and `round/` (skipped, failures)."""
    out = _numbers("global", record.aggregate)
    out |= _numbers("central", record.central or {})
    for site, metrics in sorted(record.sites.items()):
        out |= _numbers(f"site/{site}", metrics)
        if isinstance(metrics.get("dp_epsilon"), (int, float)):
            out[scalar_name("privacy/epsilon", site)] = float(metrics["dp_epsilon"])
    if record.dp_epsilon_max is not None:
        out["privacy/epsilon_worst_site"] = float(record.dp_epsilon_max)
    for key in ("bytes_up", "bytes_down"):
        value = getattr(record, key)
        if value is not None:
            out[f"traffic/{key}"] = float(value)
    if record.round_seconds is not None:
        out["time/round_seconds"] = float(record.round_seconds)
    out |= _numbers("time/dispatch", record.dispatch or {})
    out["round/skipped"] = 1.0 if record.skipped else 0.0
    out["round/failures"] = float(record.failures)
    return out


def round_notes(record: RoundRecord) -> str:
    """What the round's numbers cannot say: why it was skipped, which sites failed and why."""
    lines = []
    if record.skipped:
        lines.append(f"round {record.round} skipped: no aggregate, the adapter unchanged")
    lines += [f"- {reason}" for reason in record.failure_reasons]
    return "\n".join(lines)
