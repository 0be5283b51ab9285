"""`fedtune deploy`: Flower's Deployment Engine with TLS and SuperNode authentication.
Coordinator: init, register, sign, superlink (behind its reverse proxy), run. Site:
site-key (its own keys), site (one command: the site worker and the SuperNode), or
worker alone (e.g. under systemd)."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.config import TASKS
from fedtune.errors import FedtuneError

if TYPE_CHECKING:
    from fedtune.client.privacy_floor import PrivacyFloor
    from fedtune.client.site_policy import SitePolicy


def cmd_deploy_init(args: argparse.Namespace) -> int:
    from fedtune.server.deployment import init_pki

    ca, cert, _ = init_pki(Path(args.dir), args.host)
    print(f"{ca} (give to every site)\n{cert} (the SuperLink's certificate for {', '.join(args.host)})")
    return 0


def cmd_deploy_site_key(args: argparse.Namespace) -> int:
    from fedtune.client.deployment import site_keypair
    from fedtune.tls import make_csr

    private, public = site_keypair(Path(args.out), args.site)
    tls_key, csr = make_csr(Path(args.out), args.site)
    print(
        f"{private} (this site's SuperNode key: it stays here, 0600)\n"
        f"{public} (send to the coordinator: fedtune deploy register --key {public.name})\n"
        f"{tls_key} (this site's TLS client key: it stays here, 0600)\n"
        f"{csr} (if the coordinator's proxy requires client certificates, send it: fedtune deploy sign --csr "
        f"{csr.name}; pass the certificate you get back as --client-cert)"
    )
    return 0


def cmd_deploy_sign(args: argparse.Namespace) -> int:
    from fedtune.tls import sign_csr

    csr = Path(args.csr)
    if not csr.exists():
        raise FedtuneError(f"{csr}: signing request not found (the site makes it: fedtune deploy site-key)")
    out = Path(args.out) if args.out else Path(args.dir) / "site-certs" / f"{csr.stem}.pem"
    cert, name = sign_csr(Path(args.dir) / "pki", csr, out)
    print(f"{cert} (client certificate for {name!r}: send it back to the site, with pki/ca.pem)")
    return 0


def cmd_deploy_register(args: argparse.Namespace) -> int:
    from fedtune.server.deployment import register_site

    key = Path(args.key)
    if not key.exists():
        raise FedtuneError(f"{key}: public key not found (the site makes it: fedtune deploy site-key --site NAME)")
    print(register_site(Path(args.dir), key, args.superlink))
    return 0


def cmd_deploy_superlink(args: argparse.Namespace) -> int:
    from fedtune.server.deployment import run_superlink, superlink_command
    from fedtune.server.reverse_proxy import ProxySettings, proxy_command, write_proxy

    deploy = Path(args.dir)
    pki = deploy / "pki"
    for name in ("ca.pem", "superlink.pem", "superlink.key"):
        if not (pki / name).exists():
            raise FedtuneError(f"{pki / name}: missing; run `fedtune deploy init` first")
    if args.port == args.public_port and not args.no_proxy:
        raise FedtuneError(f"--port and --public-port must differ (both {args.port})")
    check_port_free(args.port, "--port")
    if not args.no_proxy:
        check_port_free(args.public_port, "--public-port")
    proxy_cmd = None
    if not args.no_proxy:
        settings = ProxySettings(
            args.public_host,
            args.public_port,
            args.port,
            (pki / "superlink.pem").resolve(),
            (pki / "superlink.key").resolve(),
            (pki / "ca.pem").resolve(),
            args.require_client_cert,
            args.max_body_mb,
        )
        conf = write_proxy(settings, deploy / "proxy")
        print(f"proxy: {conf}", flush=True)
        proxy_cmd = proxy_command(deploy / "proxy")
    cmd = superlink_command(deploy, args.port, Path(args.database) if args.database else None)
    print(" ".join(cmd), flush=True)
    run_superlink(cmd, args.port, proxy_cmd, None if args.no_proxy else args.public_port)
    return 0


def site_policy(args: argparse.Namespace, allowed_uids: tuple[int, ...] = ()) -> "SitePolicy":
    """The site's policy from its own flags (`deploy site`, `deploy worker`); bad flags are one line."""
    from fedtune.client.site_policy import SitePolicy

    floor = privacy_floor(args)
    data = Path(args.data).expanduser().resolve()
    return SitePolicy(
        name=args.name or data.stem,
        data_path=data,
        state_dir=Path(args.state_dir).expanduser().resolve(),
        floor=floor,
        min_secagg_sites=args.min_secagg_sites,
        allowed_uids=allowed_uids,
        val_fraction=args.val_fraction,
        gate_registry=_gate_registry(args.gate_registry),
        gate_trust_key=_existing_file("--gate-trust-key", args.gate_trust_key),
        gate_registry_ca=_existing_file("--gate-registry-ca", args.gate_registry_ca),
        reveal_gate_drop=args.reveal_gate_drop,
        peers_dir=_existing_dir("--peers", args.peers),
        identity_key=_existing_file(
            "--identity-key", args.identity_key or (getattr(args, "key", None) if args.peers else None)
        ),
        max_colluders=args.max_colluders,
        lora_rank=args.lora_rank,
    )


