"""The causal LM on the device: INT4 bundles built by onnxruntime-genai's builder from a
short real SmolLM2 federation, the torch-free runtime (streaming, chat prompt, context
limit), adapter-only updates over the registry on loopback (answers change to the
fine-tuned ones; rollback restores the old), and bad adapters and bundles refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
from support.registry_server import TOKEN, Registry, make_pki

from fedtune.cli import main as cli_main
from fedtune.cli.simulation import run_simulation
from fedtune.config import default_run_config
from fedtune.metrics import exact_match, normalize_answer

CHAT_DATA = Path(__file__).resolve().parent.parent / "data" / "banking77-chat"
PROMPTS = [
    "I still have not received my new card, when will it arrive?",
    "My card payment was declined at the shop, why?",
    "How do I top up my account with a bank transfer?",
    "I want to change my PIN",
    "naïve café — déjà vu 🙂, where is my card?",
]


def _subset(tmp: Path, intents: int = 4, per_intent: int = 16, test_per_intent: int = 2) -> dict[str, Path]:
    out = {}
    for split, each in (("train", per_intent), ("test", test_per_intent)):
        rows = [json.loads(line) for line in (CHAT_DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
        wanted = sorted({r["completion"] for r in rows})[:intents]
        picked = [r for w in wanted for r in [x for x in rows if x["completion"] == w][:each]]
        out[split] = tmp / f"{split}.jsonl"
        out[split].write_text("".join(json.dumps(r) + "\n" for r in picked), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def llm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One round, two sites, four intents: enough steps at a high learning rate that the
    adapter turns SmolLM2's chatty answers into intent names (exact match 0.75 on the held-out
    pairs when tried; with 10 steps on q/v of 2 blocks it stayed chatty, at 0.0). The sites
    hold the base in bf16 (`base-dtype`): every export below merges onto the fp32 base."""
    tmp = tmp_path_factory.mktemp("edge-llm-run")
    data = _subset(tmp)
    config = {
        **default_run_config(),
        "task": "causal-lm",
        "model": "default",
        "data-path": str(data["train"]),
        "central-eval-path": str(data["test"]),
        "output-dir": str(tmp / "runs"),
        "run-name": "edge-llm",
        "num-rounds": 1,
        "local-steps": 15,
        "batch-size": 8,
        "learning-rate": 1e-2,
        "max-length": 128,
        "lora-target-modules": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "system-prompt": "Name the banking intent.",
        "lora-top-layers": 4,
        "eval-max-new-tokens": 8,
        "eval-max-examples": 8,
        "val-fraction": 0.1,
        "secagg": False,
        "base-dtype": "bf16",
    }
    run_simulation(config, num_sites=2)
    return tmp / "runs" / "edge-llm"


@pytest.fixture(scope="module")
def base_bundle(llm_run: Path, keys: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Adapter-ready INT4 base carrying round 0's adapter (LoRA B = 0: the base model's answers)."""
    from fedtune.edge_export.exporter import export_bundle

    out = tmp_path_factory.mktemp("edge-llm-bundles") / "base"
    # force: INT4 flips some answers of this small model (the gate's refusal is tested below)
    export_bundle(llm_run, out, keys["private"], adapter_ready=True, checkpoint="round-000", limit=4, force=True)
    return out


@pytest.fixture(scope="module")
def update(llm_run: Path, base_bundle: Path, keys: dict[str, Path]) -> Path:
    """The run's final adapter as an adapter-only update for `base_bundle`."""
    from fedtune.edge_export.llm_export import export_adapter_update

    out = base_bundle.parent / "update"
    export_adapter_update(llm_run, base_bundle, out, keys["private"], limit=4, force=True)
    return out


