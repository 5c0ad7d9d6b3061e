"""The subgroup-matrix GEMM (shaders/gemm_sgmat.wgsl, kernels.GEMM_SGMAT) without subgroup matrices.

No adapter CI has (lavapipe, either runtime) offers subgroup matrices, so:
- the choice of config and tile from an adapter's list, the tuning flag and its plumbing, and
  that nothing picks the kernel where there is no config, are checked as plain Python;
- the shader is parsed by Dawn's Tint on lavapipe (which then refuses only the extension);
- the kernel runs on Dawn's lavapipe with the matrix calls emulated in plain WGSL
  (tests/sgmat_emulation.py): staging, f16 rounding, the overflow scaling, partial tiles,
  segments, every weight format and the epilogues run as they ship, and the engine runs a
  fixture with it. The matrix units themselves are proven on the GPU (gemm_bench).

Tolerances: inputs rounded to f16 err by <= 2^-11 relative each, so a product by <= 2^-10 + 2^-22
and an output by that much of sum_k |w_k x_k| (plus f32 summation, K 2^-24 of it): 2e-3 of
sum |w x| bounds both with room (as gemm_bench's SGMAT_REL_TOL). Where no scaling happens the
kernel must equal the float64 product of the f16-rounded inputs to f32 summation accuracy.
"""
from __future__ import annotations

import io
import re
from types import SimpleNamespace

import numpy as np
import pytest

import sgmat_emulation as emu
from rwkvlab import gpu as gpu_runtime
from rwkvlab import kernels as kn
from rwkvlab.options import Options, OptionsError, normalize_tuning
from test_kernels import ACT_FUNCS, encode_rows

SGMAT_REL_TOL = 2e-3
H200_LIKE = [emu.config(16, 16, 16), emu.config(16, 8, 16), emu.config(16, 8, 8),
             emu.config(16, 16, 16, "f16", "f16"), emu.config(16, 16, 32, "i8", "i32")]


# --- which config, which tile ---------------------------------------------------------------


@pytest.mark.parametrize("configs, want", [
    ([], None),
    ([emu.config(16, 16, 32, "i8", "i32"), emu.config(16, 16, 32, "u8", "u32")], None),  # int8 only
    ([emu.config(16, 16, 16, "f16", "f16")], None),  # f16 results only: no f32 accumulation
    ([emu.config(16, 8, 16)], (16, 8, 16)),
    (H200_LIKE, (16, 16, 16)),  # most multiply-adds per instruction
    ([emu.config(8, 8, 8), emu.config(16, 8, 8)], (16, 8, 8)),
    ([emu.config(16, 16, 64)], None),  # K must divide the staged step of 32
    ([{"M": 8, "N": 8, "K": 8, "component_type": "f16", "result_component_type": "f32"}], (8, 8, 8)),
])
def test_config_choice(configs, want):
    assert kn.choose_sgmat_config(configs) == want


def test_config_choice_honours_constraints_and_subgroup_sizes():
    assert kn.choose_sgmat_config(H200_LIKE, n=8) == (16, 8, 16)
    assert kn.choose_sgmat_config(H200_LIKE, n=8, k=8) == (16, 8, 8)
    assert kn.choose_sgmat_config(H200_LIKE, m=8) is None
    sized = [dict(emu.config(16, 16, 16), min_subgroup_size=32, max_subgroup_size=32), emu.config(8, 8, 8)]
    assert kn.choose_sgmat_config(sized, subgroup_size=32) == (16, 16, 16)
    assert kn.choose_sgmat_config(sized, subgroup_size=16) == (8, 8, 8)
    assert kn.sgmat_configs(H200_LIKE) == [(16, 8, 8), (16, 8, 16), (16, 16, 16)]


