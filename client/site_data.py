"""Which examples a site trains on: its own file in deployment (`data-path` in the
node config), or one partition of the configured data set in simulation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from fedtune.config import RunSettings, resolve_path
from fedtune.data import Example, load_examples
from fedtune.errors import DataError
from fedtune.partition import dirichlet_partition, iid_partition, train_val_split


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


def site_name(node_config: Mapping[str, Any]) -> str:
    """The site's name as its metrics show it, without reading its data."""
    if node_config.get("site-name"):
        return str(node_config["site-name"])
    if "data-path" in node_config:
        return resolve_path(str(node_config["data-path"])).stem
    return f"site-{node_config.get('partition-id', '?')}"


def load_site_data(settings: RunSettings, node_config: Mapping[str, Any], labels: Sequence[str]) -> SiteData:
    """The site's data, from `data-path` (deployment) or `partition-id` (simulation)."""
    if "data-path" in node_config:
        path = str(node_config["data-path"])
        examples = load_examples(path, settings, labels)
        name = site_name(node_config)
        split_seed = settings.seed
    elif "partition-id" in node_config:
        part, num_parts = int(node_config["partition-id"]), int(node_config["num-partitions"])
        if not settings.data_path:
            raise DataError("<run config>", "simulation needs 'data-path' in the run config", field="data-path")
        examples = site_partition(load_examples(settings.data_path, settings, labels), settings, part, num_parts)
        name = site_name(node_config)
        split_seed = settings.seed + part
    else:
        raise DataError("<node config>", "set 'data-path' in the SuperNode's --node-config", field="data-path")
    if len(examples) < 2:
        raise DataError(name, f"a site needs at least 2 examples, got {len(examples)}")
    train, val = train_val_split(examples, settings.val_fraction, split_seed)
    return SiteData(name=name, train=train, val=val)
