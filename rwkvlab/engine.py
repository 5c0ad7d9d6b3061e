"""The RWKV-7 engine on wgpu: weights on the GPU in their file format, a kernel plan, an Engine.

Read top to bottom: `load` opens a GGUF file (or a synthetic preset), uploads the weights
(chunked, with a progress bar; a block's small matrices stacked in shared buffers, matrices
over the binding limit split by rows), allocates activations and the recurrent state on the
GPU and builds every bind group once; the upload, the pipeline compiles and the NaN scan run
beside the op building where the runtime allows, and `Engine.load_phases` says where the time
went. The forward pass is a list of ops (`_layer_ops`; with no fusion, one per kernel
dispatch; each fusion of options.FUSIONS swaps a run of them for one); a plan for T tokens is
that list turned into dispatches (mat-vec kernels below Options.gemm_min_tokens tokens, GEMM
from there; prefill chunks on the native path run WKV as wkv_prefill). A token is one compute pass and one submit;
`generate` encodes several steps per submit and keeps the sampled ids on the GPU (argmax
writes the id the next step's embedding gather reads).

State (per layer: att_prev and ffn_prev, the previous token's normed input; the H x 64 x 64
wkv state) lives on the GPU in fp32 and carries over between calls until `reset()`.
"""
from __future__ import annotations

import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rwkvlab import gpu as gpu_runtime
from rwkvlab import kernels as kn
from rwkvlab import quant_kernels as qk
from rwkvlab.kernels import Dispatch
from rwkvlab.options import KERNEL_PATHS, Options, OptionsError

UPLOAD_SLICE = 64 << 20  # most bytes of one upload slice (prepared by a worker thread)
# Bytes of each of the load's three staging buffers (gpu.StagingRing): 16 and 64 MiB wrote
# alike on an H200 (~8 GB/s), so the smaller one, less mapped memory held.
STAGING_SLOT = 16 << 20
STEPS_PER_SUBMIT = 8  # most generation steps encoded into one command buffer (run_steps)
GEN_CAPACITY = 1024  # generated ids the GPU list holds before it is grown
_ALIGN = 256  # storage binding offsets are multiples of this on every device (WebGPU maximum)
_MAX_WORKGROUPS = 65535
NORM_SHIFT_VEC4 = 64  # output vec4s per norm_shift workgroup (shaders/timemix.wgsl: NS_VEC4)


class EngineError(RuntimeError):
    """The engine cannot run this model with these options; the message says why and what to do."""


@dataclass
class Segment:
    """Rows [row0, row0 + rows) of a matrix, stored from word `w_base` of one GPU buffer."""
    buffer: object
    w_base: int
    row0: int
    rows: int


@dataclass
class Matrix:
    """A weight matrix [M, K] on the GPU: its format there, its row pitch, where its rows are.

    Small matrices of a block share buffers (stacked at load, so the "proj" fusion can run
    several in one dispatch); a matrix bigger than one binding is split by rows over buffers.
    """
    name: str
    fmt: str  # GPU format: one of kernels.GPU_FORMATS (F32 ... Q8_0, Q4_0, Q4_K, Q5_K, Q6_K)
    M: int
    K: int
    row_words: int
    segments: list[Segment]


@dataclass
class _Product:
    """One matrix product of the forward pass: Y[y_off + t*y_stride + m] (+)= act(W X[x_off + t*K] + bias)."""
    mat: Matrix
    x: object
    x_off: int  # floats
    y: object
    y_off: int  # floats
    y_stride: int
    act: str = "none"
    bias: str | None = None  # name of a 1-D tensor in the vectors buffer
    accum: bool = False


class _Slots:
    """One GPU buffer holding several [Tm, width] activations ("slots") at 256-byte aligned
    offsets: stacked products write all their outputs into one binding."""
    def __init__(self, device, name: str, Tm: int, widths: dict[str, int], usage) -> None:
        self.offsets: dict[str, int] = {}
        self.widths = dict(widths)
        self.Tm = Tm
        offset = 0
        for slot, width in widths.items():
            self.offsets[slot] = offset
            offset = _align(offset + Tm * width * 4)
        self.buffer = device.create_buffer(label=name, size=max(offset, 16), usage=usage)

    def floats(self, slot: str) -> int:
        """Offset of the slot in floats."""
        return self.offsets[slot] // 4

    def range(self, slot: str) -> tuple:
        """(buffer, byte offset, size) of the slot, for a binding."""
        return (self.buffer, self.offsets[slot], self.Tm * self.widths[slot] * 4)


@dataclass
class GenerateStats:
    """Timing of the last `generate` call (the prefill is waited for, so the split is honest)."""
    n_prompt: int
    n_generated: int
    prefill_seconds: float
    generate_seconds: float


@dataclass
class _Op:
    """One step of the forward pass: a label and how to dispatch it for T tokens."""
    label: str
    dispatches: Callable[[int], list[Dispatch]]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _align(n: int) -> int:
    return _ceil_div(n, _ALIGN) * _ALIGN


# ----------------------------------------------------------------------------------------------
# Loading


# The phases of a load, in the order they start. Those of the calling thread follow one another
# (their sum is Engine.load_seconds); "upload" and "pipelines" run beside them where the runtime
# allows (see LoadPhases), "scan" always.
LOAD_PHASES = {
    "adapter": "pick the adapter (once per process)",
    "file": "open the GGUF file: header, tensor table (memory-mapped)",
    "scan": "the NaN / Inf scan of every float and quant scale (beside the calling thread)",
    "device": "make the device (once per process)",
    "tokenizer": "build the tokenizer from the file's vocab",
    "layout": "place the weights, make their buffers (empty) and the activations",
    "upload": "write the weights (beside the calling thread on wgpu-native)",
    "tuning": "choose the kernel shapes: the subgroup-size probe (a pipeline and a dispatch)",
    "plan": "build the ops: bind groups; every pipeline starts compiling",
    "pipelines": "compile the pipelines, from the first started to the last ready (beside the calling thread)",
    "wait": "wait for the upload and the pipelines",
}
BACKGROUND_PHASES = ("upload", "pipelines", "scan")


@dataclass
class LoadPhases:
    """Where a load's time went: each phase's (start, end) in seconds from the start of the
    load (LOAD_PHASES names them). The calling thread's phases follow one another and add up
    to Engine.load_seconds. On wgpu-native the weights upload on a thread of their own while
    the subgroup probe runs and the ops are built, and pipelines compile on worker threads
    (rwkvlab.gpu.beside, compute_pipeline), so "upload" and "pipelines" overlap the others;
    "wait" is what is left of them. On Dawn the upload runs inside "wait" and pipelines
    compile on Dawn's own threads."""

    start: float = field(default_factory=time.perf_counter)  # time.perf_counter() at the start
    spans: dict[str, tuple[float, float]] = field(default_factory=dict)
    pipelines_built: int = 0  # pipelines this load compiled (the process keeps them for later loads)
    # The CPU time their threads spent compiling them, added up: about the "pipelines" span
    # when they compiled one at a time (a lock somewhere), several times it when they overlapped.
    # None where the runtime compiles out of sight (Dawn's own threads).
    compile_cpu_seconds: float | None = None

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, t0, time.perf_counter())

    def add(self, name: str, t0: float, t1: float) -> None:
        """Record a phase from perf_counter readings."""
        self.spans[name] = (t0 - self.start, t1 - self.start)

    def seconds(self) -> dict[str, float]:
        """Each phase's duration, in the order the phases started."""
        return {n: t1 - t0 for n, (t0, t1) in sorted(self.spans.items(), key=lambda kv: kv[1][0])}

    def text(self) -> str:
        """One line for people: ``file 0.14 s, layout 0.01 s, ...`` (background phases marked
        with *), then the pipelines built and the CPU time their compiling took."""
        text = ", ".join(f"{n}{'*' if n in BACKGROUND_PHASES else ''} {s:.2f} s" for n, s in self.seconds().items())
        if self.pipelines_built:
            busy = "" if self.compile_cpu_seconds is None else f", {self.compile_cpu_seconds:.2f} s of CPU"
            text += f" ({self.pipelines_built} pipelines{busy})"
        return text


