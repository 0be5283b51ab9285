"""The site's Flower ClientApp: `flower-supernode` (deployment) or the Simulation
Engine runs it. With `worker-socket` in the node config (deployment), or
`site-worker-socket` in the run config (simulation), it relays every message to the
site's long-lived worker (`worker_client.relay_to_worker`), which runs SecAgg+, trains and
builds the reply, and imports no torch, transformers or peft; this code comes from the
coordinator, so nothing the site enforces lives here. Without a worker it trains in its
own process (`site_client.py`, imported on first use) and SecAgg+ runs here, as a Flower
mod around the training."""

from __future__ import annotations

import logging
import time

from flwr.app import MetricRecord
from flwr.client import Client
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Context, Message, MessageType
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS as SECAGG_CONFIGS,
)

from fedtune.config import RunSettings
from fedtune.logs import setup_logging
from fedtune.secagg.masks import SecAggSetupError
from fedtune.stage_timing import TIMING_RECORD, process_start_time

from .node_settings import NodeSettings
from .secagg_setup import forget_secagg_state, run_secaggplus, simulated_peers
from .worker_client import relay_to_worker

log = logging.getLogger("fedtune.site")
setup_logging()


def client_fn(context: Context) -> Client:
    """Flower calls this for every message a site without a worker receives."""
    settings = RunSettings.from_run_config(context.run_config)
    from .site_client import SiteClient  # torch, transformers and peft: in-process training only

    return SiteClient(settings, context).to_client()


def secaggplus_when_requested(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `secaggplus_mod` for SecAgg+ rounds; plain train messages pass through.

    Before any SecAgg+ stage, in the process that runs the mod (a Ray actor or a
    SuperNode's ClientApp process), the CSPRNG masks are installed and checked; if
    Flower would not call them, the site refuses SecAgg+ and replies with the error."""
    if msg.metadata.message_type == MessageType.TRAIN and SECAGG_CONFIGS in msg.content.config_records:
        try:
            return run_secaggplus(msg, ctxt, call_next, simulated_peers(ctxt))
        except SecAggSetupError as err:
            log.error("fedtune: error: %s", err)
            raise
    if msg.metadata.message_type == MessageType.TRAIN:
        forget_secagg_state(ctxt)
    return call_next(msg, ctxt)


def stamp_timing(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Deployed sites only: when this ClientApp process started and how long its
    handler ran, so the coordinator can tell Flower's polling from the site's work."""
    if not NodeSettings.from_node_config(ctxt.node_config).on_a_supernode:
        return call_next(msg, ctxt)  # simulation: no processes to time, no extra bytes
    started = time.time()
    reply = call_next(msg, ctxt)
    if reply.has_content():
        reply.content.metric_records[TIMING_RECORD] = MetricRecord(
            {"process_start": process_start_time(), "handler_start": started, "handler_end": time.time()}
        )
    return reply


# The mods every site runs, outermost first; tests build their own ClientApp with extra mods around these.
MODS = [stamp_timing, relay_to_worker, secaggplus_when_requested]
app = ClientApp(client_fn=client_fn, mods=list(MODS))
