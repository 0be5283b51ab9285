"""`fedtune certs` (a private CA and its certificates) and `fedtune registry` (the
publish token, serving a store over gRPC, publishing a signed bundle)."""

from __future__ import annotations

import argparse
from pathlib import Path


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
    from fedtune.registry.token import create_token

    print(f"{create_token(args.out)} (give it to the coordinator's publisher only)")
    return 0


def cmd_registry_serve(args: argparse.Namespace) -> int:
    from fedtune.cli.common import check_address
    from fedtune.errors import FedtuneError
    from fedtune.logs import setup_logging
    from fedtune.registry.service import (
        ServerLimits,
        make_server,
        serve_until_signalled,
    )
    from fedtune.registry.store import ModelStore
    from fedtune.registry.token import read_token
    from fedtune.tls import read_pem

    check_address(args.address, "--address")
    log = setup_logging()
    store = ModelStore(args.store, trusted_key=args.trust_key)
    limits = ServerLimits(max_workers=args.max_workers, max_concurrent_rpcs=args.max_concurrent_rpcs)
    server, port = make_server(
        store,
        args.address,
        read_pem(args.cert, "certificate"),
        read_pem(args.key, "key"),
        read_token(args.token_file),
        client_ca=read_pem(args.client_ca, "client CA"),
        limits=limits,
    )
    if port == 0:
        raise FedtuneError(f"{args.address}: cannot listen there")
    log.info(
        "registry: serving %s on port %d (TLS%s), store %s",
        args.address,
        port,
        ", mTLS" if args.client_ca else "",
        Path(args.store).resolve(),
    )
    serve_until_signalled(server)
    log.info("registry: stopped")
    return 0


def cmd_registry_publish(args: argparse.Namespace) -> int:
    from fedtune.registry.publisher import publish
    from fedtune.registry.token import read_token
    from fedtune.tls import read_pem

    reply = publish(
        args.registry,
        args.bundle,
        args.model or "",
        args.version or "",
        read_token(args.token_file),
        read_pem(args.ca, "CA certificate"),
        read_pem(args.cert, "certificate"),
        read_pem(args.key, "key"),
    )
    print(f"published {reply.model} {reply.version} ({reply.total_bytes:,} bytes) to {args.registry}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    certs = sub.add_parser("certs", help="TLS certificates (a private CA)").add_subparsers(
        dest="certs_command", required=True
    )
    cc = certs.add_parser("create", help="a CA (once), a server certificate for --host, client certificates")
    cc.add_argument("--out", required=True, help="folder for ca.pem/ca.key and the issued certificates")
    cc.add_argument("--host", action="append", help="server host name or IP (repeatable)")
    cc.add_argument("--server-name", default="server", help="server certificate file stem (default: server)")
    cc.add_argument("--client", action="append", help="issue a client certificate with this name (repeatable)")
    cc.set_defaults(func=cmd_certs_create)

    reg = sub.add_parser("registry", help="the model registry (gRPC)").add_subparsers(
        dest="registry_command", required=True
    )
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
    srv.add_argument(
        "--trust-key",
        required=True,
        help="the coordinator's Ed25519 public key: bundles not signed by it are refused at publish",
    )
    srv.add_argument("--max-workers", type=int, default=16, help="handler threads (default: 16)")
    srv.add_argument(
        "--max-concurrent-rpcs", type=int, default=64, help="calls in flight before RESOURCE_EXHAUSTED (default: 64)"
    )
    srv.set_defaults(func=cmd_registry_serve)
    pub = reg.add_parser("publish", help="publish a released bundle (coordinator only)")
    pub.add_argument("bundle", help="bundle folder from `fedtune release`")
    pub.add_argument("--registry", required=True, help="HOST:PORT")
    pub.add_argument("--model", help="model name (default: the one the release record names; must match it)")
    pub.add_argument("--version", help="version name (default: the one the release record names; must match it)")
    pub.add_argument("--token-file", required=True, help="the publish token")
    pub.add_argument("--ca", required=True, help="CA certificate of the registry")
    pub.add_argument("--cert", help="client certificate (when the registry requires mTLS)")
    pub.add_argument("--key", help="client key (when the registry requires mTLS)")
    pub.set_defaults(func=cmd_registry_publish)
