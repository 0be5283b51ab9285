"""Sites of different LoRA ranks (`hetero-ranks`): a site of rank r_k trains only the first
r_k columns of each B (and rows of a trained A), sends which it trained, and the coordinator
averages each over the sites that trained it, from the masked sum alone: under FFA-LoRA,
through real SecAgg+, that is exactly the component-wise mean of the sites' adapters B_k A; with A trained it is
HetLoRA's zero-padding, also through SecAgg+; without SecAgg+ FlexLoRA's SVD refactors the
mean of the sites' products. A rank above the federation's is refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from test_secagg import _global_arrays, _run_secagg, _site_updates

from fedtune.client.node_settings import NodeSettings
from fedtune.config import RunSettings, default_run_config
from fedtune.errors import ConfigError, FedtuneError
from fedtune.site_rank import (
    column_weighted,
    column_weights,
    lora_a_weights,
    lora_b_weights,
    lora_pairs,
    svd_redistributed,
    trained_rank,
    zero_untrained,
)


def test_each_column_is_the_mean_over_the_sites_that_trained_it() -> None:
    b = [np.array([[1.0, 2.0, 0.0, 0.0]]), np.array([[3.0, 4.0, 5.0, 0.0]])]  # ranks 2 and 3 of 4
    c = [column_weights(2, 4), column_weights(3, 4)]
    w = np.array([3.0, 1.0]) / 4
    mean = [w[0] * b[0] + w[1] * b[1], w[0] * c[0] + w[1] * c[1]]
    previous = [np.full((1, 4), 9.0)]
    got = column_weighted(mean, [0], previous)[0]
    np.testing.assert_allclose(got, [[(3 * 1 + 3) / 4, (3 * 2 + 4) / 4, 5.0, 9.0]])  # column 3: nobody, kept


def test_rows_of_a_are_the_mean_over_the_sites_that_trained_them() -> None:
    a = [np.array([[1.0], [2.0], [0.0]]), np.array([[3.0], [4.0], [5.0]])]  # A (r x in) of ranks 2 and 3 of 3
    b = [np.array([[1.0, 1.0, 0.0]]), np.array([[2.0, 2.0, 2.0]])]
    c = [column_weights(2, 3), column_weights(3, 3)]
    w = [0.5, 0.5]
    mean = [w[0] * a[0] + w[1] * a[1], w[0] * b[0] + w[1] * b[1], w[0] * c[0] + w[1] * c[1]]
    got_a, got_b = column_weighted(mean, [1], [np.zeros((3, 1)), np.zeros((1, 3))], a_indices=[0])
    np.testing.assert_allclose(got_a, [[2.0], [3.0], [5.0]])  # row 2: only the rank-3 site's
    np.testing.assert_allclose(got_b, [[1.5, 1.5, 2.0]])


def test_svd_redistribution_factors_the_mean_of_the_sites_products() -> None:
    rng = np.random.default_rng(0)
    keys = ["m.lora_A.weight", "m.lora_B.weight", "head.weight"]
    pairs = lora_pairs(keys)
    assert pairs == [(0, 1)]
    sites, weights = [], [30.0, 10.0]
    for rank in (1, 2):  # ranks 1 and 2 of 4: the mean product has rank <= 3, so rank 4 holds it exactly
        a, b = np.zeros((4, 6)), np.zeros((5, 4))
        a[:rank], b[:, :rank] = rng.normal(size=(rank, 6)), rng.normal(size=(5, rank))
        sites.append([a.astype(np.float32), b.astype(np.float32), rng.normal(size=(2, 3)).astype(np.float32)])
    got = svd_redistributed(sites, weights, pairs, rank=4)
    w = np.array(weights) / sum(weights)
    mean_product = sum(wk * (s[1].astype(float) @ s[0].astype(float)) for wk, s in zip(w, sites))
    np.testing.assert_allclose(got[1] @ got[0], mean_product, atol=1e-5)
    np.testing.assert_allclose(got[2], sum(wk * s[2] for wk, s in zip(w, sites)), atol=1e-6)
    strength = np.linalg.norm(got[1], axis=0) * np.linalg.norm(got[0], axis=1)
    assert np.all(np.diff(strength) <= 1e-6)  # leading components first: a rank-r_k site trains the strongest
    one = svd_redistributed(sites, weights, pairs, rank=1)  # the best rank-1 approximation
    u, sv, vt = np.linalg.svd(mean_product)
    np.testing.assert_allclose(one[1] @ one[0], sv[0] * np.outer(u[:, 0], vt[0]), atol=1e-5)


def _train_at_rank(model: torch.nn.Module, rank: int, full_rank: int) -> dict[str, torch.Tensor]:
    """Three AdamW steps inside `trained_rank`; returns the batch."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = {"input_ids": torch.randint(100, 1000, (4, 8)), "labels": torch.tensor([0, 1, 0, 1])}
    with trained_rank(model, rank, full_rank):
        for _ in range(3):
            optimizer.zero_grad()
            model(**batch).loss.backward()
            optimizer.step()
    return batch