def test_tile_problems():
    assert kn.sgmat_tile_problem((16, 16, 16), 64, 64, 16384) == ""
    assert kn.sgmat_workgroup_bytes(64, 64, 16, 16) <= 16384  # WebGPU's guaranteed minimum
    assert "split" in kn.sgmat_tile_problem((16, 16, 16), 48, 64, 1 << 20)
    assert "split" in kn.sgmat_tile_problem((16, 8, 16), 64, 8, 1 << 20)
    assert "workgroup memory" in kn.sgmat_tile_problem((16, 16, 16), 128, 64, 16384)
    assert kn.sgmat_tile_problem((16, 16, 16), 128, 64, 32768) == ""
    assert "more than" in kn.sgmat_tile_problem((8, 8, 8), 128, 128, 1 << 20)


def _fake_gpu(configs, features=("subgroup", "shader-f16", "subgroup-matrix"), wg_bytes=32768, kind="DiscreteGPU"):
    return SimpleNamespace(has=lambda f: f in features, info=SimpleNamespace(adapter_type=kind),
                           limits={"max-compute-workgroup-storage-size": wg_bytes},
                           subgroup_matrix_configs=tuple(configs), device=object())


@pytest.fixture
def subgroup_size_32(monkeypatch):
    monkeypatch.setattr(kn, "probe_subgroup_size", lambda gpu: 32)


@pytest.mark.parametrize("by_default", [False, True])
def test_tuning_picks_the_adapters_config(subgroup_size_32, monkeypatch, by_default):
    """Where the native path has an f16 -> f32 config the tuning names it (and runs gemm_sgmat
    when SGMAT_BY_DEFAULT, off while it is no faster than gemm); nowhere else is it ever on."""
    monkeypatch.setattr(kn, "SGMAT_BY_DEFAULT", by_default)
    t = kn.choose_tuning(_fake_gpu(H200_LIKE), "native")
    assert t.gemm_sgmat == by_default and (t.sgmat_m, t.sgmat_n, t.sgmat_k) == (16, 16, 16)
    assert (t.sgmat_tokens, t.sgmat_rows) == (64, 64)
    assert kn.choose_tuning(_fake_gpu(H200_LIKE), "native", "gemm_sgmat=1").gemm_sgmat
    assert not kn.choose_tuning(_fake_gpu(H200_LIKE), "native", "gemm_sgmat=0").gemm_sgmat
    for gpu, path in [(_fake_gpu(H200_LIKE), "webgpu"),  # the portable path: never
                      (_fake_gpu([]), "native"),
                      (_fake_gpu([emu.config(16, 16, 32, "i8", "i32")]), "native"),
                      (_fake_gpu(H200_LIKE, features=("subgroup", "subgroup-matrix")), "native"),  # no f16
                      (_fake_gpu(H200_LIKE, features=("subgroup", "shader-f16")), "native")]:
        assert not kn.choose_tuning(gpu, path).gemm_sgmat, (gpu, path)
        assert kn.choose_tuning(gpu, path).sgmat_m == 0, (gpu, path)


def test_tuning_overrides_pick_config_tile_or_off(subgroup_size_32):
    gpu = _fake_gpu(H200_LIKE)
    on = "gemm_sgmat=1,"
    t = kn.choose_tuning(gpu, "native", on + "sgmat_n=8")
    assert (t.sgmat_m, t.sgmat_n, t.sgmat_k) == (16, 8, 16)
    t = kn.choose_tuning(gpu, "native", on + "sgmat_k=8")
    assert (t.sgmat_m, t.sgmat_n, t.sgmat_k) == (16, 8, 8)
    t = kn.choose_tuning(gpu, "native", on + "sgmat_tokens=128,sgmat_rows=64")
    assert (t.sgmat_tokens, t.sgmat_rows) == (128, 64)
    with pytest.raises(kn.KernelError, match="sgmat_m=32.*16x8x8, 16x8x16, 16x16x16"):
        kn.choose_tuning(gpu, "native", on + "sgmat_m=32")
    with pytest.raises(kn.KernelError, match="workgroup memory"):
        kn.choose_tuning(_fake_gpu(H200_LIKE, wg_bytes=16384), "native", on + "sgmat_tokens=128")
    with pytest.raises(kn.KernelError, match="gemm_sgmat=1 needs .* none; use gemm_sgmat=0"):
        kn.choose_tuning(_fake_gpu([]), "native", "gemm_sgmat=1")
    with pytest.raises(kn.KernelError, match="gemm_sgmat=1 needs"):
        kn.choose_tuning(_fake_gpu(H200_LIKE), "webgpu", "gemm_sgmat=1")


