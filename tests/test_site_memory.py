"""A site's base model at the precision its hardware wants: `base-dtype` resolution, the
bitsandbytes NF4 base on this CPU, gradient checkpointing's equal loss and gradients, the
memory plan from a model's config (an 8B Llama planned without its weights), `fedtune
plan`, and a site refusing a run its device cannot hold before round 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from support.run_configs import sentiment_config

from fedtune.adapter_io import get_adapter_arrays
from fedtune.config import RunSettings, default_run_config
from fedtune.errors import ConfigError
from fedtune.memory_plan import MemoryPlanError, check_fits, model_shape, plan_memory, resolve_checkpointing
from fedtune.model import LoraSettings, build_lora_model
from fedtune.precision import BasePrecision, resolve_dtype, resolve_precision

GIB = 1024**3
LLAMA_8B = {  # meta-llama/Llama-3.1-8B-Instruct's config.json, the fields a plan reads
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}


def settings_for(**run_config: Any) -> RunSettings:
    """Settings from the declared defaults and keyword overrides (lora_r for lora-r)."""
    return RunSettings.from_run_config(
        {**default_run_config(), **{k.replace("_", "-"): v for k, v in run_config.items()}}
    )


@pytest.fixture(scope="module")
def llama_8b_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding only an 8B model's config.json: the plan needs no weights."""
    folder = tmp_path_factory.mktemp("llama-8b-config")
    (folder / "config.json").write_text(json.dumps(LLAMA_8B), encoding="utf-8")
    return folder


def test_auto_dtype_is_fp32_on_cpu_and_bf16_on_gpus_that_support_it(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_dtype("auto", cpu) == "fp32"
    assert resolve_dtype("bf16", cpu) == "bf16" and resolve_dtype("fp16", cpu) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", gpu) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    assert resolve_dtype("auto", gpu) == "fp32"
    with pytest.raises(ConfigError, match="'base-dtype': bf16 needs a GPU that supports it; Tesla V100 does not"):
        resolve_precision("bf16", "none", False, gpu)
    assert resolve_precision("auto", "none", True, cpu) == BasePrecision("fp32", "none", True)


def test_quantised_base_without_bitsandbytes_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"'quantize-base': nf4 needs bitsandbytes at this site") as err:
        resolve_precision("auto", "nf4", True, torch.device("cpu"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("run_config", "message"),
    [
        ({"quantize-base": "nf4"}, 'quantize-base\': applies to task = "causal-lm"'),
        ({"base-dtype": "fp64"}, "base-dtype"),
        (
            {"dp": True, "base-dtype": "bf16"},
            'base-dtype\': DP-SGD trains on an fp32 base without recomputation: set base-dtype = "auto"',
        ),
        ({"dp": True, "task": "causal-lm", "quantize-base": "nf4"}, "quantize-base': DP-SGD"),
        ({"dp": True, "gradient-checkpointing": "on"}, "gradient-checkpointing': DP-SGD"),
    ],
)
def test_precision_keys_are_checked_with_the_run_config(run_config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunSettings.from_run_config({**default_run_config(), "dp-target-epsilon": 8.0, **run_config})


def _loss_and_grads(model: Any, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


def _llama_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (4, 24), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_llama_dir: Path) -> None:
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    plain = build_lora_model(str(tiny_llama_dir), "causal-lm", lora, seed=1)
    recomputed = build_lora_model(
        str(tiny_llama_dir), "causal-lm", lora, seed=1, precision=BasePrecision("fp32", "none", True)
    )
    assert (
        recomputed.get_base_model().is_gradient_checkpointing and not plain.get_base_model().is_gradient_checkpointing
    )
    calls: list[int] = []
    block = recomputed.get_base_model().model.layers[0]
    block.register_forward_pre_hook(lambda *a: calls.append(1))  # (recomputation stops early: no post-hook)
    batch = _llama_batch()
    loss_plain, grads_plain = _loss_and_grads(plain, batch)
    loss_ckpt, grads_ckpt = _loss_and_grads(recomputed, batch)
    assert len(calls) == 2  # the block ran again in the backward pass: checkpointing is on
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-6)
    assert grads_plain.keys() == grads_ckpt.keys() and grads_plain
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7)


