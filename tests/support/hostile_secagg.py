"""A coordinator that cheats at SecAgg+, built by the tests: it drives sites running the
site's own SecAgg+ code (`client/secagg_setup.py: run_secaggplus`, the function the site
worker calls, with or without `--peers`) through the protocol's stages, deviating as the
attacks in Bonawitz et al. (CCS 2017) and Bell et al. (CCS 2020) describe, and then tries
to recover one target site's update from everything it received (and from the secrets of
the sites it controls). Each attack returns what it recovered, if anything, and what the
honest sites refused."""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
from flwr.common import Code, FitIns, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from fedtune.client.secagg_guard import check_stage_request, protocol_state
from fedtune.client.secagg_setup import run_secaggplus
from fedtune.errors import FedtuneError
from fedtune.secagg.masks import csprng_rand_gen
from fedtune.secagg.signed_keys import (
    CONSISTENCY_STAGE,
    SIGNATURE_KEY,
    SIGNATURES_RECORD,
    SURVIVORS_KEY,
    PeerSet,
    advertisement_bytes,
    load_identity_key,
    sign,
)

RUN_ID, ROUND = 4711, "1"
CLIP, Q, M, WEIGHT = 4.0, 1 << 22, 1 << 32, 10.0


def canned_update(seed: int) -> list[np.ndarray]:
    """The update a site sends in these tests (its training replaced: SecAgg+ is the subject)."""
    return [np.random.default_rng(seed).uniform(-0.5, 0.5, size=(4, 6)).astype(np.float32)]


def canned_fit_reply(msg: Message, seed: int) -> Message:
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(canned_update(seed)), int(WEIGHT), {})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def stage_message(nid: int, configs: dict[str, Any], signatures: dict[str, bytes] | None, fit: bool) -> Message:
    """A SecAgg+ stage message as the coordinator sends it (with signatures for signed SecAgg+)."""
    content = RecordDict()
    if fit:
        content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(canned_update(0)), {}), keep_input=True)
    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(configs)  # type: ignore[arg-type]
    if signatures is not None:
        content.config_records[SIGNATURES_RECORD] = ConfigRecord(signatures)  # type: ignore[arg-type]
    return Message(content=content, dst_node_id=nid, message_type=MessageType.TRAIN, group_id=ROUND)


ROLE_RECORD = "test-role"  # a message the Controlled mod answers with the node's partition


@dataclass(frozen=True)
class Controlled:
    """Outermost mod at the virtual sites of a hostile-ServerApp test. Every node answers a
    role query with its partition. A node in `sybils` is the coordinator's own: it runs
    plain SecAgg+ outside the product's mods and signs its keys with a key that is no
    member's; a node in `colluders` is a member site that also hands the coordinator what it
    holds. Both write their SecAgg+ state to `folder` after each stage (what the coordinator
    then knows)."""

    folder: str
    sybils: frozenset[int] = frozenset()
    colluders: frozenset[int] = frozenset()

    def __call__(self, msg: Message, ctxt: Context, call_next: Any) -> Message:
        partition = int(ctxt.node_config.get("partition-id", -1))
        nid = msg.metadata.dst_node_id
        if ROLE_RECORD in msg.content.config_records:
            return Message(RecordDict({ROLE_RECORD: ConfigRecord({"partition": partition})}), reply_to=msg)
        if partition in self.sybils:
            reply = run_secaggplus(msg, ctxt, lambda m, c: canned_fit_reply(m, nid), None, f"sybil {nid}")
            if not reply.has_error() and Key.PUBLIC_KEY_1 in reply.content.config_records[RECORD_KEY_CONFIGS]:
                keys = reply.content.config_records[RECORD_KEY_CONFIGS]
                data = advertisement_bytes(
                    msg.metadata.run_id, msg.metadata.group_id, nid, keys[Key.PUBLIC_KEY_1], keys[Key.PUBLIC_KEY_2]
                )  # type: ignore[arg-type]
                signature = sign(_sybil_key(Path(self.folder), nid), data)
                reply.content.config_records[SIGNATURES_RECORD] = ConfigRecord({SIGNATURE_KEY: signature})
        else:
            reply = call_next(msg, ctxt)
        if partition in self.sybils | self.colluders and RECORD_KEY_STATE in ctxt.state.config_records:
            state = dict(ctxt.state.config_records[RECORD_KEY_STATE])
            (Path(self.folder) / f"state-{nid}.pickle").write_bytes(pickle.dumps(state))
        return reply


