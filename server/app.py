"""The coordinator's Flower ServerApp.

It runs Flower's legacy `DefaultWorkflow` (the workflow SecAgg+ plugs into as its
fit stage) with a Flower strategy wrapped by `RecordingStrategy`, and ends the run
with a final adapter, plots, a report and a one-line summary.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid, ServerApp

from fedtune import __version__
from fedtune.accelerator import pick_device
from fedtune.adapter_io import adapter_keys, get_adapter_arrays, load_adapter_arrays
from fedtune.config import RunSettings
from fedtune.errors import FedtuneError
from fedtune.internals import flower
from fedtune.logs import setup_logging
from fedtune.model import LoraSettings, build_lora_model, resolve_model_path
from fedtune.run_budget import BudgetPlan, plan_budget, round_plan_config, sampling_fraction, saved_plan
from fedtune.run_folder import (
    BUDGET_FILE,
    RUN_FILE,
    SECAGG_FILE,
    SUMMARY_FILE,
    RoundRecord,
    RunRecord,
    Summary,
    read_json_file,
    read_run,
)
from fedtune.secagg.masks import install_csprng_masks
from fedtune.site_rank import lora_a_indices, lora_b_indices, lora_pairs

from .central_eval import make_central_evaluator
from .hetero_ranks import RankColumnsStrategy
from .hetero_svd import SvdRanksStrategy
from .polling_grid import FastPollingGrid
from .preflight import check_run_inputs
from .privacy_budget import EpsilonBudgetStrategy, resume_refusal
from .recorder import RecordingStrategy
from .release_gate import run_gate
from .run_dir import RunDir
from .secagg_dropouts import check_workflow_state
from .secure_aggregation import (
    Census,
    build_secagg_workflow,
    secagg_census,
    wait_for_sites,
)
from .strategies import build_strategy
from .strategy_state import (
    check_strategy_state,
    load_strategy_state,
    save_strategy_state,
)
from .tracking import RoundSink, open_tracker
from .traffic import MeteredGrid

log = logging.getLogger("fedtune.server")
setup_logging()

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run` and the Simulation Engine: a training run, or with
    `gate-registry` set, the release gate's round for a trained run (`release_gate.py`)."""
    settings = RunSettings.from_run_config(context.run_config)
    if settings.gate_registry:
        if settings.secagg:
            install_csprng_masks("server")
            check_workflow_state()
            flower.require("masked-vectors")
        flower.require("failure-text")
        run_gate(grid, settings)
    else:
        run_federation(grid, context)


def new_run_id(settings: RunSettings) -> str:
    """The run folder's name: `run-name`, or a timestamp."""
    return settings.run_name or time.strftime("%Y%m%d-%H%M%S")


