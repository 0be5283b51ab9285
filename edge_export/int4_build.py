"""INT4 causal LMs with onnxruntime-genai's model builder: a Hugging Face folder to an
ONNX model with `MatMulNBits` weights, `genai_config.json` and the tokenizer files.

Two layouts:
- **merged**: the run's adapter merged into the base first, then quantised (smallest, fastest);
- **adapter-ready**: the *base* weights quantised, every LoRA projection kept as a float
  `MatMul` pair whose weights are graph inputs (`model.layers.N.attn.q_proj.lora_A.MatMul.weight`
  ...). onnxruntime-genai's `Adapters` feeds them from an `.onnx_adapter` file, so a later
  federation's result ships as that file alone.

The builder bakes a peft adapter in as initialisers (`adapter_path`); `lift_lora_inputs`
turns those into inputs, which is what Olive's ExtractAdapters pass does.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedtune.errors import FedtuneError

from .onnx_adapter import lora_node_names

log = logging.getLogger("fedtune.export")
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
ALGOS = ("rtn", "k_quant", "k_quant_mixed", "default")
# The decoder projections by the names peft and the CLI use, and where the builder puts them.
PROJECTION_PATHS = {
    "q_proj": "attn/q_proj",
    "k_proj": "attn/k_proj",
    "v_proj": "attn/v_proj",
    "qkv_proj": "attn/qkv_proj",
    "o_proj": "attn/o_proj",
    "gate_proj": "mlp/gate_proj",
    "up_proj": "mlp/up_proj",
    "down_proj": "mlp/down_proj",
}
PROJECTION_NAMES = tuple(PROJECTION_PATHS)
DEFAULT_INT8_PROJECTIONS = ("gate_proj", "up_proj")


@dataclass(frozen=True)
class Int4Options:
    """The builder's INT4 choices; the defaults are what `bench/edge_llm.py` picked on a
    fine-tuned SmolLM2-135M (exact match and agreement with fp32, size, decode speed; see
    docs/benchmarks.md, "Edge LLM", whose table of settings is the measured case for them).
    INT4 is hard on a 135M model: keeping some projections at 8 bits is what brings the exact
    match back within the gate there.

    - `algo`: `rtn` (round to nearest), `k_quant` (llama.cpp-style, LM head at 8 bits),
      `k_quant_mixed` (also some attention/MLP weights at 8 bits), `default` (onnxruntime's
      block quantiser, which cannot share the embedding table);
    - `block_size`: weights per scale;
    - `accuracy_level`: 4 lets the CPU kernel quantise activations to INT8 for the dot products,
      0 keeps them fp32;
    - `symmetric`: no zero points (the builder 0.11.4 writes shared embeddings that refer to zero
      points it did not save when this is on with `rtn`, so the default is asymmetric);
    - `shared_embeddings`: the token embedding reads the quantised LM head (tied models), instead
      of a separate fp32 table (for a small tied model, most of the bundle otherwise);
    - `int8_projections`: these projections (`gate_proj`, `up_proj`, ...) at 8 bits in every decoder
      block, the rest at 4 (mixed precision, as llama.cpp's Q4_K_M keeps some tensors at 6 bits).
      The default keeps the MLP's gate and up projections at 8 bits: on the federated SmolLM2 of
      `bench/llm.py` it was the mostly-4-bit choice that agreed most with fp32 (docs/benchmarks.md);
      none with `algo = "default"`;
    - `int8_last_layers`: every weight of the last N decoder blocks at 8 bits too.

    Both only with `rtn`/`k_quant*`. The builder has no option naming layers or projections, so the
    build wraps its per-weight bit table (`make_int4_algo_config`).
    """

    algo: str = "k_quant_mixed"
    block_size: int = 32
    accuracy_level: int = 4
    symmetric: bool = False
    shared_embeddings: bool = True
    int8_projections: tuple[str, ...] | None = None  # None: the algorithm's default (below)
    int8_last_layers: int = 0

    def __post_init__(self) -> None:
        if self.int8_projections is None:  # `default` takes no per-weight bits: its own default is none
            projections = () if self.algo == "default" else DEFAULT_INT8_PROJECTIONS
        else:
            projections = tuple(self.int8_projections)  # a list from JSON or the CLI
        object.__setattr__(self, "int8_projections", projections)
        if self.algo not in ALGOS:
            raise FedtuneError(f"--int4-algo: {self.algo!r} is not one of {', '.join(ALGOS)}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise FedtuneError(f"--int4-block-size: {self.block_size} is not one of 16, 32, 64, 128, 256")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise FedtuneError(f"--int4-accuracy-level: {self.accuracy_level} is not 0-4")
        if self.int8_last_layers < 0:
            raise FedtuneError(f"--int4-int8-last-layers: {self.int8_last_layers} is negative")
        unknown = [p for p in self.int8_projections if p not in PROJECTION_NAMES]
        if unknown:
            raise FedtuneError(f"--int4-int8-projections: {unknown[0]!r} is not one of {', '.join(PROJECTION_NAMES)}")
        for flag, value in (
            ("--int4-int8-last-layers", self.int8_last_layers),
            ("--int4-int8-projections", self.int8_projections),
        ):
            if value and self.algo == "default":
                raise FedtuneError(
                    f"{flag}: needs --int4-algo rtn, k_quant or k_quant_mixed "
                    "(the `default` quantiser takes no per-weight bits)"
                )

    def builder_options(self) -> dict[str, Any]:
        return {
            "int4_algo_config": self.algo,
            "int4_block_size": self.block_size,
            "int4_accuracy_level": self.accuracy_level,
            "int4_is_symmetric": self.symmetric,
            "shared_embeddings": self.shared_embeddings,
        }


def builder_version() -> str:
    from importlib.metadata import version

    return version("onnxruntime-genai")


def build_int4(
    hf_dir: Path, out_dir: Path, options: Int4Options, cache_dir: Path, adapter_dir: Path | None = None
) -> dict[str, Any]:
    """Run the builder on `hf_dir` (a transformers folder with its tokenizer). With
    `adapter_dir` (a peft adapter of `hf_dir`), keep its LoRA projections out of INT4 and lift
    their weights to inputs. Returns what the manifest records."""
    from onnxruntime_genai.models.builder import create_model

    extra = options.builder_options()
    lora_inputs: dict[str, list[int]] = {}
    if adapter_dir is not None:
        extra["adapter_path"] = str(adapter_dir)
        extra["int4_nodes_to_exclude"] = lora_node_names(adapter_dir)
    chatter = io.StringIO()  # the builder prints, and tqdm-s every tensor it saves
    try:
        with (
            contextlib.redirect_stdout(chatter),
            contextlib.redirect_stderr(chatter),
            _quiet("onnxruntime.quantization", "onnx_ir"),
            _eight_bit_weights(options),
        ):
            create_model(str(hf_dir), str(hf_dir), str(out_dir), "int4", "cpu", str(cache_dir), **extra)
    except (ValueError, NotImplementedError, KeyError) as err:
        raise FedtuneError(f"{hf_dir}: onnxruntime-genai's builder cannot build this model: {err}") from None
    for name in (MODEL_FILE, DATA_FILE, "genai_config.json", "tokenizer.json"):
        if not (out_dir / name).exists():
            raise FedtuneError(
                f"{out_dir / name}: the builder did not write it; its output:\n{chatter.getvalue()[-2000:]}"
            )
    if adapter_dir is not None:
        lora_inputs = lift_lora_inputs(out_dir)
    return {
        "engine": "onnxruntime-genai model builder",
        "builder_version": builder_version(),
        "precision": "int4",
        "execution_provider": "cpu",
        **asdict(options),
        "layout": "adapter-ready" if adapter_dir is not None else "merged",
        "lora_inputs": lora_inputs,
    }


@contextlib.contextmanager
def _eight_bit_weights(options: Int4Options):  # type: ignore[no-untyped-def]
    """While the builder runs, its bit table also puts `int8_projections` of every decoder block
    and every projection of the last `int8_last_layers` blocks at 8 bits (node names as the
    builder writes them; absent ones, such as `q_proj` where it fuses `qkv_proj`, are ignored)."""
    if not (options.int8_projections or options.int8_last_layers):  # (both empty with `default`: checked)
        yield
        return
    from onnxruntime_genai.models.builder import Model  # the builder imports its package as `builders`

    from fedtune.internals import onnxruntime_genai

    onnxruntime_genai.require("int4-algo-config")

    original = Model.make_int4_algo_config

    def with_eight_bit_weights(self: Any, quant_method: str) -> Any:
        config = original(self, quant_method)
        last = range(max(0, self.num_layers - options.int8_last_layers), self.num_layers)
        for layer in range(self.num_layers):
            for name in PROJECTION_NAMES if layer in last else options.int8_projections:
                node = f"/model/layers.{layer}/{PROJECTION_PATHS[name]}/MatMul"
                config.customized_weight_config[node] = {"bits": 8}
        return config

    Model.make_int4_algo_config = with_eight_bit_weights
    try:
        yield
    finally:
        Model.make_int4_algo_config = original


@contextlib.contextmanager
def _quiet(*loggers: str):  # type: ignore[no-untyped-def]
    """The quantiser logs a line per weight at INFO; onnx_ir warns about the shared embedding's
    inputs while the builder rewires them (the saved model is complete: it loads and is gated)."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def lift_lora_inputs(out_dir: Path) -> dict[str, list[int]]:
    """Turn every `*.lora_A/B.MatMul.weight` initialiser into a float graph input with a
    symbolic rank (`lora_rank`), rewrite the model (one external data file), and return
    {input name: [rows, cols]} as built (the rank of the adapter it was built with)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(out_dir / MODEL_FILE))
    lora = [t for t in model.graph.initializer if ".lora_A." in t.name or ".lora_B." in t.name]
    if not lora:
        raise FedtuneError(f"{out_dir / MODEL_FILE}: the builder wrote no LoRA weights; the adapter did not apply")
    quantised = [n.name for n in model.graph.node if "/lora_" in n.name and n.op_type != "MatMul"]
    if quantised:
        raise FedtuneError(
            f"{out_dir / MODEL_FILE}: LoRA projections were quantised ({quantised[0]}); "
            "they must stay float MatMuls to take adapter weights"
        )
    shapes: dict[str, list[int]] = {}
    for tensor in lora:
        rows, cols = (int(d) for d in tensor.dims)
        shapes[tensor.name] = [rows, cols]
        dims: list[Any] = [rows, "lora_rank"] if ".lora_A." in tensor.name else ["lora_rank", cols]
        model.graph.input.append(helper.make_tensor_value_info(tensor.name, TensorProto.FLOAT, dims))
    keep = [t for t in model.graph.initializer if t.name not in shapes]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    os.remove(out_dir / DATA_FILE)
    onnx.save(
        model,
        str(out_dir / MODEL_FILE),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=0,
    )
    return dict(sorted(shapes.items()))
