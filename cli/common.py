"""What every command group shares: `--run-config FILE` and `--set key=value` parsing,
`flwr run`-style `--run-config 'key=value ...'` parsing, and pinning path settings to
absolute paths before worker processes (or an installed app copy) see them."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterable, Sequence

import tomllib

from fedtune.errors import FedtuneError

PATH_KEYS_FROM_APP = ("data-path", "labels-file", "central-eval-path")


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def run_config_keys() -> set[str]:
    """Every run-config key fedtune knows."""
    from fedtune.config import RunSettings

    return set(RunSettings().to_run_config())


def unknown_key(where: str, key: str, known: Iterable[str]) -> FedtuneError:
    """'unknown key' naming the closest valid key, if one is close."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else " (see [tool.flwr.app.config] in pyproject.toml)"
    return FedtuneError(f"{where}: unknown key {key!r}{hint}")


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`key=value` pairs (TOML values, bare strings allowed) into a dict; every key
    must be one fedtune knows."""
    known = run_config_keys()
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise FedtuneError(f"--set expects key=value, got {pair!r}")
        if key.strip() not in known:
            raise unknown_key(f"--set {pair}", key.strip(), known)
        out[key.strip()] = _parse_value(value.strip())
    return out


def read_run_config_file(path: str) -> dict[str, Any]:
    """A flat TOML table of run-config keys (as `flwr run --run-config FILE` takes);
    every key must be one fedtune knows."""
    file = Path(path)
    if not file.is_file():
        raise FedtuneError(f"--run-config {path}: file not found")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise FedtuneError(f"--run-config {path}: bad TOML ({err})") from None
    known = run_config_keys()
    for key, value in data.items():
        if key not in known:
            raise unknown_key(f"--run-config {path}", key, known)
        if isinstance(value, dict):
            raise FedtuneError(
                f"--run-config {path}: key {key!r} is a table; the file is one flat table of run-config keys"
            )
    return data


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


def parse_flwr_run_config(items: Sequence[str], flag: str = "--run-config") -> dict[str, Any]:
    """`flwr run --run-config` values: one TOML file, or 'key=value key2="text"' strings
    (Flower's own parser); every key must be one fedtune knows. Errors name `flag`."""
    from flwr.common.config import parse_config_args

    given = f"{flag} {' '.join(items)!r}"
    try:
        config = parse_config_args(list(items)) if items else {}
    except FileNotFoundError as err:
        raise FedtuneError(f"{flag} {err.filename}: file not found") from None
    except Exception as err:  # click.ClickException, ValueError, a TOML error
        message = getattr(err, "message", None) or str(err)
        raise FedtuneError(f"{given}: {message.splitlines()[0]}") from None
    known = run_config_keys()
    for key in config:
        if key not in known:
            raise unknown_key(given, key, known)
    return config


def pin_launch_paths(config: dict[str, Any], given: Iterable[str], app_dir: Path, launch_dir: Path) -> dict[str, Any]:
    """Absolute path settings for a run launched from `launch_dir`: paths the operator
    gave (`given` keys) resolve against the launching directory, the app's own defaults
    against the app folder, and the output folder against the launching directory."""
    out = dict(config)
    for key in PATH_KEYS_FROM_APP:
        if out.get(key):
            base = launch_dir if key in given else app_dir
            out[key] = str((base / Path(str(out[key])).expanduser()).resolve())
    if out.get("output-dir"):
        out["output-dir"] = str((launch_dir / Path(str(out["output-dir"])).expanduser()).resolve())
    return out


def check_address(value: str, flag: str) -> str:
    """HOST:PORT with a port in 1-65535, or one line naming the flag."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FedtuneError(f"{flag} {value}: expected HOST:PORT, e.g. coordinator.example.org:9092")
    return value