def load(path_or_preset: str | Path, options: Options | None = None, progress: bool = True,
         *, split_bytes: int | None = None) -> "Engine":
    """Load a GGUF file, or a synthetic preset by name ("tiny", "0.1b", ...), onto the GPU.

    `split_bytes` (internal, for tests) lowers the size above which a matrix is split across
    several buffers by rows; the default is the device's max storage binding size.
    """
    from rwkvlab.gguf import nonfinite_counts, read_model, warn_nonfinite
    from rwkvlab.gpu import gpu_for, resolve_options
    from rwkvlab.synth import resolve_model

    phases = LoadPhases()
    with phases.phase("adapter"):
        options = resolve_options(options)
    with phases.phase("file"):
        path = resolve_model(path_or_preset)  # a file, or a preset name (f32, written on first use)
        model = read_model(path, check_values=False)
    # The NaN / Inf scan reads every float and quant scale of the file (~0.8 s for 3 GB): it runs
    # beside the rest of the load, and its warning (read_model's) comes before load returns.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rwkvlab-scan") as pool:
        scan = pool.submit(_timed, nonfinite_counts, model.tensors)
        with phases.phase("device"):
            gpu = gpu_for(options)
        engine = Engine(model, gpu, options, progress=progress, split_bytes=split_bytes, phases=phases)
        bad, t0, t1 = scan.result()
    phases.add("scan", t0, t1)
    warn_nonfinite(path, model.tensors, bad, stacklevel=2)
    engine.load_seconds = time.perf_counter() - phases.start
    return engine


def _timed(fn: Callable, *args) -> tuple[object, float, float]:
    """fn(*args) with the perf_counter readings around it."""
    t0 = time.perf_counter()
    value = fn(*args)
    return value, t0, time.perf_counter()


def _gpu_format(ggml_type: str, policy: str) -> str:
    """The format a matrix takes on the GPU under Options.weights."""
    if policy == "f16":
        return "F16"
    # Every type the GGUF reader accepts has a kernel now; one added there without a kernel
    # would be dequantized to F16 at load, and Engine.weight_formats would record it, so a
    # benchmark says what it really ran.
    return ggml_type if ggml_type in kn.GPU_FORMATS else "F16"


def _row_bytes_on_gpu(t, fmt: str, r0: int, r1: int) -> np.ndarray:
    """Rows [r0, r1) of tensor `t` as the bytes the kernels read in GPU format `fmt`."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    M, K = t.shape
    qtype = GGMLQuantizationType[t.ggml_type]
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    file_row = K // block * block_bytes
    raw = t.raw[r0 * file_row: r1 * file_row].reshape(r1 - r0, file_row)
    if fmt == t.ggml_type:  # the file's blocks (Q8_0 regrouped; rows padded where needed)
        return kn.rows_for_gpu(raw, fmt, K)
    assert fmt == "F16", fmt
    if t.ggml_type == "F32":
        values = raw.view(np.float32)
    else:
        values = dequantize(raw, qtype)
    return values.astype(np.float16).view(np.uint8)


@dataclass
class _UploadSlice:
    """Rows [r0, r1) of tensor `tensor`, to be written at byte `offset` of `buffer`."""
    buffer: object
    offset: int
    tensor: object
    fmt: str
    r0: int
    r1: int

    def bytes(self) -> np.ndarray:
        """The slice as the kernels read it, read from the memory-mapped file (regrouped,
        padded or dequantized when the GPU format asks for it)."""
        return np.ascontiguousarray(_row_bytes_on_gpu(self.tensor, self.fmt, self.r0, self.r1)).reshape(-1)


def _progress_bar(total: int, desc: str, progress: bool):
    """A byte-counting progress bar on stderr (made on the calling thread: a first import of
    tqdm on the upload thread held that thread up by a tenth of a second or more)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                desc=desc, disable=not progress, leave=False)


def _prepared_in_threads(items: list, prepare: Callable, ahead: int | None = None) -> Iterable:
    """(item, prepare(item)) in order, with up to `ahead` items prepared by worker threads
    while the caller consumes earlier ones.

    Loading is a chain of host copies: page-cache reads of the file, the Q8_0 regroup (about
    0.3 s per GB on one core), wgpu's staging copy. NumPy releases the GIL while copying, so
    workers preparing the next slices overlap the main thread's write_buffer calls; `ahead`
    bounds the host memory held to that many slices (UPLOAD_SLICE bytes each)."""
    import os

    workers = max(1, min(8, (os.cpu_count() or 1) - 1))
    ahead = ahead or workers + 2
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rwkvlab-load") as pool:
        pending = [pool.submit(prepare, it) for it in items[:ahead]]
        for i, item in enumerate(items):
            data = pending[i].result()
            pending[i] = None  # drop the reference: the slice is freed once written
            if i + ahead < len(items):
                pending.append(pool.submit(prepare, items[i + ahead]))
            yield item, data


