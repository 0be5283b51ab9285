"""Deployment Engine vs Simulation Engine on the same tiny workload, and what loading
the base model costs a SuperNode's per-message ClientApp process.

Workload: a 2-layer BERT built from a config (MiniLM tokenizer), a synthetic 2-label
text task split over 2 sites, SecAgg+ on, ROUNDS rounds. Deployment: a TLS SuperLink
with SuperNode authentication and 2 SuperNodes on 127.0.0.1, launched with `flwr run`.
Round time is the coordinator's median wall time per round (from metrics.jsonl).
Base-model load: in a fresh process (as a SuperNode's ClientApp is), the seconds to
import torch/transformers/peft and to build the LoRA model from the local safetensors
(`low_cpu_mem_usage`), median of several processes.

    python bench/deploy.py [--rounds R] [--loads N]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # support/: process management

from fedtune.cli.simulation import run_simulation  # noqa: E402
from fedtune.server.deployment import init_pki, register_site, run_command, site_keypair  # noqa: E402
from results import update_results  # noqa: E402
from support.processes import ManagedProcesses, free_port, wait_for_port  # noqa: E402

from fedtune.config import project_run_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FEDTUNE = str(Path(sys.executable).parent / "fedtune")
LOAD_SNIPPET = """
import json, sys, time
t0 = time.perf_counter()
import torch, transformers, peft  # noqa
t1 = time.perf_counter()
from fedtune.model import LoraSettings, build_lora_model
build_lora_model(sys.argv[1], "seq-cls", LoraSettings(), ["neg", "pos"], 0)
t2 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1}))
"""


def tiny_workload(root: Path) -> dict[str, Path]:
    """A tiny BERT from a config plus a 2-label task: train (2 site files) and test."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from fedtune.model import resolve_model_path

    model_dir = root / "tiny-bert"
    tok = AutoTokenizer.from_pretrained(resolve_model_path("default"))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rng = random.Random(0)
    words = {"pos": ["good", "great", "excellent", "happy"], "neg": ["bad", "awful", "terrible", "sad"]}

    def rows(n: int) -> str:
        out = []
        for _ in range(n):
            label = rng.choice(["pos", "neg"])
            out.append(json.dumps({"text": " ".join(rng.choice(words[label]) for _ in range(2)), "label": label}))
        return "\n".join(out) + "\n"

    paths = {"model": model_dir, "labels": root / "labels.json", "test": root / "test.jsonl",
             "site-a": root / "site-a.jsonl", "site-b": root / "site-b.jsonl", "all": root / "train.jsonl"}
    paths["labels"].write_text(json.dumps(["neg", "pos"]))
    paths["test"].write_text(rows(60))
    a, b = rows(120), rows(120)
    paths["site-a"].write_text(a)
    paths["site-b"].write_text(b)
    paths["all"].write_text(a + b)
    return paths


def median_round(run_dir: Path) -> float:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["round_seconds"] for r in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--loads", type=int, default=5, help="fresh processes timed for the model load")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="deploy-bench-"))
    w = tiny_workload(root)
    common = {"model": str(w["model"]), "labels-file": str(w["labels"]), "central-eval-path": str(w["test"]),
              "num-rounds": args.rounds, "local-steps": 8, "batch-size": 16, "learning-rate": 0.05,
              "val-fraction": 0.2, "secagg": True, "min-sites": 2, "secagg-timeout": 300.0,
              "output-dir": str(root / "runs"), "partitioning": "iid"}

    print("simulation", flush=True)
    run_simulation({**project_run_config(), **common, "data-path": str(w["all"]), "run-name": "simulation"}, num_sites=2)
    sim_round = median_round(root / "runs" / "simulation")

    print("deployment", flush=True)
    deploy = root / "deploy"
    procs = ManagedProcesses(root, cwd=ROOT)
    try:
        init_pki(deploy, ["127.0.0.1"])
        port = free_port()
        link = procs.start("superlink", [FEDTUNE, "deploy", "superlink", "--dir", str(deploy), "--host", "127.0.0.1",
                                         "--port", str(port)])
        wait_for_port(port, link, root / "superlink.log")
        for site in ("site-a", "site-b"):
            private, public = site_keypair(deploy, site)
            register_site(deploy, public, f"127.0.0.1:{port}")
            procs.start(site, [FEDTUNE, "deploy", "site", "--superlink", f"127.0.0.1:{port}", "--ca",
                               str(deploy / "pki" / "ca.pem"), "--key", str(private), "--data", str(w[site]),
                               "--port", str(free_port()), "--state-dir", str(root / "state" / site)])
        time.sleep(5)
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in {**common, "run-name": "deployment"}.items())
        cmd, env = run_command(deploy, ROOT, [overrides])
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, timeout=1800)
    finally:
        procs.stop_all()
    dep_round = median_round(root / "runs" / "deployment")

    loads = {}
    for name, model in (("tiny", str(w["model"])), ("minilm", "default")):
        samples = [json.loads(subprocess.run([sys.executable, "-c", LOAD_SNIPPET, model], capture_output=True,
                                             text=True, check=True, cwd=ROOT).stdout) for _ in range(args.loads)]
        loads[name] = {k: statistics.median(s[k] for s in samples) for k in ("import", "load")}
    keys = {
        "deploy_over_simulation_round_time": round(dep_round / sim_round, 3),
        "base_model_load_seconds": round(loads["tiny"]["load"], 3),
    }
    md = f"""## Deployment vs simulation, and the per-round model load (`bench/deploy.py`)

Same tiny workload both ways: a 2-layer BERT from a config, 2 sites x 120 synthetic examples, SecAgg+ on,
{args.rounds} rounds of 8 local steps. Deployment: TLS SuperLink with SuperNode authentication and 2 SuperNodes on
127.0.0.1, `flwr run`. Median coordinator seconds per round:

| engine | median round (s) |
|---|---|
| Simulation Engine (Ray) | {sim_round:.2f} |
| Deployment Engine (SuperLink + 2 SuperNodes, TLS) | {dep_round:.2f} |

`deploy_over_simulation_round_time` = {keys['deploy_over_simulation_round_time']}. A SuperNode starts a new ClientApp
process for every message (SecAgg+ sends several per round), and each phase waits on the SuperLink's polling, so a
deployed round costs more than a simulated one; the gap is fixed overhead, not training.

Base model load in a fresh process (what each ClientApp process pays), median of {args.loads}:

| model | import torch + transformers + peft (s) | build the LoRA model from local safetensors (s) |
|---|---|---|
| tiny BERT (this workload) | {loads['tiny']['import']:.2f} | {loads['tiny']['load']:.3f} |
| MiniLM (the demo model) | {loads['minilm']['import']:.2f} | {loads['minilm']['load']:.3f} |

`base_model_load_seconds` = {keys['base_model_load_seconds']} (tiny BERT). Models load from the local folder with
`low_cpu_mem_usage=True` (no hub access); within one process the model is cached (`client/model_cache.py`), which
is what the Simulation Engine's long-lived actors reuse.
"""
    print(json.dumps({**keys, "loads": loads, "sim_round": sim_round, "deploy_round": dep_round}, indent=2))
    if not args.no_write:
        update_results("deploy", keys, md)


if __name__ == "__main__":
    main()
