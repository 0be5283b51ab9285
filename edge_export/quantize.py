"""INT8 quantisation with onnxruntime's dynamic quantiser.

Modes (weights INT8, activations quantised on the fly):
- `per-channel` (default): signed INT8 weights with one scale per output channel;
- `per-channel-fp32-head`: the same, with the classifier / LM head left in fp32 (for
  BERT-likes the classifier is a Gemm, which dynamic quantisation leaves in fp32 anyway;
  for causal LMs it keeps the `lm_head` MatMul in fp32);
- `per-tensor`: one scale per weight tensor (what a bare `quantize_dynamic` call does).
`bench/edge.py` measures them side by side; the default is the one that won there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

HEAD_NAMES = ("classifier", "lm_head", "score")


@dataclass(frozen=True)
class QuantMode:
    name: str
    per_channel: bool
    fp32_head: bool


MODES = {
    "per-channel": QuantMode("per-channel", per_channel=True, fp32_head=False),
    "per-channel-fp32-head": QuantMode("per-channel-fp32-head", per_channel=True, fp32_head=True),
    "per-tensor": QuantMode("per-tensor", per_channel=False, fp32_head=False),
}
DEFAULT_MODE = "per-channel"


def head_nodes(model_path: str | Path) -> list[str]:
    """Names of the MatMul/Gemm nodes of the classifier or LM head."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    return [n.name for n in graph.node
            if n.op_type in ("MatMul", "Gemm") and any(f"/{h}/" in n.name or n.name.startswith(h) for h in HEAD_NAMES)]


def quantize_int8(fp32_path: str | Path, out_path: str | Path, mode: str = DEFAULT_MODE) -> dict[str, object]:
    """Write the INT8 model; returns what the manifest records about it."""
    if mode not in MODES:
        raise ValueError(f"unknown quantisation mode {mode!r}; choose from {', '.join(MODES)}")
    spec = MODES[mode]
    excluded = head_nodes(fp32_path) if spec.fp32_head else []
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser's "consider pre-processing" advice does not apply here
    try:
        quantize_dynamic(
            str(fp32_path), str(out_path), per_channel=spec.per_channel, weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        root.setLevel(level)
    return {"mode": spec.name, "method": "onnxruntime dynamic", "weight_type": "QInt8",
            "per_channel": spec.per_channel, "fp32_nodes": excluded}
