"""Throughput of the prefill GEMM per tile shape and chunk size: `python -m rwkvlab.gemm_bench`.

For every weight format, every matrix shape of a 2.9B model's prefill (att.out 2560x2560,
ffn.key 10240x2560, ffn.value 2560x10240), every chunk size T (--tokens) and every gemm tuning
(--tunings: Tuning fields as $RWKVLAB_TUNING writes them, e.g. "gemm_rows=64,gemm_k=16"),
the engine's gemm kernel (kernels.GEMM) multiplies a random matrix by T random token vectors:

1. The matrix is random blocks of the format laid out as the engine uploads file tensors
   (kernel_bench.random_matrix), the tokens standard normal.
2. The output is checked against NumPy (float64 on gguf-py's dequantized rows: up to 2048 rows
   spread over the matrix, every token) BEFORE anything is timed; a failing kernel is reported
   and never timed.
3. Timing: one compute pass of back-to-back dispatches cycling through enough copies of the
   matrix (>= 256 MiB) that the L2 cache cannot hold them, as in a prefill, where each matrix is
   read once per chunk; GPU timestamps around the pass (wall clock where there are none);
   the median of several passes.
4. TFLOP/s = 2 M K T / time per dispatch; "us/token" = time / T, what the product costs per
   prompt token in one layer (the engine's profile sums it over the layers).

With --sgmat (the native path of an adapter with subgroup matrices: Dawn), every f16 x f16 ->
f32 config the adapter reports times every tile of kernels.SGMAT_TILES that fits it is measured
too: the tensor-core kernel gemm_sgmat (tunings "gemm_sgmat=1,sgmat_m=..,sgmat_tokens=.."),
checked with the f16 tolerance SGMAT_REL_TOL and, before timing, on an OVERFLOW case: the same
matrix times tokens of which every other one is scaled by 1e5-1e6 (beyond f16's 65504), which
must stay within the same tolerance. A tuning that names gemm_rows / gemm_k but not gemm_sgmat
is an fp32 gemm shape and gets gemm_sgmat=0 where the device would default to the tensor cores.

One process sweeps every tuning, so a single call on a lent GPU compares them all. Each
measurement is appended to the benchmark history as a run of its own (title "gemm_bench",
model "gemm <format> <name> <M>x<K> T=<T>", the figure in a "Throughput" row in TFLOP/s:
rwkvlab.micro_records), in <--history-dir>/<gpu>.md; --no-save only prints. `--small` runs
256- and 1024-wide shapes (for lavapipe and the tests).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import numpy as np

from rwkvlab import gpu as gpu_runtime
from rwkvlab import kernels as kn
from rwkvlab import micro_records
from rwkvlab.options import RUNTIMES, OptionsError, normalize_tuning
from rwkvlab.kernel_bench import (PASS_SECONDS, ROTATION_BYTES, KernelCheckError, RotatedWeights,
                                  check_formats_and_paths, check_rows,
                                  dequantized_rows, random_matrix, time_passes)
from rwkvlab.micro_records import MicroRun

FORMATS = ("F16", "Q8_0", "Q4_K")
SHAPES = {"full": {"att.out": (2560, 2560), "ffn.key": (10240, 2560), "ffn.value": (2560, 10240)},
          "small": {"att.out": (256, 256), "ffn.key": (1024, 256), "ffn.value": (256, 1024)}}
TOKENS = {"full": (64, 256, 512), "small": (67,)}
TUNINGS = ("gemm_rows=128,gemm_k=32", "gemm_rows=128,gemm_k=16", "gemm_rows=64,gemm_k=32",
           "gemm_rows=64,gemm_k=16", "gemm_rows=32,gemm_k=16")
# An output's error allowed relative to sum_k |w_k x_k|: fp32 sums of K <= 10240 products err
# by ~1e-6 of that typically (<= K * 2^-24 = 6e-4 in the worst case); a wrong tile, row or
# token errs by O(1).
REL_TOL = 1e-3
# The same for gemm_sgmat, whose inputs are rounded to f16 (11 significant bits: relative error
# <= 2^-11 for x and for w) before f32 products and sums: each product errs by <= 2^-10 + 2^-22
# of |w x|, the sum by K 2^-24 more in the worst case, so |error| <= (2^-10 + 2^-22 + K 2^-24)
# sum_k |w_k x_k| = 1.6e-3 of it at K = 10240 (1.1e-3 at 2560); random rounding errs far less
# (~2^-11 / sqrt(K) of it). 2e-3 holds the worst case; a wrong tile, row or token errs by O(1).
SGMAT_REL_TOL = 2e-3
# The overflow case: every other token's activations scaled by 10^U(5, 6), past f16's 65504.
OVERFLOW_SCALE = (5.0, 6.0)


@dataclass(frozen=True)
class GemmTiming:
    """One format x shape x T x tuning measurement."""
    path: str
    fmt: str
    name: str  # the product it stands for (att.out, ffn.key, ffn.value)
    rows: int
    cols: int
    tokens: int
    tuning: str  # the overrides it ran with
    seconds: float  # per dispatch (median over passes), by `clock`
    clock: str  # "gpu" (timestamp queries) or "wall"
    dispatches: int  # per timed pass
    copies: int
    max_error: float  # worst output error / (REL_TOL * sum |w x|): < 1 passed
    checked_rows: int = 0  # rows compared with NumPy, every token of each
    samples: tuple[float, ...] = ()  # seconds per dispatch of each timed pass, by `clock`
    kernel: str = "gemm"  # or "gemm_sgmat"
    overflow_error: float | None = None  # gemm_sgmat: the overflow case's max error / tolerance

    @property
    def rel_tol(self) -> float:
        return SGMAT_REL_TOL if self.kernel == kn.GEMM_SGMAT.name else REL_TOL

    @property
    def tflops(self) -> float:
        return 2 * self.rows * self.cols * self.tokens / self.seconds / 1e12

    def micro_run(self, kernel_tuning: dict) -> MicroRun:
        """This measurement as a history run (rwkvlab.micro_records)."""
        flops = 2 * self.rows * self.cols * self.tokens
        problem = f"{self.fmt} {self.name} {self.rows}x{self.cols} T={self.tokens}"
        return MicroRun(
            model=f"gemm {problem}", change=f"{problem} path={self.path} tuning={micro_records.tuning_text(self.tuning)}",
            figure="throughput", value=self.tflops, samples=[flops / s / 1e12 for s in self.samples],
            seconds=list(self.samples), path=self.path, tuning=self.tuning, clock=self.clock,
            check=(f"max error {self.max_error:.2g} of tolerance ({self.rel_tol:g} of sum abs(w x), "
                   f"{self.checked_rows} rows x {self.tokens} tokens vs float64 NumPy)"
                   + ("" if self.overflow_error is None else
                      f"; activations of 1e5-1e6: {self.overflow_error:.2g} of tolerance")),
            details={"format": self.fmt, "name": self.name, "rows": self.rows, "cols": self.cols,
                     "tokens": self.tokens, "seconds": self.seconds, "us_per_token": self.seconds / self.tokens * 1e6,
                     "dispatches": self.dispatches, "copies": self.copies, "checked_rows": self.checked_rows,
                     "max_error": self.max_error, "kernel": self.kernel, "overflow_error": self.overflow_error},
            kernel_tuning=kernel_tuning)

    def line(self) -> str:
        overflow = "" if self.overflow_error is None else f", 1e5-1e6 activations {self.overflow_error:.2g}"
        return (f"{self.path:7s} {self.fmt:5s} {self.name:9s} {self.rows:>6d}x{self.cols:<6d} "
                f"T={self.tokens:<4d} {self.tuning:26s} {self.seconds * 1e6:9.1f} us "
                f"{self.tflops:6.2f} TFLOP/s {self.seconds / self.tokens * 1e6:7.2f} us/token "
                f"({self.clock} clock, {self.dispatches} dispatches over {self.copies} copies, "
                f"error {self.max_error:.2g} of tolerance{overflow})")


@dataclass
class Problem:
    """A random matrix and Tmax token vectors with NumPy's answer on the checked rows."""
    fmt: str
    M: int
    K: int
    raw: np.ndarray  # the matrix as the file stores it
    x: np.ndarray  # float32 [Tmax, K]
    rows: np.ndarray  # rows compared with NumPy
    want: np.ndarray  # float64 [Tmax, rows]
    scale: np.ndarray  # float64 |X| @ |W[rows]|^T: what an output's rounding error is measured against
    w: np.ndarray | None = None  # float64 checked rows (for the overflow case)
    rng: np.random.Generator | None = None

    @classmethod
    def make(cls, fmt: str, M: int, K: int, T: int, rng: np.random.Generator) -> "Problem":
        raw = random_matrix(fmt, M, K, rng)
        x = rng.standard_normal((T, K)).astype(np.float32)
        rows = check_rows(M)
        w = dequantized_rows(raw, fmt, K, rows)
        x64 = x.astype(np.float64)
        return cls(fmt, M, K, raw, x, rows, x64 @ w.T, np.abs(x64) @ np.abs(w).T, w, rng)

    def errors(self, y: np.ndarray, T: int, rel_tol: float = REL_TOL) -> np.ndarray:
        """Each checked output's error (tokens < T) as a fraction of its tolerance."""
        got = y[:T, self.rows].astype(np.float64)
        return np.abs(got - self.want[:T]) / (rel_tol * self.scale[:T] + 1e-30)

    def overflowing(self) -> "Problem":
        """The same matrix with every other token's activations scaled by 10^U(OVERFLOW_SCALE)
        (f16 overflows at 65504; relu(k)^2 in a real model can get there), NumPy's answer again."""
        factors = np.where(np.arange(len(self.x)) % 2 == 0, 10 ** self.rng.uniform(*OVERFLOW_SCALE, len(self.x)), 1.0)
        x = (self.x * factors[:, None]).astype(np.float32)
        x64 = x.astype(np.float64)
        return Problem(self.fmt, self.M, self.K, self.raw, x, self.rows, x64 @ self.w.T,
                       np.abs(x64) @ np.abs(self.w).T, self.w, self.rng)


