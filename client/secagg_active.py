"""The site's half of fedtune's actively secure SecAgg+ (`fedtune/secagg/signed_keys.py`),
run around Flower's `secaggplus_mod` in the site worker, for a site given the peers it
agreed to aggregate with (`fedtune deploy site --peers DIR`). One function per stage, with
the protocol's state kept in the site's context, like Flower's mod:

- setup: the round must be one the site's assumptions make safe: every site shares with
  every other, no more sites than it knows, a threshold t with 2t > n + c and t >= c + 2
  (n sites, c the most it assumes collude); after Flower's mod, the site signs its keys;
- share keys: every participant's keys must be signed by a distinct known peer, its own by
  itself, before Flower's mod derives any pairwise mask or encrypts any share;
- consistency (fedtune's stage): the site signs the survivor list it is given, once a round,
  if every survivor took part, it is one of them, and there are at least t;
- unmask: the request must name exactly the list it signed as active, drop only
  participants, and carry at least t signatures by distinct participants over that same
  list; only then does Flower's mod reveal shares.

A coordinator that adds sites (sybils), shrinks a round, substitutes keys or tells sites
different stories about who dropped is refused, in one line, before any share that would
unmask a site leaves it."""

from __future__ import annotations

from typing import Any, cast

from flwr.app import ConfigRecord, RecordDict
from flwr.common import Context, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedtune.secagg.signed_keys import (
    CONSISTENCY_STAGE,
    SIGNATURE_KEY,
    SIGNATURES_RECORD,
    SURVIVORS_KEY,
    PeerSet,
    advertisement_bytes,
    sign,
    survivors_bytes,
)

from .secagg_guard import SecAggRefused, config_int

STATE_RECORD = "fedtune-secagg-active-state"


def active_stage(msg: Message, ctxt: Context, peers: PeerSet, site: str) -> Message | None:
    """Check a stage message before Flower's mod sees it (SecAggRefused if this site will
    not run it); the consistency stage is answered here, as the returned reply."""
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    stage = configs.get(Key.STAGE)
    if stage == Stage.SETUP:
        _check_setup(msg, ctxt, configs, peers, site)
    elif stage == Stage.SHARE_KEYS:
        _check_share_keys(msg, ctxt, configs, peers, site)
    elif stage == CONSISTENCY_STAGE:
        return _consistency(msg, ctxt, configs, peers, site)
    elif stage == Stage.UNMASK:
        _check_unmask(msg, ctxt, configs, peers, site)
    return None


def sign_advertisement(reply: Message, msg: Message, peers: PeerSet) -> None:
    """After Flower's setup: the site's signature over the public keys it replies with."""
    if reply.has_error():
        return
    keys = reply.content.config_records[RECORD_KEY_CONFIGS]
    pk1, pk2 = keys[Key.PUBLIC_KEY_1], keys[Key.PUBLIC_KEY_2]
    data = advertisement_bytes(msg.metadata.run_id, msg.metadata.group_id, msg.metadata.dst_node_id, pk1, pk2)  # type: ignore[arg-type]
    reply.content.config_records[SIGNATURES_RECORD] = ConfigRecord({SIGNATURE_KEY: sign(peers.identity, data)})


def _check_setup(msg: Message, ctxt: Context, configs: ConfigRecord, peers: PeerSet, site: str) -> None:
    n, shares, t = (config_int(configs, k) for k in (Key.SAMPLE_NUMBER, Key.SHARE_NUMBER, Key.THRESHOLD))
    c = peers.max_colluders
    if shares != n:
        raise SecAggRefused(
            f"site {site} refuses SecAgg+ where each site shares with {shares} of {n}: with --peers every "
            "site shares with every other (secagg-num-shares = 1.0)"
        )
    if n > len(peers.peers):
        raise SecAggRefused(f"site {site} refuses a SecAgg+ round of {n} sites: it agreed to {len(peers.peers)} peers")
    if not (2 * t > n + c and t >= c + 2):
        raise SecAggRefused(
            f"site {site} refuses SecAgg+ with threshold {t} of {n} sites: assuming up to {c} colluding "
            f"sites (--max-colluders) it needs 2t > n + {c} and t >= {c + 2}"
        )
    ctxt.state.config_records[STATE_RECORD] = ConfigRecord(
        {"run": str(msg.metadata.run_id), "round": msg.metadata.group_id, "threshold": t, "sites": n}
    )


def _state(ctxt: Context, msg: Message, site: str, stage: str) -> ConfigRecord:
    state = ctxt.state.config_records.get(STATE_RECORD)
    if state is None or state["run"] != str(msg.metadata.run_id) or state["round"] != msg.metadata.group_id:
        raise SecAggRefused(f"site {site}: SecAgg+ {stage} for a round it did not set up")
    return state


def _signatures(msg: Message, site: str, stage: str) -> ConfigRecord:
    record = msg.content.config_records.get(SIGNATURES_RECORD)
    if record is None:
        raise SecAggRefused(
            f"site {site} refuses SecAgg+ {stage} without its peers' signatures: with --peers it takes part "
            "only in fedtune's signed SecAgg+ (run config secagg-active = true)"
        )
    return record