def test_tuning_text_accepts_the_new_fields():
    assert normalize_tuning("sgmat_n=8, gemm_sgmat=0,sgmat_tokens=128") == "gemm_sgmat=0,sgmat_n=8,sgmat_tokens=128"
    assert Options(tuning="gemm_sgmat=1").tuning == "gemm_sgmat=1"
    for bad in ("gemm_sgmat=2", "gemm_sgmat=yes", "sgmat_n=12", "sgmat_tokens=0"):
        with pytest.raises(OptionsError, match="tuning"):
            normalize_tuning(bad)
    t = kn._tuning_overrides(kn.Tuning(matvec_wg=64, matvec_red=1, matvec_unroll=1, norm_wg=64, shift_wg=64,
                                       argmax_wg=64, subgroups=False, subgroup_size=0), "gemm_sgmat=1,sgmat_m=8")
    assert t.gemm_sgmat is True and t.sgmat_m == 8
    assert "gemm_sgmat" in t.as_record()


# --- nothing picks it without subgroup matrices (lavapipe, both runtimes) -------------------


@pytest.mark.parametrize("runtime", ["wgpu-native", "dawn"])
def test_not_picked_without_configs(runtime):
    gpu = gpu_runtime.get_gpu("auto", native=True, runtime=runtime)
    assert not gpu.has("subgroup-matrix") and gpu.subgroup_matrix_configs == ()
    tuning = kn.choose_tuning(gpu, "native")
    assert not tuning.gemm_sgmat
    with pytest.raises(kn.KernelError, match="gemm_sgmat uses subgroup matrices.*this device has: none"):
        kn.kernels_for(gpu, tuning).kernel(kn.GEMM_SGMAT)


def test_engine_plan_keeps_the_fp32_gemm_without_configs(fixtures_dir):
    from rwkvlab.engine import load

    e = load(fixtures_dir / "tiny-q8_0.gguf", Options(runtime="dawn", path="native"), progress=False)
    kinds = {d.kernel.name for d in e.plan(8, "all")}
    assert "gemm" in kinds and "gemm_sgmat" not in kinds and not e.tuning.gemm_sgmat


# --- the shader itself ------------------------------------------------------------------------


def test_baked_constants_are_the_shaders_consts():
    src = kn.shader_source(kn.GEMM_SGMAT.file)
    for name in kn.GEMM_SGMAT.baked:
        assert re.search(rf"^const {name}: u32 = {kn.GEMM_SGMAT.constants[name]}u;", src, re.M), name
    assert int(re.search(r"^const TK: u32 = (\d+)u;", src, re.M).group(1)) == kn.SGMAT_TK
    assert re.search(r"^const SGT: u32 = (\d+)u;", src, re.M).group(1) == str(kn.SGMAT_SUBGROUPS[0])
    assert re.search(r"^const SGR: u32 = (\d+)u;", src, re.M).group(1) == str(kn.SGMAT_SUBGROUPS[1])
    baked = kn.bake_constants(src, dict(SN=8, TOKENS=128))
    assert "const SN: u32 = 8u;" in baked and "const TOKENS: u32 = 128u;" in baked
    with pytest.raises(kn.KernelError, match="NOPE"):
        kn.bake_constants(src, dict(NOPE=1))


