"""Flower's SecAgg+ workflow, recovering from sites that drop before the key exchange.

In Flower 1.41's `SecAggPlusWorkflow` the unmask stage treats every site sampled at setup
that is no longer active as dropped (`dead = sampled - active`) and asks the survivors
for its secret-key shares. A site that dropped in the setup or share-keys stage never
gave anyone such shares, so each survivor's `secaggplus_mod` fails on the missing share
(and fedtune's sites refuse the request: `client/secagg_guard.py`), and the round is lost,
although no mask involves that site: pairwise masks are only added with sites whose
encrypted shares arrived. This workflow narrows "sampled" to the sites still active after
each of those two stages, so "dropped" means dropped after sharing its secrets, the case
SecAgg+ recovers (Bell et al., CCS 2020). What a survivor reveals can only shrink.

It relies on the workflow state's `sampled_node_ids` and `active_node_ids` and on the
stage methods' names; `check_workflow_state()` refuses SecAgg+ at start, in one line, if
Flower's workflow no longer has them (verified on Flower 1.41)."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation import secaggplus_workflow as flower_workflow

from fedtune.errors import FedtuneError

STATE_FIELDS = ("sampled_node_ids", "active_node_ids")
STAGES = ("setup_stage", "share_keys_stage", "unmask_stage")


def check_workflow_state() -> None:
    """Flower's SecAgg+ workflow still keeps the fields and stages this class narrows."""
    state = getattr(flower_workflow, "WorkflowState", None)
    names = {f.name for f in dataclasses.fields(state)} if dataclasses.is_dataclass(state) else set()
    stages_ok = all(callable(getattr(SecAggPlusWorkflow, s, None)) for s in STAGES)
    unmask = inspect.getsource(SecAggPlusWorkflow.unmask_stage) if stages_ok else ""
    if not set(STATE_FIELDS) <= names or not stages_ok or "state.sampled_node_ids - active_nids" not in unmask:
        raise FedtuneError(
            "this Flower's SecAgg+ workflow no longer keeps sampled/active site sets as fedtune "
            "expects (verified on Flower 1.41); refusing SecAgg+ rather than losing rounds to dropouts"
        )


class DropoutTolerantSecAggPlusWorkflow(SecAggPlusWorkflow):  # type: ignore[misc]
    """`SecAggPlusWorkflow` whose unmask stage counts as dropped only the sites that had
    shared their secrets (see the module docstring)."""

    def setup_stage(self, grid: Any, context: Any, state: Any) -> bool:
        ok = super().setup_stage(grid, context, state)
        state.sampled_node_ids = set(state.active_node_ids)
        return bool(ok)

    def share_keys_stage(self, grid: Any, context: Any, state: Any) -> bool:
        ok = super().share_keys_stage(grid, context, state)
        state.sampled_node_ids = set(state.active_node_ids)
        return bool(ok)
