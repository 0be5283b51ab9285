"""A site's peak memory for one local training step, estimated before any weight is
loaded: from the model's config (a weightless, meta-device instance with the run's LoRA
gives exact parameter counts), the run's batch, sequence length, dtype, quantisation and
checkpointing. Sites check it before round 1; `fedtune plan` prints it for an operator.

The estimate is a sum of what a LoRA step keeps alive at its peak (the start of the
backward pass), each term from what autograd saves in a transformer block whose weights
are frozen: a frozen Linear saves nothing (its backward needs only its weight), so a block
keeps its norms' fp32 inputs, the attention's q, k, v and output, the MLP's activation
inputs and the LoRA branches' inputs. bench/site_memory.py measures it against real steps."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Sequence

import torch

from fedtune.chunked_loss import PLAIN_HEAD_MODEL_TYPES, chunk_rows
from fedtune.config import RunSettings
from fedtune.errors import FedtuneError
from fedtune.precision import BYTES_PER_DTYPE, BasePrecision

if TYPE_CHECKING:
    from fedtune.model import LoraSettings

GIB = 1024**3
ADAM_BYTES_PER_TRAINABLE = 16  # fp32 weight, gradient and AdamW's two moments
_BLOCK_INDEX = re.compile(r"\.(\d+)\.")
# Bytes per weight of a quantised Linear: 4-bit NF4 codes plus double-quantised absmax
# (QLoRA: 0.127 bits a weight), 8-bit codes plus one fp32 scale per row (about 1 byte).
_QUANTISED_BYTES = {"nf4": 0.5 + 0.127 / 8, "int8": 1.0}


class MemoryPlanError(FedtuneError):
    """The site's device cannot hold the run's training step."""


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs from a model with the run's LoRA on it."""

    params: int  # the base's parameters
    block_linear_params: int  # Linear weights inside the transformer blocks: what bitsandbytes quantises
    largest_linear: int  # the largest of them (a quantised one is dequantised for its matmul)
    trainable: int  # LoRA factors and head that train
    layers: int
    grad_layers: int  # blocks a gradient flows through: from the lowest adapted block up
    lora_inputs: int  # per adapted block: the input widths of its LoRA branches, summed
    hidden: int
    intermediate: int
    kv_dim: int
    heads: int
    vocab: int
    outputs: int  # what the head predicts per kept position: the vocabulary, or the labels
    decoder: bool
    chunked_head: bool  # the site trainer runs the LM head a chunk of positions at a time (chunked_loss.py)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes at the peak of one training step, by what holds them."""

    precision: BasePrecision
    batch_size: int
    seq_len: int
    weights: int
    trainable: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.activations + self.logits

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("base weights", self.weights),
            ("LoRA + optimizer", self.trainable),
            ("activations", self.activations),
            ("logits and loss", self.logits),
            ("total", self.total),
        ]


def gib(n: float) -> str:
    """Bytes as GiB: '31.2 GiB', '0.93 GiB'."""
    return f"{n / GIB:.1f} GiB" if n >= 10 * GIB else f"{n / GIB:.2f} GiB"


def model_shape(model: str, task: str, settings: RunSettings, labels: Sequence[str] = ()) -> ModelShape:
    """Count a model's parts without its weights: the model and its LoRA wrapper are built
    on the meta device from the config alone (a second or two, no memory, even for 8B);
    once per process for the same model, task, LoRA and label count."""
    return _model_shape(model, task, settings.lora_settings(), max(2, len(labels)) if task == "seq-cls" else 0)


@functools.lru_cache(maxsize=4)
def _model_shape(model: str, task: str, lora: LoraSettings, num_labels: int) -> ModelShape:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from fedtune.model import lora_config, resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(model))
    if task == "seq-cls":
        config.num_labels = num_labels
    auto: Any = AutoModelForSequenceClassification if task == "seq-cls" else AutoModelForCausalLM
    with torch.device("meta"):
        base = auto.from_config(config)
    params = sum(p.numel() for p in base.parameters())
    block_linears = [
        m.weight.numel()
        for name, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and _BLOCK_INDEX.search(name)
    ]
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    head = ""
    if lora.head_rank > 0:
        from fedtune.model import head_module

        head = head_module(base)
    wrapped = get_peft_model(base, lora_config(config.model_type, task, lora, head, 1.0, layers))
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    adapted: dict[int, int] = {}
    for name, module in wrapped.named_modules():
        found = _BLOCK_INDEX.search(name)
        if isinstance(module, LoraLayer) and found:
            index = int(found.group(1))
            adapted[index] = adapted.get(index, 0) + int(getattr(module, "in_features", 0) or 0)
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", 0) or hidden // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", 0) or heads)
    return ModelShape(
        params=params,
        block_linear_params=sum(block_linears),
        largest_linear=max(block_linears, default=0),
        trainable=trainable,
        layers=layers,
        grad_layers=layers - min(adapted) if adapted else 0,
        lora_inputs=max(adapted.values(), default=0),
        hidden=hidden,
        intermediate=int(getattr(config, "intermediate_size", 4 * hidden)),
        kv_dim=kv_heads * head_dim,
        heads=heads,
        vocab=int(config.vocab_size),
        outputs=int(config.vocab_size) if task == "causal-lm" else num_labels,
        decoder=task == "causal-lm",
        chunked_head=task == "causal-lm" and config.model_type in PLAIN_HEAD_MODEL_TYPES,
    )


