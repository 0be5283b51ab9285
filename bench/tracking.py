"""What watching a run costs: the demo federation (3 Banking77 sites, SecAgg+, MiniLM) with
`tracking = none`, `tensorboard` (the default) and `mlflow` (its SQLite store), ROUNDS
rounds each, one after another in this process.

Two figures per tracker. A round of the demo takes about 40 s and varies by several
seconds from one round to the next, far more than a tracker's cost, so the whole runs'
wall times (measured, reported) cannot resolve it. The second figure can: the rounds the
tensorboard run recorded are replayed through the coordinator's round sink
(`server/tracking.py`: the record, the tracker, the plots and report) with each tracker,
each call timed, and the cost per round is set against the measured mean round:
tracking_over_none_round_time = (round + sink with the tracker) / (round + sink without).

    python bench/tracking.py [--rounds 3] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import update_results  # noqa: E402

from fedtune.cli.simulation import run_simulation  # noqa: E402
from fedtune.config import RunSettings, default_run_config  # noqa: E402
from fedtune.run_folder import RoundRecord  # noqa: E402
from fedtune.server.tracking import RoundSink, open_tracker  # noqa: E402

WORK = Path(__file__).resolve().parent / "_work" / "tracking"
TRACKERS = ("none", "tensorboard", "mlflow")
SITES = 3


def replay(records: list[RoundRecord], tracking: str, adapter_info: dict[str, Any]) -> list[float]:
    """Seconds the round sink takes for each record, with `tracking`, in a fresh run folder."""
    with tempfile.TemporaryDirectory(dir=WORK) as out:
        folder = Path(out) / "replay"
        folder.mkdir()
        settings = RunSettings.from_run_config({**default_run_config(), "tracking": tracking, "output-dir": out})
        tracker = open_tracker(settings, folder, "replay")
        written: list[RoundRecord] = []
        sink = RoundSink(written.append, lambda: list(written), tracker, settings, folder, "replay", adapter_info)
        seconds = []
        for record in records:
            started = time.perf_counter()
            sink(record)
            seconds.append(time.perf_counter() - started)
        if tracker is not None:
            tracker.finish(folder)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.*")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs: dict[str, dict[str, Any]] = {}
    for tracking in TRACKERS:
        name = f"{tracking}-{stamp}"
        started = time.time()
        run_simulation(
            {"num-rounds": args.rounds, "tracking": tracking, "output-dir": str(WORK / "runs"), "run-name": name},
            num_sites=SITES,
        )
        run_dir = WORK / "runs" / name
        records = [RoundRecord.from_json(json.loads(x)) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        runs[tracking] = {
            "wall": time.time() - started,
            "round": statistics.mean(float(r.round_seconds or 0.0) for r in records),
            "records": records,
            "adapter": json.loads((run_dir / "run.json").read_text())["adapter"],
        }
        print(f"{tracking}: {runs[tracking]['wall']:.0f}s, mean round {runs[tracking]['round']:.1f}s", flush=True)

    records = runs["tensorboard"]["records"]
    round_seconds = statistics.mean(r["round"] for r in runs.values())
    sink = {t: statistics.mean(replay(records, t, runs["tensorboard"]["adapter"])) for t in TRACKERS}
    for tracking, seconds in sink.items():
        print(f"round sink with {tracking}: {seconds * 1000:.0f} ms per round", flush=True)
    keys = {
        "tracking_over_none_round_time": round(
            (round_seconds + sink["tensorboard"]) / (round_seconds + sink["none"]), 4
        ),
        "tracking_mlflow_over_none_round_time": round(
            (round_seconds + sink["mlflow"]) / (round_seconds + sink["none"]), 4
        ),
        "tracking_over_none_federation_wall_time": round(runs["tensorboard"]["wall"] / runs["none"]["wall"], 4),
        "tracking_mlflow_over_none_federation_wall_time": round(runs["mlflow"]["wall"] / runs["none"]["wall"], 4),
        "tracking_round_views_seconds": round(sink["none"], 3),
    }
    print(json.dumps(keys, indent=2), flush=True)
    if args.no_write:
        return
    rows = "\n".join(
        f"| `{t}` | {runs[t]['wall']:.0f} | {runs[t]['round']:.1f} | {sink[t] * 1000:.0f} ms |" for t in TRACKERS
    )
    markdown = f"""## Watching a run: what tracking costs (`bench/tracking.py`)

The demo federation (3 Banking77 sites, SecAgg+ on, MiniLM), {args.rounds} rounds per run, one run per tracker,
one after another. The round sink is what the coordinator does once a round is recorded: its line in
metrics.jsonl, the tracker, and the plots and report rewritten (those last two with every tracker, `none`
included); timed by replaying the tensorboard run's {len(records)} rounds with each tracker.

| tracking | whole run, s | mean round, s | round sink per round |
|---|---|---|---|
{rows}

- `tracking_over_none_round_time` (TensorBoard, the default) = **{keys["tracking_over_none_round_time"]}**;
  MLflow (SQLite store): {keys["tracking_mlflow_over_none_round_time"]}. From the sink's timed cost against the
  mean measured round ({round_seconds:.1f} s).
- The whole runs, measured: tensorboard / none = {keys["tracking_over_none_federation_wall_time"]}, mlflow / none =
  {keys["tracking_mlflow_over_none_federation_wall_time"]}; rounds vary by several seconds from one to the next, so
  these ratios show noise of that size, not the trackers. MLflow's run also pays once for creating its store
  and for storing the final adapter and files as artefacts.
- The plots and report after every round (new with live views, in every mode) take
  {keys["tracking_round_views_seconds"]} s a round.
"""
    update_results("tracking", keys, markdown)


if __name__ == "__main__":
    main()
