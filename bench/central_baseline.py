"""The plain baseline a user would run instead of fedtune: all data in one place,
peft + transformers + a standard torch loop (DataLoader, DataCollatorWithPadding,
AdamW, linear warm-up/decay). It shares no training code with fedtune."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, TaskType, get_peft_model
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    get_linear_schedule_with_warmup,
)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_and_evaluate_central(
    model_dir: str,
    train_path: Path,
    test_path: Path,
    labels: list[str],
    epochs: float,
    lr: float,
    batch_size: int = 32,
    max_length: int = 64,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    warmup_fraction: float = 0.05,
    seed: int = 42,
    group_by_length: bool = False,
) -> dict[str, float]:
    """Train LoRA centrally for `epochs` and return test accuracy, macro-F1, wall time.

    `group_by_length` uses transformers' LengthGroupedSampler (what `Trainer`'s
    `group_by_length=True` does) instead of plain shuffling."""
    torch.manual_seed(seed)
    label_id = {name: i for i, name in enumerate(labels)}
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels))
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=["query", "value"],
            task_type=TaskType.SEQ_CLS,
        ),
    )

    def encode(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        enc = tok([r["text"] for r in rows], truncation=True, max_length=max_length)
        return [
            {
                "input_ids": enc["input_ids"][i],
                "attention_mask": enc["attention_mask"][i],
                "token_type_ids": enc["token_type_ids"][i],
                "labels": label_id[r["label"]],
            }
            for i, r in enumerate(rows)
        ]

    train = encode(_read_jsonl(train_path))
    test = encode(_read_jsonl(test_path))
    collate = DataCollatorWithPadding(tok)
    generator = torch.Generator().manual_seed(seed)
    if group_by_length:
        from transformers.trainer_pt_utils import LengthGroupedSampler

        sampler = LengthGroupedSampler(batch_size, lengths=[len(r["input_ids"]) for r in train], generator=generator)
        loader = DataLoader(train, batch_size=batch_size, sampler=sampler, collate_fn=collate)
    else:
        loader = DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=collate, generator=generator)
    total_steps = int(np.ceil(epochs * len(loader)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(warmup_fraction * total_steps), total_steps)
    start = time.perf_counter()
    model.train()
    step = 0
    while step < total_steps:
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            if step >= total_steps:
                break
    train_seconds = time.perf_counter() - start
    model.eval()
    preds, golds = [], []
    with torch.no_grad():
        for batch in DataLoader(test, batch_size=64, collate_fn=collate):
            preds.append(model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1).numpy())
            golds.append(batch["labels"].numpy())
    wall = time.perf_counter() - start
    y_pred, y_true = np.concatenate(preds), np.concatenate(golds)
    from sklearn.metrics import f1_score  # the metric a user would reach for

    return {
        "accuracy": float((y_pred == y_true).mean()),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro")),
        "train_seconds": train_seconds,
        "wall_seconds": wall,
    }


def central_from_run_config(config: dict, group_by_length: bool) -> dict[str, float]:
    """The baseline with a fedtune run config's data, model, LoRA and optimiser settings,
    for the federation's total epochs (num-rounds x local-epochs)."""
    import json as _json

    from fedtune.config import resolve_path
    from fedtune.model import resolve_model_path

    labels = _json.loads(resolve_path(config["labels-file"]).read_text())
    return train_and_evaluate_central(
        resolve_model_path(config["model"]),
        resolve_path(config["data-path"]),
        resolve_path(config["central-eval-path"]),
        labels,
        epochs=config["num-rounds"] * config["local-epochs"],
        lr=config["learning-rate"],
        batch_size=config["batch-size"],
        max_length=config["max-length"],
        lora_r=config["lora-r"],
        lora_alpha=config["lora-alpha"],
        lora_dropout=config["lora-dropout"],
        warmup_fraction=config["warmup-fraction"],
        seed=config["seed"],
        group_by_length=group_by_length,
    )
