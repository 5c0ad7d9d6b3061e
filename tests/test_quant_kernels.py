"""shaders/quants.wgsl and quants_dot.wgsl against gguf-py's dequantizer (bit-exact with ggml).

The decoders run alone through the test kernels of shaders/dequant.wgsl on lavapipe, on
random blocks (every byte random, f16 scales drawn from normal, tiny, subnormal, huge, zero
and negative values), on hand-made corner blocks, and on every quantized tensor of the
llama.cpp fixtures.

Tolerances:
* quant_load4 must equal gguf.quants.dequantize EXACTLY (0 ulp): every product in these
  formats is exact in f32 (f16 d: 11 significant bits, scales <= 8, quants <= 6, sum < 24), so
  the only rounding is Q4_K/Q5_K's "- dmin*m", done once on both sides.
* A mat-vec piece (64 products, summed per sub-block, then scaled) against a float64 sum: a
  recursive fp32 sum of n terms errs by at most ~n*u times the sum of the terms' magnitudes
  (u = 2^-24). The terms are d*sc*q*x and, for Q4_K/Q5_K, dmin*m*x separately (the kernel
  subtracts the min term after summing, so cancellation between them is not covered by
  |w*x|). We allow 4 * 64 * u times that magnitude: loose by a factor ~4, still ~1e-5 relative.
"""
from __future__ import annotations

import io

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from rwkvlab import kernel_bench
from rwkvlab import quant_kernels as qk
from rwkvlab.gpu import get_gpu
from rwkvlab.options import KERNEL_PATHS
from conftest import read_micro_runs, wait_for_next_second

