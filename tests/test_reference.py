"""The NumPy reference forward against llama.cpp's logits for every fixture format.

Tolerances (from the fixture README, and measured): on tiny-f32.gguf llama.cpp agrees with an
exact forward to ~1e-5, so 1e-4 max abs leaves room for summation order only (measured 2.6e-6).
On the other files llama.cpp rounds activations inside its quantized dot products, which moves
logits by up to ~0.15; 0.2 max abs bounds that (measured 0.002 f16 .. 0.13 q8_0). The argmax
must agree wherever llama.cpp's top-1/top-2 margin exceeds 0.05; closer rows are ties within
that rounding.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import FORMATS
from rwkvlab.gguf import read_model
from rwkvlab.reference import Reference, dequantized_weights

# The token sequence the fixture logits were computed for (README): row t = after token t.
FIXTURE_TOKENS = [0, 33, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 10, 85,
                  115, 101, 114, 58]
QUANT_MAX_ABS = 0.2
TIE_MARGIN = 0.05


def load(fixtures_dir, fmt):
    model = read_model(fixtures_dir / f"tiny-{fmt}.gguf")
    expected = np.load(fixtures_dir / f"tiny-{fmt}.logits.npy")
    return model, expected


@pytest.fixture(scope="module")
def f32(fixtures_dir):
    return load(fixtures_dir, "f32")


def test_f32_matches_llama_cpp_to_1e_4(f32):
    model, expected = f32
    got = Reference(model).logits(FIXTURE_TOKENS)
    assert got.shape == expected.shape == (22, 1024) and got.dtype == np.float32
    err = np.abs(got - expected).max()
    assert err <= 1e-4, err
    np.testing.assert_array_equal(got.argmax(axis=1), expected.argmax(axis=1))


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_matches_llama_cpp(fixtures_dir, fmt):
    model, expected = load(fixtures_dir, fmt)
    got = Reference(model).logits(FIXTURE_TOKENS)
    err = np.abs(got - expected).max()
    assert err <= QUANT_MAX_ABS, (fmt, err)
    top2 = np.sort(expected, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > TIE_MARGIN
    assert clear.sum() >= 15  # most rows are decided, so the argmax check has teeth
    np.testing.assert_array_equal(got.argmax(axis=1)[clear], expected.argmax(axis=1)[clear])


def test_step_prefill_and_logits_agree(f32):
    model, _ = f32
    ref = Reference(model)
    all_rows = ref.logits(FIXTURE_TOKENS)
    ref.reset()
    stepped = np.stack([ref.step(t) for t in FIXTURE_TOKENS])
    np.testing.assert_array_equal(stepped, all_rows)
    ref.reset()
    np.testing.assert_array_equal(ref.prefill(FIXTURE_TOKENS), all_rows[-1])


@pytest.mark.parametrize("fmt", ["f32", "Q4_K_M"])
def test_prefill_chunk_equals_the_token_loop(fixtures_dir, fmt):
    """prefill_chunk (batched matrix products, the state token by token) gives the token loop's
    logits and state to float64 rounding, from a fresh state and continuing from one."""
    ref = Reference(read_model(fixtures_dir / f"tiny-{fmt}.gguf"))
    want_mid = ref.prefill(FIXTURE_TOKENS[:9])
    want = ref.prefill(FIXTURE_TOKENS[9:])
    state = (ref.att_prev.copy(), ref.ffn_prev.copy(), ref.wkv.copy())
    ref.reset()
    np.testing.assert_allclose(ref.prefill_chunk(FIXTURE_TOKENS[:9]), want_mid, rtol=0, atol=1e-5)
    got = ref.prefill_chunk(FIXTURE_TOKENS[9:])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # float32 results of equal float64 sums
    for a, b in zip((ref.att_prev, ref.ffn_prev, ref.wkv), state):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="outside the vocab"):
        ref.prefill_chunk([0, 5000])


def test_logits_continue_from_the_state(f32):
    model, _ = f32
    ref = Reference(model)
    whole = ref.logits(FIXTURE_TOKENS)
    ref.reset()
    first = ref.logits(FIXTURE_TOKENS[:9])
    rest = ref.logits(FIXTURE_TOKENS[9:])  # no reset: picks up where the first call ended
    np.testing.assert_array_equal(np.concatenate([first, rest]), whole)
    assert ref.logits([]).shape == (0, 1024)


def test_reset_zeroes_the_state(f32):
    model, _ = f32
    spec = model.spec
    ref = Reference(model)
    ref.prefill(FIXTURE_TOKENS[:5])
    assert np.abs(ref.wkv).max() > 0 and np.abs(ref.att_prev).max() > 0
    ref.reset()
    assert ref.att_prev.shape == ref.ffn_prev.shape == (spec.n_layer, spec.n_embd)
    assert ref.wkv.shape == (spec.n_layer, spec.n_head, spec.head_size, spec.head_size)
    assert ref.wkv.dtype == np.float64
    assert not ref.att_prev.any() and not ref.ffn_prev.any() and not ref.wkv.any()


def test_generate_is_greedy(f32):
    model, _ = f32
    ref = Reference(model)
    out = ref.generate(FIXTURE_TOKENS[:4], 6)
    assert len(out) == 6
    ref.reset()
    chain, logits = [], ref.prefill(FIXTURE_TOKENS[:4])
    for _ in range(6):
        chain.append(int(np.argmax(logits)))
        logits = ref.step(chain[-1])
    assert out == chain
    ref.reset()
    assert ref.generate(FIXTURE_TOKENS[:4], 6) == out
    assert ref.generate([0], 0) == []


def test_built_from_weights_equals_built_from_the_model(f32):
    model, _ = f32
    weights = dequantized_weights(model)
    assert set(weights) == set(model.tensors)
    assert all(w.dtype == np.float32 and w.shape == model.tensor(n).shape for n, w in weights.items())
    # Layer 0's v0/v1/v2 are the converter's dummies and must never be read.
    for j in range(3):
        del weights[f"blk.0.time_mix_v{j}.weight"]
    a = Reference(weights, model.spec).logits(FIXTURE_TOKENS[:6])
    b = Reference(model).logits(FIXTURE_TOKENS[:6])
    np.testing.assert_array_equal(a, b)


def test_bad_arguments_are_refused(f32):
    model, _ = f32
    with pytest.raises(ValueError, match="ModelSpec"):
        Reference(dequantized_weights(model))
    ref = Reference(model)
    with pytest.raises(ValueError, match="1024"):
        ref.step(1024)
    with pytest.raises(ValueError):
        ref.prefill([])
