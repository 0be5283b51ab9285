"""The causal-LM baseline a user would run instead of fedtune: the base model wrapped by
plain peft with the run's LoRA settings, trained by a transformers `Trainer` (bf16 on a
GPU, fp32 on a CPU) on prompt/completion pairs encoded as fedtune encodes them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedtune.config import RunSettings


def peft_causal_lm(settings: RunSettings) -> Any:
    """The base model in fp32 with a fresh LoRA adapter, seeded with the run's seed."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    from fedtune.model import resolve_model_path

    torch.manual_seed(settings.seed)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(settings.base_model), dtype=torch.float32)
    layers = int(base.config.num_hidden_layers)
    lora = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.target_modules() or ["q_proj", "v_proj"],
        task_type=TaskType.CAUSAL_LM,
        layers_to_transform=(
            list(range(layers - settings.lora_top_layers, layers)) if settings.lora_top_layers else None
        ),
    )
    return get_peft_model(base, lora)


def pairs_trainer(
    model: Any, encoder: Any, settings: RunSettings, steps: int, output_dir: Path, logging_steps: int
) -> Any:
    """A `Trainer` for `steps` steps of the run's batch size, LR, schedule and warm-up."""
    import torch
    from transformers import Trainer, TrainingArguments

    class Pairs(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(encoder)

        def __getitem__(self, i: int) -> int:
            return i

    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.batch_size,
        max_steps=steps,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        warmup_ratio=settings.warmup_fraction,
        lr_scheduler_type=settings.lr_schedule if settings.lr_schedule != "constant" else "constant_with_warmup",
        max_grad_norm=1.0,
        logging_steps=logging_steps,
        save_strategy="no",
        report_to=[],
        seed=settings.seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=Pairs(), data_collator=lambda idx: encoder.batch(idx))
