"""Hostile GGUF input: every corrupt file ends in a GGUFError or a GGUFWarning, never anything else.

Every file here is made in the test from the rwkv7-tiny fixtures by patching bytes in place (the
positions come from gguf-py's reader of the pristine file), so nothing binary is committed.
The named cases each get a test that checks the message names the file and the problem; the
corpus test then reads some 1,100 mutated files in a subprocess with a memory limit and a
timeout, so a regression to unbounded memory or a hang fails the test instead of the machine.
"""
from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from rwkvlab.gguf import GGUFError, GGUFWarning, read_model

FIXTURES = Path(os.environ.get("RWKVLAB_FIXTURES")
                or Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "rwkv7-tiny")

# The corpus child may use this much address space: ~115 MiB is what Python, NumPy and gguf-py
# map after reading tiny-f32.gguf, so 512 MiB leaves room for any legitimate read and stops a
# reader that sizes allocations by a corrupt count within a second or two.
CORPUS_MEMORY = 512 << 20
CORPUS_TIMEOUT = 90  # seconds; the corpus takes ~10 s here


# --- where things are in a pristine file -----------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Byte positions of a fixture's header fields, read with gguf-py's own reader."""

    data: bytes
    data_start: int
    kv: dict[str, tuple[int, int]]  # key -> (offset of its type id, offset of its value)
    tensors: dict[str, dict[str, int]]  # name -> offsets of name, n_dims, ne, type, offset fields
    tensor_order: list[str]


_LAYOUTS: dict[str, Layout] = {}


def layout(fmt: str) -> Layout:
    if fmt not in _LAYOUTS:
        path = FIXTURES / f"tiny-{fmt}.gguf"
        reader = GGUFReader(path)
        kv = {}
        for key, field in reader.fields.items():
            if not key.startswith("GGUF."):
                type_at = field.offset + 8 + len(key.encode())
                kv[key] = (type_at, type_at + 4)
        tensors = {}
        for t in reader.tensors:
            name_at = t.field.offset + 8
            ndims_at = name_at + len(t.name.encode())
            type_at = ndims_at + 4 + 8 * len(t.shape)
            tensors[t.name] = dict(name=name_at, n_dims=ndims_at, ne=ndims_at + 4, type=type_at,
                                   offset=type_at + 4, data=int(t.data_offset), nbytes=int(t.n_bytes))
        _LAYOUTS[fmt] = Layout(path.read_bytes(), int(reader.data_offset), kv, tensors,
                               [t.name for t in reader.tensors])
    return _LAYOUTS[fmt]


def patched(fmt: str, *edits: tuple[int, bytes]) -> bytes:
    data = bytearray(layout(fmt).data)
    for at, value in edits:
        data[at:at + len(value)] = value
    return bytes(data)


def u32(v: int) -> bytes:
    return struct.pack("<I", v & 0xFFFFFFFF)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF)


def f32(v: float) -> bytes:
    return struct.pack("<f", v)


def kv_value(fmt: str, key: str, value: bytes) -> bytes:
    return patched(fmt, (layout(fmt).kv[key][1], value))


def tensor_field(fmt: str, name: str, field: str, value: bytes) -> bytes:
    return patched(fmt, (layout(fmt).tensors[name][field], value))


def with_extra_key(fmt: str, key: str, type_and_value: bytes) -> bytes:
    """The fixture with one more metadata key, inserted first. Its key name is padded so the
    entry is a multiple of the 32-byte alignment: the data section then moves by whole
    alignment units and every tensor offset (relative to it) stays right."""
    lay = layout(fmt)
    name = key.encode()
    name += b"_" * (-(8 + len(name) + len(type_and_value)) % 32)
    entry = u64(len(name)) + name + type_and_value
    n_kv = struct.unpack_from("<Q", lay.data, 16)[0]
    return lay.data[:16] + u64(n_kv + 1) + entry + lay.data[24:]


