"""A peft LoRA adapter as an ONNX Runtime adapter file (`.onnx_adapter`), the format
onnxruntime-genai's `Adapters` loads, named the way the genai builder names the LoRA
weights it lifts to inputs.

peft stores `lora_A.weight` (r x in) and `lora_B.weight` (out x r) and scales B.A by
`scaling` (alpha / r, or alpha / sqrt(r) with rsLoRA); the builder computes
`x @ A^T @ (scaling * B)^T`, so the file holds `A^T` and `(scaling * B)^T` in fp32.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from fedtune.errors import FedtuneError

ADAPTER_FILE = "adapter.onnx_adapter"
_PEFT_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_(A|B)\.weight$")
_BLOCK = {"self_attn": "attn", "mlp": "mlp"}


def _parts(key: str, where: Path) -> tuple[str, str, str, str]:
    match = _PEFT_KEY.match(key)
    if not match:
        raise FedtuneError(
            f"{where}: adapter tensor {key!r} is not a LoRA weight of a decoder block; "
            "adapter files carry only q/k/v/o and MLP LoRA weights"
        )
    layer, block, module, ab = match.groups()
    return layer, _BLOCK[block], module, ab


def input_name(key: str, where: Path) -> str:
    """peft's `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` ->
    the builder's `model.layers.3.attn.q_proj.lora_A.MatMul.weight`."""
    layer, block, module, ab = _parts(key, where)
    return f"model.layers.{layer}.{block}.{module}.lora_{ab}.MatMul.weight"


def lora_node_names(adapter_dir: Path) -> list[str]:
    """The builder's node names of the adapter's LoRA MatMuls (kept out of INT4)."""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="np") as handle:
        keys = list(handle.keys())
    names = []
    for key in keys:
        layer, block, module, ab = _parts(key, adapter_dir)
        names.append(f"/model/layers.{layer}/{block}/{module}/lora_{ab}/MatMul")
    return names


def lora_scaling(adapter_dir: Path) -> float:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise FedtuneError(
            f"{adapter_dir / 'adapter_config.json'}: rank_pattern/alpha_pattern are not supported in adapter files"
        )
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def adapter_arrays(adapter_dir: Path) -> dict[str, np.ndarray]:
    """{input name: fp32 array} for the adapter in `adapter_dir`."""
    from safetensors.numpy import load_file

    scaling = lora_scaling(adapter_dir)
    arrays = {}
    for key, value in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        value = value.astype(np.float32)
        arrays[input_name(key, adapter_dir)] = np.ascontiguousarray(
            value.T if ".lora_A." in key else (scaling * value).T
        )
    return dict(sorted(arrays.items()))


def check_fits(arrays: dict[str, np.ndarray], lora_inputs: dict[str, list[int]], where: str) -> None:
    """The adapter must feed exactly the base's LoRA inputs (the device checks the same)."""
    from fedtune.edge_device.bundle import lora_fit_problem

    problem = lora_fit_problem({name: array.shape for name, array in arrays.items()}, lora_inputs)
    if problem:
        raise FedtuneError(
            f"{where}: the adapter's LoRA weights do not fit the base model's inputs: {problem}; "
            "export the base with the same lora-target-modules and lora-top-layers"
        )


def write_adapter(arrays: dict[str, np.ndarray], path: Path) -> None:
    """Write the arrays with onnxruntime's AdapterFormat (version 1)."""
    import onnxruntime as ort

    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in arrays.items()})
    adapter.export_adapter(str(path))
