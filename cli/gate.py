"""`fedtune gate`: the release gate at the sites, end to end. The exported bundle is
released as a candidate (MODEL.candidate, a signed channel devices refuse) and published;
a gate round asks every site to score it on its own data (`server/release_gate.py`,
`client/release_gate.py`); only when the gate passes is the same bundle released under
MODEL, its release record naming the gate's result, and published for devices. Otherwise
it says which gate failed, in one line, and devices keep the release they have."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fedtune.errors import FedtuneError


def cmd_gate(args: argparse.Namespace) -> int:
    from fedtune.edge_device.release import candidate_model
    from fedtune.edge_export.release import release_bundle
    from fedtune.gate_counts import GATE_FILE
    from fedtune.registry.publisher import publish
    from fedtune.registry.token import read_token
    from fedtune.run_folder import read_run

    from .common import absolute_paths
    from .simulation import run_simulation

    run_dir = Path(args.run).expanduser().resolve()
    if not (run_dir / "final").is_dir():
        raise FedtuneError(f"{run_dir}: not a finished run (no final adapter)")
    _check_base_version(Path(args.bundle), args.base_version, args.version)
    token = read_token(args.token_file)
    ca = Path(args.registry_ca).read_bytes() if args.registry_ca else None
    gate_dir = run_dir / "gate"
    candidate = gate_dir / f"{args.version}-candidate"
    if not candidate.exists():
        release_bundle(args.bundle, args.model, args.version, args.key, candidate, channel="candidate")
    publish(args.registry, candidate, candidate_model(args.model), args.version, token, ca)
    print(f"gate: candidate {candidate_model(args.model)} {args.version} published to {args.registry}", flush=True)

    config: dict[str, Any] = {
        **read_run(run_dir).settings,
        "output-dir": str(run_dir.parent),
        "run-name": run_dir.name,
        "resume": False,
        "gate-registry": args.registry,
        "gate-model": args.model,
        "gate-version": args.version,
        "gate-base-version": args.base_version,
        "gate-max-drop-pt": args.max_drop_pt,
        "gate-site-max-drop-pt": args.site_max_drop_pt,
        "gate-registry-ca": str(Path(args.registry_ca).resolve()) if args.registry_ca else "",
        "gate-trust-key": str(Path(args.trust_key).resolve()) if args.trust_key else "",
        "site-state-dir": str(gate_dir / "sites"),  # where the virtual sites pull the candidate
    }
    if args.federation:
        _run_deployed(config, Path(args.federation), Path(args.app))
    else:
        if not args.trust_key:
            raise FedtuneError("--trust-key: simulated sites need the public key they accept candidates from")
        run_simulation(absolute_paths(config), num_sites=args.sites, verbose=args.verbose)
    if not (run_dir / GATE_FILE).exists():
        raise FedtuneError(f"gate: the gate round wrote no {GATE_FILE} in {run_dir} (see the log above)")
    outcome = json.loads((run_dir / GATE_FILE).read_text())
    summary = f"{'passed' if outcome['passed'] else 'failed'}: {outcome['reason']}"
    if not outcome["passed"]:
        raise FedtuneError(f"gate: candidate {args.model} {args.version} not promoted: {summary}")
    released = gate_dir / args.version
    if not released.exists():
        release_bundle(candidate, args.model, args.version, args.key, released, gate=summary)
    publish(args.registry, released, args.model, args.version, token, ca)
    print(f"gate: {args.model} {args.version} promoted and published ({summary})")
    return 0


def _check_base_version(bundle: Path, base_version: str, version: str) -> None:
    """An adapter-only update is gated on the release it applies to, and only it names one."""
    from fedtune.edge_device.bundle import BundleError, bundle_kind, unverified_manifest

    try:
        adapter = bundle_kind(unverified_manifest(bundle)) == "adapter"
    except BundleError as err:
        raise FedtuneError(f"--bundle: {err}") from None
    if adapter and not base_version:
        raise FedtuneError(
            f"--bundle {bundle} is an adapter-only update: name the release it applies to with --base-version"
        )
    if base_version and not adapter:
        raise FedtuneError(f"--base-version: {bundle} is a whole model, not an adapter-only update")
    if base_version == version:
        raise FedtuneError(f"--base-version: the candidate {version!r} cannot be its own base")


def _run_deployed(config: dict[str, Any], deploy_dir: Path, app: Path) -> None:
    """The gate round on the deployment: `flwr run` with the gate's settings, to the end."""
    import subprocess

    from fedtune.server.deployment import launch_run

    name = f"{config['run-name']}-gate-{config['gate-version']}"
    _, cmd, env = launch_run(deploy_dir, app.expanduser().resolve(), name, config)
    print(f"gate: the sites score the candidate ({' '.join(cmd)})", flush=True)
    code = subprocess.run(cmd, env=env).returncode
    if code != 0:
        raise FedtuneError(f"gate: flwr run exited with code {code}")


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    gate = sub.add_parser(
        "gate",
        help="release gate: every site scores the exported bundle on its own data before devices get it",
        description=__doc__,
    )
    gate.add_argument("run", help="the trained run's folder (runs/RUN)")
    gate.add_argument("--bundle", required=True, help="the signed bundle `fedtune export` made from it")
    gate.add_argument("--model", required=True, help="the model name devices pull")
    gate.add_argument("--version", required=True, help="the version to release")
    gate.add_argument("--key", required=True, help="the coordinator's private signing key")
    gate.add_argument(
        "--base-version",
        default="",
        help="an adapter-only update (fedtune export-adapter): the released version of --model it applies to",
    )
    gate.add_argument("--registry", required=True, help="the registry, host:port")
    gate.add_argument("--registry-ca", help="the registry's TLS CA (PEM)")
    gate.add_argument("--token-file", required=True, help="the registry's publish token")
    gate.add_argument("--trust-key", help="simulated sites: the public key they accept candidates from")
    gate.add_argument(
        "--federation",
        metavar="DEPLOY_DIR",
        help="run the gate round on this deployment (fedtune deploy init's folder) instead of in simulation; "
        "each site pulls from its own --gate-registry with its own --gate-trust-key",
    )
    gate.add_argument("--app", default=".", help="with --federation: the fedtune project folder (the Flower app)")
    gate.add_argument("--sites", type=int, default=3, help="simulated sites (the trained run's number)")
    gate.add_argument("--max-drop-pt", type=float, default=1.0, help="largest federation-wide accuracy drop (points)")
    gate.add_argument("--site-max-drop-pt", type=float, default=5.0, help="largest drop at a site that reveals its own")
    gate.add_argument("--verbose", action="store_true", help="Flower's and Ray's own logs")
    gate.set_defaults(func=cmd_gate)
