"""Effective bandwidth of each weight format's mat-vec kernel: `python -m rwkvlab.kernel_bench`.

For every format (F16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K by default), every matrix shape of a
2.9B model's generation step (2560x2560 projections, the 10240x2560 FFN key matrix, the
65536x2560 head) and every kernel path (webgpu, native), the engine's own matvec kernel
(kernels.MATVEC, with the device's tuning) multiplies a random matrix by one token vector:

1. The matrix is random blocks of the format (random quants, f16 scales of typical size), laid
   out exactly as the engine uploads file tensors.
2. The kernel's output is checked against NumPy (float64, on the rows gguf-py dequantizes)
   BEFORE anything is timed; a kernel that fails is reported and never timed.
3. Timing: one compute pass of back-to-back dispatches (what a generation step is), cycling
   through enough copies of the matrix (>= 256 MiB in all) that the GPU's L2 cache cannot
   hold them, so every dispatch streams its weights from memory. The pass is timed with GPU
   timestamps (feature "timestamp-query") when the adapter has them, else by wall clock around
   submit-and-wait; the median of several passes is kept.
4. Effective bandwidth = bytes of the matrix in its file format / time per dispatch. Each
   dispatch of the pass writes the same output, so consecutive dispatches are separated by a
   barrier, as in the engine's plan: small matrices carry that per-dispatch cost (~3 us on an
   H200 through Vulkan, /work/shared/reference/wgpu-notes.md) in their number.

Each measurement is appended to the benchmark history as a run of its own (title
"kernel_bench", model "matvec <format> <M>x<K>", the figure in a "Bandwidth" row in GB/s:
rwkvlab.micro_records), in <--history-dir>/<gpu>.md; --no-save only prints.

`--small` runs 512-column shapes (for lavapipe and the tests), finishing in seconds there.
The kernel shapes are the device's tuning (kernels.choose_tuning, which $RWKVLAB_TUNING
overrides); `--tunings "A;B;..."` measures several override sets in one call, each on top of
that (e.g. `--tunings "matvec_rows=1;matvec_rows=2;matvec_rows=4,matvec_pieces=8"`), every
line naming its set and the lanes per row (red) and rows per group (nr) the matrix got.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np

from rwkvlab import gpu as gpu_runtime
from rwkvlab import kernels as kn
from rwkvlab import micro_records
from rwkvlab.micro_records import MicroRun
from rwkvlab.options import KERNEL_PATHS, Options, RUNTIMES

FORMATS = ("F16", "Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K")
SHAPES = {"full": ((2560, 2560), (10240, 2560), (65536, 2560)),  # (rows M, columns K)
          "small": ((512, 512), (2048, 512), (6400, 512))}
# Bytes of weight copies a timed pass cycles through: several times an H100/H200 L2 (50 MiB).
ROTATION_BYTES = {"full": 256 << 20, "small": 4 << 20}
PASS_SECONDS = {"full": 0.03, "small": 0.01}  # GPU time a timed pass aims at
MAX_CHECK_ROWS = 2048  # rows of a tall matrix compared with NumPy (evenly spread, last included)
# A row's error allowed relative to sum_k |w_k x_k|: fp32 summation of K = 2560 terms errs by
# ~1e-6 of that typically (<= K * 2^-24 = 1.5e-4 in the worst case); any decoding mistake
# (a wrong nibble, scale, order) errs by O(1). 1e-3 separates the two with a wide margin.
REL_TOL = 1e-3


class KernelCheckError(AssertionError):
    """A kernel's output disagrees with NumPy: it is not timed."""


