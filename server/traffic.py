"""Bytes on the wire per site and round: a Grid wrapper that sizes every message's
content as its protobuf encoding, in both directions."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

from flwr.common import Message
from flwr.common.serde import recorddict_to_proto

from fedtune.secagg.wire_codec import widen_masked_reply


def content_bytes(message: Message) -> int:
    """Serialized size of a message's content (0 for error replies)."""
    if not message.has_content():
        return 0
    return int(recorddict_to_proto(message.content).ByteSize())


class MeteredGrid:
    """Delegates to a Flower Grid and tallies bytes per (round, node, kind).

    `kind` is the Flower message type ('train' or 'evaluate'); the round is the
    message's group id, which Flower's workflows set to the round number.
    """

    def __init__(self, grid: Any) -> None:
        self._grid = grid
        self.down: dict[tuple[str, int, str], int] = defaultdict(int)
        self.up: dict[tuple[str, int, str], int] = defaultdict(int)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *args: Any, **kwargs: Any) -> Iterable[Message]:
        messages = list(messages)
        for msg in messages:
            key = (msg.metadata.group_id, msg.metadata.dst_node_id, msg.metadata.message_type)
            self.down[key] += content_bytes(msg)
        replies = list(self._grid.send_and_receive(messages, *args, **kwargs))
        for reply in replies:
            key = (reply.metadata.group_id, reply.metadata.src_node_id, reply.metadata.message_type)
            self.up[key] += content_bytes(reply)  # as it came over the wire
            widen_masked_reply(reply)  # SecAgg+ masked vectors: uint32 on the wire, int64 for Flower's sums
        return replies

    def site_bytes(self, round_key: str, node_id: int) -> dict[str, int]:
        """Bytes to and from one node in one round, by message kind and in total."""
        out: dict[str, int] = {}
        for kind in ("train", "evaluate"):
            out[f"{kind}_bytes_down"] = self.down.get((round_key, node_id, kind), 0)
            out[f"{kind}_bytes_up"] = self.up.get((round_key, node_id, kind), 0)
        out["bytes_down"] = out["train_bytes_down"] + out["evaluate_bytes_down"]
        out["bytes_up"] = out["train_bytes_up"] + out["evaluate_bytes_up"]
        return out