U32 = 2.0 ** -24
FORMATS = ["Q4_0", "Q4_K", "Q5_K", "Q6_K"]
# Byte offsets of each format's f16 fields inside a block: scales (d) and mins (dmin).
F16_FIELDS = {"Q4_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
FIXTURE_FILES = ["Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K"]


@pytest.fixture(scope="module")
def gpu():
    return get_gpu("auto", native=False)


def _f16_bits(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float16).view(np.uint8).reshape(-1, 2)


def random_f16(rng: np.random.Generator, n: int) -> np.ndarray:
    """n finite f16 values as [n, 2] bytes: a mix of typical scales (|d| ~ 1e-3), any finite bit
    pattern (subnormals up to 65504), zeros and negatives."""
    typical = (rng.standard_normal(n) * 1e-3).astype(np.float16).view(np.uint16)
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    bits = np.where((bits & 0x7C00) == 0x7C00, bits & 0x83FF, bits)  # no inf / NaN
    kind = rng.integers(0, 8, n)
    out = np.where(kind < 4, typical, bits)
    out = np.where(kind == 7, np.uint16(0), out)
    return out.astype(np.uint16).view(np.uint8).reshape(n, 2)


def random_blocks(fmt: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """n blocks of `fmt` (uint8 [n, block_bytes]): random bytes, finite f16 fields."""
    lay = qk.LAYOUTS[fmt]
    blocks = rng.integers(0, 256, (n, lay.block_bytes), dtype=np.uint8)
    for off in F16_FIELDS[fmt]:
        blocks[:, off:off + 2] = random_f16(rng, n)
    return blocks


def corner_blocks(fmt: str, rng: np.random.Generator) -> np.ndarray:
    """Hand-made corner cases: zero scales, extreme quants (all 0 / all 15 nibbles, high bits
    all set / all clear), extreme 6-bit and int8 scales, negative mins and negative d, the
    largest and a subnormal f16 scale."""
    lay = qk.LAYOUTS[fmt]
    out = []

    def block(fill=None, **fields):
        b = random_blocks(fmt, 1, rng)[0] if fill is None else np.full(lay.block_bytes, fill, np.uint8)
        for off, value in fields.items():
            start = int(off[1:])
            b[start:start + 2] = _f16_bits([value])[0]
        return b

    if fmt == "Q4_0":
        out += [block(o0=0.0), block(0x00, o0=1.5), block(0xFF, o0=-2.0), block(0xFF, o0=65504.0),
                block(0x0F, o0=-65504.0), block(0xF0, o0=2.0 ** -24)]
    elif fmt in ("Q4_K", "Q5_K"):
        # all 0xFF: scales and mins 63, nibbles 15, fifth bits set (q = 31); all 0x00: q = 0
        out += [block(o0=0.0, o2=0.0), block(0xFF, o0=0.5, o2=-0.25), block(0xFF, o0=-1.0, o2=3.0),
                block(0x00, o0=1.0, o2=-1.0), block(o0=0.01, o2=-0.02), block(o0=65504.0, o2=-65504.0)]
        zero_scales = block(o0=1.0, o2=1.0)
        zero_scales[4:16] = 0  # every sub-block's scale and min 0
        out.append(zero_scales)
        mixed = block(o0=0.125, o2=-0.0625)
        mixed[4:16] = [0xFF, 0x00, 0xC0, 0x3F] * 3  # top bits set on some, low bits on others
        out.append(mixed)
    else:  # Q6_K: all 0xFF bytes give q = 63 (31 after the offset) and scales -1
        out += [block(o208=0.0), block(0xFF, o208=0.5), block(0x00, o208=-0.75),
                block(0xFF, o208=65504.0), block(o208=2.0 ** -24)]
        extreme = block(0x00, o208=1.0)
        extreme[192:208] = np.array([127, -128] * 8, dtype=np.int8).view(np.uint8)
        out.append(extreme)
        zero_scales = block(o208=1.0)
        zero_scales[192:208] = 0
        out.append(zero_scales)
    return np.stack(out)


def rows_of(blocks: np.ndarray, per_row: int) -> np.ndarray:
    """Blocks [n, block_bytes] (n a multiple of per_row) as file rows [n / per_row, row bytes]."""
    return blocks.reshape(-1, per_row * blocks.shape[1])


def expected(raw: np.ndarray, fmt: str, K: int) -> np.ndarray:
    return dequantize(raw, GGMLQuantizationType[fmt]).reshape(-1, K)


def term_magnitudes(raw: np.ndarray, fmt: str, K: int) -> np.ndarray:
    """|d*sc*q| + |dmin*m| per element (just |w| where there is no min), from gguf's decoder on
    copies of the blocks with dmin (resp. d) zeroed."""
    lay = qk.LAYOUTS[fmt]
    if fmt not in ("Q4_K", "Q5_K"):
        return np.abs(expected(raw, fmt, K))
    blocks = raw.reshape(-1, lay.block_bytes)
    no_min, no_scale = blocks.copy(), blocks.copy()
    no_min[:, 2:4] = 0
    no_scale[:, 0:2] = 0
    return np.abs(expected(no_min, fmt, K)) + np.abs(expected(no_scale, fmt, K))


def check_dequant(gpu, raw: np.ndarray, fmt: str, K: int, what: str) -> None:
    got = qk.gpu_dequantize(gpu, raw, fmt, K)
    want = expected(raw, fmt, K)
    bad = np.argwhere(got != want)
    assert bad.size == 0, (f"{what}: {len(bad)} elements differ, first (row, col) {bad[0].tolist()}: "
                           f"GPU {got[tuple(bad[0])]!r} vs gguf {want[tuple(bad[0])]!r}")


def check_dots(gpu, raw: np.ndarray, fmt: str, K: int, rng: np.random.Generator, what: str,
               nr: int = 1) -> None:
    x = rng.standard_normal(K).astype(np.float32)
    got = qk.gpu_piece_dots(gpu, raw, fmt, K, x, nr).astype(np.float64)
    w = expected(raw, fmt, K).astype(np.float64)
    mag = term_magnitudes(raw, fmt, K).astype(np.float64) * np.abs(x)
    for i in range(qk.piece_count(K)):
        cols = qk.piece_columns(fmt, K, i)
        want = w[:, cols] @ x[cols].astype(np.float64)
        tol = 4 * qk.PIECE * U32 * mag[:, cols].sum(axis=1)
        err = np.abs(got[:, i] - want)
        assert (err <= tol).all(), (f"{what}: piece {i}, rows {np.flatnonzero(err > tol)[:5]}: "
                                    f"error {err.max():.3g} > tolerance {tol[np.argmax(err - tol)]:.3g}")


# --- layout (host side) -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt,K,words", [
    ("Q4_0", 64, 9), ("Q4_0", 32, 9), ("Q4_0", 96, 18), ("Q4_0", 2560, 360),
    ("Q4_K", 256, 36), ("Q4_K", 2560, 360), ("Q5_K", 2560, 440),
    ("Q6_K", 256, 105), ("Q6_K", 512, 105), ("Q6_K", 2560, 525)])
def test_row_words(fmt, K, words):
    assert qk.row_words(fmt, K) == words


