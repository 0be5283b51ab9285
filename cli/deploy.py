"""`fedtune deploy`: Flower's Deployment Engine with TLS and SuperNode authentication.
Coordinator: init, register, superlink, run. Site: site-key (its own key pair), site
(one command: the site worker and the SuperNode), or worker alone (e.g. under systemd)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fedtune.errors import FedtuneError


def cmd_deploy_init(args: argparse.Namespace) -> int:
    from fedtune.server.deployment import init_pki

    ca, cert, _ = init_pki(Path(args.dir), args.host)
    print(f"{ca} (give to every site)\n{cert} (the SuperLink's certificate for {', '.join(args.host)})")
    return 0


def cmd_deploy_site_key(args: argparse.Namespace) -> int:
    from fedtune.client.deployment import site_keypair

    private, public = site_keypair(Path(args.out), args.site)
    print(f"{private} (this site's private key: it stays here, 0600)\n"
          f"{public} (send this public key to the coordinator: fedtune deploy register --key {public.name})")
    return 0


def cmd_deploy_register(args: argparse.Namespace) -> int:
    from fedtune.server.deployment import register_site

    key = Path(args.key)
    if not key.exists():
        raise FedtuneError(f"{key}: public key not found (the site makes it: fedtune deploy site-key --site NAME)")
    print(register_site(Path(args.dir), key, args.superlink))
    return 0


def cmd_deploy_superlink(args: argparse.Namespace) -> int:
    from fedtune.server.deployment import superlink_command

    from fedtune.flower_env import child_env

    for name in ("ca.pem", "superlink.pem", "superlink.key"):
        if not (Path(args.dir) / "pki" / name).exists():
            raise FedtuneError(f"{Path(args.dir) / 'pki' / name}: missing; run `fedtune deploy init` first")
    cmd = superlink_command(Path(args.dir), args.host, args.port, Path(args.database) if args.database else None)
    print(" ".join(cmd), flush=True)
    os.execve(cmd[0], cmd, child_env())  # the SuperLink takes over this process (and its PID)
    return 0


def cmd_deploy_worker(args: argparse.Namespace) -> int:
    from fedtune.client.site_worker import SiteWorker

    from fedtune.logs import setup_logging

    setup_logging()
    if args.max_message_mb <= 0:
        raise FedtuneError(f"--max-message-mb must be > 0, got {args.max_message_mb}")
    SiteWorker(Path(args.socket), idle_timeout=args.idle_timeout, max_message_bytes=int(args.max_message_mb * 2**20),
               threads=args.threads).serve()
    return 0


def privacy_floor(args: argparse.Namespace) -> dict[str, object]:
    """The site's own privacy floor, for its node config."""
    floor: dict[str, object] = {}
    if args.require_secagg:
        floor["require-secagg"] = True
    for flag, key, value in (("--max-epsilon", "max-epsilon", args.max_epsilon), ("--max-delta", "max-delta", args.max_delta)):
        if value is not None:
            if not value > 0:
                raise FedtuneError(f"{flag} must be > 0, got {value}")
            floor[key] = float(value)
    return floor


def cmd_deploy_site(args: argparse.Namespace) -> int:
    from fedtune.client.deployment import (
        check_site_data,
        check_tls,
        run_site,
        supernode_command,
        worker_command,
    )
    from fedtune.client.site_worker import prepare_socket_dir

    data, ca, key = Path(args.data), Path(args.ca), Path(args.key)
    for path, what in ((ca, "CA certificate"), (key, "site private key")):
        if not path.exists():
            raise FedtuneError(f"{path}: {what} not found")
    count = check_site_data(data, args.task, args.text_field, args.label_field, args.prompt_field, args.completion_field)
    check_tls(args.superlink, ca)
    print(f"site: {data} OK ({count} examples); SuperLink {args.superlink} TLS OK; joining", flush=True)
    if not 0.05 <= args.idle_poll <= 3.0:
        raise FedtuneError(f"--idle-poll must be between 0.05 and 3 seconds, got {args.idle_poll}")
    socket_path = None
    if not args.no_worker:
        socket_path = Path(args.worker_socket or Path(args.state_dir) / "worker" / "worker.sock").resolve()
        prepare_socket_dir(socket_path)
    cmd = supernode_command(args.superlink, ca, key, data, args.port, Path(args.state_dir), args.max_retries,
                            args.name or "", socket_path, args.idle_poll, privacy_floor(args))
    worker = worker_command(socket_path, args.worker_threads) if socket_path is not None else None
    run_site(cmd, key, args.superlink, worker, socket_path)
    return 0


