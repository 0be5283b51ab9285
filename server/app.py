"""The coordinator's Flower ServerApp.

It runs Flower's legacy `DefaultWorkflow` (the workflow SecAgg+ plugs into as its
fit stage) with a Flower strategy wrapped by `RecordingStrategy`, and ends the run
with a final adapter, plots, a report and a one-line summary.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid, ServerApp

from fedtune import __version__
from fedtune.adapter_io import adapter_keys, get_adapter_arrays
from fedtune.config import RunSettings
from fedtune.logs import setup_logging
from fedtune.device import pick_device
from fedtune.errors import FedtuneError
from fedtune.model import build_lora_model, resolve_model_path
from fedtune.secure_masks import install_csprng_masks
from server.central_eval import make_central_evaluator
from server.plots import save_plots
from server.privacy_budget import EpsilonBudgetStrategy
from server.recorder import RecordingStrategy
from server.report import write_report
from server.run_dir import RunDir
from server.secure_aggregation import build_secagg_workflow, census_max_weight, check_secagg_settings, wait_for_sites
from server.strategies import build_strategy
from server.traffic import MeteredGrid

log = logging.getLogger("fedtune.server")
setup_logging()

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run` and the Simulation Engine."""
    run_federation(grid, context)


def new_run_id(settings: RunSettings) -> str:
    """The run folder's name: `run-name`, or a timestamp."""
    return settings.run_name or time.strftime("%Y%m%d-%H%M%S")


def run_federation(grid: Grid, context: Context) -> dict[str, Any]:
    """Run every round, record it, and write the final adapter, plots and report."""
    started = time.monotonic()
    settings = RunSettings.from_run_config(context.run_config)
    labels = settings.label_list()
    run_id = new_run_id(settings)
    run_dir = RunDir(Path(settings.output_dir).expanduser().resolve() / run_id)
    if run_dir.metrics_file.exists():
        raise FedtuneError(f"run folder {run_dir.path} already holds a run; choose another run-name")
    run_dir.create()
    log.info("fedtune %s: run %s -> %s", __version__, run_id, run_dir.path)

    ffa = settings.ffa_lora
    model = build_lora_model(settings.model, settings.task, settings.lora_settings(), labels, settings.seed).to(pick_device())
    initial = get_adapter_arrays(model, ffa)
    adapter_info = _adapter_info(model, initial, ffa)
    metadata = {
        "fedtune_version": __version__,
        "base_model": settings.model,
        "base_model_path": resolve_model_path(settings.model),
        "task": settings.task,
        "labels": labels,
        "run_id": run_id,
    }
    run_dir.write_json("run.json", {**metadata, "settings": settings.to_run_config(), "adapter": adapter_info})

    run_dir.save_adapter(model, initial, run_dir.round_dir(0), {**metadata, "round": 0}, ffa)

    def save_round(server_round: int, arrays: list[np.ndarray]) -> None:
        run_dir.save_adapter(model, arrays, run_dir.round_dir(server_round), {**metadata, "round": server_round}, ffa)

    num_rounds = settings.num_rounds
    evaluate_fn = make_central_evaluator(
        settings,
        model,
        labels,
        should_run=lambda r: r == num_rounds or (settings.central_eval_every > 0 and r > 0 and r % settings.central_eval_every == 0),
    )
    labels_json = json.dumps(labels)

    def fit_config(server_round: int) -> dict[str, Any]:
        return {"server-round": server_round, "num-rounds": num_rounds, "labels": labels_json}

    inner = build_strategy(settings, ndarrays_to_parameters(initial), evaluate_fn, fit_config, fit_config)
    if settings.dp:
        inner = EpsilonBudgetStrategy(inner, settings.dp_epsilon_budget, settings.dp_delta)
    metered = MeteredGrid(grid)
    strategy = RecordingStrategy(inner, metered, run_dir.append_metrics, save_round, num_rounds)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=num_rounds), strategy=strategy)
    fit_workflow = _secagg_fit_workflow(settings, metered, run_dir)
    DefaultWorkflow(fit_workflow=fit_workflow)(metered, legacy)  # type: ignore[arg-type]
    strategy.flush()

    records = run_dir.read_metrics()
    final_arrays = [np.asarray(a) for a in _final_arrays(strategy, initial)]
    run_dir.save_adapter(model, final_arrays, run_dir.final_dir, {**metadata, "round": len(records)}, ffa)
    central = next((r["central"] for r in reversed(records) if r.get("central")), None)
    if central is None and evaluate_fn is not None and records and records[-1]["round"] < num_rounds:
        # The run stopped early (DP budget): evaluate the final adapter now.
        result = evaluate_fn(num_rounds, final_arrays, {})
        central = {k: float(v) for k, v in result[1].items()} if result else None
    summary = {
        "run_id": run_id,
        "run_dir": str(run_dir.path),
        "rounds": len(records),
        "central": central,
        "seconds": round(time.monotonic() - started, 2),
    }
    plots = save_plots(records, run_dir.path, settings.task)
    write_report(run_dir.path / "report.md", settings, records, summary, plots, adapter_info)
    run_dir.write_json("summary.json", summary)
    log.info(_summary_line(summary, settings.task))
    return summary


def _secagg_fit_workflow(settings: RunSettings, grid: MeteredGrid, run_dir: RunDir) -> Any:
    """SecAgg+ as the fit stage when `secagg` is on; None keeps Flower's plain fit."""
    if not settings.secagg:
        return None
    install_csprng_masks("server")
    nodes = wait_for_sites(grid, settings.min_sites, settings.secagg_timeout)
    check_secagg_settings(settings, len(nodes))
    max_weight = settings.secagg_max_weight or census_max_weight(grid, nodes, settings.secagg_timeout)
    run_dir.write_json("secagg.json", {
        "sites_at_start": len(nodes), "max_weight": max_weight, "masks": "ChaCha20 keyed by SHA-256(shared secret)",
        **{k: v for k, v in settings.to_run_config().items() if k.startswith("secagg-")},
    })
    return build_secagg_workflow(settings, max_weight)


def _final_arrays(strategy: RecordingStrategy, initial: list[np.ndarray]) -> list[np.ndarray]:
    from flwr.common import parameters_to_ndarrays

    if strategy.latest_parameters is None:
        return initial
    return parameters_to_ndarrays(strategy.latest_parameters)


def _adapter_info(model: Any, arrays: list[np.ndarray], frozen_a: bool) -> dict[str, Any]:
    num_params = int(sum(a.size for a in arrays))
    total = int(sum(p.numel() for p in model.parameters()))
    # The plain model's size: no LoRA factors, and peft's trainable head copy counted once.
    extra = int(sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or "modules_to_save" in n))
    return {
        "keys": adapter_keys(model, frozen_a),
        "ffa_lora": frozen_a,
        "num_tensors": len(arrays),
        "num_params": num_params,
        "bytes_fp32": num_params * 4,
        "model_params": total,
        "base_model_params": total - extra,
        "fraction_of_model": num_params / total,
        "target_modules": sorted(model.peft_config["default"].target_modules),
    }


def _summary_line(summary: dict[str, Any], task: str) -> str:
    central = summary.get("central") or {}
    if task == "seq-cls" and "accuracy" in central:
        result = f"test accuracy {central['accuracy']:.4f} (macro-F1 {central['macro_f1']:.4f})"
    elif "perplexity" in central:
        result = f"test perplexity {central['perplexity']:.3f}"
    else:
        result = "no held-out evaluation"
    return f"fedtune: done in {summary['seconds']:.0f}s, {summary['rounds']} rounds | {result} | run folder {summary['run_dir']}"
