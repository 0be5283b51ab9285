"""The release gate at the sites against the export it checks, on the demo's run.

The newest finished demo run (copied, so the gate's files land in the copy) is exported to
a signed INT8 bundle exactly as `make demo` does (parity gate on the held-out test split):
that wall time is the export's. Then `fedtune gate` releases it as a candidate to a registry
on loopback (real gRPC, TLS), runs the gate round in the Simulation Engine (3 virtual sites
under SecAgg+, each pulling, verifying and running the candidate with onnxruntime on its own
validation split against the final round's PyTorch model) and promotes it: that wall time is
the gate's. Keys: `release_gate_over_export_wall_time`, the federation's drop and the worst
site's (simulated sites reveal theirs).

    python bench/release_gate.py [--run-dir runs/<id>] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # support/: the loopback registry

from demo_run import WORK, find_demo_run  # noqa: E402
from results import update_results  # noqa: E402
from support.registry_server import TOKEN, Registry, make_pki  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, help="a finished demo run (default: the newest one found)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from fedtune.cli import main as cli_main
    from fedtune.edge_export.exporter import export_bundle
    from fedtune.edge_export.signing import generate_keypair

    WORK.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gate-bench-", dir=WORK))
    registry = None
    try:
        source = args.run_dir or find_demo_run()
        run = work / "runs" / source.name
        shutil.copytree(source, run, ignore=shutil.ignore_patterns("gate", "gate.json"))
        private, public = generate_keypair(work / "keys")
        keys = {"private": private, "public": public}
        registry = Registry(work / "registry", make_pki(work / "pki"), keys)
        (work / "token").write_text(TOKEN)
        (work / "ca.pem").write_bytes(registry.pki["ca"])

        start = time.perf_counter()
        export_bundle(run, work / "bundle", private)
        export_s = time.perf_counter() - start

        start = time.perf_counter()
        code = cli_main(
            [
                "gate", str(run), "--bundle", str(work / "bundle"), "--model", "banking77", "--version", "v1",
                "--key", str(private), "--registry", registry.address, "--registry-ca", str(work / "ca.pem"),
                "--token-file", str(work / "token"), "--trust-key", str(public), "--sites", "3",
            ]
        )  # fmt: skip
        gate_s = time.perf_counter() - start
        outcome = json.loads((run / "gate.json").read_text())
    finally:
        if registry is not None:
            registry.server.stop(grace=None).wait()
    fed = outcome["federation"]
    site_drops = {name: entry.get("drop_pt") for name, entry in sorted(outcome["sites"].items())}
    keys_out = {
        "release_gate_over_export_wall_time": round(gate_s / export_s, 4),
        "release_gate_federation_drop_pt": round(fed["drop_pt"], 4),
        "release_gate_worst_site_drop_pt": round(max(d for d in site_drops.values() if d is not None), 4),
    }
    (WORK / "release_gate.json").write_text(
        json.dumps(
            {"export_s": export_s, "gate_s": gate_s, "exit": code, "outcome": outcome, "keys": keys_out}, indent=2
        )
    )
    print(json.dumps(keys_out, indent=2))
    if args.no_write:
        shutil.rmtree(work, ignore_errors=True)
        return
    rows = "\n".join(
        f"| {name} | {int(outcome['sites'][name]['examples'])} | {drop:.2f} |" for name, drop in site_drops.items()
    )
    md = f"""## Release gate at the sites (`bench/release_gate.py`)

The demo's run ({source.name}): its export to a signed INT8 bundle with the parity gate on the
coordinator's held-out split ({export_s:.1f} s), against `fedtune gate` releasing that bundle as a
candidate, 3 simulated sites under SecAgg+ pulling it from a loopback registry, verifying it,
running it on onnxruntime and the final round's PyTorch model on their own validation splits, and
the promotion ({gate_s:.1f} s, {gate_s / export_s:.2f}x the export; the Simulation Engine's start is
part of it). Result: **{"passed" if outcome["passed"] else "failed"}**: {outcome["reason"]}.

| | examples | accuracy drop, device vs PyTorch (pt) |
|---|---|---|
| federation (from the SecAgg+ sum) | {outcome["examples"]} | {fed["drop_pt"]:.2f} |
{rows}

Federation: PyTorch accuracy {fed["accuracy_torch"]:.4f}, device {fed["accuracy_device"]:.4f};
macro-F1 {fed["macro_f1_torch"]:.4f} / {fed["macro_f1_device"]:.4f}; agreement {fed["agreement"]:.4f}.
The causal-LM run is not gated yet (the site gate scores classifiers only)."""
    update_results("release-gate", keys_out, md)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
