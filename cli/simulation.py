"""The simulation launcher, one of fedtune's two composition roots (with the CLI): it
wires the coordinator's ServerApp and the site's ClientApp into Flower's Simulation
Engine (Ray) on one machine, N virtual sites, each one partition of the data set."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from fedtune.config import RunSettings, default_run_config
from fedtune.flower_env import SIMULATION_ENV, apply_env
from fedtune.run_config_table import flat_table

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp


def _write_app_config(directory: Path, config: Mapping[str, Any]) -> None:
    lines = [
        "[project]",
        'name = "fedtune-sim"',
        'version = "0.0.0"',
        "",
        "[tool.flwr.app]",
        'publisher = "fedtune"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "server.flower_app:app"',
        'clientapp = "client.flower_app:app"',
        "",
        "[tool.flwr.app.config]",
    ]
    (directory / "pyproject.toml").write_text("\n".join(lines) + "\n" + flat_table(config), encoding="utf-8")


def run_simulation(
    overrides: Mapping[str, Any],
    num_sites: int,
    verbose: bool = False,
    client_app: ClientApp | None = None,
    server_app: ServerApp | None = None,
) -> RunSettings:
    """Run the ServerApp and `num_sites` ClientApps in this process's Simulation Engine.

    Overrides are validated first, so a bad value fails before Ray starts. `client_app`
    and `server_app` default to the product's; tests pass a ClientApp wrapped with their
    own mods, or a ServerApp of their own (a coordinator that cheats).
    """
    apply_env(SIMULATION_ENV)
    config = {**default_run_config(), **overrides}
    settings = RunSettings.from_run_config(config)
    _check_inputs(settings, num_sites)

    from flwr.app import Context, RecordDict
    from flwr.common.constant import (
        RUN_ID_NUM_BYTES,
        SUPERLINK_NODE_ID,
        TASK_ID_NUM_BYTES,
    )
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes

    from fedtune.internals import flower

    flower.require("run-simulation", "task-identity")
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    if client_app is None:
        from fedtune.client.app import app as client_app
    if server_app is None:
        from fedtune.server.app import app as server_app

    if not verbose:
        flwr_log = logging.getLogger("flwr")
        flwr_log.setLevel(logging.WARNING)
        flwr_log.addFilter(SiteRefusalFilter())
    full_config = settings.to_run_config()
    cpus = os.cpu_count() or 1
    gpus = _gpu_count()
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": cpus, "num_gpus": 1.0 if gpus else 0.0},
        "init_args": {
            "num_cpus": cpus,
            "num_gpus": gpus,
            "logging_level": "ERROR",
            "log_to_driver": True,
            "include_dashboard": False,
            "_node_ip_address": "127.0.0.1",
        },  # keep Ray's traffic on loopback
    }
    with tempfile.TemporaryDirectory(prefix="fedtune-sim-") as app_dir:
        _write_app_config(Path(app_dir), full_config)
        run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
        run.override_config = {}
        run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
        run.federation_id = NOOP_FEDERATION_ID
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run.run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=full_config)
        _run_simulation(
            num_supernodes=num_sites,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=server_app,
            backend_config=backend_config,
            server_app_context=context,
            app_dir=app_dir,
            run=run,
            is_app=True,
            verbose_logging=verbose,
        )
    return settings


class SiteRefusalFilter(logging.Filter):
    """Keeps a simulated site's refusal (a fedtune error: its privacy floor, its memory plan,
    its data) to the one line the site and the coordinator already log: drops the Simulation
    Engine's generic "exception ... by RayBackend" line and its copies of the remote traceback
    when they end in a fedtune error. Any other exception keeps its traceback."""

    FEDTUNE_ERROR = re.compile(r"\bfedtune\.[\w.]*Error: ")

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text.startswith("An exception was raised when processing a message by"):
            return False
        return not ("ClientAppException" in text and self.FEDTUNE_ERROR.search(text))


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # pragma: no cover - torch is a dependency
        return 0


def _check_inputs(settings: RunSettings, num_sites: int) -> None:
    """Every input checked before Ray starts (`server/preflight.py`), so a bad one fails
    with its one-line error and no run folder is touched."""
    from fedtune.server.preflight import check_run_inputs

    check_run_inputs(settings, data_set=True, num_sites=num_sites)
