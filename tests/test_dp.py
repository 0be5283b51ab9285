"""Sample-level DP-SGD at the sites: ε is reported every round, grows, and the
coordinator stops before the configured budget is exceeded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file
from support.run_configs import sentiment_config

from fedtune.cli.simulation import run_simulation
from fedtune.config import default_run_config
from fedtune.errors import FedtuneError
from fedtune.length_buckets import length_buckets

NOISE, BATCH, STEPS, DELTA = 1.0, 16, 4, 1e-5
SITE_TRAIN = 96  # 240 rows, IID over 2 sites, 20 % held out for validation


def _epsilon_after(rounds: int) -> float:
    acc = RDPAccountant()
    for _ in range(rounds * STEPS):
        acc.step(noise_multiplier=NOISE, sample_rate=BATCH / SITE_TRAIN)
    return acc.get_epsilon(DELTA)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dp_epsilon_grows_and_run_stops_at_budget(
    tmp_path: Path, tiny_bert_dir: Path, sentiment_data: dict[str, Path]
) -> None:
    budget = (_epsilon_after(2) + _epsilon_after(3)) / 2  # rounds 1-2 fit, a 3rd would not
    config = {
        **default_run_config(),
        **sentiment_config(tiny_bert_dir, sentiment_data),
        "partitioning": "iid",
        "val-fraction": 0.2,
        "num-rounds": 4,
        "local-steps": STEPS,
        "batch-size": 4 * BATCH,
        "learning-rate": 0.05,
        "dp": True,
        "dp-batch-size": BATCH,
        "dp-learning-rate": 0.02,
        "dp-noise-multiplier": NOISE,
        "dp-delta": DELTA,
        "dp-epsilon-budget": budget,
        "output-dir": str(tmp_path / "runs"),
        "run-name": "dp",
        "site-state-dir": str(tmp_path / "site-state"),
    }
    run_simulation(config, num_sites=2)
    run_dir = tmp_path / "runs" / "dp"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]  # stopped before round 3 would pass the budget
    eps = [r["dp_epsilon_max"] for r in records]
    assert eps[0] < eps[1] <= budget
    for rnd, rec in enumerate(records, start=1):
        for site in rec["sites"].values():
            assert site["dp_sample_rate"] == pytest.approx(BATCH / SITE_TRAIN)  # dp-batch-size, not batch-size
            assert site["dp_epsilon"] == pytest.approx(_epsilon_after(rnd), rel=1e-6)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["central"] is not None  # the final adapter was still evaluated
    # dp-head-only (the default DP recipe): only the head travelled; LoRA stayed a no-op (B = 0).
    assert all("lora_" not in key for key in json.loads((run_dir / "run.json").read_text())["adapter"]["keys"])
    start, final = (load_file(str(d / "adapter_model.safetensors")) for d in (run_dir / "round-000", run_dir / "final"))
    assert all(not final[k].any() for k in final if ".lora_B." in k)
    head = [k for k in final if "lora_" not in k]
    assert head and any(not torch.equal(start[k], final[k]) for k in head)
    report = (run_dir / "report.md").read_text()
    assert "worst site epsilon" in report and f"of budget {budget}" in report
    # Resuming the budget-stopped run trains no further round: refused before anything is written.
    assert records[-1]["dp_epsilon_next_max"] > budget
    before = (run_dir / "metrics.jsonl").read_text(), (run_dir / "run.json").read_text()
    with pytest.raises(FedtuneError, match=r"cannot resume .*: the DP budget stopped it after round 2"):
        run_simulation({**config, "resume": True}, num_sites=2)
    assert ((run_dir / "metrics.jsonl").read_text(), (run_dir / "run.json").read_text()) == before


def test_dp_step_in_length_buckets_equals_one_padded_batch(
    tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Splitting a Poisson batch into physical batches of similar length changes nothing:
    per-example clipping sees the same per-example gradients, and noise is added once."""
    import copy

    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from transformers import AutoTokenizer

    from fedtune.client import dp_trainer
    from fedtune.data import ClassificationExample
    from fedtune.encoding import ClassificationEncoder, example_lengths
    from fedtune.model import LoraSettings, build_lora_model

    texts = ["good", "bad " * 20, "great great", "awful " * 9, "fine", "terrible " * 14]
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    encoder = ClassificationEncoder(tokenizer, [ClassificationExample(t, i % 2) for i, t in enumerate(texts)], 64)
    lengths = example_lengths(encoder)
    base = build_lora_model(str(tiny_bert_dir), "seq-cls", LoraSettings(r=4, alpha=8, dropout=0.0), ["neg", "pos"])
    for module in base.modules():  # no dropout, so both runs see the same function (Opacus needs train mode)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "dropout_prob"):  # SDPA attention takes its dropout as a float
            module.dropout_prob = 0.0
    base.train()

    def one_step(budget: int) -> tuple[dict[str, torch.Tensor], float]:
        monkeypatch.setattr(dp_trainer, "PHYSICAL_BATCH_TOKENS", budget)
        model = copy.deepcopy(base)
        params = [p for p in model.parameters() if p.requires_grad]
        gsm = GradSampleModule(model)
        optimizer = DPOptimizer(
            torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=0.05, expected_batch_size=len(texts)
        )
        loss = dp_trainer.dp_step(gsm, optimizer, encoder, list(range(len(texts))), lengths, None, torch.device("cpu"))
        gsm.remove_hooks()
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, loss

    assert len(length_buckets(lengths, 40)) > 2  # the split run really uses several passes
    split, split_loss = one_step(40)
    whole, whole_loss = one_step(10**9)
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    start = dict(base.named_parameters())
    d_split = torch.cat([(split[n] - start[n]).flatten() for n in whole])
    d_whole = torch.cat([(whole[n] - start[n]).flatten() for n in whole])
    assert float(d_whole.norm()) > 0  # the step did update the adapter
    # Same update up to float rounding (a wrong scale, e.g. dividing by the number of passes, is off by 50 %+).
    assert float((d_split - d_whole).norm() / d_whole.norm()) < 1e-4
