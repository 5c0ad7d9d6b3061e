"""GGUF reading: the spec and tensors of llama.cpp's own files, and every bad file we reject.

Bad files are made in tmp_path, either by rewriting tiny-f32.gguf with gguf.GGUFWriter (one
thing changed: a key, a tensor, a type) or by cutting / corrupting a copy of it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.constants import GGMLQuantizationType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FORMATS
from rwkvlab.cli import main as cli_main
from rwkvlab.gguf import (
    SUPPORTED_TYPES,
    _HeaderReader,
    GGUFError,
    ModelSpec,
    Tensor,
    expected_shapes,
    read_model,
    unescape_token,
)

TINY_SPEC = ModelSpec(
    n_embd=256, n_layer=2, n_ffn=1024, head_size=64, n_head=4, rank_decay=64, rank_iclr=64,
    rank_value=32, rank_gate=128, n_vocab=1024, eps=float(np.float32(1e-5)), name="Fxhf Tiny",
)

# Matrices as the fixture README describes them per file: (big C x C / C x F matrices and the
# embedding, output head, LoRA a/v/g matrices). w1/w2, lerp_fused and 1-D tensors are always F32.
FILE_TYPES = {
    "f32": ("F32", "F32", "F32"),
    "f16": ("F16", "F16", "F16"),
    "bf16": ("BF16", "BF16", "BF16"),
    "q8_0": ("Q8_0", "Q8_0", "Q8_0"),
    "Q4_0": ("Q4_0", "Q6_K", "F32"),
    "Q4_K_M": ("Q4_K", "Q6_K", "F32"),
    "Q5_K_M": ("Q5_K", "Q6_K", "F32"),
    "Q6_K": ("Q6_K", "Q6_K", "F32"),
}


def fixture(fixtures_dir: Path, fmt: str) -> Path:
    return fixtures_dir / f"tiny-{fmt}.gguf"


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    return read_model(fixture(fixtures_dir, "f32"))


# --- llama.cpp's files ----------------------------------------------------------------------


def test_spec_of_the_tiny_fixture(tiny):
    assert tiny.spec == TINY_SPEC


def test_every_tensor_is_present_with_its_normalised_shape(tiny):
    # 6 global tensors + 28 per block; the block count includes layer 0's dummy v0/v1/v2.
    assert len(tiny.tensors) == 6 + 28 * 2
    for name, shape in expected_shapes(tiny.spec).items():
        assert tiny.tensor(name).shape == shape, name
    assert tiny.tensor("blk.0.time_mix_lerp_fused.weight").shape == (6, 256)
    assert tiny.tensor("blk.1.channel_mix_lerp_k.weight").shape == (256,)
    # Layer 0's value LoRA is the converter's copy of the a-LoRA (rank Da = 64, not Dv = 32).
    assert tiny.tensor("blk.0.time_mix_v1.weight").shape == (64, 256)
    assert tiny.tensor("blk.1.time_mix_v1.weight").shape == (32, 256)


@pytest.mark.parametrize("fmt", FORMATS)
def test_tensor_types_per_file(fixtures_dir, fmt):
    model = read_model(fixture(fixtures_dir, fmt))
    big, head, lora = FILE_TYPES[fmt]
    types = {name: t.ggml_type for name, t in model.tensors.items()}
    assert types["token_embd.weight"] == big
    assert types["output.weight"] == head
    for i in range(2):
        b = f"blk.{i}."
        for m in ("receptance", "key", "value", "output"):
            assert types[b + f"time_mix_{m}.weight"] == big
        assert types[b + "channel_mix_key.weight"] == big
        assert types[b + "channel_mix_value.weight"] == big
        for m in ("a1", "a2", "g1", "g2", "v1", "v2"):
            assert types[b + f"time_mix_{m}.weight"] == lora, (b + m, types[b + m])
        for m in ("w1", "w2", "lerp_fused", "w0", "a0", "k_k", "r_k"):
            assert types[b + f"time_mix_{m}.weight"] == "F32"
    assert set(types.values()) <= set(SUPPORTED_TYPES)


@pytest.mark.parametrize("fmt", FORMATS)
def test_raw_is_a_read_only_view_of_the_file(fixtures_dir, fmt):
    path = fixture(fixtures_dir, fmt)
    model = read_model(path)
    file_bytes = path.read_bytes()
    for t in model.tensors.values():
        assert isinstance(t.raw, np.memmap) and t.raw.dtype == np.uint8 and t.raw.ndim == 1
        # A copy would own its data and be writeable; a view of the read-only map is neither.
        assert not t.raw.flags.owndata and not t.raw.flags.writeable
    # The view really holds the file's bytes: find output.weight's bytes in the file.
    head = model.tensor("output.weight")
    assert file_bytes.find(head.raw.tobytes()) > 0


def test_nbytes_match_the_block_sizes(fixtures_dir):
    # Elements / bytes per block from the reference note (Q8_0 32/34, Q4_K 256/144, Q6_K 256/210).
    q8 = read_model(fixture(fixtures_dir, "q8_0")).tensor("blk.0.time_mix_key.weight")
    assert q8.nbytes == 256 * 256 // 32 * 34
    qk = read_model(fixture(fixtures_dir, "Q4_K_M"))
    assert qk.tensor("token_embd.weight").nbytes == 1024 * 256 // 256 * 144
    assert qk.tensor("output.weight").nbytes == 1024 * 256 // 256 * 210
    assert qk.tensor("blk.0.attn_norm.weight").nbytes == 256 * 4


def test_f32_dequantize_is_the_memory_mapped_data(tiny):
    t = tiny.tensor("blk.0.time_mix_w1.weight")
    w = t.dequantize()
    assert w.dtype == np.float32 and w.shape == (64, 256)
    assert np.shares_memory(w, t.raw)


def test_q8_0_dequantize_against_a_hand_decoded_block(fixtures_dir):
    # Q8_0 block: an f16 scale d, then 32 int8 quants q; value = d * q. Decoded here by hand so
    # the check does not rest on gguf-py alone, and it pins the row / column orientation.
    t = read_model(fixture(fixtures_dir, "q8_0")).tensor("blk.1.time_mix_g2.weight")  # (256, 128)
    blocks = t.raw.reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    by_hand = (d * q).reshape(256, 128)
    np.testing.assert_array_equal(t.dequantize(), by_hand)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "f32"])
def test_dequantized_matrices_are_close_to_the_f32_file(tiny, fixtures_dir, fmt):
    # Every file was converted from the same weights, so each dequantized matrix must be the f32
    # matrix plus quantization noise. Bound: relative RMS error 0.15 (4-bit blocks give ~0.1 on
    # random weights, f16 ~1e-3); a transposed or mis-ordered decode gives ~1.4.
    model = read_model(fixture(fixtures_dir, fmt))
    for name in ("token_embd.weight", "output.weight", "blk.1.channel_mix_value.weight",
                 "blk.0.time_mix_key.weight", "blk.1.time_mix_g1.weight"):
        got, want = model.tensor(name).dequantize(), tiny.tensor(name).dequantize()
        assert got.shape == want.shape and got.dtype == np.float32
        rel = np.sqrt(np.mean((got - want) ** 2) / np.mean(want**2))
        assert rel < 0.15, (fmt, name, rel)


def test_vocab_and_metadata(tiny):
    assert len(tiny.vocab) == 1024
    assert tiny.vocab[0] == b"<s>"
    assert tiny.vocab[1:257] == [bytes([b]) for b in range(256)]
    assert tiny.vocab[261] == b"\n\n"
    assert tiny.metadata["general.architecture"] == "rwkv7"
    assert tiny.metadata["rwkv7.attention.head_count"] == 0
    assert tiny.metadata["tokenizer.ggml.tokens"] == "[1024 x STRING]"  # summarised, not copied


@pytest.mark.parametrize(("escaped", "raw"), [
    ("abc", b"abc"), ("\\x00", b"\x00"), ("\\xff", b"\xff"), ("\\\\", b"\\"), ("\\'", b"'"),
    ("a\\tb\\n\\r", b"a\tb\n\r"), ("\\xe4\\xb8\\xad", "中".encode()), ("é", "é".encode()),
])
def test_unescape_token(escaped, raw):
    assert unescape_token(escaped) == raw
    if raw.isascii() or escaped == "é":
        return
    assert unescape_token(repr(raw)[2:-1]) == raw  # the converter writes repr(bytes)[2:-1]


@pytest.mark.parametrize("bad", ["\\", "ab\\", "\\xZZ", "\\x1"])
def test_unescape_token_rejects_broken_escapes(bad):
    with pytest.raises(ValueError):
        unescape_token(bad)


def test_header_reader_reads_metadata_like_gguf_py(fixtures_dir, tmp_path):
    # _HeaderReader reads arrays its own (faster) way; every value must come out as gguf-py's.
    path = tmp_path / "arrays.gguf"
    writer = GGUFWriter(path, "rwkv7")
    writer.add_array("t.ints", list(range(-5, 300)))
    writer.add_array("t.floats", [0.5, -2.25, 1e-5])
    writer.add_array("t.bools", [True, False, True])
    writer.add_array("t.strings", ["a", "", "\\x00", "中文", "b" * 300])
    writer.add_string("t.string", "x")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for p in (path, fixtures_dir / "tiny-q8_0.gguf"):
        ours, theirs = _HeaderReader(p), GGUFReader(p)
        assert list(ours.fields) == list(theirs.fields)
        for key, field in theirs.fields.items():
            assert ours.fields[key].contents() == field.contents(), key
            assert ours.fields[key].types[0] == field.types[0], key


def test_model_tensor_names_a_missing_tensor(tiny):
    with pytest.raises(GGUFError, match=r"tiny-f32\.gguf.*'blk\.7\.nope\.weight'"):
        tiny.tensor("blk.7.nope.weight")


# --- bad files --------------------------------------------------------------------------------


def _copy_fields(reader: GGUFReader, writer: GGUFWriter, drop: set[str], override: dict) -> None:
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        if key in override:
            continue
        main = field.types[0]
        sub = field.types[-1] if main == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), main, sub_type=sub)
    for key, (value, vtype) in override.items():
        writer.add_key_value(key, value, vtype)


def rewrite(src: Path, dst: Path, *, arch: str = "rwkv7", drop_keys=(), set_keys=None,
            drop_tensors=(), replace=None) -> Path:
    """Copy a GGUF file with one thing changed. replace: name -> (array, raw_dtype, raw_shape)."""
    reader = GGUFReader(src)
    writer = GGUFWriter(dst, arch)
    _copy_fields(reader, writer, set(drop_keys), set_keys or {})
    replace = replace or {}
    for t in reader.tensors:
        if t.name in drop_tensors:
            continue
        if t.name in replace:
            data, raw_dtype, raw_shape = replace[t.name]
            writer.add_tensor(t.name, data, raw_shape=raw_shape, raw_dtype=raw_dtype)
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.fixture
def f32_path(fixtures_dir):
    return fixture(fixtures_dir, "f32")


def expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(GGUFError) as info:
        read_model(path)
    message = str(info.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_an_unchanged_rewrite_reads_back(f32_path, tmp_path):
    # Guards the helper: the bad-file tests below differ from this only in the one change.
    model = read_model(rewrite(f32_path, tmp_path / "same.gguf"))
    assert model.spec == TINY_SPEC
    np.testing.assert_array_equal(model.tensor("output.weight").dequantize(),
                                  read_model(f32_path).tensor("output.weight").dequantize())


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nothing.gguf", "no such file")


def test_a_folder_is_not_a_file(tmp_path):
    expect_error(tmp_path, "not a file")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    expect_error(path, "is not a GGUF file", "bad magic")


def test_not_a_gguf_file(fixtures_dir, tmp_path):
    path = tmp_path / "logits.gguf"
    shutil.copy(fixtures_dir / "tiny-f32.logits.npy", path)
    expect_error(path, "is not a GGUF file", "bad magic", "b'\\x93NUM'", "b'GGUF'")


def test_truncated_in_the_tensor_data(f32_path, tmp_path):
    path = tmp_path / "cut.gguf"
    data = f32_path.read_bytes()
    path.write_bytes(data[: len(data) - 5000])  # a download cut short
    message = expect_error(path, "is truncated", "blk.1.")
    assert "tensor" in message


def test_truncated_in_the_header(f32_path, tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(f32_path.read_bytes()[:3000])  # ends inside the vocab array
    expect_error(path, "is truncated", "header")


def test_garbage_after_the_magic(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"GGUF" + np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    expect_error(path)  # wrapped gguf-py errors still name the file and are GGUFErrors


@pytest.mark.parametrize("arch", ["arwkv7", "llama"])
def test_wrong_architecture(f32_path, tmp_path, arch):
    path = rewrite(f32_path, tmp_path / f"{arch}.gguf", arch=arch)
    expect_error(path, f"'{arch}'", "only 'rwkv7'")


@pytest.mark.parametrize("key", ["rwkv7.wkv.head_size", "rwkv7.block_count",
                                 "rwkv7.attention.gate_lora_rank", "tokenizer.ggml.tokens"])
def test_missing_metadata_key(f32_path, tmp_path, key):
    path = rewrite(f32_path, tmp_path / "nokey.gguf", drop_keys=[key])
    expect_error(path, f"'{key}'", "missing")


def test_metadata_of_the_wrong_type(f32_path, tmp_path):
    path = rewrite(f32_path, tmp_path / "strkey.gguf",
                   set_keys={"rwkv7.embedding_length": ("256", GGUFValueType.STRING)})
    expect_error(path, "'rwkv7.embedding_length'", "integer", "'256'")


def test_head_size_must_divide_the_embedding(f32_path, tmp_path):
    path = rewrite(f32_path, tmp_path / "heads.gguf",
                   set_keys={"rwkv7.wkv.head_size": (60, GGUFValueType.UINT32)})
    expect_error(path, "256", "60", "rwkv7.wkv.head_size")


def test_other_tokenizer(f32_path, tmp_path):
    path = rewrite(f32_path, tmp_path / "gpt2.gguf",
                   set_keys={"tokenizer.ggml.model": ("gpt2", GGUFValueType.STRING)})
    expect_error(path, "tokenizer.ggml.model", "'gpt2'", "'rwkv'")


def test_missing_tensor(f32_path, tmp_path):
    path = rewrite(f32_path, tmp_path / "notensor.gguf", drop_tensors=["blk.1.time_mix_key.weight"])
    expect_error(path, "'blk.1.time_mix_key.weight'", "missing")


def test_layer0_value_lora_is_not_required(f32_path, tmp_path):
    # The engine never reads layer 0's dummy v0/v1/v2, so a file without them is fine.
    drop = [f"blk.0.time_mix_v{j}.weight" for j in range(3)]
    model = read_model(rewrite(f32_path, tmp_path / "nov0.gguf", drop_tensors=drop))
    assert "blk.0.time_mix_v1.weight" not in model.tensors


def test_misshaped_tensor(f32_path, tmp_path):
    wrong = np.zeros((48, 256), dtype=np.float32)  # rank 48 where the decay LoRA rank is 64
    path = rewrite(f32_path, tmp_path / "shape.gguf",
                   replace={"blk.1.time_mix_w1.weight": (wrong, None, None)})
    expect_error(path, "'blk.1.time_mix_w1.weight'", "(48, 256)", "expected (64, 256)")


def test_vocab_size_must_match_the_embedding(f32_path, tmp_path):
    wrong = np.zeros((1000, 256), dtype=np.float32)
    path = rewrite(f32_path, tmp_path / "vocab.gguf",
                   replace={"token_embd.weight": (wrong, None, None)})
    expect_error(path, "'token_embd.weight'", "(1000, 256)", "expected (1024, 256)")


def test_unsupported_ggml_type(f32_path, tmp_path):
    # Q4_1 (32 elements in 20 bytes) is a real ggml type that rwkvlab does not run.
    q4_1 = np.zeros((256, 256 // 32 * 20), dtype=np.uint8)
    path = rewrite(f32_path, tmp_path / "q4_1.gguf",
                   replace={"blk.0.time_mix_value.weight": (q4_1, GGMLQuantizationType.Q4_1, None)})
    message = expect_error(path, "'blk.0.time_mix_value.weight'", "Q4_1", "supported")
    for name in SUPPORTED_TYPES:
        assert name in message


def test_k_quant_rows_must_be_a_multiple_of_256(f32_path, tmp_path):
    # ne = [128, 512]: as many bytes as a legal [256, 256] Q4_K matrix, but rows of 128.
    blocks = np.zeros(256 * 144, dtype=np.int8)
    path = rewrite(f32_path, tmp_path / "k128.gguf",
                   replace={"blk.0.time_mix_key.weight": (blocks, GGMLQuantizationType.Q4_K, (512, 128))})
    expect_error(path, "'blk.0.time_mix_key.weight'", "Q4_K", "128", "multiple of 256")


def test_unknown_ggml_type_id(f32_path, tmp_path):
    path = rewrite(f32_path, tmp_path / "k128.gguf")
    # Patch the type id of one tensor in the header: its info is name, n_dims, ne[n_dims], type.
    data = bytearray(path.read_bytes())
    name = b"blk.0.time_mix_k_k.weight"
    at = data.find(name) + len(name)
    n_dims = int.from_bytes(data[at : at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[type_at : type_at + 4], "little") == 0  # F32
    data[type_at : type_at + 4] = (200).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    expect_error(path, "'blk.0.time_mix_k_k.weight'", "id 200 (unknown to gguf-py)", "supported")


# --- rwkvlab info -------------------------------------------------------------------------------


def test_info_prints_spec_tensors_and_totals(fixtures_dir, capsys):
    path = fixture(fixtures_dir, "Q4_K_M")
    assert cli_main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Fxhf Tiny" in out
    assert "C=256  L=2  F=1024  N=64  H=4  V=1024" in out
    assert "decay=64  iclr=64  value=32  gate=128" in out
    lines = out.splitlines()
    head_row = next(line for line in lines if line.startswith("output.weight "))
    assert head_row.split()[1:3] == ["Q6_K", "1024x256"] and "210.00 KiB" in head_row
    lerp_row = next(line for line in lines if line.startswith("blk.0.time_mix_lerp_fused.weight"))
    assert lerp_row.split()[1:3] == ["F32", "6x256"]
    totals = {line.split()[0]: line.split()[1:3] for line in lines[lines.index("") + 1:]
              if line.split() and line.split()[0] in ("Q4_K", "Q6_K", "F32", "total")}
    # 13 Q4_K matrices (embedding + 6 per layer), one Q6_K head, 48 F32 tensors, 62 in all.
    assert totals["Q4_K"][0] == "13" and totals["Q6_K"] == ["1", str(1024 * 256)]
    assert totals["F32"][0] == "48" and totals["total"][0] == "62"


def test_info_on_a_bad_file_exits_2_with_the_reason(tmp_path, capsys):
    path = tmp_path / "notes.gguf"
    path.write_text("not a model\n")
    assert cli_main(["info", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert str(path) in captured.err and "not a GGUF file" in captured.err


def test_tensor_record_is_frozen(tiny):
    t = tiny.tensor("output.weight")
    assert isinstance(t, Tensor)
    with pytest.raises(AttributeError):
        t.name = "x"  # type: ignore[misc]


# --- garbage never escapes as anything but GGUFError ------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 40_000), flips=st.lists(st.tuples(st.integers(4, 40_000), st.integers(0, 255)),
                                                  max_size=4))
def test_corrupt_headers_raise_only_gguf_errors(f32_path, tmp_path, cut, flips):
    # Cut the file and/or overwrite a few header bytes (the header, with its 1024-entry vocab,
    # spans the first ~16 KB). Whatever happens must be a clean GGUFError or a valid model.
    data = bytearray(f32_path.read_bytes())
    for offset, value in flips:
        data[offset] = value
    if cut:
        data = data[:cut]
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(bytes(data))
    try:
        read_model(path)
    except GGUFError as e:
        assert str(path) in str(e)