@dataclass(frozen=True)
class KernelTiming:
    """One format x shape x path measurement."""
    path: str
    fmt: str
    rows: int
    cols: int
    tuning: str  # the override set measured ("" = the device's tuning)
    red: int  # lanes per row this matrix got (kernels.MatvecShape.red_for)
    nr: int  # rows per group of lanes
    weight_bytes: int  # bytes of the matrix in its file format (what one dispatch must read)
    seconds: float  # per mat-vec (median over passes), by `clock`
    wall_seconds: float  # per mat-vec by wall clock around submit-and-wait (always measured)
    clock: str  # "gpu" (timestamp queries) or "wall"
    dispatches: int  # per timed pass
    copies: int  # distinct copies of the matrix the pass cycles through
    checked_rows: int
    max_error: float  # worst row error / (REL_TOL * sum |w x|): < 1 passed
    samples: tuple[float, ...] = ()  # seconds per mat-vec of each timed pass, by `clock`

    @property
    def gb_per_s(self) -> float:
        return self.weight_bytes / self.seconds / 1e9

    def micro_run(self, kernel_tuning: dict) -> MicroRun:
        """This measurement as a history run (rwkvlab.micro_records)."""
        return MicroRun(
            model=f"matvec {self.fmt} {self.rows}x{self.cols}",
            change=f"{self.fmt} {self.rows}x{self.cols} path={self.path} tuning={micro_records.tuning_text(self.tuning)}",
            figure="bandwidth", value=self.gb_per_s,
            samples=[self.weight_bytes / s / 1e9 for s in self.samples], seconds=list(self.samples),
            path=self.path, tuning=self.tuning, clock=self.clock,
            check=(f"max error {self.max_error:.2g} of tolerance ({REL_TOL:g} of sum abs(w x), "
                   f"{self.checked_rows} rows vs float64 NumPy)"),
            rows={"Matvec shape": f"red {self.red} nr {self.nr}"},
            details={"format": self.fmt, "rows": self.rows, "cols": self.cols, "weight_bytes": self.weight_bytes,
                     "seconds": self.seconds, "wall_seconds": self.wall_seconds, "dispatches": self.dispatches,
                     "copies": self.copies, "red": self.red, "nr": self.nr, "checked_rows": self.checked_rows,
                     "max_error": self.max_error},
            kernel_tuning=kernel_tuning)

    def line(self) -> str:
        return (f"{self.path:7s} {self.fmt:5s} {self.rows:>6d}x{self.cols:<5d} "
                f"{self.seconds * 1e6:10.1f} us {self.gb_per_s:9.1f} GB/s  red {self.red:<2d} nr {self.nr}  "
                f"[{self.tuning or 'default'}] "
                f"({self.clock} clock; wall {self.wall_seconds * 1e6:.1f} us; "
                f"{self.dispatches} dispatches over {self.copies} copies, "
                f"{self.checked_rows} rows checked, error {self.max_error:.2g} of tolerance)")


# ----------------------------------------------------------------------------------------------
# Random matrices in the file formats


