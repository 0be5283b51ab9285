"""How a run-config key is declared: `setting(default, help, check)` on a `RunSettings`
field, so that its name, type, default, rule and help live in one line, and the checks
those rules are made of. `fedtune/config.py` declares every key; the pyproject table, the
CLI's `--set` checking and `--help` are derived from those declarations."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

# A check returns the problem in words ("must be > 0, got -1"), or None when the value is fine.
Check = Callable[[Any], "str | None"]

HELP = "help"
CHECK = "check"
SECTION = "section"


def setting(default: Any, help: str, check: Check | None = None, section: str = "") -> Any:
    """A dataclass field declaring one run-config key. `section` starts a new group of keys
    in the pyproject table (its comment heading)."""
    return dataclasses.field(default=default, metadata={HELP: help, CHECK: check, SECTION: section})


def one_of(choices: Sequence[str]) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}; got {v!r}"


def at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"must be at least {low}, got {v}"


def positive(v: float) -> str | None:
    return None if v > 0 else f"must be > 0, got {v}"


def non_negative(v: float) -> str | None:
    return None if v >= 0 else f"must be >= 0, got {v}"


def zero_or(meaning: str, rest: str = "a count") -> Check:
    """0 is a switch (`meaning`), anything else must be `rest`: "a count", "at least 1", "> 0"."""

    def check(v: float) -> str | None:
        if v == 0 or (v > 0 and (rest != "at least 1" or v >= 1)):
            return None
        return f"must be 0 ({meaning}) or {rest}, got {v}"

    return check


def within(low: float, high: float, bounds: str = "[]", what: str = "must be") -> Check:
    """low..high with `bounds` two of "[(" and ")]", e.g. "[)" for 0 <= v < 1."""

    def check(v: float) -> str | None:
        above = v >= low if bounds[0] == "[" else v > low
        below = v <= high if bounds[1] == "]" else v < high
        return None if above and below else f"{what} in {bounds[0]}{low:g}, {high:g}{bounds[1]}, got {v}"

    return check


def matches(pattern: str, words: str) -> Check:
    compiled = re.compile(pattern)
    return lambda v: None if not v or compiled.match(v) else f"{words}, got {v!r}"