def test_tint_parses_the_shader():
    """Dawn on lavapipe refuses the subgroup-matrix extension, but only after Tint has parsed the
    module: a syntax error anywhere would be reported instead."""
    gpu = gpu_runtime.get_gpu("auto", native=True, runtime="dawn")
    consts = {k: v for k, v in kn.GEMM_SGMAT.constants.items() if k in kn.GEMM_SGMAT.baked}
    code = (gpu_runtime.shader_preamble(gpu, *kn.GEMM_SGMAT.extensions)
            + kn.bake_constants(kn.compose_source(kn.GEMM_SGMAT, True), consts))
    with pytest.raises(Exception) as err:
        gpu.device.create_shader_module(code=code)
    message = str(err.value)
    assert "chromium_experimental_subgroup_matrix' is not allowed" in message, message
    assert message.count("error:") == 1, message


# --- the kernel run with emulated matrices (Dawn on lavapipe) -----------------------------------

EMULATED = [emu.config(8, 8, 8), emu.config(8, 4, 8), emu.config(16, 16, 16)]


@pytest.fixture(scope="module")
def dawn_gpu():
    return gpu_runtime.get_gpu("auto", native=True, runtime="dawn")


def emulated_kernels(monkeypatch, gpu, tuning: str) -> kn.Kernels:
    emu.install(monkeypatch, EMULATED)
    t = kn.choose_tuning(gpu, "native", "gemm_sgmat=1," + tuning)
    assert t.gemm_sgmat and t.subgroup_size >= 4
    return kn.Kernels(gpu, t)  # not the process's cache: these modules are emulated


def run_sgmat(kernels, table, W, X, B, Y0, T):
    fmt = kn.matmul_fmt(table)
    kernel = kernels.kernel(kn.GEMM_SGMAT, FMT=fmt)
    params, _, tiles = kn.matmul_params(table, kn.MatvecShape(wg=1, red=1), kn.gemm_tile_rows(kernel))
    grid = kn.gemm_grid(tiles, T, kn.gemm_tile_tokens(kernel))
    return kn.run_kernel(kernels, kn.GEMM_SGMAT, params, dict(W=W, X=X, B=B, Y=Y0.copy()), grid, T=T,
                         read=("Y",), constants=dict(FMT=fmt))["Y"]


def f16(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float64).astype(np.float16).astype(np.float64)


# One segment per weight format (a mixed stack: FMT_PER_SEGMENT, one pipeline for all): rows
# that end inside a row tile, several K (one K step, several; K-quants 256), every epilogue.
SEGMENTS = [  # fmt, rows, K, act, bias, accum
    ("F32", 40, 64, "none", False, False),
    ("F16", 5, 32, "tanh", True, False),
    ("BF16", 33, 96, "sigmoid", False, True),
    ("Q8_0", 17, 64, "relu_sq", True, True),
    ("Q4_0", 8, 64, "decay", True, False),
    ("Q4_K", 9, 256, "none", False, True),
    ("Q5_K", 3, 256, "none", True, False),
    ("Q6_K", 12, 256, "tanh", False, False),
]


