"""The run config as TOML text: pyproject's `[tool.flwr.app.config]` table written from the
declarations in `fedtune/config.py`, the check that the table in a pyproject matches them,
and TOML values for the flat tables fedtune writes for Flower."""

from __future__ import annotations

import json
import textwrap
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping

import tomllib

from fedtune.config import RunSettings
from fedtune.errors import FedtuneError
from fedtune.setting import HELP, SECTION

TABLE = "[tool.flwr.app.config]"
COMMENT_COLUMN = 40
WIDTH = 120


def toml_value(value: Any) -> str:
    """One scalar as TOML: true/false, numbers as Python writes them, strings quoted."""
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value)  # JSON's string escapes are TOML basic-string escapes; numbers read the same


def flat_table(config: Mapping[str, Any]) -> str:
    """`"key" = value` lines of a flat TOML table."""
    return "".join(f'"{key}" = {toml_value(value)}\n' for key, value in config.items())


def render_table() -> str:
    """pyproject's run-config table, every key with its default and help, in declaration order."""
    lines = [
        TABLE,
        "# Written from the declarations in fedtune/config.py by `fedtune settings --write-pyproject`:",
        "# change a default or its help there (tests/test_config.py checks the two agree).",
    ]
    for field in fields(RunSettings):
        if field.metadata.get(SECTION):
            lines.append(f"# {field.metadata[SECTION]}")
        assignment = f"{field.name.replace('_', '-')} = {toml_value(field.default)}"
        help_lines = textwrap.wrap(
            field.metadata.get(HELP, ""), WIDTH - COMMENT_COLUMN - 2, break_on_hyphens=False
        ) or [""]
        lines.append(f"{assignment:<{COMMENT_COLUMN - 1}} # {help_lines[0]}".rstrip())
        lines.extend(f"{'':<{COMMENT_COLUMN - 1}} # {more}" for more in help_lines[1:])
    return "\n".join(lines) + "\n"


def listing() -> str:
    """Every key, its default and its help, one per line: `fedtune settings` and the
    epilog of `fedtune simulate --help`."""
    return "".join(
        f"  {f.name.replace('_', '-')} = {toml_value(f.default)}: {f.metadata.get(HELP, '')}\n"
        for f in fields(RunSettings)
    )


def table_in(pyproject: Path) -> dict[str, Any]:
    """The run-config table a pyproject holds."""
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    return dict(data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))


def differences(pyproject: Path) -> list[str]:
    """One line per key where the pyproject's table and the declarations disagree."""
    table, declared = table_in(pyproject), RunSettings().to_run_config()
    out = [
        f"{key}: pyproject has {table[key]!r}, fedtune/config.py declares {declared[key]!r}"
        for key in declared
        if key in table and table[key] != declared[key]
    ]
    out += [f"{key}: declared in fedtune/config.py, missing from pyproject" for key in declared if key not in table]
    out += [f"{key}: in pyproject, not declared in fedtune/config.py" for key in table if key not in declared]
    return out


def write_table(pyproject: Path) -> None:
    """Replace the run-config table (the file's last table) with the rendered one."""
    text = pyproject.read_text(encoding="utf-8")
    start = text.find(f"\n{TABLE}\n")
    if start < 0:
        raise FedtuneError(f"{pyproject}: no {TABLE} table to replace")
    rest = text[start + len(TABLE) + 2 :]
    if "\n[" in rest or rest.startswith("["):
        raise FedtuneError(f"{pyproject}: {TABLE} must be the file's last table")
    pyproject.write_text(text[: start + 1] + render_table(), encoding="utf-8")
