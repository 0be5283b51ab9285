"""The device runtime for causal LMs: an INT4 bundle on onnxruntime-genai (no torch, no
transformers), with the chat template the sites trained with, greedy decoding by default
or sampling, stop at EOS, and token streaming.

Loading checks the signature and copies every file, hashing it, into a private folder
(0700) that the model is then opened from. An adapter package (`kind: adapter`) is loaded
on top of its base bundle: the base is found by the manifest sha256 the adapter names,
verified the same way, and the adapter's weights become the active `og.Adapters` entry.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnxruntime_genai as og

from .bundle import (
    BundleError,
    CopiedBundle,
    bundle_kind,
    find_base,
    lora_fit_problem,
    unverified_manifest,
    verify_bundle_into,
)

ADAPTER_NAME = "fedtune"


@dataclass(frozen=True)
class GenerationOptions:
    """Greedy unless `do_sample`; sampling uses temperature, top-p and top-k."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise BundleError(f"--max-new-tokens: {self.max_new_tokens} must be at least 1")
        if self.temperature <= 0:
            raise BundleError(f"--temperature: {self.temperature} must be above 0")
        if not 0 < self.top_p <= 1:
            raise BundleError(f"--top-p: {self.top_p} must be in (0, 1]")
        if self.top_k < 1:
            raise BundleError(f"--top-k: {self.top_k} must be at least 1")