def test_bf16_and_nf4_bases_train_fp32_adapters_of_the_same_format(tiny_llama_dir: Path) -> None:
    """The frozen base in bf16 or NF4 (bitsandbytes on this CPU); what trains and what
    travels stays fp32 with the fp32 model's keys and shapes, and a step lowers the loss."""
    from bitsandbytes.nn import Linear4bit

    from fedtune.client.trainer import training_loss

    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    reference = get_adapter_arrays(build_lora_model(str(tiny_llama_dir), "causal-lm", lora, seed=1))
    for precision in (BasePrecision("bf16"), BasePrecision("bf16", "nf4", True)):
        model = build_lora_model(str(tiny_llama_dir), "causal-lm", lora, seed=1, precision=precision)
        quantised = [m for m in model.modules() if isinstance(m, Linear4bit)]
        assert bool(quantised) == (precision.quantize == "nf4")
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(p.dtype == torch.float32 for p in trainable)
        if precision.quantize == "none":
            assert model.get_base_model().model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
        arrays = get_adapter_arrays(model)
        assert [(a.shape, a.dtype) for a in arrays] == [(a.shape, a.dtype) for a in reference]
        # LoRA A is the seeded init whatever the base's precision: sites and coordinator agree
        assert all(np.array_equal(a, b) for a, b in zip(arrays, reference))
        optimizer = torch.optim.AdamW(trainable, lr=0.05)
        model.train()
        losses = []
        for _ in range(6):
            loss = training_loss(model, _llama_batch(), None, torch.device("cpu"))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss))
        assert np.isfinite(losses).all() and losses[-1] < losses[0], (precision, losses)


