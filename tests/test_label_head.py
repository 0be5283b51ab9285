"""The label-name head: computed from the base model and the label names only, the same
everywhere, and a zero-shot classifier on the real MiniLM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fedtune.data
from fedtune.config import RunSettings, default_run_config, resolve_path
from fedtune.data import load_examples
from fedtune.encoding import make_encoder
from fedtune.errors import ConfigError
from fedtune.evaluation import evaluate
from fedtune.label_head import LOGIT_SCALE, label_name_features, label_name_text
from fedtune.model import LoraSettings, build_lora_model, label_name_head_module, load_base_model, load_tokenizer


def head_weight(model: torch.nn.Module) -> torch.Tensor:
    return next(p for n, p in model.named_parameters() if "modules_to_save" in n and n.endswith(".weight"))


def test_label_names_read_as_words() -> None:
    assert label_name_text("card_arrival") == "card arrival"
    assert label_name_text("top-up  failed") == "top up failed"


def test_head_comes_from_label_names_without_reading_any_data(
    tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_data(*args: object, **kwargs: object) -> None:
        raise AssertionError("the label-name head read a data file")

    monkeypatch.setattr(fedtune.data, "read_rows", no_data)
    labels = ["refund not showing up", "card_arrival", "lost_or_stolen_phone"]
    lora = LoraSettings(r=4, alpha=8, head_init="label-names")
    first = head_weight(build_lora_model(str(tiny_bert_dir), "seq-cls", lora, labels, seed=1)).detach()
    second = head_weight(build_lora_model(str(tiny_bert_dir), "seq-cls", lora, labels, seed=2)).detach()
    assert torch.equal(first, second)  # the same head at every site and the coordinator, whatever the seed
    base = load_base_model(str(tiny_bert_dir), "seq-cls", labels)
    features = label_name_features(base, label_name_head_module(base), load_tokenizer(str(tiny_bert_dir)), labels)
    cosine = torch.nn.functional.cosine_similarity(first, features, dim=-1)
    assert torch.allclose(cosine, torch.ones(3), atol=1e-5)
    assert torch.allclose(first.norm(dim=-1), torch.full((3,), LOGIT_SCALE / features.norm(dim=-1).mean().item()))
    random = head_weight(build_lora_model(str(tiny_bert_dir), "seq-cls", LoraSettings(r=4, alpha=8), labels, seed=1))
    assert not torch.allclose(random, first)


def test_label_name_head_classifies_banking77_zero_shot(tmp_path: Path) -> None:
    settings = RunSettings.from_run_config({**default_run_config(), "head-init": "label-names"})
    labels = settings.label_list()
    model = build_lora_model(settings.base_model, settings.task, settings.lora_settings(), labels, settings.seed)
    rows = resolve_path(settings.central_eval_path).read_text().splitlines()[::10]  # 308 of the 3,080 test texts
    sample = tmp_path / "test-sample.jsonl"
    sample.write_text("\n".join(rows) + "\n")
    examples = load_examples(str(sample), settings, labels)
    accuracy = evaluate(model, make_encoder(load_tokenizer(settings.base_model), examples, settings.max_length))[
        "accuracy"
    ]
    assert accuracy > 0.30  # 77 intents: chance is 0.013; the whole test split gives 0.466 (docs/benchmarks.md)


def test_label_names_and_a_low_rank_head_exclude_each_other() -> None:
    with pytest.raises(ConfigError, match="config 'head-init':.*ffa-head-rank = 0"):
        RunSettings.from_run_config({"head-init": "label-names", "ffa-lora": True, "ffa-head-rank": 8})
    with pytest.raises(ConfigError, match="config 'head-init': must be one of"):
        RunSettings.from_run_config({"head-init": "names"})


def head_input(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the (peft-wrapped) seq-cls head receives for `batch`."""
    head = next(m for n, m in model.named_modules() if n.endswith("classifier.modules_to_save.default"))
    seen: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda module, args, output: seen.append(args[0].detach()))
    try:
        model.eval()
        with torch.no_grad():
            model(**batch)
    finally:
        hook.remove()
    return seen[0]


def test_cls_head_input_feeds_the_head_the_cls_state_and_survives_a_reload(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from fedtune.adapter_io import load_adapter_model, save_adapter

    labels = ["card_arrival", "refund not showing up"]
    tokenizer = load_tokenizer(str(tiny_bert_dir))
    batch = dict(tokenizer(["where is my card", "my refund is missing"], padding=True, return_tensors="pt"))
    lora = LoraSettings(r=4, alpha=8, head_init="label-names", head_only=True, head_input="cls")
    model = build_lora_model(str(tiny_bert_dir), "seq-cls", lora, labels, seed=1)
    with torch.no_grad():
        states = load_base_model(str(tiny_bert_dir), "seq-cls", labels).bert(**batch).last_hidden_state
    assert torch.allclose(head_input(model, batch), torch.tanh(states[:, 0]), atol=1e-6)
    pooled = build_lora_model(
        str(tiny_bert_dir), "seq-cls", LoraSettings(r=4, alpha=8, head_init="label-names"), labels, seed=1
    )
    assert not torch.allclose(
        head_input(pooled, batch), torch.tanh(states[:, 0]), atol=1e-3
    )  # the pooler's dense layer

    # The label-name head is computed on the same input: unit cosine with tanh(h_[CLS]) of the names.
    names = dict(tokenizer([label_name_text(x) for x in labels], padding=True, return_tensors="pt"))
    with torch.no_grad():
        name_states = load_base_model(str(tiny_bert_dir), "seq-cls", labels).bert(**names).last_hidden_state
    cosine = torch.nn.functional.cosine_similarity(head_weight(model).detach(), torch.tanh(name_states[:, 0]), dim=-1)
    assert torch.allclose(cosine, torch.ones(2), atol=1e-5)

    # A checkpoint records the head input, and the export's loader rebuilds the same model.
    with torch.no_grad():
        head_weight(model).add_(0.1)
        expected = model(**batch).logits
    save_adapter(
        model,
        tmp_path / "final",
        {"base_model": str(tiny_bert_dir), "task": "seq-cls", "labels": labels, "head_input": "cls"},
    )
    reloaded = load_adapter_model(tmp_path / "final").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, expected, atol=1e-5)


def test_head_input_auto_is_cls_for_the_dp_head_only_recipe_only() -> None:
    assert (
        RunSettings.from_run_config({"dp": True, "dp-target-epsilon": 8.0, "dp-head-only": True})
        .lora_settings()
        .head_input
        == "cls"
    )
    assert (
        RunSettings.from_run_config({"dp": True, "dp-target-epsilon": 8.0, "dp-head-only": False})
        .lora_settings()
        .head_input
        == "pooler"
    )
    assert RunSettings.from_run_config({}).lora_settings().head_input == "pooler"
    assert RunSettings.from_run_config({"head-input": "cls"}).lora_settings().head_input == "cls"
    with pytest.raises(ConfigError, match="config 'head-input': must be one of"):
        RunSettings.from_run_config({"head-input": "mean"})
