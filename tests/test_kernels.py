"""Every kernel alone against NumPy, on the portable and the subgroup path (lavapipe has both).

Weights are made with rwkvlab.quant (byte-identical to ggml's quantizers, K-quants included),
so the bytes are exactly what a GGUF file holds, and the expected values use gguf-py's
dequantizer (bit-exact with ggml) in float64. Tolerances are
fp32 rounding bounds: a sum of K products carries at most ~K * 2^-24 * sum|w x| of error
(recursive summation), so the tests allow 4x that per element, plus 1e-6 for values near zero.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from conftest import assert_same_plan
from rwkvlab import gpu as gpu_runtime
from rwkvlab import kernels as kn
from rwkvlab import quant
from rwkvlab.gpu import get_gpu

U32 = 2.0 ** -24  # unit roundoff of float32
PATHS = ["webgpu", "native"]


@pytest.fixture(scope="module", params=PATHS)
def kernels(request) -> kn.Kernels:
    """Kernels of the portable path, or of the native path with subgroup reductions."""
    native = request.param == "native"
    gpu = get_gpu("auto", native=native)
    tuning = kn.choose_tuning(gpu, request.param)
    if native:
        assert tuning.subgroups and tuning.subgroup_size >= 4, "lavapipe offers subgroups"
    return kn.kernels_for(gpu, tuning)


def fp32_tol(abs_products: np.ndarray, K: int) -> np.ndarray:
    """Error bound of an fp32 sum of K products whose absolute values sum to abs_products."""
    return 4 * K * U32 * abs_products + 1e-6


def encode_rows(w: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """(GPU bytes [M, row_words*4], float64 values the kernel should see) for weights w [M, K]."""
    K = w.shape[1]
    if fmt == "F32":
        raw = w.astype(np.float32).view(np.uint8)
    else:
        raw = quant.quantize(w.astype(np.float32), fmt).view(np.uint8)
        raw = raw.reshape(w.shape[0], -1)
    values = w.astype(np.float32) if fmt == "F32" else dequantize(raw, GGMLQuantizationType[fmt])
    raw = kn.rows_for_gpu(raw, fmt, K)
    assert raw.shape[1] == kn.row_words(fmt, K) * 4
    return np.ascontiguousarray(raw), values.astype(np.float64)


# --- specs and WGSL agree ---------------------------------------------------------------------


def _function_body(src: str, name: str) -> str:
    """The text between the braces of `fn name` (comments removed)."""
    src = re.sub(r"//[^\n]*", "", src)
    m = re.search(rf"fn {name}\s*\(", src)
    assert m, f"no fn {name}"
    start = src.index("{", m.end())
    depth = 0
    for i in range(start, len(src)):
        depth += {"{": 1, "}": -1}.get(src[i], 0)
        if depth == 0:
            return src[start:i + 1]
    raise AssertionError(f"fn {name}: unbalanced braces")


def _used_names(spec: kn.KernelSpec) -> set[str]:
    """Identifiers the entry point reaches: its body, the functions it calls (transitively)."""
    src = kn.compose_source(spec)
    functions = set(re.findall(r"\bfn (\w+)", re.sub(r"//[^\n]*", "", src)))
    seen, todo, names = set(), [spec.entry], set()
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        words = set(re.findall(r"\b\w+\b", _function_body(src, f)))
        names |= words
        todo += sorted((words & functions) - seen)
    return names


@pytest.mark.parametrize("name", sorted(kn.SPECS))
def test_spec_matches_wgsl(name):
    """Binding numbers, kinds, variable names and Params fields of each spec match its WGSL."""
    spec = kn.SPECS[name]
    bindings, structs = kn.wgsl_interface(spec)
    assert bindings[0] == [("uniform", "run")]
    used = _used_names(spec)
    for i, b in enumerate(spec.bindings[1:], start=1):
        candidates = [(kind, var) for kind, var in bindings.get(i, []) if var in used]
        if i == 1:  # the Params uniform (called p or hp in the WGSL)
            assert len(candidates) == 1 and candidates[0][0] == "uniform", (name, candidates)
            var = candidates[0][1]
            struct = re.search(rf"var<uniform>\s*{var}\s*:\s*(\w+)", kn.shader_source(spec.file)).group(1)
            fields = structs[struct]
            assert fields == [(p.name, p.type) for p in spec.params], (name, struct, fields)
        else:
            assert (b.kind, b.name) in candidates, f"{name}: binding {i} {b} not in {candidates}"
    # Override constants the spec sets must be declared by the composed source.
    src = kn.compose_source(spec)
    for const in spec.constants:
        if const in spec.baked:  # written into the source: a `const` line kernels.bake_constants rewrites
            assert re.search(rf"^const {const}: u32 = \d+u;", src, re.M), f"{name}: no const {const}"
        else:
            assert re.search(rf"override\s+{const}\b", src), f"{name}: no override {const}"


def test_family_files_share_libraries():
    """A family file compiles as one module, so all its kernels must prepend the same libraries."""
    libs: dict[str, tuple] = {}
    for spec in kn.SPECS.values():
        assert libs.setdefault(spec.file, spec.libs) == spec.libs, spec.file


def test_shaders_load_from_package():
    for name in ("common.wgsl", "weights.wgsl", "reduce.wgsl", "reduce_subgroup.wgsl"):
        assert "fn " in kn.shader_source(name)
    with pytest.raises(kn.KernelError, match="missing"):
        kn.shader_source("nope.wgsl")


def test_every_shader_ships_in_the_wheel():
    """pyproject maps shaders/ to the package rwkvlab.shaders with *.wgsl as package data, and
    every file a kernel names is there (a built wheel was inspected the same way by hand)."""
    import tomllib
    from importlib import resources
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"]["rwkvlab.shaders"] == "shaders"
    assert "rwkvlab.shaders" in tool["packages"] and "*.wgsl" in tool["package-data"]["rwkvlab.shaders"]
    packaged = {p.name for p in resources.files(kn.SHADER_PACKAGE).iterdir()}
    needed = {f for spec in kn.SPECS.values() for f in (*spec.libs, spec.file)} | {"reduce_subgroup.wgsl"}
    assert needed <= packaged
    assert needed <= {p.name for p in (root / "shaders").glob("*.wgsl")}


def test_wheel_builds_without_warnings_and_ships_data(tmp_path):
    """A real `pip wheel` (isolated build, setuptools from the configured index) of a copy of
    the project: setuptools prints no BuildBackendWarning about the packages configuration, and
    the wheel holds every shader and every file of rwkvlab/data (the tokenizer and the chat
    template that synth.py reads through importlib.resources)."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"  # built from a copy so build/ and *.egg-info never land in the checkout
    for name in ("pyproject.toml", "README.md"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / name, src / name)
    for folder in ("rwkvlab", "shaders"):
        shutil.copytree(root / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-v",
                          "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "BuildBackendWarning" not in log and "absent from the `packages`" not in log, log[-4000:]
    (wheel,) = (tmp_path / "dist").glob("rwkvlab-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    data = {f"rwkvlab/data/{p.name}" for p in (root / "rwkvlab" / "data").iterdir() if p.is_file()}
    shaders = {f"rwkvlab/shaders/{p.name}" for p in (root / "shaders").glob("*.wgsl")}
    assert data and shaders and data | shaders <= shipped, sorted((data | shaders) - shipped)


def test_every_kernel_compiles(kernels):
    """Every kernel builds; one that uses subgroup operations is refused, by name, on a path
    without them, and one that uses subgroup matrices wherever the device has none (lavapipe:
    tests/test_gemm_sgmat.py runs it emulated)."""
    for spec in kn.SPECS.values():
        if spec.name in kn.NEEDS_SUBGROUP_MATRIX and not kernels.tuning.gemm_sgmat:
            with pytest.raises(kn.KernelError, match=f"{spec.name} uses subgroup"):
                kernels.kernel(spec)
            continue
        if spec.name in kn.NEEDS_SUBGROUPS and not kernels.tuning.subgroups:
            with pytest.raises(kn.KernelError, match=f"{spec.name} uses subgroup operations"):
                kernels.kernel(spec)
            continue
        assert kernels.kernel(spec).pipeline is not None


def test_a_pipeline_that_fails_to_build_is_reported_by_name(kernels):
    """Pipelines compile beside the caller (rwkvlab.gpu.compute_pipeline): asking for one
    returns at once, and one that does not build raises, when waited for, the KernelError that
    names the kernel, its shader file and its constants; asked for again, it is built again."""
    start = kernels.mark()
    bad = kernels.kernel(kn.ARGMAX, WG=0)  # a workgroup of no threads: the pipeline refuses it
    says = r"kernel argmax \(argmax.wgsl\) with constants \{'WG': 0\} failed to build"
    with pytest.raises(kn.KernelError, match=says):
        kernels.wait(start)
    with pytest.raises(kn.KernelError, match=says):
        bad.pipeline
    again = kernels.kernel(kn.ARGMAX, WG=0)
    assert again is not bad and kernels.wait(kernels.mark()) == []
    with pytest.raises(kn.KernelError, match=says):
        again.pipeline
    good = kernels.kernel(kn.ARGMAX)
    assert kernels.kernel(kn.ARGMAX) is good and good.pipeline is good.pipeline


def test_tuning_overrides():
    base = kn.Tuning(matvec_wg=64, matvec_red=1, matvec_unroll=1, norm_wg=64, shift_wg=64,
                     argmax_wg=64, subgroups=False, subgroup_size=0)
    assert (base.matvec_rows, base.matvec_pieces) == (1, 0)  # one row per group, no policy
    t = kn._tuning_overrides(base, "matvec_wg=256, matvec_red=32")
    assert (t.matvec_wg, t.matvec_red, t.norm_wg) == (256, 32, 64)
    t = kn._tuning_overrides(t, "matvec_rows=4,matvec_pieces=6")
    assert (t.matvec_rows, t.matvec_pieces) == (4, 6)  # a count, not only powers of two
    assert kn._tuning_overrides(t, "matvec_pieces=0").matvec_pieces == 0
    assert kn._tuning_overrides(t, "matvec_rows_from=3000").matvec_rows_from == 3000
    assert kn._tuning_overrides(base, "") == base
    assert kn._tuning_overrides(base, "trusted=1").trusted and not base.trusted
    t = kn._tuning_overrides(base, "gemm_rows=64,gemm_k=32")
    assert (t.gemm_rows, t.gemm_k) == (64, 32)
    assert kn._tuning_overrides(base, "wkv_wg=512").wkv_wg == 512
    t = kn._tuning_overrides(base, "wkv_lanes=16,wkv_rows=4")
    assert (t.wkv_lanes, t.wkv_rows) == (16, 4)
    for bad in ("matvec_wg=96", "warp=32", "matvec_red=128", "matvec_unroll=8", "matvec_rows=8",
                "matvec_rows=3", "matvec_pieces=-1", "matvec_pieces=x", "gemm_rows=256",
                "gemm_rows=16", "gemm_k=8", "gemm_k=64", "trusted=2", "wkv_wg=32", "wkv_wg=2048",
                "wkv_lanes=32", "wkv_lanes=3", "wkv_rows=128", "wkv_lanes=16,wkv_rows=32",
                "wkv_lanes=1,wkv_rows=8"):
        with pytest.raises(kn.KernelError, match="tuning"):
            kn._tuning_overrides(base, bad)


def test_native_path_builds_trusted_modules_that_still_report_errors(kernels):
    """The native path compiles without Naga's runtime checks (every kernel test of this file
    runs on it, so an index out of range would show as a wrong result); a shader that does not
    compile must still raise with Naga's report, not hand back a broken module."""
    assert kernels.tuning.trusted == kernels.tuning.subgroups  # both follow path == "native"
    with pytest.raises(Exception, match="expected"):
        gpu_runtime.shader_module(kernels.gpu, "bad.wgsl", "fn broken( {", trusted=True)


def test_gemm_tuning_fits_workgroup_memory():
    """The default tile (64 rows, K steps of 16: 15 KB) fits WebGPU's minimum of 16 KB of
    workgroup memory; a bigger shape is taken where the device holds it and refused, with the
    numbers, where it does not."""
    from types import SimpleNamespace

    def fake_gpu(wg_bytes):
        return SimpleNamespace(has=lambda f: False, info=SimpleNamespace(adapter_type="DiscreteGPU"),
                               limits={"max-compute-workgroup-storage-size": wg_bytes})

    t = kn.choose_tuning(fake_gpu(16384), "webgpu")
    assert (t.gemm_rows, t.gemm_k) == (64, 16)
    assert kn.gemm_workgroup_bytes(t.gemm_rows, t.gemm_k) <= 16384
    assert kn.choose_tuning(fake_gpu(49152), "webgpu", "gemm_rows=128,gemm_k=32").gemm_rows == 128
    with pytest.raises(kn.KernelError, match="workgroup memory"):
        kn.choose_tuning(fake_gpu(16384), "webgpu", "gemm_rows=128,gemm_k=32")


def test_matvec_lanes_per_row_policy():
    """MatvecShape.red_for: the tuning's lanes per row, halved while a lane would get fewer
    than `pieces` pieces of the segment's row; pieces = 0 keeps the tuning's for every segment."""
    def seg(fmt, K):
        return kn.MatSegment(rows=8, K=K, row_words=kn.row_words(fmt, K), w_base=0, x_off=0,
                             y_off=0, y_stride=8, fmt=fmt)

    gpu = kn.MatvecShape(wg=128, red=32, rows=2, pieces=4)
    # 2.9B shapes: a K-quant row of 2560 has 40 pieces of 64, of 10240 160; Q8_0 (16 per piece)
    # and F32 (4) rows of 2560 have 160 and 640; a LoRA up (F32, K = 64) 16
    assert gpu.red_for(seg("Q4_K", 2560)) == 8
    assert gpu.red_for(seg("Q6_K", 10240)) == 32
    assert gpu.red_for(seg("Q8_0", 2560)) == 32 and gpu.red_for(seg("F32", 2560)) == 32
    assert gpu.red_for(seg("F32", 64)) == 4 and gpu.red_for(seg("F16", 64)) == 2
    assert kn.MatvecShape(wg=128, red=32, rows=2, pieces=64).red_for(seg("Q8_0", 32)) == 1
    assert kn.MatvecShape(wg=128, red=32, rows=2).red_for(seg("Q4_K", 256)) == 32  # policy off
    assert gpu.rows_per_wg(8) == 32 and gpu.rows_per_wg(32) == 8
    # the dispatch: each segment's lanes per row in its table entry, its workgroups of
    # 128 / red * 2 rows
    params, wgs, _ = kn.matmul_params([seg("Q4_K", 2560), seg("F32", 64)], gpu)
    assert [e["red"] for e in params["seg"][:2]] == [8, 4]
    assert (params["seg"][1]["wg_start"], wgs) == (1, 2)
    for fmt, elems in kn.PIECE_ELEMS.items():  # weights.wgsl's piece_elems, every format
        assert kn.MatvecShape(wg=64, red=64, pieces=1).red_for(seg(fmt, 256)) == min(64, 256 // elems)


def test_wide_matrices_take_their_own_pieces_per_lane_by_whole_matrix():
    """matvec_wide_pieces applies to matrices of at least matvec_wide_from rows (the head),
    judged by the whole matrix, so a head split over buffers sums like a whole one; off by
    default (measured no faster in the engine on an H200)."""
    def seg(rows, matrix_rows=0):
        return kn.MatSegment(rows=rows, K=2560, row_words=kn.row_words("Q8_0", 2560), w_base=0, x_off=0,
                             y_off=0, y_stride=rows, fmt="Q8_0", matrix_rows=matrix_rows)

    shape = kn.MatvecShape(wg=128, red=32, rows=2, pieces=4, wide_pieces=8, wide_from=32768)
    assert shape.red_for(seg(2560)) == 32  # 160 pieces of 16: 32 lanes keep >= 4 each
    assert shape.red_for(seg(65536)) == 16  # the head: >= 8 pieces per lane
    assert shape.red_for(seg(20000, matrix_rows=65536)) == 16  # a part of a split head too
    assert kn.MatvecShape(wg=128, red=32, rows=2, pieces=4, wide_pieces=0, wide_from=32768).red_for(
        seg(65536)) == 32  # off: the head takes matvec_pieces like the rest
    t = kn._tuning_overrides(kn.Tuning(matvec_wg=128, matvec_red=32, matvec_unroll=2, norm_wg=64, shift_wg=64,
                                       argmax_wg=64, subgroups=False, subgroup_size=0),
                             "matvec_wide_pieces=8,matvec_wide_from=50000")
    assert (t.matvec_wide_pieces, t.matvec_wide_from) == (8, 50000)
    assert kn.Tuning(matvec_wg=64, matvec_red=1, matvec_unroll=1, norm_wg=64, shift_wg=64, argmax_wg=64,
                     subgroups=False, subgroup_size=0).matvec_wide_pieces == 0


def test_short_rows_take_their_own_pieces_per_lane():
    """matvec_short_pieces applies to rows shorter than matvec_short_k (the LoRA ups): a K = 96
    Q8_0 row (6 pieces) gets 4 lanes at 1 piece per lane where 4 pieces per lane leave it 1;
    long rows keep matvec_pieces, and the head matvec_wide_pieces."""
    def seg(K, fmt="Q8_0", rows=2560):
        return kn.MatSegment(rows=rows, K=K, row_words=kn.row_words(fmt, K), w_base=0, x_off=0,
                             y_off=0, y_stride=rows, fmt=fmt)

    shape = kn.MatvecShape(wg=128, red=32, rows=2, pieces=4, wide_pieces=8, wide_from=32768,
                           short_pieces=1, short_k=1024)
    assert kn.MatvecShape(wg=128, red=32, rows=2, pieces=4).red_for(seg(96)) == 1
    assert shape.red_for(seg(96)) == 4
    assert shape.red_for(seg(320)) == 16  # 20 pieces
    assert shape.red_for(seg(96, "F32")) == 16  # 24 pieces of 4
    assert shape.red_for(seg(2560, "Q4_K")) == 8  # long rows: 40 pieces, >= 4 per lane
    assert shape.red_for(seg(2560, rows=65536)) == 16  # the head
    tuning = kn._tuning_overrides(kn.Tuning(matvec_wg=128, matvec_red=32, matvec_unroll=2, norm_wg=64,
                                            shift_wg=64, argmax_wg=64, subgroups=False, subgroup_size=0),
                                  "matvec_short_pieces=2,matvec_short_k=512")
    assert (tuning.matvec_short_pieces, tuning.matvec_short_k) == (2, 512)


def test_pack_params_checks_names():
    data = kn.pack_params(kn.LAYERNORM, dict(C=256, last_only=1, eps=1e-5))
    words = np.frombuffer(data, np.uint32)
    assert len(data) == 16 and words[0] == 256 and words[1] == 1
    assert np.frombuffer(data, np.float32)[2] == np.float32(1e-5)
    with pytest.raises(kn.KernelError, match="expected"):
        kn.pack_params(kn.LAYERNORM, dict(C=256))


# --- matrix products --------------------------------------------------------------------------

FORMATS = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"]
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")


def k_for(fmt: str, K: int) -> int:
    """The row length a test uses for `fmt`: K itself, or 768 for the K-quants (whose rows are
    whole 256-element blocks; 3 blocks also leave Q6_K's last pair half empty, as K = 96 does
    for Q8_0 and Q4_0)."""
    return 768 if fmt in K_QUANTS else K


def _matmul_case(fmt: str, M: int, K: int, T: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((M, K)).astype(np.float32)
    raw, wv = encode_rows(w, fmt)
    x = rng.standard_normal((T, K)).astype(np.float32)
    return raw, wv, x


def run_matmul(kernels, spec, fmt: str | list[str], segments: list[tuple], X: np.ndarray,
               B: np.ndarray, Y: np.ndarray, T: int, red: int | None = None, unroll: int = 1,
               nr: int = 1, pieces: int = 0, gemm: tuple[int, int] | None = None) -> np.ndarray:
    """Stack the segments' weight rows in one buffer and run one matvec / gemm dispatch.

    segments: (raw rows, K, x_off, y_off, y_stride, act, bias offset or None, accum); fmt: one
    format for all, or one per segment (a mixed stack: FMT_PER_SEGMENT). The matvec runs 64
    threads per workgroup, at most `red` lanes per row (`pieces` > 0: fewer for short rows,
    per segment), `nr` rows per group of lanes; gemm: the tile shape (rows, k step), default
    the tuning's (as the engine, tiles and grid from the pipeline).
    """
    fmts = fmt if isinstance(fmt, list) else [fmt] * len(segments)
    words, table = [], []
    base = 0
    for f, (raw, K, x_off, y_off, y_stride, act, bias, accum) in zip(fmts, segments):
        data = raw.reshape(-1).view(np.uint32)
        words.append(data)
        table.append(kn.MatSegment(rows=raw.shape[0], K=K, row_words=kn.row_words(f, K), w_base=base,
                                   x_off=x_off, y_off=y_off, y_stride=y_stride, act=act, bias=bias,
                                   accum=accum, fmt=f))
        pad = -len(data) % 4
        words.append(np.zeros(pad, np.uint32))
        base += len(data) + pad
    consts = dict(FMT=kn.matmul_fmt(table))
    if spec is kn.MATVEC:
        consts.update(WG=64, RED=red, UNROLL=unroll, NR=nr)
    elif gemm is not None:
        consts.update(ROWS=gemm[0], TK=gemm[1])
    tile_rows = kn.gemm_tile_rows(kernels.kernel(kn.GEMM, **consts)) if spec is kn.GEMM else 64
    shape = kn.MatvecShape(wg=64, red=red or 1, rows=nr, pieces=pieces)
    params, wgs, tiles = kn.matmul_params(table, shape, tile_rows)
    grid = (wgs, T, 1) if spec is kn.MATVEC else kn.gemm_grid(tiles, T)
    return kn.run_kernel(kernels, spec, params, dict(W=np.concatenate(words), X=X, B=B, Y=Y.copy()),
                         grid, T=T, read=("Y",), constants=consts)["Y"]


ACT_FUNCS = {
    "none": lambda v: v,
    "tanh": np.tanh,
    "sigmoid": lambda v: 1 / (1 + np.exp(-v)),
    "relu_sq": lambda v: np.maximum(v, 0) ** 2,
    "decay": lambda v: np.exp(-0.606531 / (1 + np.exp(-v))),
}


# (lanes per row, unroll, rows per group): every lanes x unroll pair with one row per group,
# and 2 or 4 rows per group with a spread of the others (each pipeline build costs lavapipe time)
MATVEC_SHAPES = ([(red, unroll, 1) for red in (1, 8, 32) for unroll in (1, 2, 4)]
                 + [(1, 1, 2), (8, 2, 2), (32, 4, 2), (1, 2, 4), (8, 1, 4), (8, 4, 4), (32, 2, 4)])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("red,unroll,nr", MATVEC_SHAPES, ids=lambda v: str(v))
def test_matvec(kernels, fmt, red, unroll, nr):
    """K = 96 is no multiple of the 64-thread workgroup nor of a Q8_0 / Q4_0 pair (3 blocks:
    padded); with 8 threads per row the unrolled loop ends on an odd piece (K-quants: K = 768,
    12 pieces of 64). M = 37 rows leave the last group of 2 or 4 rows short (its missing rows
    repeat the last one and must not be written: Y has exactly M columns per token)."""
    M, K, T = 37, k_for(fmt, 96), 2
    raw, wv, x = _matmul_case(fmt, M, K, T)
    out = run_matmul(kernels, kn.MATVEC, fmt, [(raw, K, 0, 0, M, "none", None, False)],
                     x, np.zeros(4, np.float32), np.zeros((T, M), np.float32), T, red, unroll, nr)
    want = x.astype(np.float64) @ wv.T
    np.testing.assert_array_less(np.abs(out - want), fp32_tol(np.abs(x) @ np.abs(wv).T, K))


# As in llama.cpp files: w1 / w2 stay F32 beside quantized matrices (and a Q6_K head).
MIXED = {"mixed": ["Q8_0", "F32", "BF16"], "mixed_quant": ["Q4_K", "F32", "Q6_K"]}


# gemm tile shapes (Tuning.gemm_rows, gemm_k) tested besides the tuning's own (64 x 16 here).
GEMM_SHAPES = [(r, k) for r in kn.GEMM_ROWS for k in kn.GEMM_K]


@pytest.mark.parametrize("spec, gemm", [(kn.MATVEC, None), (kn.GEMM, None), (kn.GEMM, (128, 32)),
                                        (kn.GEMM, (32, 16))],
                         ids=["matvec", "gemm", "gemm128x32", "gemm32x16"])
@pytest.mark.parametrize("fmt", FORMATS + list(MIXED))
def test_matmul_segments(kernels, spec, gemm, fmt):
    """Three matrices stacked in one weight buffer, one dispatch: each segment reads its own
    input slot (its own K), writes its own output slot, with its own activation, bias and
    residual add. Rows 130 and 40 cross gemm's row tiles (128, 64 and 32 rows: each segment's
    tiles start at its own tile_start) and end inside one; T = 67 crosses its 64-token tiles;
    K = 32 is a single K step. "mixed" stacks three formats (the pipeline reads each segment's
    format from the table). The matvec
    takes at most 8 lanes per row and gives each segment fewer when its lanes would get under
    2 pieces each (segments of one dispatch then reduce over different lane counts: 8, 4, 2
    or 1), 2 rows per group."""
    fmts = MIXED.get(fmt, [fmt] * 3)
    T = 67 if spec is kn.GEMM else 3
    rng = np.random.default_rng(13)
    shapes = [(130, 96, "tanh", True, False), (5, 64, "none", False, True), (40, 32, "decay", True, True)]
    shapes = [(M, k_for(f, K), *rest) for f, (M, K, *rest) in zip(fmts, shapes)]
    X = rng.standard_normal(sum(T * K for _, K, *_ in shapes) + 8).astype(np.float32)
    B = rng.standard_normal(256).astype(np.float32)
    width = sum(M for M, *_ in shapes) + 3
    Y0 = rng.standard_normal((T, width)).astype(np.float32)
    segments, want = [], Y0.astype(np.float64).copy()
    tols = np.full(Y0.shape, 1e-9)  # columns outside every segment are checked exactly below
    x_off, y_off, b_off = 8, 3, 16  # nothing starts at 0, so offsets are really used
    for i, (M, K, act, bias, accum) in enumerate(shapes):
        raw, wv, _ = _matmul_case(fmts[i], M, K, 1, seed=20 + i)
        x = X[x_off: x_off + T * K].reshape(T, K).astype(np.float64)
        z = x @ wv.T + (B[b_off: b_off + M] if bias else 0)
        cols = slice(y_off, y_off + M)
        want[:, cols] = (want[:, cols] if accum else 0) + ACT_FUNCS[act](z)
        tols[:, cols] = fp32_tol(np.abs(x) @ np.abs(wv).T, K) * (1 + 2 * np.abs(z)) + 1e-6 * (1 + np.abs(want[:, cols]))
        segments.append((raw, K, x_off, y_off, width, act, b_off if bias else None, accum))
        x_off, y_off, b_off = x_off + T * K, y_off + M, b_off + M
    out = run_matmul(kernels, spec, fmts, segments, X, B, Y0, T, red=8, unroll=2, nr=2, pieces=2, gemm=gemm)
    np.testing.assert_array_less(np.abs(out - want), tols)
    np.testing.assert_array_equal(out[:, :3], Y0[:, :3])  # outside every segment: untouched


@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("fmt", FORMATS)
def test_gemm(kernels, fmt, shape):
    """Every tile shape: M = 130 crosses the 128-, 64- and 32-row tiles and ends 2 rows into
    the last; T = 131 is 3 token tiles, the last with 3 tokens; K = 96 is 3 steps of 32 or 6
    of 16 (K-quants: 768, 24 or 48 steps)."""
    M, K, T = 130, k_for(fmt, 96), 131
    raw, wv, x = _matmul_case(fmt, M, K, T, seed=4)
    out = run_matmul(kernels, kn.GEMM, fmt, [(raw, K, 0, 0, M, "none", None, False)],
                     x, np.zeros(4, np.float32), np.zeros((T, M), np.float32), T, gemm=shape)
    want = x.astype(np.float64) @ wv.T
    np.testing.assert_array_less(np.abs(out - want), fp32_tol(np.abs(x) @ np.abs(wv).T, K))


@pytest.mark.parametrize("fmt", ["F32", "Q8_0", "Q6_K"])
def test_gemm_shapes_agree_bitwise(kernels, fmt):
    """Each output is one fma chain over k = 0..K-1 whatever the tile shape, so every shape
    gives the same bits (what lets the engine switch shapes without moving a logit)."""
    M, K, T = 70, k_for(fmt, 128), 67
    raw, _, x = _matmul_case(fmt, M, K, T, seed=7)
    outs = [run_matmul(kernels, kn.GEMM, fmt, [(raw, K, 0, 0, M, "none", None, False)], x,
                       np.zeros(4, np.float32), np.zeros((T, M), np.float32), T, gemm=shape)
            for shape in GEMM_SHAPES]
    for shape, out in zip(GEMM_SHAPES[1:], outs[1:]):
        np.testing.assert_array_equal(out, outs[0], err_msg=f"shape {shape} vs {GEMM_SHAPES[0]}")


def test_gemm_tile_constants_agree():
    """GEMM_TOKENS is the shader's token tile; the workgroup memory formula is its two tiles."""
    src = kn.shader_source("gemm.wgsl")
    assert int(re.search(r"const TOKENS: u32 = (\d+)u;", src).group(1)) == kn.GEMM_TOKENS
    assert kn.gemm_grid(5, 1) == (5, 1, 1) and kn.gemm_grid(5, 65) == (5, 2, 1)
    assert kn.gemm_workgroup_bytes(128, 16) == 15360 <= 16384  # WebGPU's guaranteed minimum
    assert kn.gemm_workgroup_bytes(128, 32) == 27648


def test_gemm_ignores_tokens_beyond_T(kernels):
    """Rows of X past run.T (stale data from a longer chunk) must not reach the output."""
    M, K, T = 16, 32, 3
    raw, wv, x = _matmul_case("F32", M, K, 8, seed=5)
    y0 = np.random.default_rng(6).standard_normal((8, M)).astype(np.float32)
    out = run_matmul(kernels, kn.GEMM, "F32", [(raw, K, 0, 0, M, "none", None, False)],
                     x, np.zeros(4, np.float32), y0, T)
    np.testing.assert_array_equal(out[T:], y0[T:])
    np.testing.assert_allclose(out[:T], x[:T].astype(np.float64) @ wv.T, rtol=1e-5, atol=1e-5)


def test_matmul_fmt():
    seg = kn.MatSegment(rows=4, K=32, row_words=8, w_base=0, x_off=0, y_off=0, y_stride=4, fmt="Q8_0")
    assert kn.matmul_fmt([seg, seg]) == kn.GPU_FORMATS["Q8_0"]
    other = kn.MatSegment(rows=4, K=32, row_words=32, w_base=0, x_off=0, y_off=0, y_stride=4)
    assert kn.matmul_fmt([seg, other]) == kn.FMT_PER_SEGMENT


def test_matmul_params_checks():
    seg = kn.MatSegment(rows=5, K=32, row_words=32, w_base=0, x_off=0, y_off=0, y_stride=4)
    shape = kn.MatvecShape(wg=64, red=16, rows=1)  # 4 rows per workgroup
    params, wgs, tiles = kn.matmul_params([seg, seg], shape)
    assert (wgs, tiles) == (4, 2) and params["seg"][1]["wg_start"] == 2
    assert params["seg"][0]["red"] == params["seg"][1]["red"] == 16
    with pytest.raises(kn.KernelError):
        kn.matmul_params([seg] * (kn.MAX_SEGMENTS + 1), shape)
    with pytest.raises(kn.KernelError, match="multiple"):
        kn.matmul_params([kn.MatSegment(rows=4, K=48, row_words=48, w_base=0, x_off=0, y_off=0,
                                        y_stride=4)], shape)


# --- norms, token shift, per-head pieces, wkv ---------------------------------------------------


def _layernorm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


@pytest.mark.parametrize("wg", [None, 2, 4, 256, 1024])
def test_layernorm(kernels, wg):
    """With the tuning's workgroup, and with every group_sum width the norm kernels can be given
    (2: the pair branch of reduce.wgsl; 1024: the longest serial sum, most threads adding 0)."""
    rng = np.random.default_rng(6)
    T, C, eps = 3, 256, 1e-5
    x = (rng.standard_normal((T, C)) * 3 + 5).astype(np.float32)  # |mean| >> std: no cancellation
    w, b = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    want = _layernorm(x.astype(np.float64), w, b, eps)
    arrays = dict(X=x, NW=w, NB=b, Y=np.zeros((T, C), np.float32))
    consts = {} if wg is None else dict(WG=wg, RED=wg)
    out = kn.run_kernel(kernels, kn.LAYERNORM, dict(C=C, last_only=0, eps=eps), arrays, (T, 1, 1),
                        T=T, read=("Y",), constants=consts)["Y"]
    # normalised values are O(1): a few ulps each through mean, variance and rsqrt
    np.testing.assert_allclose(out, want, rtol=0, atol=2e-5 * (1 + np.abs(want)).max())
    last = kn.run_kernel(kernels, kn.LAYERNORM, dict(C=C, last_only=1, eps=eps), arrays, (1, 1, 1),
                         T=T, read=("Y",), constants=consts)["Y"]
    np.testing.assert_allclose(last[0], want[-1], rtol=0, atol=2e-5 * (1 + np.abs(want)).max())


def test_groupnorm_out(kernels):
    rng = np.random.default_rng(7)
    T, H, N = 2, 3, 64
    C = H * N
    y, r, k, v, g = (rng.standard_normal((T, C)).astype(np.float32) for _ in range(5))
    lnw, lnb, rk = (rng.standard_normal(C).astype(np.float32) for _ in range(3))
    yh = y.reshape(T, H, N).astype(np.float64)
    mean = yh.mean(-1, keepdims=True)
    var = ((yh - mean) ** 2).mean(-1, keepdims=True)
    norm = ((yh - mean) / np.sqrt(var + 64e-5)).reshape(T, C) * lnw + lnb
    bonus = (r * k * rk).reshape(T, H, N).astype(np.float64).sum(-1, keepdims=True) * v.reshape(T, H, N)
    want = (norm + bonus.reshape(T, C)) * g
    out = kn.run_kernel(kernels, kn.GROUPNORM_OUT, dict(C=C),
                        dict(GY=y, R=r, K=k, V=v, G=g, LNW=lnw, LNB=lnb, RK=rk), (H, T, 1), T=T,
                        read=("GY",))["GY"]
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nmix", [6, 1])
def test_shift_mix(kernels, nmix):
    """Token shift inside a chunk uses the previous token's normed x; PREV carries across."""
    rng = np.random.default_rng(8)
    T, C, slot_tokens = 4, 128, 6
    xn = rng.standard_normal((T, C)).astype(np.float32)
    prev = rng.standard_normal(C).astype(np.float32)
    lerp = rng.random((nmix, C)).astype(np.float32)
    out0 = np.zeros((nmix, slot_tokens, C), np.float32)
    res = kn.run_kernel(kernels, kn.SHIFT_MIX, dict(C=C, slot=slot_tokens * C),
                        dict(XN=xn, PREV=prev, LERP=lerp, OUT=out0), (-(-C // 4 // 64), 1, 1), T=T,
                        constants=dict(NMIX=nmix), read=("OUT", "PREV"))
    before = np.vstack([prev[None], xn[:-1]]).astype(np.float64)
    want = xn[None] + (before - xn)[None] * lerp[:, None, :]
    np.testing.assert_allclose(res["OUT"][:, :T], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(res["OUT"][:, T:], 0)
    np.testing.assert_array_equal(res["PREV"], xn[-1])


@pytest.mark.parametrize("first", [True, False])
def test_kv_prep(kernels, first):
    rng = np.random.default_rng(9)
    T, H, N = 3, 2, 64
    C = H * N
    k, v, a, vmix, vf = (rng.standard_normal((T, C)).astype(np.float32) for _ in range(5))
    a, vmix = 1 / (1 + np.exp(-a)), 1 / (1 + np.exp(-vmix))
    kkw, kaw = rng.standard_normal(C).astype(np.float32), rng.random(C).astype(np.float32)
    res = kn.run_kernel(kernels, kn.KV_PREP, dict(C=C),
                        dict(K=k, V=v, KK=np.zeros_like(k), A=a, VMIX=vmix, VF=vf, KKW=kkw, KAW=kaw),
                        (H, T, 1), T=T, constants=dict(FIRST=first), read=("K", "V", "KK", "VF"))
    kk = (k * kkw).reshape(T, H, N).astype(np.float64)
    kk = (kk / np.maximum(np.linalg.norm(kk, axis=-1, keepdims=True), 1e-12)).reshape(T, C)
    np.testing.assert_allclose(res["KK"], kk, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res["K"], k * (1 + (a.astype(np.float64) - 1) * kaw), rtol=1e-5, atol=1e-6)
    if first:
        np.testing.assert_array_equal(res["VF"], v)
        np.testing.assert_array_equal(res["V"], v)
    else:
        np.testing.assert_allclose(res["V"], v + (vf.astype(np.float64) - v) * vmix, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(res["VF"], vf)


@pytest.mark.parametrize("first", [True, False])
def test_kv_prep_parts_equal_the_whole(kernels, first):
    """The unfused plan's three kv dispatches (PART 1 kk, 2 k update, 3 value residual, in that
    order, in place) do kv_prep's arithmetic: every output bit-identical to PART 0."""
    rng = np.random.default_rng(19)
    T, H, C = 2, 2, 128
    k, v, a, vmix, vf = (rng.standard_normal((T, C)).astype(np.float32) for _ in range(5))
    kkw, kaw = rng.standard_normal(C).astype(np.float32), rng.random(C).astype(np.float32)
    arrays = dict(K=k, V=v, KK=np.zeros_like(k), A=a, VMIX=vmix, VF=vf, KKW=kkw, KAW=kaw)
    names = ("K", "V", "KK", "VF")
    whole = kn.run_kernel(kernels, kn.KV_PREP, dict(C=C), arrays, (H, T, 1), T=T,
                          constants=dict(FIRST=first), read=names)
    for part in (1, 2, 3):
        out = kn.run_kernel(kernels, kn.KV_PREP, dict(C=C), arrays, (H, T, 1), T=T,
                            constants=dict(FIRST=first, PART=part), read=names)
        arrays = {**arrays, **out}
    for name in names:
        np.testing.assert_array_equal(arrays[name], whole[name], err_msg=name)


def test_activate_in_place(kernels):
    """relu^2 over the first T tokens of [T_max, n]; rows past T stay as they were."""
    rng = np.random.default_rng(20)
    x = rng.standard_normal((4, 96)).astype(np.float32)
    T = 3
    res = kn.run_kernel(kernels, kn.ACTIVATE, dict(n=96, act=kn.ACTIVATIONS["relu_sq"]), dict(AX=x),
                        (-(-96 // 64), 4, 1), T=T, read=("AX",))
    np.testing.assert_array_equal(res["AX"][:T], np.maximum(x[:T], 0) ** 2)
    np.testing.assert_array_equal(res["AX"][T:], x[T:])


@pytest.mark.parametrize("red,nr,pieces", [(1, 1, 0), (8, 1, 0), (1, 4, 0), (8, 4, 2), (32, 2, 4)])
def test_lora_pairs_equal_two_matvecs(kernels, red, nr, pieces):
    """Two LoRA pairs (Q8_0 / F32, and F16 / BF16: a mixed table) in one lora dispatch, two tokens.
    Each pair: down (rank 96 / 64 rows over K = 128) with its activation, up (C = 300 rows over
    the rank, LROWS = 256: a second, partial workgroup) with bias and activation. The result
    equals the matvec dispatches it replaces (same loop and reduction: bit-identical on lavapipe;
    an H100's driver may contract multiply-adds differently in the two pipelines, so 1e-6
    relative is allowed) and is within 1e-4 of float64 NumPy (f32 sums over K = 128 then 96).
    With `pieces`, the four matrices take different lanes per row (2 to 8), as they would alone;
    with nr rows per group the last group of a down matrix or of a workgroup's rows is short."""
    rng = np.random.default_rng(21)
    T, K, C = 2, 128, 300
    pairs = [("Q8_0", "F32", 96, "tanh", "decay"), ("F16", "BF16", 64, "sigmoid", "none")]
    X = rng.standard_normal(8 + 2 * T * K).astype(np.float32)
    B = rng.standard_normal(2 * C + 8).astype(np.float32)
    Y0 = rng.standard_normal((T, 2 * C + 4)).astype(np.float32)
    words, table, hidden, want = [], [], [], Y0.astype(np.float64).copy()
    base = 0

    def add(raw):
        nonlocal base
        data = raw.reshape(-1).view(np.uint32)
        w_base = base
        words.extend([data, np.zeros(-len(data) % 4, np.uint32)])
        base += len(data) + (-len(data) % 4)
        return w_base

    for j, (fd, fu, rank, act1, act2) in enumerate(pairs):
        dw = rng.standard_normal((rank, K)).astype(np.float32) / np.sqrt(K)
        uw = rng.standard_normal((C, rank)).astype(np.float32) / np.sqrt(rank)
        draw, dv = encode_rows(dw, fd)
        uraw, uv = encode_rows(uw, fu)
        x_off, y_off, b_off = 8 + j * T * K, 4 + j * C, 8 + j * C
        down = kn.MatSegment(rows=rank, K=K, row_words=kn.row_words(fd, K), w_base=add(draw),
                             x_off=x_off, y_off=0, y_stride=0, act=act1, fmt=fd)
        up = kn.MatSegment(rows=C, K=rank, row_words=kn.row_words(fu, rank), w_base=add(uraw),
                           x_off=0, y_off=y_off, y_stride=Y0.shape[1], act=act2,
                           bias=b_off if act2 == "decay" else None, fmt=fu)
        table.append((down, up))
        x = X[x_off: x_off + T * K].reshape(T, K).astype(np.float64)
        h = ACT_FUNCS[act1](x @ dv.T)
        z = h @ uv.T + (B[b_off: b_off + C] if up.bias is not None else 0)
        want[:, y_off: y_off + C] = ACT_FUNCS[act2](z)
        hidden.append((down, up, rank))
    W = np.concatenate(words)
    segs = [s for pr in table for s in pr]
    consts = dict(FMT=kn.matmul_fmt(segs), WG=64, RED=red, UNROLL=2, NR=nr)
    shape = kn.MatvecShape(wg=64, red=red, rows=nr, pieces=pieces)
    params, wgs = kn.lora_params(table, 256, shape)
    if pieces:  # lanes per row of (Q8_0 down, F32 up, F16 down, BF16 up)
        assert [e["red"] for e in params["seg"][:4]] == {8: [4, 8, 8, 4], 32: [2, 4, 4, 2]}[red]
    assert wgs == 4
    out = kn.run_kernel(kernels, kn.LORA, params, dict(W=W, X=X, B=B, Y=Y0.copy()), (wgs, T, 1), T=T,
                        read=("Y",), constants=consts)["Y"]
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out[:, :4], Y0[:, :4])  # outside every pair: untouched
    # the unfused plan: down into a hidden buffer, then up from it, each one matvec dispatch
    Y = Y0.copy()
    for down, up, rank in hidden:
        Hbuf = np.zeros((T, rank), np.float32)
        d = dict(down.__dict__, y_off=0, y_stride=rank)
        p, n, _ = kn.matmul_params([kn.MatSegment(**d)], shape)
        Hbuf = kn.run_kernel(kernels, kn.MATVEC, p, dict(W=W, X=X, B=B, Y=Hbuf), (n, T, 1), T=T,
                             read=("Y",), constants=dict(consts, FMT=kn.GPU_FORMATS[down.fmt]))["Y"]
        p, n, _ = kn.matmul_params([up], shape)
        Y = kn.run_kernel(kernels, kn.MATVEC, p, dict(W=W, X=Hbuf, B=B, Y=Y), (n, T, 1), T=T,
                          read=("Y",), constants=dict(consts, FMT=kn.GPU_FORMATS[up.fmt]))["Y"]
    np.testing.assert_allclose(out, Y, rtol=1e-6, atol=1e-7)


def test_lora_params_checks():
    seg = kn.MatSegment(rows=32, K=64, row_words=64, w_base=0, x_off=0, y_off=0, y_stride=0)
    up = kn.MatSegment(rows=64, K=64, row_words=64, w_base=0, x_off=0, y_off=0, y_stride=0)
    shape = kn.MatvecShape(wg=64, red=8, rows=4)
    with pytest.raises(kn.KernelError, match="must be equal"):
        kn.lora_params([(seg, up)], 256, shape)
    with pytest.raises(kn.KernelError, match="pairs"):
        kn.lora_params([], 256, shape)
    with pytest.raises(kn.KernelError, match="multiple"):
        kn.lora_params([(seg, seg)], 254, shape)


# wkv_wg values (threads per head: 64 x lanes per state row). CPU adapters run 64, GPUs 256
# (kernels.choose_tuning); every allowed shape is tested on both paths here.
WKV_WGS = [64, 128, 256, 512, 1024]


def _wkv_reference(r, w, k, v, kk, a, s0):
    """The state update in float64: (y [T, C], final S [H, 64, 64]) and first-order worst-case
    bounds of an fp32 kernel's error on each, whatever order it sums in: a sum of 64 products
    is off by at most 64 u sum|products| (u = 2^-24) plus the error its inputs carry; each new
    state entry by 4 u of its three terms' magnitudes (its roundings, kk*a's included), plus the
    decayed old error and sa's error times |kk*a|."""
    T, C = r.shape
    H, N = C // 64, 64
    S, E = s0.astype(np.float64), np.zeros((H, N, N))
    y, y_err = np.zeros((T, C)), np.zeros((T, C))
    for t in range(T):
        for h in range(H):
            sl = slice(h * N, (h + 1) * N)
            kka = kk[t, sl] * a[t, sl]
            sa = S[h] @ (-kk[t, sl])
            sa_err = N * U32 * (np.abs(S[h]) @ np.abs(kk[t, sl])) + E[h] @ np.abs(kk[t, sl])
            terms = (S[h] * w[t, sl][None], np.outer(v[t, sl], k[t, sl]), np.outer(sa, kka))
            E[h] = E[h] * w[t, sl][None] + np.outer(sa_err, np.abs(kka)) + 4 * U32 * sum(map(np.abs, terms))
            S[h] = sum(terms)
            y[t, sl] = S[h] @ r[t, sl]
            y_err[t, sl] = N * U32 * (np.abs(S[h]) @ np.abs(r[t, sl])) + E[h] @ np.abs(r[t, sl])
    return y, S, y_err, E


def _wkv_case(T: int, H: int, seed: int) -> dict[str, np.ndarray]:
    """Inputs of wkv in their model ranges: r, k, v normal, w in (0.545, 1), kk unit per head,
    a in (0, 1), and a random non-zero state."""
    rng = np.random.default_rng(seed)
    N = 64
    C = H * N
    r, k, v = (rng.standard_normal((T, C)).astype(np.float32) for _ in range(3))
    w = np.exp(-0.606531 / (1 + np.exp(-rng.standard_normal((T, C))))).astype(np.float32)
    kk = rng.standard_normal((T, H, N))
    kk = (kk / np.linalg.norm(kk, axis=-1, keepdims=True)).reshape(T, C).astype(np.float32)
    a = rng.random((T, C)).astype(np.float32)
    s0 = (rng.standard_normal((H, N, N)) * 0.1).astype(np.float32)
    return dict(R=r, DECAY=w, K=k, V=v, KK=kk, A=a, S=s0, Y=np.zeros((T, C), np.float32))


@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("wg", WKV_WGS)
def test_wkv_over_several_tokens(kernels, wg, T):
    """T tokens through three heads from a non-zero state: outputs and the final state, for
    every workgroup shape (1 to 16 lanes per state row). Tolerance: twice the worst-case fp32
    bounds of _wkv_reference (first order; doubled for the terms it drops), + 1e-7."""
    H, C = 3, 3 * 64
    x = _wkv_case(T, H, seed=10)
    res = kn.run_kernel(kernels, kn.WKV, dict(C=C), {**x, "S": x["S"].copy()}, (H, 1, 1), T=T,
                        read=("S", "Y"), constants=dict(WG=wg))
    want, S, y_err, s_err = _wkv_reference(*(x[n].astype(np.float64) for n in ("R", "DECAY", "K", "V", "KK", "A")),
                                           x["S"])
    assert np.all(np.abs(res["S"] - S) <= 2 * s_err + 1e-7)
    assert np.all(np.abs(res["Y"] - want) <= 2 * y_err + 1e-7)


@pytest.fixture(scope="module")
def native_kernels() -> kn.Kernels:
    """The native path's kernels (wkv_prefill needs subgroups; lavapipe has them, size 8)."""
    gpu = get_gpu("auto", native=True)
    return kn.kernels_for(gpu, kn.choose_tuning(gpu, "native"))


# (lanes per row, rows per workgroup) of wkv_prefill: lavapipe's default (a row per lane, a
# head per workgroup), GPUs' (4 x 32), 2-8 lanes, 16-thread workgroups (1-token blocks: a
# barrier pair per token) and 256-thread ones (16-token blocks). Lanes stay <= 8, the subgroup
# size of both lavapipes (CI); wider rows are refused below a row's subgroup
# (test_wkv_prefill_refuses_shapes_it_cannot_run), and wkv_bench checks 16 lanes on GPUs.
WKV_PREFILL_SHAPES = [(1, 64), (4, 32), (2, 8), (4, 64), (8, 16), (8, 2)]


@pytest.mark.parametrize("T", [2, 7, 37])
@pytest.mark.parametrize("lanes,rows", WKV_PREFILL_SHAPES, ids=lambda x: str(x))
def test_wkv_prefill_over_several_tokens(native_kernels, lanes, rows, T):
    """The prefill kernel (rows spread over workgroups, subgroup sums) over T tokens of three
    heads from a random non-zero state, T = 37 not a multiple of any block (1..16 tokens):
    outputs and the final state against float64 NumPy and against the sequential kernel wkv.
    Tolerances: against NumPy, twice the worst-case fp32 bounds of _wkv_reference (whatever the
    summation order: first order, doubled for the terms it drops) + 1e-7, as wkv's own test;
    against wkv, both kernels' bounds added (each is within its bound of the exact value). With
    one lane per row the sums run in wkv's order (WG = 64): the same bits on CPU adapters
    (GPUs: conftest.assert_same_plan, per-pipeline fma contraction)."""
    k = native_kernels
    assert lanes <= k.tuning.subgroup_size
    H = 3
    C = H * 64
    x = _wkv_case(T, H, seed=17)
    consts = dict(WG=lanes * rows, LANES=lanes)
    res = kn.run_kernel(k, kn.WKV_PREFILL, dict(C=C), {**x, "S": x["S"].copy()},
                        kn.wkv_prefill_grid(k.kernel(kn.WKV_PREFILL, **consts), C), T=T,
                        read=("S", "Y"), constants=consts)
    seq = kn.run_kernel(k, kn.WKV, dict(C=C), {**x, "S": x["S"].copy()}, (H, 1, 1), T=T, read=("S", "Y"),
                        constants=dict(WG=64))
    want, S, y_err, s_err = _wkv_reference(*(x[n].astype(np.float64) for n in ("R", "DECAY", "K", "V", "KK", "A")),
                                           x["S"])
    assert np.all(np.abs(res["S"] - S) <= 2 * s_err + 1e-7)
    assert np.all(np.abs(res["Y"] - want) <= 2 * y_err + 1e-7)
    assert np.all(np.abs(res["S"] - seq["S"]) <= 4 * s_err + 2e-7)
    assert np.all(np.abs(res["Y"] - seq["Y"]) <= 4 * y_err + 2e-7)
    if lanes == 1:
        assert_same_plan(res["Y"], seq["Y"], k.gpu)
        assert_same_plan(res["S"], seq["S"], k.gpu)


def test_wkv_prefill_refuses_shapes_it_cannot_run(native_kernels):
    """A row's lanes must share a subgroup and a workgroup's rows one head; choose_tuning
    lowers wkv_lanes to the subgroup size (keeping 16 threads a workgroup), so what a run
    records is what ran."""
    k = native_kernels
    sg = k.tuning.subgroup_size
    with pytest.raises(kn.KernelError, match="must fit a subgroup"):
        k.kernel(kn.WKV_PREFILL, WG=2 * sg * 8, LANES=2 * sg)
    for wg, lanes in ((8, 1), (512, 8), (128, 1), (96, 2)):  # too small, too big, 128 rows, 48 rows
        with pytest.raises(kn.KernelError, match="WG / LANES rows must divide 64"):
            k.kernel(kn.WKV_PREFILL, WG=wg, LANES=lanes)
    t = kn.choose_tuning(k.gpu, "native", "wkv_lanes=16,wkv_rows=1")
    assert (t.wkv_lanes, t.wkv_rows) == (min(16, sg), 16 // min(16, sg))


# --- fused kernels: each against the NumPy composition of the kernels it replaces -------------


@pytest.mark.parametrize("nmix", [6, 1])
@pytest.mark.parametrize("C", [256, 640])
def test_norm_shift(kernels, nmix, C):
    """LayerNorm + token shift of one token in one dispatch; PREV becomes the normed token.
    C = 640 is three workgroups of 64 vec4s, the last one partly idle."""
    rng = np.random.default_rng(14)
    eps, slot = 1e-5, 3 * C
    x = (rng.standard_normal(C) * 2 + 1).astype(np.float32)
    w, b, prev = (rng.standard_normal(C).astype(np.float32) for _ in range(3))
    lerp = rng.random((nmix, C)).astype(np.float32)
    res = kn.run_kernel(kernels, kn.NORM_SHIFT, dict(C=C, slot=slot, eps=eps),
                        dict(NX=x, NW=w, NB=b, NPREV=prev, NLERP=lerp,
                             NOUT=np.zeros((nmix, slot), np.float32)),
                        (-(-C // 256), 1, 1), T=1, constants=dict(NMIX=nmix), read=("NOUT", "NPREV"))
    xn = _layernorm(x.astype(np.float64), w, b, eps)
    tol = 2e-5 * (1 + np.abs(xn)).max()
    np.testing.assert_allclose(res["NPREV"], xn, rtol=0, atol=tol)
    want = xn + (prev - xn) * lerp
    np.testing.assert_allclose(res["NOUT"][:, :C], want, rtol=0, atol=2 * tol)
    np.testing.assert_array_equal(res["NOUT"][:, C:], 0)


def _wkv_chain(T, H, r, k, v, w, a, vmix, g, vf, kkw, kaw, rk, lnw, lnb, s0, first):
    """kv_prep, wkv, groupnorm_out in float64, as the unfused kernels compute them."""
    N = 64
    C = H * N
    kk = (k * kkw).reshape(T, H, N)
    kk = (kk / np.maximum(np.linalg.norm(kk, axis=-1, keepdims=True), 1e-12)).reshape(T, C)
    kn_ = k * (1 + (a - 1) * kaw)
    v = v.copy() if first else v + (vf - v) * vmix
    S, y = s0.copy(), np.zeros((T, C))
    for t in range(T):
        for h in range(H):
            sl = slice(h * N, (h + 1) * N)
            sa = S[h] @ (-kk[t, sl])
            S[h] = S[h] * w[t, sl][None] + np.outer(v[t, sl], kn_[t, sl]) + np.outer(sa, kk[t, sl] * a[t, sl])
            y[t, sl] = S[h] @ r[t, sl]
    yh = y.reshape(T, H, N)
    mean = yh.mean(-1, keepdims=True)
    var = ((yh - mean) ** 2).mean(-1, keepdims=True)
    norm = ((yh - mean) / np.sqrt(var + 64e-5)).reshape(T, C) * lnw + lnb
    bonus = (r * kn_ * rk).reshape(T, H, N).sum(-1, keepdims=True) * v.reshape(T, H, N)
    return (norm + bonus.reshape(T, C)) * g, S, v


def _fused_case(T: int, H: int, seed: int) -> dict[str, np.ndarray]:
    """Random float32 inputs of wkv_fused in their model ranges (w, a, vmix in (0, 1))."""
    rng = np.random.default_rng(seed)
    C, N = H * 64, 64
    case = {name: rng.standard_normal((T, C)) for name in ("r", "k", "v", "g", "vf")}
    case["w"] = np.exp(-0.606531 / (1 + np.exp(-rng.standard_normal((T, C)))))
    case["a"], case["vmix"] = (1 / (1 + np.exp(-rng.standard_normal((T, C)))) for _ in range(2))
    case["vecs"] = rng.standard_normal((5, C))  # k_k, k_a, r_k, ln_x weight, ln_x bias
    case["vecs"][1] = rng.random(C)
    case["s0"] = rng.standard_normal((H, N, N)) * 0.1
    return {name: x.astype(np.float32) for name, x in case.items()}


def _run_wkv_fused(kernels, c: dict, first: bool, prep: bool, wg: int, k_in, v_in, kk_in) -> dict:
    """One wkv_fused dispatch on case `c` whose DOWN slots hold r, k_in, v_in (after 4 floats
    of padding: offsets are not slot-aligned) and FKK kk_in; returns FY, FS, FVF."""
    T, C = c["r"].shape
    down = np.concatenate([np.zeros(4, np.float32), c["r"].ravel(), k_in.ravel(), v_in.ravel()])
    up = np.concatenate([c["w"].ravel(), c["a"].ravel(), c["vmix"].ravel(), c["g"].ravel()])
    n = T * C
    params = dict(C=C, r=4, k=4 + n, v=4 + 2 * n, w=0, a=n, vmix=2 * n, g=3 * n,
                  kkw=0, kaw=C, rk=2 * C, lnw=3 * C, lnb=4 * C)
    return kn.run_kernel(kernels, kn.WKV_FUSED, params,
                         dict(DOWN=down, UP=up, VEC=c["vecs"], FVF=c["vf"].copy(), FS=c["s0"].copy(),
                              FY=np.zeros((T, C), np.float32), FKK=kk_in),
                         (C // 64, 1, 1), T=T, constants=dict(FIRST=first, PREP=prep, WG=wg),
                         read=("FY", "FS", "FVF"))


@pytest.mark.parametrize("wg", WKV_WGS)
@pytest.mark.parametrize("prep", [True, False], ids=["prep", "no_prep"])
@pytest.mark.parametrize("first", [True, False])
def test_wkv_fused(kernels, first, prep, wg):
    """kv_prep + wkv + groupnorm_out in one dispatch, four tokens, inputs read at slot offsets,
    for every workgroup shape. Without PREP (the "wkv" fusion without "kv") the kernel gets k
    and v already updated and kk from FKK, as the three kv dispatches leave them."""
    T, H, N = 4, 2, 64
    C = H * N
    c = _fused_case(T, H, seed=15)
    r, k, v, g, vf, w, a, vmix, vecs, s0 = (c[n] for n in ("r", "k", "v", "g", "vf", "w", "a", "vmix", "vecs", "s0"))
    d64 = lambda x: x.astype(np.float64)  # noqa: E731
    kk_in = np.zeros((T, C), np.float32)
    k_in, v_in = k, v
    if not prep:  # the inputs the kv dispatches would leave, rounded to f32 like theirs
        kk_in = (k * vecs[0]).reshape(T, H, N)
        kk_in = (kk_in / np.maximum(np.linalg.norm(kk_in, axis=-1, keepdims=True), 1e-12)).reshape(T, C)
        k_in = k * (1 + (a - 1) * vecs[1])
        v_in = v if first else v + (vf - v) * vmix
    res = _run_wkv_fused(kernels, c, first, prep, wg, k_in, v_in, kk_in.astype(np.float32))
    want, S, v_used = _wkv_chain(T, H, *map(d64, (r, k, v, w, a, vmix, g, vf, *vecs, s0)), first)
    np.testing.assert_allclose(res["FS"], S, rtol=0, atol=1e-5 * np.abs(S).max())
    # GroupNorm divides by the head's spread of y: allow its relative error on the O(1) outputs
    np.testing.assert_allclose(res["FY"], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    np.testing.assert_array_equal(res["FVF"], v if first and prep else vf)


@pytest.mark.parametrize("wg", WKV_WGS)
@pytest.mark.parametrize("prep", [True, False], ids=["prep", "no_prep"])
@pytest.mark.parametrize("first", [True, False])
def test_wkv_fused_equals_the_kernels_it_replaces(kernels, first, prep, wg):
    """wkv_fused against the unfused plan's dispatches on the same inputs (kv_prep, wkv of the
    same WG, groupnorm_out; kv_prep and groupnorm_out always run 64 threads per head): output,
    state and v_first bit-identical (GPUs: conftest.assert_same_plan), for every workgroup
    shape on both paths. This is what lets
    the engine's fused plans give the unfused plan's logits exactly: the head sums of wkv_fused
    (sum64) must reproduce group_sum's bits, and its state update must be wkv's."""
    T, H = 6, 3
    c = _fused_case(T, H, seed=16)
    T, C = c["r"].shape
    prepped = kn.run_kernel(kernels, kn.KV_PREP, dict(C=C),
                            dict(K=c["k"], V=c["v"], KK=np.zeros_like(c["k"]), A=c["a"], VMIX=c["vmix"],
                                 VF=c["vf"].copy(), KKW=c["vecs"][0], KAW=c["vecs"][1]),
                            (H, T, 1), T=T, constants=dict(FIRST=first), read=("K", "V", "KK", "VF"))
    k2, v2, kk = prepped["K"], prepped["V"], prepped["KK"]
    state = kn.run_kernel(kernels, kn.WKV, dict(C=C),
                          dict(R=c["r"], DECAY=c["w"], K=k2, V=v2, KK=kk, A=c["a"], S=c["s0"].copy(),
                               Y=np.zeros((T, C), np.float32)),
                          (H, 1, 1), T=T, constants=dict(WG=wg), read=("S", "Y"))
    out = kn.run_kernel(kernels, kn.GROUPNORM_OUT, dict(C=C),
                        dict(GY=state["Y"], R=c["r"], K=k2, V=v2, G=c["g"], LNW=c["vecs"][3],
                             LNB=c["vecs"][4], RK=c["vecs"][2]),
                        (H, T, 1), T=T, read=("GY",))["GY"]
    if prep:
        fused = _run_wkv_fused(kernels, c, first, True, wg, c["k"], c["v"], np.zeros_like(kk))
        np.testing.assert_array_equal(fused["FVF"], prepped["VF"])
    else:  # the plan's kv dispatches did the updates, v_first included
        fused = _run_wkv_fused(kernels, c, first, False, wg, k2, v2, kk)
        np.testing.assert_array_equal(fused["FVF"], c["vf"])
    assert_same_plan(fused["FY"], out, kernels.gpu)
    assert_same_plan(fused["FS"], state["S"], kernels.gpu)


# --- embedding gather and argmax ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_embed(kernels, fmt):
    """Gather + LayerNorm; with a piece of rows [row0, row0+rows) only its own tokens are written."""
    rng = np.random.default_rng(11)
    V, C, eps = 50, k_for(fmt, 128), 1e-5
    raw, table = encode_rows(rng.standard_normal((V, C)).astype(np.float32), fmt)
    w, b = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    tokens = np.array([3, 49, 20, 0, 25], np.uint32)
    T = len(tokens)
    want = _layernorm(table[tokens], w, b, eps)
    y0 = np.full((T, C), 7.0, np.float32)
    rw = kn.row_words(fmt, C)
    out = kn.run_kernel(kernels, kn.EMBED, dict(C=C, row0=0, rows=V, row_words=rw, w_base=0, eps=eps),
                        dict(W=raw, TOK=tokens, NW=w, NB=b, Y=y0.copy()), (T, 1, 1), T=T,
                        constants=dict(FMT=kn.GPU_FORMATS[fmt]), read=("Y",))["Y"]
    np.testing.assert_allclose(out, want, rtol=0, atol=2e-5 * (1 + np.abs(want)).max())
    row0, rows = 20, 10  # a piece holding rows 20..29 after 32 other bytes: tokens 20 and 25
    piece = np.concatenate([np.full(32, 0xAB, np.uint8), raw[row0:row0 + rows].reshape(-1)])
    out = kn.run_kernel(kernels, kn.EMBED, dict(C=C, row0=row0, rows=rows, row_words=rw, w_base=8, eps=eps),
                        dict(W=piece, TOK=tokens, NW=w, NB=b, Y=y0.copy()), (T, 1, 1), T=T,
                        constants=dict(FMT=kn.GPU_FORMATS[fmt]), read=("Y",))["Y"]
    mine = np.isin(tokens, [20, 25])
    np.testing.assert_allclose(out[mine], want[mine], rtol=0, atol=2e-5 * (1 + np.abs(want)).max())
    np.testing.assert_array_equal(out[~mine], 7.0)


def _argmax(kernels, logits: np.ndarray, gen: np.ndarray, cap: int):
    return kn.run_kernel(kernels, kn.ARGMAX, dict(V=len(logits), cap=cap),
                         dict(L=logits.astype(np.float32), TOK=np.zeros(4, np.uint32), GEN=gen),
                         (1, 1, 1), read=("TOK", "GEN"))


def test_argmax_ties_and_negatives(kernels):
    rng = np.random.default_rng(12)
    V = 1000
    logits = -100 - rng.random(V)  # all negative
    logits[[700, 123, 999]] = -1.5  # a three-way tie: the lowest id wins
    logits[5] = np.nan  # NaN never wins
    gen = np.zeros(8, np.uint32)
    gen[0] = 2  # two ids already generated
    res = _argmax(kernels, logits, gen, cap=7)
    assert res["TOK"][0] == 123 == np.nanargmax(logits)
    np.testing.assert_array_equal(res["GEN"][:4], [3, 0, 0, 123])


def test_argmax_respects_capacity(kernels):
    logits = np.arange(300, dtype=np.float32)
    gen = np.zeros(4, np.uint32)
    gen[0] = 3  # list full (cap 3): count still advances, nothing written past the end
    res = _argmax(kernels, logits, gen, cap=3)
    assert res["TOK"][0] == 299
    np.testing.assert_array_equal(res["GEN"], [4, 0, 0, 0])


@pytest.mark.parametrize("V, top", [(70, 69), (65536, 65535), (65536, 4097), (5, 4)])
def test_argmax_finds_the_tail(kernels, V, top):
    """Vocabularies that are no multiple of 4 or of the scan width; the winner at the very end."""
    logits = np.random.default_rng(V).random(V)
    logits[top] = 2.0
    assert _argmax(kernels, logits, np.zeros(4, np.uint32), cap=3)["TOK"][0] == top


def test_argmax_everything_minus_inf(kernels):
    res = _argmax(kernels, np.full(70, -np.inf), np.zeros(4, np.uint32), cap=3)
    assert res["TOK"][0] == 0


# --- host-side layout helpers -------------------------------------------------------------------


def test_row_words_and_q8_0_super_blocks():
    """Q8_0 rows become super-blocks of 8 blocks (scales first, then quants); 9 blocks make a
    second, zero-padded super-block."""
    assert kn.row_words("F32", 96) == 96 and kn.row_words("F16", 96) == 48
    assert kn.row_words("Q8_0", 256) == 68 and kn.row_words("Q8_0", 32) == 68
    assert kn.row_words("Q8_0", 288) == 136
    rng = np.random.default_rng(3)
    rows = rng.integers(0, 256, (2, 9 * 34), dtype=np.uint8)  # 9 blocks per row
    out = kn.q8_0_rows_for_gpu(rows, 288)
    assert out.shape == (2, 136 * 4)
    blocks = rows.reshape(2, 9, 34)
    for b in range(9):
        g, j = divmod(b, 8)
        base = g * 272
        np.testing.assert_array_equal(out[:, base + 2 * j: base + 2 * j + 2], blocks[:, b, :2])
        np.testing.assert_array_equal(out[:, base + 16 + 32 * j: base + 48 + 32 * j], blocks[:, b, 2:])
    np.testing.assert_array_equal(out[:, 272 + 2:272 + 16], 0)  # padded blocks: scale 0
    np.testing.assert_array_equal(out[:, 272 + 48:], 0)
    with pytest.raises(kn.KernelError, match="Q2_K"):
        kn.row_words("Q2_K", 256)


def test_row_words_and_padding_of_the_quants():
    """Q4_0 and Q6_K are read in pairs of blocks (a row with an odd count gets a zero block);
    Q4_K and Q5_K blocks are whole 16-byte multiples (rows as in the file)."""
    assert [kn.row_words(f, 768) for f in ("Q4_0", "Q4_K", "Q5_K", "Q6_K")] == [108, 108, 132, 210]
    assert kn.row_words("Q4_0", 96) == 18
    rows = np.arange(3 * 210, dtype=np.uint8).reshape(3, 210)  # one Q6_K block per row
    padded = kn.rows_for_gpu(rows, "Q6_K", 256)
    assert padded.shape == (3, 420)
    np.testing.assert_array_equal(padded[:, :210], rows)
    np.testing.assert_array_equal(padded[:, 210:], 0)
    rows = np.zeros((2, 144), np.uint8)
    assert np.shares_memory(kn.rows_for_gpu(rows, "Q4_K", 256), rows)  # not copied