def _held_out_pairs(run_dir: Path, field: str) -> list[str]:
    path = run_dir.parent.parent / "test.jsonl"
    return [json.loads(line)[field] for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def held_out(llm_run: Path) -> list[str]:
    """The run's held-out prompts (two per trained intent)."""
    return _held_out_pairs(llm_run, "prompt")


@pytest.fixture(scope="module")
def torch_answers(llm_run: Path, held_out: list[str], tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The merged final model's greedy answers in PyTorch fp32: what the update must bring."""
    from fedtune.edge_export.merge import merge_adapter
    from fedtune.encoding import CompletionEncoder
    from fedtune.generation import greedy_completions

    model, tokenizer = merge_adapter(llm_run / "final", tmp_path_factory.mktemp("merged"))
    encoder = CompletionEncoder(tokenizer, [], 128, "Name the banking intent.")
    return greedy_completions(model, tokenizer, [encoder.prompt_ids(p) for p in held_out], 8)


def _answers(folder: Path, key: Path, prompts: list[str]) -> list[str]:
    from fedtune.edge_device.generative import GenerationOptions, GenerativeModel

    with GenerativeModel(folder, key) as model:
        return [model.generate(p, GenerationOptions(max_new_tokens=8)).strip() for p in prompts]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedtune.cli", *args], capture_output=True, text=True, timeout=300)


def _one_line_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert expected in lines[0], lines[0]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_merged_int4_bundle_is_small_signed_gated_and_lists_every_file(
    llm_run: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    import onnx

    from fedtune.edge_device.generative import GenerativeModel
    from fedtune.edge_export.exporter import export_bundle
    from fedtune.edge_export.int4_build import Int4Options

    manifest = export_bundle(
        llm_run, tmp_path / "bundle", keys["private"], limit=4, force=True, int4=Int4Options(int8_last_layers=2)
    )
    quant, gate = manifest["quantization"], manifest["parity"]
    assert quant["precision"] == "int4" and quant["layout"] == "merged" and quant["builder_version"] == "0.11.4"
    assert {"algo", "block_size", "accuracy_level", "symmetric", "shared_embeddings"} <= set(quant)
    assert quant["int8_last_layers"] == 2 and list(quant["int8_projections"]) == ["gate_proj", "up_proj"]  # the default
    graph = onnx.load(str(tmp_path / "bundle" / "model.onnx"), load_external_data=False).graph
    bits = {
        n.name: next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"
    }
    assert all(bits[f"/model/layers.{i}/mlp/{p}_proj/MatMul_Q8"] == 8 for i in range(30) for p in ("gate", "up"))
    assert all(bits[f"/model/layers.{i}/attn/o_proj/MatMul_Q8"] == 8 for i in (28, 29))  # SmolLM2: 30 blocks
    assert all(bits[f"/model/layers.{i}/attn/o_proj/MatMul_Q4"] == 4 for i in range(28))  # below: 4 bits,
    assert bits["/model/layers.4/attn/qkv_proj/MatMul_Q4"] == 4  # and k_quant_mixed's own table for the rest
    on_disk = {p.name for p in (tmp_path / "bundle").iterdir()} - {"manifest.json", "manifest.sig"}
    assert set(manifest["files"]) == on_disk and "model.onnx.data" in on_disk and "genai_config.json" in on_disk
    merged_fp32 = 134_515_008 * 4  # SmolLM2-135M's parameters in fp32
    assert sum(e["bytes"] for e in manifest["files"].values()) < 0.35 * merged_fp32
    assert gate["examples"] == 4 and gate["prompt_token_mismatches"] == 0  # the device tokenises like the sites
    assert gate["accuracy_drop_pt"] == pytest.approx(100 * (gate["torch_exact_match"] - gate["device_exact_match"]))
    assert gate["forced"] == (gate["accuracy_drop_pt"] > 1.0) and 0.0 <= gate["completion_agreement"] <= 1.0
    assert manifest["runtime"]["engine"] == "onnxruntime-genai"
    # trained on a bf16 base, merged onto and gated against the fp32 one, and the bundle says so
    assert (
        gate["reference"] == "PyTorch fp32 (adapter merged into the fp32 base; the sites trained with base-dtype bf16)"
    )
    assert manifest["adapter"]["trained_on"] == {"base-dtype": "bf16", "quantize-base": "none"}
    with GenerativeModel(tmp_path / "bundle", keys["public"]) as model:
        assert model.adapters is None and isinstance(model.generate(PROMPTS[0]), str)

    # The release gate on this bundle: both simulated sites generate with it on onnxruntime-genai
    # and with the final round's PyTorch model on their own held-out pairs (exact match).
    registry = Registry(tmp_path / "registry", make_pki(tmp_path / "pki"), keys)
    try:
        run = tmp_path / "runs" / llm_run.name
        shutil.copytree(llm_run, run)
        (tmp_path / "token").write_text(TOKEN)
        (tmp_path / "ca.pem").write_bytes(registry.pki["ca"])
        code = cli_main(
            [
                "gate", str(run), "--bundle", str(tmp_path / "bundle"), "--model", "intents", "--version", "v1",
                "--key", str(keys["private"]), "--registry", registry.address, "--registry-ca", str(tmp_path / "ca.pem"),
                "--token-file", str(tmp_path / "token"), "--trust-key", str(keys["public"]), "--sites", "2",
                "--max-drop-pt", "100", "--site-max-drop-pt", "100",
            ]
        )  # fmt: skip
    finally:
        registry.server.stop(grace=None).wait()
    outcome = json.loads((run / "gate.json").read_text())
    assert code == 0 and outcome["passed"] and not outcome["secagg"], outcome
    federation = outcome["federation"]
    assert 0 < outcome["examples"] <= 16 and "macro_f1_torch" not in federation  # exact match, 8 pairs a site at most
    assert 0.0 <= federation["accuracy_device"] <= 1.0 and 0.0 <= federation["agreement"] <= 1.0
    assert sorted(outcome["sites"]) == ["site-0", "site-1"] and all("drop_pt" in e for e in outcome["sites"].values())
    assert "| federation |" in (run / "report.md").read_text() and "n/a" in (run / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_device_runtime_runs_without_torch_or_transformers(
    update: Path, base_bundle: Path, keys: dict[str, Path]
) -> None:
    script = f"""
import json, sys
for name in ("torch", "transformers", "peft", "flwr", "optimum", "onnx"):
    sys.modules[name] = None  # any import of them now fails
from fedtune.edge_device.generative import GenerationOptions, GenerativeModel
with GenerativeModel({str(update)!r}, {str(keys["public"])!r}, base={str(base_bundle)!r}, threads=2) as m:
    text = m.generate({PROMPTS[0]!r}, GenerationOptions(max_new_tokens=6))
print(json.dumps({{"text": text, "loaded": sorted(k for k in ("torch", "transformers", "peft", "flwr")
                                                  if sys.modules.get(k) is not None)}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["loaded"] == [] and out["text"].strip()


@pytest.mark.timeout(600)
def test_streaming_yields_the_same_text_as_one_shot_generation(update: Path, keys: dict[str, Path]) -> None:
    from fedtune.edge_device.generative import GenerationOptions, GenerativeModel

    with GenerativeModel(update, keys["public"]) as model:
        for prompt in PROMPTS:
            for options in (
                GenerationOptions(max_new_tokens=24),
                GenerationOptions(max_new_tokens=24, do_sample=True, temperature=0.9, top_p=0.9, top_k=20, seed=7),
            ):
                pieces = list(model.stream(prompt, options))
                assert "".join(pieces) == model.generate(prompt, options)
        greedy = GenerationOptions(max_new_tokens=24)
        assert len(list(model.stream("Tell me about my account.", greedy))) > 1  # tokens arrive one by one


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_adapter_update_over_the_registry_changes_answers_and_rollback_restores(
    llm_run: Path,
    base_bundle: Path,
    update: Path,
    held_out: list[str],
    torch_answers: list[str],
    keys: dict[str, Path],
    tmp_path: Path,
) -> None:
    from fedtune.edge_device.pull import active_version, pull, rollback

    reg = Registry(tmp_path, make_pki(tmp_path / "pki"), keys)
    try:
        device = tmp_path / "device"
        reg.publish(base_bundle, "banking-llm", "v1", 1)
        first = pull(reg.address, "banking-llm", keys["public"], device, ca=reg.pki["ca"])
        before = _answers(device / "current", keys["public"], held_out)

        reg.publish(update, "banking-llm", "v2", 2)
        second = pull(reg.address, "banking-llm", keys["public"], device, ca=reg.pki["ca"])
        assert second.version == "v2" and active_version(device) == "v2"
        assert second.downloaded_bytes < 0.05 * first.downloaded_bytes  # the update is the adapter alone
        after = _answers(device / "current", keys["public"], held_out)
        assert after != before  # the update changed what the device says ...
        # ... to the fine-tuned model's answers: INT4 vs fp32 of a one-round model still differ on a
        # few prompts (6 of 8 agreed when tried; fp32 itself said "apple pay pay pay or google pay")
        agree = sum(normalize_answer(a) == normalize_answer(t) for a, t in zip(after, torch_answers))
        assert agree >= 0.75 * len(held_out), (after, torch_answers)
        gold = _held_out_pairs(llm_run, "completion")
        assert exact_match(after, gold) >= exact_match(before, gold) + 0.5, (before, after, gold)

        assert rollback(device) == "v1"
        assert _answers(device / "current", keys["public"], held_out) == before
    finally:
        reg.server.stop(grace=None).wait()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_adapter_update_is_gated_on_the_release_devices_hold(
    llm_run: Path, base_bundle: Path, update: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    """The sites pull the released base, then the adapter-only candidate beside it, and score
    the pair on onnxruntime-genai; only then do devices get the few-MB update."""
    from fedtune.edge_device.pull import pull

    run = tmp_path / "runs" / llm_run.name
    shutil.copytree(llm_run, run)
    (tmp_path / "token").write_text(TOKEN)
    reg = Registry(tmp_path / "registry", make_pki(tmp_path / "pki"), keys)
    (tmp_path / "ca.pem").write_bytes(reg.pki["ca"])
    gate = [
        "gate", str(run), "--bundle", str(update), "--model", "intents", "--version", "v2",
        "--key", str(keys["private"]), "--registry", reg.address, "--registry-ca", str(tmp_path / "ca.pem"),
        "--token-file", str(tmp_path / "token"), "--trust-key", str(keys["public"]), "--sites", "2",
        "--max-drop-pt", "100", "--site-max-drop-pt", "100",
    ]  # fmt: skip
    try:
        # The update alone names no base to score it on: one line, before anything is published.
        _one_line_error(_cli(*gate), "is an adapter-only update: name the release it applies to with --base-version")
        _one_line_error(_cli(*gate, "--base-version", "v2"), "cannot be its own base")
        reg.publish(base_bundle, "intents", "v1", 1)
        device = tmp_path / "device"
        assert pull(reg.address, "intents", keys["public"], device, ca=reg.pki["ca"]).version == "v1"
        assert cli_main([*gate, "--base-version", "v1"]) == 0
        got = pull(reg.address, "intents", keys["public"], device, ca=reg.pki["ca"])
    finally:
        reg.server.stop(grace=None).wait()
    outcome = json.loads((run / "gate.json").read_text())
    assert outcome["passed"] and sorted(outcome["sites"]) == ["site-0", "site-1"], outcome
    assert 0 < outcome["examples"] <= 16 and 0.0 <= outcome["federation"]["agreement"] <= 1.0
    # The sites' pulls went to temporary folders, gone after the round.
    assert [p.name for p in (run / "gate" / "sites").rglob("candidate-*")] == []
    assert got.version == "v2" and json.loads((got.path / "manifest.json").read_text())["kind"] == "adapter"
    assert got.downloaded_bytes < 0.05 * sum(f.stat().st_size for f in base_bundle.rglob("*") if f.is_file())


def _resign(folder: Path, key: Path, change: Any) -> None:
    from fedtune.edge_device.bundle import manifest_bytes
    from fedtune.edge_export.signing import load_private_key, sign

    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    raw = manifest_bytes(manifest)
    (folder / "manifest.json").write_bytes(raw)
    (folder / "manifest.sig").write_bytes(sign(load_private_key(key), raw))


@pytest.fixture()
def device_with_update(
    base_bundle: Path, update: Path, keys: dict[str, Path], tmp_path: Path
) -> Iterator[tuple[Registry, Path]]:
    from fedtune.edge_device.pull import pull

    reg = Registry(tmp_path, make_pki(tmp_path / "pki"), keys)
    device = tmp_path / "device"
    reg.publish(base_bundle, "banking-llm", "v1", 1)
    reg.publish(update, "banking-llm", "v2", 2)
    for version in ("v1", "v2"):
        pull(reg.address, "banking-llm", keys["public"], device, version=version, ca=reg.pki["ca"])
    yield reg, device
    reg.server.stop(grace=None).wait()


@pytest.mark.timeout(900)
def test_bad_adapters_bundles_and_prompts_are_refused_in_one_line(
    base_bundle: Path,
    update: Path,
    keys: dict[str, Path],
    tmp_path: Path,
    device_with_update: tuple[Registry, Path],
) -> None:
    from fedtune.edge_device.pull import PullError, active_version, pull

    trust = ["--trust-key", str(keys["public"])]
    # a truncated and a tampered adapter file: the hash check stops both before any session
    for name, damage in (
        ("truncated", lambda b: b[: len(b) // 2]),
        ("tampered", lambda b: b[:-1] + bytes([b[-1] ^ 1])),
    ):
        bad = tmp_path / name
        shutil.copytree(update, bad)
        path = bad / "adapter.onnx_adapter"
        path.write_bytes(damage(path.read_bytes()))
        _one_line_error(
            _cli("edge", "predict", str(bad), "Where is my card?", "--base", str(base_bundle), *trust),
            "adapter.onnx_adapter: sha256 does not match the signed manifest",
        )

    # a validly signed adapter for another base: refused by the runtime and by pull, before download
    foreign = tmp_path / "foreign"
    shutil.copytree(update, foreign)
    _resign(foreign, keys["private"], lambda m: m["base_bundle"].update(manifest_sha256="ab" * 32))
    _one_line_error(
        _cli("edge", "predict", str(foreign), "Where is my card?", "--base", str(base_bundle), *trust),
        "this adapter fits base bundle abababababababab",
    )
    reg, device = device_with_update
    reg.publish(foreign, "banking-llm", "v3", 3)
    with pytest.raises(PullError, match="an adapter for base bundle abababababababab, which this device does not hold"):
        pull(reg.address, "banking-llm", keys["public"], device, ca=reg.pki["ca"])
    assert active_version(device) == "v2" and not (device / "versions" / "v3").exists()

    # a bundle whose external weight file is missing
    hollow = tmp_path / "hollow"
    shutil.copytree(base_bundle, hollow)
    (hollow / "model.onnx.data").unlink()
    _one_line_error(
        _cli("edge", "predict", str(hollow), "Where is my card?", *trust),
        "model.onnx.data: listed in the manifest but missing",
    )

    # a prompt longer than the model's context (8,192 tokens), and a bad sampling option
    _one_line_error(
        _cli("edge", "predict", str(device / "current"), "card " * 9000, *trust),
        "do not fit the model's context of 8192 tokens",
    )
    _one_line_error(
        _cli("edge", "predict", str(device / "current"), "hi", "--sample", "--top-p", "1.5", *trust),
        "--top-p: 1.5 must be in (0, 1]",
    )
    # and the device still answers with its active version, streamed by the CLI
    ok = _cli("edge", "predict", str(device / "current"), PROMPTS[0], "--max-new-tokens", "6", *trust)
    assert ok.returncode == 0 and ok.stdout.strip(), ok.stderr


@pytest.mark.timeout(600)
def test_export_refuses_an_adapter_that_fails_the_gate_or_does_not_fit(
    llm_run: Path,
    base_bundle: Path,
    keys: dict[str, Path],
    tmp_path: Path,
) -> None:
    from fedtune.edge_export.exporter import ExportGateError
    from fedtune.edge_export.llm_export import export_adapter_update
    from fedtune.errors import FedtuneError

    with pytest.raises(ExportGateError, match="over the allowed -101 pt"):
        export_adapter_update(llm_run, base_bundle, tmp_path / "gated", keys["private"], limit=2, max_drop_pt=-101)
    assert not (tmp_path / "gated").exists() and not list(tmp_path.glob(".fedtune-export-*"))
    with pytest.raises(FedtuneError, match="--checkpoint: .*round-999 is not an adapter checkpoint"):
        export_adapter_update(llm_run, base_bundle, tmp_path / "x", keys["private"], checkpoint="round-999")
    merged = tmp_path / "not-adapter-ready"
    shutil.copytree(base_bundle, merged)
    _resign(merged, keys["private"], lambda m: m.pop("lora_inputs"))
    with pytest.raises(FedtuneError, match="is not an adapter-ready bundle"):
        export_adapter_update(llm_run, merged, tmp_path / "y", keys["private"], limit=2)


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--int4-block-size", "24"], "--int4-block-size: 24 is not one of 16, 32, 64, 128, 256"),
        (["--int4-accuracy-level", "7"], "--int4-accuracy-level: 7 is not 0-4"),
        (["--int4-int8-last-layers", "-1"], "--int4-int8-last-layers: -1 is negative"),
        (["--int4-int8-last-layers", "4", "--int4-algo", "default"], "--int4-int8-last-layers: needs --int4-algo rtn"),
        (["--int4-int8-projections", "gate,up_proj"], "--int4-int8-projections: 'gate' is not one of q_proj"),
        (
            ["--int4-int8-projections", "up_proj", "--int4-algo", "default"],
            "--int4-int8-projections: needs --int4-algo",
        ),
    ],
)
def test_bad_int4_flags_are_one_line_before_any_work(tmp_path: Path, flags: list[str], expected: str) -> None:
    result = _cli(
        "export", str(tmp_path / "no-run"), "--out", str(tmp_path / "out"), "--key", str(tmp_path / "k"), *flags
    )
    _one_line_error(result, expected)
    assert not (tmp_path / "out").exists()
