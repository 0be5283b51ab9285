"""The `fedtune` command line: run a simulated federation, check a site's data file,
export a run to a signed edge bundle, manage signing keys, and run a bundle on a device.

Heavy imports stay inside the commands: `fedtune edge ...` must work where only the
`edge` extra (onnxruntime, tokenizers) is installed, without torch."""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path
from typing import Any, Sequence

from fedtune.errors import FedtuneError

PATH_KEYS_FROM_APP = ("data-path", "labels-file", "central-eval-path")
TRAIN_ONLY_MODULES = {"torch", "transformers", "peft", "flwr", "optimum", "onnx", "opacus", "ray", "safetensors"}


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`key=value` pairs (TOML values, bare strings allowed) into a dict."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise FedtuneError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = _parse_value(value.strip())
    return out


def _absolute_paths(config: dict[str, Any]) -> dict[str, Any]:
    """Pin path settings to absolute paths so every worker process sees the same files."""
    from fedtune.config import resolve_path

    for key in PATH_KEYS_FROM_APP:
        if config.get(key):
            config[key] = str(resolve_path(str(config[key])).resolve())
    for key in ("output-dir", "site-state-dir"):
        if config.get(key):
            config[key] = str(Path(str(config[key])).expanduser().resolve())
    return config


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedtune.simulation import project_run_config, run_simulation

    overrides = parse_overrides(args.set or [])
    for key, value in (
        ("num-rounds", args.rounds), ("model", args.model), ("data-path", args.data),
        ("dirichlet-alpha", args.alpha), ("output-dir", args.output_dir), ("run-name", args.run_name),
        ("strategy", args.strategy),
    ):
        if value is not None:
            overrides[key] = value
    if args.resume:
        overrides["resume"] = True
    config = _absolute_paths({**project_run_config(), **overrides})
    run_simulation(config, num_sites=args.sites, verbose=args.verbose)
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from collections import Counter

    from fedtune.config import RunSettings
    from fedtune.data import load_classification, load_completions
    from fedtune.simulation import project_run_config

    config = {**project_run_config(), **parse_overrides(args.set or []), "task": args.task}
    settings = RunSettings.from_run_config(config)
    if settings.task == "seq-cls":
        labels = settings.label_list()
        examples = load_classification(args.file, settings.text_field, settings.label_field, labels)
        counts = Counter(labels[e.label] for e in examples)
        print(f"{args.file}: OK, {len(examples)} examples, {len(counts)} of {len(labels)} labels present")
    else:
        pairs = load_completions(args.file, settings.prompt_field, settings.completion_field)
        print(f"{args.file}: OK, {len(pairs)} prompt/completion pairs")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from edge_export.exporter import export_bundle
    from fedtune.logs import setup_logging

    setup_logging()
    manifest = export_bundle(
        args.run_dir, args.out, args.key, eval_path=args.eval, quantization=args.quantization,
        max_accuracy_drop_pt=args.max_drop_pt, force=args.force, limit=args.limit,
    )
    gate = manifest["parity"]
    shown = ("top1_agreement", "torch_accuracy", "onnx_accuracy", "accuracy_drop_pt", "max_abs_logit_delta",
             "torch_perplexity", "onnx_perplexity", "greedy_token_agreement")
    print(f"{args.out}: signed {manifest['task']} bundle, INT8 {manifest['quantization']['mode']}; parity: "
          + ", ".join(f"{k} {gate[k]:.4g}" for k in shown if k in gate))
    return 0


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from edge_export.signing import fingerprint, generate_keypair, load_public_key

    private, public = generate_keypair(args.out, args.name)
    print(f"{private} (private, keep it on the coordinator)\n{public} (public, give it to devices); "
          f"fingerprint {fingerprint(load_public_key(public))[:16]}")
    return 0