def cmd_deploy_run(args: argparse.Namespace) -> int:
    from fedtune.server.deployment import run_command

    config = list(args.run_config or [])
    if args.resume:
        config.append(f'run-name="{args.resume}" resume=true')
    cmd, env = run_command(Path(args.dir), Path(args.app), config)
    print(" ".join(cmd), flush=True)
    os.execve(cmd[0], cmd, env)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    dep = sub.add_parser(
        "deploy", help="multi-machine deployment: PKI, site keys, SuperLink, a site's SuperNode, the run",
        description="Flower's Deployment Engine with TLS and SuperNode authentication. Coordinator: init, "
        "register (a site's public key), superlink, run. Site: site-key (its own key pair), site (one command).",
    ).add_subparsers(dest="deploy_command", required=True)
    d_init = dep.add_parser("init", help="coordinator: create the CA and the SuperLink's TLS certificate")
    d_init.add_argument("--dir", default="deploy", help="deployment folder (default: deploy)")
    d_init.add_argument("--host", action="append", required=True, help="SuperLink host name or IP (repeatable)")
    d_init.set_defaults(func=cmd_deploy_init)
    d_key = dep.add_parser("site-key", help="site: make this site's SuperNode key pair (EC P-384, OpenSSH); "
                           "only the .pub goes to the coordinator")
    d_key.add_argument("--out", default="site-keys", help="folder for the key pair (default: site-keys)")
    d_key.add_argument("--site", required=True, help="site name")
    d_key.set_defaults(func=cmd_deploy_site_key)
    d_reg = dep.add_parser("register", help="coordinator: register a site's public key with the SuperLink")
    d_reg.add_argument("--dir", default="deploy")
    d_reg.add_argument("--key", required=True, help="the public key file the site sent (NAME.pub)")
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
    d_site.add_argument("--worker-socket", help="the site worker's Unix socket (default: STATE_DIR/worker/worker.sock)")
    d_site.add_argument("--worker-threads", type=int, default=0, help="CPU threads the worker trains with (0: torch's default)")
    d_site.add_argument("--require-secagg", action="store_true",
                        help="this site's floor: refuse any run without SecAgg+")
    d_site.add_argument("--max-epsilon", type=float,
                        help="this site's floor: refuse runs without DP-SGD, and train no round after which this "
                        "site's own epsilon would exceed this")
    d_site.add_argument("--max-delta", type=float, help="this site's floor: the largest DP delta it accepts (default with --max-epsilon: 1e-5)")
    d_site.add_argument("--idle-poll", type=float, default=0.5,
                        help="seconds an idle SuperNode waits before asking for work again (Flower's own: 3; default: 0.5)")
    d_site.add_argument("--no-worker", action="store_true",
                        help="no site worker: each message's ClientApp process loads the model itself (slow)")
    d_site.set_defaults(func=cmd_deploy_site)
    d_work = dep.add_parser(
        "worker", help="site: the site worker alone (what `deploy site` starts): keeps the model loaded across rounds",
        description="A long-lived process that loads the base model once and trains and evaluates for this site's "
        "ClientApp over a private Unix socket (0700 directory, 0600 socket, same-uid peers only). Give the "
        "SuperNode its path as worker-socket in --node-config.",
    )
    d_work.add_argument("--socket", required=True, help="the Unix socket to listen on (its directory is made 0700)")
    d_work.add_argument("--idle-timeout", type=float, default=1800.0,
                        help="drop a run's state after this many seconds without a request (default: 1800)")
    d_work.add_argument("--max-message-mb", type=float, default=1024.0,
                        help="largest request accepted, in MiB of tensors (default: 1024)")
    d_work.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    d_work.set_defaults(func=cmd_deploy_worker)
    d_run = dep.add_parser("run", help="coordinator: launch the run (flwr run APP fedtune --stream)")
    d_run.add_argument("--dir", default="deploy")
    d_run.add_argument("--app", default=".", help="the Flower app folder (default: .)")
    d_run.add_argument("--run-config", action="append", help="'key=value ...' overrides (repeatable)")
    d_run.add_argument("--resume", metavar="RUN_NAME", help="continue this run after its last completed round")
    d_run.set_defaults(func=cmd_deploy_run)
