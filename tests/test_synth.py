"""Synthetic RWKV-7 files: same layout as llama.cpp's, deterministic, numerically sane.

The tiny preset has exactly the fixture model's shapes, so each synthetic tiny file is compared
key by key and tensor by tensor with the llama.cpp-made fixture of the same format. The big
presets are checked through their tensor plan (writing them here would take minutes).
"""
from __future__ import annotations

import codecs
import hashlib

import gguf
import numpy as np
import pytest

from rwkvlab import cli, quant, synth
from rwkvlab.gguf import read_model
from rwkvlab.reference import Reference

FIXTURE_NAME = {"f32": "f32", "f16": "f16", "bf16": "bf16", "q8_0": "q8_0",
                "q4_0": "Q4_0", "q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}
TOKENS = [0, 33, 72, 101, 108, 108, 111, 44]  # "<s>Hello," in the world vocab


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict:
    """Every format of the tiny preset, seed 0, written once for the module."""
    folder = tmp_path_factory.mktemp("synth")
    return {fmt: synth.write_synthetic(folder / f"tiny-{fmt}.gguf", "tiny", fmt, progress=False)
            for fmt in synth.FORMATS}


def _fields(reader: gguf.GGUFReader) -> list[tuple[str, list[int]]]:
    return [(k, list(f.types)) for k, f in reader.fields.items()]


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- presets and plans --------------------------------------------------------------------


def test_lora_rank_formula_reproduces_the_real_models():
    assert synth.lora_ranks(2560) == (96, 96, 64, 320)  # RWKV-7 2.9B
    assert synth.lora_ranks(768) == (64, 64, 32, 128)  # RWKV-7 0.1B
    # tiny's ranks are the fixture's, not the formula's (which gives 32/32/32/64 for C=256)
    assert synth.lora_ranks(256) == (32, 32, 32, 64)
    tiny = synth.PRESETS["tiny"]
    assert (tiny.n_embd, tiny.n_layer, tiny.n_ffn, tiny.n_vocab) == (256, 2, 1024, 1024)
    assert (tiny.decay_rank, tiny.iclr_rank, tiny.value_rank, tiny.gate_rank) == (64, 64, 32, 128)


@pytest.mark.parametrize("name,c,layers,ffn", [("0.1b", 768, 12, 3072), ("0.4b", 1024, 24, 4096),
                                              ("1.5b", 2048, 24, 8192), ("2.9b", 2560, 32, 10240),
                                              ("7.2b", 4096, 32, 16384)])
def test_preset_sizes(name, c, layers, ffn):
    p = synth.PRESETS[name]
    assert (p.n_embd, p.n_layer, p.n_ffn, p.n_vocab, p.head_size) == (c, layers, ffn, 65536, 64)
    assert c % 256 == 0 and ffn % 256 == 0  # every K-quant row fills whole super-blocks


def test_plan_of_2_9b():
    plan = {t.name: t for t in synth.tensor_plan("2.9b", "q4_k_m")}
    assert len(plan) == 4 + 32 * 28 + 2
    C, F, V = 2560, 10240, 65536
    expect = {
        "token_embd.weight": ((C, V), "Q4_K"), "output.weight": ((C, V), "Q6_K"),
        "blk.31.time_mix_key.weight": ((C, C), "Q4_K"),
        "blk.31.channel_mix_key.weight": ((C, F), "Q4_K"),
        "blk.31.channel_mix_value.weight": ((F, C), "Q4_K"),
        "blk.31.time_mix_w1.weight": ((C, 96), "F32"), "blk.31.time_mix_w2.weight": ((96, C), "F32"),
        "blk.31.time_mix_a1.weight": ((C, 96), "F32"), "blk.31.time_mix_a2.weight": ((96, C), "F32"),
        "blk.31.time_mix_v1.weight": ((C, 64), "F32"), "blk.31.time_mix_v2.weight": ((64, C), "F32"),
        "blk.31.time_mix_g1.weight": ((C, 320), "F32"), "blk.31.time_mix_g2.weight": ((320, C), "F32"),
        "blk.0.time_mix_v1.weight": ((C, 96), "F32"),  # layer 0's dummy copy of a1: Da-shaped
        "blk.0.time_mix_lerp_fused.weight": ((C, 1, 1, 6), "F32"),
        "blk.0.time_mix_r_k.weight": ((C,), "F32"),
        "token_embd_norm.weight": ((C,), "F32"),
    }
    for name, (ne, typ) in expect.items():
        assert (plan[name].ne, plan[name].ggml_type) == (ne, typ), name
    # llama-quantize orders by layer number; the converter by HF name (layer 10 before 2).
    order = [t.name for t in synth.tensor_plan("2.9b", "q4_k_m")]
    assert order.index("blk.2.attn_norm.bias") < order.index("blk.10.attn_norm.bias")
    order = [t.name for t in synth.tensor_plan("2.9b", "q8_0")]
    assert order.index("blk.10.attn_norm.bias") < order.index("blk.2.attn_norm.bias")
    # Sizes: ~2.9e9 parameters; q8_0 stores 34 bytes per 32 weights.
    q8 = synth.tensor_plan("2.9b", "q8_0")
    n = sum(t.n_elements for t in q8)
    assert 2.85e9 < n < 2.95e9
    assert 2.8 * 2**30 < sum(t.nbytes for t in q8) < 3.2 * 2**30


@pytest.mark.parametrize("fmt", list(synth.FORMATS))
def test_plan_types_match_fixture(fixtures_dir, fmt):
    # The type mix per tensor name, and the order, are llama.cpp's for every format.
    fixture = gguf.GGUFReader(fixtures_dir / f"tiny-{FIXTURE_NAME[fmt]}.gguf")
    expected = [(t.name, tuple(int(x) for x in t.shape), t.tensor_type.name) for t in fixture.tensors]
    assert [(t.name, t.ne, t.ggml_type) for t in synth.tensor_plan("tiny", fmt)] == expected


# ---- tiny files against the fixtures ------------------------------------------------------


@pytest.mark.parametrize("fmt", list(synth.FORMATS))
def test_tiny_file_has_the_fixture_layout(fixtures_dir, tiny_files, fmt):
    mine = gguf.GGUFReader(tiny_files[fmt])
    theirs = gguf.GGUFReader(fixtures_dir / f"tiny-{FIXTURE_NAME[fmt]}.gguf")
    assert _fields(mine) == _fields(theirs)  # same keys, same order, same value types
    for key, field in mine.fields.items():
        if key == "general.name":
            assert field.contents() == "rwkvlab synthetic tiny"
        elif not key.startswith("GGUF."):  # GGUF.* are header counts, equal via the line above
            assert field.contents() == theirs.fields[key].contents(), key
    assert [(t.name, t.tensor_type, list(t.shape)) for t in mine.tensors] == \
           [(t.name, t.tensor_type, list(t.shape)) for t in theirs.tensors]


@pytest.mark.parametrize("fmt", list(synth.FORMATS))
def test_tiny_tensor_bytes_are_the_quantized_values(tiny_files, fmt):
    # Each tensor holds exactly quantize(tensor_values): the same weights in every format.
    tensors = {t.name: t for t in gguf.GGUFReader(tiny_files[fmt]).tensors}
    for t in synth.tensor_plan("tiny", fmt):
        stored = np.asarray(tensors[t.name].data).view(np.uint8).reshape(-1)
        expected = quant.quantize(synth.tensor_values(t, seed=0), t.ggml_type).reshape(-1)
        assert np.array_equal(stored, expected), t.name
    # Layer 0's value-residual tensors are copies of the iclr ones, as the converter writes them.
    for i in (0, 1, 2):
        a, v = tensors[f"blk.0.time_mix_a{i}.weight"], tensors[f"blk.0.time_mix_v{i}.weight"]
        assert np.array_equal(np.asarray(a.data), np.asarray(v.data))


def test_tiny_weights_have_the_fixture_statistics(fixtures_dir, tiny_files):
    # Each tensor's distribution mimics the fixture's: std and mean agree within 4 standard
    # errors of the difference of two n-sample estimates (std: sqrt(2) * std / sqrt(2n) for a
    # normal; mean: sqrt(2) * std / sqrt(n)), and the uniformly drawn ones (norm weights, decays
    # w0, mixes, k_k/k_a) stay inside the fixture's range widened by 2% of its span (their range
    # is what keeps decays and mixes valid).
    mine = {t.name: np.asarray(t.data, np.float64) for t in gguf.GGUFReader(tiny_files["f32"]).tensors}
    init = {t.name: t.init for t in synth.tensor_plan("tiny", "f32")}
    for t in gguf.GGUFReader(fixtures_dir / "tiny-f32.gguf").tensors:
        ref, got = np.asarray(t.data, np.float64), mine[t.name]
        n = ref.size
        assert abs(got.std() - ref.std()) <= 4 * ref.std() / np.sqrt(n), t.name
        assert abs(got.mean() - ref.mean()) <= 4 * np.sqrt(2) * ref.std() / np.sqrt(n), t.name
        if init[t.name].startswith("uniform"):
            margin = 0.02 * (ref.max() - ref.min())
            assert ref.min() - margin <= got.min() and got.max() <= ref.max() + margin, t.name


@pytest.mark.parametrize("fmt", ["f32", "q4_k_m"])
def test_reference_forward_is_sane(tiny_files, fmt):
    logits = Reference(read_model(tiny_files[fmt])).logits(TOKENS)
    assert logits.shape == (len(TOKENS), 1024) and np.all(np.isfinite(logits))
    # The fixture's random model gives logits with std ~1 per row; ours must too (not 1e-3, not 1e3).
    assert np.all((0.5 < logits.std(axis=1)) & (logits.std(axis=1) < 3.0))
    assert np.abs(logits).max() < 20


def test_deep_model_stays_sane(tmp_path):
    # The real presets have up to 32 layers; a narrow 32-layer model checks that the residual
    # stream and the state do not blow up with depth under these weight ranges.
    deep = synth.Preset("deep", n_embd=128, n_layer=32, n_ffn=512, n_vocab=1024,
                        decay_rank=32, iclr_rank=32, value_rank=32, gate_rank=64)
    path = synth.write_synthetic(tmp_path / "deep.gguf", deep, "f16", progress=False)
    logits = Reference(read_model(path)).logits(TOKENS + [261] * 8)
    assert np.all(np.isfinite(logits))
    assert np.all((0.5 < logits.std(axis=1)) & (logits.std(axis=1) < 3.0))


# ---- determinism and caching --------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, tiny_files):
    again = synth.write_synthetic(tmp_path / "again.gguf", "tiny", "q4_k_m", seed=0, progress=False)
    assert _sha256(again) == _sha256(tiny_files["q4_k_m"])
    other = synth.write_synthetic(tmp_path / "other.gguf", "tiny", "q4_k_m", seed=1, progress=False)
    assert _sha256(other) != _sha256(tiny_files["q4_k_m"])


def test_worker_processes_write_the_same_bytes(tmp_path, tiny_files, monkeypatch):
    # Big files are written by a process pool, chunk by chunk at fixed offsets; force that path
    # on tiny (with chunks of 16K elements, so tensors span several) and compare.
    monkeypatch.setattr(synth, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(synth, "_worker_count", lambda: 2)
    monkeypatch.setattr(synth, "CHUNK_ELEMENTS", 1 << 14)
    path = synth.write_synthetic(tmp_path / "pool.gguf", "tiny", "q6_k", progress=False)
    serial = tmp_path / "serial.gguf"
    monkeypatch.setattr(synth, "PARALLEL_MIN_BYTES", 1 << 40)
    synth.write_synthetic(serial, "tiny", "q6_k", progress=False)
    assert _sha256(path) == _sha256(serial)


def test_default_model_path_writes_once(tmp_path, monkeypatch):
    monkeypatch.setenv("RWKVLAB_CACHE", str(tmp_path / "cache"))
    path = synth.default_model_path()
    assert path.parent == tmp_path / "cache" and path.name.endswith("tiny-f32-seed0.gguf")
    assert read_model(path).spec.n_embd == 256
    stamp = path.stat().st_mtime_ns
    assert synth.default_model_path() == path and path.stat().st_mtime_ns == stamp
    assert not list(path.parent.glob(".*.tmp"))  # no half-written leftovers
    q8 = synth.default_model_path("tiny", "q8_0", seed=3)
    assert q8 != path and gguf.GGUFReader(q8).tensors[0].tensor_type.name == "Q8_0"


def test_cli_synth(tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    assert cli.main(["synth", "--preset", "tiny", "--format", "q5_k_m", "--seed", "2", "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == 17  # MOSTLY_Q5_K_M


def test_unknown_preset_and_format_are_named():
    with pytest.raises(ValueError, match="unknown preset '3b'.*tiny"):
        synth.tensor_plan("3b")
    with pytest.raises(ValueError, match="unknown synthetic format 'q3_k'.*q4_k_m"):
        synth.tensor_plan("tiny", "q3_k")


# ---- vocabulary ---------------------------------------------------------------------------


def test_vocab(fixtures_dir):
    fixture = gguf.GGUFReader(fixtures_dir / "tiny-f32.gguf").fields["tokenizer.ggml.tokens"].contents()
    assert synth.vocab(1024) == fixture
    big = synth.vocab(65536)
    assert len(big) == 65536 and len(set(big)) == 65536 and big[:1024] == fixture
    for token in big[1024:1100] + big[-50:]:
        raw = codecs.escape_decode(token.encode("ascii"))[0]
        assert len(raw) == 4 and repr(raw)[2:-1] == token  # escaped exactly as GGUF stores tokens
    assert synth.vocab(65536) == big  # deterministic
