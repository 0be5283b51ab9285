"""2 sites x 2 rounds of real Flower simulation (Ray), real peft and torch, for a tiny
BERT (seq-cls) and a tiny Llama (causal-lm): the global adapter changes, the loss
falls, only adapter tensors travel, and saved rounds reload with identical logits."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.common import Message, bytes_to_ndarray
from safetensors.numpy import load_file
from support.wire import observe_messages

from fedtune.adapter_io import load_adapter_model, read_metadata
from fedtune.cli.simulation import run_simulation
from fedtune.config import default_run_config


def _run(tmp_path: Path, overrides: dict[str, Any]) -> tuple[Path, list[tuple[str, str, list[tuple[int, ...]]]]]:
    seen: list[tuple[str, str, list[tuple[int, ...]]]] = []

    def observe(direction: str, msg: Message) -> None:
        if msg.has_content():
            # Legacy fit/evaluate records carry each tensor as serialized numpy bytes.
            shapes = [
                tuple(bytes_to_ndarray(a.data).shape) if a.stype == "numpy.ndarray" else tuple(a.shape)
                for rec in msg.content.array_records.values()
                for a in rec.values()
            ]
            seen.append((direction, msg.metadata.message_type, shapes))

    config = {
        **default_run_config(),
        "output-dir": str(tmp_path / "runs"),
        "run-name": "t",
        "secagg": False,
        "num-rounds": 2,
        "local-steps": 16,
        "batch-size": 16,
        "learning-rate": 0.05,
        "warmup-fraction": 0.0,
        "lr-schedule": "constant",
        "val-fraction": 0.2,
        "central-eval-every": 1,
        **overrides,
    }
    with pytest.MonkeyPatch.context() as monkeypatch:
        observe_messages(monkeypatch, observe)
        before = _ray_pids()
        run_simulation(config, num_sites=2)
    _assert_ray_stopped(before)
    return tmp_path / "runs" / "t", seen


def _ray_pids() -> set[int]:
    """raylet / GCS processes of Ray sessions this process started: Ray names a session
    directory after the starting driver's PID (…/session_<date>_<n>_<pid>/), so another
    job's Ray cluster on the same machine is not counted."""
    out = subprocess.run(["pgrep", "-fa", "raylet|gcs_server"], capture_output=True, text=True).stdout
    mine = f"_{os.getpid()}/"
    return {int(line.split()[0]) for line in out.splitlines() if mine in line}


def _assert_ray_stopped(before: set[int]) -> None:
    """The Simulation Engine shut Ray down: no raylet or GCS process it started is left."""
    import ray

    assert not ray.is_initialized()
    for _ in range(50):
        left = _ray_pids() - before
        if not left:
            break
        time.sleep(0.2)
    assert not left, f"Ray processes left behind: {sorted(left)}"


