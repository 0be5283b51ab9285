"""Transformer graph fusion with onnxruntime's optimizer, run on the fp32 graph before quantisation.

For BERT-like encoders, onnxruntime's `optimize_model` folds the exported primitive ops into its
fused kernels (EmbedLayerNormalization, Attention, SkipLayerNormalization, BiasGelu). The dynamic
quantiser then turns the fused Attention into QAttention, so attention projections run in INT8 too.
Other architectures (the causal LMs with KV cache) keep optimum's graph unchanged.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

# Hugging Face `model_type`s whose ONNX graph onnxruntime's "bert" fusions understand.
BERT_LIKE = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet"})


def fuse_transformer_graph(fp32_path: str | Path, out_path: str | Path, model_config: str | Path) -> dict[str, Any]:
    """Write the fused graph of `fp32_path` to `out_path`; returns what the manifest records.

    `model_config` is the merged model's `config.json`. Architectures outside BERT_LIKE are copied
    unchanged and reported with `"fusion": "none"`.
    """
    config = json.loads(Path(model_config).read_text())
    if config.get("model_type") not in BERT_LIKE:
        shutil.copyfile(fp32_path, out_path)
        return {"fusion": "none", "reason": f"no onnxruntime fusion for model_type {config.get('model_type')!r}"}
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.WARNING)
    fused = optimize_model(
        str(fp32_path),
        model_type="bert",
        num_heads=int(config["num_attention_heads"]),
        hidden_size=int(config["hidden_size"]),
        opt_level=0,
    )
    fused.save_model_to_file(str(out_path))
    counts = {op: int(n) for op, n in fused.get_fused_operator_statistics().items() if n}
    return {"fusion": "onnxruntime.transformers bert", "fused_ops": counts}
