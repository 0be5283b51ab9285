"""SecAgg+ masks from a CSPRNG.

Flower's `pseudo_rand_gen` seeds numpy's `RandomState` with a 32-bit XOR-fold of the
shared secret, so a mask has at most 2^32 possible values and is not cryptographic.
`csprng_rand_gen` keeps its signature and output range ([0, num_range - 2], as
`randint(0, num_range - 1)`) but derives a ChaCha20 key from the full secret with
SHA-256 and draws the mask from the keystream by rejection sampling (no modulo bias).
`install_csprng_masks` points both the server workflow and the client mod at it, so
the rest of Flower's protocol is unchanged and both sides stay in step.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
from typing import Callable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_DOMAIN = b"fedtune/secagg+/mask/v1"
MaskGen = Callable[[bytes, int, list[tuple[int, ...]]], list[np.ndarray]]
AUDIT_ENV = "FEDTUNE_MASK_AUDIT"  # file to which each side appends its role per call


def _keystream_uint64(key: bytes, count: int, block: int) -> np.ndarray:
    nonce = block.to_bytes(4, "little") + b"\x00" * 12  # ChaCha20: 4-byte counter + 12-byte nonce
    enc = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    return np.frombuffer(enc.update(b"\x00" * (8 * count)), dtype="<u8")


def csprng_rand_gen(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Masks uniform on [0, num_range - 2], from ChaCha20 keyed by SHA-256(secret)."""
    n = num_range - 1  # numpy's randint(0, num_range - 1) draws from [0, num_range - 2]
    if n < 1:
        raise ValueError(f"num_range must be >= 2, got {num_range}")
    key = hashlib.sha256(_DOMAIN + seed).digest()
    sizes = [math.prod(d) if len(d) else 1 for d in dimensions_list]
    total = sum(sizes)
    limit = (2**64 // n) * n  # reject draws >= limit: x % n is then exactly uniform
    values = np.empty(0, dtype=np.uint64)
    block = 0
    while values.size < total:
        need = total - values.size
        draw = _keystream_uint64(key, need + need // 64 + 16, block)
        block += 1
        values = np.concatenate([values, draw[draw < np.uint64(limit)]])
    values = (values[:total] % np.uint64(n)).astype(np.int64)
    out: list[np.ndarray] = []
    offset = 0
    for dims, size in zip(dimensions_list, sizes):
        chunk = values[offset : offset + size]
        out.append(np.array(chunk[0], dtype=np.int64) if len(dims) == 0 else chunk.reshape(dims))
        offset += size
    return out


def _audited(role: str) -> MaskGen:
    def generate(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
        audit = os.environ.get(AUDIT_ENV)
        if audit:
            with open(audit, "a", encoding="utf-8") as handle:
                handle.write(f"{role} {os.getpid()}\n")
        return csprng_rand_gen(seed, num_range, dimensions_list)

    generate.__name__ = f"csprng_rand_gen[{role}]"
    return generate


def install_csprng_masks(role: str) -> None:
    """Replace Flower's numpy mask generator on one side ('server' or 'client')."""
    modules = {
        "server": "flwr.server.workflow.secure_aggregation.secaggplus_workflow",
        "client": "flwr.client.mod.secure_aggregation.secaggplus_mod",
    }
    if role not in modules:
        raise ValueError(f"role must be 'server' or 'client', got {role!r}")
    # import_module returns the module itself: for the client, `import a.b.secaggplus_mod`
    # would resolve to the function of that name that the package re-exports.
    module = importlib.import_module(modules[role])
    if getattr(module.pseudo_rand_gen, "__name__", "") != f"csprng_rand_gen[{role}]":
        module.pseudo_rand_gen = _audited(role)