def block_bytes_per_token(shape: ModelShape, precision: BasePrecision, seq_len: int, lora_dropout: bool) -> int:
    """What one block whose input needs a gradient keeps for its backward, per token."""
    c = BYTES_PER_DTYPE[precision.dtype]
    h, i = shape.hidden, shape.intermediate
    lora = shape.lora_inputs * (4 + (1 if lora_dropout else 0))  # fp32 branch input (+ dropout mask)
    # bitsandbytes' 4/8-bit matmul saves its input even when its weight is frozen: the
    # attention's and the MLP's input (each shared by their projections) and down's input
    quantised = c * (2 * h + i) if precision.quantize != "none" else 0
    if shape.decoder:
        # two RMSNorms' fp32 inputs; q, k, v, attention output; SiLU input, its output and up's output
        return 8 * h + c * (2 * h + 2 * shape.kv_dim + 3 * i) + lora + quantised
    # BERT-like: two LayerNorm inputs, q, k, v, context, GELU input, dropout masks, attention probabilities
    return c * (6 * h + i) + 3 * h + shape.heads * seq_len * (c + 1) + lora + quantised


def plan_memory(
    shape: ModelShape, settings: RunSettings, precision: BasePrecision, seq_len: int | None = None
) -> MemoryPlan:
    """The peak of one local step at `batch-size` x `max-length` tokens (or `seq_len`):
    padded batches never exceed it, so the plan is an upper bound on a site's real steps."""
    c = BYTES_PER_DTYPE[precision.dtype]
    tokens_per_row = seq_len or settings.max_length
    batch = settings.dp_batch if settings.dp else settings.batch_size
    tokens = batch * tokens_per_row
    if precision.quantize == "none":
        weights = shape.params * c
    else:  # blocks' Linears quantised; the rest cast to fp32 by peft's k-bit preparation
        rest = shape.params - shape.block_linear_params
        weights = int(shape.block_linear_params * _QUANTISED_BYTES[precision.quantize]) + rest * 4
        weights += shape.largest_linear * c  # one dequantised weight at a time
    per_block = block_bytes_per_token(shape, precision, tokens_per_row, settings.lora_dropout > 0)
    if precision.checkpointing:  # each block keeps its input; one block is recomputed at a time
        activations = tokens * (shape.grad_layers * shape.hidden * c + per_block)
    else:
        activations = tokens * shape.grad_layers * per_block
    kept = batch * (tokens_per_row - 1) if shape.decoder else batch  # causal-lm: every position may be labelled
    if shape.chunked_head:
        kept = min(kept, chunk_rows(shape.outputs))  # one chunk's logits live at a time
    logits = kept * shape.outputs * (c + 12)  # logits, fp32 copy, log-softmax, two gradients
    return MemoryPlan(
        precision=precision,
        batch_size=batch,
        seq_len=tokens_per_row,
        weights=int(weights),
        trainable=shape.trainable * ADAM_BYTES_PER_TRAINABLE,
        activations=int(activations),
        logits=int(logits),
    )


def free_memory(device: torch.device) -> int:
    """Bytes this site's device has free now: CUDA's free memory, or the host's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def alternatives(shape: ModelShape, settings: RunSettings, precision: BasePrecision, budget: int) -> list[str]:
    """Settings that would fit `budget`, cheapest change first, in the run config's words."""
    tried: list[tuple[str, BasePrecision, RunSettings]] = []
    if not precision.checkpointing:
        tried.append(("gradient-checkpointing = on", replace(precision, checkpointing=True), settings))
    if precision.quantize == "none" and shape.decoder:
        tried.append(("quantize-base = nf4", replace(precision, quantize="nf4", checkpointing=True), settings))
    found = [what for what, p, s in tried if plan_memory(shape, s, p).total <= budget]
    batch = settings.batch_size // 2
    while batch >= 1 and not settings.dp:
        smaller = replace(settings, batch_size=batch)
        if plan_memory(shape, smaller, precision).total <= budget:
            found.append(f"batch-size = {batch}")
            break
        batch //= 2
    return found


def check_fits(
    shape: ModelShape, settings: RunSettings, precision: BasePrecision, device: torch.device, budget: int
) -> MemoryPlan:
    """The plan, or a MemoryPlanError in one line when `budget` bytes cannot hold it."""
    plan = plan_memory(shape, settings, precision)
    if plan.total <= budget:
        return plan
    options = alternatives(shape, settings, precision, budget)
    hint = f"; try {' or '.join(options)}" if options else "; no single setting change fits it"
    raise MemoryPlanError(
        f"training needs about {gib(plan.total)} ({precision.describe()}, batch {plan.batch_size} x "
        f"{plan.seq_len} tokens); {device} has {gib(budget)} free{hint}"
    )


def resolve_checkpointing(
    choice: str, shape: ModelShape, settings: RunSettings, precision: BasePrecision, budget: int
) -> bool:
    """`gradient-checkpointing`: "auto" is on with a quantised base (QLoRA's recipe) or
    when the step fits `budget` only with it; off otherwise (it costs a second forward)."""
    if choice != "auto":
        return choice == "on"
    if precision.quantize != "none":
        return True
    return plan_memory(shape, settings, replace(precision, checkpointing=False)).total > budget