@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_for_gpu_pads_odd_pairs_only(fmt):
    lay = qk.LAYOUTS[fmt]
    rng = np.random.default_rng(1)
    for n_blocks in (1, 2, 3):
        K = n_blocks * lay.block
        raw = rows_of(random_blocks(fmt, 2 * n_blocks, rng), n_blocks)
        out = qk.rows_for_gpu(raw, fmt, K)
        assert out.shape == (2, qk.row_words(fmt, K) * 4)
        assert np.array_equal(out[:, : raw.shape[1]], raw)
        assert not out[:, raw.shape[1]:].any()
        if lay.group == 1 or n_blocks % 2 == 0:
            assert out is raw or np.shares_memory(out, raw)  # nothing copied


@pytest.mark.parametrize("fmt", FORMATS)
def test_pieces_partition_the_row(fmt):
    lay = qk.LAYOUTS[fmt]
    for K in (lay.block, 3 * lay.block, 2560):
        cols = np.concatenate([qk.piece_columns(fmt, K, i) for i in range(qk.piece_count(K))])
        assert np.array_equal(np.sort(cols), np.arange(K)), (fmt, K)


def test_row_length_errors_name_the_tensor():
    with pytest.raises(qk.QuantLayoutError, match=r"blk\.0\.x: rows of 100 elements .* Q4_K blocks of 256"):
        qk.check_row_length("Q4_K", 100, "blk.0.x")
    with pytest.raises(qk.QuantLayoutError, match="quants.wgsl reads Q4_0, Q4_K, Q5_K, Q6_K"):
        qk.row_words("Q2_K", 256)


# --- decoders on the GPU ----------------------------------------------------------------------


def _cases(fmt: str, rng: np.random.Generator):
    """(what, rows, K): random rows with odd and even block counts, then the corner blocks
    (one block per row, and all of them in one row)."""
    lay = qk.LAYOUTS[fmt]
    for n_blocks in (1, 3, 4, 5):
        yield f"{n_blocks} random blocks per row", rows_of(random_blocks(fmt, 7 * n_blocks, rng), n_blocks), n_blocks * lay.block
    corners = corner_blocks(fmt, rng)
    yield "corner blocks", rows_of(corners, 1), lay.block
    yield "corner blocks in one row", rows_of(corners, len(corners)), len(corners) * lay.block


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequant_exact_random_and_corner_blocks(gpu, fmt):
    rng = np.random.default_rng(2)
    for what, raw, K in _cases(fmt, rng):
        check_dequant(gpu, raw, fmt, K, f"{fmt} {what}")


@pytest.mark.parametrize("nr", [1, 2, 4])
@pytest.mark.parametrize("fmt", FORMATS)
def test_piece_dots_random_and_corner_blocks(gpu, fmt, nr):
    """Also with 2 or 4 rows per quant_dot call (the mat-vec's rows per group): every row must
    come out the same whichever of a call's rows it is; 7 random rows (and 6 to 8 corner rows)
    leave the last call short, its missing rows standing in for the last row."""
    rng = np.random.default_rng(3)
    for what, raw, K in _cases(fmt, rng):
        check_dots(gpu, raw, fmt, K, rng, f"{fmt} {what} ({nr} rows per call)", nr)


def test_corner_blocks_reach_the_extremes():
    """The corner cases really are what they claim (decoded by gguf, not by us)."""
    rng = np.random.default_rng(4)
    q4_0 = expected(rows_of(corner_blocks("Q4_0", rng), 1), "Q4_0", 32)
    assert (q4_0[0] == 0).all() and (q4_0[1] == -12.0).all()  # d = 0; q = 0 -> 1.5 * -8
    assert (q4_0[2] == -14.0).all()  # q = 15 -> -2 * 7
    q5 = expected(rows_of(corner_blocks("Q5_K", rng), 1), "Q5_K", 256)
    assert (q5[1] == 0.5 * 63 * 31 + 0.25 * 63).all()  # sc = m = 63, q = 31, dmin < 0
    q6 = expected(rows_of(corner_blocks("Q6_K", rng), 1), "Q6_K", 256)
    assert (q6[1] == 0.5 * -1 * 31).all() and (q6[2] == -0.75 * 0 * -32).all()
    assert set(np.unique(q6[5])) == {127.0 * -32, -128.0 * -32}


