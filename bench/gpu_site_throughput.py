"""A causal-LM site's training throughput on a GPU: fedtune's site trainer (the loop the
ClientApp runs each round: bf16 autocast, completion-only LM head, length-grouped
batches) against plain peft + transformers `Trainer` (bf16=True), on the same site's
data, the same LoRA settings, the same batch size and the same number of steps.

Needs a CUDA GPU; CI never runs it. The settings are the LLM demo's
(`configs/banking77-llm.toml`); the data is site 0 of 3 (the simulation's Dirichlet split).

    python bench/gpu_site_throughput.py [--steps 200] [--batch-sizes 16,64] [--out FILE]
    python bench/gpu_site_throughput.py --record FILE   # merge a result into docs/
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peft_baseline import pairs_trainer, peft_causal_lm  # noqa: E402
from results import update_results  # noqa: E402

from fedtune.cli.common import read_run_config_file  # noqa: E402
from fedtune.config import RunSettings, default_run_config, resolve_path  # noqa: E402

LLM_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "banking77-llm.toml"
WORK = Path(__file__).resolve().parent / "_work"


def site_settings(batch: int, steps: int) -> RunSettings:
    config = {**default_run_config(), **read_run_config_file(str(LLM_CONFIG))}
    config.update(
        {
            "batch-size": batch,
            "local-steps": steps,
            "num-rounds": 1,
            "data-path": str(resolve_path(config["data-path"])),
        }
    )
    return RunSettings.from_run_config(config)


def site_examples(settings: RunSettings) -> list[Any]:
    from fedtune.client.site_data import site_partition
    from fedtune.data import load_completions

    examples = load_completions(settings.data_path, settings.prompt_field, settings.completion_field)
    return site_partition(examples, settings, 0, 3)


def synchronize() -> float:
    """Wait for queued GPU work; the time after it."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def fedtune_site(settings: RunSettings, examples: list[Any], warmup: int) -> dict[str, float]:
    """fedtune's site loop, as a ClientApp round runs it."""

    from fedtune.accelerator import pick_device
    from fedtune.client.trainer import train_local
    from fedtune.encoding import CompletionEncoder
    from fedtune.model import build_lora_model, load_tokenizer
    from fedtune.precision import resolve_precision

    device = pick_device()  # the base in bf16 on GPUs that support it (base-dtype = auto), as a site loads it
    precision = resolve_precision(settings.base_dtype, settings.quantize_base, False, device)
    model = build_lora_model(
        settings.base_model, "causal-lm", settings.lora_settings(), (), settings.seed, precision, device
    )
    encoder = CompletionEncoder(
        load_tokenizer(settings.base_model), examples, settings.max_length, settings.system_prompt
    )
    train_local(
        model,
        encoder,
        RunSettings.from_run_config({**settings.to_run_config(), "local-steps": warmup}),
        1,
        1,
        "warm-up",
    )
    reset_peak()
    started = synchronize()
    result = train_local(model, encoder, settings, 1, 1, "site-0")
    seconds = synchronize() - started
    return {
        "seconds": seconds,
        "samples_per_s": result.steps * settings.batch_size / seconds,
        "peak_gib": peak_gib(),
        "loss": result.loss,
    }


def peft_trainer(settings: RunSettings, examples: list[Any], warmup: int) -> dict[str, float]:
    """Plain peft + Trainer with bf16=True: what a site would run without fedtune."""
    from fedtune.encoding import CompletionEncoder
    from fedtune.model import load_tokenizer

    encoder = CompletionEncoder(
        load_tokenizer(settings.base_model), examples, settings.max_length, settings.system_prompt
    )
    model = peft_causal_lm(settings)
    pairs_trainer(model, encoder, settings, warmup, WORK / "gpu-trainer", logging_steps=warmup).train()
    run = pairs_trainer(
        model, encoder, settings, settings.local_steps, WORK / "gpu-trainer", logging_steps=settings.local_steps
    )
    reset_peak()
    started = synchronize()
    output = run.train()
    seconds = synchronize() - started
    return {
        "seconds": seconds,
        "samples_per_s": settings.local_steps * settings.batch_size / seconds,
        "peak_gib": peak_gib(),
        "loss": float(output.training_loss),
    }


