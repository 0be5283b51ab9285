"""The Flower internals fedtune touches fail loudly: SecAgg+ is refused, on either side,
unless Flower will really call the CSPRNG mask generator, and a strategy whose state
Flower no longer keeps where fedtune saves it from is refused at start-up."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
from flwr.common import ndarrays_to_parameters
from flwr.common.secure_aggregation import secaggplus_utils
from flwr.server.strategy import FedAdam, FedAvgM
from support.run_configs import sentiment_config

from fedtune.cli.simulation import run_simulation
from fedtune.config import default_run_config
from fedtune.errors import FedtuneError
from fedtune.secagg import masks
from fedtune.server.strategy_state import check_strategy_state

FLOWER_NUMPY_GENERATOR = secaggplus_utils.pseudo_rand_gen


def _flower_module(role: str) -> Any:
    return importlib.import_module(masks.MASK_CALLERS[role][0])


@pytest.mark.parametrize("role", ["server", "client"])
def test_installed_masks_pass_the_check(role: str) -> None:
    masks.install_csprng_masks(role)
    assert _flower_module(role).pseudo_rand_gen.__name__ == f"csprng_rand_gen[{role}]"


@pytest.mark.parametrize("role", ["server", "client"])
def test_a_failed_patch_is_refused(role: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rebinding silently leaves Flower's 32-bit-seeded numpy generator in place."""
    module = _flower_module(role)
    monkeypatch.setattr(module, "pseudo_rand_gen", FLOWER_NUMPY_GENERATOR)
    monkeypatch.setattr(masks, "_generator_for", lambda _role: FLOWER_NUMPY_GENERATOR)
    with pytest.raises(masks.SecAggSetupError, match=f"SecAgg\\+ refused on the {role} side: .*not the CSPRNG"):
        masks.install_csprng_masks(role)


