"""Federated instruction tuning on a site's own small data, with the defaults a user is given
(`configs/llm-own-data.toml`), against plain peft + transformers `Trainer` on the same pairs
in one place at the same sample budget.

Subsets of Banking77-chat made with a fixed seed: SUBSET_INTENTS intents drawn at random, about
`--pairs` training pairs from them, and their held-out test pairs. Each shape is federated with
the config's defaults (the budget `train-epochs`, from which the coordinator derives rounds,
local steps, the sites' batch and the server's step on the mean update; the sites' AdamW kept
across rounds; SecAgg+ on), split non-IID over the sites (Dirichlet 0.5 over intents). The Trainer takes the same budget: the
plan's training samples, at the config's batch. Both are scored by the same greedy exact match
(fedtune.evaluation) on the same test pairs.

    python bench/llm_small_data.py [--shapes 1000x4,1000x8] [--test-examples 300] [--no-write]
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

from llm import central_trainer, federated, score, test_subset  # noqa: E402
from results import update_results  # noqa: E402

from fedtune.cli.common import read_run_config_file  # noqa: E402
from fedtune.config import RunSettings, default_run_config  # noqa: E402
from fedtune.run_folder import read_rounds  # noqa: E402

WORK = Path(__file__).resolve().parent / "_work" / "llm_small_data"
OWN_DATA_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "llm-own-data.toml"
SOURCE = Path(__file__).resolve().parent.parent / "data" / "banking77-chat"
SUBSET_INTENTS = 24
SEED = 0
SYSTEM_PROMPT = "Name the banking intent."


def make_pairs_subset(pairs: int, folder: Path) -> tuple[Path, Path]:
    """SUBSET_INTENTS seeded intents; about `pairs` of their training pairs; all their test pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(x) for x in (SOURCE / "train.jsonl").read_text().splitlines()]
    rng = random.Random(SEED)
    intents = set(rng.sample(sorted({r["completion"] for r in rows}), SUBSET_INTENTS))
    chosen = [r for r in rows if r["completion"] in intents]
    chosen = rng.sample(chosen, min(pairs, len(chosen)))
    tests = [json.loads(x) for x in (SOURCE / "test.jsonl").read_text().splitlines()]
    train, test = folder / "train.jsonl", folder / "test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    test.write_text("".join(json.dumps(r) + "\n" for r in tests if r["completion"] in intents))
    return train, test


def trained_samples(run_dir: Path) -> tuple[int, dict[str, Any]]:
    """The samples the sites trained on (the plan's steps x batch, as reported) and the plan."""
    plan = json.loads((run_dir / "budget.json").read_text())
    steps = sum(record.local_steps for record in read_rounds(run_dir))
    return steps * int(plan["site_batch"]), plan


def measure(pairs: int, sites: int, test_examples: int) -> dict[str, Any]:
    from fedtune.adapter_io import load_adapter_model

    train, test = make_pairs_subset(pairs, WORK / f"data-{pairs}")
    name = f"small-{pairs}x{sites}-{time.strftime('%Y%m%d-%H%M%S')}"
    config = {
        **default_run_config(),
        **read_run_config_file(str(OWN_DATA_CONFIG)),
        "data-path": str(train),
        "central-eval-path": "",  # scored below, by the same code as the Trainer
        "system-prompt": SYSTEM_PROMPT,
        "output-dir": str(WORK / "runs"),
        "run-name": name,
    }
    settings = RunSettings.from_run_config({**config, "central-eval-path": str(test)})
    examples = test_subset(settings, test_examples)

    _, fed_wall = federated(config, sites, name)
    run_dir = WORK / "runs" / name
    fed = score(load_adapter_model(run_dir / "final"), settings, examples)
    samples, plan = trained_samples(run_dir)
    print(f"{pairs}x{sites} federated: {fed} plan {plan} samples {samples} wall {fed_wall:.0f}s", flush=True)

    central_model, central_run = central_trainer(
        RunSettings.from_run_config({**config, "data-path": str(train), "central-eval-path": str(test)}), samples
    )
    central = score(central_model, settings, examples)
    print(f"{pairs}x{sites} central: {central} {central_run}", flush=True)
    return {
        "pairs": sum(1 for _ in train.open()),
        "sites": sites,
        "plan": plan,
        "samples": samples,
        "test": len(examples),
        "federated": fed["exact_match"],
        "central": central["exact_match"],
        "federated_wall": fed_wall + fed["eval_seconds"],
        "central_wall": central_run["train_seconds"] + central["eval_seconds"],
        "steps_central": central_run["steps"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1000x4,1000x8", help="PAIRSxSITES, comma-separated")
    parser.add_argument("--test-examples", type=int, default=300)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.*")
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    results = [measure(pairs, sites, args.test_examples) for pairs, sites in shapes]

    keys: dict[str, Any] = {}
    rows = []
    for r in results:
        ratio = r["federated"] / max(r["central"], 1e-9)
        tag = f"{r['pairs']}x{r['sites']}"
        keys[f"llm_small_data_federated_over_central_exact_match_{tag}"] = round(ratio, 4)
        keys[f"llm_small_data_federated_over_central_wall_time_{tag}"] = round(
            r["federated_wall"] / r["central_wall"], 3
        )
        plan = r["plan"]
        rows.append(
            f"| {r['pairs']:,} pairs, {r['sites']} sites | {plan['num_rounds']} x {plan['local_steps']} x batch "
            f"{plan['site_batch']} | {r['samples']:,} | {r['central']:.4f} | {r['federated']:.4f} | **{ratio:.4f}** | "
            f"{r['central_wall']:.0f} | {r['federated_wall']:.0f} |"
        )
    keys["llm_small_data_federated_over_central_exact_match"] = min(
        v for k, v in keys.items() if k.startswith("llm_small_data_federated_over_central_exact_match_")
    )
    print(json.dumps(keys, indent=2), flush=True)
    if args.no_write:
        return
    met = keys["llm_small_data_federated_over_central_exact_match"] >= 0.97
    table = "\n".join(rows)
    md = f"""## Causal LM on a site's own small data, with the defaults (`bench/llm_small_data.py`)

Banking77-chat subsets made with seed {SEED}: {SUBSET_INTENTS} intents drawn at random, {results[0]["pairs"]:,} of their training
pairs (the sites keep 5% of theirs for validation), split non-IID over the sites (Dirichlet 0.5 over intents); scored on {results[0]["test"]} of their held-out
test pairs by greedy exact match (the same code for both). Federated: `configs/llm-own-data.toml` as it
stands (`train-epochs = 3`: the coordinator derives rounds x local steps x each site's batch from the sites'
counts; the server steps sqrt(batch split), at most 2, times the mean update; AdamW kept across
rounds; SecAgg+ on). Central: peft + transformers `Trainer` on all pairs in one
place, the same LoRA, learning rate and schedule, at the config's batch ({results[0]["steps_central"]} steps
for the first shape) for the same training samples.

| subset | federated plan (rounds x steps x site batch) | samples | central EM | federated EM | federated / central | central s | federated s |
|---|---|---|---|---|---|---|---|
{table}

`llm_small_data_federated_over_central_exact_match` (the worst shape) =
**{keys["llm_small_data_federated_over_central_exact_match"]}** (target >= 0.97: {"met" if met else "missed"}).
Wall times: the federation's whole simulation (Ray, SecAgg+, per-round site validation, checkpoints) + scoring
against `Trainer.train()` + scoring, on this machine's 2 cores.
"""
    update_results("llm-small-data", keys, md)


if __name__ == "__main__":
    main()
