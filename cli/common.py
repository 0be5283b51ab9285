"""What every command group shares: `--set key=value` parsing and pinning path settings
to absolute paths before worker processes see them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import tomllib

from fedtune.errors import FedtuneError

PATH_KEYS_FROM_APP = ("data-path", "labels-file", "central-eval-path")


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`key=value` pairs (TOML values, bare strings allowed) into a dict."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise FedtuneError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = _parse_value(value.strip())
    return out


def absolute_paths(config: dict[str, Any]) -> dict[str, Any]:
    """Pin path settings to absolute paths so every worker process sees the same files."""
    from fedtune.config import resolve_path

    for key in PATH_KEYS_FROM_APP:
        if config.get(key):
            config[key] = str(resolve_path(str(config[key])).resolve())
    for key in ("output-dir", "site-state-dir"):
        if config.get(key):
            config[key] = str(Path(str(config[key])).expanduser().resolve())
    return config
