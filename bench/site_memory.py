"""A causal-LM site's peak memory and speed for one round's training steps, by base
precision: fedtune's site trainer (`train_local`, the loop a ClientApp round runs, on the
model `build_lora_model` builds for the precision) against plain peft + transformers
`Trainer` with the same settings (the standard recipe: the base loaded in the dtype,
`bf16=True` autocast, `gradient_checkpointing=True`, and for NF4 bitsandbytes'
`BitsAndBytesConfig` + peft's `prepare_model_for_kbit_training`), and fedtune's memory plan
(`fedtune/memory_plan.py`) against what each fedtune step measured.

SmolLM2-135M-Instruct with the LLM demo's LoRA (`configs/banking77-llm.toml`), batches of 8
rows of exactly `max-length` (128) tokens, every position labelled: the shape the plan
describes (its upper bound for real, padded, prompt-masked batches). Each arm runs in a
process of its own. Peak = the largest total of live tensor bytes in torch's profiler
memory timeline over a round's first two steps (optimizer state included), the CPU
counterpart of `torch.cuda.max_memory_allocated`; on a GPU the script reads that instead.

    python bench/site_memory.py [--steps 6]          # every setting, then docs/benchmarks.*
    python bench/site_memory.py --arm fedtune --dtype bf16 --quantize none --checkpointing on --out F
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import machine, update_results  # noqa: E402

from fedtune.cli.common import read_run_config_file  # noqa: E402
from fedtune.config import RunSettings, default_run_config  # noqa: E402

LLM_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "banking77-llm.toml"
BATCH, LENGTH = 8, 128
SETTINGS = [  # (base dtype, quantisation, checkpointing)
    ("fp32", "none", "off"),
    ("fp32", "none", "on"),
    ("bf16", "none", "off"),
    ("bf16", "none", "on"),
    ("bf16", "nf4", "off"),
    ("bf16", "nf4", "on"),
]


def site_settings(dtype: str, quantize: str, checkpointing: str, steps: int) -> RunSettings:
    config = {**default_run_config(), **read_run_config_file(str(LLM_CONFIG))}
    config.update(
        {
            "batch-size": BATCH,
            "max-length": LENGTH,
            "local-steps": steps,
            "num-rounds": 1,
            "base-dtype": dtype,
            "quantize-base": quantize,
            "gradient-checkpointing": checkpointing,
        }
    )
    return RunSettings.from_run_config(config)


def full_rows(settings: RunSettings, count: int) -> Any:
    """A CompletionEncoder over `count` rows of exactly max-length tokens, all labelled."""
    import numpy as np

    from fedtune.encoding import CompletionEncoder
    from fedtune.model import load_tokenizer

    tokenizer = load_tokenizer(settings.base_model)
    rng = np.random.default_rng(0)
    encoder = CompletionEncoder.__new__(CompletionEncoder)
    encoder.tokenizer = tokenizer
    encoder.rows = []
    for _ in range(count):
        ids = rng.integers(100, tokenizer.vocab_size, LENGTH).tolist()
        encoder.rows.append((ids, 0))  # (token ids, prompt length): no prompt, every token a target
    return encoder


class PeakMemory:
    """Peak live tensor bytes while active: CUDA's allocator counter, or on CPU torch's
    profiler memory timeline (every category summed at each instant)."""

    def __enter__(self) -> "PeakMemory":
        import torch

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            from torch.profiler import ProfilerActivity, profile

            self.profiler = profile(
                activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
            )
            self.profiler.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.cuda:
            self.bytes = int(torch.cuda.max_memory_allocated())
            return
        self.profiler.__exit__(*exc)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "timeline.json"
            self.profiler.export_memory_timeline(str(path), device="cpu")
            _, sizes = json.loads(path.read_text())
        self.bytes = int(max(sum(row) for row in sizes))


def precision_of(settings: RunSettings) -> Any:
    from fedtune.accelerator import pick_device
    from fedtune.precision import resolve_precision

    return resolve_precision(
        settings.base_dtype, settings.quantize_base, settings.gradient_checkpointing == "on", pick_device()
    )


def fedtune_arm(settings: RunSettings) -> dict[str, Any]:
    """fedtune's site: the model for the precision, `train_local` for a round."""
    from fedtune.accelerator import pick_device
    from fedtune.client.trainer import train_local
    from fedtune.memory_plan import model_shape, plan_memory
    from fedtune.model import build_lora_model

    device = pick_device()
    precision = precision_of(settings)
    encoder = full_rows(settings, BATCH * settings.local_steps)
    model = build_lora_model(
        settings.base_model, "causal-lm", settings.lora_settings(), (), settings.seed, precision, device
    )
    two = RunSettings.from_run_config({**settings.to_run_config(), "local-steps": 2})
    with PeakMemory() as peak:
        train_local(model, encoder, two, 1, 1, "site-0")
    started = time.perf_counter()
    result = train_local(model, encoder, settings, 1, 1, "site-0")
    seconds = time.perf_counter() - started
    plan = plan_memory(model_shape(settings.base_model, "causal-lm", settings), settings, precision)
    return {
        "peak_bytes": peak.bytes,
        "samples_per_s": settings.local_steps * BATCH / seconds,
        "loss": result.loss,
        "plan_bytes": plan.total,
        "plan": dict(plan.rows()),
    }