@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_fixture_tensors(gpu, fixtures_dir, name):
    """Every quantized tensor of tiny-<name>.gguf (made by llama-quantize): exact decode, and
    the mat-vec pieces of each against NumPy."""
    rng = np.random.default_rng(5)
    seen = set()
    for t in gguf.GGUFReader(fixtures_dir / f"tiny-{name}.gguf").tensors:
        fmt = t.tensor_type.name
        if fmt not in qk.LAYOUTS:
            continue
        K = int(t.shape[0])
        raw = np.asarray(t.data).view(np.uint8).reshape(int(t.shape[1]), -1)
        check_dequant(gpu, raw, fmt, K, f"tiny-{name}.gguf {t.name} ({fmt})")
        if (fmt, K) not in seen:  # dots once per type and row length: they are slower to check
            check_dots(gpu, raw, fmt, K, rng, f"tiny-{name}.gguf {t.name} ({fmt})")
        seen.add((fmt, K))
    assert seen, f"tiny-{name}.gguf has no quantized tensor"


# --- rwkvlab.kernel_bench ---------------------------------------------------------------------


def test_kernel_bench_small_checks_and_times_every_format():
    """`python -m rwkvlab.kernel_bench --small` on lavapipe: every format x shape x path is
    checked against NumPy and timed with GPU timestamps (lavapipe has them), and the GPU time
    of a pass is consistent with the wall clock around it."""
    out = io.StringIO()
    timings, failures = kernel_bench.run(size="small", repeats=2, out=out)
    assert failures == []
    got = {(t.path, t.fmt, t.rows, t.cols) for t in timings}
    assert got == {(p, f, M, K) for p in KERNEL_PATHS for f in kernel_bench.FORMATS
                   for M, K in kernel_bench.SHAPES["small"]}
    for t in timings:
        assert t.clock == "gpu" and 0 < t.seconds <= 1.05 * t.wall_seconds, t
        assert t.max_error < 1 and t.gb_per_s > 0
        block, size = gguf.GGML_QUANT_SIZES[GGMLQuantizationType[t.fmt]]
        assert t.weight_bytes == t.rows * t.cols // block * size  # the file's bytes, no padding
    assert len(out.getvalue().splitlines()) == 2 + len(timings)


def test_kernel_bench_never_times_a_wrong_kernel(monkeypatch):
    """A kernel whose output disagrees with NumPy (here: NumPy's answer for row 3 is moved by
    twice the tolerance, which the kernel cannot match) is reported, not timed."""
    from rwkvlab import kernels as kn

    gpu = get_gpu("auto", native=False)
    kernels = kn.kernels_for(gpu, kn.choose_tuning(gpu, "webgpu"))
    problem = kernel_bench.Problem.make("Q4_K", 64, 512, np.random.default_rng(0))
    problem.want[3] += 2 * kernel_bench.REL_TOL * problem.scale[3]
    passes, run_pass = [], kernel_bench._Bench.run_pass

    def spy(self, n, timed=True):
        passes.append(timed)
        return run_pass(self, n, timed)

    monkeypatch.setattr(kernel_bench._Bench, "run_pass", spy)
    with pytest.raises(kernel_bench.KernelCheckError, match="Q4_K 64x512: row 3 is .* not timed"):
        kernel_bench.bench_kernel(kernels, "webgpu", problem, size="small")
    assert passes == [False]  # only the untimed dispatch that produced the output


