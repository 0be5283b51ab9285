"""Flower's private internals fedtune relies on (verified with flwr 1.41.0), one entry each:
who uses it, what it relies on, and the check. `require(name, ...)` runs before the use."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from types import ModuleType

from . import Internal, require_from

VERIFIED = "1.41.0"


def _module(name: str) -> ModuleType:
    return importlib.import_module(name)


def _missing_parameters(function: object, wanted: set[str]) -> str | None:
    missing = wanted - set(inspect.signature(function).parameters)  # type: ignore[arg-type]
    return f"{getattr(function, '__qualname__', function)} lacks parameters {sorted(missing)}" if missing else None


def _run_simulation() -> str | None:
    function = getattr(_module("flwr.simulation.run_simulation"), "_run_simulation", None)
    if function is None:
        return "flwr.simulation.run_simulation has no _run_simulation"
    return _missing_parameters(
        function,
        {
            "num_supernodes",
            "exit_event",
            "client_app",
            "server_app",
            "backend_config",
            "server_app_context",
            "app_dir",
            "run",
            "is_app",
            "verbose_logging",
        },
    )


def _task_identity() -> str | None:
    identity = getattr(_module("flwr.supercore.task_identity"), "TaskIdentity", None)
    if identity is None:
        return "flwr.supercore.task_identity has no TaskIdentity"
    settable = [
        a
        for a in ("task_id", "run_id", "node_id")
        if isinstance(inspect.getattr_static(type(identity), a, None), property)
        and getattr(type(identity), a).fset is not None
    ]
    missing = sorted({"task_id", "run_id", "node_id"} - set(settable))
    return f"TaskIdentity lacks settable {missing}" if missing else None


def _secaggplus_state() -> str | None:
    constants = _module("flwr.common.secure_aggregation.secaggplus_constants")
    mod = _module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    state = getattr(mod, "SecAggPlusState", None)
    if state is None or not dataclasses.is_dataclass(state):
        return "secaggplus_mod has no SecAggPlusState dataclass"
    missing = {"current_stage", "sample_num", "share_num", "threshold"} - {f.name for f in dataclasses.fields(state)}
    if missing:
        return f"SecAggPlusState lacks fields {sorted(missing)}"
    if not hasattr(constants, "RECORD_KEY_STATE") or not hasattr(constants.Stage, "SHARE_KEYS"):
        return "secaggplus_constants lacks RECORD_KEY_STATE or Stage.SHARE_KEYS"
    if "RECORD_KEY_STATE" not in inspect.getsource(mod):
        return "secaggplus_mod no longer keeps its state under RECORD_KEY_STATE"
    return None


def _masked_vectors() -> str | None:
    constants = _module("flwr.common.secure_aggregation.secaggplus_constants")
    if not hasattr(constants.Key, "MASKED_PARAMETERS"):
        return "secaggplus_constants.Key lacks MASKED_PARAMETERS"
    workflow = _module("flwr.server.workflow.secure_aggregation.secaggplus_workflow")
    source = inspect.getsource(workflow.SecAggPlusWorkflow.collect_masked_vectors_stage)
    if "Key.MASKED_PARAMETERS" not in source or "bytes_to_ndarray" not in source:
        return "the workflow's collect stage no longer reads Key.MASKED_PARAMETERS with bytes_to_ndarray"
    return None


def _failure_text() -> str | None:
    client_app = _module("flwr.clientapp.client_app")
    exception = getattr(client_app, "ClientAppException", None)
    if exception is None or "Message: " not in str(exception("probe")):
        return "ClientAppException no longer puts 'Message: ' before the site's own message"
    return None


def _supernode_loop() -> str | None:
    module = _module("flwr.supernode.start_client_internal")
    pull, verify = getattr(module, "_pull_and_store_message", None), getattr(module, "_verify_fab", None)
    if pull is None or verify is None:
        return "start_client_internal lacks _pull_and_store_message or _verify_fab"
    problem = _missing_parameters(pull, {"get_fab", "trusted_entities"})
    if problem:
        return problem
    loop = inspect.getsource(module.start_client_internal)
    if "get_fab=get_fab" not in loop or "trusted_entities=trusted_entities" not in loop:
        return "start_client_internal no longer passes get_fab and trusted_entities to _pull_and_store_message"
    if "_verify_fab(fab, trusted_entities)" not in inspect.getsource(pull):
        return "_pull_and_store_message no longer calls _verify_fab(fab, trusted_entities)"
    return None


def _supernode_sleep() -> str | None:
    import time

    module = _module("flwr.supernode.start_client_internal")
    if "time.sleep(3)" not in inspect.getsource(module) or getattr(module, "time", None) is not time:
        return "start_client_internal no longer sleeps with time.sleep(3) through its module-level `time`"
    return None


def _client_certificate() -> str | None:
    client = getattr(_module("flwr.supercore.protobuf.client"), "ProtobufClient", None)
    if client is None:
        return "flwr.supercore.protobuf.client has no ProtobufClient"
    return _missing_parameters(client.__init__, {"verify"})


INTERNALS: dict[str, Internal] = {
    "run-simulation": Internal(
        "the simulation launcher (cli/simulation.py)",
        "flwr.simulation.run_simulation._run_simulation and its keyword arguments",
        _run_simulation,
    ),
    "task-identity": Internal(
        "the simulation launcher (cli/simulation.py)",
        "flwr.supercore.task_identity.TaskIdentity (task_id, run_id, node_id)",
        _task_identity,
    ),
    "secaggplus-state": Internal(
        "the site's SecAgg+ setup (client/secagg_setup.py)",
        "secaggplus_mod's state record (RECORD_KEY_STATE: current_stage, sample_num, share_num, threshold)",
        _secaggplus_state,
    ),
    "masked-vectors": Internal(
        "the uint32 wire codec (fedtune/secagg/wire_codec.py)",
        "Key.MASKED_PARAMETERS read with bytes_to_ndarray by the SecAgg+ workflow",
        _masked_vectors,
    ),
    "failure-text": Internal(
        "the coordinator's failure reasons (server/polling_grid.py one_line)",
        "ClientAppException's 'Message: ' before the site's message",
        _failure_text,
    ),
    "supernode-app-pinning": Internal(
        "the SuperNode launcher's --allow-app (client/supernode_launcher.py)",
        "start_client_internal's _pull_and_store_message(get_fab, trusted_entities) and _verify_fab",
        _supernode_loop,
    ),
    "supernode-idle-poll": Internal(
        "the SuperNode launcher's --idle-poll (client/supernode_launcher.py)",
        "start_client_internal's time.sleep(3) idle poll",
        _supernode_sleep,
    ),
    "client-certificate": Internal(
        "the SuperNode launcher's --client-cert (client/supernode_launcher.py)",
        "ProtobufClient.__init__(verify=...)",
        _client_certificate,
    ),
}
# Checked by their own modules, which patch and then prove the patch holds:
# fedtune/secagg/masks.py (SecAgg+ mask generator) and server/secagg_dropouts.py (the workflow's state).


def require(*names: str) -> None:
    """Check the named Flower internals; one line (InternalsChanged) at the first that changed."""
    require_from(INTERNALS, "flwr", VERIFIED, *names)