@pytest.mark.parametrize("role", ["server", "client"])
def test_flower_moving_the_call_is_refused(role: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Flower release whose mask-drawing function reaches the generator another way
    (here: through the utils module) would bypass the rebound name."""
    masks.install_csprng_masks(role)
    dotted = masks.MASK_CALLERS[role][1][0]
    *owner_path, attribute = dotted.split(".")
    owner = _flower_module(role)
    for part in owner_path:
        owner = getattr(owner, part)

    def draws_elsewhere(*args: Any, **kwargs: Any) -> Any:
        return secaggplus_utils.pseudo_rand_gen(b"", 2, [])

    monkeypatch.setattr(owner, attribute, draws_elsewhere)
    with pytest.raises(masks.SecAggSetupError, match="no longer calls pseudo_rand_gen"):
        masks.verify_csprng_masks(role)
    monkeypatch.delattr(owner, attribute)  # renamed away
    with pytest.raises(masks.SecAggSetupError, match=f"has no {dotted}"):
        masks.verify_csprng_masks(role)


def test_an_alias_of_the_numpy_generator_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    masks.install_csprng_masks("client")
    monkeypatch.setattr(_flower_module("client"), "_legacy_prg", FLOWER_NUMPY_GENERATOR, raising=False)
    with pytest.raises(masks.SecAggSetupError, match="as _legacy_prg"):
        masks.verify_csprng_masks("client")


@pytest.mark.timeout(600)
def test_coordinator_refuses_secagg_before_round_one_when_the_patch_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bert_dir: Path, sentiment_data: dict[str, Path]
) -> None:
    """A whole simulated run with the coordinator's patch failing: no round runs, nothing is
    written, and the error says why."""
    monkeypatch.setattr(_flower_module("server"), "pseudo_rand_gen", FLOWER_NUMPY_GENERATOR)
    monkeypatch.setattr(masks, "_generator_for", lambda _role: FLOWER_NUMPY_GENERATOR)
    config = {
        **default_run_config(),
        **sentiment_config(tiny_bert_dir, sentiment_data),
        "central-eval-path": "",
        "partitioning": "iid",
        "num-rounds": 1,
        "local-steps": 2,
        "batch-size": 16,
        "output-dir": str(tmp_path / "runs"),
        "run-name": "refused",
        "secagg": True,
    }
    with pytest.raises(masks.SecAggSetupError, match="SecAgg\\+ refused on the server side: .*not the CSPRNG"):
        run_simulation(config, num_sites=2)
    assert not (tmp_path / "runs" / "refused").exists()


def test_strategy_state_attributes_are_checked() -> None:
    initial = ndarrays_to_parameters([])
    for strategy in (FedAdam(initial_parameters=initial), FedAvgM(initial_parameters=initial)):
        check_strategy_state(strategy)  # Flower 1.41 keeps them where we read them

    class RenamedFedAdam(FedAdam):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.first_moment = self.__dict__.pop("m_t")

    with pytest.raises(FedtuneError, match="RenamedFedAdam in Flower .* has no m_t"):
        check_strategy_state(RenamedFedAdam(initial_parameters=initial))


def test_the_secagg_dropout_fix_refuses_a_flower_workflow_that_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    """`server/secagg_dropouts.py` narrows Flower's sampled/active site sets: a workflow state
    without them, or an unmask stage that no longer derives the dropped sites from them, is
    refused in one line."""
    import dataclasses

    from flwr.server.workflow.secure_aggregation import secaggplus_workflow

    from fedtune.server.secagg_dropouts import check_workflow_state

    check_workflow_state()  # this Flower passes

    @dataclasses.dataclass
    class Moved:
        sampled: set[int] = dataclasses.field(default_factory=set)

    monkeypatch.setattr(secaggplus_workflow, "WorkflowState", Moved)
    with pytest.raises(FedtuneError, match="refusing SecAgg\\+ rather than losing rounds"):
        check_workflow_state()


def _break(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Simulate the change of a dependency release that would break the internal `name`."""
    import dataclasses

    if name == "run-simulation":
        module = importlib.import_module("flwr.simulation.run_simulation")
        monkeypatch.setattr(module, "_run_simulation", lambda num_supernodes, client_app, server_app: None)
    elif name == "task-identity":
        monkeypatch.setattr(importlib.import_module("flwr.supercore.task_identity"), "TaskIdentity", type("T", (), {}))
    elif name == "secaggplus-state":
        mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
        monkeypatch.setattr(mod, "SecAggPlusState", dataclasses.make_dataclass("S", ["current_stage", "sample_num"]))
    elif name == "masked-vectors":
        constants = importlib.import_module("flwr.common.secure_aggregation.secaggplus_constants")
        monkeypatch.setattr(constants, "Key", type("Key", (), {}))
    elif name == "failure-text":
        client_app = importlib.import_module("flwr.clientapp.client_app")
        monkeypatch.setattr(client_app, "ClientAppException", RuntimeError)
    elif name == "supernode-app-pinning":
        monkeypatch.delattr(importlib.import_module("flwr.supernode.start_client_internal"), "_verify_fab")
    elif name == "supernode-idle-poll":
        monkeypatch.setattr(importlib.import_module("flwr.supernode.start_client_internal"), "time", object())
    elif name == "client-certificate":
        client = importlib.import_module("flwr.supercore.protobuf.client").ProtobufClient
        monkeypatch.setattr(client, "__init__", lambda self, base_url: None)
    elif name == "int4-algo-config":
        from onnxruntime_genai.models.builder import Model

        monkeypatch.setattr(Model, "make_int4_algo_config", lambda self, quant_method, bits: None)
    else:
        raise AssertionError(f"no breaker for {name}: add one when you list an internal")


def _all_internals() -> list[tuple[Any, str]]:
    from fedtune.internals import flower, onnxruntime_genai

    return [(module, name) for module in (flower, onnxruntime_genai) for name in module.INTERNALS]


@pytest.mark.parametrize(("module", "name"), _all_internals(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_listed_internal_holds_here_and_a_change_is_one_line(
    module: Any, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each private use passes its check on the installed versions; after a simulated change
    it fails with one line naming the internal, its user and the verified version."""
    import fedtune.internals as internals
    from fedtune.internals import InternalsChanged

    monkeypatch.setattr(internals, "_PASSED", set())
    module.require(name)
    internals._PASSED.clear()
    _break(monkeypatch, name)
    with pytest.raises(InternalsChanged) as info:
        module.require(name)
    line = str(info.value)
    distribution = {"flower": "flwr", "onnxruntime_genai": "onnxruntime-genai"}[module.__name__.rsplit(".", 1)[1]]
    assert "\n" not in line and f"(verified with {distribution} {module.VERIFIED}; pin that version)" in line
    assert module.INTERNALS[name].user in line and module.VERIFIED in line


def test_the_supernode_launcher_stops_in_one_line_when_pinning_changed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import fedtune.internals as internals
    from fedtune.client.supernode_launcher import pin_apps

    monkeypatch.setattr(internals, "_PASSED", set())
    _break(monkeypatch, "supernode-app-pinning")
    assert pin_apps({"0" * 64}) is False
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--allow-app" in err and "verified with flwr 1.41.0" in err