def _existing_dir(flag: str, path: str | None) -> Path | None:
    if path is None:
        return None
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise FedtuneError(f"{flag} {path}: not a folder")
    return folder


def _gate_registry(address: str | None) -> str:
    import re

    from fedtune.config import GATE_REGISTRY

    if address and not re.match(GATE_REGISTRY, address):
        raise FedtuneError(f"--gate-registry {address!r}: expected host:port")
    return address or ""


def _existing_file(flag: str, path: str | None) -> Path | None:
    if not path:
        return None
    if not Path(path).expanduser().is_file():
        raise FedtuneError(f"{flag} {path}: file not found")
    return Path(path).expanduser().resolve()


def cmd_deploy_worker(args: argparse.Namespace) -> int:
    from fedtune.client.site_worker import SiteWorker
    from fedtune.logs import setup_logging

    if args.max_message_mb <= 0:
        raise FedtuneError(f"--max-message-mb must be > 0, got {args.max_message_mb}")
    if args.simulation == bool(args.data):
        raise FedtuneError(
            "a site's worker needs --data (its policy: the data file, --state-dir, the floor); "
            "--simulation instead serves a one-machine simulation and enforces nothing"
        )
    policy = None
    if args.data:
        if not Path(args.data).is_file():
            raise FedtuneError(f"--data {args.data}: file not found")
        policy = site_policy(args, tuple(args.allow_uid))
    check_rank_flags(args)
    if args.device != "auto":  # before torch is imported: the worker sees only the device the site chose
        os.environ["CUDA_VISIBLE_DEVICES"] = "" if args.device == "cpu" else args.device.removeprefix("cuda:")
    setup_logging()
    SiteWorker(
        Path(args.socket),
        policy,
        idle_timeout=args.idle_timeout,
        max_message_bytes=int(args.max_message_mb * 2**20),
        threads=args.threads,
        socket_group=args.socket_group,
        devices=args.devices,
    ).serve()
    return 0


def check_rank_flags(args: argparse.Namespace) -> None:
    """--devices N: a count, not combined with one named --device, and only with a site worker."""
    if args.devices < 1:
        raise FedtuneError(f"--devices must be at least 1, got {args.devices}")
    if args.devices > 1 and args.device != "auto":
        raise FedtuneError(
            f"--device {args.device} names one device; --devices {args.devices} trains on cuda:0..{args.devices - 1} "
            "(or CPU ranks): give one of the two"
        )
    if args.devices > 1 and getattr(args, "no_worker", False):
        raise FedtuneError("--devices needs the site worker: the ranks live next to it (drop --no-worker)")
    from fedtune.client.site_policy import check_gate_pair

    _gate_registry(args.gate_registry)
    check_gate_pair(args.gate_registry, args.gate_trust_key)


def privacy_floor(args: argparse.Namespace) -> "PrivacyFloor":
    """The site's own privacy floor, from its flags."""
    from fedtune.client.privacy_floor import PrivacyFloor

    if args.own_noise_only and args.max_epsilon is None:
        raise FedtuneError("--own-noise-only applies to --max-epsilon: set both")
    for flag, value in (("--max-epsilon", args.max_epsilon), ("--max-delta", args.max_delta)):
        if value is not None:
            if not value > 0 or not math.isfinite(value):
                raise FedtuneError(f"{flag} must be > 0, got {value}")
            if flag == "--max-delta" and value >= 1:
                raise FedtuneError(f"--max-delta is a probability: it must be < 1, got {value}")
    return PrivacyFloor(
        require_secagg=bool(args.require_secagg),
        max_epsilon=float(args.max_epsilon or 0.0),
        max_delta=float(args.max_delta or 0.0),
        own_noise_only=bool(args.own_noise_only),
    )


