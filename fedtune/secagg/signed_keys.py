"""What fedtune's actively secure SecAgg+ signs, and with which keys (Bonawitz et al., CCS
2017, "active adversary" version; Bell et al., CCS 2020): each site signs its key
advertisement (its two SecAgg+ public keys) and, before unmasking, the list of survivors it
was given, with its long-term identity key (the site's SuperNode key, EC P-384 or Ed25519
in OpenSSH format). Peers verify with the public keys the sites exchanged among themselves,
never through the coordinator.

Every signed message binds the run and the round (the message's `run_id` and `group_id`)
and a domain string, so a signature can be neither replayed into another round nor taken
for a signature over something else. The coordinator only forwards signatures: this module
is shared by the site, which signs and verifies, and the coordinator, which carries them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedtune.errors import FedtuneError

ADVERTISEMENT_DOMAIN = b"fedtune/secagg-active/advertisement/v1"
SURVIVORS_DOMAIN = b"fedtune/secagg-active/survivors/v1"
# The record (next to Flower's SecAgg+ configs) that carries signatures both ways.
SIGNATURES_RECORD = "fedtune-secagg-signatures"
SIGNATURE_KEY = "signature"  # a site's own signature, in its reply
CONSISTENCY_STAGE = "fedtune-consistency"  # the stage between collecting masked vectors and unmasking
SURVIVORS_KEY = "survivors"
MAX_SIGNATURE_BYTES = 256  # P-384 DER signatures are at most 104 bytes, Ed25519's 64
MAX_PEERS = 1024

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class PeerError(FedtuneError):
    """A peer set or identity key that cannot be used."""


def _frame(*parts: bytes) -> bytes:
    """Length-prefixed parts: no two different tuples give the same bytes."""
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def advertisement_bytes(run_id: int, round_id: str, node_id: int, pk1: bytes, pk2: bytes) -> bytes:
    """What a site signs at setup: its SecAgg+ public keys, as node `node_id` of this round."""
    return _frame(ADVERTISEMENT_DOMAIN, str(run_id).encode(), round_id.encode(), str(node_id).encode(), pk1, pk2)


def survivors_bytes(run_id: int, round_id: str, survivors: Sequence[int]) -> bytes:
    """What a site signs in the consistency round: the sorted list of surviving node ids."""
    listed = ",".join(str(n) for n in sorted(survivors)).encode()
    return _frame(SURVIVORS_DOMAIN, str(run_id).encode(), round_id.encode(), listed)


def sign(key: PrivateKey, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA384()))
    return key.sign(data)


def verifies(key: PublicKey, signature: bytes, data: bytes) -> bool:
    if not isinstance(signature, bytes) or len(signature) > MAX_SIGNATURE_BYTES:
        return False
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hashes.SHA384()))
        else:
            key.verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def _public_bytes(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def fingerprint(key: PublicKey) -> str:
    return hashlib.sha256(_public_bytes(key)).hexdigest()[:16]


def load_identity_key(path: Path) -> PrivateKey:
    """A site's private identity key (its SuperNode key: OpenSSH EC or Ed25519)."""
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except OSError as err:
        raise PeerError(f"{path}: {err.strerror}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise PeerError(f"{path}: not an unencrypted OpenSSH private key ({str(err)[:80]})") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
        raise PeerError(f"{path}: an identity key is EC or Ed25519, not {type(key).__name__}")
    return key


def load_public_key(path: Path) -> PublicKey:
    try:
        key = serialization.load_ssh_public_key(path.read_bytes().split(b"\n")[0].strip())
    except OSError as err:
        raise PeerError(f"{path}: {err.strerror}") from None
    except (ValueError, TypeError, IndexError, UnsupportedAlgorithm) as err:
        raise PeerError(f"{path}: not an OpenSSH public key ({str(err)[:80]})") from None
    if not isinstance(key, (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
        raise PeerError(f"{path}: a peer's key is EC or Ed25519, not {type(key).__name__}")
    return key


@dataclass(frozen=True)
class PeerSet:
    """The sites this site agreed, out of band, to aggregate with (itself included), and
    the most of them it assumes may collude with the coordinator."""

    identity: PrivateKey
    peers: dict[str, PublicKey] = field(repr=False)
    max_colluders: int = 0

    @classmethod
    def load(cls, identity_key: Path, peers_dir: Path, max_colluders: int = 0) -> "PeerSet":
        """`peers_dir` holds one `NAME.pub` per peer (its SuperNode public key); this site's
        own public key is added if it is not there."""
        identity = load_identity_key(identity_key)
        if not peers_dir.is_dir():
            raise PeerError(f"--peers {peers_dir}: not a folder of the peers' .pub files")
        files = sorted(peers_dir.glob("*.pub"))
        if not files:
            raise PeerError(f"--peers {peers_dir}: no .pub files (one per peer site)")
        if len(files) > MAX_PEERS:
            raise PeerError(f"--peers {peers_dir}: more than {MAX_PEERS} peers")
        peers = {f.stem: load_public_key(f) for f in files}
        own = _public_bytes(identity.public_key())
        if not any(_public_bytes(k) == own for k in peers.values()):
            peers["(this site)"] = identity.public_key()
        seen: dict[bytes, str] = {}
        for name, key in peers.items():
            if _public_bytes(key) in seen:
                raise PeerError(f"--peers {peers_dir}: {name} and {seen[_public_bytes(key)]} hold the same key")
            seen[_public_bytes(key)] = name
        if max_colluders < 0:
            raise PeerError(f"--max-colluders must be 0 or more, got {max_colluders}")
        return cls(identity, peers, max_colluders)

    def signer(self, signature: bytes, data: bytes) -> str | None:
        """The peer whose key verifies `signature` over `data`, or None."""
        for name, key in self.peers.items():
            if verifies(key, signature, data):
                return name
        return None

    def own_name(self) -> str:
        own = _public_bytes(self.identity.public_key())
        return next(n for n, k in self.peers.items() if _public_bytes(k) == own)
