"""Real deployment on 127.0.0.1: a TLS SuperLink with SuperNode authentication on
loopback behind its nginx reverse proxy, site SuperNodes (through the proxy) each with
its own site worker, data file and port, SecAgg+ runs of a tiny model launched with
`flwr run`, and what a site operator or a security officer must see: through the public
port, no listing or starting of runs and no SuperNode registration; client certificates
when the proxy requires them; each site's model loaded once for the whole run; a worker
killed mid-round (the round completes with the survivors, the next one runs on the
restarted worker); the refusals of an unregistered key, a plaintext connection, a wrong
CA and a bad data file. Every process the test starts is stopped by PID, also when it
fails."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from safetensors.numpy import load_file
from support.processes import ManagedProcesses, free_port, site_command, wait_for_port
from support.registry_server import TOKEN as REGISTRY_TOKEN
from support.registry_server import Registry, make_pki
from support.run_configs import sentiment_config
from support.wire import record_superlink_objects, superlink_objects

from fedtune.client.deployment import site_keypair
from fedtune.client.worker_client import call_worker
from fedtune.edge_device.pull import pull
from fedtune.edge_export.exporter import export_bundle
from fedtune.errors import FedtuneError
from fedtune.flower_env import child_env
from fedtune.server.deployment import init_pki, register_site, run_command
from fedtune.server.reverse_proxy import find_nginx
from fedtune.tls import create_ca, issue, make_csr, sign_csr

REPO = Path(__file__).resolve().parent.parent
FEDTUNE = str(Path(sys.executable).parent / "fedtune")


def wait_for_log(path: Path, needle: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        time.sleep(0.3)
    raise AssertionError(f"{needle!r} not in {path}: {path.read_text(errors='replace')[-3000:]}")


def start_superlink(processes: ManagedProcesses, deploy: Path, logs: Path, *extra: str) -> tuple[str, str]:
    """`fedtune deploy superlink`: the SuperLink on loopback and nginx in front of it (or,
    with --no-proxy, alone); returns (the sites' address, the coordinator's loopback address)."""
    port, public = free_port(), free_port()
    if "--no-proxy" not in extra:
        try:
            find_nginx()
        except FedtuneError as err:
            pytest.skip(str(err))  # `make test` installs nginx where it can (scripts/ensure_nginx.sh)
    superlink = processes.start(
        "superlink",
        [
            FEDTUNE,
            "deploy",
            "superlink",
            "--dir",
            str(deploy),
            "--port",
            str(port),
            "--public-host",
            "127.0.0.1",
            "--public-port",
            str(public),
            *extra,
        ],
    )
    wait_for_port(port, superlink, logs / "superlink.log")
    if "--no-proxy" in extra:
        return f"127.0.0.1:{port}", f"127.0.0.1:{port}"
    wait_for_port(public, superlink, logs / "superlink.log")
    return f"127.0.0.1:{public}", f"127.0.0.1:{port}"


def cli(cmd: list[str], expect: int = 0) -> subprocess.CompletedProcess[str]:
    """A fedtune command as an operator runs it; its exit code must be `expect`."""
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=180)
    assert out.returncode == expect, out.stdout[-2000:] + out.stderr[-2000:]
    return out


def post(address: str, path: str, ca: Path, body: bytes = b"") -> int:
    """The HTTP status of a POST to `path`, sent over TLS exactly as written."""
    host, port = address.split(":")
    conn = http.client.HTTPSConnection(host, int(port), context=ssl.create_default_context(cafile=str(ca)), timeout=30)
    try:
        conn.putrequest("POST", path, skip_accept_encoding=True)
        conn.putheader("content-type", "application/protobuf")
        conn.putheader("content-length", str(len(body)))
        conn.endheaders(body or None)
        return conn.getresponse().status
    finally:
        conn.close()


def flwr_as(home: Path, address: str, ca: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A `flwr` command through a connection to `address` (a site's view: the CA only)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "site"\n\n[superlink.site]\naddress = "{address}"\nroot-certificates = "{ca}"\n'
    )
    return subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=child_env(home),
        timeout=180,
    )


@pytest.fixture()
def processes(tmp_path: Path) -> Iterator[ManagedProcesses]:
    procs = ManagedProcesses(tmp_path, cwd=REPO)
    try:
        yield procs
    finally:
        procs.stop_all()
        assert procs.alive() == []


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_tls_superlink_with_site_auth_runs_secagg_refuses_strangers_and_gates_the_release(
    tmp_path: Path,
    processes: ManagedProcesses,
    tiny_bert_dir: Path,
    sentiment_data: dict[str, Path],
    app_user,
    app_homes: Path,
    keys: dict[str, Path],
    federate,
) -> None:
    # The steps of docs/deployment.md, with its commands (ports: free ones on 127.0.0.1).
    signing = keys  # the coordinator's bundle-signing keys
    deploy = tmp_path / "deploy"
    cli([FEDTUNE, "deploy", "init", "--dir", str(deploy), "--host", "127.0.0.1"])  # 1. CA + certificate
    ca = deploy / "pki" / "ca.pem"
    keys = {}  # 2. each site makes its own keys at the site; only the .pub reaches the coordinator
    for site in ("bank-a", "bank-b", "stranger"):
        cli([FEDTUNE, "deploy", "site-key", "--site", site, "--out", str(tmp_path / "sites" / site)])
        keys[site] = (tmp_path / "sites" / site / f"{site}.key", tmp_path / "sites" / site / f"{site}.pub")
    rows = sentiment_data["train"].read_text().splitlines()
    # The candidate the gate must refuse later, one that learnt the opposite labels, federated in
    # simulation now, before the deployment's processes share the 2 cores with Ray's start-up
    # (whose 30 s wait for its own GCS port timed out once when this ran after them).
    flip = {"pos": "neg", "neg": "pos"}
    flipped = tmp_path / "flipped.jsonl"
    flipped.write_text("".join(json.dumps({**r, "label": flip[r["label"]]}) + "\n" for r in map(json.loads, rows)))
    other = federate(
        tmp_path / "other", "flipped", {**sentiment_config(tiny_bert_dir, sentiment_data), "data-path": str(flipped)}
    )
    data = {"bank-a": tmp_path / "bank-a.jsonl", "bank-b": tmp_path / "bank-b.jsonl"}
    data["bank-a"].write_text("\n".join(rows[: len(rows) // 2]) + "\n")
    data["bank-b"].write_text("\n".join(rows[len(rows) // 2 :]) + "\n")

    # 3. SuperLink behind nginx; its state in SQLite, where the test records every message object.
    link_db = tmp_path / "superlink.db"
    address, loopback = start_superlink(processes, deploy, tmp_path, "--database", str(link_db))
    record_superlink_objects(link_db)
    for site in ("bank-a", "bank-b"):  # 4. register the public keys
        assert (
            "registered"
            in cli(
                [
                    FEDTUNE,
                    "deploy",
                    "register",
                    "--dir",
                    str(deploy),
                    "--key",
                    str(keys[site][1]),
                    "--superlink",
                    loopback,
                ]
            ).stdout
        )
    refused = cli(
        [
            FEDTUNE,
            "deploy",
            "register",
            "--dir",
            str(deploy),
            "--key",
            str(keys["stranger"][0]),
            "--superlink",
            loopback,
        ],
        expect=1,
    )
    assert "this is a private key; a site sends only its .pub" in refused.stderr and "Traceback" not in refused.stderr

    # Through the public port, what every site holds (the CA; a registered key) neither lists
    # nor starts runs nor registers a SuperNode: the proxy forwards the Fleet API only.
    site_view = tmp_path / "site-flwr-home"
    for args in (
        ["ls", "site"],
        ["supernode", "register", str(keys["stranger"][1]), "site"],
        ["run", str(REPO), "site"],
    ):
        refused = flwr_as(site_view, address, ca, *args)
        assert refused.returncode != 0 and "404 Not Found" in refused.stdout + refused.stderr, refused.stdout[-2000:]
    for path in (
        "/v1/control/list-runs",
        "/v1/control/start-run",
        "/v1/runtime/get-nodes",
        "/",
        "/v1/fleet/../control/list-runs",
        "/v1/fleet/%2e%2e/control/list-runs",
        "/v1/fleet/pull-messages?a=b",
    ):
        assert post(address, path, ca) == 404, path
    assert post(address, "/v1/fleet/pull-messages", ca) == 401  # Flower's own answer: no node signature
    # A body the size of a real adapter upload reaches Flower as it does directly (nginx streams
    # it; buffering it to a temp file its worker cannot write was a 500): Flower's 400, bad protobuf.
    assert (
        post(address, "/v1/fleet/push-object", ca, bytes(3 << 20))
        == post(loopback, "/v1/fleet/push-object", ca, bytes(3 << 20))
        == 400
    )
    assert post(loopback, "/v1/control/list-runs", ca) == 200  # the coordinator's side still has it
    assert "/v1/control/list-runs" in (deploy / "proxy" / "access.log").read_text()

    def site_cmd(site: str, key: Path, data_file: Path, ca_file: Path = ca, *extra: str) -> list[str]:
        return site_command(
            address, ca_file, key, data_file, tmp_path / "state" / site,
            "--app-user", app_user.name, "--app-home", str(app_homes / site), *extra,
        )  # fmt: skip

    # The model registry on loopback; each site pulls release candidates from it with the
    # coordinator's public key it holds itself (bank-b also reveals its own gate drop).
    registry = Registry(tmp_path / "registry", make_pki(tmp_path / "registry-pki"), signing)
    (tmp_path / "registry-ca.pem").write_bytes(registry.pki["ca"])
    gate_flags = ["--gate-registry", registry.address, "--gate-trust-key", str(signing["public"])]
    gate_flags += ["--gate-registry-ca", str(tmp_path / "registry-ca.pem")]
    # The two banks exchanged their public keys between themselves: signed SecAgg+ (--peers).
    peers = tmp_path / "peers"
    peers.mkdir()
    for site in ("bank-a", "bank-b"):
        shutil.copy(keys[site][1], peers / keys[site][1].name)
    for site in ("bank-a", "bank-b"):
        extra = [*gate_flags, "--peers", str(peers), *(["--reveal-gate-drop"] if site == "bank-b" else [])]
        processes.start(site, site_cmd(site, keys[site][0], data[site], ca, *extra))

    # Refusals, each one line and a non-zero exit: an unregistered key, a wrong CA, a bad data file.
    stranger = subprocess.run(
        site_cmd("stranger", keys["stranger"][0], data["bank-a"]),
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=180,
    )
    assert stranger.returncode == 1 and "not registered" in stranger.stderr, stranger.stdout[-2000:] + stranger.stderr
    other_ca = create_ca(tmp_path / "other-pki")
    wrong_ca = subprocess.run(
        site_cmd("bank-a", keys["bank-a"][0], data["bank-a"], other_ca),
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
    )
    assert wrong_ca.returncode == 1 and "did not sign" in wrong_ca.stderr and "Traceback" not in wrong_ca.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "pos"}\n{"text": "", "label": "neg"}\n')
    bad_data = subprocess.run(
        site_cmd("bank-a", keys["bank-a"][0], bad), capture_output=True, text=True, env=child_env(), timeout=60
    )
    assert bad_data.returncode == 1 and f"{bad}:2: field 'text'" in bad_data.stderr
    # Plaintext to the TLS SuperLink: an HTTP request is refused, and an --insecure SuperNode never joins.
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://{address}/", timeout=10).read()
    plain = processes.start(
        "plaintext",
        [
            str(Path(sys.executable).parent / "flower-supernode"),
            "--superlink",
            address,
            "--insecure",
            "--port",
            str(free_port()),
            "--max-retries",
            "2",
            "--max-wait-time",
            "20",
        ],
    )
    assert plain.wait(timeout=120) != 0  # gave up: the TLS SuperLink never answered in plaintext
    assert "SuperNode ID" not in (tmp_path / "plaintext.log").read_text(errors="replace")

    # Two registered sites joined through the proxy; the coordinator runs 2 SecAgg+ rounds with `flwr run`.
    for site in ("bank-a", "bank-b"):
        wait_for_log(tmp_path / f"{site}.log", "SuperNode ID")
    # Launched as the docs say, from the operator's own folder: relative paths resolve there.
    operator = tmp_path / "operator"
    operator.mkdir()
    shutil.copy(sentiment_data["labels"], operator / "labels.json")
    shutil.copy(sentiment_data["test"], operator / "held-out.jsonl")
    run_config = (
        f'model="{tiny_bert_dir}" labels-file="labels.json" central-eval-path="held-out.jsonl" '
        f"num-rounds=2 local-steps=4 batch-size=16 learning-rate=0.05 val-fraction=0.2 secagg=true secagg-active=true "
        f'min-sites=2 secagg-timeout=300.0 run-name="deployed"'
    )
    run = subprocess.run(
        [FEDTUNE, "deploy", "run", "--dir", str(deploy), "--app", str(REPO), "--run-config", run_config],
        capture_output=True,
        text=True,
        cwd=operator,
        env=child_env(),
        timeout=900,
    )
    run_dir = operator / "runs" / "deployed"  # output-dir's default, under the launching folder
    assert run.returncode == 0 and (run_dir / "summary.json").exists(), run.stdout[-3000:] + run.stderr[-2000:]
    launched = (deploy / "launched" / "deployed.toml").read_text()
    assert f'"central-eval-path" = "{operator / "held-out.jsonl"}"' in launched

    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert all(sorted(r["sites"]) == ["bank-a", "bank-b"] and r["failures"] == 0 for r in records)
    # Each site's worker loaded the model once for the whole run (census, 2 trainings, 2 evaluations).
    for site in ("bank-a", "bank-b"):
        status, _ = call_worker(worker_socket(app_homes, site), "status", {})
        assert status["model_loads"] == 1, status
        assert [run["rounds"] for run in status["runs"]] == [[1, 2]], status
    fleet_calls = (deploy / "proxy" / "access.log").read_text()
    assert '"POST /v1/fleet/push-messages HTTP/1.1" 200' in fleet_calls  # the rounds went through the proxy
    # The coordinator split every round's stages into polling, ClientApp start-up and site work.
    for r in records:
        d = r["dispatch"]
        assert d["stages"] == 6, d  # signed SecAgg+: setup, share keys, collect, consistency, unmask; evaluate
        assert 0 < d["polling_seconds"] < d["stage_seconds"] and d["site_work_seconds"] > 0, d
    secagg = json.loads((run_dir / "secagg.json").read_text())
    assert secagg["sites_at_start"] == 2
    start = load_file(str(run_dir / "round-000" / "adapter_model.safetensors"))
    final = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    assert start.keys() == final.keys() and any(".lora_B." in k for k in final)
    assert all(np.isfinite(v).all() for v in final.values())
    assert any(not np.array_equal(start[k], final[k]) for k in final)
    # The summary's central accuracy is the last round's central evaluation, a real fraction.
    central = json.loads((run_dir / "summary.json").read_text())["central"]
    assert central == records[-1]["central"] and 0.0 <= central["accuracy"] <= 1.0, central
    # The coordinator's deployment folder holds its own private keys only, never a site's.
    private = sorted(
        str(p.relative_to(deploy)) for p in deploy.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()
    )
    assert private == ["pki/ca.key", "pki/superlink.key"], private

    # The release gate on the deployment: the sites score the exported bundle on their own data.
    export_bundle(run_dir, tmp_path / "bundle", signing["private"], max_accuracy_drop_pt=100.0)
    (tmp_path / "token").write_text(REGISTRY_TOKEN)

    def gate(bundle: Path, version: str, expect: int) -> subprocess.CompletedProcess[str]:
        return cli(
            [
                FEDTUNE, "gate", str(run_dir), "--bundle", str(bundle), "--model", "banking", "--version", version,
                "--key", str(signing["private"]), "--registry", registry.address,
                "--registry-ca", str(tmp_path / "registry-ca.pem"), "--token-file", str(tmp_path / "token"),
                "--federation", str(deploy), "--app", str(REPO), "--max-drop-pt", "5",
            ],
            expect=expect,
        )  # fmt: skip

    gate(tmp_path / "bundle", "v1", 0)
    outcome = json.loads((run_dir / "gate.json").read_text())
    assert outcome["passed"] and outcome["secagg"] and sorted(outcome["sites"]) == ["bank-a", "bank-b"]
    assert "drop_pt" in outcome["sites"]["bank-b"] and "drop_pt" not in outcome["sites"]["bank-a"]
    device = tmp_path / "device"
    got = pull(registry.address, "banking", signing["public"], device, ca=registry.pki["ca"])
    assert got.version == "v1"
    # A candidate that learnt the opposite labels (federated above) fails the gate; devices keep v1.
    export_bundle(other, tmp_path / "bad", signing["private"], max_accuracy_drop_pt=100.0)
    failed = gate(tmp_path / "bad", "v2", 1)
    assert failed.stderr.strip().splitlines()[-1].startswith("fedtune: error: gate: candidate banking v2 not promoted")
    assert pull(registry.address, "banking", signing["public"], device, ca=registry.pki["ca"]).version == "v1"
    assert "## Release gate: banking v2" in (run_dir / "report.md").read_text()
    registry.server.stop(grace=None).wait()

    # On the wire (every object the SuperLink received, either way, in the 2 training rounds and
    # the 2 gate rounds): the gate requests, and not one of the sites' examples.
    wire = superlink_objects(link_db)
    # (Flower stores an object once per content: both sites' identical requests are one object.)
    for version in (b"v1", b"v2"):
        assert any(b'"model": "banking", "version": "' + version + b'"' in blob for blob in wire), len(wire)
    # Signed SecAgg+ in each of the 4 rounds: at least the 2 sites' signed keys and their 2
    # signatures over the survivor list came up, each its own object.
    assert sum(b"fedtune-secagg-signatures" in blob for blob in wire) >= 4 * 2 * 2
    texts = {json.loads(row)["text"].encode() for row in rows}
    assert len(wire) > 20 and not [t for t in texts if any(t in blob for blob in wire)]


@pytest.mark.timeout(600)
def test_proxy_requiring_client_certificates_admits_only_sites_the_ca_signed(
    tmp_path: Path, processes: ManagedProcesses, sentiment_data: dict[str, Path]
) -> None:
    deploy = tmp_path / "deploy"
    ca, _, _ = init_pki(deploy, ["127.0.0.1"])
    site_dir = tmp_path / "sites" / "bank-a"
    private, public = site_keypair(site_dir, "bank-a")
    tls_key, csr = make_csr(site_dir, "bank-a")  # at the site; only the .csr travels
    with pytest.raises(FedtuneError, match="this is a private key; the site sends only its .csr"):
        sign_csr(deploy / "pki", tls_key, tmp_path / "never.pem")
    cert, name = sign_csr(deploy / "pki", csr, deploy / "site-certs" / "bank-a.pem")
    assert name == "bank-a" and not (tmp_path / "never.pem").exists()
    other = tmp_path / "other-pki"
    create_ca(other)
    foreign_cert, foreign_key = issue(other, "bank-a", client=True)

    address, loopback = start_superlink(processes, deploy, tmp_path, "--require-client-cert")
    register_site(deploy, public, loopback)
    data = tmp_path / "bank-a.jsonl"
    data.write_text(sentiment_data["train"].read_text())

    def site(*extra: str) -> list[str]:
        return site_command(address, ca, private, data, tmp_path / "state", "--no-worker", *extra)

    without = subprocess.run(site(), capture_output=True, text=True, env=child_env(), timeout=120)
    assert without.returncode == 1 and "requires a client certificate" in without.stderr, without.stderr
    foreign = subprocess.run(
        site("--client-cert", str(foreign_cert), "--client-key", str(foreign_key)),
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
    )
    assert foreign.returncode == 1 and "refused this site's client certificate" in foreign.stderr, foreign.stderr
    assert all("Traceback" not in out.stderr for out in (without, foreign))
    assert post(address, "/v1/fleet/pull-messages", ca) == 400  # nginx: no client certificate, no Fleet API
    # With the certificate the coordinator signed, the site's SuperNode joins through the proxy.
    processes.start("bank-a", site("--client-cert", str(cert), "--client-key", str(tls_key)))
    wait_for_log(tmp_path / "bank-a.log", "SuperNode ID")
    assert '"POST /v1/fleet/activate-node HTTP/1.1" 200' in (deploy / "proxy" / "access.log").read_text()
    private_keys = sorted(
        str(p.relative_to(deploy)) for p in deploy.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()
    )
    assert private_keys == ["pki/ca.key", "pki/superlink.key"], private_keys  # the site's TLS key stayed at the site


def worker_socket(app_homes: Path, site: str) -> Path:
    return app_homes / site / "worker" / "worker.sock"


def listening_backlog(path: Path) -> int:
    """Connections waiting in the listening Unix socket's queue (`ss`: Recv-Q)."""
    out = subprocess.run(["ss", "-xl", "src", str(path)], capture_output=True, text=True).stdout.splitlines()
    rows = [line.split() for line in out[1:] if str(path) in line]
    return int(rows[0][2]) if rows else 0


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_worker_killed_mid_secagg_round_round_goes_on_and_next_uses_restarted_worker_then_a_dead_site_is_dropped_fast(
    tmp_path: Path,
    processes: ManagedProcesses,
    tiny_bert_dir: Path,
    sentiment_data: dict[str, Path],
    app_user,
    app_homes: Path,
) -> None:
    deploy = tmp_path / "deploy"
    ca, _, _ = init_pki(deploy, ["127.0.0.1"])
    sites = ("bank-a", "bank-b", "bank-c")
    rows = sentiment_data["train"].read_text().splitlines()
    address, loopback = start_superlink(processes, deploy, tmp_path, "--no-proxy")  # all sites on this machine
    site_procs: dict[str, subprocess.Popen[bytes]] = {}
    for i, site in enumerate(sites):
        private, public = site_keypair(tmp_path / "sites" / site, site)
        register_site(deploy, public, loopback)
        data = tmp_path / f"{site}.jsonl"
        data.write_text("\n".join(rows[i::3]) + "\n")
        site_procs[site] = processes.start(
            site,
            site_command(
                address,
                ca,
                private,
                data,
                tmp_path / "state" / site,
                "--app-user",
                app_user.name,
                "--app-home",
                str(app_homes / site),
            ),  # fmt: skip
        )
    for site in sites:
        wait_for_log(tmp_path / f"{site}.log", "SuperNode ID")
    run_dir = tmp_path / "runs" / "killed"
    run_config = (
        f'model="{tiny_bert_dir}" labels-file="{sentiment_data["labels"]}" '
        f'central-eval-path="{sentiment_data["test"]}" num-rounds=4 local-steps=4 batch-size=16 '
        f"val-fraction=0.2 secagg=true min-sites=3 secagg-timeout=3600.0 "
        f'output-dir="{tmp_path / "runs"}" run-name="killed"'
    )  # an hour's patience for a site at work: a dead one must not cost it
    cmd, env = run_command(deploy, REPO, [run_config])
    run = processes.start("run", cmd, env)

    victim = worker_socket(app_homes, "bank-c")
    deadline = time.time() + 600
    while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().strip()):
        assert run.poll() is None and time.time() < deadline, (tmp_path / "run.log").read_text()[-3000:]
        time.sleep(0.2)
    # Round 1 is recorded. The worker runs every SecAgg+ stage: once it has answered round 2's
    # setup and share-keys stages (its 6th train message), freeze it; once round 2's collect
    # request (the training) waits in its socket's queue, kill it: the ClientApp sees the worker
    # die after the key exchange, the dropout SecAgg+ recovers from.
    old_pid = call_worker(victim, "status", {})[0]["pid"]

    def answered(log: str) -> int:  # train messages the worker handled and its SuperNode sent back
        return min(log.count(" train in "), log.count("Sending: train message"))

    # Freeze only once the 6th reply has left (the worker logs before it replies: freezing between
    # the two would hold round 2's key exchange for the whole secagg-timeout).
    while answered((tmp_path / "bank-c.log").read_text(errors="replace")) < 6:
        assert run.poll() is None and time.time() < deadline, (tmp_path / "run.log").read_text()[-3000:]
        time.sleep(0.02)
    os.kill(old_pid, signal.SIGSTOP)
    while listening_backlog(victim) < 1:
        assert run.poll() is None and time.time() < deadline, (tmp_path / "run.log").read_text()[-3000:]
        time.sleep(0.1)
    os.kill(old_pid, signal.SIGKILL)
    # Once round 3 is recorded, bank-c's whole site (SuperNode, worker, ClientApps) dies at
    # once, as when its machine goes down: nothing says goodbye, its heartbeats just stop.
    while len((run_dir / "metrics.jsonl").read_text().splitlines()) < 3:
        assert run.poll() is None and time.time() < deadline, (tmp_path / "run.log").read_text()[-3000:]
        time.sleep(0.1)
    status = call_worker(victim, "status", {})[0]
    assert status["pid"] != old_pid and status["model_loads"] == 1  # the restart cost one model load
    assert [run["rounds"][:1] for run in status["runs"]] == [[3]]
    os.killpg(site_procs["bank-c"].pid, signal.SIGKILL)
    killed_at = time.time()
    assert run.wait(timeout=600) == 0, (tmp_path / "run.log").read_text()[-3000:]
    # Dropped when its heartbeats lapsed (Flower: 2 x 30 s), not after secagg-timeout (an hour).
    assert time.time() - killed_at < 180

    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3, 4]

    def trained(record: dict) -> list[str]:
        return sorted(name for name, site in record["sites"].items() if "train_loss" in site)

    assert trained(records[0]) == list(sites)
    # Round 2 aggregated the two survivors under SecAgg+ (bank-c's failure is counted, not skipped) ...
    assert not records[1].get("skipped") and trained(records[1]) == ["bank-a", "bank-b"]
    assert records[1]["failures"] == 1
    # ... and round 3 trained all three, bank-c on its restarted worker.
    assert trained(records[2]) == list(sites) and records[2]["failures"] == 0
    assert "stopped during 'train'" in (tmp_path / "bank-c.log").read_text(errors="replace")
    # ... and round 4 aggregated the two survivors of bank-c's death.
    assert not records[3].get("skipped") and trained(records[3]) == ["bank-a", "bank-b"]