class GenerativeModel:
    """A verified INT4 causal-LM bundle (optionally with an adapter package), ready to generate."""

    def __init__(
        self,
        bundle_dir: str | Path,
        trusted_key: str | Path,
        *,
        base: str | Path | None = None,
        threads: int | None = None,
    ) -> None:
        self._private = Path(tempfile.mkdtemp(prefix="fedtune-device-"))  # 0700 by mkdtemp
        try:
            self._open(Path(bundle_dir), trusted_key, Path(base) if base else None, threads)
        except BaseException:
            self.close()
            raise

    def _open(self, bundle_dir: Path, trusted_key: str | Path, base: Path | None, threads: int | None) -> None:
        if not bundle_dir.is_dir():
            raise BundleError(f"{bundle_dir}: not a bundle folder")
        (self._private / "model").mkdir()
        self.adapter: CopiedBundle | None = None
        if bundle_kind(unverified_manifest(bundle_dir)) == "adapter":
            (self._private / "adapter").mkdir()
            self.adapter = verify_bundle_into(bundle_dir, trusted_key, self._private / "adapter")
            wanted = self.adapter.manifest["base_bundle"]["manifest_sha256"]
            # the base is the one given, else a folder beside the adapter (a device's versions/)
            siblings = sorted(p for p in bundle_dir.resolve().parent.iterdir() if p.is_dir())
            base_dir = find_base(wanted, [base] if base else siblings)
            if base_dir is None:
                raise BundleError(
                    f"{bundle_dir}: this adapter fits base bundle {wanted[:16]}, which is not "
                    f"{'at ' + str(base) if base else 'beside it'}; pull or pass that base bundle first"
                )
            self.base = verify_bundle_into(base_dir, trusted_key, self._private / "model")
            if self.base.manifest_sha256 != wanted:
                raise BundleError(
                    f"{bundle_dir}: this adapter fits base bundle {wanted[:16]}, not {base_dir} "
                    f"({self.base.manifest_sha256[:16]})"
                )
        else:
            self.base = verify_bundle_into(bundle_dir, trusted_key, self._private / "model")
        self.manifest = (self.adapter or self.base).manifest
        if (
            self.manifest.get("task") != "causal-lm"
            or self.base.manifest.get("runtime", {}).get("engine") != "onnxruntime-genai"
        ):
            raise BundleError(f"{bundle_dir}: not an onnxruntime-genai causal-lm bundle")
        runtime = self.manifest["runtime"]
        self.prompt_prefix = str(runtime.get("prompt_prefix", ""))
        self.prompt_suffix = str(runtime.get("prompt_suffix", ""))
        self.eos_ids = {int(i) for i in runtime.get("eos_token_ids", [])}

        config = og.Config(str(self._private / "model"))
        config.clear_providers()
        if threads:
            config.overlay(
                json.dumps(
                    {
                        "model": {
                            "decoder": {
                                "session_options": {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1}
                            }
                        }
                    }
                )
            )
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        genai = json.loads((self._private / "model" / "genai_config.json").read_text())
        self.context_length = int(genai["model"]["context_length"])
        self.eos_ids |= {int(i) for i in np.atleast_1d(genai["model"]["eos_token_id"])}

        adapter_file = None
        if self.adapter is not None:
            adapter_file = self._private / "adapter" / self.adapter.manifest["adapter_file"]
        elif self.base.manifest.get("adapter_file"):
            adapter_file = self._private / "model" / self.base.manifest["adapter_file"]
        self.adapters: og.Adapters | None = None
        if adapter_file is not None:
            check_adapter_file(adapter_file, self.base.manifest.get("lora_inputs") or {})
            self.adapters = og.Adapters(self.model)
            self.adapters.load(str(adapter_file), ADAPTER_NAME)
        elif self.base.manifest.get("lora_inputs"):
            raise BundleError(f"{bundle_dir}: an adapter-ready base needs an adapter file")

    @property
    def version_info(self) -> str:
        what = f"base {self.base.manifest_sha256[:12]}"
        return what + (f" + adapter {self.adapter.manifest_sha256[:12]}" if self.adapter else "")

    def close(self) -> None:
        shutil.rmtree(self._private, ignore_errors=True)

    def __enter__(self) -> "GenerativeModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- prompts and generation ----------------------------------------------------
    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt as the sites trained on it (chat template rendered at export)."""
        return [int(i) for i in self.tokenizer.encode(f"{self.prompt_prefix}{prompt}{self.prompt_suffix}")]

    def _generator(self, ids: Sequence[int], options: GenerationOptions) -> og.Generator:
        if len(ids) + 1 > self.context_length:
            raise BundleError(
                f"prompt: {len(ids)} tokens (with the chat template) do not fit the model's context "
                f"of {self.context_length} tokens; shorten it"
            )
        params = og.GeneratorParams(self.model)
        search: dict[str, object] = {
            "max_length": min(len(ids) + options.max_new_tokens, self.context_length),
            "do_sample": options.do_sample,
        }
        if options.do_sample:
            search.update(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k)
            if options.seed is not None:
                search["random_seed"] = options.seed
        params.set_search_options(**search)
        generator = og.Generator(self.model, params)
        if self.adapters is not None:
            generator.set_active_adapter(self.adapters, ADAPTER_NAME)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        return generator

    def stream_ids(self, prompt: str, options: GenerationOptions = GenerationOptions()) -> Iterator[int]:
        """New token ids as they are generated, without the EOS that ends them."""
        generator = self._generator(self.prompt_ids(prompt), options)
        while not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in self.eos_ids:
                return
            yield token

    def stream(self, prompt: str, options: GenerationOptions = GenerationOptions()) -> Iterator[str]:
        """The completion's text, piece by piece, as tokens come."""
        decoder = self.tokenizer.create_stream()
        for token in self.stream_ids(prompt, options):
            piece = decoder.decode(token)
            if piece:
                yield piece

    def generate(self, prompt: str, options: GenerationOptions = GenerationOptions()) -> str:
        """The whole completion (decoded once from all its ids)."""
        ids = list(self.stream_ids(prompt, options))
        return self.tokenizer.decode(np.asarray(ids, dtype=np.int32)) if ids else ""


def check_adapter_file(path: Path, lora_inputs: dict[str, list[int]]) -> None:
    """The adapter's weights must be exactly the base's LoRA inputs, shapes included."""
    import onnxruntime as ort

    try:
        params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    except Exception as err:  # onnxruntime raises its own types for a malformed file
        raise BundleError(f"{path.name}: not a readable ONNX Runtime adapter ({str(err).splitlines()[0]})") from None
    problem = lora_fit_problem({name: value.shape() for name, value in params.items()}, lora_inputs)
    if problem:
        raise BundleError(f"{path.name}: does not fit the base model: {problem}")
