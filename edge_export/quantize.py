"""INT8 quantisation with onnxruntime's dynamic quantiser.

Modes (weights INT8, activations quantised on the fly):
- `per-channel` (default): signed INT8 weights with one scale per output channel;
- `per-channel-fp32-head`: the same, with the classifier / LM head left in fp32 (for
  BERT-likes the classifier is a Gemm, which dynamic quantisation leaves in fp32 anyway;
  for causal LMs it keeps the `lm_head` MatMul in fp32);
- `per-tensor`: one scale per weight tensor (what a bare `quantize_dynamic` call does);
- `weight-only-int8` (the default for causal LMs): INT8 weights in blocks of 32 with one fp32
  scale each (onnxruntime's `MatMulNBitsQuantizer`, `MatMulNBits` kernels), activations stay
  fp32. Dynamic quantisation quantises activations per tensor, which SmolLM2's outlier
  activations do not survive (its greedy next token stops agreeing with PyTorch's), while
  weight-only INT8 keeps it (found by hand on a merged SmolLM2-135M; no benchmark repeats it).
`bench/edge.py` measures the encoder modes side by side (docs/benchmarks.md); the default is
the one that won there.
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
    weight_only_bits: int = 0  # > 0: MatMulNBits weight-only quantisation at this width


MODES = {
    "per-channel": QuantMode("per-channel", per_channel=True, fp32_head=False),
    "per-channel-fp32-head": QuantMode("per-channel-fp32-head", per_channel=True, fp32_head=True),
    "per-tensor": QuantMode("per-tensor", per_channel=False, fp32_head=False),
    "weight-only-int8": QuantMode("weight-only-int8", per_channel=True, fp32_head=False, weight_only_bits=8),
}
DEFAULT_MODE = "per-channel"
DEFAULT_MODE_BY_TASK = {"seq-cls": DEFAULT_MODE, "causal-lm": "weight-only-int8"}
WEIGHT_ONLY_BLOCK = 32


def head_nodes(model_path: str | Path) -> list[str]:
    """Names of the MatMul/Gemm nodes of the classifier or LM head."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    return [
        n.name
        for n in graph.node
        if n.op_type in ("MatMul", "Gemm") and any(f"/{h}/" in n.name or n.name.startswith(h) for h in HEAD_NAMES)
    ]


def quantize_int8(fp32_path: str | Path, out_path: str | Path, mode: str = DEFAULT_MODE) -> dict[str, object]:
    """Write the INT8 model; returns what the manifest records about it."""
    if mode not in MODES:
        raise ValueError(f"unknown quantisation mode {mode!r}; choose from {', '.join(MODES)}")
    spec = MODES[mode]
    if spec.weight_only_bits:
        return _quantize_weight_only(Path(fp32_path), Path(out_path), spec)
    excluded = head_nodes(fp32_path) if spec.fp32_head else []
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser's "consider pre-processing" advice does not apply here
    try:
        quantize_dynamic(
            str(fp32_path),
            str(out_path),
            per_channel=spec.per_channel,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        root.setLevel(level)
    return {
        "mode": spec.name,
        "method": "onnxruntime dynamic",
        "weight_type": "QInt8",
        "per_channel": spec.per_channel,
        "fp32_nodes": excluded,
    }


def _quantize_weight_only(fp32_path: Path, out_path: Path, spec: QuantMode) -> dict[str, object]:
    """MatMulNBits weight-only quantisation of every MatMul with a constant weight, except
    the rotary-embedding frequency product (positions would lose their precision)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(fp32_path))
    excluded = [n.name for n in model.graph.node if n.op_type == "MatMul" and "rotary_emb" in n.name]
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=spec.weight_only_bits,
        block_size=WEIGHT_ONLY_BLOCK,
        is_symmetric=True,
        accuracy_level=4,
        nodes_to_exclude=excluded,
    )
    quant_logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quant_logger.level
    quant_logger.setLevel(logging.WARNING)  # it logs every node it visits at INFO
    try:
        quantizer.process()
    finally:
        quant_logger.setLevel(level)
    quantizer.model.save_model_to_file(str(out_path), use_external_data_format=False)
    return {
        "mode": spec.name,
        "method": "onnxruntime MatMulNBits (weight-only)",
        "weight_type": f"INT{spec.weight_only_bits}",
        "block_size": WEIGHT_ONLY_BLOCK,
        "symmetric": True,
        "accuracy_level": 4,
        "fp32_nodes": excluded,
    }
