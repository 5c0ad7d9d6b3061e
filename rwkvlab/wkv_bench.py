"""GPU time of the WKV kernel per workgroup shape: `python -m rwkvlab.wkv_bench`.

For every path (webgpu, native) and every wkv_wg (threads per head, kernels.Tuning.wkv_wg; the
one $RWKVLAB_TUNING would set, all tried in one process), the default plan's kernel wkv_fused
(the "kv" + "wkv" fusions, a layer other than 0) runs on the heads of a 2.9B model (H = 40):

1. Check, before anything is timed, on CHECK_TOKENS tokens from a random state:
   - how far wkv_fused is from the unfused plan's dispatches (kv_prep, wkv of the same wkv_wg,
     groupnorm_out): bit for bit on lavapipe (the engine's fusion tests demand it there); a GPU
     compiler may contract multiply-adds its own way per pipeline, so here it is reported;
   - that output and state are within tolerance of float64 NumPy (`reference`).
   A shape that fails the float64 check is reported and never timed.
2. Time: one compute pass of back-to-back dispatches, each on T tokens (T = 1: a generation
   step; T = 64: a prefill chunk), cycling through enough copies of the state (>= 256 MiB) that
   the L2 cache cannot hold them, as in a real step, where 3 GB of weights pass through L2
   between two visits of a layer's state. GPU timestamps around the pass (wall clock where the
   adapter has none), median of several passes; us per dispatch and per token.

Prefill (`--prefill-shapes`, native path, adapters with subgroups): what the engine runs for a
chunk of T > 1 tokens there, kv_prep + wkv_prefill + groupnorm_out (shaders/wkv_prefill.wgsl: a
state row per wkv_lanes lanes of a subgroup, wkv_rows rows per workgroup), next to the old
plan's wkv_fused (at the device's wkv_wg), at T = 64 and 512:
1. Check, on CHECK_PREFILL_TOKENS tokens (a multiple of no block size) from a random state: the
   three dispatches against float64 NumPy (the tolerances above), and how far they are from
   wkv_fused (another summation order: reported, never bit-identical).
2. Time, as above: wkv_fused; wkv_prefill alone; the three dispatches (per layer: the same work
   wkv_fused does). kv_prep updates k and v in place, so in a timed pass they drift from
   dispatch to dispatch; nothing in these kernels branches on values, so the time does not.
   A line per T then compares the old plan with the new one, per token and for a 32-layer
   model per prompt token.

Each measurement is appended to the benchmark history as a run of its own (title "wkv_bench",
model "<kernels> H=<heads> T=<tokens>" with <kernels> wkv_fused, wkv_prefill or
kv_prep+wkv_prefill+groupnorm_out, GPU microseconds per layer (one dispatch, three for the
latter) in a "Kernel time" row: rwkvlab.micro_records), in <--history-dir>/<gpu>.md; --no-save
only prints.

`--small` (4 heads, T = 1 and 8, prefill T = 8 and 37, 4 MiB of states) is for lavapipe and the
tests.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, replace

import numpy as np

from rwkvlab import gpu as gpu_runtime
from rwkvlab import kernels as kn
from rwkvlab import micro_records
from rwkvlab.micro_records import MicroRun
from rwkvlab.options import KERNEL_PATHS, RUNTIMES, Options

WGS = (64, 128, 256, 512, 1024)
SIZES = {  # heads, token counts timed, bytes of state copies a pass cycles through, GPU s per pass
    "full": (40, (1, 64), 256 << 20, 0.03),
    "small": (4, (1, 8), 4 << 20, 0.005),
}
PREFILL_TOKENS = {"full": (64, 512), "small": (8, 37)}  # prefill chunks timed
CHECK_TOKENS = 8
CHECK_PREFILL_TOKENS = 37  # spans blocks of 1..16 tokens, a multiple of none
LAYERS = 32  # a 2.9B model's, for the per-prompt-token line
CHAIN = "kv_prep+wkv_prefill+groupnorm_out"  # the native plan's prefill dispatches per layer
N = kn.HEAD_SIZE
EPS_GROUP_NORM = 64e-5


class WkvCheckError(AssertionError):
    """A shape's output is wrong (or differs from the unfused plan's): it is not timed."""


@dataclass(frozen=True)
class WkvTiming:
    path: str
    wg: int
    T: int
    heads: int
    seconds: float  # per layer: one dispatch (CHAIN: three) (median over passes), by `clock`
    clock: str  # "gpu" (timestamp queries) or "wall"
    dispatches: int  # per timed pass
    copies: int  # state copies the pass cycles through
    samples: tuple[float, ...] = ()  # seconds per layer of each timed pass, by `clock`
    max_error: float = float("nan")  # the check's worst error as a fraction of its tolerance
    unfused_diff: float = float("nan")  # the check's largest difference from the unfused plan
    #                                     (prefill: from wkv_fused)
    kernel: str = "wkv_fused"  # or "wkv_prefill", or CHAIN
    shape: tuple[int, int] = (0, 0)  # wkv_prefill's (wkv_lanes, wkv_rows)

    @property
    def tuning(self) -> str:
        """The tuning text of the shape measured (Options.tuning's spelling)."""
        if self.kernel == "wkv_fused":
            return f"wkv_wg={self.wg}"
        return f"wkv_lanes={self.shape[0]},wkv_rows={self.shape[1]}"

    def micro_run(self, kernel_tuning: dict) -> MicroRun:
        """This measurement as a history run (rwkvlab.micro_records)."""
        problem = f"H={self.heads} T={self.T}"
        if self.kernel == "wkv_fused":
            same = ("equals the unfused plan bit for bit" if self.unfused_diff == 0 else
                    f"differs from the unfused plan by up to {self.unfused_diff:.2g}")
            checked = CHECK_TOKENS
        else:
            same = f"{CHAIN} differs from wkv_fused by up to {self.unfused_diff:.2g}"
            checked = CHECK_PREFILL_TOKENS
        return MicroRun(
            model=f"{self.kernel} {problem}", change=f"{problem} path={self.path} tuning={self.tuning}",
            figure="kernel_time", value=self.seconds * 1e6, samples=[s * 1e6 for s in self.samples],
            seconds=list(self.samples), path=self.path, tuning=self.tuning, clock=self.clock,
            check=(f"max error {self.max_error:.2g} of tolerance (float64 NumPy on {checked} tokens: "
                   f"state 1e-5 of its largest value, output 1e-4 relative); {same}"),
            details={"heads": self.heads, "tokens": self.T, "kernel": self.kernel, "wkv_wg": self.wg,
                     "wkv_lanes": self.shape[0], "wkv_rows": self.shape[1], "seconds": self.seconds,
                     "us_per_token": self.seconds / self.T * 1e6, "dispatches": self.dispatches,
                     "copies": self.copies, "max_error": self.max_error, "unfused_diff": self.unfused_diff},
            kernel_tuning={**kernel_tuning, "wkv_wg": self.wg,
                           **({"wkv_lanes": self.shape[0], "wkv_rows": self.shape[1]} if self.shape[0] else {})})

    def line(self) -> str:
        what = (f"wkv_wg={self.wg:<5d}" if self.kernel == "wkv_fused" else
                f"{self.kernel} {self.shape[0]}x{self.shape[1]}")
        per = "dispatch" if self.kernel != CHAIN else "layer"
        return (f"{self.path:7s} {what} T={self.T:<3d} {self.seconds * 1e6:9.2f} us/{per} "
                f"{self.seconds / self.T * 1e6:8.3f} us/token  ({self.clock} clock, {self.heads} heads, "
                f"{self.dispatches} dispatches over {self.copies} state copies)")


def make_inputs(T: int, H: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random float32 inputs in their model ranges: r, k, v, g, v_first [T, C]; w (decay), a,
    vmix in (0, 1); vecs [5, C] = k_k, k_a (in (0, 1)), r_k, ln_x weight, bias; s0 [H, 64, 64]."""
    C = H * N
    x = {name: rng.standard_normal((T, C)) for name in ("r", "k", "v", "g", "vf")}
    x["w"] = np.exp(-0.606531 / (1 + np.exp(-rng.standard_normal((T, C)))))
    x["a"], x["vmix"] = (1 / (1 + np.exp(-rng.standard_normal((T, C)))) for _ in range(2))
    x["vecs"] = rng.standard_normal((5, C))
    x["vecs"][1] = rng.random(C)
    x["s0"] = rng.standard_normal((H, N, N)) * 0.1
    return {name: v.astype(np.float32) for name, v in x.items()}


def reference(x: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(gated output [T, C], final state) in float64: kv_prep, the state update, groupnorm_out
    of a layer other than 0, as rwkvlab.reference computes them."""
    d = {name: v.astype(np.float64) for name, v in x.items()}
    T, C = d["r"].shape
    H = C // N
    kkw, kaw, rk, lnw, lnb = d["vecs"]
    kk = (d["k"] * kkw).reshape(T, H, N)
    kk = (kk / np.maximum(np.linalg.norm(kk, axis=-1, keepdims=True), 1e-12)).reshape(T, C)
    k = d["k"] * (1 + (d["a"] - 1) * kaw)
    v = d["v"] + (d["vf"] - d["v"]) * d["vmix"]
    S, y = d["s0"].copy(), np.zeros((T, C))
    for t in range(T):
        for h in range(H):
            sl = slice(h * N, (h + 1) * N)
            sa = S[h] @ (-kk[t, sl])
            S[h] = S[h] * d["w"][t, sl][None] + np.outer(v[t, sl], k[t, sl]) + np.outer(sa, kk[t, sl] * d["a"][t, sl])
            y[t, sl] = S[h] @ d["r"][t, sl]
    yh = y.reshape(T, H, N)
    mean = yh.mean(-1, keepdims=True)
    norm = ((yh - mean) / np.sqrt(((yh - mean) ** 2).mean(-1, keepdims=True) + EPS_GROUP_NORM)).reshape(T, C)
    bonus = (d["r"] * k * rk).reshape(T, H, N).sum(-1, keepdims=True) * v.reshape(T, H, N)
    return (norm * lnw + lnb + bonus.reshape(T, C)) * d["g"], S


def _fused_params(T: int, C: int) -> dict:
    """wkv_fused's offsets for DOWN = [r, k, v] and UP = [w, a, vmix, g] slots of T tokens, VEC
    = the five vectors."""
    n = T * C
    return dict(C=C, r=0, k=n, v=2 * n, w=0, a=n, vmix=2 * n, g=3 * n, kkw=0, kaw=C, rk=2 * C, lnw=3 * C, lnb=4 * C)


def _stacks(x: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    down = np.concatenate([x[name].ravel() for name in ("r", "k", "v")])
    up = np.concatenate([x[name].ravel() for name in ("w", "a", "vmix", "g")])
    return down, up


def check(kernels, wg: int, H: int, rng: np.random.Generator) -> tuple[float, float]:
    """Step 1 of the module docstring for one shape: (the worst error against float64 as a
    fraction of its tolerance (< 1), the largest difference from the unfused plan). Raises
    WkvCheckError."""
    x = make_inputs(CHECK_TOKENS, H, rng)
    T, C = x["r"].shape
    down, up = _stacks(x)
    fused = kn.run_kernel(kernels, kn.WKV_FUSED, _fused_params(T, C),
                          dict(DOWN=down, UP=up, VEC=x["vecs"], FVF=x["vf"].copy(), FS=x["s0"].copy(),
                               FY=np.zeros((T, C), np.float32), FKK=np.zeros((T, C), np.float32)),
                          (H, 1, 1), T=T, constants=dict(WG=wg), read=("FY", "FS"))
    kv = kn.run_kernel(kernels, kn.KV_PREP, dict(C=C),
                       dict(K=x["k"], V=x["v"], KK=np.zeros((T, C), np.float32), A=x["a"], VMIX=x["vmix"],
                            VF=x["vf"], KKW=x["vecs"][0], KAW=x["vecs"][1]),
                       (H, T, 1), T=T, read=("K", "V", "KK"))
    wkv = kn.run_kernel(kernels, kn.WKV, dict(C=C),
                        dict(R=x["r"], DECAY=x["w"], K=kv["K"], V=kv["V"], KK=kv["KK"], A=x["a"],
                             S=x["s0"].copy(), Y=np.zeros((T, C), np.float32)),
                        (H, 1, 1), T=T, constants=dict(WG=wg), read=("S", "Y"))
    out = kn.run_kernel(kernels, kn.GROUPNORM_OUT, dict(C=C),
                        dict(GY=wkv["Y"], R=x["r"], K=kv["K"], V=kv["V"], G=x["g"], LNW=x["vecs"][3],
                             LNB=x["vecs"][4], RK=x["vecs"][2]),
                        (H, T, 1), T=T, read=("GY",))["GY"]
    # Bit-identity is what the engine's fusion tests demand on lavapipe; a GPU compiler may
    # contract a*b+c into an fma differently in the two pipelines (seen on the H100), so a
    # difference is reported with its size, and only the float64 check below decides.
    unfused_diff = max(float(np.abs(fused["FY"].astype(np.float64) - out).max()),
                       float(np.abs(fused["FS"].astype(np.float64) - wkv["S"]).max()))
    want, S = reference(x)
    # The tolerances of tests/test_kernels.py::test_wkv_fused: the state is fp32 sums of 64
    # products a few tokens deep; GroupNorm divides by the head's spread of y, so its O(1)
    # outputs carry that relative error.
    s_err = np.abs(fused["FS"] - S).max() / (1e-5 * np.abs(S).max())
    y_err = (np.abs(fused["FY"] - want) / (1e-4 * np.abs(want) + 1e-4 * np.abs(want).max())).max()
    worst = max(s_err, y_err)
    if not worst <= 1:  # NaN fails too
        raise WkvCheckError(f"wkv_wg={wg}: off float64 NumPy by {worst:.3g} of the tolerance")
    return float(worst), unfused_diff


def _prefill_arrays(x: dict[str, np.ndarray]) -> tuple[dict, dict, dict]:
    """The inputs of kv_prep, wkv_prefill (S left out) and groupnorm_out for the inputs `x`
    of make_inputs, by binding name (_Pass binds equal names, GY and Y, to one buffer)."""
    T, C = x["r"].shape
    kv = dict(K=x["k"], V=x["v"], KK=np.zeros((T, C), np.float32), A=x["a"], VMIX=x["vmix"], VF=x["vf"],
              KKW=x["vecs"][0], KAW=x["vecs"][1])
    wkv = dict(R=x["r"], DECAY=x["w"], K=x["k"], V=x["v"], KK=kv["KK"], A=x["a"], Y=np.zeros((T, C), np.float32))
    gn = dict(GY=wkv["Y"], R=x["r"], K=x["k"], V=x["v"], G=x["g"], LNW=x["vecs"][3], LNB=x["vecs"][4],
              RK=x["vecs"][2])
    return kv, wkv, gn


def check_prefill(kernels, wg: int, lanes: int, rows: int, H: int, rng: np.random.Generator) -> tuple[float, float]:
    """Step 1 of the prefill part of the module docstring for one wkv_prefill shape: (the worst
    error of kv_prep + wkv_prefill + groupnorm_out against float64 as a fraction of its
    tolerance (< 1), their largest difference from wkv_fused at wkv_wg `wg`). Raises
    WkvCheckError."""
    x = make_inputs(CHECK_PREFILL_TOKENS, H, rng)
    T, C = x["r"].shape
    kv_in, wkv_in, gn_in = _prefill_arrays(x)
    kv = kn.run_kernel(kernels, kn.KV_PREP, dict(C=C), kv_in, (H, T, 1), T=T, read=("K", "V", "KK"))
    consts = dict(WG=lanes * rows, LANES=lanes)
    grid = kn.wkv_prefill_grid(kernels.kernel(kn.WKV_PREFILL, **consts), C)
    state = kn.run_kernel(kernels, kn.WKV_PREFILL, dict(C=C),
                          dict(wkv_in, K=kv["K"], V=kv["V"], KK=kv["KK"], S=x["s0"].copy()), grid, T=T,
                          constants=consts, read=("S", "Y"))
    out = kn.run_kernel(kernels, kn.GROUPNORM_OUT, dict(C=C), dict(gn_in, GY=state["Y"], K=kv["K"], V=kv["V"]),
                        (H, T, 1), T=T, read=("GY",))["GY"]
    down, up = _stacks(x)
    fused = kn.run_kernel(kernels, kn.WKV_FUSED, _fused_params(T, C),
                          dict(DOWN=down, UP=up, VEC=x["vecs"], FVF=x["vf"].copy(), FS=x["s0"].copy(),
                               FY=np.zeros((T, C), np.float32), FKK=np.zeros((T, C), np.float32)),
                          (H, 1, 1), T=T, constants=dict(WG=wg), read=("FY", "FS"))
    fused_diff = max(float(np.abs(fused["FY"].astype(np.float64) - out).max()),
                     float(np.abs(fused["FS"].astype(np.float64) - state["S"]).max()))
    want, S = reference(x)
    s_err = np.abs(state["S"] - S).max() / (1e-5 * np.abs(S).max())  # check()'s tolerances
    y_err = (np.abs(out - want) / (1e-4 * np.abs(want) + 1e-4 * np.abs(want).max())).max()
    worst = max(s_err, y_err)
    if not worst <= 1:  # NaN fails too
        raise WkvCheckError(f"wkv_prefill {lanes}x{rows}: off float64 NumPy by {worst:.3g} of the tolerance")
    return float(worst), fused_diff


class _Pass:
    """Buffers and bind groups to time one layer's dispatches on T tokens, cycling through state
    copies: wkv_fused at `wg` threads, or (`kernel` "wkv_prefill" or CHAIN) wkv_prefill of
    `shape` (lanes, rows) alone or between kv_prep and groupnorm_out."""

    def __init__(self, kernels, wg: int, T: int, H: int, state_bytes: int, rng: np.random.Generator,
                 kernel: str = "wkv_fused", shape: tuple[int, int] = (0, 0)):
        d = self.device = kernels.device
        x = make_inputs(T, H, rng)
        C = H * N
        storage = gpu_runtime.STORAGE | gpu_runtime.COPY_DST
        one = H * N * N * 4  # a multiple of 16 KiB: every copy stays offset-aligned
        self.copies = max(1, state_bytes // one)
        states = d.create_buffer(size=one * self.copies, usage=storage)
        d.queue.write_buffer(states, 0, np.tile(x["s0"].ravel(), self.copies).tobytes())
        self.run = d.create_buffer_with_data(data=np.array([T, 0, 0, 0], np.uint32).tobytes(),
                                             usage=gpu_runtime.UNIFORM)

        def buffer(arr: np.ndarray):
            return d.create_buffer_with_data(data=arr.tobytes(), usage=storage)

        if kernel == "wkv_fused":
            down, up = _stacks(x)
            bufs = {name: buffer(arr) for name, arr in (
                ("DOWN", down), ("UP", up), ("VEC", x["vecs"]), ("FVF", x["vf"]),
                ("FY", np.zeros((T, C), np.float32)), ("FKK", np.zeros((T, C), np.float32)))}
            k = kernels.kernel(kn.WKV_FUSED, WG=wg)
            params = _fused_params(T, C)
            self.layers = [[kn.Dispatch(k, kernels.bind(kn.WKV_FUSED, self.run, params,
                                                        dict(bufs, FS=(states, c * one, one)),
                                                        label=f"wkv_bench.{c}"), (H, 1, 1), "wkv_bench")]
                           for c in range(self.copies)]
            self.out = bufs["FY"]
        else:
            kv_in, wkv_in, gn_in = _prefill_arrays(x)
            bufs: dict[str, object] = {}
            for arrays in (kv_in, wkv_in, gn_in):  # one buffer per array: K, V, KK, Y are shared
                for name, arr in arrays.items():
                    key = "Y" if name == "GY" else name
                    if key not in bufs:
                        bufs[key] = buffer(arr)
            lanes, rows = shape
            k = kernels.kernel(kn.WKV_PREFILL, WG=lanes * rows, LANES=lanes)
            grid = kn.wkv_prefill_grid(k, C)
            wkv_res = {name: bufs[name] for name in wkv_in}
            prefill = [kn.Dispatch(k, kernels.bind(kn.WKV_PREFILL, self.run, dict(C=C),
                                                   dict(wkv_res, S=(states, c * one, one)),
                                                   label=f"wkv_bench.{c}"), grid, "wkv_bench")
                       for c in range(self.copies)]
            if kernel == "wkv_prefill":
                self.layers = [[p] for p in prefill]
            else:
                kv = kn.Dispatch(kernels.kernel(kn.KV_PREP), kernels.bind(
                    kn.KV_PREP, self.run, dict(C=C), {name: bufs[name] for name in kv_in}, label="wkv_bench.kv"),
                    (H, T, 1), "wkv_bench")
                gn = kn.Dispatch(kernels.kernel(kn.GROUPNORM_OUT), kernels.bind(
                    kn.GROUPNORM_OUT, self.run, dict(C=C),
                    {name: bufs["Y" if name == "GY" else name] for name in gn_in}, label="wkv_bench.gn"),
                    (H, T, 1), "wkv_bench")
                self.layers = [[kv, p, gn] for p in prefill]
            self.out = bufs["Y"]
        self.timestamps = "timestamp-query" in kernels.gpu.features
        if self.timestamps:
            self.queries = d.create_query_set(type="timestamp", count=2)
            self.query_buf = d.create_buffer(size=16, usage=gpu_runtime.QUERY_RESOLVE | gpu_runtime.COPY_SRC)
            self.period = gpu_runtime.timestamp_period(kernels.gpu)

    def time(self, n: int) -> float:
        """Seconds for one pass of n layers (GPU timestamps, else wall clock)."""
        plan = kn.Plan(dispatch for i in range(n) for dispatch in self.layers[i % self.copies])
        enc = self.device.create_command_encoder()
        cp = enc.begin_compute_pass(timestamp_writes={
            "query_set": self.queries, "beginning_of_pass_write_index": 0,
            "end_of_pass_write_index": 1} if self.timestamps else None)
        kn.encode(cp, plan)
        cp.end()
        if self.timestamps:
            enc.resolve_query_set(self.queries, 0, 2, self.query_buf, 0)
        start = time.perf_counter()
        self.device.queue.submit([enc.finish()])
        done = self.device.queue.read_buffer(self.query_buf if self.timestamps else self.out, 0, 16)
        wall = time.perf_counter() - start
        if self.timestamps:
            t0, t1 = np.frombuffer(done, dtype=np.uint64)[:2]
            if t1 > t0:
                return float(t1 - t0) * self.period * 1e-9
        return wall


def bench(kernels, path: str, wg: int, T: int, size: str = "full", repeats: int = 5, seed: int = 0,
          kernel: str = "wkv_fused", shape: tuple[int, int] = (0, 0)) -> WkvTiming:
    """Time one shape (step 2; call `check` or `check_prefill` first): wkv_fused at `wg`, or
    `kernel` "wkv_prefill" / CHAIN at `shape` (wkv_lanes, wkv_rows)."""
    H, _, state_bytes, pass_seconds = SIZES[size]
    p = _Pass(kernels, wg, T, H, state_bytes, np.random.default_rng([seed, T]), kernel, shape)
    n = max(8, p.copies)
    per = p.time(n) / n  # warm-up and calibration
    n = int(min(4000, max(n, pass_seconds / max(per, 1e-9))))
    times = [p.time(n) for _ in range(repeats)]
    return WkvTiming(path=path, wg=wg, T=T, heads=H, seconds=statistics.median(times) / n,
                     clock="gpu" if p.timestamps else "wall", dispatches=n * len(p.layers[0]), copies=p.copies,
                     samples=tuple(t / n for t in times), kernel=kernel, shape=shape)


def run(paths=KERNEL_PATHS, wgs=WGS, size: str = "full", backend: str = "auto", runtime: str = "wgpu-native", repeats: int = 5, seed: int = 0,
        out=None, save: micro_records.Saver | None = None,
        prefill_shapes: tuple = ()) -> tuple[list[WkvTiming], list[str]]:
    """Every path x wkv_wg x T: (timings, failures), a line per measurement printed to `out`
    and handed to `save` (with the GPU it ran on) as soon as it is measured. Then, on the
    native path of an adapter with subgroups, the prefill part for every (wkv_lanes, wkv_rows)
    of `prefill_shapes` ("default": the device's own)."""
    from rwkvlab.gpu import gpu_for, resolve_options

    out = out or sys.stdout
    bad = [wg for wg in wgs if wg not in WGS]
    if bad:
        raise ValueError(f"wkv_wg {bad}: the kernel takes 64 x a power of two lanes, {', '.join(map(str, WGS))}")
    H, tokens, _, _ = SIZES[size]
    timings, failures = [], []
    for path in paths:
        if path not in KERNEL_PATHS:
            raise ValueError(f"unknown path {path!r}; choose from {', '.join(KERNEL_PATHS)}")
        # a runtime or path this adapter lacks: a clear error
        gpu = gpu_for(resolve_options(Options(runtime=runtime, backend=backend, path=path)))
        kernels = kn.kernels_for(gpu, kn.choose_tuning(gpu, path))
        limit = int(gpu.limits.get("max-compute-invocations-per-workgroup", 256))
        print(f"# {path} path on {gpu.info.label}; tuning {kernels.tuning.as_record()}", file=out, flush=True)
        for wg in wgs:
            if wg > limit:
                print(f"{path:7s} wkv_wg={wg:<5d} skipped: over this device's {limit} invocations per workgroup",
                      file=out, flush=True)
                continue
            try:
                err, unfused_diff = check(kernels, wg, H, np.random.default_rng([seed, wg]))
            except (WkvCheckError, kn.KernelError) as e:
                failures.append(f"{path} {e}")
                print(f"{path:7s} wkv_wg={wg:<5d} FAILED: {e}", file=out, flush=True)
                continue
            same = ("equals the unfused plan bit for bit" if unfused_diff == 0 else
                    f"differs from the unfused plan by up to {unfused_diff:.2g}")
            print(f"{path:7s} wkv_wg={wg:<5d} checked: {same}, {err:.2g} of the float64 tolerance",
                  file=out, flush=True)
            for T in tokens:
                t = bench(kernels, path, wg, T, size, repeats, seed)
                t = replace(t, max_error=err, unfused_diff=unfused_diff)
                timings.append(t)
                print(t.line(), file=out, flush=True)
                if save is not None:
                    # the tuning this shape ran with: the device's, wkv_wg set by the kernel constant
                    save(t.micro_run({**kernels.tuning.as_record(), "wkv_wg": wg}), gpu)
        if prefill_shapes and path == "native" and kernels.tuning.subgroups:
            _run_prefill(kernels, gpu, prefill_shapes, size, repeats, seed, out, save, timings, failures)
    return timings, failures


def parse_shapes(text: str) -> tuple:
    """--prefill-shapes: "none", "default" (the device's own) or LANESxROWS,... (e.g. "8x16,16x8")."""
    text = text.strip()
    if text in ("", "none"):
        return ()
    shapes = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        if item == "default":
            shapes.append("default")
            continue
        lanes, x, rows = item.partition("x")
        if not (x and lanes.isdigit() and rows.isdigit()):
            raise ValueError(f"prefill shape {item!r} is not LANESxROWS (e.g. 8x16) nor 'default'")
        shapes.append((int(lanes), int(rows)))
    return tuple(shapes)


def _run_prefill(kernels, gpu, shapes, size, repeats, seed, out, save, timings, failures) -> None:
    """The prefill part of the module docstring on one native-path device."""
    H = SIZES[size][0]
    t = kernels.tuning
    wg = t.wkv_wg  # the old plan's wkv_fused
    old, checked = {}, None
    for T in PREFILL_TOKENS[size]:
        done = [m for m in timings if (m.path, m.kernel, m.wg, m.T) == ("native", "wkv_fused", wg, T)]
        if done:  # timed (and checked) by the wkv_wg part already
            old[T] = done[0]
            continue
        checked = checked or check(kernels, wg, H, np.random.default_rng([seed, wg]))
        err, diff = checked
        old[T] = replace(bench(kernels, "native", wg, T, size, repeats, seed), max_error=err, unfused_diff=diff)
        timings.append(old[T])
        print(old[T].line() + "  (the old prefill plan)", file=out, flush=True)
        if save is not None:
            save(old[T].micro_run(t.as_record()), gpu)
    seen = set()
    for shape in shapes:
        lanes, rows = (t.wkv_lanes, t.wkv_rows) if shape == "default" else shape
        if (lanes, rows) in seen:
            continue
        seen.add((lanes, rows))
        name = f"wkv_prefill {lanes}x{rows}"
        try:
            err, diff = check_prefill(kernels, wg, lanes, rows, H, np.random.default_rng([seed, lanes, rows]))
        except (WkvCheckError, kn.KernelError) as e:
            failures.append(f"native {e}")
            print(f"native  {name} FAILED: {e}", file=out, flush=True)
            continue
        print(f"native  {name} checked: {CHAIN} {err:.2g} of the float64 tolerance, "
              f"up to {diff:.2g} from wkv_fused", file=out, flush=True)
        for T in PREFILL_TOKENS[size]:
            chain = None
            for kernel in ("wkv_prefill", CHAIN):
                m = bench(kernels, "native", wg, T, size, repeats, seed, kernel=kernel, shape=(lanes, rows))
                m = replace(m, max_error=err, unfused_diff=diff)
                timings.append(m)
                print(m.line(), file=out, flush=True)
                if save is not None:
                    save(m.micro_run(t.as_record()), gpu)
                chain = m
            before, after = old[T].seconds / T * 1e6, chain.seconds / T * 1e6
            print(f"native  {name} T={T:<3d} old wkv_fused {before:.3f} -> {CHAIN} {after:.3f} us/token "
                  f"({before / after:.1f}x); {LAYERS} layers: {before * LAYERS:.1f} -> {after * LAYERS:.1f} "
                  f"us per prompt token", file=out, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rwkvlab.wkv_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="4 heads, T = 1 and 8 (CPU adapters, tests)")
    ap.add_argument("--paths", default=",".join(KERNEL_PATHS), help="webgpu, native or both")
    ap.add_argument("--wgs", default=",".join(map(str, WGS)), help="wkv_wg values (64 x lanes per row)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--runtime", default="wgpu-native", choices=RUNTIMES, help="WebGPU implementation (default: wgpu-native)")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per measurement (median kept)")
    ap.add_argument("--prefill-shapes", default="default",
                    help="wkv_prefill shapes (wkv_lanes x wkv_rows) timed against wkv_fused at the prefill "
                         "chunks, native path only: 'default' (the device's own), LANESxROWS,... (e.g. "
                         "'8x16,16x8,4x16'), or 'none' (default: default)")
    micro_records.add_arguments(ap, "wkv_bench")
    args = ap.parse_args(argv)

    def measure(save):
        wgs = [int(w) for w in args.wgs.split(",")]
        return run(paths=args.paths.split(","), wgs=wgs, size="small" if args.small else "full",
                   backend=args.backend, runtime=args.runtime, repeats=args.repeats, save=save,
                   prefill_shapes=parse_shapes(args.prefill_shapes))

    return micro_records.main("wkv_bench", args, measure)

if __name__ == "__main__":
    sys.exit(main())
