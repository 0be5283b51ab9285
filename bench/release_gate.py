"""The release gate at the sites against the export it checks, on the demo's run.

The newest finished demo run (copied, so the gate's files land in the copy) is exported to
a signed INT8 bundle exactly as `make demo` does (parity gate on the held-out test split):
that wall time is the export's. Then `fedtune gate` releases it as a candidate to a registry
on loopback (real gRPC, TLS), runs the gate round in the Simulation Engine (3 virtual sites
under SecAgg+, each pulling, verifying and running the candidate with onnxruntime on its own
validation split against the final round's PyTorch model) and promotes it: that wall time is
the gate's. Keys: `release_gate_over_export_wall_time`, the federation's drop and the worst
site's (simulated sites reveal theirs).

With `--llm-run`, the same for a `make demo-llm` run: its merged INT4 bundle, scored by
greedy exact match (keys `release_gate_llm_*`).

    python bench/release_gate.py [--run-dir runs/<id>] [--llm-run runs/llm-<id>] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # support/: the loopback registry

from demo_run import WORK, find_demo_run  # noqa: E402
from results import update_results  # noqa: E402
from support.registry_server import TOKEN, Registry, make_pki  # noqa: E402

LLM_PARITY_EXAMPLES = 100  # as make demo-llm
LLM_MAX_DROP_PT = 10.0
NOT_PROMOTED = (
    " Not promoted: the candidate stays off the devices' channel. A site past its own limit while the"
    " federation's total is within the gate is the case the site gate exists for."
)


def measure(source: Path, work: Path, llm: bool) -> dict[str, Any]:
    """Export `source` (a copy of it) and gate the bundle; the two wall times and the outcome."""
    from fedtune.cli import main as cli_main
    from fedtune.edge_export.exporter import export_bundle
    from fedtune.edge_export.signing import generate_keypair

    run = work / "runs" / source.name
    shutil.copytree(source, run, ignore=shutil.ignore_patterns("gate", "gate.json"))
    private, public = generate_keypair(work / "keys")
    registry = Registry(work / "registry", make_pki(work / "pki"), {"private": private, "public": public})
    try:
        (work / "token").write_text(TOKEN)
        (work / "ca.pem").write_bytes(registry.pki["ca"])
        start = time.perf_counter()
        if llm:  # the merged INT4 bundle, gated like make demo-llm's (100 prompts, 10 points)
            export_bundle(
                run, work / "bundle", private, limit=LLM_PARITY_EXAMPLES, max_accuracy_drop_pt=LLM_MAX_DROP_PT
            )
        else:
            export_bundle(run, work / "bundle", private)
        export_s = time.perf_counter() - start
        start = time.perf_counter()
        code = cli_main(
            [
                "gate", str(run), "--bundle", str(work / "bundle"), "--model", "m", "--version", "v1",
                "--key", str(private), "--registry", registry.address, "--registry-ca", str(work / "ca.pem"),
                "--token-file", str(work / "token"), "--trust-key", str(public), "--sites", "3",
                "--max-drop-pt", str(LLM_MAX_DROP_PT if llm else 1.0),
            ]
        )  # fmt: skip
        gate_s = time.perf_counter() - start
    finally:
        registry.server.stop(grace=None).wait()
    return {
        "export_s": export_s,
        "gate_s": gate_s,
        "exit": code,
        "outcome": json.loads((run / "gate.json").read_text()),
    }


def section(name: str, source: Path, result: dict[str, Any], llm: bool) -> str:
    outcome, fed = result["outcome"], result["outcome"]["federation"]
    export_s, gate_s = result["export_s"], result["gate_s"]
    rows = "\n".join(
        f"| {site} | {int(entry['examples'])} | {entry['drop_pt']:.2f} |"
        for site, entry in sorted(outcome["sites"].items())
    )
    what = (
        "merged INT4 bundle (onnxruntime-genai), parity gate on 100 held-out prompts; the sites generate 8 "
        "tokens greedily with both models for their first `eval-max-examples` pairs (exact match)"
        if llm
        else "signed INT8 bundle with the parity gate on the coordinator's held-out split; the sites classify "
        "their whole validation splits with both models"
    )
    metric = "exact match" if llm else "accuracy"
    f1 = "" if llm else f"; macro-F1 {fed['macro_f1_torch']:.4f} / {fed['macro_f1_device']:.4f}"
    return f"""### {name}: run {source.name}

Export to a {what}: export {export_s:.1f} s, gate {gate_s:.1f} s ({gate_s / export_s:.2f}x; releasing the
candidate, 3 simulated sites under SecAgg+ pulling and verifying it from a loopback registry, scoring, and the
promotion; the Simulation Engine's start is part of it). Result: **{"passed" if outcome["passed"] else "failed"}**:
{outcome["reason"]}.

| | examples | {metric} drop, device vs PyTorch (pt) |
|---|---|---|
| federation (from the SecAgg+ sum) | {outcome["examples"]} | {fed["drop_pt"]:.2f} |
{rows}

Federation: PyTorch {metric} {fed["accuracy_torch"]:.4f}, device {fed["accuracy_device"]:.4f}{f1};
agreement {fed["agreement"]:.4f}.{NOT_PROMOTED if not outcome["passed"] else ""}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, help="a finished demo run (default: the newest one found)")
    parser.add_argument("--llm-run", type=Path, help="also a finished make demo-llm run (runs/llm-...)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    WORK.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gate-bench-", dir=WORK))
    try:
        source = args.run_dir or find_demo_run()
        results = {"seq-cls": measure(source, work / "seq-cls", llm=False)}
        if args.llm_run:
            results["causal-lm"] = measure(args.llm_run, work / "causal-lm", llm=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    keys: dict[str, float] = {}
    for kind, prefix in (("seq-cls", "release_gate"), ("causal-lm", "release_gate_llm")):
        if kind in results:
            r = results[kind]
            sites = [e["drop_pt"] for e in r["outcome"]["sites"].values() if "drop_pt" in e]
            keys[f"{prefix}_over_export_wall_time"] = round(r["gate_s"] / r["export_s"], 4)
            keys[f"{prefix}_federation_drop_pt"] = round(r["outcome"]["federation"]["drop_pt"], 4)
            keys[f"{prefix}_worst_site_drop_pt"] = round(max(sites), 4)
    (WORK / "release_gate.json").write_text(json.dumps({"results": results, "keys": keys}, indent=2))
    print(json.dumps(keys, indent=2))
    if args.no_write:
        return
    md = "## Release gate at the sites (`bench/release_gate.py`)\n\n" + section(
        "Classifier (the demo)", source, results["seq-cls"], llm=False
    )
    if "causal-lm" in results:
        md += "\n\n" + section("Causal LM (make demo-llm)", args.llm_run, results["causal-lm"], llm=True)
    else:
        md += "\n\nThe causal-LM run was not measured in this run (`--llm-run`)."
    update_results("release-gate", keys, md)


if __name__ == "__main__":
    main()