def cmd_edge_predict(args: argparse.Namespace) -> int:
    import json

    from edge_export.runtime import EdgeModel

    model = EdgeModel.load(args.bundle, args.trust_key, threads=args.threads)
    if model.task == "seq-cls":
        pred = model.classify([args.text])[0]
        top = sorted(pred.probabilities.items(), key=lambda kv: -kv[1])[: args.top]
        if args.json:
            print(json.dumps({"label": pred.label, "top": dict(top)}))
        else:
            print(f"{pred.label}\t" + "  ".join(f"{label} {p:.3f}" for label, p in top))
    else:
        text = model.generate(args.text, args.max_new_tokens)
        print(json.dumps({"completion": text}) if args.json else text)
    return 0


def cmd_certs_create(args: argparse.Namespace) -> int:
    from fedtune.tls import create_ca, issue

    ca = create_ca(args.out)
    made = [ca]
    if args.host:
        made.append(issue(args.out, args.server_name, args.host)[0])
    for name in args.client or []:
        made.append(issue(args.out, name, client=True)[0])
    print("\n".join(str(p) for p in made))
    return 0


def cmd_registry_token(args: argparse.Namespace) -> int:
    import os
    import secrets

    path = Path(args.out)
    if path.exists():
        raise FedtuneError(f"{path}: already exists; refusing to overwrite a token")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(32) + "\n")
    print(f"{path} (give it to the coordinator's publisher only)")
    return 0


def _token(path: str) -> str:
    from fedtune.tls import read_pem

    token = (read_pem(path, "token") or b"").decode().strip()
    if not token:
        raise FedtuneError(f"{path}: token file is empty")
    return token


def cmd_registry_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from fedtune.logs import setup_logging
    from fedtune.registry.service import ServerLimits, make_server
    from fedtune.registry.store import ModelStore
    from fedtune.tls import read_pem

    log = setup_logging()
    store = ModelStore(args.store, trusted_key=args.trust_key)
    limits = ServerLimits(max_workers=args.max_workers, max_concurrent_rpcs=args.max_concurrent_rpcs)
    server, port = make_server(
        store, args.address, read_pem(args.cert, "certificate"), read_pem(args.key, "key"), _token(args.token_file),
        client_ca=read_pem(args.client_ca, "client CA"), limits=limits,
    )
    if port == 0:
        raise FedtuneError(f"{args.address}: cannot listen there")
    log.info("registry: serving %s on port %d (TLS%s), store %s", args.address, port,
             ", mTLS" if args.client_ca else "", Path(args.store).resolve())
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=2).wait()
    log.info("registry: stopped")
    return 0


def cmd_registry_publish(args: argparse.Namespace) -> int:
    from fedtune.registry.publisher import publish
    from fedtune.tls import read_pem

    version = args.version or Path(args.bundle).resolve().name
    reply = publish(args.registry, args.bundle, args.model, version, _token(args.token_file),
                    read_pem(args.ca, "CA certificate"), read_pem(args.cert, "certificate"), read_pem(args.key, "key"))
    print(f"published {reply.model} {reply.version} ({reply.total_bytes:,} bytes) to {args.registry}")
    return 0


def cmd_edge_pull(args: argparse.Namespace) -> int:
    from edge_export.pull import pull
    from fedtune.tls import read_pem

    result = pull(args.registry, args.model, args.trust_key, args.into, version=args.version or "",
                  ca=read_pem(args.ca, "CA certificate"), cert=read_pem(args.cert, "certificate"),
                  key=read_pem(args.key, "key"))
    print(f"{args.into}/current -> {result.model} {result.version} (verified; {result.downloaded_bytes:,} bytes "
          f"downloaded, {result.resumed_bytes:,} resumed)")
    return 0


def cmd_edge_rollback(args: argparse.Namespace) -> int:
    from edge_export.pull import rollback

    print(f"{args.into}/current -> {rollback(args.into)}")
    return 0


def cmd_deploy_init(args: argparse.Namespace) -> int:
    from fedtune.deploy import init_pki

    ca, cert, _ = init_pki(Path(args.dir), args.host)
    print(f"{ca} (give to every site)\n{cert} (the SuperLink's certificate for {', '.join(args.host)})")
    return 0


