"""Checks where data meets a model: token ids against the vocabulary, and content fingerprints of token streams.

`check_token_ids` reads the stream once, vectorised (a max over each memory-mapped shard), and refuses ids the
model has no embedding for. `fingerprint` is cheap even on large shards: the token count and a sha256 over the
whole stream when it is small (≤ 16 MiB), else over 64 blocks of 64 KiB spread over it; a resumed run compares it
with the one saved in its checkpoint, so a shard rewritten in place (same size, other tokens) is noticed.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from oryx.data.sources import DataError, TokenShards

WHOLE_LIMIT = 16 << 20  # bytes hashed in full below this
BLOCKS, BLOCK_BYTES = 64, 64 << 10


def _arrays(tokens: Any) -> list[np.ndarray]:
    return list(tokens.shards) if isinstance(tokens, TokenShards) else [np.asarray(tokens)]


def max_token_id(tokens: Any) -> int:
    """The largest id in a token stream (numpy array, memmap or TokenShards); -1 for an empty one."""
    return max((int(a.max()) for a in _arrays(tokens) if len(a)), default=-1)


def check_token_ids(tokens: Any, vocab_size: int, what: str) -> None:
    """Refuse a token stream holding ids the model has no embedding for (or negative ids).

    Raises:
        DataError: naming `what` (e.g. "train_data runs/x.bin"), the offending id and the vocabulary.
    """
    arrays = _arrays(tokens)
    low = min((int(a.min()) for a in arrays if len(a)), default=0)
    high = max_token_id(tokens)
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise DataError(
            f"{what} holds token id {bad}, outside the model's vocabulary [0, {vocab_size}): it was tokenised with "
            "another tokenizer (or a .bin shard has the wrong dtype); use the tokenizer the model was trained with"
        )


def fingerprint(tokens: Any) -> list[dict[str, Any]]:
    """Per shard of the stream: its token count, dtype and a sha256 of its content (whole, or sampled blocks)."""
    return [_fingerprint_array(a) for a in _arrays(tokens)]


def _fingerprint_array(array: np.ndarray) -> dict[str, Any]:
    raw = array.reshape(-1).view(np.uint8)
    digest = hashlib.sha256(f"{array.dtype.name}|{len(array)}|".encode())
    if raw.nbytes <= WHOLE_LIMIT:
        digest.update(memoryview(raw))
    else:
        for offset in np.linspace(0, raw.nbytes - BLOCK_BYTES, BLOCKS).astype(np.int64).tolist():
            digest.update(memoryview(raw[offset : offset + BLOCK_BYTES]))
    return {"tokens": len(array), "dtype": array.dtype.name, "sha256": digest.hexdigest()}


def fingerprint_change(saved: list[dict[str, Any]], current: list[dict[str, Any]]) -> str | None:
    """How the stream changed between two fingerprints (None if it did not), in words."""
    if saved == current:
        return None
    if len(saved) != len(current):
        return f"it had {len(saved)} shard(s), now {len(current)}"
    for i, (a, b) in enumerate(zip(saved, current, strict=True)):
        where = f"shard {i + 1} " if len(saved) > 1 else ""
        if a["tokens"] != b["tokens"]:
            return f"{where}had {a['tokens']:,} tokens, now {b['tokens']:,}"
        if a != b:
            return f"{where}holds other tokens than when the checkpoint was written (same length)"
    return None
