"""peft's private internals fedtune relies on (verified with 0.21.2): a LoRA layer asks
`BaseTunerLayer._get_base_layer_device_and_dtype(self, base_layer)` for the device and
dtype to move a new adapter to, from `_move_adapter_to_device_of_base_layer`.
`fedtune/model.py` answers "no dtype" while it wraps a 16-bit or 4-bit base, so the seeded
fp32 LoRA init is never rounded to 16 bits: every site draws the same A whatever its base."""

from __future__ import annotations

import inspect

from . import Internal, require_from

VERIFIED = "0.21.2"


def _adapter_dtype() -> str | None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    method = getattr(BaseTunerLayer, "_get_base_layer_device_and_dtype", None)
    if method is None:
        return "BaseTunerLayer has no _get_base_layer_device_and_dtype"
    if list(inspect.signature(method).parameters) != ["self", "base_layer"]:
        return f"_get_base_layer_device_and_dtype takes {list(inspect.signature(method).parameters)}"
    mover = getattr(BaseTunerLayer, "_move_adapter_to_device_of_base_layer", None)
    if mover is None or "_get_base_layer_device_and_dtype" not in inspect.getsource(mover):
        return "_move_adapter_to_device_of_base_layer no longer asks _get_base_layer_device_and_dtype"
    return None


INTERNALS: dict[str, Internal] = {
    "adapter-dtype": Internal(
        "LoRA on a 16-bit or quantised base (fedtune/model.py)",
        "BaseTunerLayer._get_base_layer_device_and_dtype(self, base_layer), asked by _move_adapter_to_device_of_base_layer",
        _adapter_dtype,
    ),
}


def require(*names: str) -> None:
    """Check the named peft internals; one line at the first that changed."""
    require_from(INTERNALS, "peft", VERIFIED, *names)
