"""What privacy costs on the demo workload, in one process so the ratios are fair.

Six federations on the demo setting (Banking77, 3 non-IID sites, MiniLM + LoRA r=8),
one after another:

    plain            SecAgg+ off, plain FedAvg over A and B (per-site adapters audited locally)
    secagg           SecAgg+ on (the demo default)
    ffa-full-head    FFA-LoRA under SecAgg+, the paper's recipe: B and the full head travel
    ffa-secagg       FFA-LoRA under SecAgg+ with a low-rank head (ffa-head-rank): only B, B_h travel
and then, in their own section (alone with --dp-only), the recommended DP recipe:
    zero-shot        the label-name head (head-init = label-names) before any training
    dp-eps8          SecAgg+ and head-only DP-SGD at each site from the label-name head, target (8, 1e-5)
    dp-eps1          the same at target (1, 1e-5)
    ddp-eps8         distributed DP through SecAgg+ (dp-mode = distributed), target (8, 1e-5)
    ddp-eps1         the same at target (1, 1e-5)

The central reference is the plain peft + transformers baseline of `bench/accuracy.py`,
read from `bench/_work/central.json` (written by that script; `make bench` runs it
first) or trained here when the file is missing.

    python bench/privacy.py [--rounds R] [--local-epochs E] [--no-write] [--dp-only]
    python bench/privacy.py --resume STAMP     # finish an interrupted run
    python bench/privacy.py --collect STAMP    # only rebuild the results of one
    python bench/privacy.py --secagg-active-only [--timing-pairs P --timing-rounds R]
                                               # signed SecAgg+ against SecAgg+, alone
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # support/: the site audit mod

from central_baseline import central_from_run_config  # noqa: E402
from results import update_results  # noqa: E402
from support.site_hooks import AuditUpdates, client_app_with  # noqa: E402

from fedtune.cli.simulation import run_simulation  # noqa: E402
from fedtune.config import default_run_config, resolve_path  # noqa: E402

WORK = Path(__file__).resolve().parent / "_work"
DELTA = 1e-5
HEAD_RANK = 128
FFA = {"secagg": True, "ffa-lora": True, "ffa-head-rank": HEAD_RANK}
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"secagg": False},
    "secagg": {"secagg": True},
    "ffa-full-head": {"secagg": True, "ffa-lora": True},
    "ffa-secagg": FFA,
}
# The recommended DP recipe (README, Privacy) is pyproject's DP defaults: head-only DP-SGD
# (dp-head-only) on the [CLS] state (head-input = auto) from the label-name head (head-init = auto),
# dp-batch-size, dp-learning-rate, dp-local-epochs, with SecAgg+ on; only the target epsilon changes.
DP_RECIPE = {"secagg": True, "dp": True, "dp-delta": DELTA}
DP_VARIANTS: dict[str, dict[str, Any]] = {
    "dp-eps8": {**DP_RECIPE, "dp-target-epsilon": 8.0},
    "dp-eps1": {**DP_RECIPE, "dp-target-epsilon": 1.0},
}
# Distributed DP through SecAgg+ (README, Privacy): one DP-SGD step per round, so many more
# (cheap) rounds; each site's noise share sized by the SecAgg+ threshold; server Adam at
# dp-learning-rate 0.2; the PRV accountant; no per-round site evaluation (a site's validation
# metrics would be released without noise).
DISTRIBUTED_RECIPE = {
    **DP_RECIPE,
    "dp-mode": "distributed",
    "num-rounds": 100,
    "dp-sample-rate": 0.2,
    "dp-learning-rate": 0.2,
    "dp-accountant": "prv",
    "fraction-evaluate": 0.0,
}
DISTRIBUTED_VARIANTS: dict[str, dict[str, Any]] = {
    "ddp-eps8": {**DISTRIBUTED_RECIPE, "dp-target-epsilon": 8.0},
    "ddp-eps1": {**DISTRIBUTED_RECIPE, "dp-target-epsilon": 1.0},
}


def run_variant(
    name: str, base: dict[str, Any], sites: int, stamp: str, audit: Path | None, settings: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run one federation (`settings`, default VARIANTS[name]); return its summary,
    per-round records and wall time."""
    run_name = f"privacy-{stamp}-{name}"
    settings = {**VARIANTS, **DP_VARIANTS, **DISTRIBUTED_VARIANTS}[name] if settings is None else settings
    config = {**base, **settings, "output-dir": str(WORK / "runs"), "run-name": run_name}
    client_app = client_app_with(inner=[AuditUpdates(str(audit))]) if audit is not None else None
    print(f"== {name}: {settings}", flush=True)
    start = time.perf_counter()
    run_simulation(config, num_sites=sites, client_app=client_app)
    result = read_variant(WORK / "runs" / run_name, time.perf_counter() - start)
    print(f"== {name}: {json.dumps({k: v for k, v in result.items() if k != 'epsilon_by_round'})}", flush=True)
    return result


