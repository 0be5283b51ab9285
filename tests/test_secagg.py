"""SecAgg+ over adapters in a real Flower simulation: the secure aggregate equals the
plain weighted mean within the documented bound, what the server receives from a site
looks uniformly random, both sides use the CSPRNG masks, and dropouts are survived."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.common import Message, bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import Key
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from safetensors.numpy import load_file
from support.site_hooks import AuditUpdates, CountMaskDraws, FailAt, FailStage, SlowFit, client_app_with
from support.wire import observe_messages

from fedtune.cli.simulation import run_simulation
from fedtune.config import RunSettings, default_run_config
from fedtune.secagg import masks
from fedtune.secagg.masks import csprng_rand_gen
from fedtune.server.secure_aggregation import secagg_error_bound


def _run_secagg(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    model: Path,
    data: dict[str, Path],
    sites: int,
    rounds: int,
    fail_at: str = "",
    fail_stage: str = "",
    slow_fit: float = 0.0,
    timeout: float = 300.0,
    extra: dict[str, Any] | None = None,
) -> tuple[Path, list[np.ndarray], Path]:
    audit = tmp_path / "site-audit"
    masks_log = tmp_path / "mask-calls.txt"
    masked: list[np.ndarray] = []

    def observe(direction: str, msg: Message) -> None:
        if direction == "up" and msg.has_content() and "secaggplus_configs" in msg.content.config_records:
            rec = msg.content.config_records["secaggplus_configs"]
            if Key.MASKED_PARAMETERS in rec:
                masked.append(np.concatenate([bytes_to_ndarray(b).ravel() for b in rec[Key.MASKED_PARAMETERS]]))

    config = {
        **default_run_config(),
        "model": str(model),
        "data-path": str(data["train"]),
        "labels-file": str(data["labels"]),
        "central-eval-path": "",
        "partitioning": "iid",
        "num-rounds": rounds,
        "local-steps": 4,
        "batch-size": 16,
        "learning-rate": 0.05,
        "output-dir": str(tmp_path / "runs"),
        "run-name": "s",
        "secagg": True,
        "min-sites": sites,
        "secagg-timeout": timeout,
        **(extra or {}),
    }
    observe_messages(monkeypatch, observe)
    draw = masks.csprng_rand_gen

    def count_server_draws(*args: Any) -> list[np.ndarray]:  # the coordinator runs in this process
        with open(masks_log, "a", encoding="utf-8") as handle:
            handle.write("server\n")
        return draw(*args)

    monkeypatch.setattr(masks, "csprng_rand_gen", count_server_draws)
    fail = FailAt(frozenset(x for x in fail_at.split(",") if x))
    stage = FailStage(frozenset(x for x in fail_stage.split(",") if x))
    slow = [SlowFit(slow_fit)] if slow_fit else []
    app = client_app_with(outer=[CountMaskDraws(str(masks_log)), stage], inner=[fail, *slow, AuditUpdates(str(audit))])
    run_simulation(config, num_sites=sites, client_app=app)
    return tmp_path / "runs" / "s", masked, audit


def _site_updates(audit: Path, server_round: int) -> dict[str, tuple[int, list[np.ndarray]]]:
    out = {}
    for path in sorted(audit.glob(f"*-round{server_round:03d}.npz")):
        data = np.load(path)
        arrays = [data[k] for k in sorted(k for k in data.files if k.startswith("a"))]
        out[path.name.split("-round")[0]] = (int(data["num_examples"]), arrays)
    return out


def _global_arrays(run_dir: Path, server_round: int) -> list[np.ndarray]:
    keys = json.loads((run_dir / "run.json").read_text())["adapter"]["keys"]
    tensors = load_file(str(run_dir / f"round-{server_round:03d}" / "adapter_model.safetensors"))
    # peft saves keys without the adapter name; the wire order is the sorted state-dict order.
    saved = {k.replace(".default", ""): v for k, v in tensors.items()}
    return [saved[k.replace(".default", "")] for k in keys]


def _assert_is_weighted_mean(
    run_dir: Path, updates: dict[str, tuple[int, list[np.ndarray]]], server_round: int
) -> float:
    settings = RunSettings.from_run_config({**default_run_config(), "secagg": True})
    counts = np.array([n for n, _ in updates.values()], dtype=float)
    stacked = [
        np.stack([arrays[i] for _, arrays in updates.values()]) for i in range(len(next(iter(updates.values()))[1]))
    ]
    mean = [np.tensordot(counts / counts.sum(), s, axes=1) for s in stacked]
    max_weight = json.loads((run_dir / "secagg.json").read_text())["max_weight"]  # from the census
    max_abs = max(float(np.abs(s).max()) for s in stacked)
    bound = secagg_error_bound(settings, len(counts), list(counts / max_weight), max_abs)
    got = _global_arrays(run_dir, server_round)
    err = max(float(np.abs(g - m).max()) for g, m in zip(got, mean))
    assert err <= bound, (err, bound)
    # ... and it is not any single site's update.
    for _, arrays in updates.values():
        assert max(float(np.abs(g - a).max()) for g, a in zip(got, arrays)) > 100 * bound
    return err


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_secagg_mean_within_bound_and_masked_vectors_look_random(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bert_dir: Path, sentiment_data: dict[str, Path]
) -> None:
    run_dir, masked, audit = _run_secagg(tmp_path, monkeypatch, tiny_bert_dir, sentiment_data, sites=3, rounds=1)
    updates = _site_updates(audit, 1)
    assert len(updates) == 3
    _assert_is_weighted_mean(run_dir, updates, 1)

    # What the server received from each site: masked integers, uniform on [0, 2^32).
    assert len(masked) == 3
    modulus = 2**32
    for vec in masked:
        assert vec.dtype == np.uint32  # the narrow wire encoding (fedtune/secagg/wire_codec.py)
        u = vec.astype(np.float64) / modulus
        assert u.min() < 0.01 and u.max() > 0.99  # the masks span the whole modulus, not the update's range
        assert abs(u.mean() - 0.5) < 0.03
        hist = np.histogram(u, bins=16, range=(0, 1))[0] / len(u)
        assert np.abs(hist - 1 / 16).max() < 0.025
        for _, arrays in updates.values():  # no trace of any site's own values
            plain = np.concatenate([a.ravel() for a in arrays])
            assert abs(np.corrcoef(plain, u[: len(plain)])[0, 1]) < 0.1

    # Both sides drew their masks from the CSPRNG generator.
    roles = {line.split()[0] for line in (tmp_path / "mask-calls.txt").read_text().splitlines()}
    assert roles == {"server", "client"}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(s["secagg_clipped_values"] == 0 for s in records[0]["sites"].values())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_secagg_survives_one_of_four_sites_failing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bert_dir: Path, sentiment_data: dict[str, Path]
) -> None:
    run_dir, _, audit = _run_secagg(
        tmp_path, monkeypatch, tiny_bert_dir, sentiment_data, sites=4, rounds=1, fail_at="site-2@1"
    )
    updates = _site_updates(audit, 1)
    assert sorted(updates) == ["site-0", "site-1", "site-3"]
    # The census saw all 4 sites; the weights come from the survivors' own counts.
    _assert_is_weighted_mean(run_dir, updates, 1)
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    trained = sorted(name for name, m in record["sites"].items() if "train_loss" in m)
    assert record["failures"] == 1 and trained == ["site-0", "site-1", "site-3"]
    assert record["failure_reasons"] == ["test hook: site-2 fails in round 1"]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", ["setup", "share_keys"])
def test_secagg_survives_a_site_dropping_before_the_key_exchange(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bert_dir: Path, sentiment_data: dict[str, Path], stage: str
) -> None:
    """Flower's workflow alone loses such a round (the survivors are asked for shares the
    dropped site never gave them); fedtune's (server/secagg_dropouts.py) aggregates the rest."""
    run_dir, _, audit = _run_secagg(
        tmp_path, monkeypatch, tiny_bert_dir, sentiment_data, sites=4, rounds=1, fail_stage=f"site-2@1:{stage}"
    )
    updates = _site_updates(audit, 1)
    assert sorted(updates) == ["site-0", "site-1", "site-3"]
    _assert_is_weighted_mean(run_dir, updates, 1)
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert not record.get("skipped") and record["failures"] == 1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_secagg_below_threshold_skips_round_and_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bert_dir: Path, sentiment_data: dict[str, Path]
) -> None:
    run_dir, _, _ = _run_secagg(
        tmp_path, monkeypatch, tiny_bert_dir, sentiment_data, sites=4, rounds=2, fail_at="site-1@1,site-2@1"
    )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert records[0].get("skipped") is True and not (run_dir / "round-001").exists()
    assert not records[1].get("skipped") and len(records[1]["sites"]) == 4
    assert (run_dir / "round-002" / "adapter_model.safetensors").is_file()


