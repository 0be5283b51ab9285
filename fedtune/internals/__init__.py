"""Every place fedtune relies on a dependency's private internals, listed per dependency
(`flower.py`, `onnxruntime_genai.py`), each with the check of what it relies on. Code that
uses an internal calls `require(...)` first: if the installed version differs in a way
that matters, the command stops with one line naming the internal, what changed and the
version the use was verified with, instead of failing later or, worse, running wrongly."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Callable, Mapping

from fedtune.errors import FedtuneError

_PASSED: set[tuple[str, str]] = set()  # checks that held in this process (the code does not change under it)


class InternalsChanged(FedtuneError):
    """A dependency no longer has the private shape fedtune relies on."""


@dataclass(frozen=True)
class Internal:
    """One private use: who uses it, what it relies on, and the check (the problem in words, or None)."""

    user: str
    relies_on: str
    check: Callable[[], "str | None"]


def installed_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def require_from(table: Mapping[str, Internal], distribution: str, verified: str, *names: str) -> None:
    """Run the named checks of one dependency; raise InternalsChanged (one line) at the first problem."""
    for name in names:
        if (distribution, name) in _PASSED:
            continue
        internal = table[name]
        try:
            problem = internal.check()
        except (ImportError, AttributeError, TypeError, ValueError, OSError) as err:
            problem = f"{type(err).__name__}: {err}"
        if problem:
            raise InternalsChanged(
                f"{distribution} {installed_version(distribution)}: {internal.user} relies on {internal.relies_on}, "
                f"but {problem.splitlines()[0]} (verified with {distribution} {verified}; pin that version)"
            )
        _PASSED.add((distribution, name))
