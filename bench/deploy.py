"""Deployment Engine vs Simulation Engine, round for round, on the same federation.

Demo workload: the MiniLM demo (embedded pre-trained MiniLM, LoRA r=8, Banking77 split
non-IID over 3 bank sites exactly as the simulation partitions it, SecAgg+, the demo's
local recipe), ROUNDS rounds. Deployment: a TLS SuperLink with SuperNode authentication
on loopback behind its nginx reverse proxy, and 3 SuperNodes on 127.0.0.1 that reach it
through the proxy, each with its site worker (`fedtune deploy site`: the worker runs
SecAgg+ and owns the site's policy; run as root, each SuperNode and its ClientApp
processes run as a service account of their own), launched with `flwr run`. Round time is the coordinator's median wall time per round
(metrics.jsonl); polling, ClientApp start-up and site work per round come from the
coordinator's stage timing (`server/polling_grid.py`).

Tiny workload: a 2-layer BERT from a config, 2 sites x 120 synthetic examples, where
Flower's fixed costs dominate; deployed once as Flower ships it (no worker: a ClientApp
process loads the model for every message; SuperNode idle poll 3 s, SuperExec 1 s) and
once as fedtune runs it (worker, 0.5 s idle poll, SuperExec 0.1 s).

    python bench/deploy.py [--rounds R] [--tiny-rounds R] [--skip-demo]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # support/: process management

from results import update_results  # noqa: E402
from support.app_accounts import app_home_root, grant_traverse  # noqa: E402
from support.processes import ManagedProcesses, free_port, site_command, wait_for_port  # noqa: E402
from support.tiny_models import save_tiny_bert  # noqa: E402

from fedtune.cli.simulation import run_simulation  # noqa: E402
from fedtune.client.app_account import AppAccount, app_account  # noqa: E402
from fedtune.client.deployment import site_keypair  # noqa: E402
from fedtune.client.worker_client import call_worker  # noqa: E402
from fedtune.config import RunSettings, default_run_config  # noqa: E402
from fedtune.flower_env import child_env  # noqa: E402
from fedtune.server.deployment import init_pki, register_site, run_command  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FEDTUNE = str(Path(sys.executable).parent / "fedtune")
ACCOUNT: AppAccount | None = None  # the sites' ClientApp account (when run as root)
APP_HOMES = Path("/nonexistent")


def tiny_workload(root: Path) -> dict[str, Any]:
    """A tiny BERT from a config plus a 2-label task: 2 site files, their union, a test file."""
    model_dir = root / "tiny-bert"
    save_tiny_bert(model_dir)
    rng = random.Random(0)
    words = {"pos": ["good", "great", "excellent", "happy"], "neg": ["bad", "awful", "terrible", "sad"]}

    def rows(n: int) -> str:
        out = []
        for _ in range(n):
            label = rng.choice(["pos", "neg"])
            out.append(json.dumps({"text": " ".join(rng.choice(words[label]) for _ in range(2)), "label": label}))
        return "\n".join(out) + "\n"

    (root / "labels.json").write_text(json.dumps(["neg", "pos"]))
    (root / "test.jsonl").write_text(rows(60))
    sites = {"site-a": root / "site-a.jsonl", "site-b": root / "site-b.jsonl"}
    for path in sites.values():
        path.write_text(rows(120))
    (root / "train.jsonl").write_text("".join(p.read_text() for p in sites.values()))
    config = {
        "model": str(model_dir),
        "labels-file": str(root / "labels.json"),
        "central-eval-path": str(root / "test.jsonl"),
        "local-steps": 8,
        "batch-size": 16,
        "learning-rate": 0.05,
        "val-fraction": 0.2,
        "partitioning": "iid",
        "data-path": str(root / "train.jsonl"),
    }
    return {"config": config, "sites": sites}


def demo_workload(root: Path) -> dict[str, Any]:
    """The demo's data set partitioned over 3 sites the way the simulation does it, one file per site."""
    from fedtune.client.site_data import site_partition
    from fedtune.data import load_examples

    settings = RunSettings.from_run_config(default_run_config())
    labels = settings.label_list()
    examples = load_examples(settings.data_path, settings, labels)
    sites = {}
    for part in range(3):
        path = root / f"bank-{part}.jsonl"
        path.write_text(
            "".join(
                json.dumps({"text": e.text, "label": labels[e.label]}) + "\n"  # type: ignore[union-attr]
                for e in site_partition(examples, settings, part, 3)
            )
        )
        sites[f"bank-{part}"] = path
    return {"config": {}, "sites": sites}