def cmd_deploy_site(args: argparse.Namespace) -> int:
    from fedtune.client import app_account
    from fedtune.client.deployment import (
        check_site_data,
        check_tls,
        in_process_node_config,
        run_site,
        supernode_command,
        worker_command,
        worker_node_config,
    )
    from fedtune.client.site_worker import prepare_socket_dir
    from fedtune.flower_env import child_env

    check_rank_flags(args)
    data, ca, key = Path(args.data), Path(args.ca), Path(args.key)
    from fedtune.cli.common import check_address

    superlink = check_address(args.superlink, "--superlink")
    privacy_floor(args)  # bad floor flags are refused before anything is read or dialled
    if bool(args.client_cert) != bool(args.client_key):
        raise FedtuneError(
            "--client-cert and --client-key go together (the certificate the coordinator signed "
            "and this site's NAME.tls.key)"
        )
    if not 0.05 <= args.idle_poll <= 3.0:
        raise FedtuneError(f"--idle-poll must be between 0.05 and 3 seconds, got {args.idle_poll}")
    allow_apps = [check_app_hash(h) for h in args.allow_app]
    check_port_free(args.port, "--port")
    client_tls = (Path(args.client_cert), Path(args.client_key)) if args.client_cert else None
    for path, what in (
        (ca, "CA certificate"),
        (key, "site private key"),
        *(zip(client_tls, ("client certificate", "client key")) if client_tls else ()),
    ):
        if not path.exists():
            raise FedtuneError(f"{path}: {what} not found")
    account = None
    if args.no_worker:
        print(
            "site: --no-worker: the coordinator's ClientApp reads the data and enforces the floor itself; it is "
            "not protected from that code",
            flush=True,
        )
    elif not args.same_user:
        if os.geteuid() != 0:
            print(
                "site: not root, so the SuperNode and the coordinator's ClientApp run as this account and can read "
                "what it reads; see docs/deployment.md (two accounts) or start as root",
                flush=True,
            )
        else:
            account = app_account.app_account(args.app_user)
    policy = site_policy(args, (account.uid,) if account else ())
    count = check_site_data(
        data, args.task, args.text_field, args.label_field, args.prompt_field, args.completion_field
    )
    check_tls(superlink, ca, client_tls=client_tls)
    print(f"site: {data} OK ({count} examples); SuperLink {superlink} TLS OK; joining", flush=True)
    env, user = child_env(), None
    if account is not None:
        root = Path(args.app_home or app_account.DEFAULT_APP_HOME / policy.name)
        files = {
            "ca.pem": ca,
            "supernode.key": key,
            **({"client.pem": client_tls[0], "client.key": client_tls[1]} if client_tls else {}),
        }
        home, copies = app_account.prepare_app_home(root, account, files)
        ca, key = copies["ca.pem"], copies["supernode.key"]
        client_tls = (copies["client.pem"], copies["client.key"]) if client_tls else None
        policy.state_dir.mkdir(parents=True, exist_ok=True)
        policy.state_dir.chmod(0o700)
        env = {**child_env(home.home / ".flwr"), "HOME": str(home.home)}
        app_account.check_out_of_reach(account, {"data file": data, "state folder": policy.state_dir})
        app_account.check_can_start(account, env)
        user = (account.uid, account.gid)
        print(
            f"site: the SuperNode and every ClientApp run as {account.name!r} (uid {account.uid}), which cannot "
            f"read {data} or {args.state_dir}; the worker runs as this account",
            flush=True,
        )
    socket_path = None
    worker = None
    if not args.no_worker:
        default_socket = home.socket if account is not None else policy.state_dir / "worker" / "worker.sock"
        socket_path = Path(args.worker_socket or default_socket).resolve()
        group = account.gid if account is not None else None
        prepare_socket_dir(socket_path, group)
        node_config = worker_node_config(socket_path)
        worker = worker_command(
            socket_path, policy, args.worker_threads, socket_group=group, device=args.device, devices=args.devices
        )
    else:
        node_config = in_process_node_config(policy)
    cmd = supernode_command(
        superlink, ca, key, args.port, node_config, args.max_retries, args.idle_poll, client_tls, allow_apps
    )
    run_site(cmd, key, superlink, worker, socket_path, supernode_user=user, supernode_env=env)
    return 0


