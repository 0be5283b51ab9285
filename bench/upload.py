"""Upload per site and round on the demo setting: plain FedAvg, SecAgg+ and FFA-LoRA
(full or low-rank head) under SecAgg+, measured as protobuf bytes on the wire (every byte a site sends in a
training round, SecAgg+'s keys, shares and masked vector included). Bytes do not
depend on the round, so a short run per variant is enough.

    python bench/upload.py [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from privacy import HEAD_RANK  # noqa: E402
from results import update_results  # noqa: E402

from fedtune.cli.simulation import run_simulation  # noqa: E402
from fedtune.config import (
    default_run_config,  # noqa: E402
    resolve_path,  # noqa: E402
)

WORK = Path(__file__).resolve().parent / "_work"
VARIANTS = {
    "plain": {"secagg": False},
    "secagg": {"secagg": True},
    "ffa-secagg": {"secagg": True, "ffa-lora": True},
    "ffa-low-rank-head": {"secagg": True, "ffa-lora": True, "ffa-head-rank": HEAD_RANK},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    config = default_run_config()
    for key in ("data-path", "labels-file", "central-eval-path"):
        config[key] = str(resolve_path(config[key]))
    config.update({"num-rounds": args.rounds, "local-steps": 4, "central-eval-path": ""})
    stamp = time.strftime("%Y%m%d-%H%M%S")
    up: dict[str, float] = {}
    full_model_bytes = 0
    for name, overrides in VARIANTS.items():
        run_name = f"upload-{stamp}-{name}"
        run_simulation({**config, **overrides, "output-dir": str(WORK / "runs"), "run-name": run_name}, num_sites=3)
        run_dir = WORK / "runs" / run_name
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        up[name] = statistics.fmean(s["train_bytes_up"] for r in records for s in r["sites"].values())
        full_model_bytes = 4 * json.loads((run_dir / "run.json").read_text())["adapter"]["base_model_params"]
    keys = {
        "upload_plain_bytes_per_site_round": int(round(up["plain"])),
        "upload_secagg_bytes_per_site_round": int(round(up["secagg"])),
        "upload_secagg_fraction_of_full_model": round(up["secagg"] / full_model_bytes, 5),
        "ffa_over_lora_upload_bytes_secagg_uint32": round(up["ffa-secagg"] / up["secagg"], 4),
        "ffa_low_rank_head_over_lora_upload_bytes_secagg_uint32": round(up["ffa-low-rank-head"] / up["secagg"], 4),
    }
    md = f"""## Upload per site and round (`bench/upload.py`)

Demo setting (MiniLM + LoRA r=8 on query/value + the 77-way head = 103,373 values), 3 sites, bytes a site sends
in one training round, as protobuf on the wire; the full fp32 model is {full_model_bytes:,} bytes.

| variant | bytes / site / round | fraction of the full model |
|---|---|---|
| plain FedAvg (fp32 tensors) | {up["plain"]:,.0f} | {up["plain"] / full_model_bytes:.5f} |
| SecAgg+ (masked vector as uint32, plus keys and shares) | {up["secagg"]:,.0f} | {up["secagg"] / full_model_bytes:.5f} |
| FFA-LoRA under SecAgg+ (B and the head only) | {up["ffa-secagg"]:,.0f} | {up["ffa-secagg"] / full_model_bytes:.5f} |
| FFA-LoRA under SecAgg+, `ffa-head-rank = {HEAD_RANK}` (B and B_h only) | {up["ffa-low-rank-head"]:,.0f} | {up["ffa-low-rank-head"] / full_model_bytes:.5f} |

Flower's SecAgg+ encodes the masked vector as int64 (8 bytes per value: 832,962 bytes per site and round in
`bench/accuracy.py`'s run). Its values lie in [0, modulus) with modulus <= 2^32, so fedtune's sites send them as
uint32 and the coordinator widens them back before Flower sums them (`fedtune/secagg/wire_codec.py`); the
protocol's arithmetic is unchanged. FFA-LoRA halves the LoRA part of the upload; with the paper's full head
(29,645 values) the whole upload only drops to (B + head) / (A + B + head) = 0.64 here. With a low-rank head
(B_h A_h, A_h frozen at the shared seed) only B_h, 77 x {HEAD_RANK} = 9,856 values, travels with B: 46,720 of 103,373.
"""
    print(json.dumps(keys, indent=2))
    if not args.no_write:
        update_results("upload", keys, md)


if __name__ == "__main__":
    main()