def nested_array(depth: int) -> bytes:
    """type ARRAY, then `depth` arrays each holding the next; the innermost is an empty uint8 array."""
    return u32(9) + (u32(9) + u64(1)) * (depth - 1) + u32(0) + u64(0)


def f16_bits(value: float) -> bytes:
    return np.array([value], dtype=np.float16).tobytes()


# --- the named cases ---------------------------------------------------------------------------


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(GGUFError) as info:
        read_model(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1"}


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (CORPUS_MEMORY, CORPUS_MEMORY))


def read_in_limited_child(path: Path) -> str:
    """read_model(path) in a subprocess under CORPUS_MEMORY and a timeout; the GGUFError text.

    For the cases that used to grow memory without bound: a regression then fails this test
    (MemoryError, or the timeout) instead of taking the machine's memory."""
    code = ("import resource, sys; from rwkvlab.gguf import GGUFError, read_model\n"
            f"resource.setrlimit(resource.RLIMIT_AS, ({CORPUS_MEMORY}, {CORPUS_MEMORY}))\n"
            "try:\n    read_model(sys.argv[1])\nexcept GGUFError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          timeout=60, env=_child_env())
    assert done.returncode == 0 and done.stdout.count("\n") == 1, done.stderr[-2000:]
    return done.stdout.strip()


def test_huge_block_count_is_refused_before_anything_is_sized_by_it(tmp_path):
    path = write(tmp_path, "layers.gguf", kv_value("f32", "rwkv7.block_count", u32(0xFFFFFFFF)))
    message = read_in_limited_child(path)
    assert message.startswith(f"{path}: metadata key 'rwkv7.block_count' is 4294967295, but the "
                              "file holds tensors for layers 0..1"), message
    assert "corrupt" in message and "truncated" not in message


def test_block_count_smaller_than_the_layers_present(tmp_path):
    path = write(tmp_path, "layers.gguf", kv_value("f32", "rwkv7.block_count", u32(1)))
    expect_error(path, "tensors for layer 1", "'blk.1.", "'rwkv7.block_count' is 1")


def test_info_on_a_corrupt_file_prints_one_line_and_exits_2(tmp_path):
    path = write(tmp_path, "layers.gguf", kv_value("f32", "rwkv7.block_count", u32(0xFFFFFFFF)))
    done = subprocess.run([sys.executable, "-m", "rwkvlab.cli", "info", str(path)],
                          capture_output=True, text=True, timeout=60, env=_child_env(),
                          preexec_fn=_limit_memory)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"rwkvlab info: {path}: ") and "block_count" in done.stderr


def test_arrays_nested_20000_deep_are_a_clear_error(tmp_path):
    path = write(tmp_path, "nested.gguf", with_extra_key("f32", "x.deep", nested_array(20_000)))
    expect_error(path, "corrupt GGUF header", "metadata key 'x.deep", "nested more than 3 deep")


def test_arrays_nested_within_the_bound_still_read(tmp_path):
    # Guards the helper above and the bound: gguf-py writes nested lists, 3 levels read.
    model = read_model(write(tmp_path, "nested.gguf", with_extra_key("f32", "x.ok", nested_array(3))))
    assert model.spec.n_layer == 2
    assert any(k.startswith("x.ok") for k in model.metadata)
    expect_error(write(tmp_path, "deeper.gguf", with_extra_key("f32", "x.no", nested_array(4))),
                 "nested more than 3 deep")


def test_overlapping_tensor_data(tmp_path):
    lay = layout("f32")
    a, b = lay.tensor_order[5], lay.tensor_order[6]
    overlap = lay.tensors[a]["data"] - lay.data_start + 32  # 32 bytes into tensor a
    path = write(tmp_path, "overlap.gguf", tensor_field("f32", b, "offset", u64(overlap)))
    message = expect_error(path, f"tensor {b!r}", f"inside tensor {a!r}", "overlap")
    assert "truncated" not in message