class Engine:
    """RWKV-7 on one wgpu device: prefill, logits, step, greedy generate, reset.

    Attributes: spec (ModelSpec), tokenizer, gpu, options, fusions (the resolved set),
    tuning (kernel shapes), load_seconds, load_phases (LoadPhases: where the load's time went),
    dispatches_per_token (dispatches of one generation step), step_weight_bytes (weight bytes
    one generation step reads), weight_formats (tensor -> format on the GPU), matrices (name ->
    Matrix: where its rows are), last_generate (GenerateStats of the last generate call).
    """
    def __init__(self, model, gpu, options: Options, *, progress: bool = True,
                 split_bytes: int | None = None, phases: LoadPhases | None = None) -> None:
        if options.path not in KERNEL_PATHS:
            raise OptionsError(f"Engine needs a resolved kernel path, got {options.path!r}; "
                               "load() resolves it (rwkvlab.gpu.resolve_options)")
        self.model = model
        self.spec = model.spec
        self.gpu = gpu
        self.options = options  # resolved: what runs is what gets recorded
        self.load_seconds = 0.0
        self.load_phases = phases or LoadPhases()
        # The tuning (its subgroup probe compiles and runs a shader: ~0.3 s on a fresh H200
        # driver) is worked out beside the tokenizer and the layout; the plan waits for it.
        tuning = gpu_runtime.beside(gpu, lambda: kn.choose_tuning(gpu, options.path, options.tuning))
        try:
            self._layout_and_plan(tuning, progress, split_bytes)
        finally:
            tuning.discard()  # waited for already, or an error stopped the load before the plan

    def _layout_and_plan(self, tuning: "gpu_runtime.Pending", progress: bool, split_bytes: int | None) -> None:
        """The rest of __init__: tokenizer, checks, layout, then the upload beside the plan."""
        from rwkvlab.tokenizer import Tokenizer

        model, gpu, options = self.model, self.gpu, self.options

        with self.load_phases.phase("tokenizer"):
            self.tokenizer = Tokenizer.from_model(model)
        self.last_generate: GenerateStats | None = None
        self.path = Path(model.path)
        self._device = gpu.device
        self._queue = gpu.device.queue
        self.fusions = options.fusions  # Options expands 'all' and checks the names
        self._check_model()

        limit = int(gpu.limits.get("max-storage-buffer-binding-size", 128 << 20))
        limit = min(limit, int(gpu.limits.get("max-buffer-size", limit)))
        self.split_bytes = min(limit, split_bytes) if split_bytes else limit
        self.Tm = options.chunk  # tokens the activation buffers hold (one prefill chunk)
        if self.Tm * self.spec.n_vocab * 4 > limit:
            raise EngineError(
                f"chunk={self.Tm} needs a {self.Tm * self.spec.n_vocab * 4 >> 20} MiB logits buffer "
                f"({self.spec.n_vocab} vocab), over this device's {limit >> 20} MiB binding limit; "
                f"use a chunk of at most {limit // (self.spec.n_vocab * 4)}")

        # Buffers are made empty first, so the weights can be written while the subgroup probe
        # runs and the ops are built (bind groups need buffers, not their contents), and while
        # the pipelines the ops ask for compile (encoding needs them, building does not).
        phases = self.load_phases
        with phases.phase("layout"):
            self.weight_formats: dict[str, str] = {}
            slices = self._place_weights()
            self._allocate()
            bar = _progress_bar(self._upload_bytes + self.vecs.size, f"loading {self.path.name}", progress)
        stop = threading.Event()
        upload = gpu_runtime.beside(gpu, lambda: self._write_weights(slices, bar, stop))
        try:
            with phases.phase("tuning"):
                self.tuning = tuning.result()
                self.kernels = kn.kernels_for(gpu, self.tuning)
            with phases.phase("plan"):
                mark = self.kernels.mark()
                self._ops = self._layer_ops()
                self._head = self._head_ops()
                self._plans: dict[tuple, kn.Plan] = {}
                self.dispatches_per_token = len(self.plan(1, head="last", argmax=True))
            with phases.phase("wait"):
                upload.result()
                built = self.kernels.wait(mark)
        except BaseException:
            stop.set()
            upload.discard()
            bar.close()  # where the upload never ran
            raise
        if built:
            phases.add("pipelines", min(k.build.submitted for k in built), max(k.build.ready for k in built))
            if all(k.build.cpu_seconds is not None for k in built):
                phases.compile_cpu_seconds = sum(k.build.cpu_seconds for k in built)
        phases.pipelines_built = len(built)
        # Bytes of weights a generation step reads: every matrix in its GPU format, but of the
        # embedding only its one row (the 1-D vectors are a rounding error next to them).
        self.step_weight_bytes = sum(m.M * m.row_words * 4 for n, m in self.matrices.items()
                                     if n != "token_embd.weight")
        self._queue.submit([])

    # --- checks --------------------------------------------------------------------------------

    def _check_model(self) -> None:
        s = self.spec
        if s.head_size != kn.HEAD_SIZE:
            raise EngineError(f"{self.model.path}: head size {s.head_size}; the wkv kernel keeps "
                              f"rows of {kn.HEAD_SIZE} (every RWKV-7 release uses 64)")
        for name in self._matrix_names():
            K = self.model.tensor(name).shape[1]
            if K % 32:
                raise EngineError(f"{self.model.path}: tensor {name!r} has rows of {K} elements; "
                                  "the kernels need a multiple of 32")

    # --- weights -------------------------------------------------------------------------------

    def _weight_groups(self) -> list[list[str]]:
        """Matrices that share buffers: per block r, k, v and the LoRA downs and ups (stacked
        products, and a LoRA pair in one binding for the lora kernel); every other matrix
        alone. Layer 0 has no value LoRA (its v becomes v_first)."""
        groups = [["token_embd.weight"], ["output.weight"]]
        for i in range(self.spec.n_layer):
            b = f"blk.{i}.time_mix_"
            v = ["v1"] if i > 0 else []
            down = ["receptance", "key", "value", "w1", "a1", *v, "g1"]
            up = ["w2", "a2", *(["v2"] if i > 0 else []), "g2"]
            groups += [[b + n + ".weight" for n in down + up],
                       [b + "output.weight"], [f"blk.{i}.channel_mix_key.weight"],
                       [f"blk.{i}.channel_mix_value.weight"]]
        return groups

    def _matrix_names(self) -> list[str]:
        return [n for g in self._weight_groups() for n in g]

    def _vector_names(self) -> list[str]:
        s = self.spec
        names = ["token_embd_norm.weight", "token_embd_norm.bias", "output_norm.weight", "output_norm.bias"]
        for i in range(s.n_layer):
            b = f"blk.{i}."
            names += [b + n for n in (
                "attn_norm.weight", "attn_norm.bias", "attn_norm_2.weight", "attn_norm_2.bias",
                "time_mix_lerp_fused.weight", "time_mix_w0.weight", "time_mix_a0.weight",
                "time_mix_k_k.weight", "time_mix_k_a.weight", "time_mix_r_k.weight",
                "time_mix_ln.weight", "time_mix_ln.bias", "channel_mix_lerp_k.weight")]
            if i > 0:
                names.append(b + "time_mix_v0.weight")
        return names

    def _layout(self) -> list[tuple[int, list[tuple[str, int, int, int]]]]:
        """Where every matrix row goes: a list of buffers, each (size in words, [(matrix, row0,
        rows, w_base)]). A group's matrices fill buffers in order up to the split size (formats
        may mix: each segment says its own); a matrix that does not fit is continued, by rows,
        in the next buffer. Segments start on 16-byte boundaries (the kernels' vec4 loads)."""
        limit = self.split_bytes // 4
        buffers = []
        for group in self._weight_groups():
            used, segs = 0, []
            for name in group:
                M, K = self.model.tensor(name).shape
                rw = kn.row_words(self.weight_formats[name], K)
                if rw > limit:
                    raise EngineError(f"{self.model.path}: one row of {name!r} ({rw * 4} bytes) "
                                      f"exceeds the device's binding limit of {self.split_bytes} bytes")
                r = 0
                while r < M:
                    fit = (limit - used) // rw
                    if fit == 0:
                        buffers.append((used, segs))
                        used, segs = 0, []
                        continue
                    n = min(M - r, fit)
                    segs.append((name, r, n, used))
                    used = _ceil_div(used + n * rw, 4) * 4
                    r += n
            if segs:
                buffers.append((used, segs))
        return buffers

    def _place_weights(self) -> list["_UploadSlice"]:
        """Every weight's GPU format and place: empty buffers, `matrices`, the vectors' offsets;
        the uploads that will fill them, in order."""
        for name in self._matrix_names():
            t = self.model.tensor(name)
            self.weight_formats[name] = _gpu_format(t.ggml_type, self.options.weights)
        fallback = sorted({self.model.tensor(n).ggml_type for n, f in self.weight_formats.items()
                           if f == "F16" != self.model.tensor(n).ggml_type and self.options.weights == "native"})
        if fallback:
            warnings.warn(f"{self.path.name}: the kernels do not read {', '.join(fallback)} yet; those "
                          "matrices are dequantized to F16 at load (see Engine.weight_formats)", stacklevel=3)
        self.matrices: dict[str, Matrix] = {}
        layout = self._layout()
        self._upload_bytes = sum(words * 4 for words, _ in layout)
        slices = []
        for words, segs in layout:
            buf = self._device.create_buffer(label=f"weights:{segs[0][0]}", size=max(16, words * 4),
                                             usage=gpu_runtime.STORAGE | gpu_runtime.COPY_DST)
            for name, row0, rows, w_base in segs:
                mat = self._matrix(name)
                slices += self._row_slices(buf, w_base, mat, row0, rows)
                mat.segments.append(Segment(buf, w_base, row0, rows))
        self._place_vectors(self._vector_names())
        return slices

    def _write_weights(self, slices: list["_UploadSlice"], bar, stop: threading.Event) -> None:
        """Fill the buffers `_place_weights` made (the "upload" phase; on a thread of its own
        where the runtime allows, so it stops early when `stop` is set) through a staging ring
        (gpu.StagingRing: reused staging buffers, not write_buffer's one per call); closes `bar`."""
        t0 = time.perf_counter()
        # slots no bigger than the whole upload (a tiny model's is a few MB)
        ring = gpu_runtime.StagingRing(self.gpu, min(STAGING_SLOT, _ceil_div(self._upload_bytes + self.vecs.size, 8) * 8))
        try:
            for s, data in _prepared_in_threads(slices, _UploadSlice.bytes):
                if stop.is_set():
                    return
                ring.write(s.buffer, s.offset, data)
                bar.update(data.nbytes)
            vectors = self._vector_data()
            ring.write(self.vecs, 0, vectors)
            bar.update(vectors.nbytes)
        finally:
            ring.close()
            bar.close()
            self.load_phases.add("upload", t0, time.perf_counter())

    def _matrix(self, name: str) -> Matrix:
        if name not in self.matrices:
            M, K = self.model.tensor(name).shape
            fmt = self.weight_formats[name]
            self.matrices[name] = Matrix(name, fmt, M, K, kn.row_words(fmt, K), [])
        return self.matrices[name]

    def _row_slices(self, buf, w_base: int, mat: Matrix, row0: int, rows: int) -> list["_UploadSlice"]:
        """Rows [row0, row0 + rows) of a matrix as uploads of at most UPLOAD_SLICE bytes into
        `buf` from word w_base."""
        t = self.model.tensor(mat.name)
        row_bytes = mat.row_words * 4
        per_slice = max(1, UPLOAD_SLICE // row_bytes)
        return [_UploadSlice(buf, w_base * 4 + (s0 - row0) * row_bytes, t, mat.fmt, s0,
                             min(row0 + rows, s0 + per_slice))
                for s0 in range(row0, row0 + rows, per_slice)]

    def _place_vectors(self, names: list[str]) -> None:
        """All 1-D tensors (and the six lerp mixes) in one f32 buffer, each 256-byte aligned."""
        self._vec_at = {}
        offset = 0
        for n in names:
            size = self.model.tensor(n).n_elements * 4
            self._vec_at[n] = (offset, size)
            offset = _align(offset + size)
            self.weight_formats[n] = "F32"
        self.vecs = self._device.create_buffer(label="vectors", size=max(16, offset),
                                               usage=gpu_runtime.STORAGE | gpu_runtime.COPY_DST)

    def _vector_data(self) -> np.ndarray:
        """The contents of the vectors buffer (`_place_vectors`)."""
        host = np.zeros(self.vecs.size // 4, np.float32)
        for n, (off, size) in self._vec_at.items():
            host[off // 4: (off + size) // 4] = self.model.tensor(n).dequantize().reshape(-1)
        return host

    def _vec(self, name: str) -> tuple:
        """(buffer, byte offset, size) of a 1-D tensor, for a binding."""
        off, size = self._vec_at[name]
        return (self.vecs, off, size)

    def _vec_floats(self, name: str) -> int:
        return self._vec_at[name][0] // 4

    # --- activations and state -----------------------------------------------------------------

    def _allocate(self) -> None:
        """Activation buffers for Tm tokens, the recurrent state, token ids, generated ids.

        The time mix's projections live in two slot buffers: `down` (r, k, v and the LoRA
        hidden vectors, written by the first stack of products) and `up` (decay, in-context
        rate, value mix, gate: written by the second), so a stacked product has one output
        binding and the next stack one input binding.
        """
        s, Tm = self.spec, self.Tm
        C = s.n_embd
        usage = gpu_runtime.STORAGE | gpu_runtime.COPY_SRC | gpu_runtime.COPY_DST
        self._new = []
        self.mix = _Slots(self._device, "mix", Tm, {f"m{j}": C for j in range(6)}, usage)
        self.down = _Slots(self._device, "down", Tm, {
            "r": C, "k": C, "v": C, "wh": s.rank_decay, "ah": s.rank_iclr, "vh": s.rank_value,
            "gh": s.rank_gate}, usage)
        self.up = _Slots(self._device, "up", Tm, {"w": C, "a": C, "vmix": C, "g": C}, usage)
        self._new += [self.mix.buffer, self.down.buffer, self.up.buffer]
        self.buffers: dict[str, object] = {}

        def new(name: str, nbytes: int):
            buf = self._device.create_buffer(label=name, size=_ceil_div(max(nbytes, 16), 16) * 16, usage=usage)
            self.buffers[name] = buf
            self._new.append(buf)
            return buf

        for name, width in {"x": C, "xn": C, "kk": C, "vfirst": C, "y": C, "ffn": s.n_ffn,
                            "logits": s.n_vocab}.items():
            new(name, Tm * width * 4)
        new("tokens", Tm * 4)
        new("att_prev", s.n_layer * C * 4)
        new("ffn_prev", s.n_layer * C * 4)
        new("wkv", s.n_layer * s.n_head * kn.HEAD_SIZE * kn.HEAD_SIZE * 4)
        self.gen_capacity = GEN_CAPACITY
        new("gen", (1 + self.gen_capacity) * 4)
        self.run = self._device.create_buffer(label="run", size=16,
                                              usage=gpu_runtime.UNIFORM | gpu_runtime.COPY_DST)
        self._readback_size = 0
        self._ensure_readback(max(Tm * s.n_vocab * 4, (1 + self.gen_capacity) * 4))
        # Never-written buffers read as garbage (and some writes to them can be lost): clear all.
        enc = self._device.create_command_encoder()
        for buf in self._new:
            enc.clear_buffer(buf)
        self._queue.submit([enc.finish()])
        self._run_T = None

    def _ensure_readback(self, nbytes: int) -> None:
        if nbytes > self._readback_size:
            self._readback_size = _ceil_div(nbytes, 16) * 16
            self._readback = self._device.create_buffer(
                label="readback", size=self._readback_size,
                usage=gpu_runtime.MAP_READ | gpu_runtime.COPY_DST)

    def _layer_range(self, name: str, i: int, width: int) -> tuple:
        return (self.buffers[name], i * width * 4, width * 4)

    # --- the kernel plan -----------------------------------------------------------------------

    def _one_row_per_group(self, table: list[kn.MatSegment]) -> bool:
        """Whether a mat-vec dispatch runs one row per group of lanes instead of the tuning's
        matvec_rows: when it has fewer rows than Tuning.matvec_rows_from and no K-quant or
        Q4_0 segment with rows longer than Tuning.matvec_quant_short_k. Measured on an H100
        (docs/perf-notes.md, change 12): 2560-row Q8_0, F16 and F32 products run faster with
        the workgroups one row per group gives; the 4-6 bit formats ran faster with two rows
        sharing each load of x. Rows per group change no sum (each row keeps its pieces and
        its reduction)."""
        t = self.kernels.tuning
        rows = sum(s.rows for s in table)
        return rows < t.matvec_rows_from and all(s.fmt not in qk.LAYOUTS or s.K <= t.matvec_quant_short_k
                                                 for s in table)

    def _one_row_constants(self, table: list[kn.MatSegment]) -> dict:
        """The one-row variant's pipeline constants: NR 1, and Tuning.matvec_small_wg threads
        per workgroup where set and the dispatch holds at most Tuning.matvec_small_weights
        weights (where that is set). Measured on an H200 (docs/perf-notes.md): 64 threads, twice
        the workgroups, ran the 0.1b model's products (at most 2.4 M weights each) 9.6% faster
        and the 2.9B model's (6.6 M and up) 2% slower."""
        t = self.kernels.tuning
        small = t.matvec_small_wg and (not t.matvec_small_weights
                                       or sum(s.rows * s.K for s in table) <= t.matvec_small_weights)
        return {"NR": 1, **({"WG": t.matvec_small_wg} if small else {})}

    def _matmul(self, label: str, products: list[_Product], fused: bool = False) -> _Op:
        """Matrix products as dispatches: unfused, one per (product, weight buffer); fused, one
        per weight buffer for all products (they must share X and Y; formats may differ).
        matvec below Options.gemm_min_tokens tokens, gemm (or gemm_sgmat) from there; all take
        the same bind group."""
        k = self.kernels
        runs: list[list[tuple[_Product, Segment]]] = []  # each run becomes one dispatch
        by_buffer: dict[int, list] = {}
        for p in products:
            for seg in p.mat.segments:
                if fused:
                    by_buffer.setdefault(id(seg.buffer), []).append((p, seg))
                else:
                    runs.append([(p, seg)])
        for items in by_buffer.values():
            runs += [items[i: i + kn.MAX_SEGMENTS] for i in range(0, len(items), kn.MAX_SEGMENTS)]

        groups = []
        for items in runs:
            p0, seg0 = items[0]
            assert all(p.x is p0.x and p.y is p0.y and s.buffer is seg0.buffer for p, s in items)
            table = [kn.MatSegment(
                rows=seg.rows, K=p.mat.K, row_words=p.mat.row_words, w_base=seg.w_base,
                x_off=p.x_off, y_off=p.y_off + seg.row0, y_stride=p.y_stride, act=p.act,
                bias=None if p.bias is None else self._vec_floats(p.bias) + seg.row0,
                accum=p.accum, fmt=p.mat.fmt, matrix_rows=p.mat.M) for p, seg in items]
            fmt = kn.matmul_fmt(table)
            # one pipeline per product: the one-row variant where it applies (no unused default)
            matvec = k.kernel(kn.MATVEC, FMT=fmt, **(self._one_row_constants(table) if self._one_row_per_group(table) else {}))
            # prefill tiles on the matrix units where the tuning says so (Tuning.gemm_sgmat)
            gemm = k.kernel(kn.GEMM_SGMAT if k.tuning.gemm_sgmat else kn.GEMM, FMT=fmt)
            shape = kn.MatvecShape.of(matvec, k.tuning)
            params, wgs, tiles = kn.matmul_params(table, shape, kn.gemm_tile_rows(gemm))
            res = dict(W=seg0.buffer, X=p0.x, B=self.vecs, Y=p0.y)
            bg = k.bind(kn.MATVEC, self.run, params, res, label=label)
            groups.append((matvec, gemm, bg, wgs, tiles))
        gemm_min = self.options.gemm_min_tokens

        def dispatches(T: int) -> list[Dispatch]:
            out = []
            for matvec, gemm, bg, wgs, tiles in groups:
                if T < gemm_min:
                    out.append(Dispatch(matvec, bg, (wgs, T, 1), label))
                else:
                    out.append(Dispatch(gemm, bg, kn.gemm_grid(tiles, T, kn.gemm_tile_tokens(gemm)), label))
            return out

        return _Op(label, dispatches)

    def _products(self, label: str, products: list[_Product]) -> list[_Op]:
        """Ops for products that read one buffer and write another: with the "proj" fusion one
        op (a dispatch per weight buffer they occupy, usually one), else one op per product."""
        if "proj" in self.fusions:
            return [self._matmul(label, products, fused=True)]
        return [self._matmul(f"{label}.{p.mat.name.split('.')[-2].removeprefix('time_mix_')}", [p])
                for p in products]

    def _simple(self, label: str, spec: kn.KernelSpec, params: dict, res: dict,
                grid: Callable[[int], tuple[int, int, int]], **constants) -> _Op:
        kernel = self.kernels.kernel(spec, **constants)
        bg = self.kernels.bind(spec, self.run, params, res, label=label)
        return _Op(label, lambda T: [Dispatch(kernel, bg, grid(T), label)])

    def _layernorm(self, label: str, x, y, norm: str, last_only: bool = False) -> _Op:
        s = self.spec
        params = dict(C=s.n_embd, last_only=int(last_only), eps=s.eps)
        res = dict(X=x, NW=self._vec(norm + ".weight"), NB=self._vec(norm + ".bias"), Y=y)
        grid = (lambda T: (1, 1, 1)) if last_only else (lambda T: (T, 1, 1))
        return self._simple(label, kn.LAYERNORM, params, res, grid)

    def _norm_shift(self, label: str, norm: str, prev: tuple, lerp: str, nmix: int) -> list[_Op]:
        """LayerNorm of x into xn, then the token shift into the mix slots: two ops, or with
        the "norm_shift" fusion one op that is a single dispatch for one-token steps."""
        s, C = self.spec, self.spec.n_embd
        shift_wg = dict(self.kernels.kernel(kn.SHIFT_MIX).constants)["WG"]
        norm_op = self._layernorm(label + ".norm", self.buffers["x"], self.buffers["xn"], norm)
        shift_op = self._simple(
            label + ".shift", kn.SHIFT_MIX, dict(C=C, slot=self.Tm * C),
            dict(XN=self.buffers["xn"], PREV=prev, LERP=self._vec(lerp), OUT=self.mix.buffer),
            lambda T: (_ceil_div(C // 4, shift_wg), 1, 1), NMIX=nmix)
        if "norm_shift" not in self.fusions:
            return [norm_op, shift_op]
        fused = self._simple(
            label + ".norm_shift", kn.NORM_SHIFT, dict(C=C, slot=self.Tm * C, eps=s.eps),
            dict(NX=self.buffers["x"], NW=self._vec(norm + ".weight"), NB=self._vec(norm + ".bias"),
                 NPREV=prev, NLERP=self._vec(lerp), NOUT=self.mix.buffer),
            lambda T: (_ceil_div(C // 4, NORM_SHIFT_VEC4), 1, 1), NMIX=nmix)

        def dispatches(T: int) -> list[Dispatch]:
            if T == 1:
                return fused.dispatches(T)
            return norm_op.dispatches(T) + shift_op.dispatches(T)

        return [_Op(label + ".norm_shift", dispatches)]

    def _kv(self, L: str, i: int) -> list[_Op]:
        """The key/value pack: kv_prep (the "kv" fusion) or its three parts, each a dispatch."""
        s, B, b = self.spec, self.buffers, f"blk.{i}."
        dn, up = self.down, self.up
        res = dict(K=dn.range("k"), V=dn.range("v"), KK=B["kk"], A=up.range("a"), VMIX=up.range("vmix"),
                   VF=B["vfirst"], KKW=self._vec(b + "time_mix_k_k.weight"),
                   KAW=self._vec(b + "time_mix_k_a.weight"))
        grid = lambda T: (s.n_head, T, 1)  # noqa: E731
        if "kv" in self.fusions:
            return [self._simple(L + "att.kv_prep", kn.KV_PREP, dict(C=s.n_embd), res, grid, FIRST=i == 0)]
        return [self._simple(L + f"att.{name}", kn.KV_PREP, dict(C=s.n_embd), res, grid, FIRST=i == 0, PART=part)
                for part, name in ((1, "kk_norm"), (2, "k_update"), (3, "v_residual"))]

    def _wkv(self, L: str, i: int) -> list[_Op]:
        """The key/value pack, the state update, GroupNorm + bonus + gate: kv ops (see _kv),
        wkv, groupnorm_out; with the "wkv" fusion the last two are wkv_fused, which with "kv"
        also does the pack (one dispatch in all). On the native path a prefill chunk (T > 1)
        runs kv ops, wkv_prefill (state rows over the whole GPU) and groupnorm_out instead, with
        and without the fusions, so fused and unfused plans keep the same state and output."""
        s, B, b = self.spec, self.buffers, f"blk.{i}."
        C, H = s.n_embd, s.n_head
        dn, up = self.down, self.up
        state = self._layer_range("wkv", i, H * kn.HEAD_SIZE * kn.HEAD_SIZE)
        prep = "kv" in self.fusions and "wkv" in self.fusions
        chunks = self.kernels.tuning.subgroups  # prefill chunks run wkv_prefill (native path)
        # Ops are built (bind groups made, pipelines compiled) only where some plan runs them.
        kv_ops = self._kv(L, i) if chunks or not prep else []
        wkv_res = dict(R=dn.range("r"), DECAY=up.range("w"), K=dn.range("k"), V=dn.range("v"),
                       KK=B["kk"], A=up.range("a"), S=state, Y=B["y"])
        groupnorm = None
        if chunks or "wkv" not in self.fusions:
            groupnorm = self._simple(
                L + "att.groupnorm", kn.GROUPNORM_OUT, dict(C=C),
                dict(GY=B["y"], R=dn.range("r"), K=dn.range("k"), V=dn.range("v"), G=up.range("g"),
                     LNW=self._vec(b + "time_mix_ln.weight"), LNB=self._vec(b + "time_mix_ln.bias"),
                     RK=self._vec(b + "time_mix_r_k.weight")),
                lambda T: (H, T, 1))
        if "wkv" in self.fusions:
            params = dict(C=C, r=dn.floats("r"), k=dn.floats("k"), v=dn.floats("v"), w=up.floats("w"),
                          a=up.floats("a"), vmix=up.floats("vmix"), g=up.floats("g"),
                          kkw=self._vec_floats(b + "time_mix_k_k.weight"),
                          kaw=self._vec_floats(b + "time_mix_k_a.weight"),
                          rk=self._vec_floats(b + "time_mix_r_k.weight"),
                          lnw=self._vec_floats(b + "time_mix_ln.weight"),
                          lnb=self._vec_floats(b + "time_mix_ln.bias"))
            res = dict(DOWN=dn.buffer, UP=up.buffer, VEC=self.vecs, FVF=B["vfirst"], FS=state, FY=B["y"],
                       FKK=B["kk"])
            step = ([] if prep else kv_ops) + [self._simple(L + "att.wkv_fused", kn.WKV_FUSED, params, res,
                                                            lambda T: (H, 1, 1), FIRST=i == 0, PREP=prep)]
        else:
            step = kv_ops + [self._simple(L + "att.wkv", kn.WKV, dict(C=C), wkv_res, lambda T: (H, 1, 1)),
                             groupnorm]
        if not chunks:
            return step
        kernel = self.kernels.kernel(kn.WKV_PREFILL)
        grid = kn.wkv_prefill_grid(kernel, C)
        chunk = kv_ops + [self._simple(L + "att.wkv_prefill", kn.WKV_PREFILL, dict(C=C), wkv_res,
                                       lambda T: grid), groupnorm]

        def dispatches(T: int) -> list[Dispatch]:
            return [d for op in (chunk if T > 1 else step) for d in op.dispatches(T)]

        return [_Op(L + "att.wkv", dispatches)]

    def _loras(self, L: str, main: list[_Product], pairs: list[tuple[_Product, _Product]]) -> list[_Op]:
        """The r/k/v products and the LoRA pairs: down stack then up stack (see _products); with
        the "lora" fusion, one-token steps (T < gemm_min_tokens) run each pair as one lora
        dispatch instead (with "proj": one for all pairs), the gemm plan stays as it is."""
        downs = main + [d for d, _ in pairs]
        ups = [u for _, u in pairs]
        plain = self._products(L + "att.down", downs) + self._products(L + "att.up", ups)
        if "lora" not in self.fusions:
            return plain
        fusable = [(d, u) for d, u in pairs if self._lora_fusable(d, u)]
        rest = [pr for pr in pairs if pr not in fusable]
        step = self._products(L + "att.down", main + [d for d, _ in rest])
        if rest:
            step += self._products(L + "att.up", [u for _, u in rest])
        groups = [fusable] if "proj" in self.fusions else [[pr] for pr in fusable]
        step += [self._lora(L + "att.lora", g) for g in groups if g]
        gemm_min = self.options.gemm_min_tokens

        def dispatches(T: int) -> list[Dispatch]:
            ops = step if T < gemm_min else plain
            return [d for op in ops for d in op.dispatches(T)]

        return [_Op(L + "att.lora", dispatches)]

    def _lora_fusable(self, down: _Product, up: _Product) -> bool:
        """A pair the lora kernel can take: each matrix whole in one buffer, the same buffer."""
        d, u = down.mat.segments, up.mat.segments
        return (len(d) == len(u) == 1 and d[0].buffer is u[0].buffer and down.y is up.x
                and down.mat.M == up.mat.K <= kn.LORA_MAX_RANK)

    def _lora(self, label: str, pairs: list[tuple[_Product, _Product]]) -> _Op:
        """One lora dispatch for these pairs (same weight buffer, same input and output buffers)."""
        k = self.kernels
        table = []
        for down, up in pairs:
            dseg, useg = down.mat.segments[0], up.mat.segments[0]
            table.append((
                kn.MatSegment(rows=down.mat.M, K=down.mat.K, row_words=down.mat.row_words,
                              w_base=dseg.w_base, x_off=down.x_off, y_off=0, y_stride=0,
                              act=down.act, fmt=down.mat.fmt),
                kn.MatSegment(rows=up.mat.M, K=up.mat.K, row_words=up.mat.row_words, w_base=useg.w_base,
                              x_off=0, y_off=up.y_off, y_stride=up.y_stride, act=up.act,
                              bias=None if up.bias is None else self._vec_floats(up.bias),
                              accum=up.accum, fmt=up.mat.fmt)))
        d0, u0 = pairs[0]
        assert all(d.x is d0.x and u.y is u0.y for d, u in pairs)
        kernel = k.kernel(kn.LORA, FMT=kn.matmul_fmt([s for pr in table for s in pr]))
        params, wgs = kn.lora_params(table, dict(kernel.constants)["LROWS"],
                                     kn.MatvecShape.of(kernel, k.tuning))
        bg = k.bind(kn.LORA, self.run, params,
                    dict(W=d0.mat.segments[0].buffer, X=d0.x, B=self.vecs, Y=u0.y), label=label)
        return _Op(label, lambda T: [Dispatch(kernel, bg, (wgs, T, 1), label)])

    def _layer_ops(self) -> list[_Op]:
        """The forward pass of every block as ops; with no fusion, one op per dispatch (a
        matrix split over several buffers adds one dispatch per extra buffer)."""
        s, B, m = self.spec, self.buffers, self.matrices
        C = s.n_embd
        mix, dn, up = self.mix, self.down, self.up
        ops = [self._embed_op()]
        for i in range(s.n_layer):
            b, L = f"blk.{i}.", f"L{i}."

            def tm(name: str) -> Matrix:
                return m[b + f"time_mix_{name}.weight"]

            def into(slots: _Slots, slot: str) -> dict:
                return dict(y=slots.buffer, y_off=slots.floats(slot), y_stride=slots.widths[slot])

            def frm(slots: _Slots, slot: str) -> dict:
                return dict(x=slots.buffer, x_off=slots.floats(slot))

            ops += self._norm_shift(L + "att", b + "attn_norm", self._layer_range("att_prev", i, C),
                                    b + "time_mix_lerp_fused.weight", 6)
            # mix slots: 0 r, 1 w, 2 k, 3 v, 4 a, 5 g (the order of lerp_fused)
            down = [
                _Product(tm("receptance"), **frm(mix, "m0"), **into(dn, "r")),
                _Product(tm("key"), **frm(mix, "m2"), **into(dn, "k")),
                _Product(tm("value"), **frm(mix, "m3"), **into(dn, "v")),
                _Product(tm("w1"), **frm(mix, "m1"), **into(dn, "wh"), act="tanh"),
                _Product(tm("a1"), **frm(mix, "m4"), **into(dn, "ah")),
                *([_Product(tm("v1"), **frm(mix, "m3"), **into(dn, "vh"))] if i > 0 else []),
                _Product(tm("g1"), **frm(mix, "m5"), **into(dn, "gh"), act="sigmoid"),
            ]
            ups = [
                _Product(tm("w2"), **frm(dn, "wh"), **into(up, "w"), act="decay", bias=b + "time_mix_w0.weight"),
                _Product(tm("a2"), **frm(dn, "ah"), **into(up, "a"), act="sigmoid", bias=b + "time_mix_a0.weight"),
                *([_Product(tm("v2"), **frm(dn, "vh"), **into(up, "vmix"), act="sigmoid",
                            bias=b + "time_mix_v0.weight")] if i > 0 else []),
                _Product(tm("g2"), **frm(dn, "gh"), **into(up, "g")),
            ]
            ops += self._loras(L, down[:3], list(zip(down[3:], ups)))
            ops += self._wkv(L, i)
            ops.append(self._matmul(L + "att.out", [_Product(
                tm("output"), B["y"], 0, B["x"], 0, C, accum=True)]))
            ops += self._norm_shift(L + "ffn", b + "attn_norm_2", self._layer_range("ffn_prev", i, C),
                                    b + "channel_mix_lerp_k.weight", 1)
            ffn = "ffn" in self.fusions
            ops.append(self._matmul(L + "ffn.key", [_Product(
                m[b + "channel_mix_key.weight"], mix.buffer, mix.floats("m0"), B["ffn"], 0, s.n_ffn,
                act="relu_sq" if ffn else "none")]))
            if not ffn:
                ops.append(self._simple(
                    L + "ffn.relu_sq", kn.ACTIVATE, dict(n=s.n_ffn, act=kn.ACTIVATIONS["relu_sq"]),
                    dict(AX=B["ffn"]), lambda T: (_ceil_div(s.n_ffn, 64), T, 1)))
            ops.append(self._matmul(L + "ffn.value", [_Product(
                m[b + "channel_mix_value.weight"], B["ffn"], 0, B["x"], 0, C, accum=True)]))
        return ops

    def _embed_op(self) -> _Op:
        s = self.spec
        mat = self.matrices["token_embd.weight"]
        kernel = self.kernels.kernel(kn.EMBED, FMT=kn.GPU_FORMATS[mat.fmt])
        groups = []
        for seg in mat.segments:
            params = dict(C=s.n_embd, row0=seg.row0, rows=seg.rows, row_words=mat.row_words,
                          w_base=seg.w_base, eps=s.eps)
            res = dict(W=seg.buffer, TOK=self.buffers["tokens"], NW=self._vec("token_embd_norm.weight"),
                       NB=self._vec("token_embd_norm.bias"), Y=self.buffers["x"])
            groups.append(self.kernels.bind(kn.EMBED, self.run, params, res, label="embed"))
        return _Op("embed", lambda T: [Dispatch(kernel, bg, (T, 1, 1), "embed") for bg in groups])

    def _head_ops(self) -> dict[str, _Op]:
        s, B = self.spec, self.buffers
        head = _Product(self.matrices["output.weight"], B["xn"], 0, B["logits"], 0, s.n_vocab)
        return {
            "norm_all": self._layernorm("head.norm", B["x"], B["xn"], "output_norm"),
            "norm_last": self._layernorm("head.norm", B["x"], B["xn"], "output_norm", last_only=True),
            "head": self._matmul("head", [head]),
            "argmax": self._argmax_op(),
        }

    def _argmax_op(self) -> _Op:
        params = dict(V=self.spec.n_vocab, cap=self.gen_capacity)
        res = dict(L=self.buffers["logits"], TOK=self.buffers["tokens"], GEN=self.buffers["gen"])
        return self._simple("argmax", kn.ARGMAX, params, res, lambda T: (1, 1, 1))

    def plan(self, T: int, head: str = "last", argmax: bool = False) -> kn.Plan:
        """The dispatches for a chunk of T tokens (built once per shape, then cached).

        head: "none" (state only), "last" (logits of the last token, in row 0) or "all"
        (logits of every token). argmax appends greedy sampling (needs head="last").
        """
        key = (T, head, argmax)
        if key not in self._plans:
            if not 1 <= T <= self.Tm:
                raise EngineError(f"a chunk of {T} tokens; this engine holds 1..{self.Tm} (Options.chunk)")
            plan = [d for op in self._ops for d in op.dispatches(T)]
            if head == "all":
                plan += self._head["norm_all"].dispatches(T) + self._head["head"].dispatches(T)
            elif head == "last":
                plan += self._head["norm_last"].dispatches(T) + self._head["head"].dispatches(1)
            elif head != "none":
                raise ValueError(f"head must be 'none', 'last' or 'all', not {head!r}")
            if argmax:
                if head != "last":
                    raise ValueError("argmax samples the last token's logits: use head='last'")
                plan += self._head["argmax"].dispatches(1)
            for d in plan:
                if max(d.workgroups) > _MAX_WORKGROUPS:
                    raise EngineError(f"{d.label}: {d.workgroups} workgroups for a chunk of {T} tokens "
                                      f"exceed the per-dimension limit of {_MAX_WORKGROUPS}; use a "
                                      "smaller Options.chunk")
            self._plans[key] = kn.Plan(plan)
        return self._plans[key]

    # --- running -------------------------------------------------------------------------------

    def _set_T(self, T: int) -> None:
        if T != self._run_T:
            self._queue.write_buffer(self.run, 0, np.array([T, 0, 0, 0], np.uint32))
            self._run_T = T

    def _check_tokens(self, tokens: Iterable[int]) -> np.ndarray:
        ids = np.asarray(list(tokens), dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.spec.n_vocab):
            bad = int(ids[(ids < 0) | (ids >= self.spec.n_vocab)][0])
            raise ValueError(f"token id {bad} is outside the vocab (0..{self.spec.n_vocab - 1})")
        return ids.astype(np.uint32)

    def _chunks(self, ids: np.ndarray) -> list[np.ndarray]:
        return [ids[i: i + self.Tm] for i in range(0, len(ids), self.Tm)]

    def _submit(self, chunk: np.ndarray, head: str, argmax: bool = False, copy: tuple | None = None) -> None:
        """Run one chunk: its token ids, T, one compute pass, an optional copy, one submit."""
        self._queue.write_buffer(self.buffers["tokens"], 0, chunk)
        self._set_T(len(chunk))
        enc = self._device.create_command_encoder()
        cp = enc.begin_compute_pass()
        kn.encode(cp, self.plan(len(chunk), head, argmax))
        cp.end()
        if copy is not None:
            src, offset, nbytes = copy
            enc.copy_buffer_to_buffer(src, offset, self._readback, 0, nbytes)
        self._queue.submit([enc.finish()])

    def _read(self, nbytes: int, dtype) -> np.ndarray:
        """Map the readback buffer (after a submit that copied into it) and copy out."""
        self._readback.map_sync(gpu_runtime.MAP_MODE_READ, 0, _ceil_div(nbytes, 4) * 4)
        try:
            data = np.frombuffer(self._readback.read_mapped(0, nbytes), dtype=dtype).copy()
        finally:
            self._readback.unmap()
        return data

    def _copy_and_read(self, src, offset: int, nbytes: int, dtype) -> np.ndarray:
        enc = self._device.create_command_encoder()
        enc.copy_buffer_to_buffer(src, offset, self._readback, 0, nbytes)
        self._queue.submit([enc.finish()])
        return self._read(nbytes, dtype)

    def wait(self) -> None:
        """Wait until the GPU has run everything submitted so far (a 4-byte read)."""
        self._copy_and_read(self.buffers["gen"], 0, 4, np.uint32)

    def reset(self) -> None:
        """Zero the recurrent state: the next token starts a new sequence."""
        enc = self._device.create_command_encoder()
        for name in ("att_prev", "ffn_prev", "wkv"):
            enc.clear_buffer(self.buffers[name])
        self._queue.submit([enc.finish()])

    def prefill(self, tokens: Iterable[int]) -> np.ndarray:
        """Feed tokens (continuing from the state) in chunks; the last token's logits [V] float32."""
        ids = self._check_tokens(tokens)
        if not ids.size:
            raise ValueError("prefill needs at least one token")
        chunks = self._chunks(ids)
        V = self.spec.n_vocab
        for chunk in chunks[:-1]:
            self._submit(chunk, "none")
        self._submit(chunks[-1], "last", copy=(self.buffers["logits"], 0, V * 4))
        return self._read(V * 4, np.float32)

    def step(self, token: int) -> np.ndarray:
        """Feed one token; the logits [V] float32 for the next one."""
        return self.prefill([token])

    def logits(self, tokens: Iterable[int]) -> np.ndarray:
        """Feed tokens (continuing from the state); the logits after every one of them, [T, V]."""
        ids = self._check_tokens(tokens)
        V = self.spec.n_vocab
        rows = []
        for chunk in self._chunks(ids):
            self._submit(chunk, "all", copy=(self.buffers["logits"], 0, len(chunk) * V * 4))
            rows.append(self._read(len(chunk) * V * 4, np.float32).reshape(len(chunk), V))
        return np.concatenate(rows) if rows else np.zeros((0, V), np.float32)

    def _ensure_gen_capacity(self, n: int) -> None:
        if n <= self.gen_capacity:
            return
        self.gen_capacity = max(n, 2 * self.gen_capacity)
        buf = self._device.create_buffer(
            label="gen", size=(1 + self.gen_capacity) * 4,
            usage=gpu_runtime.STORAGE | gpu_runtime.COPY_SRC | gpu_runtime.COPY_DST)
        self.buffers["gen"] = buf
        self._head["argmax"] = self._argmax_op()
        self._plans = {k: v for k, v in self._plans.items() if not k[2]}
        self._ensure_readback((1 + self.gen_capacity) * 4)

    def run_steps(self, step: kn.Plan, n: int) -> None:
        """Submit `n` one-token steps of a plan (T = 1 must be set) without waiting: how
        generate runs them, and what rwkvlab.profile.ablate times with ops left out or repeated.

        The GPU idles until the first command buffer is encoded, so the first holds one step,
        the next two, then four, up to STEPS_PER_SUBMIT: the GPU starts after one step's
        encoding instead of eight (a 2.9B step is 260 dispatches, ~0.5 ms to encode), and the
        encoding of each later buffer overlaps the GPU's work on the ones before."""
        left, k = n, 1
        while left > 0:
            k = min(left, k)
            enc = self._device.create_command_encoder()
            for _ in range(k):
                cp = enc.begin_compute_pass()
                kn.encode(cp, step)
                cp.end()
            self._queue.submit([enc.finish()])
            left -= k
            k = min(2 * k, STEPS_PER_SUBMIT)

    def generate(self, prompt_tokens: Iterable[int], n: int) -> list[int]:
        """Greedy: prefill the prompt (continuing from the state), then n tokens.

        Sampling stays on the GPU: argmax writes each id where the next step's embedding
        gather reads it and appends it to a GPU list; steps are encoded up to STEPS_PER_SUBMIT
        to a submit (run_steps), and the ids are read back once at the end. As in
        Reference.generate, the last id is not fed back (the state has seen the prompt and the
        first n - 1 ids).
        """
        ids = self._check_tokens(prompt_tokens)
        if not ids.size:
            raise ValueError("generate needs a non-empty prompt (start with token 0, <s>, if nothing else)")
        if n <= 0:
            t0 = time.perf_counter()
            self.prefill(ids)
            self.last_generate = GenerateStats(len(ids), 0, time.perf_counter() - t0, 0.0)
            return []
        self._ensure_gen_capacity(n)
        t0 = time.perf_counter()
        self._queue.write_buffer(self.buffers["gen"], 0, np.zeros(4, np.uint32))
        chunks = self._chunks(ids)
        for chunk in chunks[:-1]:
            self._submit(chunk, "none")
        # Waiting for the prompt (a 4-byte read) costs one round trip and makes the split honest.
        self._submit(chunks[-1], "last", argmax=True, copy=(self.buffers["gen"], 0, 4))
        self._read(4, np.uint32)
        t1 = time.perf_counter()
        self._set_T(1)
        self.run_steps(self.plan(1, "last", argmax=True), n - 1)
        out = self._copy_and_read(self.buffers["gen"], 4, n * 4, np.uint32)
        t2 = time.perf_counter()
        self.last_generate = GenerateStats(len(ids), n, t1 - t0, t2 - t1)
        return [int(t) for t in out]


# ----------------------------------------------------------------------------------------------
# `rwkvlab generate`


def cli_generate(args) -> int:
    """`rwkvlab generate`: load, prefill the prompt, generate greedily; text to stdout, speeds
    to stderr. Bad options, no adapter or a bad file: one line on stderr, exit code 2."""
    from rwkvlab.gguf import GGUFError
    from rwkvlab.gpu import NoAdapterError
    from rwkvlab.options import from_args
    from rwkvlab.synth import model_from_args

    try:
        options = from_args(args)
        if args.n < 0:
            raise OptionsError(f"-n must be >= 0, got {args.n}")
        engine = load(model_from_args(args), options, progress=True)
        prompt = engine.tokenizer.encode(args.prompt)
        if not prompt:
            prompt = [0]  # an empty prompt starts from <s>
        ids = engine.generate(prompt, args.n)
    except (OptionsError, NoAdapterError, GGUFError, EngineError, ValueError, OSError, RuntimeError) as e:
        # wgpu's own errors span several lines ("Caused by: ..."): keep them on one
        print(f"rwkvlab generate: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(args.prompt + engine.tokenizer.decode(ids))
    st = engine.last_generate
    # the first id comes with the prompt's logits; the timed steps produce the other n - 1
    steps = st.n_generated - 1
    gen_rate = steps / st.generate_seconds if steps > 0 and st.generate_seconds > 0 else 0.0
    print(f"load {engine.load_seconds:.2f} s | prefill {st.n_prompt} tok at "
          f"{st.n_prompt / st.prefill_seconds:.1f} tok/s | generate {st.n_generated} tok at "
          f"{gen_rate:.1f} tok/s | {engine.gpu.info.label} on {engine.gpu.runtime}, "
          f"{engine.dispatches_per_token} dispatches/token",
          file=sys.stderr)
    print(f"load phases: {engine.load_phases.text()} (*: beside the others)", file=sys.stderr)
    return 0
