"""The world tokenizer against llama.cpp's tokenization, a brute-force oracle, and round trips."""
from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rwkvlab.gguf import read_model
from rwkvlab.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def vocab(fixtures_dir) -> list[bytes]:
    return read_model(fixtures_dir / "tiny-f32.gguf").vocab


@pytest.fixture(scope="module")
def tok(vocab) -> Tokenizer:
    return Tokenizer(vocab)


def brute_force_encode(vocab: list[bytes], data: bytes) -> list[int]:
    """Greedy longest match the slow, obvious way: try every length from the longest down."""
    ids_of = {piece: i for i, piece in reversed(list(enumerate(vocab))) if i != 0}
    longest = max(len(p) for p in vocab)
    out, pos = [], 0
    while pos < len(data):
        for length in range(min(longest, len(data) - pos), 0, -1):
            token_id = ids_of.get(data[pos : pos + length])
            if token_id is not None:
                out.append(token_id)
                pos += length
                break
        else:
            raise AssertionError(f"no token for byte {data[pos]}")
    return out


def test_llama_cpp_tokenizer_cases(fixtures_dir, tok):
    cases = json.loads((fixtures_dir / "tokenizer-cases.json").read_text())
    assert len(cases) == 5
    for text, ids in cases.items():
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == text


def test_from_model_uses_the_file_vocab(fixtures_dir):
    model = read_model(fixtures_dir / "tiny-Q4_K_M.gguf")
    assert Tokenizer.from_model(model).encode("\n\nUser:") == [261, 86, 116, 102, 115, 59]


def test_every_byte_has_a_token(tok, vocab):
    # The tiny vocab keeps the world vocab's first 256 entries: one per byte, ids 1..256.
    for b in range(256):
        assert tok.encode_bytes(bytes([b])) == [b + 1]
    assert tok.n_vocab == len(vocab) == 1024


def test_the_start_token_is_never_matched(tok):
    ids = tok.encode("<s>hi<s>")
    assert 0 not in ids
    assert tok.decode(ids) == "<s>hi<s>"
    assert tok.decode([0, *tok.encode("hi")]) == "hi"  # <s> renders as nothing


def test_longest_match_wins(tok, vocab):
    assert vocab[261] == b"\n\n"
    assert tok.encode("\n\n") == [261]
    assert tok.encode("\n") == [11]
    assert tok.encode("\n\n\n") == [261, 11]  # greedy from the left, not a global optimum


def test_partial_utf8_decodes_to_replacement_characters(tok):
    ids = tok.encode("é")  # two bytes, two byte tokens in the tiny vocab
    assert tok.decode_bytes(ids) == "é".encode()
    assert tok.decode(ids[:1]) == "\ufffd"
    assert tok.decode(ids) == "é"


def test_ids_outside_the_vocab_are_refused(tok):
    with pytest.raises(ValueError, match="1024"):
        tok.decode([5, 1024])
    with pytest.raises(ValueError):
        tok.decode([-1])


def test_a_vocab_without_some_byte_says_which(vocab):
    partial = Tokenizer([b"<s>", b"a", b"b", b"ab"])
    assert partial.encode("abab") == [3, 3]
    with pytest.raises(ValueError, match="0x63 at offset 2"):
        partial.encode("abc")


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_round_trips(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_round_trip(tok, data):
    assert tok.decode_bytes(tok.encode_bytes(data)) == data


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=" \n\tabcdehlorstuTHW!.,:'", max_size=120))
def test_trie_matches_the_brute_force_oracle(tok, vocab, text):
    # Text from characters the multi-byte tokens are made of, so long matches are common.
    data = text.encode()
    assert tok.encode_bytes(data) == brute_force_encode(vocab, data)


def test_long_prompts_encode_quickly(tok):
    text = "The quick brown fox jumps over the lazy dog.\n\n" * 20_000  # ~0.9 MB
    start = time.perf_counter()
    ids = tok.encode(text)
    elapsed = time.perf_counter() - start
    assert tok.decode(ids) == text
    # ~0.2 s on a laptop core; 5 s leaves room for a loaded 2-core CI box.
    assert elapsed < 5.0, elapsed
