"""Flower messages handled inside the site worker, so that a site's protection does not
depend on the ClientApp that the coordinator ships.

The ClientApp relays each message it gets (census, SecAgg+ stages, training, evaluation)
to the worker as Flower's own protobuf; the worker runs Flower's `secaggplus_mod` here,
with CSPRNG masks and its own protocol state, around its own training, and builds the
reply itself. Under SecAgg+ the only copy of the unmasked adapter stays in this process:
a fit reply holds the masked vector and a fixed set of named scalar metrics. A plain
(unmasked) training request for a run that uses SecAgg+ or at a site that requires it, a
request for the site's parameters, and a SecAgg+ setup below the site's minimum are refused.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.client.message_handler.message_handler import handle_legacy_message_from_msgtype
from flwr.common import Context, Message, MessageType
from flwr.common.constant import MessageTypeLegacy
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS as SECAGG_CONFIGS
from flwr.common.serde import message_from_proto, recorddict_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module

from fedtune.errors import FedtuneError
from fedtune.secagg.signed_keys import PeerSet

from .secagg_guard import check_stage_request, protocol_state
from .secagg_setup import forget_secagg_state, run_secaggplus, with_secagg_setup
from .worker_protocol import Scalar

log = logging.getLogger("fedtune.site")

# What a reply may carry: the metric names a site's work reports (exact names, or these
# prefixes), scalars only; "site" is the only string. Anything else is dropped here.
RELEASED_METRICS = frozenset(
    {"site", "num_examples", "train_loss", "train_loss_first", "train_loss_last", "steps", "secagg_clipped_values"}
)
RELEASED_PREFIXES = ("val_", "dp_", "gate_")
MAX_METRICS = 64


class RequestRefused(FedtuneError):
    """A message this site will not answer."""


def decode_message(body: list[np.ndarray]) -> Message:
    """The relayed message: one uint8 tensor holding Flower's protobuf."""
    if len(body) != 1 or body[0].dtype != np.uint8 or body[0].ndim != 1:
        raise RequestRefused("a relayed message is one uint8 tensor of Flower's protobuf")
    try:
        proto = ProtoMessage.FromString(body[0].tobytes())
        msg = message_from_proto(proto)
    except Exception as err:  # protobuf and Flower raise their own types
        raise RequestRefused(f"the relayed message is not a Flower message ({type(err).__name__})") from None
    if not msg.has_content():
        raise RequestRefused("the relayed message has no content")
    return msg


def encode_content(content: RecordDict) -> list[np.ndarray]:
    return [np.frombuffer(recorddict_to_proto(content).SerializeToString(), dtype=np.uint8)]


def released_metrics(values: dict[str, Any], site: str) -> dict[str, Scalar]:
    """The named scalars this site releases with a reply; everything else is dropped."""
    out: dict[str, Scalar] = {}
    for key, value in values.items():
        if len(out) >= MAX_METRICS or not (key in RELEASED_METRICS or key.startswith(RELEASED_PREFIXES)):
            continue
        if key == "site":
            out[key] = site
        elif isinstance(value, bool) or (isinstance(value, (int, float)) and math.isfinite(value)):
            out[key] = value
    return out


class _WorkClient(NumPyClient):
    """The worker's site work as the legacy client Flower's message handler calls."""

    def __init__(self, work: Any, context: Context) -> None:
        self.work = work
        self.context = context

    def get_parameters(self, config: dict[str, Scalar]) -> list[np.ndarray]:
        raise RequestRefused(f"site {self.work.site_name()} does not hand out its model's parameters")

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        return self.work.properties(config)

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Scalar]
    ) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        return self.work.fit(parameters, with_secagg_setup(config, self.context))

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        return self.work.evaluate(parameters, config)


class RunMessages:
    """One run's messages at one site: Flower's SecAgg+ client with state kept here, the
    site's work, and replies built and narrowed here."""

    def __init__(
        self,
        work: Any,
        run_id: int,
        min_secagg_sites: int,
        peers: PeerSet | None = None,
        on_fit: Callable[[int, int], None] | None = None,
    ) -> None:
        self.work = work
        self.min_secagg_sites = min_secagg_sites
        self.peers = peers  # signed SecAgg+ (`secagg_active.py`): the peers the site agreed to
        self.on_fit = on_fit
        self.context = Context(
            run_id=run_id,
            node_id=0,
            node_config=dict(work.node.to_node_config()),
            state=RecordDict(),
            run_config=work.settings.to_run_config(),
        )

    def handle(self, msg: Message) -> RecordDict:
        kind = msg.metadata.message_type
        site = self.work.site_name()
        self.work.floor.check_run(self.work.settings, site)  # every message of a run below the floor is refused
        if kind == MessageType.TRAIN:
            if SECAGG_CONFIGS in msg.content.config_records:
                check_stage_request(
                    msg.content.config_records[SECAGG_CONFIGS],
                    protocol_state(self.context.state),
                    self.min_secagg_sites,
                    site,
                )
                try:
                    reply = run_secaggplus(msg, self.context, self._legacy, self.peers, site)
                except (KeyError, TypeError, ValueError) as err:  # Flower's own protocol checks, one line
                    raise RequestRefused(
                        f"site {site}: SecAgg+ message refused ({type(err).__name__}: {str(err)[:200]})"
                    ) from None
            else:
                if self.work.settings.secagg or self.work.floor.require_secagg:
                    raise RequestRefused(
                        f"site {site} trains this run under SecAgg+ only: an unmasked training request is refused"
                    )
                forget_secagg_state(self.context)
                reply = self._legacy(msg, self.context)
        elif kind in (MessageType.EVALUATE, MessageTypeLegacy.GET_PROPERTIES):
            reply = self._legacy(msg, self.context)
        else:
            raise RequestRefused(f"site {site} does not answer {kind!r} messages")
        if reply.has_error():
            raise RequestRefused(reply.error.reason)
        return self._released(reply.content, site)

    def _legacy(self, msg: Message, ctxt: Context) -> Message:
        out = handle_legacy_message_from_msgtype(lambda _: _WorkClient(self.work, ctxt).to_client(), msg, ctxt)
        if msg.metadata.message_type == MessageType.TRAIN and self.on_fit is not None:
            config = msg.content.config_records.get("fitins.config", {})
            self.on_fit(_round_number(config.get("server-round")), _round_number(config.get("num-rounds")))
        return out

    def _released(self, content: RecordDict, site: str) -> RecordDict:
        """The reply as this site sends it: Flower's records, metrics narrowed to the released set."""
        out = RecordDict()
        for name, record in content.items():
            if isinstance(record, ArrayRecord):
                out[name] = record  # plain (non-SecAgg+) fit: the adapter; cleared by the mod under SecAgg+
            elif isinstance(record, MetricRecord):
                out[name] = record  # Flower's loss and example count
            elif isinstance(record, ConfigRecord):
                if name.endswith((".metrics", ".properties")):
                    out[name] = ConfigRecord(released_metrics(dict(record), site))
                else:
                    out[name] = record  # Flower's status record and SecAgg+'s stage reply
        return out


def _round_number(value: Any) -> int:
    """A round count from the coordinator's message: an integer >= 0, else 0 (unknown)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