def _check_share_keys(msg: Message, ctxt: Context, configs: ConfigRecord, peers: PeerSet, site: str) -> None:
    state = _state(ctxt, msg, site, "share-keys")
    signatures = _signatures(msg, site, "share-keys")
    run_id, round_id = msg.metadata.run_id, msg.metadata.group_id
    signers: dict[int, str] = {}
    for sid, keys in configs.items():
        if sid == Key.STAGE:
            continue
        try:
            nid, (pk1, pk2) = int(sid), cast(list[bytes], keys)
        except (TypeError, ValueError):
            raise SecAggRefused(
                f"site {site}: SecAgg+ share-keys: {sid[:40]!r} is not a node and its two keys"
            ) from None
        signature = signatures.get(sid)
        name = None
        if isinstance(signature, bytes) and isinstance(pk1, bytes) and isinstance(pk2, bytes):
            name = peers.signer(signature, advertisement_bytes(run_id, round_id, nid, pk1, pk2))
        if name is None:
            raise SecAggRefused(
                f"site {site} refuses SecAgg+: node {nid}'s keys are not signed by any of its "
                f"{len(peers.peers)} peers (a site it never agreed to, or keys replaced on the way)"
            )
        if name in signers.values():
            raise SecAggRefused(f"site {site} refuses SecAgg+: peer {name} appears as two nodes")
        signers[nid] = name
    if signers.get(msg.metadata.dst_node_id) != peers.own_name():
        raise SecAggRefused(f"site {site} refuses SecAgg+: its own keys are missing or not its own")
    if len(signers) < int(state["threshold"]):  # type: ignore[arg-type]
        raise SecAggRefused(f"site {site} refuses SecAgg+ with {len(signers)} sites, below the threshold")
    if len(signers) > int(state["sites"]):  # type: ignore[arg-type]
        raise SecAggRefused(
            f"site {site} refuses SecAgg+ with {len(signers)} sites in the key exchange: the setup said {state['sites']}"
        )
    state["participants"] = sorted(signers)
    state["names"] = [signers[n] for n in sorted(signers)]


def _participants(state: ConfigRecord, site: str, stage: str) -> dict[int, str]:
    if "participants" not in state:
        raise SecAggRefused(f"site {site}: SecAgg+ {stage} before the key exchange")
    return dict(zip(cast(list[int], state["participants"]), cast(list[str], state["names"])))


def _consistency(msg: Message, ctxt: Context, configs: ConfigRecord, peers: PeerSet, site: str) -> Message:
    state = _state(ctxt, msg, site, "consistency")
    participants = _participants(state, site, "consistency")
    survivors = configs.get(SURVIVORS_KEY)
    if not isinstance(survivors, list) or not all(type(n) is int for n in survivors):  # noqa: E721
        raise SecAggRefused(f"site {site}: SecAgg+ consistency: the survivor list is missing")
    listed = sorted(set(cast(list[int], survivors)))
    if len(listed) != len(survivors) or not set(listed) <= set(participants):
        raise SecAggRefused(f"site {site} refuses to sign a survivor list naming sites outside the key exchange")
    if msg.metadata.dst_node_id not in listed:
        raise SecAggRefused(f"site {site} refuses to sign a survivor list without itself: it sent its vector")
    if len(listed) < int(state["threshold"]):  # type: ignore[arg-type]
        raise SecAggRefused(f"site {site} refuses to sign {len(listed)} survivors, below the threshold")
    if "signed" in state and list(state["signed"]) != listed:  # type: ignore[arg-type]
        raise SecAggRefused(f"site {site} refuses to sign a second, different survivor list for one round")
    state["signed"] = listed
    signature = sign(peers.identity, survivors_bytes(msg.metadata.run_id, msg.metadata.group_id, listed))
    return Message(RecordDict({SIGNATURES_RECORD: ConfigRecord({SIGNATURE_KEY: signature})}), reply_to=msg)


def _check_unmask(msg: Message, ctxt: Context, configs: ConfigRecord, peers: PeerSet, site: str) -> None:
    state = _state(ctxt, msg, site, "unmask")
    participants = _participants(state, site, "unmask")
    if "signed" not in state:
        raise SecAggRefused(f"site {site} refuses to unmask before it signed the survivor list")
    signed: list[int] = list(state["signed"])  # type: ignore[arg-type]
    active, dead = configs.get(Key.ACTIVE_NODE_ID_LIST), configs.get(Key.DEAD_NODE_ID_LIST)
    if not isinstance(active, list) or not isinstance(dead, list):
        raise SecAggRefused(f"site {site}: SecAgg+ unmask: the lists of active and dropped sites are missing")
    if sorted(set(cast(list[int], active))) != signed or len(active) != len(signed):
        raise SecAggRefused(f"site {site} refuses to unmask: the active sites are not the survivor list it signed")
    if not set(dead) <= set(participants) - set(signed) or len(set(dead)) != len(dead):
        raise SecAggRefused(f"site {site} refuses to unmask: the coordinator calls a survivor or a stranger dropped")
    signatures = _signatures(msg, site, "unmask")
    data = survivors_bytes(msg.metadata.run_id, msg.metadata.group_id, signed)
    agreeing = set()
    for sid, signature in signatures.items():
        try:
            nid = int(sid)
        except ValueError:
            continue
        if nid in signed and isinstance(signature, bytes) and peers.signer(signature, data) == participants[nid]:
            agreeing.add(nid)
    threshold = int(state["threshold"])  # type: ignore[arg-type]
    if len(agreeing) < threshold:
        raise SecAggRefused(
            f"site {site} refuses to unmask: only {len(agreeing)} of the {threshold} signatures it needs "
            "agree on its survivor list (the coordinator told sites different stories about who dropped)"
        )


def refuse_unsigned(configs: Any, site: str) -> None:
    """A site without --peers: fedtune's consistency stage is not for it."""
    if configs.get(Key.STAGE) == CONSISTENCY_STAGE:
        raise SecAggRefused(
            f"site {site} runs plain SecAgg+ (no --peers): it has no survivor list to sign for signed SecAgg+"
        )
