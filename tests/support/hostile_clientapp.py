"""A hostile ClientApp, for tests only: the coordinator's own code at a site, trying what
issue 33 lists. The test copies the app and puts this file over its `client/flower_app.py`, with
the site's paths filled in for TARGETS (a coordinator that knows where a site keeps its
data). It relays Flower's messages to the site worker so that the rounds go on, and at
each SecAgg+ collect stage it first tries every attack and puts what it got into the fit
reply's metrics: exactly what the coordinator receives (its metrics.jsonl).

(a) read the site's data file and state folder, and ask the worker for its status (its runs
name the site's paths); (b) drop the privacy-floor keys and switch
SecAgg+ and DP off in what it relays; (c) ask for the unmasked adapter: a plain training
request, the model's parameters, a SecAgg+ setup with itself alone; (d) a run id with '../'
in the training config. Each value starts with "GOT" if the attack worked."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from flwr.clientapp import ClientApp
from flwr.common import ConfigRecord, Context, Message, MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.serde import message_from_proto, message_to_proto

from .worker_client import call_worker, relay_to_worker, worker_socket

print("fedtune-test: HOSTILE CLIENTAPP STARTED", flush=True)
TARGETS: dict[str, Any] = json.loads("""__TARGETS__""")


def _try(attack: Callable[[], Any]) -> str:
    try:
        return "GOT " + repr(attack())[:200]
    except BaseException as err:  # noqa: BLE001 (what the site answered, whatever it is)
        return f"refused: {type(err).__name__}: {str(err)[:300]}"


def _copy(msg: Message, message_type: str | None = None) -> Message:
    proto = message_to_proto(msg)
    if message_type:
        proto.metadata.message_type = message_type
    return message_from_proto(proto)


def _no_local_training(msg: Message, ctxt: Context) -> Message:
    raise RuntimeError("this app only relays")


def _relay(msg: Message, ctxt: Context) -> Message:
    reply = relay_to_worker(msg, ctxt, _no_local_training)
    if reply.has_error():
        raise RuntimeError(reply.error.reason)
    return reply


def _arrays(reply: Message) -> Any:
    return {name: len(record) for name, record in reply.content.array_records.items()}


def _attacks(msg: Message, ctxt: Context) -> dict[str, str]:
    loot = {f"loot_data_{i}": _try(lambda p=p: open(p, "rb").read(200)) for i, p in enumerate(TARGETS["data"])}
    loot.update({f"loot_state_{i}": _try(lambda p=p: os.listdir(p)) for i, p in enumerate(TARGETS["state"])})
    loot["loot_node_config"] = json.dumps(dict(ctxt.node_config))[:300]
    loot["loot_worker_status"] = _try(lambda: call_worker(worker_socket(ctxt), "status", {})[0])
    plain = _copy(msg)
    del plain.content.config_records[RECORD_KEY_CONFIGS]
    # (b) the floor keys dropped from the node config, SecAgg+ and DP off in the run config relayed
    stripped = Context(
        run_id=ctxt.run_id,
        node_id=ctxt.node_id,
        state=ctxt.state,
        node_config={k: v for k, v in ctxt.node_config.items() if k == "worker-socket"},
        run_config={**ctxt.run_config, "secagg": False, "dp": False},
    )
    loot["loot_floor_dropped"] = _try(lambda: _arrays(_relay(plain, stripped)))
    # (c) the unmasked adapter
    loot["loot_plain_fit"] = _try(lambda: _arrays(_relay(_copy(plain), ctxt)))
    loot["loot_get_parameters"] = _try(lambda: _arrays(_relay(_copy(plain, "get_parameters"), ctxt)))
    alone = _copy(msg)
    for name in list(alone.content.keys()):
        del alone.content[name]
    alone.content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(
        {
            Key.STAGE: Stage.SETUP,
            Key.SAMPLE_NUMBER: 1,
            Key.SHARE_NUMBER: 1,
            Key.THRESHOLD: 1,
            Key.CLIPPING_RANGE: 4.0,
            Key.TARGET_RANGE: 1 << 22,
            Key.MOD_RANGE: 1 << 32,
            Key.MAX_WEIGHT: 1000.0,
        }
    )
    loot["loot_secagg_alone"] = _try(lambda: dict(_relay(alone, ctxt).content.config_records[RECORD_KEY_CONFIGS]))
    return loot


def hostile(msg: Message, ctxt: Context, call_next: Any) -> Message:
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
    if (
        msg.metadata.message_type != MessageType.TRAIN
        or configs is None
        or configs.get(Key.STAGE) != Stage.COLLECT_MASKED_VECTORS
    ):
        return relay_to_worker(msg, ctxt, call_next)
    loot = _attacks(msg, ctxt)
    # (d) the honest stage, with a run id that climbs out of the site's state folder
    msg.content.config_records["fitins.config"]["run-id"] = TARGETS["run_id"]
    reply = relay_to_worker(msg, ctxt, call_next)
    reply.content.config_records["fitres.metrics"] = ConfigRecord(
        {**dict(reply.content.config_records.get("fitres.metrics", {})), **loot}
    )
    return reply


def client_fn(context: Context) -> Any:
    raise RuntimeError("this app only relays")


app = ClientApp(client_fn=client_fn, mods=[hostile])
