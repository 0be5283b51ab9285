"""fp32 ONNX export of a merged model with optimum: `text-classification` for seq-cls,
`text-generation-with-past` (one graph taking the KV cache as inputs) for causal-lm."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

ONNX_TASKS = {"seq-cls": "text-classification", "causal-lm": "text-generation-with-past"}


def export_onnx(merged_dir: str | Path, out_dir: str | Path, task: str, opset: int | None = None) -> Path:
    """Export `merged_dir` into `out_dir`; returns the path of `model.onnx`."""
    from optimum.exporters.onnx import main_export

    logging.getLogger("optimum").setLevel(logging.WARNING)
    main_export(
        str(merged_dir),
        output=str(out_dir),
        task=ONNX_TASKS[task],
        opset=opset,
        device="cpu",
        local_files_only=True,
        do_validation=False,
        library_name="transformers",
    )
    return Path(out_dir) / "model.onnx"


def opset_of(path: str | Path) -> int:
    """The default-domain opset of an ONNX file."""
    model = onnx.load(str(path), load_external_data=False)
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))