def _assert_trained_columns(b_weights: list[torch.nn.Parameter], before: list[torch.Tensor], rank: int) -> None:
    """The first `rank` columns of each B trained; the rest hold the global values still."""
    for w, was in zip(b_weights, before):
        assert torch.equal(w[:, rank:], was[:, rank:]) and not torch.equal(w[:, :rank], was[:, :rank])


def test_a_lower_rank_trains_its_rows_of_a_when_a_trains(tiny_bert_dir: Path) -> None:
    from fedtune.model import LoraSettings, build_lora_model

    model = build_lora_model(str(tiny_bert_dir), "seq-cls", LoraSettings(r=8), ["a", "b"], seed=0)
    a_weights, b_weights = lora_a_weights(model), lora_b_weights(model)
    assert a_weights and len(a_weights) == len(b_weights)
    with torch.no_grad():
        for w in b_weights:
            w.normal_()
    a_before = [w.detach().clone() for w in a_weights]
    b_before = [w.detach().clone() for w in b_weights]
    _train_at_rank(model, 2, 8)
    _assert_trained_columns(b_weights, b_before, 2)
    for before, after in zip(a_before, a_weights):
        assert torch.equal(before[2:], after[2:]) and not torch.equal(before[:2], after[:2])
    zero_untrained(model, 2)  # what travels: only the trained rows and columns
    assert all(torch.count_nonzero(w[2:]) == 0 and torch.count_nonzero(w[:2]) > 0 for w in a_weights)
    assert all(torch.count_nonzero(w[:, 2:]) == 0 and torch.count_nonzero(w[:, :2]) > 0 for w in b_weights)


def test_a_lower_rank_trains_only_its_columns(tiny_bert_dir: Path) -> None:
    from fedtune.model import LoraSettings, build_lora_model

    model = build_lora_model(str(tiny_bert_dir), "seq-cls", LoraSettings(r=8, freeze_a=True), ["a", "b"], seed=0)
    weights = lora_b_weights(model)
    with torch.no_grad():
        for w in weights:
            w.normal_()  # a global B that larger sites trained in every column
    a_before = [p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n]
    b_before = [w.detach().clone() for w in weights]
    batch = _train_at_rank(model, 2, 8)
    _assert_trained_columns(weights, b_before, 2)  # trained on top of the larger sites' columns
    a_after = [p for n, p in model.named_parameters() if ".lora_A." in n]
    assert all(torch.equal(x, y) for x, y in zip(a_before, a_after))  # FFA: A frozen
    model(**batch).loss.backward()  # outside, no hook is left behind
    assert any(torch.count_nonzero(w.grad[:, 2:]) > 0 for w in weights if w.grad is not None)