def run_federation(grid: Grid, context: Context) -> Summary:
    """Run every round (or, with `resume`, the rounds after the last completed one),
    record it, and write the final adapter, plots and report."""
    started = time.monotonic()
    settings = RunSettings.from_run_config(context.run_config)
    labels = settings.label_list()
    run_id = new_run_id(settings)
    run_dir = RunDir(Path(settings.output_dir).expanduser().resolve() / run_id)
    check_run_inputs(settings)  # before round 1 and before anything is written: one line per problem
    if settings.secagg:
        install_csprng_masks("server")  # refuses SecAgg+ before anything is written if Flower would not call them
        check_workflow_state()  # and if its workflow no longer looks as the dropout fix expects
        flower.require("masked-vectors")
    flower.require("failure-text")
    metered = MeteredGrid(FastPollingGrid(grid))  # replies pulled every 0.1 s, stages timed
    census = _census(settings, metered)  # before anything is written: who joins, with how many examples
    plan = _budget_plan(settings, census, run_dir)
    if plan is not None and census is not None:
        settings = _planned_settings(settings, plan, len(census.counts))
    fresh = not run_dir.path.exists()
    run_dir.create()
    try:
        tracker = open_tracker(settings, run_dir.path, run_id)  # refuses in one line before round 1
    except FedtuneError:
        if fresh:
            shutil.rmtree(run_dir.path, ignore_errors=True)  # nothing of this run was written yet
        raise
    log.info("fedtune %s: run %s -> %s", __version__, run_id, run_dir.path)

    lora = settings.lora_settings()  # what the model trains and what travels
    model = build_lora_model(settings.base_model, settings.task, lora, labels, settings.seed).to(pick_device())
    initial = get_adapter_arrays(model, lora)
    adapter_info = _adapter_info(model, initial, lora)
    run = RunRecord(
        settings=settings.to_run_config(),
        labels=list(labels),
        run_id=run_id,
        run_uid=uuid.uuid4().hex,  # kept across resumes; sites key their own state by it
        fedtune_version=__version__,
        base_model=settings.base_model,
        base_model_path=resolve_model_path(settings.base_model),
        task=settings.task,
        system_prompt=settings.system_prompt,
        ffa_head_rank=settings.ffa_head_rank,
        head_input=lora.head_input,
        adapter=adapter_info,
    )
    num_rounds = settings.num_rounds
    done = 0
    if settings.resume:
        done, initial, run = _resume_point(run_dir, settings, model, run)
    else:
        run_dir.write_json(RUN_FILE, run.to_json())
        if plan is not None:
            run_dir.write_json(BUDGET_FILE, {**asdict(plan), "samples": plan.samples})
        run_dir.save_adapter(model, initial, run_dir.round_dir(0), {**run.metadata(), "round": 0}, lora)
    metadata = run.metadata()
    evaluate_fn = make_central_evaluator(
        settings,
        model,
        labels,
        should_run=lambda r: (
            r > 0 and (r == num_rounds or (settings.central_eval_every > 0 and r % settings.central_eval_every == 0))
        ),
    )
    labels_json = json.dumps(labels)

    def fit_config(global_round: int) -> dict[str, Any]:
        # RecordingStrategy passes the run's global round, so LR schedules continue across a resume.
        return {
            "server-round": global_round,
            "num-rounds": num_rounds,
            "labels": labels_json,
            "run-id": f"{run_id}-{run.run_uid[:12]}",
            **(round_plan_config(plan) if plan is not None else {}),
        }

    flower_strategy = build_strategy(settings, ndarrays_to_parameters(initial), evaluate_fn, fit_config, fit_config)
    check_strategy_state(flower_strategy)  # before round 1: Flower still keeps its state where we save it from

    def save_round(global_round: int, arrays: list[np.ndarray]) -> None:
        folder = run_dir.round_dir(global_round)
        run_dir.save_adapter(model, arrays, folder, {**metadata, "round": global_round}, lora)
        save_strategy_state(flower_strategy, folder)

    inner: Any = flower_strategy
    if settings.hetero_ranks:  # sites of different LoRA ranks
        keys = adapter_info["keys"]
        if settings.hetero_aggregation == "svd":
            inner = SvdRanksStrategy(inner, lora_pairs(keys), initial, settings.lora_r)
        else:  # padding: each column of B (row of A) averaged over the sites that trained it
            inner = RankColumnsStrategy(inner, lora_b_indices(keys), initial, lora_a_indices(keys))
    if settings.resume:
        restored = load_strategy_state(flower_strategy, run_dir.round_dir(done))
        if restored:
            log.info("resume: restored strategy state %s from round %d", ", ".join(restored), done)
    if settings.dp:
        inner = EpsilonBudgetStrategy(inner, settings.dp_epsilon_budget, settings.dp_delta)
        inner.worst_epsilon = max((r.dp_epsilon_max or 0.0 for r in run_dir.read_rounds()), default=0.0)
    sink = RoundSink(run_dir.append_round, run_dir.read_rounds, tracker, settings, run_dir.path, run_id, adapter_info)
    strategy = RecordingStrategy(
        inner,
        metered,
        sink,
        save_round,
        num_rounds - done,
        round_offset=done,
        surviving_sites_floor=2 if settings.secagg else 1,
    )
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=num_rounds - done), strategy=strategy)
    fit_workflow = _secagg_fit_workflow(settings, census, run_dir, strategy)
    DefaultWorkflow(fit_workflow=fit_workflow)(metered, legacy)  # type: ignore[arg-type]
    strategy.flush()

    records = run_dir.read_rounds()
    final_arrays = [np.asarray(a) for a in _final_arrays(strategy, initial)]
    run_dir.save_adapter(
        model, final_arrays, run_dir.final_dir, {**metadata, "round": records[-1].round if records else 0}, lora
    )
    central = next((r.central for r in reversed(records) if r.central), None)
    if central is None and evaluate_fn is not None and records and records[-1].round < num_rounds:
        # The run stopped early (DP budget): evaluate the final adapter now.
        result = evaluate_fn(num_rounds, final_arrays, {})
        central = {k: float(v) for k, v in result[1].items()} if result else None
    summary = Summary(
        run_id=run_id,
        run_dir=str(run_dir.path),
        rounds=len(records),
        central=central,
        site_validation=records[-1].aggregate if records else {},
        seconds=round(time.monotonic() - started, 2),
    )
    run_dir.write_json(SUMMARY_FILE, summary.to_json())
    sink.finish(summary)  # the final plots and report, and the tracker's artefacts
    line = _summary_line(summary, settings.task)
    if settings.task == "causal-lm":  # how much training that was: a short run says so
        line += " | " + _training_spent(records, plan.site_batch if plan else settings.batch_size, census, settings)
    log.info(line)
    return summary


