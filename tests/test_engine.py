"""The engine end to end on lavapipe: llama.cpp's logits, the NumPy reference, and itself.

One engine per (file, options) per module (fixture `engine`): loading compiles pipelines and
lavapipe is slow, and wgpu wants one device per process (gpu.get_gpu caches it).

Tolerances:
- f32 file vs llama.cpp: 1e-3 (the fixture README: fp32 engines agree to ~1e-5).
- f16 / bf16 / q8_0 / Q4_0 / Q4_K_M / Q5_K_M / Q6_K vs llama.cpp: 0.2 max abs, and the same
  argmax wherever llama.cpp's top-1 / top-2 margin exceeds 0.05: llama.cpp rounds activations
  inside its quantized dot products, an exact dequantize-then-multiply engine differs by up to
  ~0.15 (README).
- vs the NumPy reference on the same dequantized weights: 1e-3 (fp32 accumulation over K <= 1024
  against float64; observed ~1e-5).
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_same_plan
from rwkvlab import engine as engine_mod
from rwkvlab import gpu as gpu_runtime
from rwkvlab import kernels as kn
from rwkvlab import options as options_mod
from rwkvlab.cli import main as cli_main
from rwkvlab.engine import Engine, EngineError, load
from rwkvlab.gguf import read_model
from rwkvlab.options import Options, OptionsError
from rwkvlab.reference import Reference, dequantized_weights

TOKENS = [0, 33, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 10, 85, 115, 101, 114, 58]
QUANT_FILES = ["Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K"]  # read in-kernel by shaders/quants.wgsl
FILE_FORMATS = ["f32", "f16", "bf16", "q8_0", *QUANT_FILES]
LLAMA_TOL = {"f32": 1e-3, **{f: 0.2 for f in FILE_FORMATS[1:]}}
MARGIN = 0.05


@pytest.fixture(scope="module")
def engine(fixtures_dir):
    """engine(fmt, split_bytes=None, **options) -> a loaded Engine, shared within the module;
    unfused unless `fusions` is given (the plan every fusion is compared with)."""
    cache: dict[tuple, Engine] = {}

    def get(fmt: str, split_bytes: int | None = None, **options) -> Engine:
        options.setdefault("fusions", frozenset())
        key = (fmt, split_bytes, tuple(sorted(options.items(), key=str)))
        if key not in cache:
            cache[key] = load(fixtures_dir / f"tiny-{fmt}.gguf", Options(**options), progress=False,
                              split_bytes=split_bytes)
        e = cache[key]
        e.reset()
        return e

    return get


def assert_llama_parity(got: np.ndarray, want: np.ndarray, tol: float) -> None:
    assert got.shape == want.shape
    diff = np.abs(got - want).max()
    assert diff <= tol, f"max abs difference {diff:.4g} > {tol}"
    top2 = np.sort(want, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > MARGIN
    assert clear.sum() >= len(want) // 2, "too few rows with a clear winner to compare argmax on"
    np.testing.assert_array_equal(got.argmax(1)[clear], want.argmax(1)[clear])


# --- agreement with llama.cpp and with the reference ---------------------------------------------


@pytest.mark.parametrize("path", ["webgpu", "native"])
@pytest.mark.parametrize("fmt", FILE_FORMATS)
def test_matches_llama_cpp(engine, fixtures_dir, fmt, path):
    e = engine(fmt, path=path)
    want = np.load(fixtures_dir / f"tiny-{fmt}.logits.npy")
    assert_llama_parity(e.logits(TOKENS), want, LLAMA_TOL[fmt])
    assert all(e.weight_formats[n] == e.model.tensor(n).ggml_type for n in e.matrices), \
        "the kernels read every matrix in the file's own format"
    if path == "native":
        assert e.tuning.subgroups, "lavapipe has subgroups: the native path must use them"


def test_a_type_without_kernel_is_dequantized_to_f16(fixtures_dir, monkeypatch):
    """Every type the reader accepts has a kernel; one without (here Q4_K, hidden from the
    kernels) would be dequantized to F16 at load, and the engine says so."""
    monkeypatch.setattr(kn, "GPU_FORMATS", {k: v for k, v in kn.GPU_FORMATS.items() if k != "Q4_K"})
    with pytest.warns(UserWarning, match="dequantized to F16"):
        e = load(fixtures_dir / "tiny-Q4_K_M.gguf", progress=False)
    assert e.weight_formats["blk.0.time_mix_key.weight"] == "F16"
    assert e.weight_formats["output.weight"] == "Q6_K"
    want = np.load(fixtures_dir / "tiny-Q4_K_M.logits.npy")
    assert_llama_parity(e.logits(TOKENS), want, 0.2)


@pytest.mark.parametrize("fmt", FILE_FORMATS)
def test_matches_reference_on_same_weights(engine, reference, fmt):
    """Same dequantized weights, so only fp32 vs float64 arithmetic separates them."""
    got = engine(fmt).logits(TOKENS)
    want = reference(fmt).logits(TOKENS)
    assert np.abs(got - want).max() <= 1e-3


# --- the engine agrees with itself --------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["f32", "q8_0"])
def test_logits_equal_stepping(engine, fmt):
    """GEMM over the chunk vs mat-vec token by token: the same sums in a different order, so
    they differ by fp32 rounding only (~1e-6 here; 1e-4 leaves room for larger logits)."""
    e = engine(fmt)
    batched = e.logits(TOKENS)
    e.reset()
    stepped = np.stack([e.step(t) for t in TOKENS])
    assert np.abs(batched - stepped).max() <= 1e-4
    e.reset()
    assert np.abs(e.prefill(TOKENS) - batched[-1]).max() <= 1e-4


@pytest.mark.parametrize("chunk", [5, 7])
def test_prefill_in_several_chunks_equals_one_chunk(engine, chunk):
    """22 tokens in chunks of 5 (last chunk 2) or 7 (last chunk 1: the mat-vec path): the state
    carried between chunks (att_prev, ffn_prev, wkv) must make it the same computation."""
    one = engine("f32")
    whole = one.logits(TOKENS)
    after = one.logits([65, 66])
    e = engine("f32", chunk=chunk)
    assert np.abs(e.logits(TOKENS) - whole).max() <= 1e-5
    assert np.abs(e.logits([65, 66]) - after).max() <= 1e-5
    e.reset()
    assert np.abs(e.prefill(TOKENS) - whole[-1]).max() <= 1e-5
    one.reset()
    e.reset()
    assert e.generate(TOKENS, 6) == one.generate(TOKENS, 6)


def test_reset_restores_a_fresh_state(engine):
    e = engine("f32")
    first = e.logits(TOKENS[:6])
    again = e.logits(TOKENS[:6])
    assert np.abs(first - again).max() > 1e-2, "the state must carry over between calls"
    e.reset()
    np.testing.assert_array_equal(e.logits(TOKENS[:6]), first)


def test_weights_f16_close_to_native(engine):
    """q8_0 weights rounded to f16 at load: each weight moves by <= 2^-11 relative, which moves
    the logits by ~1e-2 here (observed 6e-3); 0.05 also keeps every clear argmax."""
    native = engine("q8_0").logits(TOKENS)
    e = engine("q8_0", weights="f16")
    assert set(e.weight_formats[n] for n in e.matrices) == {"F16"}
    as_f16 = e.logits(TOKENS)
    assert np.abs(as_f16 - native).max() <= 0.05
    assert_llama_parity(as_f16, native, 0.05)


# --- Q4_0, Q4_K, Q5_K, Q6_K read in-kernel ---------------------------------------------------------


@pytest.fixture(scope="module")
def f16_reference(fixtures_dir):
    """The reference on the weights an engine with weights="f16" holds: every matrix the engine
    uploads, dequantized and rounded to f16 exactly as the engine rounds it at load."""
    cache: dict[str, Reference] = {}

    def get(fmt: str, matrices) -> Reference:
        if fmt not in cache:
            model = read_model(fixtures_dir / f"tiny-{fmt}.gguf")
            weights = dequantized_weights(model)
            for name in matrices:
                weights[name] = weights[name].astype(np.float16).astype(np.float32)
            cache[fmt] = Reference(weights, model.spec)
        cache[fmt].reset()
        return cache[fmt]

    return get


@pytest.mark.parametrize("weights", ["native", "f16"])
@pytest.mark.parametrize("path", ["webgpu", "native"])
@pytest.mark.parametrize("fmt", QUANT_FILES)
def test_quant_files_match_reference(engine, reference, f16_reference, fmt, path, weights):
    """The prefill chunk (gemm: tiles loaded with load4) and single steps (matvec: the 64-element
    pieces of quants_dot.wgsl, the embedding gather, the Q6_K head) against the NumPy reference
    on the very weights the GPU holds: the file's blocks dequantized, or those values rounded to
    f16 for weights="f16" (the rounding is then on both sides, so only fp32 arithmetic differs,
    and the same 1e-3 holds; observed <= 1e-5)."""
    e = engine(fmt, path=path, weights=weights)
    if weights == "native":
        assert all(e.weight_formats[n] == e.model.tensor(n).ggml_type for n in e.matrices)
        ref = reference(fmt)
    else:
        assert set(e.weight_formats[n] for n in e.matrices) == {"F16"}
        ref = f16_reference(fmt, list(e.matrices))
    want = ref.logits(TOKENS)
    assert np.abs(e.logits(TOKENS) - want).max() <= 1e-3
    e.reset()
    stepped = np.stack([e.step(t) for t in TOKENS[:6]])
    assert np.abs(stepped - want[:6]).max() <= 1e-3


@pytest.mark.parametrize("fmt", QUANT_FILES)
def test_quant_weights_f16_close_to_native(engine, fmt):
    """Rounding the dequantized K-quant / Q4_0 weights to f16 moves each by <= 2^-11 relative,
    which moves these logits by ~5e-3 (observed 2.5e-3 to 6e-3; q8_0 above: 6e-3); 0.05 also
    keeps every clear argmax."""
    native = engine(fmt).logits(TOKENS)
    as_f16 = engine(fmt, weights="f16").logits(TOKENS)
    assert_llama_parity(as_f16, native, 0.05)


@pytest.mark.parametrize("path", ["webgpu", "native"])
@pytest.mark.parametrize("fmt", QUANT_FILES)
def test_quant_gpu_class_tuning_and_fusions(engine, fixtures_dir, monkeypatch, fmt, path):
    """Real-GPU kernel shapes (32 threads per mat-vec row: 4 to 16 of the 64-element pieces per
    row here, so lanes sit idle and the unrolled loop ends early; subgroups on the native path)
    with every fusion (the proj stacks mix Q4_K / Q5_K / Q6_K / Q4_0 with F32 LoRA matrices: one
    pipeline reading each segment's format) give the logits of the plain plan, up to summation
    order, also stepped."""
    base = engine(fmt)
    want = base.logits(TOKENS)
    base.reset()
    want_steps = np.stack([base.step(t) for t in TOKENS[:4]])
    monkeypatch.setenv(options_mod.TUNING_ENV, GPU_TUNING)
    e = load(fixtures_dir / f"tiny-{fmt}.gguf", Options(path=path, fusions=frozenset({"all"})), progress=False)
    assert (e.tuning.matvec_red, e.tuning.subgroups) == (32, path == "native")
    assert np.abs(e.logits(TOKENS) - want).max() <= 1e-4
    e.reset()
    assert np.abs(np.stack([e.step(t) for t in TOKENS[:4]]) - want_steps).max() <= 1e-4


def test_split_weights_give_identical_logits(engine, monkeypatch):
    """With a 300 KiB binding limit, matrices are spread over several buffers by rows (one
    dispatch per buffer) and stacks are cut between buffers; each output row is computed exactly
    as before, so logits are bit-identical. Tiny upload slices exercise the chunked upload too."""
    whole = engine("f32")
    want_logits = whole.logits(TOKENS)
    whole.reset()
    want_ids = whole.generate(TOKENS[:4], 10)
    monkeypatch.setattr(engine_mod, "UPLOAD_SLICE", 40_000)
    e = load(whole.path, Options(fusions=frozenset()), progress=False, split_bytes=300 * 1024)
    for name in ("token_embd.weight", "output.weight", "blk.0.channel_mix_key.weight",
                 "blk.1.channel_mix_value.weight"):  # 1 MiB each: four buffers
        assert len({id(s.buffer) for s in e.matrices[name].segments}) == 4, name
    assert e.dispatches_per_token > whole.dispatches_per_token + 4 * 3
    np.testing.assert_array_equal(e.logits(TOKENS), want_logits)
    e.reset()
    assert e.generate(TOKENS[:4], 10) == want_ids


# Each fusion alone, the pairs whose kernels depend on each other (lora + proj: one lora
# dispatch per block; kv + wkv: wkv_fused does the key/value pack too), and all of them.
FUSION_SETS = [{"proj"}, {"lora"}, {"kv"}, {"wkv"}, {"norm_shift"}, {"ffn"}, {"lora", "proj"},
               {"kv", "wkv"}, set(options_mod.FUSIONS), set(options_mod.DEFAULT_FUSIONS)]


def test_default_options_take_the_default_fusions():
    """Options() runs the fastest correct plan measured (every fusion but lora)."""
    assert Options().fusions == options_mod.DEFAULT_FUSIONS == frozenset(options_mod.FUSIONS) - {"lora"}


@pytest.mark.parametrize("fmt", ["f32", "q8_0"])
@pytest.mark.parametrize("fusions", FUSION_SETS, ids=lambda f: "+".join(sorted(f)))
def test_fusions_equal_the_unfused_plan(engine, fmt, fusions):
    """Every fusion does the same arithmetic in the same order as the dispatches it replaces,
    so logits (chunked and stepped) are bit-identical (on GPUs: up to the compiler's fma
    contraction, conftest.assert_same_plan) and generated ids identical."""
    base = engine(fmt)
    want = base.logits(TOKENS)
    base.reset()
    want_steps = np.stack([base.step(t) for t in TOKENS[:6]])
    base.reset()
    want_ids = base.generate(TOKENS[:4], 9)
    e = engine(fmt, fusions=frozenset(fusions))
    assert e.fusions == frozenset(fusions)
    assert e.dispatches_per_token < base.dispatches_per_token
    assert_same_plan(e.logits(TOKENS), want, e.gpu)
    e.reset()
    assert_same_plan(np.stack([e.step(t) for t in TOKENS[:6]]), want_steps, e.gpu)
    e.reset()
    assert e.generate(TOKENS[:4], 9) == want_ids


@pytest.mark.parametrize("fmt", ["f32", "q8_0"])
def test_all_fusions_dispatch_count(engine, fmt):
    """With every fusion a block is 8 dispatches (norm_shift, the r/k/v stack, one lora dispatch
    for the block's LoRA pairs, wkv_fused, output, norm_shift, ffn key, ffn value), also when
    w1/w2 stay F32 beside Q8_0 matrices (a mixed stack); a prefill chunk (gemm) runs the LoRAs
    as the down and up stacks instead, and on the native path (lavapipe's default) kv_prep,
    wkv_prefill and groupnorm_out instead of wkv_fused."""
    e = engine(fmt, fusions=frozenset({"all"}))
    assert e.dispatches_per_token == 1 + 2 * 8 + 3
    assert [d.label for d in e.plan(1, "last", argmax=True) if d.label.startswith("L1.att.")] == [
        "L1.att.norm_shift", "L1.att.down", "L1.att.lora", "L1.att.wkv_fused", "L1.att.out"]
    wkv = (["L1.att.kv_prep", "L1.att.wkv_prefill", "L1.att.groupnorm"] if e.tuning.subgroups
           else ["L1.att.wkv_fused"])
    assert [d.label for d in e.plan(8, "last") if d.label.startswith("L1.att.")] == [
        "L1.att.norm", "L1.att.shift", "L1.att.down", "L1.att.up", *wkv, "L1.att.out"]


# What real GPUs get (kernels.choose_tuning): up to 32 lanes per mat-vec row, fewer for short
# rows (at least 4 pieces per lane), 2 rows per group of lanes (one for small products, in
# 64-thread workgroups when they hold at most 4 M weights); 4 lanes per wkv state row; in
# wkv_prefill 4 lanes of a subgroup per state row, 32 rows per workgroup.
GPU_TUNING = ("matvec_wg=128,matvec_red=32,matvec_unroll=2,matvec_rows=2,matvec_pieces=4,"
              "matvec_rows_from=4096,matvec_small_wg=64,matvec_small_weights=4194304,"
              "norm_wg=256,argmax_wg=256,wkv_wg=256,wkv_lanes=4,wkv_rows=32")


@pytest.mark.parametrize("path", ["webgpu", "native"])
def test_gpu_class_tuning_on_lavapipe(engine, fixtures_dir, monkeypatch, path):
    """The kernel shapes chosen for real GPUs (up to 32 threads per mat-vec row, 2 rows per
    group, with a workgroup-memory sum, or subgroup operations on the native path) give the
    same logits as lavapipe's."""
    want = engine("q8_0").logits(TOKENS)
    monkeypatch.setenv(options_mod.TUNING_ENV, GPU_TUNING)
    e = load(fixtures_dir / "tiny-q8_0.gguf", Options(path=path, fusions=frozenset({"all"})), progress=False)
    assert (e.tuning.matvec_red, e.tuning.subgroups) == (32, path == "native")
    assert np.abs(e.logits(TOKENS) - want).max() <= 1e-4  # other summation orders only


LONG_PROMPT = (TOKENS * 7)[:150]  # one chunk of 150: three 64-token gemm tiles, the last of 22


@pytest.mark.parametrize("tuning", ["gemm_rows=32,gemm_k=16", "gemm_rows=64,gemm_k=32",
                                    "gemm_rows=128,gemm_k=32"])
def test_gemm_tile_shapes_give_identical_logits(engine, reference, fixtures_dir, monkeypatch, tuning):
    """Every gemm output is one fma chain over k whatever the tile shape, so each shape gives
    the default shape's logits bit for bit, here over 150 tokens in one chunk with every fusion
    (stacks that mix Q8_0 with F32 LoRA matrices); and those match the reference (1e-3, as
    test_matches_reference_on_same_weights)."""
    base = engine("q8_0", chunk=150, fusions=frozenset({"all"}))
    want = base.logits(LONG_PROMPT)
    monkeypatch.setenv(options_mod.TUNING_ENV, tuning)
    e = load(fixtures_dir / "tiny-q8_0.gguf", Options(chunk=150, fusions=frozenset({"all"})), progress=False)
    assert f"gemm_rows={e.tuning.gemm_rows},gemm_k={e.tuning.gemm_k}" == tuning
    assert {d.kernel.name for d in e.plan(150, "all")} >= {"gemm"}
    assert_same_plan(e.logits(LONG_PROMPT), want, e.gpu)
    assert np.abs(want - reference("q8_0").logits(LONG_PROMPT)).max() <= 1e-3


@pytest.mark.parametrize("path", ["webgpu", "native"])
def test_gpu_class_wkv_fusions_equal_the_unfused_plan(fixtures_dir, monkeypatch, path):
    """In the GPU shape of the wkv kernels (wkv_wg 256: four lanes per state row; on the native
    path wkv_prefill for the chunk, 4 lanes per row and 32 rows per workgroup) the "wkv"
    fusion, alone and with "kv", gives the unfused plan's logits bit for bit, chunked and
    stepped: wkv_fused's head sums reproduce kv_prep's and groupnorm_out's group_sum (subgroup
    operations on the native path) and its state update is wkv's; chunks run wkv_prefill in
    every plan."""
    monkeypatch.setenv(options_mod.TUNING_ENV, GPU_TUNING)
    results = []
    for fusions in (set(), {"wkv"}, {"kv", "wkv"}):
        e = load(fixtures_dir / "tiny-q8_0.gguf", Options(path=path, fusions=frozenset(fusions)), progress=False)
        assert {dict(d.kernel.constants)["WG"] for d in e.plan(1, "last") if d.kernel.name.startswith("wkv")} == {256}
        chunk = {d.kernel.name: dict(d.kernel.constants) for d in e.plan(len(TOKENS), "all")}
        assert ("wkv_prefill" in chunk) == (path == "native")
        assert path == "webgpu" or (chunk["wkv_prefill"]["WG"], chunk["wkv_prefill"]["LANES"]) == (128, 4)
        logits = e.logits(TOKENS)
        e.reset()
        results.append((logits, np.stack([e.step(t) for t in TOKENS[:6]])))
    for logits, steps in results[1:]:
        assert_same_plan(logits, results[0][0], e.gpu)
        assert_same_plan(steps, results[0][1], e.gpu)


@pytest.mark.parametrize("fmt,path", [("q8_0", "webgpu"), ("Q4_K_M", "native")])
def test_gpu_class_tuning_keeps_fusions_and_splits_bit_identical(fixtures_dir, monkeypatch, fmt, path):
    """Under the GPU tuning each mat-vec segment takes its lanes per row from its own row
    length (here 1 to 16: Q4_K rows of 256 have 4 pieces, F32 rows of 256 have 64), so a
    matrix is summed the same way stacked with others (proj), inside the lora kernel, or split
    over buffers by rows: every fusion and the split give the plain plan's logits bit for bit,
    also stepped (what test_fusions_equal_the_unfused_plan asks of a real GPU)."""
    monkeypatch.setenv(options_mod.TUNING_ENV, GPU_TUNING)
    file = fixtures_dir / f"tiny-{fmt}.gguf"
    base = load(file, Options(path=path, fusions=frozenset()), progress=False)
    want = base.logits(TOKENS)
    base.reset()
    want_steps = np.stack([base.step(t) for t in TOKENS[:4]])
    fused = load(file, Options(path=path, fusions=frozenset({"all"})), progress=False)
    split = load(file, Options(path=path, fusions=frozenset()), progress=False, split_bytes=64 * 1024)
    assert len({id(s.buffer) for s in split.matrices["blk.0.channel_mix_key.weight"].segments}) > 1
    for e in (fused, split):
        assert_same_plan(e.logits(TOKENS), want, e.gpu)
        e.reset()
        assert_same_plan(np.stack([e.step(t) for t in TOKENS[:4]]), want_steps, e.gpu)


def test_api_encoding_equals_raw_encoding(engine, monkeypatch):
    """The raw wgpu-native calls record exactly what the wgpu-py methods record."""
    e = engine("f32")
    want = e.generate(TOKENS[:4], 9)
    e.reset()
    monkeypatch.setattr(gpu_runtime, "FAST_ENCODE", False)
    assert e.generate(TOKENS[:4], 9) == want


# --- generation ---------------------------------------------------------------------------------


def test_generate_equals_reference_greedy(engine, reference):
    """20 tokens (several submits of STEPS_PER_SUBMIT steps), ids sampled on the GPU; then the
    state must be where the reference's is (prompt + first n - 1 ids fed)."""
    e, ref = engine("f32"), reference("f32")
    prompt = TOKENS[:5]
    got = e.generate(prompt, 20)
    assert got == ref.generate(prompt, 20)
    assert np.abs(e.step(got[-1]) - ref.step(got[-1])).max() <= 1e-3
    st = e.last_generate
    assert (st.n_prompt, st.n_generated) == (5, 20) and st.prefill_seconds > 0 < st.generate_seconds


def test_steps_are_submitted_one_then_doubling_up_to_steps_per_submit(monkeypatch):
    """run_steps puts 1, 2, 4, then STEPS_PER_SUBMIT steps in each command buffer (the GPU
    starts after one step's encoding), every step in a compute pass of its own, none lost."""
    from types import SimpleNamespace

    passes, submits = [], []

    class Encoder:
        def begin_compute_pass(self):
            passes.append(0)
            return SimpleNamespace(end=lambda: None)

        def finish(self):
            return len(passes)

    monkeypatch.setattr(engine_mod.kn, "encode", lambda cp, plan: None)
    fake = SimpleNamespace(_device=SimpleNamespace(create_command_encoder=Encoder),
                           _queue=SimpleNamespace(submit=lambda bufs: submits.append(bufs[0])))
    assert engine_mod.STEPS_PER_SUBMIT == 8
    engine_mod.Engine.run_steps(fake, None, 40)
    sizes = np.diff([0, *submits]).tolist()
    assert sizes == [1, 2, 4, 8, 8, 8, 8, 1]
    passes.clear()
    submits.clear()
    engine_mod.Engine.run_steps(fake, None, 2)
    assert np.diff([0, *submits]).tolist() == [1, 1]


def test_generate_grows_its_id_list(engine, monkeypatch):
    monkeypatch.setattr(engine_mod, "GEN_CAPACITY", 3)
    e = load(engine("f32").path, Options(fusions=frozenset()), progress=False)
    assert e.gen_capacity == 3
    want = engine("f32").generate(TOKENS[:3], 7)
    assert e.generate(TOKENS[:3], 7) == want
    assert e.gen_capacity >= 7
    e.reset()
    assert e.generate(TOKENS[:3], 2) == want[:2]


def test_generate_edge_cases(engine):
    e = engine("f32")
    assert e.generate(TOKENS[:3], 0) == []
    assert (e.last_generate.n_prompt, e.last_generate.n_generated) == (3, 0)
    with pytest.raises(ValueError, match="non-empty"):
        e.generate([], 3)
    with pytest.raises(ValueError, match="outside the vocab"):
        e.prefill([1, 5000])
    with pytest.raises(ValueError, match="outside the vocab"):
        e.step(-1)


def test_plan_shape(engine):
    """Dispatch counts of the unfused tiny plan: embed, 22 (layer 0: no value LoRA) + 24 per
    layer (norm, shift, 7 downs, 4 ups, 3 kv parts, wkv, groupnorm, output, norm, shift, ffn
    key, relu^2, value), output norm, head, argmax."""
    e = engine("f32")
    assert e.dispatches_per_token == 1 + 22 + 24 + 3
    assert e.plan(1, "last", argmax=True) is e.plan(1, "last", argmax=True)
    kinds = {d.kernel.name for d in e.plan(1, "last")} | {d.kernel.name for d in e.plan(8, "all")}
    assert {"matvec", "gemm", "wkv", "embed", "layernorm"} <= kinds
    with pytest.raises(EngineError, match="chunk"):
        e.plan(e.Tm + 1)


def test_unknown_fusion_is_refused(fixtures_dir):
    with pytest.raises(OptionsError, match="fusion"):
        load(fixtures_dir / "tiny-f32.gguf", Options(fusions=frozenset({"nope"})), progress=False)


def test_load_shows_progress(fixtures_dir, capsys):
    e = load(fixtures_dir / "tiny-f32.gguf", progress=True)
    assert "loading tiny-f32.gguf" in capsys.readouterr().err
    assert e.load_seconds > 0 and e.tokenizer.decode(e.tokenizer.encode("Hello")) == "Hello"


def test_load_records_its_phases(fixtures_dir):
    """Engine.load_phases: the calling thread's phases follow one another and add up to
    load_seconds; the upload and the pipelines (beside them on wgpu-native) and the NaN scan
    lie within the load; a second load in the process compiles nothing (the pipelines are kept)."""
    options = Options(tuning="argmax_wg=128")  # a tuning no other test uses: every pipeline is new
    first = load(fixtures_dir / "tiny-q8_0.gguf", options, progress=False)
    again = load(fixtures_dir / "tiny-q8_0.gguf", options, progress=False)
    for e, built in ((first, True), (again, False)):
        phases = e.load_phases
        assert set(phases.spans) <= set(engine_mod.LOAD_PHASES)
        main = [phases.spans[n] for n in engine_mod.LOAD_PHASES if n not in engine_mod.BACKGROUND_PHASES]
        assert len(main) == len(engine_mod.LOAD_PHASES) - len(engine_mod.BACKGROUND_PHASES)
        assert main[0][0] >= 0 and all(a[1] <= b[0] for a, b in zip(main, main[1:]))  # in order
        total = sum(t1 - t0 for t0, t1 in main)
        assert total <= e.load_seconds and total == pytest.approx(e.load_seconds, rel=0.1, abs=0.05)
        for name in ("upload", "scan", "pipelines") if built else ("upload", "scan"):
            t0, t1 = phases.spans[name]
            assert 0 <= t0 <= t1 <= e.load_seconds, name
        assert (phases.pipelines_built > 0) == built and ("pipelines" in phases.spans) == built
        assert "upload" in phases.text() and ("pipelines" in phases.text()) == built
    assert first.load_phases.compile_cpu_seconds > 0  # wgpu-native: compiled on its threads
    np.testing.assert_array_equal(first.logits(TOKENS[:4]), again.logits(TOKENS[:4]))


def test_loading_beside_the_caller_changes_nothing_that_runs(fixtures_dir, monkeypatch):
    """Pipelines compiled on worker threads and weights written beside the plan (the default
    on wgpu-native) give the engine the serial load gives (gpu.BESIDE off): the same pipelines,
    the same plans, the same bits."""
    file = fixtures_dir / "tiny-q8_0.gguf"
    # tunings no other test uses, so both loads compile every pipeline (argmax is not in logits)
    threaded = load(file, Options(tuning="argmax_wg=32"), progress=False)
    monkeypatch.setattr(gpu_runtime, "BESIDE", False)
    serial = load(file, Options(tuning="argmax_wg=512"), progress=False)
    assert serial.load_phases.pipelines_built == threaded.load_phases.pipelines_built > 0
    plan, wait = serial.load_phases.spans["plan"], serial.load_phases.spans["wait"]
    assert plan[0] <= serial.load_phases.spans["pipelines"][1] <= plan[1]  # compiled while planning
    assert wait[0] <= serial.load_phases.spans["upload"][0]  # written when waited for
    assert serial.dispatches_per_token == threaded.dispatches_per_token
    np.testing.assert_array_equal(serial.logits(TOKENS), threaded.logits(TOKENS))
    serial.reset()
    threaded.reset()
    assert serial.generate(TOKENS[:4], 6) == threaded.generate(TOKENS[:4], 6)


def test_a_pipeline_that_fails_to_build_fails_the_load_by_name(fixtures_dir, monkeypatch):
    """A pipeline compiled beside the load that does not build stops the load with the
    KernelError naming the kernel, once the upload has stopped; loads work again after."""
    constants_for = kn.Kernels.constants_for

    def broken(self, spec, **overrides):
        consts = constants_for(self, spec, **overrides)
        return {**consts, "WG": 0} if spec.name == "argmax" else consts  # no threads: no pipeline

    monkeypatch.setattr(kn.Kernels, "constants_for", broken)
    says = r"kernel argmax \(argmax.wgsl\) with constants .*'WG': 0.* failed to build"
    with pytest.raises(kn.KernelError, match=says):
        load(fixtures_dir / "tiny-f32.gguf", Options(), progress=False)
    monkeypatch.undo()
    assert load(fixtures_dir / "tiny-f32.gguf", Options(), progress=False).dispatches_per_token > 0


def test_a_tuning_that_cannot_be_built_fails_the_load_and_the_next_load_works(fixtures_dir):
    """The tuning is worked out beside the tokenizer and the layout: one that cannot be built
    still stops the load with its KernelError (after the upload has stopped), and the next
    load, with the device's own tuning, works; the load's phases still hold "tuning"."""
    with pytest.raises(kn.KernelError, match="matvec_red must be <= matvec_wg"):
        load(fixtures_dir / "tiny-f32.gguf", Options(tuning="matvec_red=64,matvec_wg=32"), progress=False)
    e = load(fixtures_dir / "tiny-f32.gguf", Options(), progress=False)
    assert e.dispatches_per_token > 0 and "tuning" in e.load_phases.spans


def test_cli_generate_prints_the_load_phases(capsys):
    assert cli_main(["generate", "--preset", "tiny", "--prompt", "Hi", "-n", "2"]) == 0
    err = capsys.readouterr().err
    assert "load phases: adapter" in err and "upload" in err


# --- the command line ---------------------------------------------------------------------------


def test_cli_generate_preset(capsys):
    rc = cli_main(["generate", "--preset", "tiny", "--prompt", "Hello", "-n", "16"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.startswith("Hello")
    assert "prefill" in err and "tok/s" in err and "dispatches/token" in err


def test_cli_generate_file_and_zero_tokens(fixtures_dir, capsys):
    rc = cli_main(["generate", "--model", str(fixtures_dir / "tiny-q8_0.gguf"), "--prompt", "Hi", "-n", "0"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out == "Hi\n" and "generate 0 tok" in err


@pytest.mark.parametrize("argv, says", [
    (["--model", "/nonexistent.gguf"], "does not exist"),
    (["--path", "warp"], "unknown path"),
    (["--weights", "int3"], "unknown weights"),
    (["--backend", "dx12"], "dx12"),
])
def test_cli_errors_are_one_line(argv, says, capsys):
    rc = cli_main(["generate", *argv, "-n", "2"])
    err = capsys.readouterr().err
    assert rc == 2
    assert says in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_rejects_a_file_that_is_not_gguf(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a model")
    assert cli_main(["generate", "--model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not a GGUF file" in err and len(err.strip().splitlines()) == 1


def test_load_prepares_slices_in_order_and_bounded_ahead():
    """The upload pipeline yields every slice in order, and never holds more than `ahead`
    prepared slices beyond the one being written (host memory stays bounded on big models)."""
    import threading

    from rwkvlab.engine import _prepared_in_threads

    lock, started = threading.Lock(), []

    def prepare(i):
        with lock:
            started.append(i)
        return i * i

    seen = []
    for i, (item, data) in enumerate(_prepared_in_threads(list(range(40)), prepare, ahead=3)):
        with lock:
            assert max(started) <= i + 3, (i, max(started))
        seen.append((item, data))
    assert seen == [(i, i * i) for i in range(40)]


@pytest.mark.parametrize("fmt", ["q8_0", "Q4_K_M"])
def test_small_matvec_dispatches_take_one_row_per_group(fixtures_dir, monkeypatch, fmt):
    """matvec_rows_from: dispatches with fewer rows and no 4-6 bit segment keep one row per
    group of lanes, in workgroups of matvec_small_wg threads; bigger ones and those of
    Q4_0/K-quant rows the tuning's matvec_rows and matvec_wg. Rows per group and threads per
    workgroup change no sum (each row's pieces and reduction stay), so the logits are the
    all-matvec_rows plan's (conftest.assert_same_plan)."""
    file = fixtures_dir / f"tiny-{fmt}.gguf"

    def engine_with(extra):
        monkeypatch.setenv(options_mod.TUNING_ENV, GPU_TUNING + extra)
        e = load(file, Options(), progress=False)
        return e, {d.label: (dict(d.kernel.constants)["NR"], dict(d.kernel.constants)["WG"],
                             e.weight_formats.get(_product_of(d.label)))
                   for d in e.plan(1, "last") if d.kernel.name == "matvec"}

    want, _ = engine_with(",matvec_rows_from=0")
    e, nr = engine_with(",matvec_rows_from=1000,matvec_small_weights=0")
    assert nr["head"][:2] == (2, 128)  # 65536 rows
    for label, (rows_per_group, wg, wf) in nr.items():
        if label.endswith(("att.out", "ffn.value")):  # 256 rows each
            small = wf not in ("Q4_0", "Q4_K", "Q5_K", "Q6_K")
            assert (rows_per_group, wg) == ((1, 64) if small else (2, 128)), (label, wf)
    assert_same_plan(np.stack([e.step(t) for t in TOKENS[:4]]),
                     np.stack([want.step(t) for t in TOKENS[:4]]), e.gpu)
    # matvec_small_weights: only one-row dispatches of at most that many weights take
    # matvec_small_wg (att.out, 256 x 256 = 65536 weights, does; ffn.value, 256 x 1024, does not)
    assert (e.matrices["blk.0.time_mix_output.weight"].M, e.matrices["blk.0.time_mix_output.weight"].K,
            e.matrices["blk.0.channel_mix_value.weight"].K) == (256, 256, 1024)
    e, nr = engine_with(",matvec_rows_from=1000,matvec_small_weights=65536")
    for label, (rows_per_group, wg, wf) in nr.items():
        if label.endswith(("att.out", "ffn.value")) and wf not in ("Q4_0", "Q4_K", "Q5_K", "Q6_K"):
            assert (rows_per_group, wg) == ((1, 64) if label.endswith("att.out") else (1, 128)), (label, wf)
    want.reset()
    assert_same_plan(np.stack([e.step(t) for t in TOKENS[:4]]),
                     np.stack([want.step(t) for t in TOKENS[:4]]), e.gpu)


def _product_of(label: str) -> str | None:
    """The weight tensor behind a plan label like "L0.att.out" (for its format)."""
    names = {"att.out": "time_mix_output.weight", "ffn.value": "channel_mix_value.weight"}
    for suffix, tensor in names.items():
        if label.endswith(suffix):
            return f"blk.{label.split('.')[0][1:]}.{tensor}"
    return None
