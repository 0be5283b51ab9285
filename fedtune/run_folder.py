"""The run folder's records as types: `run.json` (RunRecord), one `metrics.jsonl` line per
round (RoundRecord) and `summary.json` (Summary), with the files' names. The coordinator's
recorder writes them; the report, the plots, the resume, the pre-flight and the export read
them through this module, so a key is written and read under one name. Readers accept the
records of older runs (absent keys take the field's default) and refuse a damaged file in
one line naming it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from fedtune.errors import FedtuneError

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
SECAGG_FILE = "secagg.json"
BUDGET_FILE = "budget.json"  # train-epochs: the plan the coordinator derived before round 1
FINAL_DIR = "final"
ADAPTER_META_FILE = "fedtune.json"  # in every adapter folder: the run's metadata and the round


def round_dir_name(server_round: int) -> str:
    return f"round-{server_round:03d}"


T = TypeVar("T")


def _from_json(cls: type[T], data: Any, where: str) -> T:
    if not isinstance(data, dict):
        raise FedtuneError(f"{where}: expected a JSON object")
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    try:
        return cls(**{k: v for k, v in data.items() if k in known})
    except TypeError as err:  # a required key missing
        raise FedtuneError(f"{where}: {err}") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedtuneError(f"{path}: not found") from None
    except json.JSONDecodeError as err:
        raise FedtuneError(f"{path}:{err.lineno}: bad JSON ({err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise FedtuneError(f"{path}: unreadable ({err})") from None


@dataclass
class RoundRecord:
    """One line of metrics.jsonl: a round's sites, aggregate, central evaluation and costs."""

    round: int
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)  # site name -> its released metrics
    aggregate: dict[str, Any] = field(default_factory=dict)
    central: dict[str, float] | None = None
    failures: int = 0
    failure_reasons: list[str] = field(default_factory=list)
    skipped: bool = False  # SecAgg+ below its threshold: no aggregate, the adapter unchanged
    dp_epsilon_max: float | None = None
    dp_epsilon_next_max: float | None = None  # the worst site's epsilon after one more round
    bytes_down: int | None = None
    bytes_up: int | None = None
    round_seconds: float | None = None
    dispatch: dict[str, Any] | None = None  # deployed rounds: polling, start-up and site work

    def to_json(self) -> dict[str, Any]:
        """The line as written: absent costs are left out, `central` is always there."""
        out = {k: v for k, v in asdict(self).items() if v is not None or k == "central"}
        if not self.skipped:
            out.pop("skipped")
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = METRICS_FILE) -> "RoundRecord":
        return _from_json(cls, data, where)

    @property
    def local_steps(self) -> int:
        """The local steps the round's sites reported, summed over the sites."""
        return sum(int(site.get("steps", 0)) for site in self.sites.values())


@dataclass
class RunRecord:
    """run.json: what the run is (model, task, labels, settings), written at its start."""

    settings: dict[str, Any]
    labels: list[str]
    run_id: str = ""
    run_uid: str = ""  # kept across resumes; sites key their own state by it
    fedtune_version: str = ""
    base_model: str = ""
    base_model_path: str = ""
    task: str = "seq-cls"
    system_prompt: str = ""
    ffa_head_rank: int = 0
    head_input: str = "pooler"
    adapter: dict[str, Any] = field(default_factory=dict)
    resumed: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def metadata(self) -> dict[str, Any]:
        """What every adapter folder's fedtune.json repeats of the run."""
        out = self.to_json()
        for key in ("settings", "adapter", "resumed"):
            out.pop(key)
        return out


@dataclass
class Summary:
    """summary.json: the run's outcome, written at its end."""

    run_id: str
    run_dir: str
    rounds: int
    central: dict[str, float] | None = None
    site_validation: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_run(run_dir: Path) -> RunRecord:
    return _from_json(RunRecord, _read_json(run_dir / RUN_FILE), str(run_dir / RUN_FILE))


def read_summary(run_dir: Path) -> Summary | None:
    path = run_dir / SUMMARY_FILE
    return _from_json(Summary, _read_json(path), str(path)) if path.exists() else None


def read_rounds(run_dir: Path) -> list[RoundRecord]:
    """metrics.jsonl's records, in order ([] before the first round)."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                raise FedtuneError(f"{path}:{number}: bad JSON ({err.msg})") from None
            out.append(RoundRecord.from_json(data, f"{path}:{number}"))
    return out


def read_json_file(path: Path) -> Any:
    """Any other JSON file of the run folder (secagg.json, an adapter's fedtune.json), one line when damaged."""
    return _read_json(path)


@dataclass
class FinishedRun:
    """What an export reads of a finished run folder: its records, its rounds, its
    outcome, the final adapter's metadata and the SecAgg+ settings it ran under."""

    run: RunRecord
    records: list[RoundRecord]
    summary: Summary | None
    adapter_meta: dict[str, Any]
    secagg: dict[str, Any] | None


def read_finished_run(run_dir: Path) -> FinishedRun:
    """A finished run folder, typed; one line naming the first file that is missing or damaged."""
    final_meta = Path(FINAL_DIR) / ADAPTER_META_FILE
    for name in (RUN_FILE, METRICS_FILE, str(Path(FINAL_DIR) / "adapter_model.safetensors"), str(final_meta)):
        if not (run_dir / name).exists():
            raise FedtuneError(f"{run_dir / name}: missing; is {run_dir} a finished fedtune run folder?")
    secagg = run_dir / SECAGG_FILE
    return FinishedRun(
        run=read_run(run_dir),
        records=read_rounds(run_dir),
        summary=read_summary(run_dir),
        adapter_meta=_read_json(run_dir / final_meta),
        secagg=_read_json(secagg) if secagg.exists() else None,
    )