def trainer_arm(settings: RunSettings, work: Path) -> dict[str, Any]:
    """Plain peft + transformers Trainer, the standard recipe for the same precision."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

    from fedtune.model import resolve_model_path

    precision = precision_of(settings)
    torch.manual_seed(settings.seed)
    dtype = precision.torch_dtype
    load: dict[str, Any] = {"dtype": dtype}
    if precision.quantize == "nf4":
        load["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        load["device_map"] = {"": "cuda:0" if torch.cuda.is_available() else "cpu"}
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(settings.base_model), **load)
    if precision.quantize == "nf4":
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=precision.checkpointing)
    layers = int(base.config.num_hidden_layers)
    model = get_peft_model(
        base,
        LoraConfig(
            r=settings.lora_r,
            lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout,
            target_modules=settings.target_modules(),
            task_type=TaskType.CAUSAL_LM,
            layers_to_transform=list(range(layers - settings.lora_top_layers, layers)),
        ),
    )
    encoder = full_rows(settings, BATCH * settings.local_steps)

    class Rows(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(encoder)

        def __getitem__(self, i: int) -> int:
            return i

    def trainer(steps: int) -> Any:
        args = TrainingArguments(
            output_dir=str(work),
            per_device_train_batch_size=BATCH,
            max_steps=steps,
            learning_rate=settings.learning_rate,
            warmup_ratio=settings.warmup_fraction,
            lr_scheduler_type="linear",
            max_grad_norm=1.0,
            save_strategy="no",
            report_to=[],
            seed=settings.seed,
            use_cpu=not torch.cuda.is_available(),
            bf16=precision.dtype == "bf16",
            gradient_checkpointing=precision.checkpointing and precision.quantize == "none",
            gradient_checkpointing_kwargs={"use_reentrant": False},
            dataloader_num_workers=0,
            remove_unused_columns=False,
            disable_tqdm=True,
            logging_steps=steps,
        )
        return Trainer(model=model, args=args, train_dataset=Rows(), data_collator=lambda idx: encoder.batch(idx))

    with PeakMemory() as peak:
        trainer(2).train()
    run = trainer(settings.local_steps)
    started = time.perf_counter()
    output = run.train()
    seconds = time.perf_counter() - started
    return {
        "peak_bytes": peak.bytes,
        "samples_per_s": settings.local_steps * BATCH / seconds,
        "loss": float(output.training_loss),
    }


def run_arm(arm: str, dtype: str, quantize: str, checkpointing: str, steps: int) -> dict[str, Any]:
    """One arm in a fresh process, so neither arm's allocations colour the other's peak."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "arm.json"
        command = [sys.executable, __file__, "--arm", arm, "--dtype", dtype, "--quantize", quantize]
        command += ["--checkpointing", checkpointing, "--steps", str(steps), "--out", str(out)]
        subprocess.run(command, check=True)
        return json.loads(out.read_text())


def measure(steps: int) -> dict[str, Any]:
    rows = []
    for dtype, quantize, checkpointing in SETTINGS:
        row = {"dtype": dtype, "quantize": quantize, "checkpointing": checkpointing}
        for arm in ("fedtune", "trainer"):
            row[arm] = run_arm(arm, dtype, quantize, checkpointing, steps)
        print(json.dumps(row), flush=True)
        rows.append(row)
    import torch

    return {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
        "torch": torch.__version__,
        "steps": steps,
        "rows": rows,
    }