def from_disk_or_run(
    run_dir: Path, collect: bool, run: Callable[[], dict[str, Any]]
) -> tuple[dict[str, Any] | None, bool]:
    """(figures, whether they were run now) for one variant: read back when its run folder
    finished (`--resume`, `--collect`); else, unless collecting, run it, a half-written
    folder from an interrupted run moved aside first. (None, False): collecting, not on disk."""
    if (run_dir / "summary.json").exists():
        return read_variant(run_dir), False
    if collect:
        return None, False
    if run_dir.exists():
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.interrupted-{time.strftime('%H%M%S')}"))
    return run(), True


def read_variant(run_dir: Path, wall: float | None = None) -> dict[str, Any]:
    """A finished variant's figures, from its run folder."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    uploads = [s["train_bytes_up"] for r in records for s in r.get("sites", {}).values() if s.get("train_bytes_up")]
    return {
        "run_dir": str(run_dir),
        "wall_seconds": wall if wall is not None else summary["seconds"],
        "rounds": len(records),
        "accuracy": summary["central"]["accuracy"],
        "macro_f1": summary["central"]["macro_f1"],
        "round_seconds_median": statistics.median(r["round_seconds"] for r in records),
        "round_seconds_mean": statistics.fmean(r["round_seconds"] for r in records),
        "upload_bytes_per_site_round": statistics.fmean(uploads),
        "epsilon": max((r.get("dp_epsilon_max", 0.0) for r in records), default=0.0),
        "epsilon_by_round": [r.get("dp_epsilon_max") for r in records],
        "epsilon_own_noise": max(
            (s.get("dp_epsilon_own_noise", 0.0) for r in records for s in r.get("sites", {}).values()), default=0.0
        ),
    }


def timing_pairs(
    config: dict[str, Any], sites: int, stamp: str, pairs: int, rounds: int, work: Path, collect: bool
) -> list[dict[str, dict[str, Any]]]:
    """Extra (plain, secagg) pairs of short federations, run back to back in alternating
    order, so that the round-time ratio does not rest on one pair that machine noise can
    tilt. Pairs already on disk are read back; with `collect` nothing is run."""
    out: list[dict[str, dict[str, Any]]] = []
    for i in range(pairs):
        pair: dict[str, dict[str, Any]] = {}
        for name in ("secagg", "plain") if i % 2 == 0 else ("plain", "secagg"):
            label = f"timing{i + 1}-{name}"
            result, _ = from_disk_or_run(
                work / "runs" / f"privacy-{stamp}-{label}",
                collect,
                lambda: run_variant(label, {**config, "num-rounds": rounds}, sites, stamp, None, VARIANTS[name]),
            )
            if result is not None:
                pair[name] = result
        if len(pair) == 2:
            out.append(pair)
    return out


def round_time_ratio(pair: dict[str, dict[str, Any]]) -> float:
    return pair["secagg"]["round_seconds_median"] / pair["plain"]["round_seconds_median"]


def lora_pairs(keys: list[str]) -> list[tuple[str, str]]:
    return [(k, k.replace(".lora_A.", ".lora_B.")) for k in keys if ".lora_A." in k]


def averaging_error(audit: Path, run_dir: Path, server_round: int) -> dict[str, float]:
    """How far plain FedAvg over A and B lands from the sites' mean delta-W.

    Returns the relative Frobenius error ||avg(B) avg(A) - avg(B A)|| / ||avg(B A)||,
    summed over every LoRA layer, for the given round's per-site adapters.
    """
    from safetensors.numpy import load_file

    keys = sorted(load_file(str(run_dir / "round-000" / "adapter_model.safetensors")))
    sites = [np.load(p) for p in sorted(audit.glob(f"*-round{server_round:03d}.npz"))]
    weights = np.array([int(s["num_examples"]) for s in sites], dtype=np.float64)
    weights /= weights.sum()
    full = [{k: s[f"full{i:04d}"].astype(np.float64) for i, k in enumerate(keys)} for s in sites]
    num = den = 0.0
    for a_key, b_key in lora_pairs(keys):
        mean_dw = sum(w * (f[b_key] @ f[a_key]) for w, f in zip(weights, full))
        mean_a = sum(w * f[a_key] for w, f in zip(weights, full))
        mean_b = sum(w * f[b_key] for w, f in zip(weights, full))
        num += float(np.sum((mean_b @ mean_a - mean_dw) ** 2))
        den += float(np.sum(mean_dw**2))
    return {"relative_error": (num / den) ** 0.5, "sites": len(sites)}


def central_reference(config: dict[str, Any], path: Path) -> dict[str, Any]:
    if path.exists():
        saved = json.loads(path.read_text())
        return {**saved["plain"], "source": f"{path.name} from bench/accuracy.py ({saved.get('measured')})"}
    return {**central_from_run_config(config, group_by_length=False), "source": "trained by this run"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, help="federated rounds (default: the demo's)")
    parser.add_argument("--local-epochs", type=float, help="local epochs per round (default: the demo's)")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--central-json", type=Path, default=WORK / "central.json")
    parser.add_argument("--no-write", action="store_true", help="print the keys, leave docs/ alone (smoke runs)")
    parser.add_argument(
        "--collect",
        metavar="STAMP",
        help="do not train: rebuild the results from the run folders "
        "of an earlier (possibly interrupted) run, bench/_work/runs/privacy-STAMP-*; variants that "
        "did not finish are reported as missing",
    )
    parser.add_argument(
        "--resume",
        metavar="STAMP",
        help="finish an interrupted run: keep the variants of "
        "bench/_work/runs/privacy-STAMP-* that finished, run the others (a half-written run "
        "folder is moved aside first)",
    )
    parser.add_argument(
        "--timing-pairs",
        type=int,
        default=2,
        help="extra short (plain, secagg) pairs, in "
        "alternating order, for secagg_over_plain_round_time (default 2; the key is the median "
        "ratio over these and the main pair)",
    )
    parser.add_argument("--timing-rounds", type=int, default=5, help="rounds per timing federation (default 5)")
    parser.add_argument("--work", type=Path, default=WORK, help="the bench work folder (with --collect)")
    parser.add_argument(
        "--dp-only", action="store_true", help="run only the DP section (zero-shot head, dp-eps8, dp-eps1)"
    )
    parser.add_argument(
        "--secagg-active-only",
        action="store_true",
        help="run only signed SecAgg+ against SecAgg+ (--timing-pairs pairs of --timing-rounds rounds)",
    )
    args = parser.parse_args()
    if args.collect and args.resume:
        parser.error("--collect and --resume exclude each other")

    config = default_run_config()
    if args.rounds:
        config["num-rounds"] = args.rounds
    if args.local_epochs:
        config["local-epochs"] = args.local_epochs
    for key in ("data-path", "labels-file", "central-eval-path"):
        config[key] = str(resolve_path(config[key]))
    work = args.work if args.collect else WORK
    stamp = args.collect or args.resume or time.strftime("%Y%m%d-%H%M%S")
    audit = work / f"audit-{stamp}"

    if args.secagg_active_only:
        active_section(config, args.sites, stamp, args.timing_pairs, args.timing_rounds, args.no_write)
        return
    central = central_reference(config, work / "central.json" if args.collect else args.central_json)
    if args.dp_only or not args.collect:
        dp_section(config, central, args.sites, stamp, args.no_write)
    if args.dp_only:
        return
    runs: dict[str, dict[str, Any]] = {}
    resumed: list[str] = []
    for name in VARIANTS:
        result, ran = from_disk_or_run(
            work / "runs" / f"privacy-{stamp}-{name}",
            bool(args.collect),
            lambda: run_variant(name, config, args.sites, stamp, audit if name == "plain" else None),
        )
        if result is not None:
            runs[name] = result
        if ran and args.resume:
            resumed.append(name)
    missing = [name for name in VARIANTS if name not in runs]
    pairs = timing_pairs(config, args.sites, stamp, args.timing_pairs, args.timing_rounds, work, bool(args.collect))
    if "plain" in runs and "secagg" in runs:
        pairs.insert(0, {"plain": runs["plain"], "secagg": runs["secagg"]})
    pair_ratios = [round_time_ratio(p) for p in pairs]
    last = runs["plain"]["rounds"]
    plain_error = [averaging_error(audit, Path(runs["plain"]["run_dir"]), r)["relative_error"] for r in (1, last)]

    r = runs
    candidates = {
        "secagg_over_plain_accuracy": (
            ("secagg", "plain"),
            lambda: r["secagg"]["accuracy"] / r["plain"]["accuracy"],
            4,
        ),
        "ffa_secagg_over_central_accuracy": (
            ("ffa-secagg",),
            lambda: r["ffa-secagg"]["accuracy"] / central["accuracy"],
            4,
        ),
        "secagg_over_plain_round_time": (("secagg", "plain"), lambda: statistics.median(pair_ratios), 3),
        "ffa_over_lora_upload_bytes": (
            ("ffa-secagg", "secagg"),
            lambda: r["ffa-secagg"]["upload_bytes_per_site_round"] / r["secagg"]["upload_bytes_per_site_round"],
            4,
        ),
        "ffa_full_head_secagg_over_central_accuracy": (
            ("ffa-full-head",),
            lambda: r["ffa-full-head"]["accuracy"] / central["accuracy"],
            4,
        ),
        "ffa_full_head_over_lora_upload_bytes": (
            ("ffa-full-head", "secagg"),
            lambda: r["ffa-full-head"]["upload_bytes_per_site_round"] / r["secagg"]["upload_bytes_per_site_round"],
            4,
        ),
        "plain_fedavg_delta_w_relative_error": (("plain",), lambda: plain_error[-1], 5),
    }
    keys = {k: round(fn(), digits) for k, (needs, fn, digits) in candidates.items() if all(n in runs for n in needs)}
    (WORK / f"privacy-{stamp}.json").write_text(
        json.dumps(
            {
                "central": central,
                "runs": runs,
                "keys": keys,
                "timing_pairs": pairs,
                "round_time_ratios": pair_ratios,
                "plain_error_rounds_1_last": plain_error,
            },
            indent=2,
        )
    )
    rows = "\n".join(
        f"| {name} | {v['accuracy']:.4f} | {v['accuracy'] / central['accuracy']:.4f} | {v['macro_f1']:.4f} | "
        f"{v['epsilon']:.2f} | {v['round_seconds_median']:.1f} | {v['upload_bytes_per_site_round']:,.0f} | {v['rounds']} |"
        if v["epsilon"]
        else f"| {name} | {v['accuracy']:.4f} | {v['accuracy'] / central['accuracy']:.4f} | {v['macro_f1']:.4f} | - | "
        f"{v['round_seconds_median']:.1f} | {v['upload_bytes_per_site_round']:,.0f} | {v['rounds']} |"
        for name, v in runs.items()
    )
    targets = {
        "secagg_over_plain_accuracy": ">= 0.99",
        "secagg_over_plain_round_time": "<= 1.10",
        "ffa_over_lora_upload_bytes": "<= 0.55",
    }
    key_rows = "\n".join(
        f"| `{k}` | {keys[k] if k in keys else 'not measured'} | {targets.get(k, '')} |" for k in candidates
    )
    timing_note = f" (the extra pairs ran in the `--resume {stamp}` process)" if args.resume and not resumed else ""
    md = f"""## Privacy: SecAgg+, FFA-LoRA and DP on the demo workload (`bench/privacy.py`)

