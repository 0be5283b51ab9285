"""The layering rules, checked on the product's import graph (not the tests'):

- the core (`fedtune/`) imports no stage;
- the site and the coordinator import only the core (never each other); the site also the
  device runtime, to score release candidates the way a device runs them;
- the export imports the core and the device; the registry the core, the device and
  its own wire contract;
- the device imports the core and the registry's wire contract only, and neither it nor
  any core module it reaches imports torch, transformers, peft, flwr, optimum or opacus, nor
  the trackers (tensorboard, mlflow: a run's views belong to the coordinator and the sites);
- only the composition roots (`fedtune.cli`: the CLI and the simulation launcher)
  import several stages;
- the ClientApp (the code Flower runs from the coordinator's copy of the app) reaches,
  at module level, none of the modules that hold what a site enforces (its policy, floor,
  SecAgg+ checks and masking, the worker's message handling): those run in the site
  worker, from the site's own installation;
- the installed package has one top-level name, every module one import name (Flower's
  entry files in the app folder import the apps from it), and test hooks live in tests/ only.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
FOLDERS = {"fedtune": "fedtune", **SETUPTOOLS["package-dir"]}  # package -> folder

STAGES = {  # stage -> package prefix
    "site": "fedtune.client",
    "coordinator": "fedtune.server",
    "export": "fedtune.edge_export",
    "device": "fedtune.edge_device",
    "registry": "fedtune.registry",
    "roots": "fedtune.cli",
}
PROTOCOL = ("fedtune.registry.protocol", "fedtune.registry.v1")  # the registry's wire contract
ALLOWED = {  # stage -> stages it may import (besides itself)
    "core": set(),
    "site": {"core", "device", "protocol"},  # the release gate runs candidates as a device does
    "coordinator": {"core"},
    "export": {"core", "device"},
    "device": {"core", "protocol"},
    "registry": {"core", "device", "protocol"},
    "protocol": {"core"},
    "roots": {"core", "site", "coordinator", "export", "device", "registry", "protocol"},
}
HEAVY = {"torch", "transformers", "peft", "flwr", "optimum", "opacus", "ray", "onnx", "tensorboard", "mlflow"}
DEVICE_THIRD_PARTY_BANNED = HEAVY


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def stage_of(module: str) -> str:
    if any(_within(module, p) for p in PROTOCOL):
        return "protocol"
    for stage, prefix in STAGES.items():
        if _within(module, prefix):
            return stage
    return "core"


def product_modules() -> dict[str, Path]:
    """Every product module by its installed name, from pyproject's package map."""
    out: dict[str, Path] = {}
    for package, folder in FOLDERS.items():
        root = REPO / folder
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            # a stage folder inside the core's name space belongs to its own mapping
            if folder == "fedtune" and any(_within(name, p) for p in FOLDERS if p != "fedtune"):
                continue
            out[name] = path
    return out


def imports_of(name: str, path: Path, module_level_only: bool = False) -> set[str]:
    """Every module `name` imports, at module level or (unless `module_level_only`) inside
    functions, made absolute."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in tree.body if module_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


MODULES = product_modules()


def _first_party(imported: str) -> str | None:
    """The product module an import resolves to (the longest known prefix), if any."""
    parts = imported.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in MODULES:
            return ".".join(parts[:i])
    return None


def test_the_map_finds_every_stage() -> None:
    stages = {stage_of(m) for m in MODULES}
    assert stages == {"core", "site", "coordinator", "export", "device", "registry", "roots", "protocol"}
    assert "fedtune.client.app" in MODULES and "fedtune.edge_device.runtime" in MODULES
    assert "fedtune.cli.simulation" in MODULES and "fedtune.registry.v1.registry_pb2" in MODULES


def test_no_forbidden_arrow_between_stages() -> None:
    bad: set[str] = set()
    for name, path in MODULES.items():
        here = stage_of(name)
        for imported in imports_of(name, path):
            target = _first_party(imported)
            if target is None:
                if imported.split(".")[0] in ("client", "server", "edge_export", "edge_device", "registry", "cli"):
                    bad.add(f"{name} -> {imported} (a stage by its folder name, not fedtune.*)")
                continue
            there = stage_of(target)
            if there != here and there not in ALLOWED[here]:
                bad.add(f"{name} ({here}) -> {target} ({there})")
    assert not bad, "forbidden imports:\n" + "\n".join(sorted(bad))


def test_device_reaches_no_training_library() -> None:
    """The device's modules, and every product module they reach, import no heavy library."""
    seen: set[str] = set()
    todo = [m for m in MODULES if stage_of(m) == "device"]
    bad = []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for imported in imports_of(name, MODULES[name]):
            target = _first_party(imported)
            if target is not None:
                todo.append(target)
            elif imported.split(".")[0] in DEVICE_THIRD_PARTY_BANNED:
                bad.append(f"{name} -> {imported}")
    assert "fedtune.errors" in seen and "fedtune.registry.protocol" in seen  # the walk really followed imports
    assert not bad, "the device reaches training libraries:\n" + "\n".join(sorted(bad))


