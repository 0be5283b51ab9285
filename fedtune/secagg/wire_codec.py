"""A narrower wire encoding for SecAgg+ masked vectors.

Every value a site sends in SecAgg+'s masked-vector stage lies in [0, modulus), and
fedtune keeps modulus <= 2^32, so uint32 carries it exactly; Flower encodes it as
int64, twice the bytes. The site narrows its reply to uint32 after `secaggplus_mod`;
the coordinator widens it back to int64 as soon as it arrives, before Flower's
workflow sums the vectors. The protocol's arithmetic is unchanged.
"""

from __future__ import annotations

import numpy as np
from flwr.common import Message, bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedtune.internals import flower

UINT32_LIMIT = 1 << 32


def _masked(msg: Message) -> list[bytes] | None:
    flower.require("masked-vectors")
    if not msg.has_content() or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return None
    record = msg.content.config_records[RECORD_KEY_CONFIGS]
    value = record.get(Key.MASKED_PARAMETERS)
    return list(value) if isinstance(value, list) else None  # type: ignore[arg-type]


def narrow_masked_reply(msg: Message) -> None:
    """Site side: re-encode the masked vector as uint32 when every value fits."""
    blobs = _masked(msg)
    if not blobs:
        return
    arrays = [bytes_to_ndarray(b) for b in blobs]
    if all(a.size == 0 or (a.min() >= 0 and a.max() < UINT32_LIMIT) for a in arrays):
        msg.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS] = [
            ndarray_to_bytes(a.astype(np.uint32)) for a in arrays
        ]


def widen_masked_reply(msg: Message) -> None:
    """Coordinator side: back to int64 before Flower adds the vectors."""
    blobs = _masked(msg)
    if not blobs:
        return
    arrays = [bytes_to_ndarray(b) for b in blobs]
    if any(a.dtype == np.uint32 for a in arrays):
        msg.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS] = [
            ndarray_to_bytes(a.astype(np.int64)) for a in arrays
        ]
