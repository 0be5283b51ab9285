"""Which examples a site trains on: its own file in deployment (its `NodeSettings`'
data path), or one partition of the configured data set in simulation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from fedtune.config import RunSettings
from fedtune.data import Example, load_examples
from fedtune.errors import DataError
from fedtune.partition import dirichlet_partition, iid_partition, train_val_split

from .node_settings import NodeSettings


@dataclass(frozen=True)
class SiteData:
    """A site's name and its seeded train/validation split."""

    name: str
    train: list[Example]
    val: list[Example]


def site_partition(examples: Sequence[Example], settings: RunSettings, part: int, num_parts: int) -> list[Example]:
    """Partition `part` of `num_parts`: Dirichlet over labels (seq-cls) or over distinct
    completions (causal-lm, e.g. intents in words), or IID."""
    if settings.partitioning == "dirichlet":
        if settings.task == "seq-cls":
            labels = [e.label for e in examples]  # type: ignore[union-attr]
        else:
            index: dict[str, int] = {}
            labels = [index.setdefault(e.completion, len(index)) for e in examples]  # type: ignore[union-attr]
        parts = dirichlet_partition(labels, num_parts, settings.dirichlet_alpha, settings.seed, min_size=2)
    else:
        parts = iid_partition(len(examples), num_parts, settings.seed)
    return [examples[i] for i in parts[part]]


def load_site_data(settings: RunSettings, node: NodeSettings, labels: Sequence[str]) -> SiteData:
    """The site's data: its own file (deployed, or a worker's policy) or its partition (simulated)."""
    if node.data_path:
        examples = load_examples(node.data_path, settings, labels)
        split_seed = settings.seed
    elif node.mode == "simulated" and node.num_partitions > 0:
        if not settings.data_path:
            raise DataError("<run config>", "simulation needs 'data-path' in the run config", field="data-path")
        examples = site_partition(
            load_examples(settings.data_path, settings, labels), settings, node.partition_id, node.num_partitions
        )
        split_seed = settings.seed + node.partition_id
    else:
        raise DataError("<node config>", "set 'data-path' in the SuperNode's --node-config", field="data-path")
    if len(examples) < 2:
        raise DataError(node.name, f"a site needs at least 2 examples, got {len(examples)}")
    train, val = train_val_split(examples, settings.val_fraction, split_seed)
    return SiteData(name=node.name, train=train, val=val)