def record(result: dict[str, Any]) -> None:
    rows = {(r["dtype"], r["quantize"], r["checkpointing"]): r for r in result["rows"]}
    mib = 2**20

    def peak(key: tuple[str, str, str], arm: str = "fedtune") -> float:
        return float(rows[key][arm]["peak_bytes"])

    signed = {
        k: (r["fedtune"]["plan_bytes"] - r["fedtune"]["peak_bytes"]) / r["fedtune"]["peak_bytes"]
        for k, r in rows.items()
    }
    errors = {k: abs(e) for k, e in signed.items()}
    over_trainer = {k: peak(k) / peak(k, "trainer") for k in rows}
    keys = {
        "site_bf16_over_fp32_peak_memory": round(peak(("bf16", "none", "off")) / peak(("fp32", "none", "off")), 3),
        "site_peak_memory_over_peft_trainer": round(max(over_trainer.values()), 3),
        "site_memory_plan_error": round(max(errors.values()), 3),
        "site_checkpointing_over_plain_peak_memory": round(
            peak(("bf16", "none", "on")) / peak(("bf16", "none", "off")), 3
        ),
        "site_nf4_over_bf16_peak_memory": round(peak(("bf16", "nf4", "on")) / peak(("bf16", "none", "on")), 3),
        "site_samples_per_s_over_peft_trainer_fp32": round(
            rows[("fp32", "none", "off")]["fedtune"]["samples_per_s"]
            / rows[("fp32", "none", "off")]["trainer"]["samples_per_s"],
            3,
        ),
    }
    table = "\n".join(
        f"| {d} | {q} | {c} | {r['fedtune']['peak_bytes'] / mib:.0f} | {r['trainer']['peak_bytes'] / mib:.0f} | "
        f"{over_trainer[(d, q, c)]:.2f} | {r['fedtune']['plan_bytes'] / mib:.0f} | {100 * signed[(d, q, c)]:+.1f} % | "
        f"{r['fedtune']['samples_per_s']:.1f} | {r['trainer']['samples_per_s']:.1f} | "
        f"{r['fedtune']['loss']:.3f} | {r['trainer']['loss']:.3f} |"
        for (d, q, c), r in rows.items()
    )
    md = f"""## A site's memory by base precision (`bench/site_memory.py`)

One causal-LM site's round on {result["device"]} (torch {result["torch"]}): SmolLM2-135M-Instruct with the
LLM demo's LoRA (r=8 on all seven projections of the last 10 blocks), batches of {BATCH} x {LENGTH} tokens,
every position labelled (the shape the memory plan bounds). fedtune = `build_lora_model` for the precision
+ `train_local`; Trainer = peft + transformers `Trainer`, the standard recipe for the same precision
(`bf16=True`, `gradient_checkpointing=True`, NF4 through `BitsAndBytesConfig` and
`prepare_model_for_kbit_training`). Peak = the largest total of live tensors over a round's first two steps
(torch's profiler memory timeline on CPU; `max_memory_allocated` on a GPU), in MiB. Plan = fedtune's
estimate before loading any weight; its error is against fedtune's measured peak (negative: the plan
was below it). The LM head and loss run a chunk of labelled positions at a time (`fedtune/chunked_loss.py`);
the Trainer computes the whole batch's logits. Samples/s over
{result["steps"]} steps; loss = the round's mean (random tokens: about ln(vocab) at the start).

| base | quantised | checkpointing | fedtune peak | Trainer peak | fedtune / Trainer | plan | plan error | fedtune samples/s | Trainer samples/s | fedtune loss | Trainer loss |
|---|---|---|---|---|---|---|---|---|---|---|---|
{table}

Targets: bf16 / fp32 peak <= 0.65 ({keys["site_bf16_over_fp32_peak_memory"]}), fedtune / Trainer peak <= 1.0 in
every setting ({keys["site_peak_memory_over_peft_trainer"]} worst), plan error <= 0.20
({keys["site_memory_plan_error"]} worst).
"""
    update_results("site-memory", keys, md, where=f"{machine()}, {result['device']}")
    print(json.dumps(keys, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per arm (default: 6)")
    parser.add_argument("--arm", choices=("fedtune", "trainer"))
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--quantize", choices=("none", "nf4"), default="none")
    parser.add_argument("--checkpointing", choices=("on", "off"), default="off")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-record", action="store_true", help="print the figures without writing docs/")
    args = parser.parse_args()
    if args.arm:
        settings = site_settings(args.dtype, args.quantize, args.checkpointing, args.steps)
        with tempfile.TemporaryDirectory() as work:
            result = fedtune_arm(settings) if args.arm == "fedtune" else trainer_arm(settings, Path(work))
        args.out.write_text(json.dumps(result))
        return
    result = measure(args.steps)
    if not args.no_record:
        record(result)


if __name__ == "__main__":
    main()