def cmd_deploy_site_key(args: argparse.Namespace) -> int:
    from fedtune.deploy import site_keypair

    private, public = site_keypair(Path(args.dir), args.site)
    print(f"{private} (give to site {args.site} only)\n{public} (register it: fedtune deploy register)")
    return 0


def cmd_deploy_register(args: argparse.Namespace) -> int:
    from fedtune.deploy import register_site

    key = Path(args.key) if args.key else Path(args.dir) / "sites" / args.site / f"{args.site}.pub"
    if not key.exists():
        raise FedtuneError(f"{key}: public key not found (fedtune deploy site-key --site NAME makes one)")
    print(register_site(Path(args.dir), key, args.superlink))
    return 0


def cmd_deploy_superlink(args: argparse.Namespace) -> int:
    import os

    from fedtune.deploy import child_env, superlink_command

    for name in ("ca.pem", "superlink.pem", "superlink.key"):
        if not (Path(args.dir) / "pki" / name).exists():
            raise FedtuneError(f"{Path(args.dir) / 'pki' / name}: missing; run `fedtune deploy init` first")
    cmd = superlink_command(Path(args.dir), args.host, args.port, Path(args.database) if args.database else None)
    print(" ".join(cmd), flush=True)
    os.execve(cmd[0], cmd, child_env())  # the SuperLink takes over this process (and its PID)
    return 0


def cmd_deploy_site(args: argparse.Namespace) -> int:
    import signal
    import subprocess
    import threading

    from fedtune.deploy import (
        check_site_data,
        check_tls,
        child_env,
        explain_supernode_exit,
        stop_helpers,
        supernode_command,
    )

    data, ca, key = Path(args.data), Path(args.ca), Path(args.key)
    for path, what in ((ca, "CA certificate"), (key, "site private key")):
        if not path.exists():
            raise FedtuneError(f"{path}: {what} not found")
    count = check_site_data(data, args.task, args.text_field, args.label_field, args.prompt_field, args.completion_field)
    check_tls(args.superlink, ca)
    print(f"site: {data} OK ({count} examples); SuperLink {args.superlink} TLS OK; joining", flush=True)
    cmd = supernode_command(args.superlink, ca, key, data, args.port, Path(args.state_dir), args.max_retries, args.name or "")
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: child.terminate())
    output: list[str] = []

    def relay() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            output.append(line)
            print(line, end="", flush=True)

    # Read in a thread: Flower's detached SuperExec helper inherits the pipe and may
    # hold it open after the SuperNode itself has exited.
    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    code = child.wait()
    reader.join(timeout=2)
    stop_helpers(child.pid)
    if code not in (0, -signal.SIGTERM, -signal.SIGINT):
        raise FedtuneError(explain_supernode_exit(code, "".join(output), key, args.superlink))
    return 0


