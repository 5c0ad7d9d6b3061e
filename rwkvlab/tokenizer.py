"""The RWKV "world" tokenizer: greedy longest match over the UTF-8 bytes of the text.

The vocab is a list of byte strings (token id -> bytes, as `rwkvlab.gguf` decodes it from the
file). Encoding walks a byte trie from the current position, takes the longest token that
matches, and moves past it; no BOS or EOS is added, which is what llama.cpp does for this vocab.
Token 0 (`<s>`) is a control token: it is never produced by `encode` and renders as nothing.
"""
from __future__ import annotations

from collections.abc import Iterable

# Key under which a trie node stores the id of the token ending there; byte keys are 0..255.
_END = -1
SPECIAL_IDS = frozenset({0})


class Tokenizer:
    """Encode text to token ids and back for an RWKV world vocab."""

    def __init__(self, vocab: list[bytes]) -> None:
        self.vocab = list(vocab)
        self._trie: dict = {}
        for token_id, piece in enumerate(self.vocab):
            if token_id in SPECIAL_IDS or not piece:
                continue
            node = self._trie
            for byte in piece:
                node = node.setdefault(byte, {})
            # The first id wins if a vocab ever repeats a piece (the world vocab does not).
            node.setdefault(_END, token_id)

    @classmethod
    def from_model(cls, model) -> "Tokenizer":
        """The tokenizer of a `rwkvlab.gguf.Model` (its `vocab`)."""
        return cls(model.vocab)

    @property
    def n_vocab(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (its UTF-8 bytes), greedy longest match, no BOS."""
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of raw bytes, greedy longest match; ValueError if a byte has no token."""
        ids: list[int] = []
        pos, n, root = 0, len(data), self._trie
        while pos < n:
            node, best_id, best_end = root, -1, pos
            i = pos
            # Walk as deep as the trie allows, remembering the last node that ends a token.
            while i < n:
                node = node.get(data[i])
                if node is None:
                    break
                i += 1
                token_id = node.get(_END)
                if token_id is not None:
                    best_id, best_end = token_id, i
            if best_id < 0:
                raise ValueError(
                    f"byte {data[pos]:#04x} at offset {pos} has no token in this vocab "
                    f"({len(self.vocab)} tokens); the vocab is not a complete byte-level vocab"
                )
            ids.append(best_id)
            pos = best_end
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes the tokens stand for (control tokens such as `<s>` give none)."""
        parts = []
        n = len(self.vocab)
        for token_id in ids:
            token_id = int(token_id)
            if not 0 <= token_id < n:
                raise ValueError(f"token id {token_id} is outside the vocab (0..{n - 1})")
            if token_id not in SPECIAL_IDS:
                parts.append(self.vocab[token_id])
        return b"".join(parts)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of the tokens; a partial UTF-8 sequence (e.g. mid-generation) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")