def _training_spent(records: list[RoundRecord], batch: int, census: Census | None, settings: RunSettings) -> str:
    """The training samples the sites reported (steps x batch), in epochs of their data
    where the census counted it; without a budget, where to find one."""
    steps = sum(record.local_steps for record in records)
    samples = steps * (settings.dp_batch if settings.dp else batch)
    text = f"{samples:,} training samples"
    if census is not None and sum(census.counts):
        text += f" = {samples / sum(census.counts):.2f} epochs of the sites' data"
    if not settings.budget_epochs:
        text += " (train-epochs is off: a set number of rounds x local steps)"
    return text


def _resume_point(
    run_dir: RunDir, settings: RunSettings, model: Any, fresh: RunRecord
) -> tuple[int, list[np.ndarray], RunRecord]:
    """The last completed round, its global adapter and the run's record (its uid kept);
    refuses a run whose model, task, labels or LoRA settings differ from the ones being
    resumed. A key the saved run lacks (added to fedtune after it started) is compared
    against the key's one declared default, the value that run used."""
    saved = read_run(run_dir.path)
    now, defaults = settings.to_run_config(), RunSettings().to_run_config()
    for key in (
        "model",
        "task",
        "lora-r",
        "lora-alpha",
        "lora-target-modules",
        "ffa-lora",
        "ffa-head-rank",
        "seed",
        "num-rounds",
    ):
        was = saved.settings.get(key, defaults[key])
        if was != now[key]:
            raise FedtuneError(f"cannot resume {run_dir.path}: '{key}' was {was!r}, now {now[key]!r}")
    if saved.labels != fresh.labels:
        raise FedtuneError(f"cannot resume {run_dir.path}: the label set differs from the run's")
    saved.run_uid = saved.run_uid or fresh.run_uid
    records = run_dir.read_rounds()
    done = records[-1].round if records else 0
    if done >= settings.num_rounds:
        raise FedtuneError(f"cannot resume {run_dir.path}: all {settings.num_rounds} rounds are already done")
    refusal = resume_refusal(run_dir.path, records, settings.dp, settings.dp_epsilon_budget)
    if refusal:
        raise FedtuneError(refusal)
    folder = run_dir.round_dir(done)
    arrays = load_adapter_arrays(model, folder, settings.lora_settings())
    log.info(
        "resume: run %s continues after round %d (rounds %d-%d to go), from %s",
        run_dir.path.name,
        done,
        done + 1,
        settings.num_rounds,
        folder,
    )
    saved.resumed.append({"after_round": done, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    run_dir.write_json(RUN_FILE, saved.to_json())
    return done, arrays, saved


def _census(settings: RunSettings, grid: MeteredGrid) -> Census | None:
    """Before round 1, when SecAgg+ (its max weight) or a budget (its plan) needs them: the
    connected sites' example counts, and the sites that refuse the run and why."""
    if not (settings.secagg or settings.budget_epochs):
        return None
    nodes = wait_for_sites(grid, settings.min_sites, settings.secagg_timeout)
    settings.check_for_sites(len(nodes))
    return secagg_census(grid, nodes, settings.secagg_timeout)


def _budget_plan(settings: RunSettings, census: Census | None, run_dir: RunDir) -> BudgetPlan | None:
    """`train-epochs` turned into rounds, steps and the sites' batch, from the census; a
    resumed run goes on with the plan it started with (budget.json), whatever the census
    says now, so that a site joining or a count changing between the crash and the resume
    does not change the run under it."""
    if not settings.budget_epochs or census is None:
        return None
    saved = run_dir.path / BUDGET_FILE
    if settings.resume and saved.is_file():
        try:
            plan = saved_plan(read_json_file(saved))
        except FedtuneError as exc:
            raise FedtuneError(f"cannot resume {run_dir.path}: {exc}") from None
        log.info("train-epochs: resuming the run's plan, %s", plan.describe())
        return plan
    plan = plan_budget(
        settings.budget_epochs,
        census.counts,
        settings.batch_size,
        settings.budget_local_steps,
        settings.budget_max_rounds,
        settings.fraction_train,
        settings.budget_server_rate_value,
        settings.min_sites,
        settings.budget_min_site_batch,
    )
    log.info("train-epochs: %s", plan.describe())
    return plan


def _planned_settings(settings: RunSettings, plan: BudgetPlan, sites: int) -> RunSettings:
    """The run's settings under the plan: its rounds, local steps and the share of the
    `sites` sampled each round; with fedavg and a server rate other than 1, FedAvgM stepping
    that rate on the mean update (no momentum)."""
    settings = replace(settings, num_rounds=plan.num_rounds, local_steps=plan.local_steps)
    if plan.sites_per_round < sites:
        settings = replace(settings, fraction_train=sampling_fraction(plan.sites_per_round, sites))
    if settings.strategy != "fedavg" or plan.server_rate == 1:
        return settings
    return replace(settings, strategy="fedavgm", server_learning_rate=plan.server_rate, server_momentum=0.0)


def _secagg_fit_workflow(
    settings: RunSettings, census: Census | None, run_dir: RunDir, strategy: RecordingStrategy
) -> Any:
    """SecAgg+ as the fit stage when `secagg` is on; None keeps Flower's plain fit. The
    census leaves the sites that refuse the run out of every round, with their reasons."""
    if census is not None:
        strategy.leave_out(census.refused)
    if not settings.secagg or census is None:
        return None
    max_weight = settings.secagg_max_weight or census.max_weight
    run_dir.write_json(
        SECAGG_FILE,
        {
            "sites_at_start": len(census.counts) + len(census.refused),
            "max_weight": max_weight,
            "masks": "ChaCha20 keyed by SHA-256(shared secret)",
            "refused_at_census": sorted(census.refused.values()),
            **{k: v for k, v in settings.to_run_config().items() if k.startswith("secagg-")},
        },
    )
    return build_secagg_workflow(settings, max_weight)


def _final_arrays(strategy: RecordingStrategy, initial: list[np.ndarray]) -> list[np.ndarray]:
    from flwr.common import parameters_to_ndarrays

    if strategy.latest_parameters is None:
        return initial
    return parameters_to_ndarrays(strategy.latest_parameters)


def _adapter_info(model: Any, arrays: list[np.ndarray], lora: LoraSettings) -> dict[str, Any]:
    num_params = int(sum(a.size for a in arrays))
    total = int(sum(p.numel() for p in model.parameters()))
    # The plain model's size: no LoRA factors, and peft's trainable head copy counted once.
    extra = int(sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or "modules_to_save" in n))
    return {
        "keys": adapter_keys(model, lora),
        "ffa_lora": lora.freeze_a,
        "head_only": lora.head_only,
        "num_tensors": len(arrays),
        "num_params": num_params,
        "bytes_fp32": num_params * 4,
        "model_params": total,
        "base_model_params": total - extra,
        "fraction_of_model": num_params / total,
        "target_modules": sorted(model.peft_config["default"].target_modules),
    }


def _summary_line(summary: Summary, task: str) -> str:
    central = summary.central or {}
    if task == "seq-cls" and "accuracy" in central:
        result = f"test accuracy {central['accuracy']:.4f} (macro-F1 {central['macro_f1']:.4f})"
    elif "exact_match" in central:
        result = (
            f"test exact match {central['exact_match']:.4f} ({int(central.get('generated', 0))} greedy completions), "
            f"perplexity {central['perplexity']:.3f}"
        )
    elif "perplexity" in central:
        result = f"test perplexity {central['perplexity']:.3f}"
    else:
        result = "no held-out evaluation"
    return f"fedtune: done in {summary.seconds:.0f}s, {summary.rounds} rounds | {result} | run folder {summary.run_dir}"
