"""Small sites: federated vs central accuracy at an equal sample budget, in one process.

Data: a Banking77 subset made here, the kind of task a small consortium brings: 24
intents (drawn with a fixed seed), 1,000 training examples drawn from those intents'
training split, all of their test examples held out. Federated: `fedtune`'s defaults
(whatever pyproject.toml says today), 4 sites, Dirichlet alpha 0.5, ROUNDS rounds.
Central: the plain peft + transformers loop a user would run instead
(bench/central_baseline.py; LoRA r=8 on query/value, lr 2e-3, batch 32), trained for as
many epochs as the federation's sites trained in total (examples seen / training set).

    python bench/small_data.py [--rounds 30] [--set key=value ...] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from central_baseline import train_and_evaluate_central  # noqa: E402
from results import update_results  # noqa: E402

from fedtune.cli.common import parse_overrides  # noqa: E402
from fedtune.cli.simulation import run_simulation  # noqa: E402
from fedtune.config import default_run_config, resolve_path  # noqa: E402
from fedtune.model import resolve_model_path  # noqa: E402
from fedtune.run_folder import read_rounds  # noqa: E402

WORK = Path(__file__).resolve().parent / "_work" / "small_data"
INTENTS, TRAIN_EXAMPLES, SITES, ALPHA, SEED = 24, 1000, 4, 0.5, 0
CENTRAL_LR = 2e-3


def make_subset(out: Path) -> tuple[Path, Path, Path, list[str]]:
    """train.jsonl, test.jsonl and labels.json of the subset, written under `out`."""
    config = default_run_config()
    train = [json.loads(x) for x in resolve_path(config["data-path"]).read_text().splitlines() if x.strip()]
    test = [json.loads(x) for x in resolve_path(config["central-eval-path"]).read_text().splitlines() if x.strip()]
    rng = random.Random(SEED)
    labels = sorted(rng.sample(sorted({row["label"] for row in train}), INTENTS))
    keep = set(labels)
    pool = [row for row in train if row["label"] in keep]
    chosen = rng.sample(pool, min(TRAIN_EXAMPLES, len(pool)))
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.jsonl", out / "test.jsonl", out / "labels.json"
    paths[0].write_text("".join(json.dumps(r) + "\n" for r in chosen))
    paths[1].write_text("".join(json.dumps(r) + "\n" for r in test if r["label"] in keep))
    paths[2].write_text(json.dumps(labels))
    return *paths, labels


def subset_run(files: tuple[Path, Path, Path], rounds: int, runs: Path, name: str) -> dict[str, Any]:
    """The run config of a federation on the subset (`make_subset`'s train, test and labels)."""
    train, test, labels_file = files
    return {
        "data-path": str(train),
        "labels-file": str(labels_file),
        "central-eval-path": str(test),
        "num-rounds": rounds,
        "dirichlet-alpha": ALPHA,
        "output-dir": str(runs),
        "run-name": name,
    }


def trained_examples(run_dir: Path, batch_size: int) -> int:
    """Examples the sites trained on over the run: sum of steps x batch size."""
    return sum(record.local_steps for record in read_rounds(run_dir)) * batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run-config override for the federation (to try a recipe; not for the record)",
    )
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.*")
    parser.add_argument("--tag", default="", help="a name for this trial's run folder")
    args = parser.parse_args()

    train, test, labels_file, labels = make_subset(WORK / "data")
    overrides = subset_run(
        (train, test, labels_file), args.rounds, WORK / "runs", f"small-{args.tag or time.strftime('%Y%m%d-%H%M%S')}"
    )
    overrides.update(parse_overrides(args.set))
    started = time.time()
    settings = run_simulation(overrides, num_sites=SITES)
    run_dir = WORK / "runs" / overrides["run-name"]
    federated = json.loads((run_dir / "summary.json").read_text())["central"]
    seen = trained_examples(run_dir, settings.batch_size)
    epochs = seen / TRAIN_EXAMPLES
    print(
        f"federated: {federated} after {time.time() - started:.0f}s; sites trained on {seen} examples "
        f"= {epochs:.2f} epochs",
        flush=True,
    )
    cache = WORK / f"central-{epochs:.2f}-epochs.json"  # deterministic for a budget: trials (--set) reuse it
    if args.set and cache.exists():
        central = json.loads(cache.read_text())
    else:
        central = train_and_evaluate_central(
            resolve_model_path(settings.base_model),
            train,
            test,
            labels,
            epochs,
            CENTRAL_LR,
            batch_size=32,
            max_length=settings.max_length,
        )
        cache.write_text(json.dumps(central))
    print(f"central: {central}", flush=True)
    ratio = federated["accuracy"] / central["accuracy"]
    print(f"small_data_federated_over_central_accuracy = {ratio:.3f}", flush=True)
    if args.no_write or args.set:
        return
    markdown = f"""## Small sites: federated vs central at an equal sample budget (`bench/small_data.py`)

A Banking77 subset: {INTENTS} intents, {TRAIN_EXAMPLES} training examples, {SITES} sites (Dirichlet
{ALPHA}: a few hundred examples each), the intents' whole test split held out. Federated: fedtune's defaults,
{args.rounds} rounds. Central: plain peft + transformers, LoRA r=8, lr {CENTRAL_LR}, batch 32, for as many epochs
as the sites trained in total ({epochs:.2f}).

| | test accuracy | macro-F1 |
|---|---|---|
| central | {central["accuracy"]:.4f} | {central.get("macro_f1", float("nan")):.4f} |
| federated ({SITES} sites) | {federated["accuracy"]:.4f} | {federated.get("macro_f1", float("nan")):.4f} |

`small_data_federated_over_central_accuracy` = **{ratio:.3f}** (target >= 0.97).

What makes the difference on sites this small is `min-local-steps` (default 10): half an epoch of a
200-example site is 4 steps of 32, so without the floor the global model moves a fraction of what the
central one does for the same sample budget. The demo setting is unchanged by it: the demo's sites take
40-51 steps a round, above the floor (`tests/test_local_work.py` checks it), so its
`federated_over_central_accuracy` still holds.
"""
    update_results(
        "small-data",
        {
            "small_data_federated_over_central_accuracy": round(ratio, 3),
            "small_data_central_accuracy": round(central["accuracy"], 4),
            "small_data_federated_accuracy": round(federated["accuracy"], 4),
        },
        markdown,
    )


if __name__ == "__main__":
    main()
