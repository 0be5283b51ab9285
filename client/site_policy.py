"""A site's own policy, owned by its site worker and read once at the worker's start (its
command line): which data file it trains on, where it keeps state, its name, its privacy
floor, the smallest SecAgg+ setup it takes part in, and which local accounts may talk to
it. Nothing that arrives in a message can change it: a message can only ask, and the
worker answers from this record. Imports no torch."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.errors import FedtuneError

from .node_settings import NodeSettings
from .privacy_floor import PrivacyFloor

if TYPE_CHECKING:
    from fedtune.secagg.signed_keys import PeerSet

# The fewest sites whose sum the coordinator may unmask (SecAgg+'s reconstruction threshold):
# with 1 it could run the protocol with this site alone and read its update.
DEFAULT_MIN_SECAGG_SITES = 2
MAX_SITE_NAME = 64
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_RUN_SLUG = re.compile(r"[^a-z0-9]+")


def check_site_name(name: str) -> str:
    """A site's name: letters, digits, '.', '_', '-' (it names files in its state folder)."""
    if not _SITE_NAME.match(name):
        raise FedtuneError(
            f"site name {name!r}: use 1-{MAX_SITE_NAME} letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit"
        )
    return name


def run_key(run_id: Any) -> str:
    """The fixed-format key a site files one run's state under, from the run id a message
    carries (untrusted: never a path): a short slug of it and 16 hex digits of its SHA-256."""
    text = str(run_id)[:4096]
    slug = _RUN_SLUG.sub("-", text.lower()).strip("-")[:40] or "run"
    return f"{slug}-{hashlib.sha256(text.encode('utf-8', 'replace')).hexdigest()[:16]}"


def check_gate_pair(registry: str | None, trust_key: object) -> None:
    """The release gate's registry and the key a candidate must be signed with come together."""
    if bool(registry) != bool(trust_key):
        raise FedtuneError("--gate-registry and --gate-trust-key go together: the registry and whose key to trust")


@dataclass(frozen=True)
class SitePolicy:
    """What the site decided, before any coordinator spoke."""

    name: str
    data_path: Path
    state_dir: Path
    floor: PrivacyFloor = PrivacyFloor()
    min_secagg_sites: int = DEFAULT_MIN_SECAGG_SITES
    allowed_uids: tuple[int, ...] = ()  # local accounts (besides the worker's own) that may use the worker
    val_fraction: float | None = None  # the site's own validation split (None: the run's val-fraction)
    gate_registry: str = ""  # the release gate: the registry this site pulls candidates from (host:port)
    gate_trust_key: Path | None = None  # ... the public key a candidate must be signed with
    gate_registry_ca: Path | None = None  # ... the registry's TLS CA
    reveal_gate_drop: bool = False  # ... and whether this site sends its own accuracy drop in the clear
    peers_dir: Path | None = None  # signed SecAgg+: the peers' public keys, agreed among the sites
    identity_key: Path | None = None  # ... the key this site signs with (its SuperNode key)
    max_colluders: int = 0  # ... the most sites it assumes may collude with the coordinator
    lora_rank: int = 0  # the LoRA rank this site affords in hetero-ranks runs (0: the run's lora-r)

    def __post_init__(self) -> None:
        check_site_name(self.name)
        check_gate_pair(self.gate_registry, self.gate_trust_key)
        if self.val_fraction is not None and not 0.0 <= self.val_fraction < 1.0:
            raise FedtuneError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.peers_dir is not None and self.identity_key is None:
            raise FedtuneError("--peers needs --identity-key: the key this site signs its SecAgg+ keys with")
        if self.max_colluders and self.peers_dir is None:
            raise FedtuneError("--max-colluders applies to signed SecAgg+: give the peers with --peers DIR")
        if self.lora_rank < 0:
            raise FedtuneError(f"--lora-rank must be 1 or more (0: the run's lora-r), got {self.lora_rank}")
        if self.min_secagg_sites < 2:
            raise FedtuneError(
                f"--min-secagg-sites must be at least 2 (with 1 the coordinator could unmask this "
                f"site alone), got {self.min_secagg_sites}"
            )

    def peer_set(self) -> "PeerSet | None":
        """The peers this site aggregates with under signed SecAgg+, loaded and checked once."""
        if self.peers_dir is None or self.identity_key is None:
            return None
        from fedtune.secagg.signed_keys import PeerSet

        return PeerSet.load(self.identity_key, self.peers_dir, self.max_colluders)

    def run_settings(self, settings: Any) -> Any:
        """The run's settings with what the site decides put over them (its validation split)."""
        return settings if self.val_fraction is None else replace(settings, val_fraction=self.val_fraction)

    def node_settings(self) -> NodeSettings:
        """The node settings the site's work reads, from the policy (never from a message)."""
        return NodeSettings(
            "deployed",
            data_path=str(self.data_path),
            state_dir=str(self.state_dir),
            site_name=self.name,
            floor=self.floor,
            gate_registry=self.gate_registry,
            gate_trust_key=str(self.gate_trust_key or ""),
            gate_registry_ca=str(self.gate_registry_ca or ""),
            reveal_gate_drop=self.reveal_gate_drop,
            lora_rank=self.lora_rank,
        )