def _f16_fields(n: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    return (rng.standard_normal(n) * scale).astype(np.float16).view(np.uint8).reshape(n, 2)


# Byte offsets of the f16 scale fields of each block format (d, and dmin for Q4_K/Q5_K).
_SCALE_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_matrix(fmt: str, M: int, K: int, rng: np.random.Generator) -> np.ndarray:
    """A random [M, K] matrix as the file stores it: uint8 [M, row bytes]. Quantized formats get
    random quants and scales of typical size (so outputs are O(1)); any bytes are valid blocks."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if fmt == "F32":
        return rng.standard_normal((M, K), dtype=np.float32).view(np.uint8)
    if fmt == "F16":
        return rng.standard_normal((M, K), dtype=np.float32).astype(np.float16).view(np.uint8)
    if fmt == "BF16":  # the top half of an f32 (truncated: any bits are a valid bf16)
        return (rng.standard_normal((M, K), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[fmt]]
    n = M * K // block
    blocks = np.frombuffer(rng.bytes(n * size), dtype=np.uint8).reshape(n, size).copy()
    for off in _SCALE_FIELDS[fmt]:
        blocks[:, off:off + 2] = _f16_fields(n, rng, 0.01)
    return blocks.reshape(M, -1)


def dequantized_rows(raw: np.ndarray, fmt: str, K: int, rows: np.ndarray) -> np.ndarray:
    """float64 values of the given rows of a file-format matrix (gguf-py's decoders)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    sub = np.ascontiguousarray(raw[rows])
    if fmt == "F32":
        return sub.view(np.float32).astype(np.float64)
    if fmt == "F16":
        return sub.view(np.float16).astype(np.float64)
    if fmt == "BF16":
        return (sub.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return dequantize(sub, GGMLQuantizationType[fmt]).reshape(len(rows), K).astype(np.float64)


def check_rows(M: int) -> np.ndarray:
    """Rows compared with NumPy: all of a small matrix, else an even spread including the last."""
    if M <= MAX_CHECK_ROWS:
        return np.arange(M)
    return np.unique(np.append(np.linspace(0, M - 1, MAX_CHECK_ROWS - 1).astype(np.int64), M - 1))


# ----------------------------------------------------------------------------------------------
# One kernel on the GPU


class RotatedWeights:
    """Copies of one matrix in one buffer, each at an aligned offset, that a timed pass cycles
    through so that the L2 cache cannot hold them (as in a real step, where gigabytes of other
    weights pass between two uses of a matrix). One upload, then copies on the GPU."""
    def __init__(self, device, limits, rows: np.ndarray, rotation_bytes: int):

        self.nbytes = rows.nbytes
        binding_limit = limits.get("max-storage-buffer-binding-size", 128 << 20)
        if self.nbytes > binding_limit:
            raise ValueError(f"a {self.nbytes >> 20} MiB matrix is over this device's binding limit "
                             f"of {binding_limit >> 20} MiB (the engine would split it)")
        align = max(256, int(limits.get("min-storage-buffer-offset-alignment", 256)))
        self.stride = -(-self.nbytes // align) * align
        buffer_limit = min(limits.get("max-buffer-size", 1 << 30), 2 << 30)
        self.copies = int(max(1, min(-(-rotation_bytes // self.stride), buffer_limit // self.stride)))
        self.buffer = device.create_buffer(size=self.stride * self.copies,
                                           usage=gpu_runtime.STORAGE | gpu_runtime.COPY_DST)
        # a buffer cannot be copied into itself: the rows go up once into a source buffer
        src = device.create_buffer_with_data(data=np.ascontiguousarray(rows).tobytes(),
                                             usage=gpu_runtime.COPY_SRC)
        enc = device.create_command_encoder()
        for c in range(self.copies):
            enc.copy_buffer_to_buffer(src, 0, self.buffer, c * self.stride, self.nbytes)
        device.queue.submit([enc.finish()])
        src.destroy()

    def binding(self, c: int) -> tuple:
        """(buffer, offset, size) of copy c, for a bind group."""
        return (self.buffer, c * self.stride, self.nbytes)


class _Bench:
    """Buffers, bind groups and timing passes of one matrix on one device."""
    def __init__(self, kernels, fmt: str, M: int, K: int, rows: np.ndarray, x: np.ndarray,
                 rotation_bytes: int):

        self.kernels, self.device = kernels, kernels.device
        d = self.device
        try:
            self.weights = RotatedWeights(d, kernels.gpu.limits, rows, rotation_bytes)
        except ValueError as e:
            raise ValueError(f"{fmt} {M}x{K}: {e}") from None
        self.copies = self.weights.copies
        storage = gpu_runtime.STORAGE
        self.x = d.create_buffer_with_data(data=x.astype(np.float32).tobytes(), usage=storage)
        self.b = d.create_buffer(size=16, usage=storage)
        self.y = d.create_buffer(size=max(16, 4 * M), usage=storage | gpu_runtime.COPY_SRC)
        run = d.create_buffer_with_data(data=np.array([1, 0, 0, 0], np.uint32).tobytes(),
                                        usage=gpu_runtime.UNIFORM)
        seg = kn.MatSegment(rows=M, K=K, row_words=kn.row_words(fmt, K), w_base=0, x_off=0,
                            y_off=0, y_stride=M, fmt=fmt)
        self.kernel = kernels.kernel(kn.MATVEC, FMT=kn.matmul_fmt([seg]))
        shape = kn.MatvecShape.of(self.kernel, kernels.tuning)
        self.red, self.nr = shape.red_for(seg), shape.rows
        params, self.groups, _ = kn.matmul_params([seg], shape)
        self.bind_groups = [
            kernels.bind(kn.MATVEC, run, params, {"W": self.weights.binding(c),
                                                  "X": self.x, "B": self.b, "Y": self.y},
                         label=f"bench.{fmt}.{c}")
            for c in range(self.copies)]
        self.timestamps = "timestamp-query" in kernels.gpu.features
        if self.timestamps:
            self.queries = d.create_query_set(type="timestamp", count=2)
            self.query_buf = d.create_buffer(size=16, usage=gpu_runtime.QUERY_RESOLVE | gpu_runtime.COPY_SRC)
            self.period = gpu_runtime.timestamp_period(kernels.gpu)

    def output(self) -> np.ndarray:
        """Y after one dispatch on copy 0."""
        self.run_pass(1, timed=False)
        return np.frombuffer(self.device.queue.read_buffer(self.y), dtype=np.float32).copy()

    def run_pass(self, n: int, timed: bool = True) -> tuple[float, float | None]:
        """One pass of n dispatches cycling through the copies: (wall seconds, GPU seconds)."""
        plan = kn.Plan(kn.Dispatch(self.kernel, self.bind_groups[i % self.copies], (self.groups, 1, 1), "bench")
                       for i in range(n))
        enc = self.device.create_command_encoder()
        stamps = timed and self.timestamps
        cp = enc.begin_compute_pass(timestamp_writes={
            "query_set": self.queries, "beginning_of_pass_write_index": 0,
            "end_of_pass_write_index": 1} if stamps else None)
        kn.encode(cp, plan)
        cp.end()
        if stamps:
            enc.resolve_query_set(self.queries, 0, 2, self.query_buf, 0)
        buf = enc.finish()
        start = time.perf_counter()
        self.device.queue.submit([buf])
        done = self.device.queue.read_buffer(self.query_buf if stamps else self.y, 0, 16)
        wall = time.perf_counter() - start
        gpu = None
        if stamps:
            t0, t1 = np.frombuffer(done, dtype=np.uint64)[:2]
            gpu = float(t1 - t0) * self.period * 1e-9 if t1 > t0 else None
        return wall, gpu


@dataclass
class Problem:
    """A random matrix and input vector with NumPy's answer on the checked rows."""
    fmt: str
    M: int
    K: int
    raw: np.ndarray  # the matrix as the file stores it
    x: np.ndarray  # float32 [K]
    rows: np.ndarray  # rows compared with NumPy
    want: np.ndarray  # float64 W[rows] @ x
    scale: np.ndarray  # float64 |W[rows]| @ |x|: what a row's rounding error is measured against

    @classmethod
    def make(cls, fmt: str, M: int, K: int, rng: np.random.Generator) -> "Problem":
        raw = random_matrix(fmt, M, K, rng)
        x = rng.standard_normal(K).astype(np.float32)
        rows = check_rows(M)
        w = dequantized_rows(raw, fmt, K, rows)
        return cls(fmt, M, K, raw, x, rows, w @ x.astype(np.float64), np.abs(w) @ np.abs(x.astype(np.float64)))

    def errors(self, y: np.ndarray) -> np.ndarray:
        """Each checked row's error as a fraction of its tolerance (NaN where y is NaN)."""
        return np.abs(y[self.rows].astype(np.float64) - self.want) / (REL_TOL * self.scale + 1e-30)


def bench_kernel(kernels, path: str, problem: Problem, *, size: str = "full", repeats: int = 5,
                 tuning: str = "") -> KernelTiming:
    """Check then time the matvec kernel on one problem (see the module docstring)."""
    fmt, M, K = problem.fmt, problem.M, problem.K
    bench = _Bench(kernels, fmt, M, K, kn.rows_for_gpu(problem.raw, fmt, K), problem.x, ROTATION_BYTES[size])
    y = bench.output()
    errors = problem.errors(y)
    if not (errors <= 1).all():  # also catches NaN
        i = int(np.argmax(np.where(np.isnan(errors), np.inf, errors)))
        row = int(problem.rows[i])
        raise KernelCheckError(f"{path} matvec {fmt} {M}x{K}: row {row} is {float(y[row]):.6g}, NumPy "
                               f"says {problem.want[i]:.6g} (tolerance {REL_TOL} of sum|w x| = "
                               f"{REL_TOL * problem.scale[i]:.3g}); not timed")

    t = time_passes(bench.run_pass, max(8, bench.copies), 4000, PASS_SECONDS[size], repeats)
    return KernelTiming(path=path, fmt=fmt, rows=M, cols=K, tuning=tuning, red=bench.red, nr=bench.nr,
                        weight_bytes=problem.raw.nbytes, seconds=t.seconds,
                        wall_seconds=t.wall_seconds, clock=t.clock, dispatches=t.dispatches, copies=bench.copies,
                        checked_rows=len(problem.rows), max_error=float(errors.max()), samples=t.samples)


def check_formats_and_paths(formats, paths) -> None:
    """Refuse, naming them, formats without a GPU kernel and unknown kernel paths."""
    unknown = [f for f in formats if f not in kn.GPU_FORMATS]
    if unknown:
        raise ValueError(f"format(s) {unknown} have no GPU kernel; the kernels read {', '.join(kn.GPU_FORMATS)}")
    bad_paths = [p for p in paths if p not in KERNEL_PATHS]
    if bad_paths:
        raise ValueError(f"unknown path(s) {bad_paths}; choose from {', '.join(KERNEL_PATHS)}")


@dataclass(frozen=True)
class PassTimes:
    """Medians of timed passes, per dispatch."""
    seconds: float  # GPU clock when every pass had timestamps, else wall clock
    wall_seconds: float
    clock: str  # "gpu" or "wall"
    dispatches: int  # per timed pass
    samples: tuple[float, ...]  # each timed pass, per dispatch, by `clock`


def time_passes(run_pass, first: int, cap: int, pass_seconds: float, repeats: int) -> PassTimes:
    """Calibrate with a pass of `first` dispatches, size the timed passes to about
    `pass_seconds` of GPU time (at most `cap` dispatches), run `repeats` of them.
    `run_pass(n)` returns (wall seconds, GPU seconds or None) for a pass of n dispatches."""
    wall, gpu = run_pass(first)
    per = (gpu or wall) / first
    n = int(min(cap, max(first, pass_seconds / max(per, 1e-9))))
    samples = [run_pass(n) for _ in range(repeats)]
    wall_s = statistics.median(w for w, _ in samples) / n
    gpu_times = [g for _, g in samples if g is not None]
    if len(gpu_times) == len(samples):
        return PassTimes(statistics.median(gpu_times) / n, wall_s, "gpu", n, tuple(g / n for g in gpu_times))
    return PassTimes(wall_s, wall_s, "wall", n, tuple(w / n for w, _ in samples))


def run(formats=FORMATS, paths=KERNEL_PATHS, size: str = "full", backend: str = "auto", runtime: str = "wgpu-native", repeats: int = 5,
        seed: int = 0, out=None, tunings=("",), save: micro_records.Saver | None = None
        ) -> tuple[list[KernelTiming], list[str]]:
    """Every format x shape x path x tuning override set: (timings, failures). Prints a line
    per measurement to `out` (default stdout) and hands it to `save` (with the GPU it ran on)
    as soon as it is measured. Each random matrix is made in NumPy once, then run on every
    path and tuning."""
    from rwkvlab.gpu import gpu_for, resolve_options

    out = out or sys.stdout
    check_formats_and_paths(formats, paths)
    devices = {}
    for path in paths:
        # a runtime or path this adapter lacks: a clear error
        gpu = gpu_for(resolve_options(Options(runtime=runtime, backend=backend, path=path)))
        for text in tunings:
            try:
                tuning = kn._tuning_overrides(kn.choose_tuning(gpu, path), text)
            except kn.KernelError as e:
                raise ValueError(f"--tunings {text!r}: {e}") from None
            devices[path, text] = kn.kernels_for(gpu, tuning)
            print(f"# {path} path on {gpu.info.label}; [{text or 'default'}] tuning {tuning.as_record()}",
                  file=out, flush=True)
    timings, failures = [], []
    for fmt in formats:
        for M, K in SHAPES[size]:
            problem = Problem.make(fmt, M, K, np.random.default_rng([seed, M, K, kn.GPU_FORMATS[fmt]]))
            for (path, text), kernels in devices.items():
                try:
                    t = bench_kernel(kernels, path, problem, size=size, repeats=repeats, tuning=text)
                except (KernelCheckError, ValueError) as e:
                    failures.append(str(e))
                    print(f"{path:7s} {fmt:5s} {M:>6d}x{K:<5d} [{text or 'default'}] FAILED: {e}", file=out, flush=True)
                    continue
                timings.append(t)
                print(t.line(), file=out, flush=True)
                if save is not None:
                    save(t.micro_run(kernels.tuning.as_record()), kernels.gpu)
    return timings, failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rwkvlab.kernel_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="512-column shapes (CPU adapters, tests)")
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma-separated (also F32, BF16)")
    ap.add_argument("--paths", default=",".join(KERNEL_PATHS), help="webgpu, native or both")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--runtime", default="wgpu-native", choices=RUNTIMES, help="WebGPU implementation (default: wgpu-native)")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per measurement (median kept)")
    ap.add_argument("--tunings", default="",
                    help="';'-separated $RWKVLAB_TUNING-style override sets to compare, each on top of "
                         "the device's tuning (an empty set is the tuning itself), e.g. "
                         "'matvec_rows=1;matvec_rows=4,matvec_pieces=8'")
    micro_records.add_arguments(ap, "kernel_bench")
    args = ap.parse_args(argv)
    return micro_records.main("kernel_bench", args, lambda save: run(
        formats=args.formats.split(","), paths=args.paths.split(","), size="small" if args.small else "full",
        backend=args.backend, runtime=args.runtime, repeats=args.repeats, tunings=[t.strip() for t in args.tunings.split(";")],
        save=save))


if __name__ == "__main__":
    sys.exit(main())
