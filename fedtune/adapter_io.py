"""Adapter tensors in and out of a peft model: the arrays that travel, and PEFT-format
checkpoints (`adapter_config.json` + `adapter_model.safetensors`) with fedtune metadata."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from fedtune.model import LoraSettings, frozen_lora_parts, load_base_model, pass_cls_state, zero_head

METADATA_FILE = "fedtune.json"


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter (and head) tensors as peft saves them, keys sorted."""
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {k: state[k] for k in sorted(state)}


def wire_state(model: PeftModel, lora: LoraSettings | None = None) -> dict[str, torch.Tensor]:
    """The tensors that travel: the whole adapter (and head), without A (FFA-LoRA:
    `lora.freeze_a`), or the head alone (`lora.head_only`: every LoRA factor stays at its
    seeded init, B = 0): all but what the builder froze (`frozen_lora_parts`). None:
    everything travels."""
    frozen = frozen_lora_parts(lora) if lora is not None else ()
    return {k: v for k, v in adapter_state(model).items() if not any(part in k for part in frozen)}


def adapter_keys(model: PeftModel, lora: LoraSettings | None = None) -> list[str]:
    """The names of the tensors that travel, in wire order."""
    return list(wire_state(model, lora))


def get_adapter_arrays(model: PeftModel, lora: LoraSettings | None = None) -> list[np.ndarray]:
    """The travelling tensors as fp32 numpy arrays, in wire order."""
    return [t.detach().to(torch.float32).cpu().numpy().copy() for t in wire_state(model, lora).values()]


def set_adapter_arrays(model: PeftModel, arrays: Sequence[np.ndarray], lora: LoraSettings | None = None) -> None:
    """Load wire-order arrays into the model's adapter; shapes must match exactly."""
    state = wire_state(model, lora)
    if len(arrays) != len(state):
        raise ValueError(f"expected {len(state)} adapter tensors, got {len(arrays)}")
    new_state: dict[str, torch.Tensor] = {}
    for (key, current), array in zip(state.items(), arrays):
        if tuple(array.shape) != tuple(current.shape):
            raise ValueError(f"adapter tensor {key}: shape {array.shape} != {tuple(current.shape)}")
        new_state[key] = torch.from_numpy(np.asarray(array, dtype=np.float32)).to(current.dtype)
    set_peft_model_state_dict(model, new_state)


def load_adapter_arrays(
    model: PeftModel, adapter_dir: str | Path, lora: LoraSettings | None = None
) -> list[np.ndarray]:
    """Load a saved PEFT checkpoint into `model` (peft's own loader) and return the
    arrays that travel, in wire order."""
    from safetensors.torch import load_file

    state = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, state)
    return get_adapter_arrays(model, lora)


def save_adapter(model: PeftModel, out_dir: str | Path, metadata: dict[str, Any]) -> Path:
    """Write a PEFT checkpoint plus `fedtune.json`, atomically (temp dir, then rename)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    model.save_pretrained(str(tmp), save_embedding_layers=False)
    (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2), encoding="utf-8")
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        _rmtree(old)
    else:
        os.replace(tmp, out_dir)
    return out_dir


def read_metadata(adapter_dir: str | Path) -> dict[str, Any]:
    """fedtune's metadata for a saved adapter (task, labels, base model, round)."""
    return json.loads((Path(adapter_dir) / METADATA_FILE).read_text(encoding="utf-8"))


def load_adapter_model(adapter_dir: str | Path) -> PeftModel:
    """Rebuild base + adapter from a checkpoint with `PeftModel.from_pretrained`
    (a low-rank head, `ffa_head_rank` in the metadata, sits on a zeroed base head; with
    `head_input` "cls" the pooler passes the [CLS] state, as the sites trained it)."""
    meta = read_metadata(adapter_dir)
    base = load_base_model(meta["base_model"], meta["task"], meta.get("labels", []))
    if meta.get("head_input") == "cls":
        pass_cls_state(base)
    if meta.get("ffa_head_rank"):
        zero_head(base)
    return PeftModel.from_pretrained(base, str(adapter_dir))


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
