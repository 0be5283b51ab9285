"""Distributed DP through SecAgg+: the noise shares add up to at least one central step's
noise for any surviving set at or above the threshold, the threshold comes from the
protocol's own state, and a short real federation accounts ε as Opacus does."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from flwr.common import ConfigRecord, Context, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE, Stage
from opacus.accountants import RDPAccountant
from support.run_configs import sentiment_config

from fedtune.cli.simulation import run_simulation
from fedtune.client.distributed_dp import checked_threshold, noise_share_multiplier, train_head_distributed_dp
from fedtune.client.head_features import trainable_head
from fedtune.client.secagg_setup import SETUP_KEY, SecAggSetup, setup_from_config, with_secagg_setup
from fedtune.config import RunSettings, default_run_config
from fedtune.errors import FedtuneError
from fedtune.model import build_lora_model

SIGMA, CLIP, THRESHOLD, SITES = 1.5, 0.5, 3, 5


def _settings(tiny_bert_dir: Path, noise: float) -> RunSettings:
    return RunSettings.from_run_config(
        {
            "model": str(tiny_bert_dir),
            "labels": "pos,neg",
            "dp": True,
            "secagg": True,
            "dp-mode": "distributed",
            "dp-head-only": True,
            "dp-noise-multiplier": noise,
            "dp-max-grad-norm": CLIP,
            "dp-sample-rate": 1.0,
        }
    )


def test_noise_shares_add_up_to_the_configured_total_for_any_surviving_set(tiny_bert_dir: Path) -> None:
    """Each of 5 sites adds N(0, sigma^2 C^2 / t), t = 3: the sum over any k >= t survivors
    has variance k / t x sigma^2 C^2, never below one central step's, equal to it at k = t."""
    assert noise_share_multiplier(SIGMA, THRESHOLD) ** 2 * THRESHOLD == pytest.approx(SIGMA**2)
    settings = _settings(tiny_bert_dir, SIGMA)
    model = build_lora_model(str(tiny_bert_dir), "seq-cls", settings.lora_settings(), ["pos", "neg"], 0)
    head = trainable_head(model)
    start = copy.deepcopy(head.state_dict())
    generator = torch.Generator().manual_seed(0)
    features, labels = torch.randn(20, head.in_features, generator=generator), torch.tensor([0, 1] * 10)

    def update(noise_settings: RunSettings) -> torch.Tensor:
        head.load_state_dict(start)
        _, _, _, weight = train_head_distributed_dp(model, features, labels, noise_settings, 1, 10, THRESHOLD, [])
        assert weight == 20  # q = 1: every example, the expected batch is the site's size
        return torch.cat([head.weight.detach().flatten(), head.bias.detach().flatten()]) * weight

    # x - (S + N) / w: the noiseless update (sigma ~ 0) gives each draw's noise N = w (u_ref - u).
    reference = update(_settings(tiny_bert_dir, 1e-12))
    draws = torch.stack([torch.stack([reference - update(settings) for _ in range(SITES)]) for _ in range(60)])
    total = SIGMA**2 * CLIP**2
    for survivors in range(THRESHOLD, SITES + 1):
        summed = draws[:, :survivors].sum(dim=1)
        assert float(summed.var()) / total == pytest.approx(survivors / THRESHOLD, rel=0.08)
        assert float(summed.var()) >= 0.92 * total
    assert float(draws[:, 0].var()) / total == pytest.approx(1 / THRESHOLD, rel=0.08)  # one share alone is too little


def _context(stage: str, sample: int = 3, share: int = 3, threshold: int = 2) -> Context:
    state = RecordDict(
        {
            RECORD_KEY_STATE: ConfigRecord(
                {"current_stage": stage, "sample_num": sample, "share_num": share, "threshold": threshold}
            )
        }
    )
    return Context(run_id=1, node_id=1, node_config={}, state=state, run_config={})


