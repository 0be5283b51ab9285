"""What a site sets for itself, as one typed record: `NodeSettings`, parsed once from a
Flower node config (and, in simulation, the run config's `site-*` keys) and written back
by one writer. The keys, their names and what each mode means live here and nowhere else.

Modes: `simulated` (a virtual site: `partition-id` of the run's data set), `deployed` (a
SuperNode whose ClientApp trains itself: `data-path`, `state-dir`, `site-name` and the
privacy floor in the node config), and `worker` (a SuperNode that relays to the site
worker: `worker-socket` only; the worker holds the rest in its `SitePolicy`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping

from fedtune.config import RunSettings, resolve_path
from fedtune.errors import FedtuneError

if TYPE_CHECKING:
    from .privacy_floor import PrivacyFloor

Mode = Literal["simulated", "deployed", "worker"]

DATA_PATH = "data-path"
STATE_DIR = "state-dir"
SITE_NAME = "site-name"
WORKER_SOCKET = "worker-socket"
PARTITION_ID = "partition-id"  # Flower's, for virtual sites
NUM_PARTITIONS = "num-partitions"
GATE_REGISTRY = "gate-registry"  # the registry this site pulls release candidates from (host:port)
GATE_TRUST_KEY = "gate-trust-key"  # the public key a candidate must be signed with
GATE_REGISTRY_CA = "gate-registry-ca"  # the registry's TLS CA
REVEAL_GATE_DROP = "reveal-gate-drop"  # this site also sends its own accuracy drop, in the clear
LORA_RANK = "lora-rank"  # the LoRA rank this site affords (hetero-ranks runs); 0: the run's lora-r
MAX_TEXT = 4096  # a node config value that is a path or a name


def _text(node_config: Mapping[str, Any], key: str) -> str:
    value = node_config.get(key, "")
    text = "" if value is None else str(value)
    if len(text) > MAX_TEXT:
        raise FedtuneError(f"node config {key}: longer than {MAX_TEXT} characters")
    return text


def _rank(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= 1 << 16:  # noqa: E721 (bool is an int)
        raise FedtuneError(f"node config {LORA_RANK}: expected a rank (an integer >= 0), got {str(value)[:40]!r}")
    return value


def _simulated_rank(run: Mapping[str, Any], partition: int) -> int:
    """A virtual site's rank from the run's `site-lora-ranks` (simulation only)."""
    text = str(run.get("site-lora-ranks", "") or "")
    try:
        ranks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FedtuneError(f"site-lora-ranks {text[:80]!r}: comma-separated integers") from None
    return ranks[partition] if 0 <= partition < len(ranks) else 0


@dataclass(frozen=True)
class NodeSettings:
    """A site's own settings: where its data and state are, its name, its floor, its worker."""

    mode: Mode
    data_path: str = ""
    state_dir: str = ""
    site_name: str = ""
    worker_socket: str = ""  # the site worker to relay to (worker mode, or a simulation run through one worker)
    floor: PrivacyFloor | None = None  # None: no floor here (a relaying ClientApp never loads the floor's code)
    partition_id: int = 0
    num_partitions: int = 0
    gate_registry: str = ""
    gate_trust_key: str = ""
    gate_registry_ca: str = ""
    reveal_gate_drop: bool = False  # simulated sites: the operator's own, they reveal
    lora_rank: int = 0  # the LoRA rank this site trains (0: the run's lora-r); see `trained_rank`

    @classmethod
    def from_node_config(
        cls, node_config: Mapping[str, Any], run_config: Mapping[str, Any] | None = None
    ) -> "NodeSettings":
        """The one parse. In simulation, the run config's `site-state-dir` and
        `site-worker-socket` are the virtual sites' `state-dir` and `worker-socket`."""
        run = run_config or {}
        if _text(node_config, WORKER_SOCKET):
            return cls("worker", worker_socket=_text(node_config, WORKER_SOCKET))
        from .privacy_floor import PrivacyFloor  # not in worker mode: the worker holds the floor

        if _text(node_config, DATA_PATH):
            return cls(
                "deployed",
                data_path=_text(node_config, DATA_PATH),
                state_dir=_text(node_config, STATE_DIR),
                site_name=_text(node_config, SITE_NAME),
                floor=PrivacyFloor.from_node_config(node_config),
                gate_registry=_text(node_config, GATE_REGISTRY),
                gate_trust_key=_text(node_config, GATE_TRUST_KEY),
                gate_registry_ca=_text(node_config, GATE_REGISTRY_CA),
                reveal_gate_drop=node_config.get(REVEAL_GATE_DROP) is True,
                lora_rank=_rank(node_config.get(LORA_RANK, 0)),
            )
        try:
            part, parts = int(node_config.get(PARTITION_ID, 0)), int(node_config.get(NUM_PARTITIONS, 0))
        except (TypeError, ValueError):
            raise FedtuneError(f"node config {PARTITION_ID}/{NUM_PARTITIONS}: expected integers") from None
        return cls(
            "simulated",
            state_dir=_text(node_config, STATE_DIR) or str(run.get("site-state-dir", "") or ""),
            site_name=_text(node_config, SITE_NAME),
            worker_socket=str(run.get("site-worker-socket", "") or ""),
            floor=PrivacyFloor.from_node_config(node_config),
            partition_id=part,
            num_partitions=parts,
            reveal_gate_drop=True,
            lora_rank=_simulated_rank(run, part),
        )

    def to_node_config(self) -> dict[str, Any]:
        """The one writer: the node-config keys these settings stand for (only those set)."""
        if self.mode == "worker":
            return {WORKER_SOCKET: self.worker_socket}
        out: dict[str, Any] = {}
        if self.mode == "deployed":
            out[DATA_PATH] = self.data_path
        else:
            out.update({PARTITION_ID: self.partition_id, NUM_PARTITIONS: self.num_partitions})
        for key, value in (
            (STATE_DIR, self.state_dir),
            (SITE_NAME, self.site_name),
            (GATE_REGISTRY, self.gate_registry),
            (GATE_TRUST_KEY, self.gate_trust_key),
            (GATE_REGISTRY_CA, self.gate_registry_ca),
        ):
            if value:
                out[key] = value
        if self.mode == "deployed" and self.reveal_gate_drop:
            out[REVEAL_GATE_DROP] = True
        if self.mode == "deployed" and self.lora_rank:
            out[LORA_RANK] = self.lora_rank
        return {**out, **(self.floor.to_node_config() if self.floor else {})}

    def supernode_flag(self) -> str:
        """These settings as `flower-supernode --node-config` takes them (TOML values)."""
        from fedtune.run_config_table import toml_value

        return " ".join(f"{key}={toml_value(value)}" for key, value in self.to_node_config().items())

    @property
    def on_a_supernode(self) -> bool:
        """A real site behind a SuperNode (not a virtual one of the Simulation Engine)."""
        return self.mode != "simulated"

    @property
    def name(self) -> str:
        """The site's name as its metrics show it, without reading its data."""
        if self.site_name:
            return self.site_name
        if self.data_path:
            return resolve_path(self.data_path).stem
        return f"site-{self.partition_id}"

    def trained_rank(self, settings: RunSettings) -> int:
        """The LoRA rank this site trains in a run: its own where it set one, refused in one
        line above the federation's `lora-r`, or below it in a run without `hetero-ranks`."""
        rank = self.lora_rank or settings.lora_r
        if rank > settings.lora_r:
            raise FedtuneError(
                f"site {self.name} declares LoRA rank {rank}, above the federation's lora-r = {settings.lora_r}: "
                "refused (the aggregate has the federation's rank)"
            )
        if rank < settings.lora_r and not settings.hetero_ranks:
            raise FedtuneError(
                f"site {self.name} affords LoRA rank {rank}, below this run's lora-r = {settings.lora_r}, and the "
                "run does not take per-site ranks (hetero-ranks = false)"
            )
        return rank

    def state_folder(self, settings: RunSettings) -> Path:
        """Where the site keeps state across restarts: its own `state-dir`, else the run's `site-state-dir`."""
        return Path(self.state_dir or settings.site_state_dir).expanduser()