def _sybil_key(folder: Path, nid: int) -> Any:
    from fedtune.client.deployment import site_keypair

    path = folder / f"sybil-{nid}" / f"sybil-{nid}.key"
    if not path.exists():
        site_keypair(path.parent, f"sybil-{nid}")
    return load_identity_key(path)


class GridSite:
    """A site of a real Flower federation, reached through a hostile ServerApp's grid; what
    a node the coordinator controls holds is read from its Controlled mod's files."""

    def __init__(self, grid: Any, nid: int, folder: Path, identity: Path | None = None) -> None:
        self.grid, self.nid, self.name, self.folder = grid, nid, f"node {nid}", folder
        self.update = canned_update(nid)
        self.refusals: list[str] = []
        self.peers = PeerSet(load_identity_key(identity), {}) if identity else None  # a colluder's key

    def secrets(self) -> SecAggPlusState:
        """Empty if the node's own code refused the round (a member that colludes runs the site's code)."""
        path = self.folder / f"state-{self.nid}.pickle"
        return SecAggPlusState(**pickle.loads(path.read_bytes())) if path.exists() else SecAggPlusState()

    @staticmethod
    def roles(grid: Any, sites: int, timeout: float = 60.0) -> dict[int, int]:
        """partition -> node id, asked of every node (its Controlled mod answers), once
        all `sites` have joined."""
        deadline = time.monotonic() + timeout
        while len(list(grid.get_node_ids())) < sites and time.monotonic() < deadline:
            time.sleep(0.5)
        out = {}
        for nid in grid.get_node_ids():
            query = Message(
                RecordDict({ROLE_RECORD: ConfigRecord({})}), dst_node_id=nid, message_type=MessageType.QUERY
            )
            reply = list(grid.send_and_receive([query], timeout=60))[0]
            out[int(reply.content.config_records[ROLE_RECORD]["partition"])] = nid  # type: ignore[arg-type]
        return out

    def send(self, configs: dict[str, Any], signatures: dict[str, bytes] | None = None, fit: bool = False) -> Any:
        replies = list(self.grid.send_and_receive([stage_message(self.nid, configs, signatures, fit)], timeout=120))
        if not replies or replies[0].has_error():
            self.refusals.append(replies[0].error.reason if replies else "no reply")
            return None
        return replies[0].content


class Site:
    """One site running the site's own SecAgg+ code; `peers` None runs plain SecAgg+."""

    def __init__(self, nid: int, name: str, peers: PeerSet | None, seed: int) -> None:
        self.nid, self.name, self.peers = nid, name, peers
        self.update = canned_update(seed)
        self.context = Context(
            run_id=RUN_ID,
            node_id=nid,
            node_config={"partition-id": nid % 1000, "num-partitions": 1000},
            state=RecordDict(),
            run_config={},
        )
        self.refusals: list[str] = []

    def send(self, configs: dict[str, Any], signatures: dict[str, bytes] | None = None, fit: bool = False) -> Any:
        """The site's reply to one stage message (its configs record), or None if it refused."""
        msg = stage_message(self.nid, configs, signatures, fit)
        try:  # as the site worker runs it: fedtune's own checks, then (signed) SecAgg+ around Flower's mod
            check_stage_request(
                msg.content.config_records[RECORD_KEY_CONFIGS], protocol_state(self.context.state), 2, self.name
            )
            reply = run_secaggplus(msg, self.context, self._train, self.peers, self.name)
        except (FedtuneError, ValueError, KeyError, TypeError) as err:
            self.refusals.append(str(err))
            return None
        return reply.content

    def _train(self, msg: Message, ctxt: Context) -> Message:
        return canned_fit_reply(msg, self.nid)

    def secrets(self) -> SecAggPlusState:
        """What a site the coordinator controls knows (its Flower SecAgg+ state)."""
        return SecAggPlusState(**self.context.state.config_records[RECORD_KEY_STATE])


