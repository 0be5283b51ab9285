"""A gate round's request to a site (`client/release_gate.py`): the release candidate's
model and version names, from the coordinator, so untrusted: bounded, checked names,
never a path. Light to import: the site's training path reads it on every fit."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

from fedtune.config import GATE_NAME
from fedtune.errors import FedtuneError
from fedtune.gate_counts import GATE_KEY

_NAME = re.compile(GATE_NAME)


@dataclass(frozen=True)
class GateRequest:
    """The candidate a gate round asks this site to score."""

    model: str
    version: str

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "GateRequest | None":
        raw = config.get(GATE_KEY)
        if raw is None:
            return None
        try:
            data = json.loads(str(raw)[:1000])
            model, version = str(data["model"]), str(data["version"])
        except (ValueError, KeyError, TypeError) as err:
            raise FedtuneError(f"gate request refused: not a model and version ({str(err)[:100]})") from None
        for kind, name in (("model", model), ("version", version)):
            if not name or not _NAME.match(name) or ".." in name:
                raise FedtuneError(f"gate request refused: {kind} name {name[:80]!r} is not a registry name")
        return cls(model, version)

    def to_config(self) -> str:
        return json.dumps({"model": self.model, "version": self.version})