def test_misaligned_tensor_offset(tmp_path):
    lay = layout("f32")
    name = lay.tensor_order[10]
    shifted = lay.tensors[name]["data"] - lay.data_start + 4
    path = write(tmp_path, "misaligned.gguf", tensor_field("f32", name, "offset", u64(shifted)))
    expect_error(path, f"tensor {name!r}", "not a multiple of the alignment 32")


@pytest.mark.parametrize(("fmt", "name", "type_id", "type_name"), [
    ("f32", "blk.0.time_mix_k_k.weight", 1, "F16"),  # F32 -> F16: half the bytes
    ("Q4_K_M", "output.weight", 12, "Q4_K"),  # Q6_K -> Q4_K: 144 of 210 bytes per block
    ("q8_0", "blk.1.time_mix_key.weight", 2, "Q4_0"),  # Q8_0 -> Q4_0: 18 of 34 bytes
])
def test_tensor_type_changed_to_a_smaller_one(tmp_path, fmt, name, type_id, type_name):
    path = write(tmp_path, "smaller.gguf", tensor_field(fmt, name, "type", u32(type_id)))
    message = expect_error(path, f"tensor {name!r} ({type_name}", "declared smaller than")
    assert "truncated" not in message


def test_last_tensor_type_changed_to_a_smaller_one(tmp_path):
    last = layout("f32").tensor_order[-1]
    path = write(tmp_path, "smaller.gguf", tensor_field("f32", last, "type", u32(1)))
    expect_error(path, "follow the last tensor", f"{last!r} (F16", "declared smaller than")


def test_duplicate_tensor_names(tmp_path):
    lay = layout("f32")
    first, second = "blk.0.attn_norm.weight", "blk.1.attn_norm.weight"
    path = write(tmp_path, "dup.gguf", tensor_field("f32", second, "name", first.encode()))
    i, j = lay.tensor_order.index(first), lay.tensor_order.index(second)
    expect_error(path, f"tensor #{j} {first!r}", f"used twice (tensors #{i} and #{j})")


@pytest.mark.parametrize("eps", [math.nan, math.inf, -math.inf, -1e-5, 0.5, 1e30])
def test_absurd_layer_norm_epsilon(tmp_path, eps):
    path = write(tmp_path, "eps.gguf", kv_value("f32", "rwkv7.attention.layer_norm_epsilon", f32(eps)))
    expect_error(path, "'rwkv7.attention.layer_norm_epsilon' is", "finite number from 0 to 0.01")


@pytest.mark.parametrize(("fmt", "name", "at", "bits", "kind"), [
    ("f32", "blk.1.time_mix_key.weight", 4 * 1000, f32(math.nan), "F32: 1 values"),
    ("f16", "blk.0.time_mix_value.weight", 2 * 7, f16_bits(math.inf), "F16: 1 values"),
    ("bf16", "token_embd.weight", 0, bytes([0x80, 0x7F]), "BF16: 1 values"),  # bf16 +inf
    ("q8_0", "blk.0.channel_mix_key.weight", 34 * 3, f16_bits(math.nan), "Q8_0: 1 block scales"),
    ("Q4_K_M", "blk.1.time_mix_output.weight", 144 * 5 + 2, f16_bits(-math.inf), "Q4_K: 1 block"),
    ("Q4_K_M", "output.weight", 210 * 9 + 208, f16_bits(math.nan), "Q6_K: 1 block scales"),
], ids=["f32", "f16", "bf16", "q8_0-scale", "q4_k-dmin", "q6_k-scale"])
def test_nan_or_inf_weights_warn_naming_the_tensor(tmp_path, fmt, name, at, bits, kind):
    path = write(tmp_path, "nan.gguf", patched(fmt, (layout(fmt).tensors[name]["data"] + at, bits)))
    with pytest.warns(GGUFWarning) as record:
        read_model(path)
    message = str(record[0].message)
    assert str(path) in message and f"{name!r} ({kind}" in message and "NaN or Inf" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_model(path, check_values=False)  # rwkvlab info skips the scan
        read_model(FIXTURES / f"tiny-{fmt}.gguf")  # and a clean file never warns


