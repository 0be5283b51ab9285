"""The site's part in the release gate (`fedtune gate`): before any device gets an
exported model, every site pulls the release candidate from the registry exactly as a
device would (the signature, every file's sha256 and the signed release record checked
against the site's own trusted key), runs it with the device runtime (onnxruntime, no
torch in that path), and scores it against the PyTorch model of the final round on its
own validation split. It returns a vector of fractions (`fedtune/gate_counts.py`), never
an example; under SecAgg+ that vector is masked like an adapter.

What comes from the coordinator is the candidate's model and version names only (checked,
never a path); the registry's address, its CA and the key a candidate must be signed with
are the site's own (a deployed site's node config; a simulation's run config)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fedtune.config import GATE_REGISTRY, RunSettings
from fedtune.data import ClassificationExample, CompletionExample
from fedtune.edge_device.generative import GenerationOptions, GenerativeModel
from fedtune.edge_device.pull import PullError, pull
from fedtune.edge_device.release import ReleaseError, candidate_model
from fedtune.edge_device.runtime import EdgeModel
from fedtune.encoding import ClassificationEncoder, CompletionEncoder
from fedtune.errors import FedtuneError
from fedtune.evaluation import predict_labels
from fedtune.gate_counts import completion_vector, read_vector, score_vector
from fedtune.gate_request import GateRequest
from fedtune.generation import greedy_completions
from fedtune.metrics import normalize_answer

from .node_settings import NodeSettings

REGISTRY_RE = re.compile(GATE_REGISTRY)


@dataclass(frozen=True)
class SiteTrust:
    """Where this site pulls candidates from and whose signature it accepts: its own."""

    registry: str
    trust_key: Path
    registry_ca: bytes | None

    @classmethod
    def of(cls, node: NodeSettings, settings: RunSettings) -> "SiteTrust":
        if node.mode == "simulated":
            registry, key, ca = settings.gate_registry, settings.gate_trust_key, settings.gate_registry_ca
        else:
            registry, key, ca = node.gate_registry, node.gate_trust_key, node.gate_registry_ca
        if not registry or not key:
            raise FedtuneError(
                f"site {node.name} scores release candidates only from its own registry with its own trusted "
                "key: start it with --gate-registry HOST:PORT --gate-trust-key KEY.pub"
            )
        if not REGISTRY_RE.match(registry):
            raise FedtuneError(f"site {node.name}: gate registry {registry!r} is not a host:port")
        try:
            ca_bytes = Path(ca).expanduser().read_bytes() if ca else None
        except OSError as err:
            raise FedtuneError(f"site {node.name}: gate registry CA {ca}: {err.strerror}") from None
        return cls(registry, Path(key).expanduser(), ca_bytes)


def pull_candidate(request: GateRequest, trust: SiteTrust, into: Path) -> Path:
    """The candidate, verified as a device verifies a release (but accepted as a candidate).
    An adapter-only candidate comes after its base: the released `base_version`, pulled and
    verified as a device holds it, beside which the candidate then lands (a device's
    `versions/`), so the device runtime finds it by the sha256 the adapter's manifest names."""
    try:
        if request.base_version:
            pull(
                trust.registry,
                request.model,
                trust.trust_key,
                into,
                version=request.base_version,
                ca=trust.registry_ca,
            )
        got = pull(
            trust.registry,
            candidate_model(request.model),
            trust.trust_key,
            into,
            version=request.version,
            ca=trust.registry_ca,
            candidate=True,
            allow_rollback=True,  # a site may score an older candidate again
        )
    except (PullError, ReleaseError) as err:
        on = f" on {request.model} {request.base_version}" if request.base_version else ""
        raise FedtuneError(f"release candidate {request.model} {request.version}{on}: {err}") from None
    return got.path


def score_classifier(
    model: torch.nn.Module,
    encoder: ClassificationEncoder,
    examples: Sequence[ClassificationExample],
    labels: Sequence[str],
    edge: EdgeModel,
) -> np.ndarray:
    """The site's gate vector: the PyTorch model (final round's adapter) and the device model
    on the same examples."""
    if edge.task != "seq-cls" or list(edge.labels) != list(labels):
        raise FedtuneError("the release candidate is not this run's classifier (task or labels differ)")
    torch_pred = predict_labels(model, encoder)  # type: ignore[arg-type]
    device_pred = np.asarray(edge.logits([e.text for e in examples]).argmax(axis=1), dtype=np.int64)
    gold = np.asarray([e.label for e in examples], dtype=np.int64)
    return score_vector(gold, torch_pred, device_pred, len(labels))


@torch.no_grad()
def score_completions(
    model: torch.nn.Module,
    tokenizer: Any,
    encoder: CompletionEncoder,
    examples: Sequence[CompletionExample],
    generator: GenerativeModel,
    max_new_tokens: int,
) -> np.ndarray:
    """A causal LM site's gate vector: greedy completions of the PyTorch model (final round's
    adapter) and of the candidate on onnxruntime-genai, each against the references, and
    whether the two agree."""
    prompts = [encoder.prompt_ids(e.prompt) for e in examples]
    reference = greedy_completions(model, tokenizer, prompts, max_new_tokens)
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    candidate = [generator.generate(e.prompt, options).strip() for e in examples]
    gold = [normalize_answer(e.completion) for e in examples]
    torch_hits = np.array([normalize_answer(r) == g for r, g in zip(reference, gold)])
    device_hits = np.array([normalize_answer(c) == g for c, g in zip(candidate, gold)])
    agree = np.array([normalize_answer(r) == normalize_answer(c) for r, c in zip(reference, candidate)])
    return completion_vector(torch_hits, device_hits, agree)


def site_drop_pt(vector: np.ndarray, num_labels: int) -> float:
    """This site's own accuracy drop, for a site that chooses to reveal it."""
    return read_vector(vector, num_labels).drop_pt