def rounds_of(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def median_of(records: list[dict[str, Any]], key: str) -> float:
    values = [
        r[key] if key == "round_seconds" else r["dispatch"][key]
        for r in records
        if key == "round_seconds" or key in r.get("dispatch", {})
    ]
    return float(statistics.median(values)) if values else float("nan")


def deploy(
    root: Path,
    name: str,
    config: dict[str, Any],
    sites: dict[str, Path],
    flower_defaults: bool,
    worker_threads: int = 0,
) -> dict[str, Any]:
    """One deployed run on loopback; returns its records and each worker's status."""
    work = root / name
    work.mkdir()
    pki = work / "deploy"
    env = child_env()
    if flower_defaults:
        env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = "1.0"
    procs = ManagedProcesses(work, cwd=ROOT)
    statuses = {}
    try:
        init_pki(pki, ["127.0.0.1"])
        port, public_port = free_port(), free_port()
        link = procs.start(
            "superlink",
            [
                FEDTUNE,
                "deploy",
                "superlink",
                "--dir",
                str(pki),
                "--port",
                str(port),
                "--public-host",
                "127.0.0.1",
                "--public-port",
                str(public_port),
            ],
            env,
        )
        wait_for_port(port, link, work / "superlink.log")
        wait_for_port(public_port, link, work / "superlink.log")
        for site, data in sites.items():
            private, public = site_keypair(work / "sites" / site, site)
            register_site(pki, public, f"127.0.0.1:{port}")
            extra = (
                ["--no-worker", "--idle-poll", "3"] if flower_defaults else ["--worker-threads", str(worker_threads)]
            )
            if not flower_defaults and ACCOUNT is not None:  # as a site started as root runs: privilege separation
                extra += ["--app-user", ACCOUNT.name, "--app-home", str(APP_HOMES / name / site)]
            # Sites go through the reverse proxy, as in a real deployment.
            procs.start(
                site,
                site_command(
                    f"127.0.0.1:{public_port}", pki / "pki" / "ca.pem", private, data, work / "state" / site, *extra
                ),
                env,
            )
        deadline = time.time() + 120
        while not all("SuperNode ID" in (work / f"{s}.log").read_text(errors="replace") for s in sites):
            if time.time() > deadline:
                raise SystemExit(f"sites did not join: see {work}")
            time.sleep(0.5)
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in {**config, "run-name": name}.items())
        cmd, run_env = run_command(pki, ROOT, [overrides])
        subprocess.run(
            cmd,
            cwd=ROOT,
            env={**run_env, **{k: env[k] for k in ("FLWR_SUPEREXEC_TASK_POLL_INTERVAL",)}},
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=3600,
        )
        if not flower_defaults:
            sockets = {
                s: (APP_HOMES / name / s if ACCOUNT is not None else work / "state" / s) / "worker" / "worker.sock"
                for s in sites
            }
            statuses = {s: call_worker(sockets[s], "status", {})[0] for s in sites}
    finally:
        procs.stop_all()
    return {"records": rounds_of(Path(config["output-dir"]) / name), "workers": statuses}


def simulate(name: str, config: dict[str, Any], num_sites: int) -> list[dict[str, Any]]:
    run_simulation({**default_run_config(), **config, "run-name": name}, num_sites=num_sites)
    return rounds_of(Path(config["output-dir"]) / name)