def test_the_walk_catches_a_forbidden_arrow(tmp_path: Path) -> None:
    """The checker itself: a core module importing the site, and a device module importing
    torch through the core, are both reported."""
    core = tmp_path / "bad_core.py"
    core.write_text("from fedtune.client.site_data import load_site_data\nimport torch\n")
    assert "fedtune.client.site_data" in imports_of("fedtune.bad_core", core)
    assert stage_of("fedtune.bad_core") == "core" and "site" not in ALLOWED["core"]
    rel = tmp_path / "pkg" / "runtime.py"
    rel.parent.mkdir()
    rel.write_text("from ..model import build_lora_model\nfrom . import bundle\n")
    got = imports_of("fedtune.edge_device.runtime", rel)
    assert {"fedtune.model", "fedtune.edge_device.bundle"} <= got


def test_one_installed_top_level_name() -> None:
    assert all(_within(p, "fedtune") for p in SETUPTOOLS["packages"])
    assert set(SETUPTOOLS["package-dir"]) <= set(SETUPTOOLS["packages"])


def test_test_hooks_live_in_tests_only() -> None:
    files = subprocess.run(
        ["git", "ls-files", "*.py", "*.sh", "Makefile", "*.toml"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    pattern = re.compile(r"test_hooks|os\._exit|FEDTUNE_TEST|FEDTUNE_MASK_AUDIT|stop_after_bytes|MESSAGE_OBSERVERS")
    bad = [
        f"{f}:{i}"
        for f in files
        if not f.startswith("tests/")
        for i, line in enumerate((REPO / f).read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not bad, bad


FOLDER_NAMES = {folder for package, folder in FOLDERS.items() if package != "fedtune"}  # client, server, ...
FLOWER_ENTRIES = {"client/flower_app.py", "server/flower_app.py"}  # what Flower loads by folder


def test_every_module_has_one_import_name() -> None:
    """Flower loads `client.flower_app:app` / `server.flower_app:app` from the app folder;
    those two files only import the app from the installed package. Nothing else (product,
    tests, bench, scripts) imports a stage by its folder name (`client.x`, `server.x`), so
    one process never holds two copies of a module and its state."""
    components = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    assert {v.split(":")[0].replace(".", "/") + ".py" for v in components.values()} == FLOWER_ENTRIES
    for entry in FLOWER_ENTRIES:
        tree = ast.parse((REPO / entry).read_text())
        body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        assert isinstance(body[0], ast.ImportFrom) and body[0].module == f"fedtune.{entry.split('/')[0]}.app", entry
    bad = []
    files = [
        p for d in ("fedtune", *sorted(FOLDER_NAMES), "tests", "bench", "scripts") for p in (REPO / d).rglob("*.py")
    ]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            bad += [
                f"{path.relative_to(REPO)}:{node.lineno}: {n}"
                for n in names
                if n.split(".")[0] in FOLDER_NAMES and str(path.relative_to(REPO)) not in FLOWER_ENTRIES
            ]
    assert not bad, bad


@pytest.mark.parametrize("folder", ["client", "server"])
def test_flower_loading_by_folder_brings_no_second_copy(folder: str) -> None:
    """Loading the app as Flower does (the app folder first on sys.path) gives the installed
    package's app object, with no module of the stage loaded under its folder name besides the
    entry itself, and no other stage pulled in."""
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); import {folder}.flower_app as a; "
        f"import fedtune.{folder}.app as b; print(type(a.app).__name__, a.app is b.app); "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] == {folder!r})); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'fedtune' and m.count('.') >= 1 "
        f"and m.split('.')[1] in {tuple(sorted(FOLDER_NAMES - {folder}))!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split("\n")
    assert lines[0] in ("ClientApp True", "ServerApp True"), out.stdout
    assert lines[1] == str(sorted([folder, f"{folder}.flower_app"])) and lines[2] == "[]", out.stdout


# What a site enforces: only its worker (the site's own installation) may import these.
SITE_ENFORCEMENT = {
    "fedtune.client.site_policy",
    "fedtune.client.privacy_floor",
    "fedtune.client.secagg_guard",
    "fedtune.client.worker_messages",
    "fedtune.client.site_worker",
    "fedtune.client.app_account",
}


def module_level_imports(name: str, path: Path) -> set[str]:
    """The product modules `name` imports at module level (what loading it runs)."""
    return {t for t in (_first_party(i) for i in imports_of(name, path, module_level_only=True)) if t is not None}


def test_the_clientapp_holds_nothing_a_site_enforces() -> None:
    seen: set[str] = set()
    todo = ["fedtune.client.app"]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += sorted(module_level_imports(name, MODULES[name]))
    assert "fedtune.client.worker_client" in seen  # the walk followed the relay
    assert not seen & SITE_ENFORCEMENT, sorted(seen & SITE_ENFORCEMENT)