def signed_peers(folder: Path, names: list[str]) -> dict[str, Path]:
    """Each named site's SuperNode key pair, the public halves in `folder/peers`."""
    from fedtune.client.deployment import site_keypair

    keys = {}
    for name in names:
        private, public = site_keypair(folder / "keys" / name, name)
        (folder / "peers").mkdir(parents=True, exist_ok=True)
        (folder / "peers" / public.name).write_bytes(public.read_bytes())
        keys[name] = private
    return keys


@dataclass
class Round:
    """One protocol run driven by the coordinator; the `view` of the keys is its to shape."""

    sites: dict[int, Any]  # Site (in process) or GridSite (through a ServerApp's grid)
    threshold: int
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # what each site advertised
    ads: dict[int, bytes] = field(default_factory=dict)  # its signatures over them
    outbox: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)  # dst -> [(src, ciphertext)]
    masked: dict[int, list[np.ndarray]] = field(default_factory=dict)
    survivor_sigs: dict[int, bytes] = field(default_factory=dict)
    b_shares: dict[int, list[bytes]] = field(default_factory=dict)  # node -> revealed self-mask seed shares
    sk1_shares: dict[int, list[bytes]] = field(default_factory=dict)  # node -> revealed mask-key shares
    target_view: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # the keys the target was shown
    partners: list[int] = field(default_factory=list)  # whose shares the target was forwarded

    def setup(self, n: int | None = None) -> None:
        n = n or len(self.sites)
        configs = {
            Key.STAGE: Stage.SETUP,
            Key.SAMPLE_NUMBER: n,
            Key.SHARE_NUMBER: n,
            Key.THRESHOLD: self.threshold,
            Key.CLIPPING_RANGE: CLIP,
            Key.TARGET_RANGE: Q,
            Key.MOD_RANGE: M,
            Key.MAX_WEIGHT: WEIGHT,
        }
        for nid, site in self.sites.items():
            reply = site.send(dict(configs))
            if reply is None:
                continue
            got = reply.config_records[RECORD_KEY_CONFIGS]
            self.keys[nid] = (got[Key.PUBLIC_KEY_1], got[Key.PUBLIC_KEY_2])
            record = reply.config_records.get(SIGNATURES_RECORD)
            if record is not None:
                self.ads[nid] = record[SIGNATURE_KEY]

    def share_keys(self, nid: int, view: dict[int, tuple[bytes, bytes]] | None = None) -> bool:
        """Send site `nid` the keys (the honest view: every advertised key), with signatures."""
        view = dict(self.keys) if view is None else view
        configs: dict[str, Any] = {str(k): list(v) for k, v in view.items()}
        configs[Key.STAGE] = Stage.SHARE_KEYS
        signatures = {str(k): self.ads[k] for k in view if k in self.ads}
        reply = self.sites[nid].send(configs, signatures if self.ads else None)  # Flower's own workflow: none
        if reply is None:
            return False
        got = reply.config_records[RECORD_KEY_CONFIGS]
        for dst, ciphertext in zip(got[Key.DESTINATION_LIST], got[Key.CIPHERTEXT_LIST]):
            self.outbox.setdefault(dst, []).append((nid, ciphertext))
        return True

    def collect(self, nid: int, forward: list[tuple[int, bytes]] | None = None) -> bool:
        forward = self.outbox.get(nid, []) if forward is None else forward
        configs = {
            Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
            Key.CIPHERTEXT_LIST: [c for _, c in forward],
            Key.SOURCE_LIST: [s for s, _ in forward],
        }
        reply = self.sites[nid].send(configs, fit=True)
        if reply is None:
            return False
        vectors = reply.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
        self.masked[nid] = [bytes_to_ndarray(v).astype(np.int64) for v in vectors]
        return True

    def consistency(self, nid: int, survivors: list[int]) -> bool:
        reply = self.sites[nid].send({Key.STAGE: CONSISTENCY_STAGE, SURVIVORS_KEY: sorted(survivors)})
        if reply is None:
            return False
        self.survivor_sigs[nid] = reply.config_records[SIGNATURES_RECORD][SIGNATURE_KEY]
        return True

    def unmask(self, nid: int, active: list[int], dead: list[int], signatures: dict[int, bytes] | None = None) -> bool:
        """Ask site `nid` for its shares (with survivor-list signatures: all it got, or these)."""
        configs = {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead}
        signed = self.survivor_sigs if signatures is None else signatures
        reply = self.sites[nid].send(configs, {str(k): v for k, v in signed.items()})
        if reply is None:
            return False
        got = reply.config_records[RECORD_KEY_CONFIGS]
        for owner, share in zip(got[Key.NODE_ID_LIST], got[Key.SHARE_LIST]):
            (self.b_shares if owner in active else self.sk1_shares).setdefault(owner, []).append(share)
        return True

    def learn_from(self, controlled: Site) -> None:
        """A site the coordinator controls hands over the shares it holds of everyone."""
        state = controlled.secrets()
        for owner, share in getattr(state, "rd_seed_share_dict", {}).items():
            self.b_shares.setdefault(owner, []).append(share)
        for owner, share in getattr(state, "sk1_share_dict", {}).items():
            self.sk1_shares.setdefault(owner, []).append(share)

    def recover(self, target: int, pair_secrets: dict[int, bytes] | None = None) -> list[np.ndarray] | None:
        """The target's update, if what the coordinator holds is enough: its masked vector,
        t shares of its self-mask seed, and each pairwise secret (from t shares of its mask
        key, or given: the coordinator's own keys or those of sites it controls)."""
        if target not in self.masked or len(set(self.b_shares.get(target, []))) < self.threshold:
            return None
        b_seed = combine_shares(list(set(self.b_shares[target])))
        secrets = dict(pair_secrets or {})
        if len(set(self.sk1_shares.get(target, []))) >= self.threshold:
            sk1 = bytes_to_private_key(combine_shares(list(set(self.sk1_shares[target]))))
            for nid, (pk1, _) in self.target_view.items():
                secrets.setdefault(nid, generate_shared_key(sk1, bytes_to_public_key(pk1)))
        partners = [nid for nid in self.partners if nid != target]
        if any(nid not in secrets for nid in partners):
            return None
        vector = list(self.masked[target])
        dims = [a.shape for a in vector]
        vector = [v - m for v, m in zip(vector, csprng_rand_gen(b_seed, M, dims))]
        for nid in partners:
            mask = csprng_rand_gen(secrets[nid], M, dims)
            vector = [v - m if target > nid else v + m for v, m in zip(vector, mask)]
        vector = [np.mod(v, M) for v in vector]
        return dequantize(vector[1:], CLIP, Q)