Banking77 test split, {args.sites} sites, Dirichlet alpha={config["dirichlet-alpha"]}, {config["num-rounds"]} rounds x
{config["local-epochs"]:g} local epochs, MiniLM + LoRA r={config["lora-r"]}, the demo's FedAvg recipe. Central reference:
plain peft + transformers on all training data, accuracy {central["accuracy"]:.4f} ({central["source"]}).
`ffa-secagg` is FFA-LoRA with `ffa-head-rank = {HEAD_RANK}`: the 77-way head is B_h A_h with A_h frozen at the
shared seed like every other A, so only B and B_h travel; `ffa-full-head` is the paper's recipe, where the
whole head (29,645 of LoRA's 103,373 values) travels and caps FFA's saving at 36 %.
DP runs are in the next section.

| run | test accuracy | / central | macro-F1 | epsilon | median round (s) | upload B/site/round | rounds |
|---|---|---|---|---|---|---|---|
{rows}

| key | value | target |
|---|---|---|
{key_rows}

Round time is the median over rounds of the coordinator's wall time per round (training, SecAgg+ stages,
per-site evaluation). `secagg_over_plain_round_time` is the median of the secagg/plain ratios of
{len(pair_ratios)} pairs: the main one above and {len(pair_ratios) - 1} pairs of {args.timing_rounds}-round federations run after the
variants, in alternating order ({", ".join(f"{x:.3f}" for x in pair_ratios)}){timing_note}; local training dominates a round, and
one pair can be tilted by noise on a shared machine. Upload counts every byte a site sends in a training round (under SecAgg+: its
public keys, encrypted shares, masked vector and unmasking shares), as protobuf on the wire;
`ffa_over_lora_upload_bytes` compares `ffa-secagg` with `secagg`, both under SecAgg+.

