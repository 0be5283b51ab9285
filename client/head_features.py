"""What the seq-cls head sees of a site's examples, computed once per run.

With `dp-head-only` the base model and the LoRA factors are frozen for the whole run, so
the head's input for each example never changes: a DP-SGD step on the head needs those
vectors only, not a forward pass through the encoder. The features come from the model
in eval mode (no dropout), batched by length, and stay in this process's memory (one set
per model and site: a simulation actor serves several sites); they are a function of the
site's own records and never leave it."""

from __future__ import annotations

import weakref
import zlib

import torch
from peft import PeftModel

from fedtune.encoding import ClassificationEncoder, example_lengths
from fedtune.errors import FedtuneError
from fedtune.length_buckets import length_buckets
from fedtune.model import head_attribute

FEATURE_BATCH_TOKENS = 4096  # padded tokens per forward pass
Features = tuple[torch.Tensor, torch.Tensor]
_cache: "weakref.WeakKeyDictionary[PeftModel, dict[tuple[str, int], Features]]" = weakref.WeakKeyDictionary()


def trainable_head(model: PeftModel) -> torch.nn.Linear:
    """The Linear layer the site trains: peft's trainable copy of the seq-cls head
    (`modules_to_save`), or the head itself when peft does not wrap it."""
    base = model.get_base_model()
    name = head_attribute(base)
    wrapper = getattr(base, name) if name else None
    copies = getattr(wrapper, "modules_to_save", None)
    if copies is not None:
        adapter = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
        wrapper = copies[adapter]
    if not isinstance(wrapper, torch.nn.Linear):
        raise FedtuneError(
            f"dp-head-only needs a seq-cls head that is one Linear layer; "
            f"{base.config.model_type} has {type(wrapper).__name__}"
        )
    return wrapper


@torch.no_grad()
def head_features(model: PeftModel, encoder: ClassificationEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [n, in_features] float32, labels [n]) for every example of `encoder`,
    in its order: the input of the trainable head on the eval-mode model."""
    head = trainable_head(model)
    device = head.weight.device
    captured: dict[int, torch.Tensor] = {}
    current: list[int] = []

    def keep(_module: torch.nn.Module, args: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        features = args[0].detach().float()
        if features.dim() == 3:  # a decoder's score layer sees every position: keep each row's last token
            last = batch["attention_mask"].sum(dim=1) - 1
            features = features[torch.arange(features.size(0), device=features.device), last]
        for row, index in enumerate(current):
            captured[index] = features[row].cpu()

    was_training = model.training
    model.eval()
    hook = head.register_forward_hook(keep)
    try:
        for group in length_buckets(example_lengths(encoder), FEATURE_BATCH_TOKENS):
            current[:] = group
            batch = {k: v.to(device) for k, v in encoder.batch(group).items() if k != "labels"}
            model(**batch)
    finally:
        hook.remove()
        model.train(was_training)
    features = torch.stack([captured[i] for i in range(len(encoder))])
    return features, torch.tensor(encoder.labels, dtype=torch.long)


def fingerprint(encoder: ClassificationEncoder) -> int:
    """A checksum of the encoded examples and labels: the same data gives the same features."""
    digest = zlib.crc32(repr(encoder.labels).encode())
    for ids in encoder.encoded["input_ids"]:
        digest = zlib.crc32(bytes(str(ids), "ascii"), digest)
    return digest


def cached_head_features(model: PeftModel, encoder: ClassificationEncoder, site: str) -> Features:
    """`head_features`, computed once per model, site and data in this process."""
    per_model = _cache.setdefault(model, {})
    key = (site, fingerprint(encoder))
    if key not in per_model:
        per_model[key] = head_features(model, encoder)
    return per_model[key]