def check_port_free(port: int, flag: str) -> None:
    """A local port nothing listens on yet, or one line naming the flag."""
    import socket

    if not 0 < port < 65536:
        raise FedtuneError(f"{flag} {port}: not a TCP port (1-65535)")
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as err:
            raise FedtuneError(f"{flag} {port}: in use on this machine ({err.strerror}); choose another") from None


def check_device(value: str) -> str:
    """auto, cpu or cuda:N (argparse type: a bad value is argparse's one-line usage error)."""
    if value in ("auto", "cpu") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise argparse.ArgumentTypeError(f"expected auto, cpu or cuda:N, got {value!r}")


def check_app_hash(value: str) -> str:
    digest = value.lower().removeprefix("sha256:")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise FedtuneError(
            f"--allow-app {value}: expected an app's SHA-256 (64 hex digits; fedtune deploy app-hash "
            f"--app DIR prints it)"
        )
    return digest


def cmd_deploy_app_hash(args: argparse.Namespace) -> int:
    from flwr.cli.build import build_fab_from_disk

    from fedtune.client.supernode_launcher import app_hash

    app = Path(args.app).expanduser().resolve()
    if not (app / "pyproject.toml").is_file():
        raise FedtuneError(f"--app {args.app}: no pyproject.toml there; pass the Flower app folder")
    try:
        fab = build_fab_from_disk(app)
    except ValueError as err:
        raise FedtuneError(f"--app {args.app}: not a Flower app ({str(err).splitlines()[0]})") from None
    print(f"sha256:{app_hash(fab)}")
    return 0