def stacked_problem(rng, T, x_scale=None, w_scale=None):
    """The SEGMENTS stacked in one weight buffer: (table, W, X, B, Y0, want, f16 want, tol);
    `x_scale` scales each token's activations (of every segment but BF16 when `w_scale` scales
    the BF16 weights: the kernel moves a big side's powers of two into the other side, which
    needs max |x| * max |w| < 2^30)."""
    words, table, x_off, y_off, b_off, base = [], [], 8, 3, 16, 0
    width = sum(s[1] for s in SEGMENTS) + 3
    X = np.zeros(8 + sum(T * s[2] for s in SEGMENTS), np.float32)
    B = rng.standard_normal(256).astype(np.float32)
    Y0 = rng.standard_normal((T, width)).astype(np.float32)
    want, want16 = Y0.astype(np.float64).copy(), Y0.astype(np.float64).copy()
    tol = np.full(Y0.shape, 1e-9)  # columns outside every segment are checked exactly
    # huge activations: the f16-rounded answer overflows and sigmoids saturate, as intended
    with np.errstate(over="ignore", invalid="ignore"):
        parts = [_segment(rng, T, fmt, M, K, x_scale, w_scale) for fmt, M, K, *_ in SEGMENTS]
    for (fmt, M, K, act, bias, accum), (raw, x, wv) in zip(SEGMENTS, parts):
        X[x_off: x_off + T * K] = x.reshape(-1)
        x64 = x.astype(np.float64)
        cols = slice(y_off, y_off + M)
        with np.errstate(over="ignore", invalid="ignore"):
            z = x64 @ wv.T + (B[b_off: b_off + M] if bias else 0)
            z16 = f16(x64) @ f16(wv).T + (B[b_off: b_off + M] if bias else 0)
            base_y = want[:, cols].copy() if accum else 0
            want[:, cols] = base_y + ACT_FUNCS[act](z)
            want16[:, cols] = base_y + ACT_FUNCS[act](z16)
            # error of z, carried through the activation (|f'| <= 2 |z| + 1 covers all five)
            tol[:, cols] = (SGMAT_REL_TOL * (np.abs(x64) @ np.abs(wv).T) * (1 + 2 * np.abs(z))
                            + 1e-6 * (1 + np.abs(want[:, cols])))
        data = raw.reshape(-1).view(np.uint32)
        table.append(kn.MatSegment(rows=M, K=K, row_words=kn.row_words(fmt, K), w_base=base, x_off=x_off,
                                   y_off=y_off, y_stride=width, act=act, bias=b_off if bias else None,
                                   accum=accum, fmt=fmt))
        words += [data, np.zeros(-len(data) % 4, np.uint32)]
        base += len(data) + (-len(data) % 4)
        x_off, y_off, b_off = x_off + T * K, y_off + M, b_off + M
    return table, np.concatenate(words), X, B, Y0, want, want16, tol


def _segment(rng, T, fmt, M, K, x_scale, w_scale):
    """One segment's (file rows, activations, float64 weights)."""
    w = rng.standard_normal((M, K)).astype(np.float32) / np.sqrt(K)
    if w_scale is not None and fmt == "BF16":
        w *= w_scale  # bf16 holds 1e5 where f16 cannot
    raw, wv = encode_rows(w, fmt)
    x = rng.standard_normal((T, K)).astype(np.float32)
    if x_scale is not None and not (w_scale is not None and fmt == "BF16"):
        x *= x_scale[:, None]
    return raw, x, wv


@pytest.mark.parametrize("tuning", ["sgmat_m=8,sgmat_n=8,sgmat_k=8,sgmat_tokens=32,sgmat_rows=32",
                                    "sgmat_m=8,sgmat_n=4,sgmat_k=8,sgmat_tokens=16,sgmat_rows=32"],
                         ids=["8x8x8-32x32", "8x4x8-16x32"])
def test_emulated_segments_formats_and_partial_tiles(monkeypatch, dawn_gpu, tuning):
    """Eight segments, one per format, in one dispatch; T = 37 ends 5 tokens into a token tile,
    segments end inside row tiles. The result equals float64 on the f16-rounded inputs to f32
    summation accuracy (nothing here needs scaling), is within the f16 bound of the exact
    product, and columns outside every segment are untouched."""
    kernels = emulated_kernels(monkeypatch, dawn_gpu, tuning)
    T = 37
    table, W, X, B, Y0, want, want16, tol = stacked_problem(np.random.default_rng(3), T)
    out = run_sgmat(kernels, table, W, X, B, Y0, T)
    np.testing.assert_array_less(np.abs(out - want), tol)
    np.testing.assert_allclose(out, want16, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[:, :3], Y0[:, :3])