def test_the_threshold_comes_from_the_protocol_state_not_the_coordinator() -> None:
    forged = {SETUP_KEY: SecAggSetup(3, 3, 99).to_json(), "server-round": 1}
    running = with_secagg_setup(forged, _context(Stage.SHARE_KEYS))
    assert setup_from_config(running) == SecAggSetup(3, 3, 2) and running["server-round"] == 1
    # A state an earlier round left behind (stage unmask), or none: no setup, whatever the coordinator sent.
    assert setup_from_config(with_secagg_setup(forged, _context(Stage.UNMASK))) is None
    assert setup_from_config(with_secagg_setup(forged, Context(1, 1, {}, RecordDict(), {}))) is None
    assert checked_threshold(SecAggSetup(3, 3, 2), "bank-a") == 2
    with pytest.raises(FedtuneError, match="site bank-a: dp-mode = distributed, but this round came without SecAgg"):
        checked_threshold(None, "bank-a")
    with pytest.raises(FedtuneError, match=r"secagg-num-shares = 1.0\); this round shares with 3 of 7"):
        checked_threshold(SecAggSetup(7, 3, 2), "bank-a")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_distributed_dp_federation_accounts_epsilon_and_stops_at_budget(
    tmp_path: Path, tiny_bert_dir: Path, sentiment_data: dict[str, Path]
) -> None:
    noise, rate, delta = 1.0, 0.5, 1e-5

    def epsilon(rounds: int, multiplier: float = noise) -> float:
        acc = RDPAccountant()
        for _ in range(rounds):
            acc.step(noise_multiplier=multiplier, sample_rate=rate)
        return acc.get_epsilon(delta)

    budget = (epsilon(2) + epsilon(3)) / 2
    config = {
        **default_run_config(),
        **sentiment_config(tiny_bert_dir, sentiment_data),
        "partitioning": "iid",
        "val-fraction": 0.2,
        "num-rounds": 4,
        "secagg": True,
        "dp": True,
        "dp-mode": "distributed",
        "dp-noise-multiplier": noise,
        "dp-sample-rate": rate,
        "dp-delta": delta,
        "dp-learning-rate": 0.05,
        "dp-epsilon-budget": budget,
        "output-dir": str(tmp_path / "runs"),
        "run-name": "ddp",
        "site-state-dir": str(tmp_path / "site-state"),
    }
    run_simulation(config, num_sites=2)
    run_dir = tmp_path / "runs" / "ddp"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]  # a third round would pass the budget
    for rnd, rec in enumerate(records, start=1):
        for site in rec["sites"].values():
            assert site["dp_noise_shares"] == 2  # 2 sites: SecAgg+'s threshold is 2, read from the protocol
            assert site["steps"] == 1 and site["num_examples"] == round(rate * 96)  # weight: the expected batch
            assert site["dp_epsilon"] == pytest.approx(epsilon(rnd), rel=1e-6)  # central DP-SGD's, by Opacus
            assert site["dp_epsilon_own_noise"] == pytest.approx(epsilon(rnd, noise / 2**0.5), rel=1e-6)
            assert site["dp_epsilon_own_noise"] > site["dp_epsilon"]
    assert records[-1]["dp_epsilon_max"] <= budget
    keys = json.loads((run_dir / "run.json").read_text())["adapter"]["keys"]
    assert keys and all("lora_" not in key for key in keys)  # only the head travelled
    from safetensors.torch import load_file

    start, final = (load_file(str(d / "adapter_model.safetensors")) for d in (run_dir / "round-000", run_dir / "final"))
    assert any(not torch.equal(start[k], final[k]) for k in final if "lora_" not in k)  # server Adam moved the head


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_the_site_accountant_is_opacus_own(name: str) -> None:
    """`dp-accountant` picks Opacus' RDP or PRV accountant; the site's ε after its history is
    theirs, and PRV needs the smaller noise multiplier for the same target."""
    from opacus.accountants import create_accountant
    from opacus.accountants.utils import get_noise_multiplier

    from fedtune.client.dp_trainer import accountant_for, epsilon_of, noise_multiplier_for

    settings = RunSettings.from_run_config({"dp": True, "dp-target-epsilon": 4.0, "dp-accountant": name})
    history = [(1.2, 0.2, 30), (0.9, 0.1, 12)]
    reference = create_accountant(name)
    for noise, rate, steps in history:
        for _ in range(steps):
            reference.step(noise_multiplier=noise, sample_rate=rate)
    assert epsilon_of(accountant_for(settings, history), 1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-3)
    sigma = noise_multiplier_for(settings, 0.2, 100)
    assert sigma == get_noise_multiplier(
        target_epsilon=4.0, target_delta=1e-5, sample_rate=0.2, steps=100, accountant=name
    )
    if name == "prv":
        rdp = RunSettings.from_run_config({"dp": True, "dp-target-epsilon": 4.0, "dp-accountant": "rdp"})
        assert sigma < noise_multiplier_for(rdp, 0.2, 100)
