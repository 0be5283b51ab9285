"""What this round's SecAgg+ protocol promised the site, read from Flower's own mod state
in the site's context (not from the coordinator's train config): how many sites were
sampled, how many hold shares of each site's secrets, and the reconstruction threshold,
the fewest sites whose sum the coordinator can unmask. Distributed DP sizes each site's
noise share from it. Imports no torch, so the thin ClientApp can call it."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np
from flwr.common import Context, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage

from fedtune.internals import flower
from fedtune.secagg.signed_keys import PeerSet

from .node_settings import NodeSettings
from .worker_protocol import Scalar

# The train-config key the site's own ClientApp fills in; whatever the coordinator put under it is dropped.
SETUP_KEY = "fedtune-secagg-setup"


@dataclass(frozen=True)
class SecAggSetup:
    sample_num: int  # sites sampled this round
    share_num: int  # sites each secret is shared with
    threshold: int  # shares needed to unmask: the sum the coordinator sees covers at least this many sites

    def to_json(self) -> str:
        return json.dumps({"sample_num": self.sample_num, "share_num": self.share_num, "threshold": self.threshold})

    @classmethod
    def from_json(cls, text: str) -> "SecAggSetup":
        return cls(**{k: int(v) for k, v in json.loads(text).items()})


def secagg_setup(context: Context) -> SecAggSetup | None:
    """The setup of the SecAgg+ round now running at this site, or None outside SecAgg+.

    Training runs inside the mod's collect-masked-vectors stage, while the saved state still
    names the stage before it (share-keys); a state left by an earlier round names another."""
    flower.require("secaggplus-state")
    record = context.state.config_records.get(RECORD_KEY_STATE)
    if record is None or record.get("current_stage") != Stage.SHARE_KEYS or int(record.get("threshold", 0) or 0) <= 0:
        return None
    return SecAggSetup(int(record["sample_num"]), int(record["share_num"]), int(record["threshold"]))


def with_secagg_setup(config: Mapping[str, Scalar], context: Context) -> dict[str, Scalar]:
    """The train config with SETUP_KEY set from the protocol state (absent outside SecAgg+)."""
    out = {k: v for k, v in config.items() if k != SETUP_KEY}
    setup = secagg_setup(context)
    if setup is not None:
        out[SETUP_KEY] = setup.to_json()
    return out


def setup_from_config(config: Mapping[str, Scalar]) -> SecAggSetup | None:
    """The setup `with_secagg_setup` put in the config, if any."""
    return SecAggSetup.from_json(str(config[SETUP_KEY])) if SETUP_KEY in config else None


def run_secaggplus(
    msg: Message, ctxt: Context, call_next: Any, peers: PeerSet | None = None, site: str = "site"
) -> Message:
    """One SecAgg+ stage at this site: CSPRNG masks installed and checked (SecAggSetupError
    if Flower would not call them), Flower's `secaggplus_mod` around `call_next`, and the
    masked vector narrowed to uint32 for the wire. With `peers`, fedtune's signed SecAgg+
    around it (`secagg_active.py`): each stage checked first, the keys signed after setup,
    and the consistency stage answered."""
    from flwr.client.mod import secaggplus_mod

    from fedtune.secagg.masks import install_csprng_masks
    from fedtune.secagg.wire_codec import narrow_masked_reply

    from .secagg_active import active_stage, refuse_unsigned, sign_advertisement

    install_csprng_masks("client")
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    stage = configs.get(Key.STAGE)  # Flower's mod pops it
    if peers is None:
        refuse_unsigned(configs, site)
    else:
        answer = active_stage(msg, ctxt, peers, site)
        if answer is not None:
            return answer
    with _rounding_seeded(_simulated_rounding_seed(msg, ctxt)):
        reply = secaggplus_mod(msg, ctxt, call_next)
    if peers is not None and stage == Stage.SETUP:
        sign_advertisement(reply, msg, peers)
    narrow_masked_reply(reply)  # uint32 on the wire: half of Flower's int64
    return reply


def simulated_peers(ctxt: Context) -> PeerSet | None:
    """A virtual site's peers under signed SecAgg+ (`secagg-peers-dir`, simulation only):
    the folder's `*.pub`, `site-<partition>.key` as its own key, and the colluders it
    assumes (`secagg-max-colluders`)."""
    folder = str(ctxt.run_config.get("secagg-peers-dir", "") or "")
    if not folder:
        return None
    from pathlib import Path

    node = NodeSettings.from_node_config(ctxt.node_config, ctxt.run_config)
    if node.on_a_supernode:
        return None  # a real site's peers are its worker's (--peers), never a path from the run config
    colluders = int(ctxt.run_config.get("secagg-max-colluders", 0) or 0)  # type: ignore[arg-type]
    return PeerSet.load(Path(folder) / f"site-{node.partition_id}.key", Path(folder), colluders)


def forget_secagg_state(context: Context) -> None:
    """Drop the protocol state an earlier (finished or aborted) SecAgg+ round left, before a
    plain train message: so a stale setup is never read for it."""
    context.state.config_records.pop(RECORD_KEY_STATE, None)


def _simulated_rounding_seed(msg: Message, ctxt: Context) -> int | None:
    """At a virtual site, a seed for Flower's stochastic rounding of the update before it is
    masked (`quantize` draws from NumPy's global generator), from the run's seed, the site's
    partition and the round: so one seed gives one result. None at a real site, which keeps
    drawing from the unseeded generator: the coordinator knows the run's seed."""
    node = NodeSettings.from_node_config(ctxt.node_config, ctxt.run_config)
    if node.on_a_supernode:
        return None
    try:
        seed, server_round = int(ctxt.run_config.get("seed", 0)), int(msg.metadata.group_id or 0)
    except (TypeError, ValueError):
        return None
    return int(np.random.SeedSequence([seed, node.partition_id, server_round]).generate_state(1)[0])


@contextmanager
def _rounding_seeded(seed: int | None) -> Iterator[None]:
    """NumPy's global generator seeded with `seed` inside, and put back as it was after."""
    if seed is None:
        yield
        return
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved)