def measure(steps: int, batch_sizes: list[int], warmup: int, allow_cpu: bool = False) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available() and not allow_cpu:
        raise SystemExit("bench/gpu_site_throughput.py: no CUDA GPU here (this benchmark measures the GPU path)")
    rows = []
    for batch in batch_sizes:
        settings = site_settings(batch, steps)
        examples = site_examples(settings)
        ours = fedtune_site(settings, examples, warmup)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        theirs = peft_trainer(settings, examples, warmup)
        row = {
            "batch": batch,
            "fedtune": ours,
            "trainer": theirs,
            "ratio": ours["samples_per_s"] / theirs["samples_per_s"],
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    import os
    import platform

    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
        "torch": torch.__version__,
        "steps": steps,
        "site_examples": len(examples),
        "rows": rows,
    }


def record(result: dict[str, Any]) -> None:
    rows = result["rows"]
    first = rows[0]
    keys = {
        "gpu_site_samples_per_s_over_peft_trainer": round(first["ratio"], 3),
        "gpu_site_samples_per_s": round(first["fedtune"]["samples_per_s"], 1),
        "gpu_peft_trainer_samples_per_s": round(first["trainer"]["samples_per_s"], 1),
    }
    for row in rows[1:]:
        keys[f"gpu_site_samples_per_s_over_peft_trainer_b{row['batch']}"] = round(row["ratio"], 3)
    table = "\n".join(
        f"| {r['batch']} | {r['fedtune']['samples_per_s']:.1f} | {r['trainer']['samples_per_s']:.1f} | "
        f"{r['ratio']:.2f} | {1000 * r['fedtune']['seconds'] / result['steps']:.0f} | "
        f"{1000 * r['trainer']['seconds'] / result['steps']:.0f} | {r['fedtune']['peak_gib']:.2f} | {r['trainer']['peak_gib']:.2f} |"
        for r in rows
    )
    md = f"""## Causal LM on a GPU: a site's training throughput (`bench/gpu_site_throughput.py`)

SmolLM2-135M-Instruct with the LLM demo's LoRA settings (`configs/banking77-llm.toml`), site 0's
{result["site_examples"]:,} pairs of the 3-site split, {result["steps"]} timed steps after a warm-up, on one
{result["gpu"]} (torch {result["torch"]}). fedtune: the site loop the ClientApp runs (bf16 autocast,
LM head only at completion positions, length-grouped batches). Baseline: peft + transformers `Trainer`
with `bf16=True` on the same pairs and steps. Peak = `torch.cuda.max_memory_allocated` during the timed steps.

| batch | fedtune samples/s | Trainer samples/s | fedtune / Trainer | fedtune ms/step | Trainer ms/step | fedtune peak GiB | Trainer peak GiB |
|---|---|---|---|---|---|---|---|
{table}
"""
    update_results("gpu-llm", keys, md, where=result.get("machine", ""))
    print(json.dumps(keys, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    parser.add_argument("--batch-sizes", default="16,64", help="comma-separated; the first is the demo's")
    parser.add_argument("--out", default="", help="also write the raw result as JSON here")
    parser.add_argument("--allow-cpu", action="store_true", help="run on a CPU (a smoke test of this script)")
    parser.add_argument("--record", default="", help="merge a raw result JSON into docs/benchmarks.* and exit")
    args = parser.parse_args()
    if args.record:
        record(json.loads(Path(args.record).read_text()))
        return
    result = measure(args.steps, [int(b) for b in args.batch_sizes.split(",")], args.warmup, args.allow_cpu)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    if not args.allow_cpu:
        record(result)


if __name__ == "__main__":
    main()
