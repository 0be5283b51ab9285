"""A site's own privacy floor, from its node config, whatever the run config says:
`require-secagg` (the run must use SecAgg+), `max-epsilon` and `max-delta` (the run must
use DP-SGD at the site with a δ no larger, and the site trains no round after which its
own accountant's ε would pass the ceiling). Under distributed DP the ceiling applies to the
ε of the summed noise shares, which trusts the other sites to add theirs; with
`own-noise-only = true` it applies to the ε of this site's own shares alone. A run that asks
for less is refused with one line naming the site and the key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from fedtune.config import RunSettings
from fedtune.errors import FedtuneError


class PrivacyFloorError(FedtuneError):
    """The run asks less privacy than this site allows."""


def _flag(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


@dataclass(frozen=True)
class PrivacyFloor:
    require_secagg: bool = False
    max_epsilon: float = 0.0  # 0: no ceiling
    max_delta: float = 0.0  # 0: no ceiling
    own_noise_only: bool = False  # distributed DP: the ceiling counts only this site's own noise shares

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "PrivacyFloor":
        try:
            return cls(
                require_secagg=_flag(node_config.get("require-secagg", False)),
                max_epsilon=float(node_config.get("max-epsilon", 0.0) or 0.0),
                max_delta=float(node_config.get("max-delta", 0.0) or 0.0),
                own_noise_only=_flag(node_config.get("own-noise-only", False)),
            )
        except ValueError as err:
            raise FedtuneError(f"node config: max-epsilon/max-delta must be numbers ({err})") from None

    def to_node_config(self) -> dict[str, Any]:
        """The floor as node-config keys (only those set)."""
        out: dict[str, Any] = {}
        if self.require_secagg:
            out["require-secagg"] = True
        if self.max_epsilon > 0:
            out["max-epsilon"] = self.max_epsilon
        if self.max_delta > 0:
            out["max-delta"] = self.max_delta
        if self.own_noise_only:
            out["own-noise-only"] = True
        return out

    def check_run(self, settings: RunSettings, site: str) -> None:
        """Refuse a run whose settings ask for less than this site's floor."""
        if self.require_secagg and not settings.secagg:
            raise PrivacyFloorError(
                f"site {site} requires SecAgg+ (node config require-secagg=true); the run has secagg=false"
            )
        if self.max_epsilon > 0 or self.max_delta > 0:
            if not settings.dp:
                raise PrivacyFloorError(
                    f"site {site} allows at most epsilon={self.max_epsilon:g} (node config "
                    f"max-epsilon); the run has dp=false"
                )
            delta_limit = self.max_delta or 1e-5
            if settings.dp_delta > delta_limit:
                raise PrivacyFloorError(
                    f"site {site} allows at most delta={delta_limit:g} (node config max-delta); "
                    f"the run has dp-delta={settings.dp_delta:g}"
                )
            if (
                self.max_epsilon > 0
                and settings.dp_noise_multiplier <= 0
                and settings.dp_target_epsilon > self.max_epsilon
            ):
                raise PrivacyFloorError(
                    f"site {site} allows at most epsilon={self.max_epsilon:g} (node config "
                    f"max-epsilon); the run targets dp-target-epsilon={settings.dp_target_epsilon:g}"
                )

    def check_round(self, epsilon_after: float, epsilon_now: float, server_round: int, site: str) -> None:
        """Stop before a round that would take the site's own ε past its ceiling."""
        if self.max_epsilon > 0 and epsilon_after > self.max_epsilon:
            raise PrivacyFloorError(
                f"site {site} stops before round {server_round}: its epsilon would reach "
                f"{epsilon_after:.3f}, above its ceiling {self.max_epsilon:g} (spent so far: "
                f"{epsilon_now:.3f})"
            )
