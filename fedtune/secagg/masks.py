"""SecAgg+ masks from a CSPRNG, installed into Flower and checked before use.

Flower's `pseudo_rand_gen` seeds numpy's `RandomState` with a 32-bit XOR-fold of the
shared secret, so a mask has at most 2^32 possible values and is not cryptographic.
`csprng_rand_gen` keeps its signature and output range ([0, num_range - 2], as
`randint(0, num_range - 1)`) but derives a ChaCha20 key from the full secret with
SHA-256 and draws the mask from the keystream by rejection sampling (no modulo bias).

`install_csprng_masks(role)` rebinds the name `pseudo_rand_gen` in the one Flower module
per side that draws masks (the server's SecAgg+ workflow, the client's SecAgg+ mod), so
the rest of Flower's protocol is unchanged and both sides stay in step. A rebinding is
only as good as Flower's code is stable, so it then checks, and refuses SecAgg+ with a
`SecAggSetupError` unless all of these hold (verified on Flower 1.41):
- the module's `pseudo_rand_gen` is this module's generator for that side;
- every Flower function that draws masks still exists and still looks the name
  `pseudo_rand_gen` up in that module's globals (so it calls what was installed);
- nothing else in the module holds Flower's numpy generator under another name.
If a Flower release moves the call, the run stops with one line instead of silently
masking with the 32-bit generator, or with one side patched and a garbage sum.
"""

from __future__ import annotations

import dis
import hashlib
import importlib
import math
import types
from typing import Any, Callable, Iterator

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedtune.errors import FedtuneError

_DOMAIN = b"fedtune/secagg+/mask/v1"
MaskGen = Callable[[bytes, int, list[tuple[int, ...]]], list[np.ndarray]]
VERIFIED_FLOWER = "1.41"
FLOWER_GENERATOR = ("flwr.common.secure_aggregation.secaggplus_utils", "pseudo_rand_gen")
# Per side: the Flower module whose global `pseudo_rand_gen` is rebound, and the
# functions in it that draw masks ("Class.method" or "function").
MASK_CALLERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "server": ("flwr.server.workflow.secure_aggregation.secaggplus_workflow", ("SecAggPlusWorkflow.unmask_stage",)),
    "client": ("flwr.client.mod.secure_aggregation.secaggplus_mod", ("_collect_masked_vectors",)),
}
_MARK = "__fedtune_csprng_role__"


class SecAggSetupError(FedtuneError):
    """SecAgg+ cannot run with CSPRNG masks in this Flower installation."""


def csprng_rand_gen(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Masks uniform on [0, num_range - 2], from ChaCha20 keyed by SHA-256(secret)."""
    n = num_range - 1  # numpy's randint(0, num_range - 1) draws from [0, num_range - 2]
    if n < 1:
        raise ValueError(f"num_range must be >= 2, got {num_range}")
    key = hashlib.sha256(_DOMAIN + seed).digest()
    sizes = [math.prod(d) if len(d) else 1 for d in dimensions_list]
    total = sum(sizes)
    limit = (2**64 // n) * n  # reject draws >= limit: x % n is then exactly uniform
    # One keystream for the whole draw: a refill continues where the last block ended.
    stream = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()
    kept: list[np.ndarray] = []
    have = 0
    while have < total:
        need = total - have
        draw = np.frombuffer(stream.update(b"\x00" * (8 * (need + need // 64 + 16))), dtype="<u8")
        accepted = draw[draw < np.uint64(limit)]
        kept.append(accepted)
        have += accepted.size
    values = (np.concatenate(kept)[:total] % np.uint64(n)).astype(np.int64)
    out: list[np.ndarray] = []
    offset = 0
    for dims, size in zip(dimensions_list, sizes):
        chunk = values[offset : offset + size]
        out.append(np.array(chunk[0], dtype=np.int64) if len(dims) == 0 else chunk.reshape(dims))
        offset += size
    return out


def _generator_for(role: str) -> MaskGen:
    def generate(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
        return csprng_rand_gen(seed, num_range, dimensions_list)

    generate.__name__ = f"csprng_rand_gen[{role}]"
    setattr(generate, _MARK, role)
    return generate


def _flower_module(role: str) -> types.ModuleType:
    if role not in MASK_CALLERS:
        raise ValueError(f"role must be 'server' or 'client', got {role!r}")
    # import_module returns the module itself: for the client, `import a.b.secaggplus_mod`
    # would resolve to the function of that name that the package re-exports.
    return importlib.import_module(MASK_CALLERS[role][0])


def install_csprng_masks(role: str) -> None:
    """Point one side's ('server' or 'client') Flower SecAgg+ at the CSPRNG masks, then
    check that Flower will call them; raises SecAggSetupError otherwise."""
    module = _flower_module(role)
    if getattr(module.pseudo_rand_gen, _MARK, None) != role:
        module.pseudo_rand_gen = _generator_for(role)  # type: ignore[attr-defined]
    verify_csprng_masks(role)


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _loads_global(code: types.CodeType, name: str) -> bool:
    """Whether `code` reads `name` from its module's globals (not as an attribute)."""
    return any(ins.opname == "LOAD_GLOBAL" and ins.argval == name for ins in dis.get_instructions(code))


def _lookup(module: types.ModuleType, dotted: str) -> Any:
    obj: Any = module
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return obj


def verify_csprng_masks(role: str) -> None:
    """Refuse (SecAggSetupError) unless the Flower functions that draw one side's masks
    will call the CSPRNG generator."""
    import flwr

    module = _flower_module(role)
    where = f"Flower {flwr.__version__} ({module.__name__})"
    hint = f"fedtune verified its SecAgg+ mask patch on Flower {VERIFIED_FLOWER}.x; install that version"
    installed = getattr(module, "pseudo_rand_gen", None)
    if getattr(installed, _MARK, None) != role:
        raise SecAggSetupError(
            f"SecAgg+ refused on the {role} side: {where} would draw masks with "
            f"{getattr(installed, '__module__', '?')}.{getattr(installed, '__name__', installed)!s}, "
            f"not the CSPRNG generator; {hint}"
        )
    for dotted in MASK_CALLERS[role][1]:
        func = _lookup(module, dotted)
        code = getattr(func, "__code__", None)
        if code is None:
            raise SecAggSetupError(
                f"SecAgg+ refused on the {role} side: {where} has no {dotted}, which draws the masks; {hint}"
            )
        if not any(_loads_global(c, "pseudo_rand_gen") for c in _code_objects(code)):
            raise SecAggSetupError(
                f"SecAgg+ refused on the {role} side: {where} {dotted} no longer calls "
                f"pseudo_rand_gen, so the CSPRNG masks would not be used; {hint}"
            )
    flower_generator = getattr(importlib.import_module(FLOWER_GENERATOR[0]), FLOWER_GENERATOR[1])
    aliases = [name for name, value in vars(module).items() if value is flower_generator]
    if aliases:
        raise SecAggSetupError(
            f"SecAgg+ refused on the {role} side: {where} holds Flower's numpy mask generator "
            f"as {', '.join(aliases)}; {hint}"
        )
