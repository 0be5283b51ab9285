"""A coordinator that ships its own ClientApp, on a real deployment on 127.0.0.1 made as
docs/deployment.md says (TLS SuperLink behind nginx, two sites with their own keys, site
workers, each SuperNode under a service account): the app (tests/support/hostile_clientapp.py)
tries to read the sites' data and state, to switch their privacy floor off, to get their
unmasked adapters, and to climb out of their state folders with a run id; the coordinator
tries a run-name with '../'. Checked on what the coordinator receives (its metrics.jsonl,
the run folder) and on the sites' disks. Then app pinning: sites started with --allow-app
refuse the same app before any of its code runs, and still run the honest one."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from support.processes import ManagedProcesses, site_command
from test_deploy import FEDTUNE, REPO, processes, start_superlink, wait_for_log  # noqa: F401 (fixture)

from fedtune.client.deployment import site_keypair
from fedtune.flower_env import child_env
from fedtune.server.deployment import init_pki, register_site

CANARY = "CANARY-PATIENT-4711"  # in every row of the sites' data: nothing holding it may reach the coordinator
SITES = ("bank-a", "bank-b")


def hostile_copy(dest: Path, targets: dict[str, object]) -> Path:
    """The coordinator's app with its ClientApp replaced by the hostile one."""
    dest.mkdir()
    for name in ("pyproject.toml", ".gitignore"):
        shutil.copy(REPO / name, dest / name)
    for folder in ("client", "server"):
        shutil.copytree(REPO / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
    template = (REPO / "tests" / "support" / "hostile_clientapp.py").read_text()
    (dest / "client" / "flower_app.py").write_text(template.replace("__TARGETS__", json.dumps(targets)))
    return dest


def app_hash(app: Path) -> str:
    out = subprocess.run(
        [FEDTUNE, "deploy", "app-hash", "--app", str(app)], capture_output=True, text=True, env=child_env(), timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def launch(deploy: Path, app: Path, run_config: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FEDTUNE, "deploy", "run", "--dir", str(deploy), "--app", str(app), "--run-config", run_config],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=child_env(),
        timeout=timeout,
    )


def start_federation(
    tmp_path: Path,
    processes: ManagedProcesses,
    app_user,
    app_homes: Path,
    sentiment_data: dict[str, Path],
    sites: dict[str, list[str]],
) -> tuple[Path, dict[str, Path]]:
    """CA, SuperLink behind nginx, registered sites with `--require-secagg --max-epsilon 50` and
    their own extra flags."""
    deploy = tmp_path / "deploy"
    ca, _, _ = init_pki(deploy, ["127.0.0.1"])
    address, loopback = start_superlink(processes, deploy, tmp_path)
    rows = [json.loads(x) for x in sentiment_data["train"].read_text().splitlines()]
    data = {}
    for i, (site, extra) in enumerate(sites.items()):
        private, public = site_keypair(tmp_path / "sites" / site, site)
        register_site(deploy, public, loopback)
        data[site] = tmp_path / "sites" / site / f"{site}.jsonl"
        data[site].write_text(
            "".join(json.dumps({**r, "text": f"{r['text']} {CANARY}"}) + "\n" for r in rows[i :: len(sites)])
        )
        processes.start(
            site,
            site_command(
                address,
                ca,
                private,
                data[site],
                tmp_path / "state" / site,
                "--app-user",
                app_user.name,
                "--app-home",
                str(app_homes / site),
                "--require-secagg",
                "--max-epsilon",
                "50",
                *extra,
            ),  # fmt: skip
        )
    for site in sites:
        wait_for_log(tmp_path / f"{site}.log", "SuperNode ID")
    return deploy, data


def run_config(tiny_bert_dir: Path, sentiment_data: dict[str, Path], name: str) -> str:
    return (
        f'model="{tiny_bert_dir}" labels-file="{sentiment_data["labels"]}" central-eval-path="{sentiment_data["test"]}" '
        f"num-rounds=1 local-steps=2 batch-size=16 val-fraction=0.2 secagg=true min-sites=2 secagg-timeout=300.0 "
        f'dp=true dp-noise-multiplier=1.0 run-name="{name}"'
    )


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_hostile_clientapp_gets_nothing_and_lowers_nothing(
    tmp_path: Path,
    processes: ManagedProcesses,
    tiny_bert_dir: Path,
    sentiment_data: dict[str, Path],
    app_user,
    app_homes: Path,
) -> None:
    deploy, data = start_federation(tmp_path, processes, app_user, app_homes, sentiment_data, {s: [] for s in SITES})
    outside = tmp_path / "outside"
    targets = {
        "data": [str(p) for p in data.values()],
        "state": [str(tmp_path / "state" / s) for s in SITES],
        "run_id": "../" * 16 + str(outside / "escape").lstrip("/"),
    }
    app = hostile_copy(tmp_path / "hostile-app", targets)
    operator = tmp_path / "operator"
    operator.mkdir()

    # (d) at the coordinator: a run-name that climbs out of runs/ is refused before anything is written.
    climb = launch(deploy, app, run_config(tiny_bert_dir, sentiment_data, "../../escape"), operator, 120)
    assert climb.returncode == 1 and "run-name" in climb.stderr and "Traceback" not in climb.stderr, climb.stderr
    assert not (tmp_path / "escape").exists() and not (operator / "escape").exists()

    run = launch(deploy, app, run_config(tiny_bert_dir, sentiment_data, "hostile"), operator)
    run_dir = operator / "runs" / "hostile"
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    for site in SITES:
        assert "HOSTILE CLIENTAPP STARTED" in (tmp_path / f"{site}.log").read_text(errors="replace")

    # What the coordinator received from each site: the hostile app's loot, all refused.
    [record] = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(record["sites"]) == list(SITES) and record["failures"] == 0, record
    for site, metrics in record["sites"].items():
        loot = {k: v for k, v in metrics.items() if k.startswith("loot_")}
        assert len(loot) == 10, loot
        # (a) the data files and state folders: out of the ClientApp account's reach
        for key in ("loot_data_0", "loot_data_1", "loot_state_0", "loot_state_1"):
            assert loot[key].startswith("refused: PermissionError"), (site, key, loot[key])
        assert json.loads(loot["loot_node_config"]).keys() == {"worker-socket"}  # no path, no floor to drop
        assert "may not ask this site worker for its status" in loot["loot_worker_status"]
        # (b) floor keys dropped, SecAgg+ and DP off in what was relayed: the worker's own floor refuses
        assert loot["loot_floor_dropped"].startswith("refused") and "requires SecAgg+" in loot["loot_floor_dropped"]
        # (c) no unmasked adapter: plain training, the parameters, SecAgg+ with the app alone
        assert "under SecAgg+ only" in loot["loot_plain_fit"], loot["loot_plain_fit"]
        assert "does not answer 'get_parameters'" in loot["loot_get_parameters"], loot["loot_get_parameters"]
        assert "reconstruction threshold of 1" in loot["loot_secagg_alone"], loot["loot_secagg_alone"]
        assert not any(v.startswith("GOT") for v in loot.values() if isinstance(v, str)), loot
        assert metrics["dp_epsilon"] > 0  # the honest round itself ran, with DP, under SecAgg+
    # Nothing from the sites' rows reached the coordinator: not in the run folder, not in its log.
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path
    assert CANARY not in run.stdout + run.stderr
    # (d) at the sites: the run id from the message named no path; the accountants stayed in the state folders.
    assert not outside.exists()
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*-dp.json"))
    assert len(written) == 2 and all(p.parts[0] == "state" and len(p.parts) == 4 for p in written), written


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_app_pinning_refuses_the_hostile_app_before_it_starts_and_runs_the_approved_one(
    tmp_path: Path,
    processes: ManagedProcesses,
    tiny_bert_dir: Path,
    sentiment_data: dict[str, Path],
    app_user,
    app_homes: Path,
) -> None:
    honest_hash = app_hash(REPO)
    hostile = hostile_copy(tmp_path / "hostile-app", {"data": [], "state": [], "run_id": "x"})
    hostile_hash = app_hash(hostile)
    assert honest_hash != hostile_hash and honest_hash.startswith("sha256:")
    # bank-c's floor allows a smaller DP delta than the runs use: it refuses them, and says why.
    pinned = ["--allow-app", honest_hash]
    deploy, _ = start_federation(
        tmp_path,
        processes,
        app_user,
        app_homes,
        sentiment_data,
        {"bank-a": pinned, "bank-b": pinned, "bank-c": [*pinned, "--max-delta", "1e-7"]},
    )
    operator = tmp_path / "operator"
    operator.mkdir()

    refused = launch(deploy, hostile, run_config(tiny_bert_dir, sentiment_data, "hostile"), operator, 600)
    assert not (operator / "runs" / "hostile" / "metrics.jsonl").exists()  # no site answered: no round ran
    assert "no site answered the SecAgg+ census" in refused.stdout and "FAB could not be verified" in refused.stdout
    for site in (*SITES, "bank-c"):
        log = (tmp_path / f"{site}.log").read_text(errors="replace")
        assert f"app {hostile_hash} (REFUSED: not in --allow-app)" in log, log[-3000:]
        assert "HOSTILE CLIENTAPP STARTED" not in log  # none of its code ran

    honest = launch(deploy, REPO, run_config(tiny_bert_dir, sentiment_data, "honest"), operator)
    assert honest.returncode == 0, honest.stdout[-3000:] + honest.stderr[-2000:]
    [record] = [json.loads(x) for x in (operator / "runs" / "honest" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(record["sites"]) == list(SITES) and record["failures"] == 1
    for site in (*SITES, "bank-c"):
        assert f"app {honest_hash} (approved)" in (tmp_path / f"{site}.log").read_text(errors="replace")
    # bank-c refused the run at the census: the coordinator left it out of every round (a site that
    # drops before SecAgg+'s key exchange would sink the round), and its record, log and report name
    # the site and its one line; the site's log has no traceback.
    why = "site bank-c allows at most delta=1e-07 (node config max-delta); the run has dp-delta=1e-05"
    assert any(why in reason for reason in record["failure_reasons"]), record["failure_reasons"]
    assert why in honest.stdout
    assert why in (operator / "runs" / "honest" / "report.md").read_text()
    site_log = (tmp_path / "bank-c.log").read_text(errors="replace")
    assert why in site_log and "Traceback" not in site_log
    assert json.loads((operator / "runs" / "honest" / "secagg.json").read_text())["refused_at_census"] == [why]
