"""One decoding variant of bench/edge_llm.py in its own process: load once, then answer
JSON requests on stdin (one prompt each) with timings on stdout; report peak RSS at the end.

Variants: `int4-genai` (fedtune's device runtime), `torch-fp32` (transformers `generate`),
`optimum-int8` (optimum's ORTModelForCausalLM on the weight-only INT8 export),
`llamacpp-q4_1` (llama-cpp-python on the packaged GGUF; runs in the benchmark's own venv,
so this file imports nothing of fedtune's for it). Every variant decodes greedily, batch 1,
with the given threads, exactly `new_tokens` new tokens (EOS suppressed), from the same
prompt ids.

    python bench/edge_llm_worker.py VARIANT PATH THREADS [TRUST_KEY]
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Any, Callable, Iterator


def genai(path: str, threads: int, key: str) -> Callable[[list[int], int], Iterator[int]]:
    import numpy as np
    import onnxruntime_genai as og

    from fedtune.edge_device.generative import GenerativeModel

    model = GenerativeModel(path, key, threads=threads)

    def run(ids: list[int], new: int) -> Iterator[int]:
        params = og.GeneratorParams(model.model)
        params.set_search_options(max_length=len(ids) + new, min_length=len(ids) + new, do_sample=False)
        gen = og.Generator(model.model, params)
        if model.adapters is not None:
            gen.set_active_adapter(model.adapters, "fedtune")
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        while not gen.is_done():
            gen.generate_next_token()
            yield int(gen.get_next_tokens()[0])

    return run


def _streamed(generate: Callable[..., Any], ids: list[int], new: int) -> Iterator[int]:
    """transformers-style `generate` with a streamer: yield each new token as it comes."""
    import threading

    import torch

    class Streamer:
        def __init__(self) -> None:
            self.tokens: list[int] = []
            self.first = True
            self.event = threading.Event()
            self.done = False

        def put(self, value: Any) -> None:
            if self.first:  # the prompt
                self.first = False
                return
            self.tokens.extend(int(t) for t in value.reshape(-1).tolist())
            self.event.set()

        def end(self) -> None:
            self.done = True
            self.event.set()

    streamer = Streamer()
    thread = threading.Thread(
        target=generate,
        kwargs=dict(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            streamer=streamer,
        ),
    )
    thread.start()
    seen = 0
    while True:
        streamer.event.wait()
        streamer.event.clear()
        while seen < len(streamer.tokens):
            yield streamer.tokens[seen]
            seen += 1
        if streamer.done and seen >= len(streamer.tokens):
            break
    thread.join()


def torch_fp32(path: str, threads: int, _: str) -> Callable[[list[int], int], Iterator[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.pad_token_id = model.config.eos_token_id

    def run(ids: list[int], new: int) -> Iterator[int]:
        with torch.no_grad():
            yield from _streamed(model.generate, ids, new)

    return run


def optimum_int8(path: str, threads: int, _: str) -> Callable[[list[int], int], Iterator[int]]:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    torch.set_num_threads(threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    model = ORTModelForCausalLM.from_pretrained(path, session_options=options, use_cache=True, use_io_binding=False)
    model.generation_config.pad_token_id = model.config.eos_token_id

    def run(ids: list[int], new: int) -> Iterator[int]:
        yield from _streamed(model.generate, ids, new)

    return run


def llamacpp(path: str, threads: int, _: str) -> Callable[[list[int], int], Iterator[int]]:
    from llama_cpp import Llama, LogitsProcessorList

    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=512, verbose=False)
    eos = llm.token_eos()

    def run(ids: list[int], new: int) -> Iterator[int]:
        llm.reset()
        count = 0
        for token in llm.generate(
            ids,
            top_k=1,
            top_p=1.0,
            temp=0.0,
            repeat_penalty=1.0,
            min_p=0.0,
            logits_processor=LogitsProcessorList([lambda _ids, s: _no_eos(s, eos)]),
        ):
            yield int(token)
            count += 1
            if count >= new:
                break

    return run


def _no_eos(scores: Any, eos: int) -> Any:
    scores[eos] = -float("inf")
    return scores


VARIANTS = {"int4-genai": genai, "torch-fp32": torch_fp32, "optimum-int8": optimum_int8, "llamacpp-q4_1": llamacpp}


def main() -> None:
    variant, path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    key = sys.argv[4] if len(sys.argv) > 4 else ""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    started = time.perf_counter()
    run = VARIANTS[variant](path, threads, key)
    print(json.dumps({"ready": True, "load_seconds": time.perf_counter() - started}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("stop"):
            break
        begin = time.perf_counter()
        stamps, tokens = [], []
        for token in run(request["ids"], request["new_tokens"]):
            stamps.append(time.perf_counter())
            tokens.append(token)
        print(
            json.dumps(
                {
                    "tokens": tokens,
                    "ttft": stamps[0] - begin,
                    "decode_seconds": stamps[-1] - stamps[0],
                    "decoded": len(tokens) - 1,
                }
            ),
            flush=True,
        )
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}), flush=True)


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries that
    across execve, so a worker would report its parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