def test_loading_a_file_with_nan_weights_warns_once_naming_the_tensor(tmp_path):
    """The engine's load runs the same scan beside the upload (a "scan" load phase) and gives
    read_model's warning before it returns."""
    from rwkvlab.engine import load

    name = "blk.1.time_mix_key.weight"
    path = write(tmp_path, "nan.gguf", patched("f32", (layout("f32").tensors[name]["data"] + 4000, f32(math.nan))))
    with pytest.warns(GGUFWarning) as record:
        engine = load(path, progress=False)
    messages = [str(r.message) for r in record if issubclass(r.category, GGUFWarning)]
    assert len(messages) == 1 and f"{name!r} (F32: 1 values" in messages[0]
    assert "scan" in engine.load_phases.spans


@pytest.mark.parametrize(("edit", "fragments"), [
    (lambda: patched("f32", (8, u64(0xFFFFFFFF))), ["declares 4294967295 tensors", "count is corrupt"]),
    (lambda: patched("f32", (16, u64(1 << 62))), ["metadata keys", "count is corrupt"]),
    (lambda: kv_value("f32", "tokenizer.ggml.tokens", u32(8) + u64(1 << 40)),
     ["'tokenizer.ggml.tokens'", "declares 1099511627776 elements"]),
    (lambda: tensor_field("f32", "output.weight", "name", b"\xff"),
     ["tensor #", "is not valid UTF-8"]),
    (lambda: tensor_field("f32", "output.weight", "n_dims", u32(7)), ["7 dimensions", "at most 4"]),
    (lambda: tensor_field("f32", "blk.0.time_mix_v1.weight", "ne", u64(1 << 40)),
     ["inside tensor 'blk.0.time_mix_v1.weight' (F32, ne [1099511627776, ", "overlap"]),
    (lambda: kv_value("f32", "general.name", u64(1 << 50)), ["'general.name'", "over the 1073741824"]),
])
def test_corruption_is_not_called_truncation(tmp_path, edit, fragments):
    message = expect_error(write(tmp_path, "corrupt.gguf", edit()), *fragments)
    assert "truncated" not in message and "download" not in message