def test_plan_of_an_8b_model_from_its_config_alone(llama_8b_config: Path) -> None:
    settings = settings_for(
        task="causal-lm", model=str(llama_8b_config), batch_size=4, max_length=512, lora_r=16,
        lora_target_modules="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    )  # fmt: skip
    shape = model_shape(settings.base_model, "causal-lm", settings)
    assert shape.params == pytest.approx(8.03e9, rel=0.01) and shape.layers == 32
    assert shape.trainable == pytest.approx(42e6, rel=0.02)  # r=16 on all seven projections of 32 blocks
    plans = {
        p: plan_memory(shape, settings, p)
        for p in (
            BasePrecision("fp32"),
            BasePrecision("bf16"),
            BasePrecision("bf16", checkpointing=True),
            BasePrecision("bf16", "nf4", True),
        )
    }
    totals = [plan.total for plan in plans.values()]
    assert totals == sorted(totals, reverse=True)
    assert plans[BasePrecision("fp32")].weights == pytest.approx(8.03e9 * 4, rel=0.01)
    qlora = plans[BasePrecision("bf16", "nf4", True)]
    assert 5 * GIB < qlora.weights < 10 * GIB  # 4-bit blocks, embeddings and head in fp32 after k-bit prep
    assert 5 * GIB < qlora.total < 12 * GIB  # a 24 GB card holds QLoRA at batch 4 x 512 with room to spare
    with pytest.raises(MemoryPlanError) as err:
        check_fits(shape, settings, BasePrecision("bf16"), torch.device("cuda", 0), 24 * GIB)
    line = str(err.value)
    assert "\n" not in line and line.startswith("training needs about ")
    assert "cuda:0 has 24.0 GiB free; try " in line and "quantize-base = nf4" in line
    # auto checkpointing: on with a quantised base; otherwise only when needed to fit
    assert resolve_checkpointing("auto", shape, settings, BasePrecision("bf16", "nf4"), 80 * GIB)
    assert not resolve_checkpointing("auto", shape, settings, BasePrecision("bf16"), 80 * GIB)
    assert resolve_checkpointing("auto", shape, settings, BasePrecision("bf16"), 30 * GIB)
    assert not resolve_checkpointing("off", shape, settings, BasePrecision("bf16"), 1 * GIB)


def test_the_8b_recipe_fits_a_24_gib_gpu(llama_8b_config: Path) -> None:
    """configs/llama-8b-qlora.toml, with the 8B Llama's config standing in for its folder."""
    from fedtune.cli.common import read_run_config_file

    recipe = read_run_config_file(str(Path(__file__).resolve().parent.parent / "configs" / "llama-8b-qlora.toml"))
    settings = RunSettings.from_run_config({**default_run_config(), **recipe, "model": str(llama_8b_config)})
    assert (settings.quantize_base, settings.gradient_checkpointing, settings.batch_size) == ("nf4", "on", 16)
    shape = model_shape(settings.base_model, "causal-lm", settings)
    plan = check_fits(shape, settings, BasePrecision("bf16", "nf4", True), torch.device("cuda", 0), 24 * GIB)
    assert plan.total < 20 * GIB
    assert plan.logits < 0.2 * GIB  # the LM head a chunk at a time: 16 x 511 positions never live at once


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedtune.cli", *args], capture_output=True, text=True, timeout=300)


def test_fedtune_plan_prints_the_estimate_and_refuses_what_does_not_fit(llama_8b_config: Path) -> None:
    common = ["plan", "--model", str(llama_8b_config), "--set", "task=causal-lm", "--set", "max-length=512"]
    ok = _cli(*common, "--device", "cuda", "--device-memory", "80GiB")
    assert ok.returncode == 0, ok.stderr
    assert "8.03B parameters" in ok.stdout and "bf16 base" in ok.stdout and "fits: " in ok.stdout
    assert "nf4 blocks, gradient checkpointing" in ok.stdout
    small = _cli(*common, "--device", "cuda", "--device-memory", "16GiB")
    assert small.returncode == 1
    lines = small.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in small.stderr
    assert lines[0].startswith("fedtune: error: training needs about ") and "16.0 GiB free" in lines[0]
    bad = _cli(*common, "--device-memory", "lots")
    assert bad.returncode == 2 and "expected a size such as 24GiB" in bad.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_site_refuses_a_run_its_memory_cannot_hold_before_round_1(
    tmp_path: Path, tiny_bert_dir: Path, sentiment_data: dict[str, Path]
) -> None:
    """Batches of a million examples: every site's plan exceeds this machine's memory, so
    each refuses at the SecAgg+ census in one line, and no round trains."""
    config = tmp_path / "huge.toml"
    lines = {**sentiment_config(tiny_bert_dir, sentiment_data), "batch-size": 1_000_000, "num-rounds": 1}
    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in lines.items()), encoding="utf-8")
    result = _cli(
        "simulate",
        "--sites",
        "2",
        "--run-config",
        str(config),
        "--output-dir",
        str(tmp_path / "runs"),
        "--run-name",
        "huge",
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("fedtune: error:")]
    assert len(error) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "training needs about " in error[0] and "batch 1000000 x 64 tokens" in error[0], error[0]
    assert "try batch-size = " in error[0]
    assert not list((tmp_path / "runs" / "huge").glob("round-001"))


def test_chunked_lm_head_loss_equals_the_full_logits_loss(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The LM head a chunk at a time, each chunk recomputed in the backward pass: the same
    loss and gradients as the logits_to_keep path, with prompts of different lengths."""
    import fedtune.chunked_loss as chunked
    from fedtune.client import trainer

    model = build_lora_model(str(tiny_llama_dir), "causal-lm", LoraSettings(r=4, alpha=8, dropout=0.0), seed=1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init would make A's gradients vanish
            torch.nn.init.normal_(param, std=0.05)
    batch = _llama_batch(3)
    batch["labels"][:, :10] = -100
    batch["labels"][1, :17] = -100  # a longer prompt in one row
    assert chunked.lm_parts(model) is not None  # Llama: the chunked path applies

    def loss_and_grads(parts: Any) -> tuple[float, dict[str, torch.Tensor]]:
        monkeypatch.setattr(trainer, "lm_parts", lambda m: parts)
        model.zero_grad()
        loss = trainer.completion_loss(model, dict(batch))
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    full_loss, full_grads = loss_and_grads(None)  # logits_to_keep at the labelled positions
    vocab = int(model.get_base_model().config.vocab_size)
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 7 * 4 * vocab)  # 7 positions a chunk: the 49 labelled in 7 chunks
    assert chunked.chunk_rows(vocab) == 7
    chunk_loss, chunk_grads = loss_and_grads(chunked.lm_parts(model))
    assert chunk_loss == pytest.approx(full_loss, rel=1e-6)
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunk_grads[name], grad, rtol=1e-5, atol=1e-7)
