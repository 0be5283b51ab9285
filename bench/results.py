"""Writing benchmark results: flat keys merged into docs/benchmarks.json, and one
named section replaced in docs/benchmarks.md (other sections are kept)."""

from __future__ import annotations

import json
import platform
import re
import time
from pathlib import Path
from typing import Any

from fedtune.flower_env import apply_env

apply_env()  # every benchmark imports this module: offline and quiet, as the CLI runs

DOCS = Path(__file__).resolve().parent.parent / "docs"
JSON_PATH = DOCS / "benchmarks.json"
MD_PATH = DOCS / "benchmarks.md"
HEADER = "# fedtune benchmarks\n\nEach section is written by one script in `bench/`; rerun it to refresh its figures.\n"


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"


def update_results(section: str, keys: dict[str, Any], markdown: str, where: str = "") -> None:
    """Merge `keys` into benchmarks.json and replace `section` in benchmarks.md; `where`
    names the machine when the figures were measured on another one than this."""
    DOCS.mkdir(parents=True, exist_ok=True)
    data = json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else {}
    data.update(keys)
    JSON_PATH.write_text(json.dumps(dict(sorted(data.items())), indent=2) + "\n")
    text = MD_PATH.read_text() if MD_PATH.exists() else HEADER
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    block = f"<!-- section:{section} -->\n{markdown.strip()}\n\n_Measured {stamp} on {where or machine()}._\n<!-- /section:{section} -->"
    pattern = re.compile(rf"<!-- section:{re.escape(section)} -->.*?<!-- /section:{re.escape(section)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    MD_PATH.write_text(text)
