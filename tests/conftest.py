"""Shared fixtures: offline/quiet environment, tiny BERT and Llama models built from
config, and small synthetic data sets."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from support.run_configs import sentiment_config
from support.tiny_models import save_tiny_bert, save_tiny_llama

from fedtune.flower_env import apply_env

apply_env()  # the one quiet, offline list (fedtune/flower_env.py)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _flwr_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["FLWR_HOME"] = str(tmp_path_factory.mktemp("flwr-home"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT with random weights and the MiniLM tokenizer."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with random weights; MiniLM tokenizer plus a chat template."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


POS = ["good", "great", "excellent", "happy", "lovely", "superb"]
NEG = ["bad", "awful", "terrible", "sad", "poor", "horrible"]


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def sentiment_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A learnable 2-label text task: train, held-out test and the labels file."""
    out = tmp_path_factory.mktemp("sentiment")
    rng = random.Random(0)

    def rows(n: int) -> list[dict[str, object]]:
        result = []
        for _ in range(n):
            label = rng.choice(["pos", "neg"])
            words = POS if label == "pos" else NEG
            # Short texts: a tiny random-weight BERT learns them within a few steps.
            result.append({"text": f"{rng.choice(words)} {rng.choice(words)}", "label": label})
        return result

    (out / "labels.json").write_text(json.dumps(["pos", "neg"]), encoding="utf-8")
    return {
        "train": _write_jsonl(out / "train.jsonl", rows(240)),
        "test": _write_jsonl(out / "test.jsonl", rows(60)),
        "labels": out / "labels.json",
    }


@pytest.fixture(scope="session")
def completion_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A learnable prompt/completion task for causal-LM tests."""
    out = tmp_path_factory.mktemp("completions")
    rng = random.Random(1)
    pairs = [("red", "apple"), ("yellow", "banana"), ("green", "lime"), ("purple", "grape")]

    def rows(n: int) -> list[dict[str, object]]:
        return [{"prompt": f"name a {c} fruit", "completion": f"{f}"} for c, f in (rng.choice(pairs) for _ in range(n))]

    return {"train": _write_jsonl(out / "train.jsonl", rows(200)), "test": _write_jsonl(out / "test.jsonl", rows(40))}


def _federate(root: Path, name: str, overrides: dict[str, object]) -> Path:
    """One short real federation (2 sites, 1 round) into root/runs/name."""
    from fedtune.cli.simulation import run_simulation
    from fedtune.config import default_run_config

    config = {
        **default_run_config(),
        "output-dir": str(root / "runs"),
        "run-name": name,
        "num-rounds": 1,
        "local-steps": 12,
        "batch-size": 16,
        "learning-rate": 0.05,
        "warmup-fraction": 0.0,
        "lr-schedule": "constant",
        "partitioning": "iid",
        "val-fraction": 0.2,
        **overrides,
    }
    run_simulation(config, num_sites=2)
    return root / "runs" / name


@pytest.fixture(scope="session")
def federate():  # type: ignore[no-untyped-def]
    """The short-federation helper, for tests that need their own run."""
    return _federate


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The coordinator's signing key pair and an intruder's."""
    from fedtune.edge_export.signing import generate_keypair

    root = tmp_path_factory.mktemp("keys")
    private, public = generate_keypair(root, "coordinator")
    other_private, other_public = generate_keypair(root, "intruder")
    return {"private": private, "public": public, "other_private": other_private, "other_public": other_public}


@pytest.fixture(scope="session")
def bert_bundle(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_bert_dir: Path,
    sentiment_data: dict[str, Path],
    keys: dict[str, Path],
) -> tuple[Path, Path, dict]:
    """A tiny BERT federated with SecAgg+ and exported to a signed INT8 bundle."""
    from fedtune.edge_export.exporter import export_bundle

    root = tmp_path_factory.mktemp("bert-export")
    run_dir = _federate(
        root,
        "bert",
        {
            **sentiment_config(tiny_bert_dir, sentiment_data),
            "secagg": True,
        },
    )
    manifest = export_bundle(run_dir, root / "bundle", keys["private"], max_accuracy_drop_pt=100.0)
    return run_dir, root / "bundle", manifest


@pytest.fixture(scope="session")
def app_user():  # type: ignore[no-untyped-def]
    """The service account deployed sites run their SuperNode as (privilege separation);
    root only, as `fedtune deploy site` sets it up."""
    if os.geteuid() != 0:
        pytest.skip("privilege separation needs root (fedtune deploy site creates the account)")
    from support.app_accounts import grant_traverse, revoke_traverse, site_app_account

    account = site_app_account()
    folders = grant_traverse(account)
    try:
        yield account
    finally:
        revoke_traverse(account, folders)


@pytest.fixture()
def app_homes():  # type: ignore[no-untyped-def]
    """Per test: a root-owned 0755 folder under /tmp for the sites' app homes."""
    import shutil

    from support.app_accounts import app_home_root

    root = app_home_root()
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
