"""Sites of different LoRA ranks against all sites at the largest and at the smallest rank,
in one run.

Data: the Banking77 subset of bench/small_data.py (24 intents, 1,000 training examples,
their whole test split held out), 4 sites, Dirichlet alpha 0.5, fedtune's defaults
otherwise, ROUNDS rounds each. Ranks: the sites train 2, 4, 8 and 16 (`site-lora-ranks`)
in a federation of lora-r 16; the uniform baselines are every site at 16 and every site
at 2. LoRA's scale alpha / r is 2 in every run (alpha = 2 r, the defaults' scale), so a
rank-2 site steps as a rank-2 federation does.

- FFA-LoRA (A frozen and shared), SecAgg+ on: uniform 16, uniform 2, heterogeneous
  (exact: each column of B averaged over the sites that trained it).
- Plain LoRA (A trained): uniform 16 and uniform 2 under SecAgg+, heterogeneous with
  zero-padding (HetLoRA-style) under SecAgg+, heterogeneous with FlexLoRA's SVD of the
  mean product (no SecAgg+: the coordinator needs each site's adapter).

Measured per site: upload bytes (the traffic meter's, `metrics.jsonl`), the adapter values
it trained, and the memory plan's "LoRA + optimizer" bytes at its rank.

    python bench/hetero_ranks.py [--rounds 10] [--only ffa-hetero,...] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import update_results  # noqa: E402
from small_data import ALPHA, SITES, make_subset, subset_run  # noqa: E402

from fedtune.cli.simulation import run_simulation  # noqa: E402
from fedtune.config import RunSettings, default_run_config  # noqa: E402
from fedtune.memory_plan import model_shape, plan_memory  # noqa: E402
from fedtune.precision import resolve_precision  # noqa: E402

WORK = Path(__file__).resolve().parent / "_work" / "hetero_ranks"
RANKS = (2, 4, 8, 16)
MAX_RANK, MIN_RANK = max(RANKS), min(RANKS)
SITE_RANKS = ",".join(str(r) for r in RANKS)


def variants() -> dict[str, dict[str, Any]]:
    """Each federation of the bench: its run-config overrides."""

    def rank(r: int) -> dict[str, Any]:
        return {"lora-r": r, "lora-alpha": 2 * r}

    hetero = {**rank(MAX_RANK), "hetero-ranks": True, "site-lora-ranks": SITE_RANKS}
    return {
        "ffa-uniform-max": {"ffa-lora": True, **rank(MAX_RANK)},
        "ffa-uniform-min": {"ffa-lora": True, **rank(MIN_RANK)},
        "ffa-hetero": {"ffa-lora": True, **hetero},
        "lora-uniform-max": {"ffa-lora": False, **rank(MAX_RANK)},
        "lora-uniform-min": {"ffa-lora": False, **rank(MIN_RANK)},
        "lora-padding": {"ffa-lora": False, **hetero, "hetero-aggregation": "padding"},
        "lora-svd": {"ffa-lora": False, **hetero, "hetero-aggregation": "svd", "secagg": False},
    }


def site_uploads(run_dir: Path) -> dict[str, float]:
    """Mean bytes each site sent per round (the traffic meter's)."""
    per: dict[str, list[int]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        for name, site in json.loads(line).get("sites", {}).items():
            if "bytes_up" in site:
                per.setdefault(name, []).append(int(site["bytes_up"]))
    return {name: sum(v) / len(v) for name, v in sorted(per.items())}


def lora_memory(settings: RunSettings, labels: list[str], r: int) -> tuple[int, int]:
    """(trainable values, memory plan's LoRA + optimizer bytes) of a model built at rank r."""
    at_rank = RunSettings.from_run_config({**settings.to_run_config(), "lora-r": r, "lora-alpha": 2 * r})
    shape = model_shape(at_rank.base_model, at_rank.task, at_rank, labels)
    plan = plan_memory(shape, at_rank, resolve_precision("fp32", "none", False, __import__("torch").device("cpu")))
    return shape.trainable, plan.trainable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--only", default="", help="comma-separated variants to run (a trial; not for the record)")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.*")
    args = parser.parse_args()

    train, test, labels_file, labels = make_subset(WORK / "data")
    chosen = [v for v in args.only.split(",") if v] or list(variants())
    results: dict[str, dict[str, Any]] = {}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in chosen:
        overrides = {
            **subset_run((train, test, labels_file), args.rounds, WORK / "runs", f"{name}-{stamp}"),
            **variants()[name],
        }
        started = time.time()
        run_simulation(overrides, num_sites=SITES)
        run_dir = WORK / "runs" / overrides["run-name"]
        central = json.loads((run_dir / "summary.json").read_text())["central"]
        results[name] = {
            "accuracy": central["accuracy"],
            "seconds": time.time() - started,
            "upload": site_uploads(run_dir),
        }
        print(f"{name}: accuracy {central['accuracy']:.4f} in {results[name]['seconds']:.0f}s", flush=True)
    if args.no_write or args.only:
        return

    def acc(name: str) -> float:
        return float(results[name]["accuracy"])

    keys = {
        "hetero_ffa_over_uniform_max_rank_accuracy": round(acc("ffa-hetero") / acc("ffa-uniform-max"), 4),
        "hetero_ffa_uniform_min_over_uniform_max_rank_accuracy": round(
            acc("ffa-uniform-min") / acc("ffa-uniform-max"), 4
        ),
        "hetero_padding_over_uniform_max_rank_accuracy": round(acc("lora-padding") / acc("lora-uniform-max"), 4),
        "hetero_svd_over_uniform_max_rank_accuracy": round(acc("lora-svd") / acc("lora-uniform-max"), 4),
        "hetero_lora_uniform_min_over_uniform_max_rank_accuracy": round(
            acc("lora-uniform-min") / acc("lora-uniform-max"), 4
        ),
    }
    settings = RunSettings.from_run_config({**default_run_config(), "labels-file": str(labels_file)})
    memory = {r: lora_memory(settings, labels, r) for r in RANKS}
    rows = "\n".join(
        f"| {name} | {r['accuracy']:.4f} | {r['seconds']:.0f} | "
        + ", ".join(f"{site} {b / 1e3:.0f} kB" for site, b in r["upload"].items())
        + " |"
        for name, r in results.items()
    )
    mem_rows = "\n".join(f"| {r} | {memory[r][0]:,} | {memory[r][1] / 2**20:.1f} MiB |" for r in RANKS)
    markdown = f"""## Sites of different LoRA ranks (`bench/hetero_ranks.py`)

The Banking77 subset of `bench/small_data.py` (24 intents, 1,000 training examples, {SITES} sites,
Dirichlet {ALPHA}), MiniLM, {args.rounds} rounds per federation, LoRA scale alpha / r = 2 in every run.
Heterogeneous: the sites train ranks {SITE_RANKS} of a rank-{MAX_RANK} federation. SecAgg+ on except for
`lora-svd`, which needs each site's adapter.

| federation | test accuracy | wall s | upload per site per round |
|---|---|---|---|
{rows}

| | over all sites at rank {MAX_RANK} |
|---|---|
| FFA-LoRA, ranks {SITE_RANKS} (exact, SecAgg+) | **{keys["hetero_ffa_over_uniform_max_rank_accuracy"]}** |
| FFA-LoRA, all at rank {MIN_RANK} | {keys["hetero_ffa_uniform_min_over_uniform_max_rank_accuracy"]} |
| LoRA, zero-padding (HetLoRA-style, SecAgg+) | **{keys["hetero_padding_over_uniform_max_rank_accuracy"]}** |
| LoRA, SVD of the mean product (FlexLoRA-style, no SecAgg+) | **{keys["hetero_svd_over_uniform_max_rank_accuracy"]}** |
| LoRA, all at rank {MIN_RANK} | {keys["hetero_lora_uniform_min_over_uniform_max_rank_accuracy"]} |

Upload: under SecAgg+ every site sends the federation's full rank-{MAX_RANK} shape (the zero columns are masked
like the rest, which is what hides a site's rank), plus one {MAX_RANK}-value column-weight vector; so does
`lora-svd` today. Memory: a site builds the federation's rank-{MAX_RANK} adapter and trains its first r_k
components, so its memory is that of rank {MAX_RANK}. What a model built at its own rank would hold for LoRA and
AdamW (the memory plan's "LoRA + optimizer", fp32, the head included; on MiniLM the rest of a training step
is far larger, so a rank buys little memory here):

| rank | trainable values (plain LoRA A and B + head) | LoRA + optimizer |
|---|---|---|
{mem_rows}
"""
    update_results("hetero-ranks", keys, markdown)


if __name__ == "__main__":
    main()