def test_emulated_overflow_is_scaled(monkeypatch, dawn_gpu):
    """Activations of 1e5-1e6 (f16 overflows at 65504) in every other token, ordinary ones in
    the rest (the same tiles), and, in another segment, bf16 weights of ~1e5: staged with a
    power of two moved from the big side to the other, the outputs stay within the f16 bound of
    sum |w x| (no inf, no NaN), small tokens included."""
    kernels = emulated_kernels(monkeypatch, dawn_gpu, "sgmat_m=8,sgmat_n=8,sgmat_k=8,sgmat_tokens=32,sgmat_rows=32")
    T = 37
    rng = np.random.default_rng(4)
    x_scale = np.where(np.arange(T) % 2 == 0, 10 ** rng.uniform(5, 6, T), 1.0)
    table, W, X, B, Y0, want, _, tol = stacked_problem(rng, T, x_scale=x_scale, w_scale=1e6)
    with np.errstate(over="ignore"):
        assert np.abs(X).max() > 1e6 and f16(X).max() == np.inf  # the unscaled staging would overflow
    out = run_sgmat(kernels, table, W, X, B, Y0, T)
    assert np.isfinite(out).all()
    np.testing.assert_array_less(np.abs(out - want), tol)



def test_emulated_engine_matches_the_reference(monkeypatch, fixtures_dir):
    """The engine with gemm_sgmat in its prefill plan (tiles of 32 x 32, 8x8x8 matrices): the
    tiny Q8_0 fixture's logits within 0.05 of the float64 reference (bench's tolerance for
    f16-rounded arithmetic) and close to the fp32 gemm's."""
    from rwkvlab.engine import load
    from rwkvlab.gguf import read_model
    from rwkvlab.reference import Reference
    from test_engine import TOKENS

    emu.install(monkeypatch, EMULATED)
    monkeypatch.setattr(kn, "_KERNELS", {})  # emulated pipelines stay out of the process cache
    tuning = "gemm_sgmat=1,sgmat_m=8,sgmat_n=8,sgmat_k=8,sgmat_tokens=32,sgmat_rows=32"
    e = load(fixtures_dir / "tiny-q8_0.gguf", Options(runtime="dawn", path="native", tuning=tuning), progress=False)
    assert e.tuning.gemm_sgmat
    assert "gemm_sgmat" in {d.kernel.name for d in e.plan(8, "all")}
    logits = e.logits(TOKENS)
    ref = Reference(read_model(fixtures_dir / "tiny-q8_0.gguf"))
    want = np.stack([ref.step(t) for t in TOKENS])
    assert np.abs(logits - want).max() <= 0.05
    assert (logits.argmax(1) == want.argmax(1)).mean() >= 0.9


def test_gemm_bench_sgmat_rows_emulated(monkeypatch):
    """gemm_bench --sgmat: a row per config x tile (here one of each), checked with the f16
    tolerance and on the overflow case before timing; fp32 gemm shapes stay on gemm (with
    gemm_sgmat=0 said where the device would default to gemm_sgmat)."""
    from rwkvlab import gemm_bench

    emu.install(monkeypatch, [emu.config(8, 8, 8)])
    monkeypatch.setattr(kn, "SGMAT_BY_DEFAULT", True)
    monkeypatch.setattr(kn, "SGMAT_TILES", ((32, 64),))
    monkeypatch.setattr(kn, "_KERNELS", {})
    out = io.StringIO()
    timings, failures = gemm_bench.run(formats=("Q8_0",), paths=("native",), size="small", tunings=("gemm_rows=64,gemm_k=16",),
                                       runtime="dawn", repeats=1, out=out, sgmat=True)
    assert failures == [], failures
    assert "f16 subgroup-matrix configs (MxNxK): 8x8x8" in out.getvalue()
    sgmat = "gemm_sgmat=1,sgmat_k=8,sgmat_m=8,sgmat_n=8,sgmat_rows=64,sgmat_tokens=32"
    assert {(t.kernel, t.tuning) for t in timings} == {("gemm", "gemm_k=16,gemm_rows=64,gemm_sgmat=0"),
                                                       ("gemm_sgmat", sgmat)}
    for t in timings:
        assert t.max_error < 1 and t.seconds > 0
        assert (t.overflow_error is not None) == (t.kernel == "gemm_sgmat")
        if t.overflow_error is not None:
            assert t.overflow_error < 1 and "1e5-1e6" in t.line()