def bench_gemm(kernels, path: str, problem: Problem, weights: RotatedWeights, T: int, tuning: str,
               name: str = "", *, size: str = "full", repeats: int = 5,
               overflow: Problem | None = None) -> GemmTiming:
    """Check then time the gemm kernel of `kernels` (one tuning: gemm, or gemm_sgmat where it
    says gemm_sgmat) on T tokens of a problem; gemm_sgmat is also checked on `overflow` (the
    problem with huge activations, Problem.overflowing) before anything is timed."""
    d = kernels.device
    fmt, M, K = problem.fmt, problem.M, problem.K
    spec = kn.GEMM_SGMAT if kernels.tuning.gemm_sgmat else kn.GEMM
    rel_tol = SGMAT_REL_TOL if spec is kn.GEMM_SGMAT else REL_TOL
    storage = gpu_runtime.STORAGE
    x = d.create_buffer_with_data(data=problem.x[:T].tobytes(), usage=storage)
    b = d.create_buffer(size=16, usage=storage)
    y = d.create_buffer(size=4 * M * T, usage=storage | gpu_runtime.COPY_SRC)
    run = d.create_buffer_with_data(data=np.array([T, 0, 0, 0], np.uint32).tobytes(),
                                    usage=gpu_runtime.UNIFORM)
    seg = kn.MatSegment(rows=M, K=K, row_words=kn.row_words(fmt, K), w_base=0, x_off=0, y_off=0,
                        y_stride=M, fmt=fmt)
    kernel = kernels.kernel(spec, FMT=kn.matmul_fmt([seg]))
    params, _, tiles = kn.matmul_params([seg], kn.MatvecShape(wg=1, red=1), kn.gemm_tile_rows(kernel))
    grid = kn.gemm_grid(tiles, T, kn.gemm_tile_tokens(kernel))
    groups = [kernels.bind(spec, run, params, {"W": weights.binding(c), "X": x, "B": b, "Y": y},
                           label=f"gemm_bench.{c}") for c in range(weights.copies)]
    stamps = "timestamp-query" in kernels.gpu.features
    if stamps:
        queries = d.create_query_set(type="timestamp", count=2)
        query_buf = d.create_buffer(size=16, usage=gpu_runtime.QUERY_RESOLVE | gpu_runtime.COPY_SRC)
        period = gpu_runtime.timestamp_period(kernels.gpu)

    def run_pass(n: int, timed: bool = True) -> tuple[float, float | None]:
        plan = kn.Plan(kn.Dispatch(kernel, groups[i % weights.copies], grid, "gemm_bench") for i in range(n))
        enc = d.create_command_encoder()
        timed = timed and stamps
        cp = enc.begin_compute_pass(timestamp_writes={
            "query_set": queries, "beginning_of_pass_write_index": 0,
            "end_of_pass_write_index": 1} if timed else None)
        kn.encode(cp, plan)
        cp.end()
        if timed:
            enc.resolve_query_set(queries, 0, 2, query_buf, 0)
        buf = enc.finish()
        start = time.perf_counter()
        d.queue.submit([buf])
        done = d.queue.read_buffer(query_buf if timed else y, 0, 16)
        wall = time.perf_counter() - start
        if not timed:
            return wall, None
        t0, t1 = np.frombuffer(done, dtype=np.uint64)[:2]
        return wall, (float(t1 - t0) * period * 1e-9 if t1 > t0 else None)

    def check(case: Problem, what: str) -> float:
        out = np.frombuffer(d.queue.read_buffer(y), dtype=np.float32).reshape(T, M)
        errors = case.errors(out, T, rel_tol)
        if not (errors <= 1).all():  # also catches NaN
            t, i = np.unravel_index(int(np.argmax(np.where(np.isnan(errors), np.inf, errors))), errors.shape)
            raise KernelCheckError(f"{path} {spec.name} {fmt} {M}x{K} T={T} {tuning}{what}: token {t} row "
                                   f"{int(case.rows[i])} is {float(out[t, case.rows[i]]):.6g}, NumPy says "
                                   f"{case.want[t, i]:.6g} (tolerance {rel_tol * case.scale[t, i]:.3g}); not timed")
        return float(errors.max())

    run_pass(1, timed=False)
    max_error = check(problem, "")
    overflow_error = None
    if spec is kn.GEMM_SGMAT and overflow is not None:
        big = d.create_buffer_with_data(data=overflow.x[:T].tobytes(), usage=storage)
        bg = kernels.bind(spec, run, params, {"W": weights.binding(0), "X": big, "B": b, "Y": y},
                          label="gemm_bench.overflow")
        enc = d.create_command_encoder()
        cp = enc.begin_compute_pass()
        kn.encode(cp, [kn.Dispatch(kernel, bg, grid, "gemm_bench.overflow")])
        cp.end()
        d.queue.submit([enc.finish()])
        overflow_error = check(overflow, " (activations of 1e5-1e6)")
        big.destroy()

    t = time_passes(run_pass, max(4, weights.copies), 2000, PASS_SECONDS[size], repeats)
    return GemmTiming(path=path, fmt=fmt, name=name, rows=M, cols=K, tokens=T, tuning=tuning,
                      seconds=t.seconds, clock=t.clock, dispatches=t.dispatches, copies=weights.copies,
                      max_error=max_error, checked_rows=len(problem.rows), samples=t.samples,
                      kernel=spec.name, overflow_error=overflow_error)


