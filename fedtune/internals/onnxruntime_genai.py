"""onnxruntime-genai's private internals fedtune relies on (verified with 0.11.4): the model
builder's `Model.make_int4_algo_config(self, quant_method)`, which `edge_export/int4_build.py`
wraps to put chosen projections at 8 bits."""

from __future__ import annotations

import inspect

from . import Internal, require_from

VERIFIED = "0.11.4"


def _int4_algo_config() -> str | None:
    from onnxruntime_genai.models.builder import Model

    method = getattr(Model, "make_int4_algo_config", None)
    if method is None:
        return "the builder's Model has no make_int4_algo_config"
    if list(inspect.signature(method).parameters) != ["self", "quant_method"]:
        return f"Model.make_int4_algo_config takes {list(inspect.signature(method).parameters)}"
    if "customized_weight_config" not in inspect.getsource(method):
        return "Model.make_int4_algo_config no longer builds a customized_weight_config"
    return None


INTERNALS: dict[str, Internal] = {
    "int4-algo-config": Internal(
        "the INT4 export's 8-bit projections (edge_export/int4_build.py)",
        "the builder's Model.make_int4_algo_config(self, quant_method) and its customized_weight_config",
        _int4_algo_config,
    ),
}


def require(*names: str) -> None:
    """Check the named onnxruntime-genai internals; one line at the first that changed."""
    require_from(INTERNALS, "onnxruntime-genai", VERIFIED, *names)