def fake_keys() -> tuple[bytes, bytes, bytes, bytes]:
    """A key pair pair of the coordinator's own: (sk1, pk1, sk2, pk2) as bytes."""
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    return private_key_to_bytes(sk1), public_key_to_bytes(pk1), private_key_to_bytes(sk2), public_key_to_bytes(pk2)


def relay_as(sk2: bytes, honest_pk2: bytes, src: int, dst: int) -> bytes:
    """A share message the coordinator forges from node `src` (its fake keys) to `dst`."""
    key = generate_shared_key(bytes_to_private_key(sk2), bytes_to_public_key(honest_pk2))
    return encrypt(key, share_keys_plaintext_concat(src, dst, b"\x00" * 32, b"\x00" * 32))


def read_share(sk2: bytes, sender_pk2: bytes, ciphertext: bytes) -> tuple[bytes, bytes]:
    """A share message sent to the coordinator's fake key: (self-mask seed share, mask-key share)."""
    key = generate_shared_key(bytes_to_private_key(sk2), bytes_to_public_key(sender_pk2))
    _, _, b_share, sk1_share = share_keys_plaintext_separate(decrypt(key, ciphertext))
    return b_share, sk1_share


def pair_secret(controlled_sk1: bytes, other_pk1: bytes) -> bytes:
    return generate_shared_key(bytes_to_private_key(controlled_sk1), bytes_to_public_key(other_pk1))