def _check_common(run_dir: Path, seen: list[tuple[str, str, list[tuple[int, ...]]]]) -> list[dict[str, Any]]:
    run_info = json.loads((run_dir / "run.json").read_text())
    adapter_keys = run_info["adapter"]["keys"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert all(len(r["sites"]) == 2 and r["failures"] == 0 for r in records)

    # The global adapter changed: every tensor differs between round 0 and the final adapter.
    start = load_file(str(run_dir / "round-000" / "adapter_model.safetensors"))
    final = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    assert set(start) == set(final) and len(start) == len(adapter_keys)
    assert all(not np.array_equal(start[k], final[k]) for k in start)
    round2 = load_file(str(run_dir / "round-002" / "adapter_model.safetensors"))
    assert all(np.array_equal(final[k], round2[k]) for k in final)

    # Only adapter tensors travelled, in both directions, in every train/evaluate message.
    adapter_shapes = Counter(tuple(a.shape) for a in start.values())
    train_msgs = [s for s in seen if s[1] == "train"]
    assert len(train_msgs) == 2 * 2 * 2  # 2 rounds x 2 sites x (down + up)
    for direction, kind, shapes in seen:
        if direction == "up" and kind == "evaluate":
            assert shapes == []  # evaluation replies carry metrics only
        else:
            assert Counter(shapes) == adapter_shapes
    num_params = run_info["adapter"]["num_params"]
    assert num_params == sum(int(np.prod(s)) for s in adapter_shapes.elements())
    assert num_params < 0.2 * run_info["adapter"]["model_params"]
    for rec in records:
        for site in rec["sites"].values():
            # Wire bytes: the fp32 adapter plus a little framing, nothing model-sized.
            assert 4 * num_params <= site["train_bytes_up"] < 4 * num_params * 1.05 + 4096
            assert site["bytes_down"] > 0
    assert (run_dir / "report.md").is_file() and (run_dir / "loss.png").stat().st_size > 1000
    return records


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tiny_bert_seq_cls_federation(tmp_path: Path, tiny_bert_dir: Path, sentiment_data: dict[str, Path]) -> None:
    run_dir, seen = _run(
        tmp_path,
        {
            "model": str(tiny_bert_dir),
            "task": "seq-cls",
            "data-path": str(sentiment_data["train"]),
            "labels-file": str(sentiment_data["labels"]),
            "central-eval-path": str(sentiment_data["test"]),
            "partitioning": "dirichlet",
            "dirichlet-alpha": 1.0,
        },
    )
    records = _check_common(run_dir, seen)
    # The loss fell: held-out loss after round 2 below round 1, and site training loss fell.
    assert records[1]["central"]["loss"] < records[0]["central"]["loss"]
    assert records[1]["aggregate"]["train_loss_last"] < records[0]["aggregate"]["train_loss_first"]
    assert {"val_accuracy", "val_precision", "val_recall", "val_macro_f1"} <= set(records[0]["aggregate"])
    assert (run_dir / "accuracy.png").is_file()
    meta = read_metadata(run_dir / "final")
    assert meta["labels"] == ["pos", "neg"] and meta["task"] == "seq-cls"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tiny_llama_causal_lm_federation(
    tmp_path: Path, tiny_llama_dir: Path, completion_data: dict[str, Path]
) -> None:
    run_dir, seen = _run(
        tmp_path,
        {
            "model": str(tiny_llama_dir),
            "task": "causal-lm",
            "data-path": str(completion_data["train"]),
            "central-eval-path": str(completion_data["test"]),
            "partitioning": "iid",
            "labels-file": "",
        },
    )
    records = _check_common(run_dir, seen)
    assert records[1]["central"]["loss"] < records[0]["central"]["loss"]
    assert records[1]["aggregate"]["val_perplexity"] < records[0]["aggregate"]["val_perplexity"]
    assert records[1]["aggregate"]["train_loss_last"] < records[0]["aggregate"]["train_loss_first"]
    keys = json.loads((run_dir / "run.json").read_text())["adapter"]["keys"]
    assert all("lora_" in k for k in keys) and any("q_proj" in k for k in keys)


@pytest.mark.timeout(600)
def test_saved_round_adapter_reloads_with_identical_logits(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """A checkpoint written by the server's writer reloads via PeftModel.from_pretrained
    and reproduces the in-memory model's logits exactly."""
    from fedtune.adapter_io import get_adapter_arrays, set_adapter_arrays
    from fedtune.model import LoraSettings, build_lora_model, load_tokenizer
    from fedtune.server.run_dir import RunDir

    model = build_lora_model(str(tiny_bert_dir), "seq-cls", LoraSettings(), ["pos", "neg"], seed=3)
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=a.shape).astype(np.float32) for a in get_adapter_arrays(model)]
    run_dir = RunDir(tmp_path).create()
    meta = {"base_model": str(tiny_bert_dir), "task": "seq-cls", "labels": ["pos", "neg"]}
    run_dir.save_adapter(model, arrays, run_dir.round_dir(1), meta)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in run_dir.round_dir(1).iterdir()}

    reloaded = load_adapter_model(run_dir.round_dir(1))
    tok = load_tokenizer(str(tiny_bert_dir))
    batch = tok(["it was good today", "awful with my card again"], return_tensors="pt", padding=True)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        got = reloaded(**batch).logits
    assert torch.equal(expected, got)
    set_adapter_arrays(model, get_adapter_arrays(reloaded))
    assert all(np.array_equal(a, b) for a, b in zip(get_adapter_arrays(model), arrays))
