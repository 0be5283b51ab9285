"""`fedtune plan`: the memory a site needs for one training step of a run, from the
model's config alone (no weights loaded), the same estimate each site checks before
round 1 (`fedtune/memory_plan.py`), with the other precisions side by side."""

from __future__ import annotations

import argparse
import re
from dataclasses import replace

from fedtune.errors import FedtuneError

from .common import parse_overrides, read_run_config_file

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(gib|gb|g|mib|mb|m)?\s*$", re.IGNORECASE)
_UNITS = {"gib": 1024**3, "g": 1024**3, "gb": 10**9, "mib": 1024**2, "m": 1024**2, "mb": 10**6}


def parse_size(text: str) -> int:
    """'24GiB', '40GB', '23.5G', '512MiB' or a bare number of GiB, in bytes."""
    found = _SIZE.match(text)
    if not found or float(found.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 24GiB, 40GB or 512MiB, got {text!r}")
    return int(float(found.group(1)) * _UNITS[(found.group(2) or "gib").lower()])


def cmd_plan(args: argparse.Namespace) -> int:
    import torch

    from fedtune.config import RunSettings, default_run_config
    from fedtune.memory_plan import (
        MemoryPlanError,
        check_fits,
        free_memory,
        gib,
        model_shape,
        plan_memory,
        resolve_checkpointing,
    )
    from fedtune.precision import BasePrecision, bf16_supported

    config = {**default_run_config(), **(read_run_config_file(args.run_config) if args.run_config else {})}
    config.update(parse_overrides(args.set or []))
    if args.model:
        config["model"] = args.model
    settings = RunSettings.from_run_config(config)
    here = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = here if args.device == "auto" else torch.device(args.device)
    local = device.type == here.type
    if args.device_memory:
        budget, where = args.device_memory, f"--device-memory {gib(args.device_memory)}"
    elif local:
        budget = free_memory(device)
        where = f"{device} has {gib(budget)} free"
    else:
        budget, where = 0, ""
    if settings.base_dtype == "auto":  # a GPU elsewhere is assumed to be one that computes in bf16
        dtype = "bf16" if device.type == "cuda" and (not local or bf16_supported(device)) else "fp32"
    else:
        dtype = settings.base_dtype
    labels = settings.label_list() if settings.task == "seq-cls" else []
    shape = model_shape(settings.base_model, settings.task, settings, labels)
    unresolved = BasePrecision(dtype, settings.quantize_base)
    checkpointing = resolve_checkpointing(settings.gradient_checkpointing, shape, settings, unresolved, budget or 2**62)
    chosen = replace(unresolved, checkpointing=checkpointing)
    plan = plan_memory(shape, settings, chosen)
    print(
        f"{settings.base_model}: {shape.params / 1e9:.2f}B parameters, {shape.layers} layers, "
        f"{shape.trainable / 1e6:.2f}M trainable (LoRA r={settings.lora_r}); "
        f"batch {plan.batch_size} x {plan.seq_len} tokens on {device.type}"
    )
    print(f"\nthis run ({chosen.describe()}):")
    for name, size in plan.rows():
        print(f"  {name:<18} {gib(size):>10}")
    print("\nother settings (one training step's peak):")
    variants = [BasePrecision(d, "none", c) for d in ("fp32", "bf16") for c in (False, True)]
    if settings.task == "causal-lm":
        variants += [BasePrecision(dtype if dtype != "fp32" else "bf16", "nf4", c) for c in (False, True)]
    for variant in variants:
        total = plan_memory(shape, settings, variant).total
        verdict = "" if not budget else ("  fits" if total <= budget else "  does not fit")
        mark = "  <- this run" if variant == chosen else ""
        print(f"  {variant.describe():<46} {gib(total):>10}{verdict}{mark}")
    if not budget:
        return 0
    try:
        check_fits(shape, settings, chosen, device, budget)
    except MemoryPlanError as err:
        raise FedtuneError(f"{err} ({where})") from None
    print(f"\nfits: {gib(plan.total)} of {gib(budget)} ({where})")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    plan = sub.add_parser(
        "plan",
        help="estimate a site's memory for a run's training step, before choosing settings",
        description="Estimate one site's peak memory for a training step of the run: base weights, "
        "LoRA and optimizer state, activations and logits, from the model's config alone (no weights "
        "are loaded, so an 8B model takes seconds). Sites check the same estimate before round 1. "
        "Exits 1 when --device-memory (or this machine's free memory) cannot hold it.",
    )
    plan.add_argument("--model", help="local model folder or Hugging Face id (config: model)")
    plan.add_argument(
        "--run-config", metavar="FILE", help="a TOML file of run-config keys, e.g. configs/llama-8b-qlora.toml"
    )
    plan.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a run-config key (repeatable)")
    plan.add_argument(
        "--device-memory",
        type=parse_size,
        metavar="SIZE",
        help="the site device's free memory, e.g. 24GiB (default: this machine's free memory for --device)",
    )
    plan.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="the site's device kind: auto (this machine's), or plan for cpu or a cuda GPU (default: auto)",
    )
    plan.set_defaults(func=cmd_plan)