def test_real_truncation_is_still_called_truncation(tmp_path):
    data = layout("Q4_K_M").data
    for cut in (len(data) - 1, len(data) // 2, layout("Q4_K_M").data_start + 10):
        expect_error(write(tmp_path, "cut.gguf", data[:cut]), "is truncated", "download it again")
    expect_error(write(tmp_path, "cut.gguf", data[:5000]), "is truncated", "header",
                 "tokenizer.ggml.tokens")


# --- the corpus --------------------------------------------------------------------------------


def corpus() -> Iterator[tuple[str, str, bytes]]:
    """(name, kind, file bytes) for every mutated file, made one at a time; deterministic."""
    rng = np.random.default_rng(12)
    lay = layout("Q4_K_M")
    base, size, head = lay.data, len(lay.data), lay.data_start

    # truncation: every early offset of the fixed header, then spread over header and data
    cuts = sorted(set(range(0, 40)) | set(rng.integers(40, head, 40).tolist())
                  | set(rng.integers(head, size, 40).tolist()) | {head, size - 1})
    for cut in cuts:
        yield (f"cut-{cut}", "cut-header" if cut < head else "cut-data", base[:cut])
    # byte and bit flips anywhere in the header (magic excluded: that is one well-known error)
    for at in rng.integers(4, head, 120):
        data = bytearray(base)
        data[at] = int(rng.integers(0, 256))
        yield (f"byte-{at}", "flip", bytes(data))
    for at in rng.integers(4 * 8, head * 8, 120):
        data = bytearray(base)
        data[at // 8] ^= 1 << (at % 8)
        yield (f"bit-{at}", "flip", bytes(data))
    # header counts and version
    for value in (0, 1, 61, 63, 1 << 20, 0xFFFFFFFF, 1 << 63, (1 << 64) - 1):
        yield (f"n_tensors-{value}", "count", patched("Q4_K_M", (8, u64(value))))
        yield (f"n_kv-{value}", "count", patched("Q4_K_M", (16, u64(value))))
    for value in (0, 1, 2, 4, 0x00030000, 0x03000000, 0xFFFFFFFF):
        yield (f"version-{value}", "count", patched("Q4_K_M", (4, u32(value))))
    # every metadata key: key length, type id, and array item type / length
    for key, (type_at, value_at) in lay.kv.items():
        for n in (0, 1 << 31, (1 << 64) - 1):
            yield (f"klen-{key}-{n}", "kv", patched("Q4_K_M", (type_at - len(key) - 8, u64(n))))
        for t in (8, 9, 13, 255, 0xFFFFFFFF):
            yield (f"vtype-{key}-{t}", "kv", patched("Q4_K_M", (type_at, u32(t))))
        if base[type_at] == 9:  # an array: item type and length
            for t in (9, 13, 0xFFFFFFFF):
                yield (f"itype-{key}-{t}", "kv", patched("Q4_K_M", (value_at, u32(t))))
            for n in (0, 1, 1 << 20, 1 << 30, 1 << 62):
                yield (f"alen-{key}-{n}", "kv", patched("Q4_K_M", (value_at + 4, u64(n))))
        elif base[type_at] == 8:  # a string: its length
            for n in (0, 1 << 20, (1 << 64) - 1):
                yield (f"slen-{key}-{n}", "kv", patched("Q4_K_M", (value_at, u64(n))))
    # metadata values the spec is built from
    for key in ("rwkv7.block_count", "rwkv7.embedding_length", "rwkv7.wkv.head_size",
                "rwkv7.feed_forward_length", "rwkv7.attention.gate_lora_rank"):
        for v in (0, 1, 3, 255, 0x7FFFFFFF, 0xFFFFFFFF):
            yield (f"value-{key}-{v}", "spec", kv_value("Q4_K_M", key, u32(v)))
    for eps in (math.nan, math.inf, -1.0, 0.5, 1e30):
        yield (f"eps-{eps}", "spec", kv_value("Q4_K_M", "rwkv7.attention.layer_norm_epsilon", f32(eps)))
    # tensor infos: a sample of tensors, every field
    names = lay.tensor_order
    for name in names[::5] + [names[-1]]:
        t = lay.tensors[name]
        rel = t["data"] - head
        for n in (0, 64, 1 << 40):
            yield (f"tname-{name}-{n}", "tensor", patched("Q4_K_M", (t["name"] - 8, u64(n))))
        for n in (0, 3, 5, 0xFFFFFFFF):
            yield (f"ndims-{name}-{n}", "tensor", tensor_field("Q4_K_M", name, "n_dims", u32(n)))
        for v in (0, 1, 2 * 256, 1 << 40, 1 << 63, (1 << 64) - 1):
            yield (f"ne0-{name}-{v}", "tensor", tensor_field("Q4_K_M", name, "ne", u64(v)))
        for ty in (0, 1, 2, 3, 8, 12, 13, 14, 30, 200, 0xFFFFFFFF):
            yield (f"type-{name}-{ty}", "tensor", tensor_field("Q4_K_M", name, "type", u32(ty)))
        for v in (rel + 1, rel + 16, rel + 32, rel - 32, 0, size, 1 << 62, (1 << 64) - 1):
            yield (f"offset-{name}-{v}", "offset", tensor_field("Q4_K_M", name, "offset", u64(v)))
    # the named cases
    yield ("nested-20000", "named", with_extra_key("Q4_K_M", "x.deep", nested_array(20_000)))
    yield ("nested-3", "named-ok", with_extra_key("Q4_K_M", "x.ok", nested_array(3)))
    yield ("dup-name", "named", tensor_field("Q4_K_M", "blk.1.attn_norm.weight", "name", b"blk.0"))
    yield ("nan-q4k", "named-warn", patched("Q4_K_M", (lay.tensors["blk.0.time_mix_key.weight"]["data"],
                                                    f16_bits(math.nan))))
    yield ("nan-f32", "named-warn", patched("Q4_K_M", (lay.tensors["blk.0.attn_norm.bias"]["data"],
                                                    f32(math.inf))))


def _corpus_child(fixtures: str, out_dir: str) -> None:
    """Runs in the limited subprocess: read every corpus file as read_model's users do."""
    import resource
    import traceback

    from rwkvlab.gguf import expected_shapes, format_info
    from rwkvlab.tokenizer import Tokenizer

    resource.setrlimit(resource.RLIMIT_AS, (CORPUS_MEMORY, CORPUS_MEMORY))
    path = Path(out_dir) / "case.gguf"
    results = []
    for name, kind, data in corpus():
        print(name, flush=True)  # the last name printed is the culprit of a hang
        path.write_bytes(data)
        row = {"name": name, "kind": kind, "outcome": "ok", "message": ""}
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                model = read_model(path)  # what rwkvlab.load and the bench worker call
                format_info(read_model(path, check_values=False))  # what `rwkvlab info` prints
                expected_shapes(model.spec)
                Tokenizer.from_model(model)
            for w in seen:
                ok = issubclass(w.category, GGUFWarning) and str(path) in str(w.message)
                row.update(outcome="warning" if ok else "bad-warning", message=str(w.message))
        except GGUFError as e:
            row.update(outcome="error", message=str(e))
        except BaseException as e:  # noqa: BLE001 - anything else is what the test looks for
            row.update(outcome="crash", message="".join(traceback.format_exception(e))[-2000:])
        results.append(row)
    (Path(out_dir) / "results.json").write_text(json.dumps(results))


def test_hostile_corpus_ends_in_gguf_errors_or_warnings_only(tmp_path):
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import test_gguf_hostile as t; t._corpus_child({str(FIXTURES)!r}, {str(tmp_path)!r})")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=CORPUS_TIMEOUT, env=_child_env())
    except subprocess.TimeoutExpired as e:
        last = (e.stdout or b"").decode().strip().splitlines()[-1:]
        pytest.fail(f"the corpus took over {CORPUS_TIMEOUT} s; last file started: {last}")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) >= 1000

    bad = [r for r in results if r["outcome"] in ("crash", "bad-warning")]
    assert not bad, "\n\n".join(f"{r['name']}: {r['message']}" for r in bad[:5])
    path = str(tmp_path / "case.gguf")
    for r in results:
        if r["outcome"] == "error":
            assert r["message"].startswith(path) and "\n" not in r["message"], r
        # a file is called truncated only when it is shorter than the fixture it came from, or
        # (saying both) where an array of numbers declares more values than the file holds
        if ("truncated" in r["message"] or "download" in r["message"]) and not r["kind"].startswith("cut"):
            assert "or that count is corrupt" in r["message"], r
        if r["kind"].startswith("cut"):
            assert r["outcome"] == "error", r
        if r["kind"] in ("cut-data", "offset"):
            assert ("is truncated" in r["message"]) == (r["kind"] == "cut-data"), r
    by_name = {r["name"]: r for r in results}
    assert "nested more than 3 deep" in by_name["nested-20000"]["message"]
    assert by_name["nested-3"]["outcome"] == "ok"
    assert "used twice" in by_name["dup-name"]["message"]
    assert "'blk.0.time_mix_key.weight' (Q4_K: 1 block scales)" in by_name["nan-q4k"]["message"]
    assert "'blk.0.attn_norm.bias' (F32: 1 values)" in by_name["nan-f32"]["message"]
    assert "holds tensors for layers 0..1" in by_name["value-rwkv7.block_count-4294967295"]["message"]
    # the corpus must exercise both sides: files that still read, and many distinct errors
    assert sum(r["outcome"] == "ok" for r in results) >= 10
    assert len({r["message"].split(": ", 1)[-1][:40] for r in results if r["outcome"] == "error"}) >= 40