def sgmat_tunings(gpu, path: str) -> list[str]:
    """A gemm_sgmat tuning per config x tile this device can run (none off the native path or
    without subgroup matrices): the rows --sgmat adds."""
    if path != "native" or not gpu.has("subgroup"):
        return []
    sg = kn.probe_subgroup_size(gpu)
    wg_bytes = int(gpu.limits.get("max-compute-workgroup-storage-size", 16384))
    out = []
    for m, n, k in kn.usable_sgmat_configs(gpu, path, sg):
        for tokens, rows in kn.SGMAT_TILES:
            if not kn.sgmat_tile_problem((m, n, k), tokens, rows, wg_bytes):
                out.append(f"gemm_sgmat=1,sgmat_k={k},sgmat_m={m},sgmat_n={n},sgmat_rows={rows},sgmat_tokens={tokens}")
    return out


def _fp32_shape(tuning: str, default_sgmat: bool) -> str:
    """An fp32 gemm shape (naming gemm_rows or gemm_k, not gemm_sgmat) stays on the fp32 gemm
    where the device's default is gemm_sgmat."""
    names = {item.partition("=")[0] for item in tuning.split(",") if item.strip()}
    if default_sgmat and names & {"gemm_rows", "gemm_k"} and "gemm_sgmat" not in names:
        return normalize_tuning(tuning + ",gemm_sgmat=0")
    return tuning