def cmd_deploy_run(args: argparse.Namespace) -> int:
    import time

    import tomllib

    from fedtune.cli.common import parse_flwr_run_config, pin_launch_paths
    from fedtune.config import RunSettings, default_run_config
    from fedtune.server.deployment import launch_run
    from fedtune.server.preflight import check_run_inputs

    app = Path(args.app).expanduser().resolve()
    if not (app / "pyproject.toml").is_file():
        raise FedtuneError(
            f"--app {args.app}: no pyproject.toml there; pass the fedtune project folder "
            f"(the one with [tool.flwr.app]), e.g. --app /opt/fedtune"
        )
    try:
        app_config = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    except (KeyError, tomllib.TOMLDecodeError) as err:
        raise FedtuneError(f"{app / 'pyproject.toml'}: no [tool.flwr.app.config] table ({err})") from None
    overrides = parse_flwr_run_config(args.run_config or [])
    if args.resume:
        overrides.update({"run-name": args.resume, "resume": True})
    config = pin_launch_paths({**default_run_config(), **app_config, **overrides}, overrides, app, Path.cwd())
    settings = RunSettings.from_run_config(config)
    check_run_inputs(settings)  # everything the coordinator can check, before any site trains
    pinned = {k for k in ("labels-file", "central-eval-path", "output-dir") if config.get(k)}
    launched = {k: config[k] for k in set(overrides) | pinned}  # what Flower's copy of the app gets
    name = settings.run_name or time.strftime("%Y%m%d-%H%M%S")
    record, cmd, env = launch_run(Path(args.dir), app, name, launched)
    print(f"run config checked; launched with {record} (paths absolute: runs go to {settings.output_dir})", flush=True)
    print(" ".join(cmd), flush=True)
    os.execve(cmd[0], cmd, env)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    dep = sub.add_parser(
        "deploy",
        help="multi-machine deployment: PKI, site keys, SuperLink, a site's SuperNode, the run",
        description="Flower's Deployment Engine with TLS and SuperNode authentication. Coordinator: init, "
        "register (a site's public key), sign (a site's .csr, for client certificates), superlink (on loopback, "
        "behind nginx, which forwards the Fleet API only), run. Site: site-key (its own keys), site (one command).",
    ).add_subparsers(dest="deploy_command", required=True)
    d_init = dep.add_parser("init", help="coordinator: create the CA and the SuperLink's TLS certificate")
    d_init.add_argument("--dir", default="deploy", help="deployment folder (default: deploy)")
    d_init.add_argument("--host", action="append", required=True, help="SuperLink host name or IP (repeatable)")
    d_init.set_defaults(func=cmd_deploy_init)
    d_key = dep.add_parser(
        "site-key",
        help="site: make this site's SuperNode key pair (EC P-384, OpenSSH) and a TLS "
        "client key with its signing request; only the .pub (and the .csr) go to the coordinator",
    )
    d_key.add_argument("--out", default="site-keys", help="folder for the key pair (default: site-keys)")
    d_key.add_argument("--site", required=True, help="site name")
    d_key.set_defaults(func=cmd_deploy_site_key)
    d_sign = dep.add_parser(
        "sign",
        help="coordinator: sign a site's TLS signing request (.csr) for a proxy that requires client certificates",
    )
    d_sign.add_argument("--dir", default="deploy")
    d_sign.add_argument("--csr", required=True, help="the signing request the site sent (NAME.csr)")
    d_sign.add_argument("--out", help="where to write the certificate (default: DIR/site-certs/NAME.pem)")
    d_sign.set_defaults(func=cmd_deploy_sign)
    d_reg = dep.add_parser("register", help="coordinator: register a site's public key with the SuperLink")
    d_reg.add_argument("--dir", default="deploy")
    d_reg.add_argument("--key", required=True, help="the public key file the site sent (NAME.pub)")
    d_reg.add_argument(
        "--superlink",
        default="127.0.0.1:9093",
        help="the SuperLink's loopback address (default: 127.0.0.1:9093; not the public port)",
    )
    d_reg.set_defaults(func=cmd_deploy_register)
    d_link = dep.add_parser(
        "superlink",
        help="coordinator: run the SuperLink on loopback behind its reverse proxy (nginx)",
        description="Runs Flower's SuperLink (TLS, SuperNode authentication, no runtime installs) on 127.0.0.1 "
        "only, where the coordinator's `flwr` and ServerApp reach it, and nginx on --public-host:--public-port, "
        "which terminates the sites' TLS and forwards Flower's Fleet API and nothing else. Stops both on "
        "SIGTERM/SIGINT.",
    )
    d_link.add_argument("--dir", default="deploy")
    d_link.add_argument(
        "--port",
        type=int,
        default=9093,
        help="the SuperLink's port on 127.0.0.1, for `flwr`, registration and the ServerApp (default: 9093)",
    )
    d_link.add_argument("--public-host", default="0.0.0.0", help="where the proxy listens for sites (default: 0.0.0.0)")
    d_link.add_argument("--public-port", type=int, default=9092, help="the port sites connect to (default: 9092)")
    d_link.add_argument(
        "--require-client-cert",
        action="store_true",
        help="the proxy admits only sites presenting a certificate signed by this deployment's CA "
        "(fedtune deploy site-key --csr; fedtune deploy sign)",
    )
    d_link.add_argument(
        "--max-body-mb", type=int, default=1024, help="largest request the proxy forwards, MiB (default: 1024)"
    )
    d_link.add_argument(
        "--no-proxy", action="store_true", help="no reverse proxy: only sites on this machine can reach the SuperLink"
    )
    d_link.add_argument("--database", help="SQLite file for the SuperLink's state (default: in memory)")
    d_link.set_defaults(func=cmd_deploy_superlink)
    d_site = dep.add_parser(
        "site",
        help="site: check the data file, the CA and the key, then join the federation",
        description="Validates the data file (one line per problem), checks the SuperLink's TLS certificate "
        "against --ca, then runs this site's SuperNode with data-path in its node config.",
    )
    d_site.add_argument(
        "--superlink", required=True, help="HOST:PORT where the coordinator's proxy listens (its public port)"
    )
    d_site.add_argument("--ca", required=True, help="the coordinator's ca.pem")
    d_site.add_argument("--key", required=True, help="this site's SuperNode private key (fedtune deploy site-key)")
    d_site.add_argument(
        "--client-cert",
        help="this site's TLS client certificate, signed by the coordinator (when its proxy requires one)",
    )
    d_site.add_argument("--client-key", help="the key of --client-cert (NAME.tls.key from fedtune deploy site-key)")
    d_site.add_argument(
        "--port", type=int, default=9094, help="local port for this SuperNode's app API (default: 9094)"
    )
    d_site.add_argument("--task", choices=TASKS, default="seq-cls")
    d_site.add_argument("--text-field", default="text")
    d_site.add_argument("--label-field", default="label")
    d_site.add_argument("--prompt-field", default="prompt")
    d_site.add_argument("--completion-field", default="completion")
    d_site.add_argument("--max-retries", type=int, help="give up after N failed connection attempts")
    d_site.add_argument("--worker-socket", help="the site worker's Unix socket (default: STATE_DIR/worker/worker.sock)")
    d_site.add_argument(
        "--worker-threads", type=int, default=0, help="CPU threads the worker trains with (0: torch's default)"
    )
    d_site.add_argument(
        "--idle-poll",
        type=float,
        default=0.5,
        help="seconds an idle SuperNode waits before asking for work again (Flower's own: 3; default: 0.5)",
    )
    d_site.add_argument(
        "--no-worker",
        action="store_true",
        help="no site worker: each message's ClientApp process loads the model itself (slow), and "
        "the coordinator's code reads the data and enforces the floor: no protection from it",
    )
    add_policy_arguments(d_site, data_required=True)
    d_site.add_argument(
        "--app-user",
        default=app_user_default(),
        help="as root: the account the SuperNode and every ClientApp process run as, created if "
        "missing; it cannot read the data or the worker's state (default: fedtune-app)",
    )
    d_site.add_argument(
        "--app-home",
        help="as root: that account's folder (Flower's state, copies of the CA and "
        "the SuperNode key; the worker's socket) (default: /var/lib/fedtune-app/NAME)",
    )
    d_site.add_argument(
        "--same-user",
        action="store_true",
        help="run the SuperNode as this account too (no privilege separation: the coordinator's "
        "ClientApp can read what this account reads)",
    )
    d_site.add_argument(
        "--allow-app",
        action="append",
        default=[],
        metavar="SHA256",
        help="run only apps with this hash (repeatable; fedtune deploy app-hash --app DIR prints "
        "it); every app's hash is logged either way",
    )
    d_site.set_defaults(func=cmd_deploy_site)
    d_work = dep.add_parser(
        "worker",
        help="site: the site worker alone (what `deploy site` starts): keeps the model loaded across rounds",
        description="A long-lived process that loads the base model once and answers this site's Flower messages "
        "(SecAgg+ included) relayed by its ClientApp over a private Unix socket (0700 directory, 0600 socket, "
        "same-uid peers or --allow-uid). It owns the site's policy: the data file, state folder, name and privacy "
        "floor come from its own flags, never from a message. Give the SuperNode its path as worker-socket in "
        "--node-config.",
    )
    d_work.add_argument("--socket", required=True, help="the Unix socket to listen on (its directory is made 0700)")
    d_work.add_argument(
        "--idle-timeout",
        type=float,
        default=1800.0,
        help="drop a run's state after this many seconds without a request (default: 1800)",
    )
    d_work.add_argument(
        "--max-message-mb",
        type=float,
        default=1024.0,
        help="largest request accepted, in MiB of tensors (default: 1024)",
    )
    d_work.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    add_policy_arguments(d_work, data_required=False)
    d_work.add_argument(
        "--allow-uid",
        type=int,
        action="append",
        default=[],
        help="another local account (the SuperNode's) that may use the socket (repeatable)",
    )
    d_work.add_argument("--socket-group", type=int, help="group id given the socket's folder (0750) and socket (0660)")
    d_work.add_argument(
        "--simulation",
        action="store_true",
        help="serve every virtual site of a one-machine simulation, taking each site's settings "
        "from the message (enforces nothing; a deployed site gives --data instead)",
    )
    d_work.set_defaults(func=cmd_deploy_worker)
    d_run = dep.add_parser(
        "run",
        help="coordinator: check the run's settings and files, then launch it (flwr run APP fedtune --stream)",
        description="Checks before any site trains: every setting, the label set against the held-out file, every "
        "path on this machine, the model, the run folder. Relative paths you give resolve against the directory "
        "you run this in, the app's own defaults against --app; all are made absolute before Flower copies the "
        "app (to FLWR_HOME/apps/ on each machine). The launched settings are kept in DIR/launched/RUN.toml.",
    )
    d_run.add_argument("--dir", default="deploy")
    d_run.add_argument("--app", default=".", help="the fedtune project folder: the Flower app (default: .)")
    d_run.add_argument(
        "--run-config",
        action="append",
        help="'key=value ...' overrides, or one TOML file (as flwr run takes; repeatable)",
    )
    d_run.add_argument("--resume", metavar="RUN_NAME", help="continue this run after its last completed round")
    d_run.set_defaults(func=cmd_deploy_run)
    d_hash = dep.add_parser(
        "app-hash", help="print the hash of a Flower app as `flwr run` ships it (for a site's --allow-app)"
    )
    d_hash.add_argument("--app", default=".", help="the app folder (default: .)")
    d_hash.set_defaults(func=cmd_deploy_app_hash)


