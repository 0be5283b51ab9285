"""The device runtime for classifiers: load a verified INT8 bundle and run it with
onnxruntime and `tokenizers` alone (no torch, no transformers).

It returns the label and the class probabilities; a batch is split into length buckets
(`fedtune.length_buckets`) so short queries are not padded to the longest one. Causal LMs
run on onnxruntime-genai (`generative.py`); `bundle_engine` tells which runtime a bundle needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from fedtune.length_buckets import length_buckets

from .bundle import BundleError, VerifiedBundle, bundle_kind, unverified_manifest, verify_bundle


@dataclass(frozen=True)
class Prediction:
    """One seq-cls answer: the top label and every label's probability."""

    label: str
    probabilities: dict[str, float]


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Intra-op threads (default: all cores), no idle spinning (fair on small devices)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def load_tokenizer(data: bytes, max_length: int) -> Tokenizer:
    """The bundle's tokenizer.json with its baked-in padding off and truncation set."""
    tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    return tokenizer


DEFAULT_BATCH_TOKENS = 256


class EdgeModel:
    """A verified bundle, ready to run."""

    def __init__(
        self, bundle: VerifiedBundle, threads: int | None = None, batch_tokens: int = DEFAULT_BATCH_TOKENS
    ) -> None:
        self.bundle = bundle
        self.batch_tokens = batch_tokens
        self.manifest = bundle.manifest
        self.task: str = self.manifest["task"]
        self.labels: list[str] = list(self.manifest.get("labels") or [])
        runtime = self.manifest["runtime"]
        self.max_length = int(runtime["max_length"])
        self.pad_id = int(runtime["pad_token_id"])
        self.tokenizer = load_tokenizer(bundle.files[self.manifest["tokenizer_file"]], self.max_length)
        self.session = ort.InferenceSession(
            bundle.files[self.manifest["model_file"]], session_options(threads), providers=["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    @classmethod
    def load(cls, bundle_dir: str | Path, trusted_key: str | Path, threads: int | None = None) -> "EdgeModel":
        """Verify the signature and every file's sha256, then load."""
        return cls(verify_bundle(bundle_dir, trusted_key), threads)

    # ---- seq-cls -------------------------------------------------------------------
    def _feeds(self, encodings: Sequence[Encoding]) -> dict[str, np.ndarray]:
        """Token ids, attention mask (and token types) padded to the longest encoding."""
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        for row, enc in enumerate(encodings):
            ids[row, : len(enc.ids)] = enc.ids
            mask[row, : len(enc.ids)] = 1
            types[row, : len(enc.type_ids)] = enc.type_ids
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: feeds[name] for name in self.input_names if name in feeds}

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """Raw class logits, shape (len(texts), num_labels), in the order of `texts`.

        The texts run in length buckets of at most `batch_tokens` padded tokens each."""
        self._require("seq-cls")
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=True)
        out: np.ndarray | None = None
        for group in length_buckets([len(e.ids) for e in encodings], self.batch_tokens):
            logits = self.session.run(["logits"], self._feeds([encodings[i] for i in group]))[0]
            if out is None:
                out = np.empty((len(encodings), logits.shape[1]), dtype=logits.dtype)
            out[group] = logits
        return out if out is not None else np.empty((0, len(self.labels)), dtype=np.float32)

    def classify(self, texts: Sequence[str]) -> list[Prediction]:
        logits = self.logits(texts).astype(np.float64)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        return [
            Prediction(self.labels[int(p.argmax())], {label: float(v) for label, v in zip(self.labels, p)})
            for p in probs
        ]

    def _require(self, task: str) -> None:
        if self.task != task:
            raise BundleError(f"{self.bundle.path}: this is a {self.task} bundle, not {task}")


def bundle_engine(bundle_dir: str | Path) -> str:
    """Which runtime a bundle needs, from its (not yet verified) manifest: `onnxruntime-genai`
    or `onnxruntime`. The runtime then verifies everything before it loads anything."""
    manifest = unverified_manifest(bundle_dir)
    if bundle_kind(manifest) == "adapter" or manifest.get("runtime", {}).get("engine") == "onnxruntime-genai":
        return "onnxruntime-genai"
    return "onnxruntime"