def test_kernel_bench_cli(capsys, tmp_path, monkeypatch):
    """--no-save prints every line and writes nothing (run where the default history folder
    would be)."""
    monkeypatch.chdir(tmp_path)
    assert kernel_bench.main(["--small", "--formats", "Q6_K", "--paths", "native", "--repeats", "1", "--no-save"]) == 0
    out = capsys.readouterr().out
    assert out.count("native  Q6_K") == 3 and "3 measured, 0 failed" in out and "saved" not in out
    assert kernel_bench.main(["--small", "--formats", "Q2_K", "--no-save"]) == 2
    assert "Q2_K" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_kernel_bench_writes_runs_the_history_reads_and_judges(capsys, tmp_path):
    """Each measurement becomes a run of the GPU's history file: model "matvec <fmt> <M>x<K>",
    the figure in a Bandwidth row in GB/s (the printed number), the path and tuning in the
    change; a second call's run of the same matrix, path and tuning is judged against the
    first (vs title and vs history), another path's against the same matrix's earlier runs."""
    args = ["--small", "--formats", "Q8_0", "--repeats", "2", "--history-dir", str(tmp_path / "h"),
            "--tunings", ";matvec_rows=2"]
    assert kernel_bench.main(args) == 0
    first = capsys.readouterr().out
    assert "# 12 run(s) saved to " in first
    wait_for_next_second()
    assert kernel_bench.main(args[:-2]) == 0  # the device's own tuning only
    df, judged = read_micro_runs(tmp_path / "h", "kernel_bench", "bandwidth", "GB/s", 12 + 6)
    shapes = [f"{M}x{K}" for M, K in kernel_bench.SHAPES["small"]]
    assert set(df["model"]) == {f"matvec Q8_0 {s}" for s in shapes}
    assert set(df["change"][:12]) == {f"Q8_0 {s} path={p} tuning={t}" for s in shapes for p in KERNEL_PATHS
                                      for t in ("default", "matvec_rows=2")}
    assert set(df["tuning"]) == {"default", "matvec_rows=2"}
    assert set(df["matvec_shape"]) <= {f"red {r} nr {n}" for r in (1, 2, 4, 8, 16, 32) for n in (1, 2, 4)}
    for _, run in df[:12].iterrows():  # the printed figure (1 decimal) is the recorded one (4 digits)
        rows = run["model"].split()[-1].split("x")[0]
        line = next(x for x in first.splitlines() if x.startswith(run["path"].ljust(7)) and
                    f"{rows:>6s}x" in x and f"[{run['tuning']}]" in x)
        printed = float(line.split(" GB/s")[0].split()[-1])
        assert abs(printed - run["bandwidth"]) <= 0.05 + 5e-4 * printed, (line, run["bandwidth"])
    assert (judged["bandwidth_vs_title"][:1] == "no reference").all()
    assert judged["bandwidth_vs_title"][12:].isin(["improvement", "regression", "within noise"]).all()
    assert judged["bandwidth_vs_history"][12:].isin(["improvement", "regression", "within noise"]).all()
    assert (judged[["throughput_vs_title", "kernel_time_vs_title", "prefill_vs_title"]] == "no reference").all().all()


def test_kernel_bench_refuses_a_history_it_cannot_write(capsys, tmp_path):
    """Before measuring anything: a --history-dir that is a file is an error (exit 2)."""
    (tmp_path / "file").write_text("")
    assert kernel_bench.main(["--small", "--formats", "Q8_0", "--history-dir", str(tmp_path / "file")]) == 2
    captured = capsys.readouterr()
    assert "is not a folder; nothing measured" in captured.err and "Q8_0" not in captured.out


def test_kernel_bench_falls_back_to_the_wall_clock():
    """On an adapter without timestamp queries the pass is timed by wall clock around submit."""
    import dataclasses

    from rwkvlab import kernels as kn

    gpu = get_gpu("auto", native=False)
    no_stamps = dataclasses.replace(gpu, features=gpu.features - {"timestamp-query"})
    kernels = kn.Kernels(no_stamps, kn.choose_tuning(gpu, "webgpu"))
    problem = kernel_bench.Problem.make("Q4_0", 64, 512, np.random.default_rng(1))
    t = kernel_bench.bench_kernel(kernels, "webgpu", problem, size="small", repeats=1)
    assert t.clock == "wall" and t.seconds == t.wall_seconds > 0


def test_kernel_bench_compares_tunings(capsys):
    """`--tunings`: each override set is checked and timed on every matrix, and each line says
    which set it is and the lanes per row / rows per group the matrix got (a CPU adapter's own
    tuning: one row per thread; the second set: a K = 512 Q4_K row has 8 pieces, so with at
    least 2 per lane it gets 4 lanes, a Q8_0 row 16)."""
    sets = ("", "matvec_red=32,matvec_rows=4,matvec_pieces=2")
    out = io.StringIO()
    timings, failures = kernel_bench.run(formats=("Q4_K", "Q8_0"), paths=("native",), size="small",
                                         repeats=1, out=out, tunings=sets)
    assert failures == [] and len(timings) == 2 * 3 * 2
    got = {(t.fmt, t.tuning): (t.red, t.nr) for t in timings}
    assert got[("Q4_K", sets[1])] == (4, 4) and got[("Q8_0", sets[1])] == (16, 4)
    from rwkvlab.gpu import get_gpu

    if get_gpu("auto", native=True).info.adapter_type == "CPU":  # lavapipe's tuning: a row per thread
        assert got[("Q4_K", sets[0])] == got[("Q8_0", sets[0])] == (1, 1)
    assert all(t.max_error < 1 for t in timings)
    assert out.getvalue().count("[matvec_red=32,matvec_rows=4,matvec_pieces=2]") == 1 + 6  # header + lines
    assert kernel_bench.main(["--small", "--formats", "Q4_0", "--tunings", "matvec_rows=3"]) == 2
    assert "matvec_rows=3" in capsys.readouterr().err