def app_user_default() -> str:
    from fedtune.client.app_account import DEFAULT_APP_USER

    return DEFAULT_APP_USER


def add_policy_arguments(parser: argparse.ArgumentParser, data_required: bool) -> None:
    """The site's own policy, given to its worker (never in a message)."""
    parser.add_argument("--data", required=data_required, help="this site's JSONL/CSV file (never leaves the site)")
    parser.add_argument("--name", help="this site's name in the coordinator's metrics (default: the data file's stem)")
    parser.add_argument("--state-dir", default=".fedtune-site-state", help="site-local state, e.g. the DP accountant")
    parser.add_argument(
        "--require-secagg", action="store_true", help="this site's floor: refuse any run without SecAgg+"
    )
    parser.add_argument(
        "--max-epsilon",
        type=float,
        help="this site's floor: refuse runs without DP-SGD, and train no round after which this "
        "site's own epsilon would exceed this",
    )
    parser.add_argument(
        "--max-delta",
        type=float,
        help="this site's floor: the largest DP delta it accepts (default with --max-epsilon: 1e-5)",
    )
    parser.add_argument(
        "--own-noise-only",
        action="store_true",
        help="this site's floor under dp-mode = distributed: --max-epsilon counts only this site's own "
        "noise shares, not trusting the other sites to add theirs",
    )
    parser.add_argument(
        "--val-fraction", type=float, help="this site's own validation split (default: the run's val-fraction)"
    )
    parser.add_argument(
        "--device",
        default="auto",
        type=check_device,
        help="the device the site worker trains on: auto (a GPU if any), cpu, or cuda:N (default: auto)",
    )
    parser.add_argument(
        "--gate-registry",
        help="the release gate (fedtune gate): the registry this site pulls release candidates from, host:port",
    )
    parser.add_argument(
        "--gate-trust-key", help="the release gate: the coordinator's public key candidates must be signed with"
    )
    parser.add_argument("--gate-registry-ca", help="the release gate: the registry's TLS CA (PEM)")
    parser.add_argument(
        "--reveal-gate-drop",
        action="store_true",
        help="the release gate: also send this site's own accuracy drop in the clear (default: only the "
        "masked counts, so the coordinator sees the federation's totals)",
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=1,
        help="train on N ranks at this site (torch.distributed: one process per GPU, cuda:0..N-1; "
        "gloo ranks sharing the CPU without GPUs); each trains on its slice of every batch (default: 1)",
    )
    parser.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="the LoRA rank this site affords in runs with hetero-ranks (at most the run's lora-r; it trains "
        "the first that many components of the federation's adapter); default: the run's lora-r",
    )
    parser.add_argument(
        "--peers",
        metavar="DIR",
        help="signed SecAgg+: a folder of the public keys (NAME.pub, their SuperNode keys) of the sites this "
        "site agreed, among the sites, to aggregate with; it then refuses any SecAgg+ round with a site "
        "outside it, unsigned or replaced keys, or an inconsistent list of who dropped",
    )
    parser.add_argument(
        "--identity-key",
        help="signed SecAgg+: the private key this site signs with (deploy site: its SuperNode --key)",
    )
    parser.add_argument(
        "--max-colluders",
        type=int,
        default=0,
        help="signed SecAgg+: the most sites assumed to collude with the coordinator; a round needs a "
        "threshold t with 2t > sites + this and t >= this + 2 (default: 0)",
    )
    parser.add_argument(
        "--min-secagg-sites",
        type=int,
        default=2,
        help="take part in SecAgg+ only with a reconstruction threshold of at least this many sites "
        "(default: 2; 1 would let the coordinator unmask this site alone)",
    )