def summary(records: list[dict[str, Any]]) -> dict[str, float]:
    later = records[1:] or records  # round 1 pays start-up (Ray, model loads) in both engines
    return {
        k: median_of(later, k)
        for k in ("round_seconds", "polling_seconds", "clientapp_start_seconds", "site_work_seconds", "stage_seconds")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="rounds of the MiniLM demo workload")
    parser.add_argument("--tiny-rounds", type=int, default=4)
    parser.add_argument(
        "--worker-threads",
        type=int,
        default=1,
        help="torch threads per site worker: 3 workers share this machine's cores",
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="deploy-bench-"))
    global ACCOUNT, APP_HOMES
    if os.geteuid() == 0:  # `fedtune deploy site` as root runs each SuperNode as a service account
        ACCOUNT = app_account("fedtune-bench-app")
        grant_traverse(ACCOUNT)  # this interpreter may live under a private folder (pyenv under /root)
        APP_HOMES = app_home_root()
    common = {"secagg": True, "secagg-timeout": 600.0, "output-dir": str(root / "runs")}
    out: dict[str, Any] = {}

    tiny = tiny_workload(root)
    tiny_config = {**tiny["config"], **common, "num-rounds": args.tiny_rounds, "min-sites": 2}
    print("tiny: simulation", flush=True)
    out["tiny_sim"] = summary(simulate("tiny-sim", tiny_config, 2))
    print("tiny: deployment as Flower ships it", flush=True)
    out["tiny_flower"] = summary(
        deploy(root, "tiny-flower", tiny_config, tiny["sites"], flower_defaults=True)["records"]
    )
    print("tiny: deployment with site workers", flush=True)
    tiny_run = deploy(root, "tiny-worker", tiny_config, tiny["sites"], flower_defaults=False)
    out["tiny_worker"] = summary(tiny_run["records"])

    demo = demo_workload(root)
    demo_config = {**common, "num-rounds": args.rounds, "min-sites": 3}
    print("demo: simulation", flush=True)
    out["demo_sim"] = summary(simulate("demo-sim", {**demo_config, "partitioning": "dirichlet"}, 3))
    print("demo: deployment with site workers", flush=True)
    demo_run = deploy(
        root, "demo-worker", demo_config, demo["sites"], flower_defaults=False, worker_threads=args.worker_threads
    )
    out["demo_worker"] = summary(demo_run["records"])
    loads = [w["model_loads"] for w in demo_run["workers"].values()]

    sim, dep = out["demo_sim"], out["demo_worker"]
    keys = {
        "deploy_over_simulation_round_time": round(dep["round_seconds"] / sim["round_seconds"], 3),
        "deploy_tiny_over_simulation_round_time": round(
            out["tiny_worker"]["round_seconds"] / out["tiny_sim"]["round_seconds"], 2
        ),
        "deploy_tiny_flower_defaults_over_simulation_round_time": round(
            out["tiny_flower"]["round_seconds"] / out["tiny_sim"]["round_seconds"], 2
        ),
        "deploy_model_loads_per_site": max(loads),
        "deploy_polling_seconds_per_round": round(dep["polling_seconds"], 2),
    }
    print(json.dumps({**keys, **out, "loads": loads}, indent=2))

    def row(label: str, s: dict[str, float]) -> str:
        fmt = lambda v: "" if v != v else f"{v:.2f}"  # noqa: E731  (NaN: not timed, e.g. simulation)
        return (
            f"| {label} | {fmt(s['round_seconds'])} | {fmt(s['polling_seconds'])} | "
            f"{fmt(s['clientapp_start_seconds'])} | {fmt(s['site_work_seconds'])} |"
        )

    md = f"""## Deployment vs simulation (`bench/deploy.py`)

Same federation both ways, SecAgg+ on. Deployment: TLS SuperLink with SuperNode authentication on loopback behind
its nginx reverse proxy, and one SuperNode per site on 127.0.0.1 (`fedtune deploy site`) reaching it through the
proxy, launched with `flwr run`. Median coordinator seconds per round,
round 1 excluded (it pays start-up in both engines); per-round polling, ClientApp process start-up and site work
are summed over the round's 5 stages (SecAgg+ setup, share keys, collect, unmask; evaluate), each stage taken
from the reply it waited for (`server/polling_grid.py`).

**MiniLM demo workload**: embedded MiniLM + LoRA r=8, Banking77 over 3 non-IID bank sites (the simulation's own
Dirichlet partition, one file per site), demo recipe, {args.rounds} rounds. The 3 site workers share this
machine's cores, {args.worker_threads} torch thread(s) each; the simulation runs its sites one after another
with all cores.

| engine | round (s) | polling (s) | ClientApp start (s) | site work (s) |
|---|---|---|---|---|
{row("Simulation Engine (Ray)", sim)}
{row("Deployment, site workers (SecAgg+ in the worker, SuperNode as its own account), 0.5 s idle poll", dep)}

`deploy_over_simulation_round_time` = **{keys["deploy_over_simulation_round_time"]}** (target <= 1.5).
`deploy_model_loads_per_site` = {keys["deploy_model_loads_per_site"]} (each worker's own count over the whole run:
{loads}). `deploy_polling_seconds_per_round` = {keys["deploy_polling_seconds_per_round"]}.

**Tiny workload** (2-layer BERT from a config, 2 sites x 120 examples, {args.tiny_rounds} rounds of 8 steps), where
Flower's fixed costs are everything:

| engine | round (s) | polling (s) | ClientApp start (s) | site work (s) |
|---|---|---|---|---|
{row("Simulation Engine (Ray)", out["tiny_sim"])}
{row("Deployment as Flower ships it (no worker, 3 s idle poll, SuperExec 1 s)", out["tiny_flower"])}
{row("Deployment, site workers (SecAgg+ in the worker, SuperNode as its own account), 0.5 s idle poll, SuperExec 0.1 s", out["tiny_worker"])}

`deploy_tiny_over_simulation_round_time` = {keys["deploy_tiny_over_simulation_round_time"]} (as Flower ships it:
{keys["deploy_tiny_flower_defaults_over_simulation_round_time"]}). What remains is Flower's: each stage starts a
new `flwr-clientapp` process (Python, Flower's imports, fetching the message and app; about 1-2.5 s here with 2-3
processes starting at once on 2 cores), and polling: the SuperNode's idle sleep (now 0.5 s, Flower's fixed 3 s
shortened by `client/supernode_launcher.py`), SuperExec's task poll (0.1 s, `FLWR_SUPEREXEC_TASK_POLL_INTERVAL`),
the SuperNode's 0.5 s wait for the ClientApp's reply (fixed) and the coordinator's 0.1 s pull.
"""
    if not args.no_write:
        update_results("deploy", keys, md)


if __name__ == "__main__":
    main()
