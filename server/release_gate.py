"""The coordinator's side of the release gate: one round in which every site scores the
release candidate on its own validation split (`client/release_gate.py`), under SecAgg+
when the run has it, so the coordinator learns the federation's totals only (and the own
drop of each site that chooses to reveal it).

The run folder is the trained run's (`run-name`); the round sends its final adapter (the
PyTorch model the candidate is compared with) and the candidate's names. The decision is
written to `gate.json` and a table to `report.md`; promoting the candidate to a release
is `fedtune gate`'s (the composition root holds the signing key and the registry)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.common import FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid

from fedtune.accelerator import pick_device
from fedtune.adapter_io import load_adapter_arrays
from fedtune.config import RunSettings
from fedtune.errors import FedtuneError
from fedtune.gate_counts import GATE_FILE, GATE_KEY, read_vector
from fedtune.gate_request import GateRequest
from fedtune.model import build_lora_model
from fedtune.run_folder import read_run

from .polling_grid import FastPollingGrid, one_line
from .run_dir import RunDir
from .secure_aggregation import build_secagg_workflow, secagg_census, wait_for_sites
from .traffic import MeteredGrid

log = logging.getLogger("fedtune.server")


@dataclass
class GateOutcome:
    """What the gate round found, and the decision."""

    model: str
    version: str
    passed: bool = False
    reason: str = "no site scored the candidate"
    federation: dict[str, float] = field(default_factory=dict)
    examples: int = 0
    sites: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    secagg: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "candidate": {"model": self.model, "version": self.version},
            "passed": self.passed,
            "reason": self.reason,
            "federation": self.federation,
            "examples": self.examples,
            "sites": self.sites,
            "failures": self.failures,
            "secagg": self.secagg,
        }

    def summary(self) -> str:
        """One line: the release record's `gate` and the log's."""
        return f"{'passed' if self.passed else 'failed'}: {self.reason}"


class GateStrategy(FedAvg):  # type: ignore[misc]
    """FedAvg over the sites' score vectors (under SecAgg+, each result already carries the
    masked sum's mean); then the gate's decision."""

    def __init__(self, settings: RunSettings, num_labels: int, outcome: GateOutcome, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.num_labels = num_labels
        self.outcome = outcome

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        out = self.outcome
        out.failures = [one_line(str(getattr(f, "reason", f))) for f in failures]
        if not results:
            out.reason = "no site scored the candidate" + (f" ({out.failures[0]})" if out.failures else "")
            return None, {}
        params, _ = super().aggregate_fit(server_round, results, failures)
        if params is None:
            return None, {}
        mean = parameters_to_ndarrays(params)[0]
        score = read_vector(mean, self.num_labels)
        drop = round(score.drop_pt, 2) + 0.0  # no "-0.00"
        out.federation = score.to_json()
        out.examples = int(sum(res.num_examples for _, res in results))
        for _, res in results:
            name = str(res.metrics.get("site", "site"))[:128]
            entry: dict[str, float] = {"examples": float(res.num_examples)}
            if "gate_drop_pt" in res.metrics:
                entry["drop_pt"] = float(res.metrics["gate_drop_pt"])
            out.sites[name] = entry
        s = self.settings
        past = sorted(n for n, e in out.sites.items() if e.get("drop_pt", -1e9) > s.gate_site_max_drop_pt)
        if out.failures:
            out.reason = f"{len(out.failures)} site(s) could not score the candidate: {out.failures[0]}"
        elif score.drop_pt > s.gate_max_drop_pt:
            out.reason = (
                f"federation accuracy drop {drop:.2f} pt > gate-max-drop-pt {s.gate_max_drop_pt:g} "
                f"({len(results)} sites, {out.examples} examples)"
            )
        elif past:
            worst = max(out.sites[n]["drop_pt"] for n in past)
            out.reason = (
                f"site {past[0]} drops {worst:.2f} pt > gate-site-max-drop-pt {s.gate_site_max_drop_pt:g} "
                f"(federation {drop:.2f} pt)"
            )
        else:
            out.passed = True
            out.reason = (
                f"federation accuracy drop {drop:.2f} pt <= {s.gate_max_drop_pt:g} pt, agreement "
                f"{score.agreement:.4f}, {len(results)} sites, {out.examples} examples"
            )
        return params, {}


def run_gate(grid: Grid, settings: RunSettings) -> GateOutcome:
    """The gate round for run `run-name`'s final adapter; writes gate.json and the report's table."""
    run_dir = RunDir(Path(settings.output_dir).expanduser().resolve() / settings.run_name)
    if not settings.run_name or not (run_dir.final_dir / "adapter_model.safetensors").exists():
        raise FedtuneError(f"gate: {run_dir.path} holds no final adapter (run-name names the trained run)")
    run = read_run(run_dir.path)
    labels = list(run.labels)
    lora = settings.lora_settings()
    model = build_lora_model(settings.base_model, settings.task, lora, labels, settings.seed).to(pick_device())
    final = load_adapter_arrays(model, run_dir.final_dir, lora)
    outcome = GateOutcome(settings.gate_model, settings.gate_version, secagg=settings.secagg)
    request = GateRequest(settings.gate_model, settings.gate_version, settings.gate_base_version).to_config()
    strategy = GateStrategy(
        settings,
        len(labels) if settings.task == "seq-cls" else 0,  # 0: a causal LM's vector (exact match)
        outcome,
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=settings.min_sites,
        min_available_clients=settings.min_sites,
        initial_parameters=ndarrays_to_parameters(final),
        fit_metrics_aggregation_fn=lambda _: {},  # the gate reads each site's metrics itself
        on_fit_config_fn=lambda r: {
            "server-round": r,
            "num-rounds": 1,
            "labels": json.dumps(labels),
            "run-id": f"{run.run_id}-gate",
            GATE_KEY: request,
        },
    )
    fast = FastPollingGrid(grid)
    polling = MeteredGrid(fast)  # metered: tests watch what travels
    fit_workflow = None
    if settings.secagg:
        nodes = wait_for_sites(polling, settings.min_sites, settings.secagg_timeout)
        census = secagg_census(polling, nodes, settings.secagg_timeout)
        fit_workflow = build_secagg_workflow(settings, settings.secagg_max_weight or census.max_weight)
    log.info("gate: sites score candidate %s %s against round %s's adapter", outcome.model, outcome.version, run.run_id)
    legacy = LegacyContext(context=_context(settings), config=ServerConfig(num_rounds=1), strategy=strategy)
    DefaultWorkflow(fit_workflow=fit_workflow)(polling, legacy)  # type: ignore[arg-type]
    said = [reason for group in fast.refusals.values() for reason in group.values()]
    if not outcome.federation and said:  # SecAgg+ dropped the round before any aggregate
        outcome.failures = list(dict.fromkeys(said))
        outcome.reason = f"no site scored the candidate ({outcome.failures[0]})"
    run_dir.write_json(GATE_FILE, outcome.to_json())
    _append_report(run_dir.path / "report.md", outcome)
    log.info("gate: candidate %s %s %s", outcome.model, outcome.version, outcome.summary())
    return outcome


def _context(settings: RunSettings) -> Any:
    from flwr.common import Context, RecordDict

    return Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=settings.to_run_config())


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _append_report(path: Path, outcome: GateOutcome) -> None:
    """The gate's table at the end of report.md (per site where revealed, federation totals)."""
    f = outcome.federation
    lines = [
        "",
        f"## Release gate: {outcome.model} {outcome.version}",
        "",
        f"**{outcome.summary()}**",
        "",
        "Each site scored the signed candidate on the device runtime against the PyTorch model of the "
        "final round, on its own validation split"
        + (" (the counts travelled under SecAgg+: the coordinator saw their total only)." if outcome.secagg else "."),
        "",
        "| | examples | accuracy or exact match (PyTorch) | (device) | macro-F1 (PyTorch) | macro-F1 (device) "
        "| agreement | drop (pt) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if f:
        lines.append(
            f"| federation | {outcome.examples} | {f['accuracy_torch']:.4f} | {f['accuracy_device']:.4f} | "
            f"{_cell(f.get('macro_f1_torch'))} | {_cell(f.get('macro_f1_device'))} | {f['agreement']:.4f} | "
            f"{f['drop_pt']:.2f} |"
        )
    for name, entry in sorted(outcome.sites.items()):
        drop = f"{entry['drop_pt']:.2f}" if "drop_pt" in entry else "not revealed"
        lines.append(f"| {name} | {int(entry['examples'])} | | | | | | {drop} |")
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