def run(formats=FORMATS, paths=("webgpu",), size: str = "full", tokens=None, tunings=TUNINGS,
        backend: str = "auto", runtime: str = "wgpu-native", repeats: int = 5, seed: int = 0, out=None,
        save: micro_records.Saver | None = None, sgmat: bool = False) -> tuple[list[GemmTiming], list[str]]:
    """Every format x shape x path x T x tuning: (timings, failures), a line each to `out`,
    each handed to `save` (with the GPU it ran on) as soon as it is measured. `sgmat` adds a
    gemm_sgmat tuning per config x tile the device offers (sgmat_tunings)."""
    from rwkvlab.gpu import gpu_for, resolve_options
    from rwkvlab.options import Options

    out = out or sys.stdout
    tokens = tuple(tokens or TOKENS[size])
    check_formats_and_paths(formats, paths)
    devices = {}
    for path in paths:
        # a runtime or path this adapter lacks: a clear error
        gpu = gpu_for(resolve_options(Options(runtime=runtime, backend=backend, path=path)))
        try:
            default_sgmat = kn.choose_tuning(gpu, path).gemm_sgmat
            named = [_fp32_shape(t, default_sgmat) for t in tunings] + (sgmat_tunings(gpu, path) if sgmat else [])
            devices[path] = (gpu, {t: kn.kernels_for(gpu, kn.choose_tuning(gpu, path, t)) for t in dict.fromkeys(named)})
        except (kn.KernelError, OptionsError) as e:
            raise ValueError(str(e)) from None
        sg = kn.probe_subgroup_size(gpu) if path == "native" and gpu.has("subgroup") else 0
        configs = kn.sgmat_configs_text(kn.usable_sgmat_configs(gpu, path, sg))
        print(f"# {path} path on {gpu.info.label} ({gpu.runtime}); f16 subgroup-matrix configs (MxNxK): "
              f"{configs}", file=out, flush=True)
    timings, failures = [], []
    for fmt in formats:
        for name, (M, K) in SHAPES[size].items():
            problem = Problem.make(fmt, M, K, max(tokens), np.random.default_rng([seed, M, K, kn.GPU_FORMATS[fmt]]))
            overflow = None
            if any(k.tuning.gemm_sgmat for _, by_tuning in devices.values() for k in by_tuning.values()):
                overflow = problem.overflowing()
            rows = kn.rows_for_gpu(problem.raw, fmt, K)
            for path, (gpu, by_tuning) in devices.items():
                weights = RotatedWeights(gpu.device, gpu.limits, rows, ROTATION_BYTES[size])
                for T in tokens:
                    for tuning, kernels in by_tuning.items():
                        try:
                            t = bench_gemm(kernels, path, problem, weights, T, tuning, name, size=size,
                                           repeats=repeats, overflow=overflow)
                        except (KernelCheckError, kn.KernelError) as e:  # wrong, or did not build
                            failures.append(str(e))
                            print(f"FAILED: {e}", file=out, flush=True)
                            continue
                        timings.append(t)
                        print(t.line(), file=out, flush=True)
                        if save is not None:
                            save(t.micro_run(kernels.tuning.as_record()), gpu)
                weights.buffer.destroy()
    return timings, failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rwkvlab.gemm_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="256/1024-wide shapes, T = 67 (CPU adapters, tests)")
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma-separated (any of kernels.GPU_FORMATS)")
    ap.add_argument("--paths", default="webgpu", help="webgpu, native or both (gemm is the same WGSL on both)")
    ap.add_argument("--tokens", default=None, help="comma-separated chunk sizes T (default 64,256,512)")
    ap.add_argument("--tunings", default=";".join(TUNINGS),
                    help="semicolon-separated $RWKVLAB_TUNING strings, each measured")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--runtime", default="wgpu-native", choices=RUNTIMES, help="WebGPU implementation (default: wgpu-native)")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per measurement (median kept)")
    ap.add_argument("--sgmat", action="store_true",
                    help="also the tensor-core kernel gemm_sgmat: every f16 subgroup-matrix config x tile the "
                    "adapter offers (native path; Dawn), checked with the f16 tolerance and on activations of 1e5-1e6")
    micro_records.add_arguments(ap, "gemm_bench")
    args = ap.parse_args(argv)
    return micro_records.main("gemm_bench", args, lambda save: run(
        formats=args.formats.split(","), paths=args.paths.split(","), size="small" if args.small else "full",
        tokens=[int(t) for t in args.tokens.split(",")] if args.tokens else None,
        tunings=[t.strip() for t in args.tunings.split(";")], backend=args.backend, runtime=args.runtime, repeats=args.repeats,
        save=save, sgmat=args.sgmat))

if __name__ == "__main__":
    sys.exit(main())