Why FFA-LoRA: plain FedAvg averages A and B separately, and avg(B) avg(A) is not avg(B A). In the
`plain` run, the relative Frobenius error ||avg(B) avg(A) - avg(B A)|| / ||avg(B A)|| over all LoRA
layers was {plain_error[0]:.4f} after round 1 and {plain_error[-1]:.4f} after round {last} (computed from the
sites' own adapters, written locally by the audit hook). With FFA-LoRA A is shared and frozen, so the
error is zero up to SecAgg+'s quantisation (`tests/test_ffa_lora.py` checks it exactly).
"""
    if resumed:
        md += (
            f"\nThis run was interrupted and finished with `--resume {stamp}`: {', '.join(resumed)} ran in the "
            f"second process ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}), the other variants in the "
            f"first. "
            + (
                "`secagg_over_plain_round_time` compares runs from different processes.\n"
                if len({"secagg", "plain"} & set(resumed)) == 1
                else "`secagg_over_plain_round_time` compares two runs from the same process.\n"
            )
        )
    if missing:
        md += (
            f"\nNot measured in this run: {', '.join(missing)} (the run was stopped before these variants "
            f"finished; results rebuilt from its run folders with `--collect {stamp}`).\n"
        )
    print(json.dumps(keys, indent=2))
    if not args.no_write:
        update_results("privacy", keys, md)


def zero_shot_head_accuracy(config: dict[str, Any]) -> dict[str, float]:
    """Test metrics of the label-name head on the untrained model, built as the DP recipe
    builds it: the floor DP starts from."""
    from fedtune.config import RunSettings
    from fedtune.data import load_examples
    from fedtune.encoding import make_encoder
    from fedtune.evaluation import evaluate
    from fedtune.model import build_lora_model, load_tokenizer

    settings = RunSettings.from_run_config({**config, **DP_VARIANTS["dp-eps8"], "head-init": "label-names"})
    labels = settings.label_list()  # the DP recipe's head: its input (head-input = auto) as well as its start
    model = build_lora_model(settings.base_model, settings.task, settings.lora_settings(), labels, settings.seed)
    examples = load_examples(settings.central_eval_path, settings, labels)
    return evaluate(model, make_encoder(load_tokenizer(settings.base_model), examples, settings.max_length))


def dp_section(config: dict[str, Any], central: dict[str, Any], sites: int, stamp: str, no_write: bool) -> None:
    """The recommended DP recipes, per-site (local) and distributed through SecAgg+, at
    epsilon 8 and 1, and the label-name head's zero-shot floor."""
    zero_shot = zero_shot_head_accuracy(config)
    print(f"== zero-shot label-name head: {zero_shot}", flush=True)
    runs: dict[str, dict[str, Any]] = {}
    for name in {**DP_VARIANTS, **DISTRIBUTED_VARIANTS}:
        result, _ = from_disk_or_run(
            WORK / "runs" / f"privacy-{stamp}-{name}", False, lambda: run_variant(name, config, sites, stamp, None)
        )
        assert result is not None  # never collecting here: run when not on disk
        runs[name] = result
    ratio = {name: round(v["accuracy"] / central["accuracy"], 4) for name, v in runs.items()}
    keys = {
        "dp_zero_shot_head_accuracy": round(zero_shot["accuracy"], 4),
        "dp_eps8_over_central_accuracy": ratio["dp-eps8"],
        "dp_eps1_over_central_accuracy": ratio["dp-eps1"],
        "distributed_dp_eps8_over_central_accuracy": ratio["ddp-eps8"],
        "distributed_dp_eps1_over_central_accuracy": ratio["ddp-eps1"],
    }
    targets = {"dp_eps8_over_central_accuracy": ">= 0.90", "dp_eps1_over_central_accuracy": ">= 0.70"}
    rows = "\n".join(
        f"| {name} | {v['accuracy']:.4f} | {ratio[name]:.4f} | {v['macro_f1']:.4f} | {v['epsilon']:.2f} | "
        f"{f'{own:.2f}' if (own := v['epsilon_own_noise']) else '-'} | {v['round_seconds_median']:.1f} | "
        f"{v['wall_seconds'] / 60:.1f} | {v['rounds']} |"
        for name, v in runs.items()
    )
    recipe = {
        k: config[k]
        for k in (
            "dp-head-only",
            "dp-batch-size",
            "dp-learning-rate",
            "dp-local-epochs",
            "dp-max-grad-norm",
            "num-rounds",
        )
    }
    distributed = {k: v for k, v in DISTRIBUTED_RECIPE.items() if k not in DP_RECIPE}
    md = (
        f"""## Differential privacy: the recommended recipes on the demo workload (`bench/privacy.py`)

Banking77, {sites} sites, Dirichlet alpha={config["dirichlet-alpha"]}, MiniLM, SecAgg+ on. Both recipes train
the classification head only, a linear probe on the frozen base (its features computed once per site and
run) that reads tanh of the [CLS] state (`head-input = auto`), started from the label-name head
(`head-init = auto`); Opacus does the per-example clipping
(`dp-max-grad-norm` = {config["dp-max-grad-norm"]}) and Poisson sampling; noise is set so that each site spends
its target epsilon over the whole run at delta = {DELTA:g}. Only the head (29,645 values) travels.

- `dp-*`, per-site (local) DP, the pyproject defaults: each site runs DP-SGD (AdamW, RDP accountant) on its
  own, {", ".join(f"`{k}` = {v}" for k, v in recipe.items())}. A site's records are only in its own data, and
  its own noise protects them whatever the others do: its epsilon is the guarantee.
- `ddp-*`, distributed DP through SecAgg+ (Kairouz et al. 2021): one DP-SGD step of the whole federation per
  round; each site adds N(0, sigma^2 C^2 / t), t the SecAgg+ reconstruction threshold (2 of 3 sites here, so
  the 3-site sum carries 1.5x the variance needed), and the coordinator's Adam steps on the unmasked mean
  gradient: {", ".join(f"`{k}` = {v}" for k, v in distributed.items())}. Its epsilon is that of central DP-SGD
  over all sites' records and holds if the sites add their shares and the coordinator sees only the SecAgg+
  sum; "own-noise epsilon" is the worst site's epsilon counting only its own shares (the guarantee if every
  other site and the coordinator collude).

The epsilon column is the worst site's, by its own accountant. Central reference: plain peft + transformers
on all training data, accuracy {central["accuracy"]:.4f} ({central["source"]}).

Zero-shot label-name head (no training, no site data): test accuracy {zero_shot["accuracy"]:.4f}
(macro-F1 {zero_shot["macro_f1"]:.4f}).

| run | test accuracy | / central | macro-F1 | epsilon | own-noise epsilon | median round (s) | wall (min) | rounds |
|---|---|---|---|---|---|---|---|---|
{rows}

| key | value | target |
|---|---|---|
"""
        + "\n".join(f"| `{k}` | {v} | {targets.get(k, '')} |" for k, v in keys.items())
        + "\n"
    )
    print(json.dumps(keys, indent=2), flush=True)
    if not no_write:
        update_results("privacy-dp", keys, md)


def active_section(config: dict[str, Any], sites: int, stamp: str, pairs: int, rounds: int, no_write: bool) -> None:
    """Signed SecAgg+ (`secagg-active`) against today's SecAgg+, on the demo workload: short
    federations in (secagg, secagg-active) pairs, run back to back in alternating order."""
    from fedtune.client.deployment import site_keypair

    peers = WORK / f"peers-{stamp}"
    if not peers.exists():
        for i in range(sites):
            site_keypair(peers, f"site-{i}")
    variants = {"secagg": VARIANTS["secagg"], "secagg-active": {**VARIANTS["secagg"], "secagg-active": True}}
    variants["secagg-active"]["secagg-peers-dir"] = str(peers)
    short = {**config, "num-rounds": rounds}
    runs: list[dict[str, dict[str, Any]]] = []
    for i in range(pairs):
        pair: dict[str, dict[str, Any]] = {}
        for name in list(variants) if i % 2 == 0 else list(variants)[::-1]:
            label = f"active{i + 1}-{name}"
            result, _ = from_disk_or_run(
                WORK / "runs" / f"privacy-{stamp}-{label}",
                False,
                lambda: run_variant(label, short, sites, stamp, None, variants[name]),
            )
            assert result is not None  # never collecting here
            pair[name] = result
        runs.append(pair)

    def ratio(field: str) -> list[float]:
        return [p["secagg-active"][field] / p["secagg"][field] for p in runs]

    keys = {
        "secagg_active_over_secagg_round_time": round(statistics.median(ratio("round_seconds_median")), 4),
        "secagg_active_over_secagg_upload_bytes": round(statistics.median(ratio("upload_bytes_per_site_round")), 4),
        "secagg_active_over_secagg_accuracy": round(statistics.median(ratio("accuracy")), 4),
    }
    rows = "\n".join(
        f"| {i + 1} | {name} | {v['accuracy']:.4f} | {v['round_seconds_median']:.1f} | "
        f"{v['upload_bytes_per_site_round'] / 1e6:.4f} | {v['rounds']} |"
        for i, pair in enumerate(runs)
        for name, v in pair.items()
    )
    md = (
        f"""## Signed SecAgg+ against SecAgg+ on the demo workload (`bench/privacy.py --secagg-active-only`)

Banking77, {sites} sites, MiniLM + LoRA as `make demo`, {rounds}-round federations in {pairs} pairs run back to
back in alternating order. `secagg-active` is fedtune's signed SecAgg+ (`server/secagg_active.py`,
`client/secagg_active.py`): each site signs its keys (EC P-384, its SuperNode key) and checks every peer's
signature before the key exchange, and a consistency stage (every survivor signs the survivor list; each
checks t signatures) runs before unmasking. Upload is what each site sends per round, every stage included;
the round time is each federation's median. With the same seed the virtual sites round identically, so the
two protocols give the same aggregate bit for bit (`tests/test_secagg_active.py`) and the same accuracy.

| pair | protocol | test accuracy | median round (s) | upload per site and round (MB) | rounds |
|---|---|---|---|---|---|
{rows}

| key | value |
|---|---|
"""
        + "\n".join(f"| `{k}` | {v} |" for k, v in keys.items())
        + "\n"
    )
    print(json.dumps(keys, indent=2), flush=True)
    if not no_write:
        update_results("privacy-secagg-active", keys, md)


if __name__ == "__main__":
    main()
