"""A gate round's request to a site (`fedtune gate`): the release candidate's model and
version names and, for an adapter-only candidate, the released base version it applies to.
The coordinator writes it (`server/release_gate.py`); at the site it arrives from the
coordinator, so untrusted: bounded, checked names, never a path. Light to import: the
site's training path reads it on every fit."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

from .config import GATE_NAME
from .errors import FedtuneError
from .gate_counts import GATE_KEY

_NAME = re.compile(GATE_NAME)
_MAX_CHARS = 1000


@dataclass(frozen=True)
class GateRequest:
    """The candidate a gate round asks every site to score. `base_version` is set for an
    adapter-only update: the release of `model` it is an adapter for, which the site pulls
    first, as a device already holds it."""

    model: str
    version: str
    base_version: str = ""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "GateRequest | None":
        raw = config.get(GATE_KEY)
        if raw is None:
            return None
        try:
            data = json.loads(str(raw)[:_MAX_CHARS])
            model, version = str(data["model"]), str(data["version"])
            base = str(data.get("base_version", ""))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise FedtuneError(f"gate request refused: not a model and version ({str(err)[:100]})") from None
        for kind, name, required in (("model", model, True), ("version", version, True), ("base version", base, False)):
            if (required and not name) or not _NAME.match(name) or ".." in name:
                raise FedtuneError(f"gate request refused: {kind} name {name[:80]!r} is not a registry name")
        if base == version:
            raise FedtuneError(f"gate request refused: the candidate {version!r} cannot be its own base")
        return cls(model, version, base)

    def to_config(self) -> str:
        fields = {"model": self.model, "version": self.version}
        return json.dumps({**fields, "base_version": self.base_version} if self.base_version else fields)
