"""FFA-LoRA: A stays at the shared seeded initialisation on every site and round,
only B and the head travel, and the global update equals the average of the sites'
delta-W = B A exactly; with `ffa-head-rank` the head is B_h A_h too, and only B_h travels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.common import Message, bytes_to_ndarray
from safetensors.numpy import load_file
from support.run_configs import sentiment_config
from support.site_hooks import AuditUpdates, client_app_with
from support.wire import observe_messages

from fedtune.cli.simulation import run_simulation
from fedtune.config import default_run_config


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("head_rank", [0, 3])
def test_ffa_lora_shares_a_sends_b_and_averages_delta_w_exactly(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_bert_dir: Path,
    sentiment_data: dict[str, Path],
    head_rank: int,
) -> None:
    audit = tmp_path / "audit"
    shapes: list[list[tuple[int, ...]]] = []

    def observe(direction: str, msg: Message) -> None:
        if msg.has_content() and msg.metadata.message_type == "train":
            shapes.append(
                [
                    tuple(bytes_to_ndarray(a.data).shape)
                    for rec in msg.content.array_records.values()
                    for a in rec.values()
                ]
            )

    config = {
        **default_run_config(),
        **sentiment_config(tiny_bert_dir, sentiment_data),
        "central-eval-path": "",
        "partitioning": "iid",
        "num-rounds": 2,
        "local-steps": 4,
        "batch-size": 16,
        "learning-rate": 0.05,
        "ffa-lora": True,
        "ffa-head-rank": head_rank,
        "output-dir": str(tmp_path / "runs"),
        "run-name": "ffa",
        "secagg": False,
    }  # plain FedAvg: the wire shapes and the exact mean are visible
    observe_messages(monkeypatch, observe)
    run_simulation(config, num_sites=2, client_app=client_app_with(inner=[AuditUpdates(str(audit))]))
    run_dir = tmp_path / "runs" / "ffa"
    info = json.loads((run_dir / "run.json").read_text())["adapter"]
    wire_keys = info["keys"]
    assert info["ffa_lora"] and wire_keys and not any(".lora_A." in k for k in wire_keys)
    assert any(".lora_B." in k for k in wire_keys) and any("classifier" in k for k in wire_keys)
    head_keys = [k for k in wire_keys if "classifier" in k]
    if head_rank:  # the low-rank head sends its B_h (labels x rank) and nothing else
        assert head_keys == ["base_model.model.classifier.lora_B.weight"]
    else:  # the full head (weight and bias) travels
        assert head_keys == ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]

    report = (run_dir / "report.md").read_text()
    assert "FFA-LoRA: no A matrix travelled" in report and ((f"B_h (rank {head_rank})" in report) == bool(head_rank))

    # Only B and the head travelled, both ways, every round.
    round0 = load_file(str(run_dir / "round-000" / "adapter_model.safetensors"))
    wire_shapes = sorted(tuple(round0[k].shape) for k in wire_keys)
    assert len(shapes) == 2 * 2 * 2 and all(sorted(s) == wire_shapes for s in shapes)

    # A is identical on every site, in every round, and in every saved global adapter.
    a_keys = sorted(k for k in round0 if ".lora_A." in k)
    all_keys = sorted(round0)
    for path in sorted(audit.glob("*.npz")):
        data = np.load(path)
        full = {k: data[f"full{i:04d}"] for i, k in enumerate(all_keys)}
        for k in a_keys:
            assert np.array_equal(full[k], round0[k]), (path.name, k)
    for rnd in ("round-001", "round-002", "final"):
        saved = load_file(str(run_dir / rnd / "adapter_model.safetensors"))
        assert all(np.array_equal(saved[k], round0[k]) for k in a_keys)

    # The aggregate is exactly the example-weighted average of the sites' delta-W = B A.
    for rnd in (1, 2):
        sites = [np.load(p) for p in sorted(audit.glob(f"*-round{rnd:03d}.npz"))]
        weights = np.array([int(s["num_examples"]) for s in sites], dtype=np.float64)
        weights /= weights.sum()
        glob = load_file(str(run_dir / f"round-{rnd:03d}" / "adapter_model.safetensors"))
        for a_key in a_keys:
            b_key = a_key.replace(".lora_A.", ".lora_B.")
            a = round0[a_key].astype(np.float64)
            b_index = wire_keys.index(b_key)
            site_dw = sum(w * (s[f"a{b_index:04d}"].astype(np.float64) @ a) for w, s in zip(weights, sites))
            global_dw = glob[b_key].astype(np.float64) @ a
            assert np.abs(global_dw - site_dw).max() <= 1e-6 * max(1.0, np.abs(site_dw).max())

    if head_rank:
        # The saved adapter reloads on a zeroed head: merged, the head is exactly s B_h A_h.
        from fedtune.adapter_io import load_adapter_model
        from fedtune.model import low_rank_head_alpha

        final = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
        head_a, head_b = (final[f"base_model.model.classifier.lora_{x}.weight"].astype(np.float64) for x in "AB")
        assert head_b.shape == (2, head_rank) and np.abs(head_b).max() > 0
        merged = load_adapter_model(run_dir / "final").merge_and_unload()
        scale = low_rank_head_alpha(head_a.shape[1]) / head_rank
        assert np.allclose(merged.classifier.weight.detach().numpy(), scale * head_b @ head_a, atol=1e-6)
        assert not merged.classifier.bias.detach().numpy().any()