def test_a_rank_above_the_federations_is_refused_in_one_line() -> None:
    base = {**default_run_config(), "ffa-lora": True, "hetero-ranks": True, "lora-r": 8}
    with pytest.raises(ConfigError, match=r"'site-lora-ranks': a site's rank 16 is outside 1..lora-r = 8"):
        RunSettings.from_run_config({**base, "site-lora-ranks": "2,16"})
    svd = {**base, "ffa-lora": False, "hetero-aggregation": "svd"}
    with pytest.raises(ConfigError, match="'hetero-aggregation': 'svd' needs each site's adapter at the coordinator"):
        RunSettings.from_run_config({**svd, "secagg": True})
    with pytest.raises(ConfigError, match="'hetero-aggregation': 'svd' refactors A, which ffa-lora freezes"):
        RunSettings.from_run_config({**svd, "secagg": False, "ffa-lora": True})
    with pytest.raises(ConfigError, match="'hetero-ranks': ranks the LoRA layers, not a low-rank head"):
        RunSettings.from_run_config({**base, "ffa-head-rank": 16})
    RunSettings.from_run_config({**svd, "secagg": False})  # plain LoRA, no SecAgg+: FlexLoRA's SVD
    RunSettings.from_run_config({**base, "ffa-lora": False})  # plain LoRA: zero-padding, under SecAgg+ too
    four = RunSettings.from_run_config({**base, "site-lora-ranks": "2,4,8,8", "min-sites": 2})
    four.check_for_sites(2, exact=False)  # the ServerApp before the sites connect: min-sites is only a floor
    four.check_for_sites(4)
    with pytest.raises(ConfigError, match="'site-lora-ranks': names 4 ranks for 3 sites"):
        four.check_for_sites(3)
    settings = RunSettings.from_run_config(base)
    site = NodeSettings("deployed", data_path="d.jsonl", site_name="bank-a", lora_rank=16)
    with pytest.raises(FedtuneError, match="site bank-a declares LoRA rank 16, above the federation's lora-r = 8"):
        site.trained_rank(settings)
    assert NodeSettings("deployed", data_path="d.jsonl", lora_rank=4).trained_rank(settings) == 4
    with pytest.raises(FedtuneError, match="the run does not take per-site ranks"):
        NodeSettings("deployed", data_path="d.jsonl", lora_rank=4).trained_rank(
            RunSettings.from_run_config({**base, "hetero-ranks": False})
        )
    out = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "simulate", "--set", "ffa-lora=true", "--set", "hetero-ranks=true",
         "--set", "site-lora-ranks=2,16"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "'site-lora-ranks': a site's rank 16 is outside" in out.stderr.strip().splitlines()[-1], out.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_heterogeneous_ranks_aggregate_exactly_through_secagg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bert_dir: Path, sentiment_data: dict[str, Path]
) -> None:
    """3 sites of ranks 2, 4 and 8 (lora-r = 8) through real SecAgg+: the aggregate's B is
    each column's weighted mean over the sites that trained it, and B A the same
    component-wise mean of the sites' adapters B_k A (A is shared), within SecAgg+'s quantisation."""
    run_dir, _, audit = _run_secagg(
        tmp_path, monkeypatch, tiny_bert_dir, sentiment_data, sites=3, rounds=1,
        extra={"ffa-lora": True, "hetero-ranks": True, "site-lora-ranks": "2,4,8", "lora-r": 8},
    )  # fmt: skip
    updates = _site_updates(audit, 1)
    keys = json.loads((run_dir / "run.json").read_text())["adapter"]["keys"]
    b_idx = [i for i, k in enumerate(keys) if ".lora_B." in k]
    ranks = {"site-0": 2, "site-1": 4, "site-2": 8}
    for site, (_, arrays) in updates.items():
        assert len(arrays) == len(keys) + 1  # the adapter, then the column weights
        np.testing.assert_array_equal(arrays[-1], column_weights(ranks[site], 8))
        assert all(not arrays[i][:, ranks[site] :].any() and arrays[i][:, : ranks[site]].any() for i in b_idx)
    weights = np.array([n for n, _ in updates.values()], dtype=float)
    weights /= weights.sum()
    share = sum(w * arrays[-1] for w, (_, arrays) in zip(weights, updates.values()))  # per column
    assert np.all(share > 0)  # site-2 trains all 8
    got = _global_arrays(run_dir, 1)
    saved = load_file(str(run_dir / "round-001" / "adapter_model.safetensors"))
    saved = {k.replace(".default", ""): v for k, v in saved.items()}
    for i in b_idx:
        # each column: the weighted mean over the sites that trained it
        expected = sum(w * arrays[i] for w, (_, arrays) in zip(weights, updates.values())) / share[None, :]
        np.testing.assert_allclose(got[i], expected, atol=1e-4)
        a = saved[keys[i].replace(".default", "").replace(".lora_B.", ".lora_A.")]
        products = sum(w * (arrays[i] / share[None, :]) @ a for w, (_, arrays) in zip(weights, updates.values()))
        np.testing.assert_allclose(got[i] @ a, products, atol=1e-4)  # B A: the component-wise mean


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_plain_lora_ranks_zero_padded_through_secagg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bert_dir: Path, sentiment_data: dict[str, Path]
) -> None:
    """A trained (plain LoRA), ranks 2, 4 and 8 through real SecAgg+: each site sends only
    the rows of A and columns of B it trained, and the aggregate's are each the weighted
    mean over their trainers (HetLoRA's zero-padding, computed from the masked sum)."""
    run_dir, _, audit = _run_secagg(
        tmp_path, monkeypatch, tiny_bert_dir, sentiment_data, sites=3, rounds=1,
        extra={"hetero-ranks": True, "site-lora-ranks": "2,4,8", "lora-r": 8},
    )  # fmt: skip
    updates = _site_updates(audit, 1)
    keys = json.loads((run_dir / "run.json").read_text())["adapter"]["keys"]
    pairs = lora_pairs(keys)
    assert pairs, "plain LoRA sends A"
    ranks = {"site-0": 2, "site-1": 4, "site-2": 8}
    for site, (_, arrays) in updates.items():
        r = ranks[site]
        assert all(not arrays[a][r:].any() and arrays[a][:r].any() for a, _ in pairs)
        assert all(not arrays[b][:, r:].any() for _, b in pairs)
    weights = np.array([n for n, _ in updates.values()], dtype=float)
    weights /= weights.sum()
    share = sum(w * arrays[-1] for w, (_, arrays) in zip(weights, updates.values()))
    got = _global_arrays(run_dir, 1)
    for a, b in pairs:
        mean_a = sum(w * arrays[a] for w, (_, arrays) in zip(weights, updates.values()))
        mean_b = sum(w * arrays[b] for w, (_, arrays) in zip(weights, updates.values()))
        np.testing.assert_allclose(got[a], mean_a / share[:, None], atol=1e-4)
        np.testing.assert_allclose(got[b], mean_b / share[None, :], atol=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_plain_lora_ranks_refactored_by_svd_without_secagg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bert_dir: Path, sentiment_data: dict[str, Path]
) -> None:
    """FlexLoRA without SecAgg+: the aggregate's B A is the best rank-8 approximation of the
    weighted mean of the three sites' products (ranks 2, 4, 8: a mean of rank up to 14)."""
    run_dir, _, audit = _run_secagg(
        tmp_path, monkeypatch, tiny_bert_dir, sentiment_data, sites=3, rounds=1,
        extra={"secagg": False, "hetero-ranks": True, "hetero-aggregation": "svd", "site-lora-ranks": "2,4,8",
               "lora-r": 8},
    )  # fmt: skip
    updates = _site_updates(audit, 1)
    keys = json.loads((run_dir / "run.json").read_text())["adapter"]["keys"]
    weights = np.array([n for n, _ in updates.values()], dtype=float)
    weights /= weights.sum()
    got = _global_arrays(run_dir, 1)
    for a, b in lora_pairs(keys):
        mean = sum(
            w * arrays[b].astype(float) @ arrays[a].astype(float) for w, (_, arrays) in zip(weights, updates.values())
        )
        u, sv, vt = np.linalg.svd(mean, full_matrices=False)
        best = (u[:, :8] * sv[:8]) @ vt[:8]
        np.testing.assert_allclose(got[b] @ got[a], best, atol=1e-5)
    others = [i for i, k in enumerate(keys) if ".lora_" not in k]
    for i in others:  # the head: the plain weighted mean
        np.testing.assert_allclose(
            got[i], sum(w * arrays[i] for w, (_, arrays) in zip(weights, updates.values())), atol=1e-6
        )
