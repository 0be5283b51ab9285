"""A site's training spread over N ranks: one process per GPU (NCCL), or N processes
sharing the CPU (gloo), joined by torch.distributed.

Rank 0 is the site worker, the only process a ClientApp talks to. For each round it
hands the other ranks the round (the run's settings, the site's node settings, the global
adapter and the train config, `RankGroup.start_fit`); every rank then runs the same
`train_local`, drawing the same global batches from the same seed and training on its
slice of each (`RankShard.split`: its shard of the site's data that step). Before each
optimizer step the ranks' LoRA gradients are averaged with one all-reduce, each rank's
loss weighted by its share of the batch's examples (classifiers) or labelled tokens
(causal LMs), so the step equals one process's step on the whole global batch. That is
DDP's gradient averaging, done here by hand: the chunked LM head and gradient
checkpointing run the model's parts directly, outside a DDP wrapper's forward, and the
trainable gradients are a few MB, one bucket. Every rank ends the round with the same
adapter; the one that leaves the site is rank 0's.

Run as `python -m fedtune.client.site_ranks --rank R --world N --rendezvous FILE`, which
`RankGroup.start` does for ranks 1..N-1."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

from fedtune.encoding import IGNORE_INDEX
from fedtune.errors import FedtuneError

log = logging.getLogger("fedtune.site")
RANK_TIMEOUT = datetime.timedelta(hours=4)  # a collective waits this long for a rank that is still training


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(rank: int) -> torch.device:
    """Rank r trains on cuda:r when the site has GPUs, else on the CPU."""
    return torch.device(f"cuda:{rank}") if torch.cuda.is_available() else torch.device("cpu")


def check_devices(devices: int) -> None:
    """One line when this machine cannot give `devices` ranks one device each."""
    if devices < 1:
        raise FedtuneError(f"--devices must be at least 1, got {devices}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and devices > gpus:
        raise FedtuneError(f"--devices {devices}: this machine has {gpus} GPU(s); one rank per GPU")


@dataclass(frozen=True)
class RankShard:
    """One rank's part in each training step."""

    rank: int
    world: int

    def split(self, indices: Sequence[int]) -> list[int]:
        """This rank's slice of a global batch."""
        return list(indices[self.rank :: self.world])

    def loss_weight(self, batch: Mapping[str, torch.Tensor] | None, device: torch.device) -> float:
        """The factor that makes the ranks' averaged gradient the whole batch's mean: this
        rank's share of the batch's examples (or labelled tokens) times the world size."""
        count = 0.0 if batch is None else float(_loss_terms(batch))
        total = torch.tensor([count], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return count * self.world / float(total.item()) if total.item() > 0 else 0.0

    def average(self, params: Sequence[torch.Tensor], weighted_loss: float) -> float:
        """Average the trainable gradients (and the weighted loss) over the ranks, in place;
        returns the global batch's loss."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        device = grads[0].device if grads else torch.device("cpu")
        flat = torch.cat(
            [g.detach().reshape(-1).float() for g in grads] + [torch.tensor([weighted_loss], device=device)]
        )
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
            offset += n
        return float(flat[-1].item())


def _loss_terms(batch: Mapping[str, torch.Tensor]) -> int:
    """What the model's mean loss averages over: labelled next tokens, or examples."""
    labels = batch["labels"]
    if labels.dim() == 2:
        return int((labels[:, 1:] != IGNORE_INDEX).sum())
    return int(labels.shape[0])


class RankGroup:
    """Rank 0's view of the site's ranks: it starts ranks 1..N-1, joins the group, and
    hands each round to them."""

    def __init__(self, world: int, rendezvous: Path, threads: int = 0) -> None:
        self.world = world
        self.rendezvous = rendezvous
        self.threads = threads
        self.shard = RankShard(0, world)
        self.helpers: list[subprocess.Popen[bytes]] = []

    def start(self) -> "RankGroup":
        check_devices(self.world)
        if self.rendezvous.exists():
            self.rendezvous.unlink()  # the file store must start empty
        for rank in range(1, self.world):
            cmd = [sys.executable, "-m", __name__, "--rank", str(rank), "--world", str(self.world)]
            cmd += ["--rendezvous", str(self.rendezvous), "--threads", str(self.threads)]
            self.helpers.append(subprocess.Popen(cmd))
        _join(0, self.world, self.rendezvous, self.threads)
        log.info("site: %d ranks joined (%s)", self.world, backend_for(rank_device(0)))
        return self

    def start_fit(
        self,
        run_config: Mapping[str, Any],
        node_config: Mapping[str, Any],
        parameters: Sequence[np.ndarray],
        config: Mapping[str, Any],
    ) -> None:
        """Ranks 1..N-1 start the same round; rank 0 trains it next, with them."""
        for helper in self.helpers:
            if helper.poll() is not None:
                raise FedtuneError(f"site rank (pid {helper.pid}) exited with code {helper.returncode}")
        order = ["fit", dict(run_config), dict(node_config), [np.asarray(a) for a in parameters], dict(config)]
        dist.broadcast_object_list([order], src=0)

    def stop(self) -> None:
        if dist.is_initialized():
            try:
                dist.broadcast_object_list([["stop"]], src=0)
            finally:
                dist.destroy_process_group()
        for helper in self.helpers:
            try:
                helper.wait(timeout=30)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()
        if self.rendezvous.exists():
            self.rendezvous.unlink()


def _join(rank: int, world: int, rendezvous: Path, threads: int) -> None:
    device = rank_device(rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(
        backend_for(device), init_method=f"file://{rendezvous}", rank=rank, world_size=world, timeout=RANK_TIMEOUT
    )


def serve_rank(rank: int, world: int, rendezvous: Path, threads: int) -> None:
    """Ranks 1..N-1: train every round rank 0 hands over, until it says stop."""
    from fedtune.config import RunSettings

    from .dp_history import MemoryHistory
    from .node_settings import NodeSettings
    from .site_work import SiteWork

    _join(rank, world, rendezvous, threads)
    shard = RankShard(rank, world)
    works: dict[str, SiteWork] = {}
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        order = box[0]
        if order[0] != "fit":
            break
        _, run_config, node_config, parameters, config = order
        key = json.dumps([run_config, node_config], sort_keys=True, default=str)
        if key not in works:
            works.clear()  # one run's state at a time, as rank 0 trains one round at a time
            settings = RunSettings.from_run_config(run_config)
            works[key] = SiteWork(settings, NodeSettings.from_node_config(node_config), MemoryHistory(), ranks=shard)
        started = time.monotonic()
        works[key].fit(parameters, config)
        log.info("site rank %d: round %s in %.1f s", rank, config.get("server-round"), time.monotonic() - started)
    dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    from fedtune.logs import setup_logging

    parser = argparse.ArgumentParser(prog="fedtune-site-rank", description=__doc__)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--rendezvous", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    setup_logging()
    serve_rank(args.rank, args.world, args.rendezvous, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
