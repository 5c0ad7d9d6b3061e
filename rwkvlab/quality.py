"""The quality hash: one short string that changes when the greedy output changes.

Same formula as the seed history files, so old and new runs compare: a base-31 polynomial
rolling hash modulo 2**64 over the first 32 greedy tokens, printed as lowercase hex without
zero padding (15-character hashes are legitimate).
"""
from __future__ import annotations

from collections.abc import Iterable

HASH_TOKENS = 32  # tokens that enter the hash
SHOWN_TOKENS = 16  # tokens a history entry shows
_MASK = (1 << 64) - 1


def quality_hash(tokens: Iterable[int]) -> str:
    """Hash the first 32 tokens: ``h = (h * 31 + t) mod 2**64`` from 0, as unpadded hex."""
    h = 0
    for i, t in enumerate(tokens):
        if i == HASH_TOKENS:
            break
        h = (h * 31 + int(t)) & _MASK
    return format(h, "x")
