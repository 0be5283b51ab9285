"""Signed SecAgg+ at the coordinator: fedtune's SecAgg+ for sites that hold their peers'
keys (`secagg-active = true`; Bonawitz et al., CCS 2017, active-adversary version; Bell et
al., CCS 2020). It is Flower's SecAgg+ workflow (with fedtune's dropout recovery,
`secagg_dropouts.py`) that also carries what the sites sign:

1. setup: each site's reply carries its signature over its two public keys; the workflow
   keeps them;
2. share keys: each site gets, with its peers' keys, the peers' signatures, which it checks
   against the keys it holds itself (`client/secagg_active.py`);
3. consistency (before unmask): every site that sent a masked vector is sent the survivor
   list and signs it;
4. unmask: each site gets the survivors' signatures with the request, and reveals shares
   only after checking at least t of them over the same list.

The coordinator verifies nothing and is trusted for nothing: it forwards what the sites
signed, and a site refuses any stage where the signatures do not hold."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, cast

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from fedtune.secagg.signed_keys import (
    CONSISTENCY_STAGE,
    MAX_SIGNATURE_BYTES,
    SIGNATURE_KEY,
    SIGNATURES_RECORD,
    SURVIVORS_KEY,
)

from .secagg_dropouts import DropoutTolerantSecAggPlusWorkflow

log = logging.getLogger("fedtune.server")


class _GridWith:
    """A grid whose `send_and_receive` lets the workflow see or add to each message."""

    def __init__(
        self,
        grid: Any,
        outgoing: Callable[[Message], None] | None = None,
        replies: Callable[[Message], None] | None = None,
    ) -> None:
        self._grid, self._outgoing, self._replies = grid, outgoing, replies

    def send_and_receive(self, messages: Iterable[Message], *args: Any, **kwargs: Any) -> Iterable[Message]:
        messages = list(messages)
        if self._outgoing is not None:
            for msg in messages:
                self._outgoing(msg)
        replies = list(self._grid.send_and_receive(messages, *args, **kwargs))
        if self._replies is not None:
            for reply in replies:
                self._replies(reply)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _signature(reply: Message) -> bytes | None:
    if reply.has_error():
        return None
    record = reply.content.config_records.get(SIGNATURES_RECORD)
    value = record.get(SIGNATURE_KEY) if record is not None else None
    return value if isinstance(value, bytes) and len(value) <= MAX_SIGNATURE_BYTES else None


class SignedSecAggPlusWorkflow(DropoutTolerantSecAggPlusWorkflow):
    """SecAgg+ whose key advertisements and survivor list are signed by the sites."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.advertisements: dict[int, bytes] = {}  # node id -> its signature over its keys
        self.survivor_signatures: dict[int, bytes] = {}  # node id -> its signature over the survivors

    def setup_stage(self, grid: Any, context: Any, state: Any) -> bool:
        self.advertisements, self.survivor_signatures = {}, {}

        def keep(reply: Message) -> None:
            signature = _signature(reply)
            if signature is not None:
                self.advertisements[reply.metadata.src_node_id] = signature

        return bool(super().setup_stage(_GridWith(grid, replies=keep), context, state))

    def share_keys_stage(self, grid: Any, context: Any, state: Any) -> bool:
        def attach(msg: Message) -> None:
            nodes = [k for k in msg.content.config_records[RECORD_KEY_CONFIGS] if k != Key.STAGE]
            signed = {k: self.advertisements[int(k)] for k in nodes if int(k) in self.advertisements}
            msg.content.config_records[SIGNATURES_RECORD] = ConfigRecord(signed)  # type: ignore[arg-type]

        return bool(super().share_keys_stage(_GridWith(grid, outgoing=attach), context, state))

    def unmask_stage(self, grid: Any, context: Any, state: Any) -> bool:
        if not self.consistency_stage(grid, context, state):
            return False

        def attach(msg: Message) -> None:
            signed = {str(nid): sig for nid, sig in self.survivor_signatures.items()}
            msg.content.config_records[SIGNATURES_RECORD] = ConfigRecord(signed)  # type: ignore[arg-type]

        return bool(super().unmask_stage(cast(Any, _GridWith(grid, outgoing=attach)), context, state))

    def consistency_stage(self, grid: Any, context: Any, state: Any) -> bool:
        """Every site that sent a masked vector signs the survivor list; unmasking goes on
        only with at least the threshold's number of signatures (else no site would reveal)."""
        round_id = str(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        survivors = sorted(state.active_node_ids)
        content = RecordDict(
            {RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: CONSISTENCY_STAGE, SURVIVORS_KEY: survivors})}
        )
        messages = [
            Message(content=content, dst_node_id=nid, message_type=MessageType.TRAIN, group_id=round_id)
            for nid in survivors
        ]
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            signature = _signature(reply)
            if signature is None:
                state.failures.append(Exception(reply.error if reply.has_error() else "no signature"))
            else:
                self.survivor_signatures[reply.metadata.src_node_id] = signature
        if len(self.survivor_signatures) < state.threshold:
            log.error(
                "signed SecAgg+: %d of %d survivors signed the survivor list, below the threshold %d",
                len(self.survivor_signatures),
                len(survivors),
                state.threshold,
            )
            return False
        return True
