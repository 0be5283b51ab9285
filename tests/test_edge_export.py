"""Edge export end to end on a tiny classifier: a real federation's final adapter is
merged, exported with optimum, quantised to INT8, gated on parity, signed, and run by the
torch-free device runtime, which refuses altered or foreign-signed bundles. (Causal LMs
go to INT4 with onnxruntime-genai: test_edge_llm.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import tomllib

from fedtune.edge_device.bundle import MANIFEST_FILE, BundleError
from fedtune.edge_device.runtime import EdgeModel
from fedtune.edge_export.exporter import ExportGateError, export_bundle

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bert_bundle_int8_parity_manifest_and_prediction(
    bert_bundle: tuple[Path, Path, dict], keys: dict[str, Path], sentiment_data: dict[str, Path]
) -> None:
    run_dir, bundle, manifest = bert_bundle
    run = json.loads((run_dir / "run.json").read_text())
    # Provenance, privacy and quantisation are in the signed manifest.
    assert manifest["task"] == "seq-cls" and manifest["labels"] == run["labels"]
    assert len(manifest["base_model"]["sha256"]) == 64 and len(manifest["adapter"]["sha256"]) == 64
    fed = manifest["federation"]
    assert fed["rounds"] == 1 and fed["sites"] == 2 and fed["secagg"]["enabled"] is True
    summary = json.loads((run_dir / "summary.json").read_text())
    assert fed["dp"]["enabled"] is False and fed["final_metrics"]["central"] == summary["central"]
    assert 0.0 <= summary["central"]["accuracy"] <= 1.0
    assert manifest["quantization"]["weight_type"] == "QInt8" and manifest["quantization"]["opset"] >= 11
    assert set(manifest["files"]) == {
        "model.onnx",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    gate = manifest["parity"]
    assert gate["examples"] > 0 and 0.0 <= gate["top1_agreement"] <= 1.0 and gate["max_abs_logit_delta"] < 1.0
    assert gate["accuracy_drop_pt"] == pytest.approx(100 * (gate["torch_accuracy"] - gate["onnx_accuracy"]))
    # The INT8 graph really is quantised and smaller than the fp32 weights.

    graph = onnx.load(str(bundle / "model.onnx")).graph
    assert any(n.op_type in ("DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul") for n in graph.node)
    # Fused before quantising: attention runs as one INT8 QAttention kernel per layer.
    assert manifest["quantization"]["fusion"] == "onnxruntime.transformers bert"
    attention = [n for n in graph.node if n.op_type == "QAttention"]
    assert attention and manifest["quantization"]["fused_ops"].get("Attention") == len(attention)
    # The device runtime verifies, loads and predicts a label from the set.
    model = EdgeModel.load(bundle, keys["public"], threads=1)
    preds = model.classify(["good great", "awful terrible"])
    assert all(p.label in manifest["labels"] for p in preds)
    assert all(abs(sum(p.probabilities.values()) - 1.0) < 1e-5 for p in preds)
    # The CLI prints the label in one line.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedtune.cli",
            "edge",
            "predict",
            str(bundle),
            "good great",
            "--trust-key",
            str(keys["public"]),
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["label"] in manifest["labels"]


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.timeout(900)
def test_runtime_refuses_altered_or_foreign_bundles(
    bert_bundle: tuple[Path, Path, dict], keys: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    _, bundle, _ = bert_bundle
    cases = {}
    for name in ("model", "manifest", "foreign"):
        copy = tmp_path / name
        shutil.copytree(bundle, copy)
        cases[name] = copy
    _flip_byte(cases["model"] / "model.onnx", (cases["model"] / "model.onnx").stat().st_size // 2)
    _flip_byte(cases["manifest"] / MANIFEST_FILE, 40)
    # Re-sign the untouched manifest with another key: valid signature, untrusted signer.
    from fedtune.edge_export.signing import load_private_key, sign

    raw = (cases["foreign"] / MANIFEST_FILE).read_bytes()
    (cases["foreign"] / "manifest.sig").write_bytes(sign(load_private_key(keys["other_private"]), raw))

    with pytest.raises(BundleError, match="sha256 does not match"):
        EdgeModel.load(cases["model"], keys["public"])
    with pytest.raises(BundleError, match="signature does not verify"):
        EdgeModel.load(cases["manifest"], keys["public"])
    with pytest.raises(BundleError, match="signature does not verify"):
        EdgeModel.load(cases["foreign"], keys["public"])
    # ...while the intruder's own key accepts its bundle: the check is the key, not the format.
    assert EdgeModel.load(cases["foreign"], keys["other_public"]).task == "seq-cls"
    # The CLI: one line, exit 1, no traceback.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedtune.cli",
            "edge",
            "predict",
            str(cases["model"]),
            "good",
            "--trust-key",
            str(keys["public"]),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "model.onnx" in out.stderr


@pytest.mark.timeout(900)
def test_runtime_imports_no_torch(bert_bundle: tuple[Path, Path, dict], keys: dict[str, Path]) -> None:
    """In a fresh interpreter where importing torch or transformers fails outright, the
    runtime still verifies, loads and predicts, and neither module is loaded."""
    _, bundle, _ = bert_bundle
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'peft', 'optimum', 'flwr', 'onnx'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from fedtune.cli import main
import fedtune.edge_device.pull  # the device's registry client too
rc = main(['edge', 'predict', {str(bundle)!r}, 'good great', '--trust-key', {str(keys["public"])!r}])
assert rc == 0
loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft', 'optimum', 'flwr', 'onnx'))
assert not loaded, loaded
print('OK no torch')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OK no torch" in out.stdout


def test_edge_extra_holds_only_the_runtime() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {
        d.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("~")[0].strip().lower()
        for d in project["dependencies"] + project["optional-dependencies"]["edge"]
    }
    # numpy + onnxruntime + tokenizers run classifiers, onnxruntime-genai runs LLMs,
    # cryptography checks signatures, grpcio + protobuf pull bundles from the registry.
    assert names == {"numpy", "onnxruntime", "onnxruntime-genai", "tokenizers", "cryptography", "grpcio", "protobuf"}


@pytest.mark.timeout(900)
def test_parity_gate_refuses_and_writes_nothing_unless_forced(
    bert_bundle: tuple[Path, Path, dict], keys: dict[str, Path], tmp_path: Path
) -> None:
    run_dir, _, _ = bert_bundle
    out = tmp_path / "exports" / "gated"
    with pytest.raises(ExportGateError, match="nothing written"):
        export_bundle(run_dir, out, keys["private"], max_accuracy_drop_pt=-101.0, limit=16)
    assert not out.exists() and list((tmp_path / "exports").iterdir()) == []  # no temp folders left
    manifest = export_bundle(run_dir, out, keys["private"], max_accuracy_drop_pt=-101.0, limit=16, force=True)
    assert manifest["parity"]["forced"] is True and (out / "manifest.sig").exists()
    # An existing bundle is never overwritten.
    before = (out / "model.onnx").read_bytes()
    with pytest.raises(Exception, match="already exists"):
        export_bundle(run_dir, out, keys["private"], limit=16)
    assert (out / "model.onnx").read_bytes() == before


def test_length_buckets_cover_every_text_once_within_the_token_budget() -> None:
    from fedtune.length_buckets import length_buckets

    lengths = [5, 40, 7, 300, 12, 6, 9, 40, 3, 18]
    groups = length_buckets(lengths, max_tokens=64)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        assert len(group) == 1 or len(group) * max(lengths[i] for i in group) <= 64
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(lengths)  # shortest first, so neighbours share a padded width
    assert any(g == [lengths.index(300)] for g in groups)  # over budget: alone


def test_bucketed_batch_matches_each_text_alone(bert_bundle: tuple[Path, Path, dict], keys: dict[str, Path]) -> None:
    _, bundle, _ = bert_bundle
    texts = ["good", "awful terrible service " * 6, "great", "bad bad " * 10, "fine thanks"]
    model = EdgeModel.load(bundle, keys["public"], threads=1)
    model.batch_tokens = 16  # force several buckets for these five texts
    batched = model.logits(texts)
    alone = np.concatenate([model.logits([t]) for t in texts])
    assert batched.shape == (len(texts), len(model.labels))
    # Same rows in the caller's order (INT8 activations are quantised per batch, hence the tolerance).
    np.testing.assert_allclose(batched, alone, atol=0.05)
    assert (batched.argmax(1) == alone.argmax(1)).all()