def cmd_deploy_run(args: argparse.Namespace) -> int:
    import os

    from fedtune.deploy import run_command

    config = list(args.run_config or [])
    if args.resume:
        config.append(f'run-name="{args.resume}" resume=true')
    cmd, env = run_command(Path(args.dir), Path(args.app), config)
    print(" ".join(cmd), flush=True)
    os.execve(cmd[0], cmd, env)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune",
        description="Federated LoRA fine-tuning with Flower: sites train adapters on local data; "
        "the coordinator aggregates only the adapters.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser(
        "simulate",
        help="run a whole federation on this machine (Flower Simulation Engine)",
        description="Partition the run's data set across N simulated sites and run the federation. "
        "Defaults come from [tool.flwr.app.config] in pyproject.toml.",
    )
    sim.add_argument("--sites", type=int, default=3, help="number of simulated sites (default: 3)")
    sim.add_argument("--rounds", type=int, help="federated rounds (config: num-rounds)")
    sim.add_argument("--model", help="HF model path or id; 'default' is the embedded MiniLM")
    sim.add_argument("--data", help="labelled JSONL/CSV to partition across sites (config: data-path)")
    sim.add_argument("--alpha", type=float, help="Dirichlet alpha for the non-IID split (config: dirichlet-alpha)")
    sim.add_argument("--strategy", choices=["fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi"], help="aggregation strategy")
    sim.add_argument("--output-dir", help="where run folders go (default: runs)")
    sim.add_argument("--run-name", help="run folder name (default: a timestamp)")
    sim.add_argument("--resume", action="store_true",
                     help="continue --run-name after its last completed round (after a coordinator crash)")
    sim.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any run-config key (repeatable)")
    sim.add_argument("--verbose", action="store_true", help="show Flower's own logs")
    sim.set_defaults(func=cmd_simulate)

    chk = sub.add_parser(
        "check-data",
        help="validate a site's data file against the run's settings",
        description="Read and validate a JSONL or CSV data file the way a site would before training.",
    )
    chk.add_argument("file", help="the site's JSONL or CSV file")
    chk.add_argument("--task", choices=["seq-cls", "causal-lm"], default="seq-cls")
    chk.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a run-config key, e.g. labels-file=...")
    chk.set_defaults(func=cmd_check_data)

    exp = sub.add_parser(
        "export",
        help="merge a run's final adapter, export INT8 ONNX, gate it on parity, sign the bundle",
        description="merge -> ONNX (optimum) -> INT8 (onnxruntime) -> parity gate against the PyTorch "
        "model on held-out data -> manifest + Ed25519 signature. Writes nothing unless every step passes.",
    )
    exp.add_argument("run_dir", help="a finished run folder, e.g. runs/<run-id>")
    exp.add_argument("--out", required=True, help="the bundle folder to create (must not exist or be empty)")
    exp.add_argument("--key", required=True, help="Ed25519 private key (PEM) from `fedtune keys generate`")
    exp.add_argument("--eval", help="held-out JSONL/CSV for the parity gate (default: the run's central-eval-path)")
    exp.add_argument("--quantization", choices=["per-channel", "per-channel-fp32-head", "per-tensor"],
                     help="INT8 mode (default: per-channel, picked by bench/edge.py)")
    exp.add_argument("--max-drop-pt", type=float, default=1.0,
                     help="largest accuracy drop, in points, the INT8 model may show (default: 1.0)")
    exp.add_argument("--force", action="store_true", help="write the bundle even if the parity gate fails")
    exp.add_argument("--limit", type=int, help="use only the first N held-out examples")
    exp.set_defaults(func=cmd_export)

    keys = sub.add_parser("keys", help="signing keys for bundles").add_subparsers(dest="keys_command", required=True)
    gen = keys.add_parser("generate", help="make an Ed25519 key pair (NAME.key private, NAME.pub public)")
    gen.add_argument("--out", default="keys", help="folder for the key files (default: keys)")
    gen.add_argument("--name", default="fedtune", help="file name stem (default: fedtune)")
    gen.set_defaults(func=cmd_keys_generate)

    edge = sub.add_parser("edge", help="device side: run a verified bundle (onnxruntime + tokenizers, no torch)")
    edge_sub = edge.add_subparsers(dest="edge_command", required=True)
    pred = edge_sub.add_parser(
        "predict", help="verify a bundle against a trusted key and run one input",
        description="Checks the manifest signature and every file's sha256 before loading anything.",
    )
    pred.add_argument("bundle", help="bundle folder")
    pred.add_argument("text", help="the text to classify, or the prompt to complete")
    pred.add_argument("--trust-key", required=True, help="the coordinator's Ed25519 public key (PEM)")
    pred.add_argument("--top", type=int, default=3, help="seq-cls: labels to show (default: 3)")
    pred.add_argument("--max-new-tokens", type=int, default=32, help="causal-lm: tokens to generate (default: 32)")
    pred.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    pred.add_argument("--json", action="store_true", help="print JSON")
    pred.set_defaults(func=cmd_edge_predict)

    pull = edge_sub.add_parser(
        "pull", help="download a bundle from a registry, verify it, and make it current",
        description="Downloads into DIR/.incoming (resuming an interrupted download), checks the signature and "
        "every sha256, then switches DIR/current atomically and keeps DIR/previous.",
    )
    pull.add_argument("--registry", required=True, help="HOST:PORT of the registry")
    pull.add_argument("--model", required=True, help="model name in the registry")
    pull.add_argument("--version", help="version to pull (default: the latest)")
    pull.add_argument("--trust-key", required=True, help="the coordinator's Ed25519 public key (PEM)")
    pull.add_argument("--into", required=True, help="the device's model folder")
    pull.add_argument("--ca", required=True, help="CA certificate that signed the registry's TLS certificate")
    pull.add_argument("--cert", help="this device's client certificate (mTLS)")
    pull.add_argument("--key", help="this device's client key (mTLS)")
    pull.set_defaults(func=cmd_edge_pull)
    rb = edge_sub.add_parser("rollback", help="make the previous version current again")
    rb.add_argument("--into", required=True, help="the device's model folder")
    rb.set_defaults(func=cmd_edge_rollback)

    dep = sub.add_parser(
        "deploy", help="multi-machine deployment: PKI, site keys, SuperLink, a site's SuperNode, the run",
        description="Flower's Deployment Engine with TLS and SuperNode authentication. Coordinator: init, "
        "site-key, register, superlink, run. Site: site (one command).",
    ).add_subparsers(dest="deploy_command", required=True)
    d_init = dep.add_parser("init", help="coordinator: create the CA and the SuperLink's TLS certificate")
    d_init.add_argument("--dir", default="deploy", help="deployment folder (default: deploy)")
    d_init.add_argument("--host", action="append", required=True, help="SuperLink host name or IP (repeatable)")
    d_init.set_defaults(func=cmd_deploy_init)
    d_key = dep.add_parser("site-key", help="coordinator: create a site's key pair (EC P-384, OpenSSH)")
    d_key.add_argument("--dir", default="deploy")
    d_key.add_argument("--site", required=True, help="site name")
    d_key.set_defaults(func=cmd_deploy_site_key)
    d_reg = dep.add_parser("register", help="coordinator: register a site's public key with the SuperLink")
    d_reg.add_argument("--dir", default="deploy")
    d_reg.add_argument("--site", help="site name (uses DIR/sites/NAME/NAME.pub)")
    d_reg.add_argument("--key", help="or: the site's public key file")
    d_reg.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    d_reg.set_defaults(func=cmd_deploy_register)
    d_link = dep.add_parser("superlink", help="coordinator: run the SuperLink (TLS, SuperNode auth, no runtime installs)")
    d_link.add_argument("--dir", default="deploy")
    d_link.add_argument("--host", default="0.0.0.0", help="listen host (default: 0.0.0.0)")
    d_link.add_argument("--port", type=int, default=9093, help="listen port for sites, `flwr` and apps (default: 9093)")
    d_link.add_argument("--database", help="SQLite file for the SuperLink's state (default: in memory)")
    d_link.set_defaults(func=cmd_deploy_superlink)
    d_site = dep.add_parser(
        "site", help="site: check the data file, the CA and the key, then join the federation",
        description="Validates the data file (one line per problem), checks the SuperLink's TLS certificate "
        "against --ca, then runs this site's SuperNode with data-path in its node config.",
    )
    d_site.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    d_site.add_argument("--ca", required=True, help="the coordinator's ca.pem")
    d_site.add_argument("--key", required=True, help="this site's private key (OpenSSH, from the coordinator)")
    d_site.add_argument("--data", required=True, help="this site's JSONL/CSV file (never leaves the site)")
    d_site.add_argument("--name", help="this site's name in the coordinator's metrics (default: the data file's stem)")
    d_site.add_argument("--port", type=int, default=9094, help="local port for this SuperNode's app API (default: 9094)")
    d_site.add_argument("--state-dir", default=".fedtune-site-state", help="site-local state, e.g. the DP accountant")
    d_site.add_argument("--task", choices=["seq-cls", "causal-lm"], default="seq-cls")
    d_site.add_argument("--text-field", default="text")
    d_site.add_argument("--label-field", default="label")
    d_site.add_argument("--prompt-field", default="prompt")
    d_site.add_argument("--completion-field", default="completion")
    d_site.add_argument("--max-retries", type=int, help="give up after N failed connection attempts")
    d_site.set_defaults(func=cmd_deploy_site)
    d_run = dep.add_parser("run", help="coordinator: launch the run (flwr run APP fedtune --stream)")
    d_run.add_argument("--dir", default="deploy")
    d_run.add_argument("--app", default=".", help="the Flower app folder (default: .)")
    d_run.add_argument("--run-config", action="append", help="'key=value ...' overrides (repeatable)")
    d_run.add_argument("--resume", metavar="RUN_NAME", help="continue this run after its last completed round")
    d_run.set_defaults(func=cmd_deploy_run)

    certs = sub.add_parser("certs", help="TLS certificates (a private CA)").add_subparsers(dest="certs_command", required=True)
    cc = certs.add_parser("create", help="a CA (once), a server certificate for --host, client certificates")
    cc.add_argument("--out", required=True, help="folder for ca.pem/ca.key and the issued certificates")
    cc.add_argument("--host", action="append", help="server host name or IP (repeatable)")
    cc.add_argument("--server-name", default="server", help="server certificate file stem (default: server)")
    cc.add_argument("--client", action="append", help="issue a client certificate with this name (repeatable)")
    cc.set_defaults(func=cmd_certs_create)

    reg = sub.add_parser("registry", help="the model registry (gRPC)").add_subparsers(dest="registry_command", required=True)
    tok = reg.add_parser("token", help="create the coordinator's publish token")
    tok.add_argument("--out", required=True, help="token file to create")
    tok.set_defaults(func=cmd_registry_token)
    srv = reg.add_parser("serve", help="serve a store over TLS until SIGTERM/SIGINT")
    srv.add_argument("--store", required=True, help="store folder")
    srv.add_argument("--address", default="127.0.0.1:50051", help="listen address (default: 127.0.0.1:50051)")
    srv.add_argument("--cert", required=True, help="server certificate (PEM)")
    srv.add_argument("--key", required=True, help="server key (PEM)")
    srv.add_argument("--client-ca", help="require client certificates signed by this CA (mTLS)")
    srv.add_argument("--token-file", required=True, help="the publish token (see `fedtune registry token`)")
    srv.add_argument("--trust-key", help="refuse bundles not signed by this Ed25519 public key")
    srv.add_argument("--max-workers", type=int, default=16, help="handler threads (default: 16)")
    srv.add_argument("--max-concurrent-rpcs", type=int, default=64, help="calls in flight before RESOURCE_EXHAUSTED (default: 64)")
    srv.set_defaults(func=cmd_registry_serve)
    pub = reg.add_parser("publish", help="publish a signed bundle (coordinator only)")
    pub.add_argument("bundle", help="bundle folder from `fedtune export`")
    pub.add_argument("--registry", required=True, help="HOST:PORT")
    pub.add_argument("--model", required=True, help="model name")
    pub.add_argument("--version", help="version name (default: the bundle folder's name)")
    pub.add_argument("--token-file", required=True, help="the publish token")
    pub.add_argument("--ca", required=True, help="CA certificate of the registry")
    pub.add_argument("--cert", help="client certificate (when the registry requires mTLS)")
    pub.add_argument("--key", help="client key (when the registry requires mTLS)")
    pub.set_defaults(func=cmd_registry_publish)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; user errors print one line and exit 1 (no traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except FedtuneError as err:
        print(f"fedtune: error: {err}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in TRAIN_ONLY_MODULES:
            raise
        print(f"fedtune: error: '{args.command}' needs the train extra (missing module {err.name}): "
              "pip install 'fedtune[train]'", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
