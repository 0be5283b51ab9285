"""The release gate at the sites (`fedtune gate`), in a real Flower simulation under
SecAgg+ with the registry on loopback (real gRPC, TLS): a good candidate is scored by
every site on the device runtime, promoted, and a device pulls it, its release record
naming the gate; a bad one (the untrained round-0 model) fails in one line and devices
keep the release they have; no site's example crosses the wire; the site refuses a gate
request that is not two registry names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from flwr.common import Message
from support.registry_server import TOKEN, Registry, make_pki
from support.run_configs import sentiment_config
from support.wire import observe_messages

from fedtune.cli import main as cli_main
from fedtune.edge_device.bundle import sha256_bytes
from fedtune.edge_device.pull import active_version, pull
from fedtune.edge_device.release import read_release
from fedtune.edge_device.signature import load_public_key
from fedtune.edge_export.exporter import export_bundle
from fedtune.errors import FedtuneError
from fedtune.gate_counts import read_vector, score_vector
from fedtune.gate_request import GateRequest


@pytest.fixture()
def registry(tmp_path: Path, keys: dict[str, Path]) -> Iterator[Registry]:
    reg = Registry(tmp_path, make_pki(tmp_path / "pki"), keys)
    yield reg
    reg.server.stop(grace=None).wait()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_good_candidate_is_promoted_and_a_bad_one_is_not(
    tmp_path: Path,
    registry: Registry,
    bert_bundle: tuple[Path, Path, dict],
    keys: dict[str, Path],
    sentiment_data: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    federate,
    tiny_bert_dir: Path,
) -> None:
    trained, bundle, _ = bert_bundle
    run = tmp_path / "runs" / trained.name
    shutil.copytree(trained, run)
    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "ca.pem").write_bytes(registry.pki["ca"])
    wire: list[bytes] = []

    def observe(direction: str, msg: Message) -> None:
        if msg.has_content():
            wire.append(repr(msg.content).encode())

    observe_messages(monkeypatch, observe)

    def gate(candidate: Path, version: str, *extra: str) -> int:
        args = [
            "gate", str(run), "--bundle", str(candidate), "--model", "sentiment", "--version", version,
            "--key", str(keys["private"]), "--registry", registry.address, "--registry-ca", str(tmp_path / "ca.pem"),
            "--token-file", str(tmp_path / "token"), "--trust-key", str(keys["public"]), "--sites", "2", *extra,
        ]  # fmt: skip
        return cli_main(args)

    assert gate(bundle, "v1", "--max-drop-pt", "5") == 0
    outcome = json.loads((run / "gate.json").read_text())
    assert outcome["passed"] and outcome["secagg"] and outcome["examples"] > 0
    assert sorted(outcome["sites"]) == ["site-0", "site-1"]
    assert outcome["federation"]["agreement"] > 0.9
    assert "## Release gate: sentiment v1" in (run / "report.md").read_text()
    device = tmp_path / "device"
    got = pull(registry.address, "sentiment", keys["public"], device, ca=registry.pki["ca"])
    record = read_release(
        got.path, load_public_key(keys["public"]), sha256_bytes((got.path / "manifest.json").read_bytes())
    )
    assert got.version == "v1" and record.channel == "release" and record.gate.startswith("passed: ")

    # A candidate that learnt the opposite (a run on the same texts with every label flipped).
    flip = {"pos": "neg", "neg": "pos"}
    rows = [json.loads(line) for line in sentiment_data["train"].read_text().splitlines()]
    flipped = tmp_path / "flipped.jsonl"
    flipped.write_text("".join(json.dumps({**r, "label": flip[r["label"]]}) + "\n" for r in rows))
    other = federate(
        tmp_path / "other", "flipped", {**sentiment_config(tiny_bert_dir, sentiment_data), "data-path": str(flipped)}
    )
    export_bundle(other, tmp_path / "bad", keys["private"], max_accuracy_drop_pt=100.0)
    capsys.readouterr()
    assert gate(tmp_path / "bad", "v2", "--max-drop-pt", "5") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after Ray's own lines
    assert err.startswith("fedtune: error: gate: candidate sentiment v2 not promoted: failed: federation accuracy drop")
    assert not json.loads((run / "gate.json").read_text())["passed"]
    again = pull(registry.address, "sentiment", keys["public"], device, ca=registry.pki["ca"])
    assert again.version == "v1" and active_version(device) == "v1"  # devices keep the release they have

    # No example crossed the wire, in either gate round.
    texts = [json.loads(line)["text"] for line in sentiment_data["train"].read_text().splitlines()]
    sent = b"".join(wire)
    assert len(wire) > 10 and not any(f"'{t}'".encode() in sent or f'"{t}"'.encode() in sent for t in texts)


def test_the_site_reads_a_gate_request_as_registry_names_only() -> None:
    assert GateRequest.from_config({}) is None
    assert GateRequest.from_config({"fedtune-gate": '{"model": "m", "version": "v1"}'}) == GateRequest("m", "v1")
    update = GateRequest("m", "v2", base_version="v1")
    assert GateRequest.from_config({"fedtune-gate": update.to_config()}) == update
    for bad in (
        '{"model": "../etc", "version": "v"}',
        '{"model": "m"}',
        "not json",
        "[1, 2]",
        '{"model": "a/b", "version": "v"}',
        '{"model": "", "version": "v"}',
        '{"model": "m", "version": "v2", "base_version": "../v1"}',
        '{"model": "m", "version": "v2", "base_version": "v2"}',
        '{"model": "m", "version": "v2", "base_version": "' + "v" * 2000 + '"}',
    ):
        with pytest.raises(FedtuneError, match="gate request refused"):
            GateRequest.from_config({"fedtune-gate": bad})


def test_score_vectors_average_to_the_federation_totals() -> None:
    """The n-weighted mean of two sites' vectors reads as the pooled examples' scores."""
    rng = np.random.default_rng(0)
    gold = [rng.integers(0, 3, n) for n in (40, 90)]
    torch_pred = [np.where(rng.random(len(g)) < 0.8, g, rng.integers(0, 3, len(g))) for g in gold]
    device_pred = [np.where(rng.random(len(g)) < 0.9, t, rng.integers(0, 3, len(g))) for t, g in zip(torch_pred, gold)]
    vectors = [score_vector(g, t, d, 3) for g, t, d in zip(gold, torch_pred, device_pred)]
    mean = (40 * vectors[0].astype(np.float64) + 90 * vectors[1]) / 130
    pooled = read_vector(
        score_vector(np.concatenate(gold), np.concatenate(torch_pred), np.concatenate(device_pred), 3), 3
    )
    got = read_vector(mean, 3)
    for key, value in pooled.to_json().items():
        assert abs(got.to_json()[key] - value) < 1e-5, key


def test_a_causal_lm_vector_reads_as_exact_match_and_agreement() -> None:
    from fedtune.gate_counts import completion_vector

    a = completion_vector(np.array([1, 1, 0, 1]), np.array([1, 0, 0, 1]), np.array([1, 0, 1, 1]))
    b = completion_vector(np.array([0, 1]), np.array([0, 1]), np.array([1, 1]))
    got = read_vector((4 * a.astype(np.float64) + 2 * b) / 6, 0)  # the n-weighted mean SecAgg+ delivers
    assert got.accuracy_torch == pytest.approx(4 / 6) and got.accuracy_device == pytest.approx(3 / 6)
    assert got.agreement == pytest.approx(5 / 6) and got.drop_pt == pytest.approx(100 / 6)
    assert got.macro_f1_torch is None and "macro_f1_torch" not in got.to_json()
    with pytest.raises(ValueError, match="has 3 values"):
        read_vector(np.zeros(5), 0)
