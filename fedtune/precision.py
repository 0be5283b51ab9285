"""How a site holds the frozen base model: its weights' dtype, an optional 4- or 8-bit
quantisation (bitsandbytes, as in QLoRA) and gradient checkpointing, resolved for the
device at hand from the run's `base-dtype`, `quantize-base` and `gradient-checkpointing`.
LoRA weights, their optimizer state and what travels stay fp32 whatever this says."""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from typing import Any, ContextManager

import torch

from fedtune.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BYTES_PER_DTYPE = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class BasePrecision:
    """The base model as one site loads it (every choice resolved: no "auto")."""

    dtype: str = "fp32"  # fp32 | bf16 | fp16: the base's unquantised weights and the compute dtype
    quantize: str = "none"  # none | nf4 | int8: the blocks' Linear weights in 4 or 8 bits
    checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES or self.quantize not in ("none", "nf4", "int8"):
            raise ValueError(f"unresolved precision {self}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def describe(self) -> str:
        """'bf16 base, nf4, gradient checkpointing': for logs, the plan and the export."""
        parts = [f"{self.dtype} base"]
        if self.quantize != "none":
            parts.append(f"{self.quantize} blocks")
        if self.checkpointing:
            parts.append("gradient checkpointing")
        return ", ".join(parts)


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` computes in bf16 at speed: CUDA GPUs from Ampere on. CPUs run bf16
    too (slowly on most), so a run may ask for it there, but "auto" never picks it."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_dtype(choice: str, device: torch.device) -> str:
    """`base-dtype` for this device: "auto" is bf16 on GPUs that support it, fp32 elsewhere."""
    if choice == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return choice


def resolve_precision(base_dtype: str, quantize_base: str, checkpointing: bool, device: torch.device) -> BasePrecision:
    """The record the model builder takes, checked against this device (a ConfigError
    naming the key when the device cannot run it)."""
    precision = BasePrecision(resolve_dtype(base_dtype, device), quantize_base, checkpointing)
    check_device_runs(precision, device)
    return precision


def check_device_runs(precision: BasePrecision, device: torch.device) -> None:
    """Refuse, in one line, a precision this site's device or install cannot run."""
    if precision.dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "base-dtype",
            f"bf16 needs a GPU that supports it; {torch.cuda.get_device_name(device)} does not: "
            'set base-dtype = "auto" or "fp16"',
        )
    if precision.quantize == "none":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "quantize-base",
            f'{precision.quantize} needs bitsandbytes at this site (pip install bitsandbytes), or set quantize-base = "none"',
        )
    if device.type not in ("cuda", "cpu"):
        raise ConfigError("quantize-base", f'bitsandbytes does not run on {device.type}: set quantize-base = "none"')


def quantization_config(precision: BasePrecision) -> Any:
    """transformers' BitsAndBytesConfig for the precision (QLoRA's: NF4 with double
    quantisation, computing in the base dtype), or None for an unquantised base."""
    if precision.quantize == "none":
        return None
    from transformers import BitsAndBytesConfig

    if precision.quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=precision.torch_dtype,
    )


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a (peft-wrapped) model computes in: a quantised base's compute dtype (peft's
    k-bit preparation leaves its other weights in fp32), else that of its first frozen
    floating weight, fp32 when everything trains."""
    for module in model.modules():
        quantised = getattr(module, "compute_dtype", None)  # bitsandbytes' Linear4bit
        if isinstance(quantised, torch.dtype):
            return quantised
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point():
            return param.dtype
    return torch.float32


def autocast_for(device: torch.device, dtype: torch.dtype = torch.float32) -> ContextManager[object]:
    """Autocast in the base's dtype when it is 16-bit (so fp32 LoRA weights and a 16-bit
    base meet in one matmul); bf16 autocast over an fp32 base on GPUs that support it;
    a no-op otherwise."""
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device_type=device.type, dtype=dtype)
    if bf16_supported(device):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