def test_csprng_masks_are_deterministic_uniform_and_use_the_full_secret() -> None:
    dims = [(3, 5), (), (1000,)]
    a = csprng_rand_gen(b"k" * 32, 2**32, dims)
    b = csprng_rand_gen(b"k" * 32, 2**32, dims)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert [x.shape for x in a] == [(3, 5), (), (1000,)]
    # Flower's generator XOR-folds the secret to 32 bits: these two secrets collide there.
    s1 = b"\x01\x00\x00\x00" * 8
    s2 = b"\x00" * 32
    flower = [pseudo_rand_gen(s, 2**32, [(64,)])[0] for s in (s1, s2)]
    assert np.array_equal(flower[0], flower[1])
    c, d = csprng_rand_gen(s1, 2**32, [(64,)]), csprng_rand_gen(s2, 2**32, [(64,)])
    assert not np.array_equal(c[0], d[0])
    big = csprng_rand_gen(b"seed" * 8, 2**32, [(200_000,)])[0]
    assert big.min() >= 0 and big.max() <= 2**32 - 2
    assert abs(big.mean() / 2**32 - 0.5) < 0.005


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_secagg_aggregate_is_the_same_for_the_same_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bert_dir: Path, sentiment_data: dict[str, Path]
) -> None:
    """Flower rounds each update stochastically before masking it; virtual sites seed that
    rounding from (run seed, site, round), so one seed gives one aggregate, bit for bit."""
    first, _, _ = _run_secagg(tmp_path / "a", monkeypatch, tiny_bert_dir, sentiment_data, sites=2, rounds=1)
    second, _, _ = _run_secagg(tmp_path / "b", monkeypatch, tiny_bert_dir, sentiment_data, sites=2, rounds=1)
    for a, b in zip(_global_arrays(first, 1), _global_arrays(second, 1), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_secagg_stage_longer_than_the_timeout_counts_when_sites_keep_answering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bert_dir: Path, sentiment_data: dict[str, Path]
) -> None:
    """Virtual sites train one after another inside one SecAgg+ stage: three sites of 12 s
    each make a 36 s stage, three times `secagg-timeout` (20 s). The stage's clock starts
    again at each reply, so the round counts with every site (a fixed 20 s deadline skipped it)."""
    run_dir, _, _ = _run_secagg(
        tmp_path, monkeypatch, tiny_bert_dir, sentiment_data, sites=3, rounds=1, slow_fit=12.0, timeout=20.0
    )
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert not record.get("skipped"), record
    assert sorted(name for name, site in record["sites"].items() if "train_loss" in site) == [
        "site-0",
        "site-1",
        "site-2",
    ]
    assert record["dispatch"]["stage_seconds"] > 36.0, record["dispatch"]


def test_only_virtual_sites_seed_the_rounding() -> None:
    """A real site's rounding stays unseeded: the coordinator knows the run's seed."""
    from flwr.common import Context, RecordDict

    from fedtune.client.secagg_setup import _simulated_rounding_seed

    msg = Message(RecordDict(), dst_node_id=1, message_type="train", group_id="3")
    run = {"seed": 7}

    def seed(node_config: dict[str, Any]) -> int | None:
        return _simulated_rounding_seed(msg, Context(1, 1, node_config, RecordDict(), run))

    assert seed({"partition-id": 0, "num-partitions": 2}) == seed({"partition-id": 0, "num-partitions": 2})
    assert seed({"partition-id": 0, "num-partitions": 2}) != seed({"partition-id": 1, "num-partitions": 2})
    assert seed({"data-path": "/data/site.jsonl"}) is None
    assert seed({"worker-socket": "/run/site.sock"}) is None
