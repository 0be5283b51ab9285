"""User-facing errors: one line that names the file, line and field at fault."""

from __future__ import annotations

from pathlib import Path


class FedtuneError(Exception):
    """An error caused by user input; the CLI prints it as one line and exits 1."""


class DataError(FedtuneError):
    """A problem in a site's data file, located by file, line and field."""

    def __init__(
        self,
        path: str | Path,
        message: str,
        *,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.reason = message
        where = self.path if line is None else f"{self.path}:{line}"
        what = f" field '{field}':" if field is not None else ""
        super().__init__(f"{where}:{what} {message}")


class ConfigError(FedtuneError):
    """A bad run-configuration value, named by its key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"config '{key}': {message}")
