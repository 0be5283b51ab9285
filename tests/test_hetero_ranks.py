"""Sites of different LoRA ranks under FFA-LoRA (`hetero-ranks`): a site of rank r_k trains
only the first r_k columns of each B over the shared frozen A, sends which columns it
trained, and the coordinator averages each column over the sites that trained it, from
the masked sum alone: through real SecAgg+ the aggregate is that column-weighted mean of
the sites' products. A rank above the federation's is refused in one line."""

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
from fedtune.site_rank import column_weighted, column_weights, lora_b_weights, trained_rank


def test_each_column_is_the_mean_over_the_sites_that_trained_it() -> None:
    b = [np.array([[1.0, 2.0, 0.0, 0.0]]), np.array([[3.0, 4.0, 5.0, 0.0]])]  # ranks 2 and 3 of 4
    c = [column_weights(2, 4), column_weights(3, 4)]
    w = np.array([3.0, 1.0]) / 4
    mean = [w[0] * b[0] + w[1] * b[1], w[0] * c[0] + w[1] * c[1]]
    previous = [np.full((1, 4), 9.0)]
    got = column_weighted(mean, [0], previous)[0]
    np.testing.assert_allclose(got, [[(3 * 1 + 3) / 4, (3 * 2 + 4) / 4, 5.0, 9.0]])  # column 3: nobody, kept


def test_a_lower_rank_trains_only_its_columns(tiny_bert_dir: Path) -> None:
    from fedtune.model import LoraSettings, build_lora_model

    model = build_lora_model(str(tiny_bert_dir), "seq-cls", LoraSettings(r=8, freeze_a=True), ["a", "b"], seed=0)
    weights = lora_b_weights(model)
    with torch.no_grad():
        for w in weights:
            w.normal_()  # a global B that larger sites trained in every column
    a_before = [p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = {"input_ids": torch.randint(100, 1000, (4, 8)), "labels": torch.tensor([0, 1, 0, 1])}
    with trained_rank(model, 2, 8):
        for _ in range(3):
            optimizer.zero_grad()
            model(**batch).loss.backward()
            optimizer.step()
    for w in weights:
        assert torch.count_nonzero(w[:, 2:]) == 0 and torch.count_nonzero(w[:, :2]) > 0
    a_after = [p for n, p in model.named_parameters() if ".lora_A." in n]
    assert all(torch.equal(x, y) for x, y in zip(a_before, a_after))  # FFA: A frozen
    model(**batch).loss.backward()  # outside, no hook is left behind
    assert any(torch.count_nonzero(w.grad[:, 2:]) > 0 for w in weights if w.grad is not None)


def test_a_rank_above_the_federations_is_refused_in_one_line() -> None:
    base = {**default_run_config(), "ffa-lora": True, "hetero-ranks": True, "lora-r": 8}
    with pytest.raises(ConfigError, match=r"'site-lora-ranks': a site's rank 16 is outside 1..lora-r = 8"):
        RunSettings.from_run_config({**base, "site-lora-ranks": "2,16"})
    with pytest.raises(ConfigError, match="'hetero-ranks': averages B column by column"):
        RunSettings.from_run_config({**base, "ffa-lora": False})
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
    each column's weighted mean over the sites that trained it, and B A the same mean of
    the sites' products (A is shared), within SecAgg+'s quantisation."""
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
        np.testing.assert_allclose(got[i] @ a, products, atol=1e-4)  # B A: the same mean of the products
