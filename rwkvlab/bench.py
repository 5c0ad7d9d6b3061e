"""`rwkvlab bench`: time one engine configuration and prove its output right, in one record.

The protocol (the README quotes it; ``rwkvlab bench --help`` states it too):

1. **Prompt.** :data:`PROMPT_TEXT`, a fixed English paragraph, is tokenized with the model's own
   tokenizer and its tokens are repeated (or cut) to exactly ``--prefill`` tokens. Any vocab
   can encode it (the world vocab falls back to single bytes), so every model gets a prompt
   of the same length from the same text.
2. **Load time** runs from opening the file to the first token being ready: ``engine.load`` plus
   one ``step`` on the first prompt token whose logits are read back. The wgpu device is
   created before the clock starts (it is per process, not per model). The record keeps where
   that time went: the engine's load phases (``Engine.load_phases``) and the first step.
3. **Prefill**: after ``reset()``, the whole prompt through ``prefill``; the clock stops when its
   last logits are back on the host (that readback is the only honest sync point the engine
   offers). Rate = prompt tokens / seconds.
4. **Generation**: after ``reset()`` and an untimed prefill of all but the last prompt token,
   ``generate([last prompt token], --generate)`` is timed. That is exactly ``--generate``
   single-token forward passes, each producing one token by a GPU argmax that the next step
   reads from GPU memory (real autoregression, no host round trip); the clock stops when the
   token ids are back. Rate = generated tokens / seconds.
5. ``--warmup`` untimed rounds of 3 and 4, then ``--repeat`` timed rounds; each reported rate
   is the MEDIAN over the repeats, with min and max as its spread. Every per-repeat time is
   kept in the sidecar file.
6. **Output**: after ``reset()``, ``generate(prompt, 32)``; the quality hash is taken over
   those 32 greedy tokens (the seeds' formula) and the first 16 are shown. The timed runs
   must produce the same tokens (recorded as ``consistent``).
7. **Numeric check**: max |logit difference| at the first generated position (the logits after
   the prompt, from the last timed prefill) against the float64 NumPy reference
   (:mod:`rwkvlab.reference`) on the same file's dequantized weights. Tolerance: 1e-3 when
   every tensor is used on the GPU in its file format (then the engine and the reference
   multiply the very same numbers and differ only by float32 accumulation, measured ~1e-5);
   0.05 when some matrix was rounded to f16 at load (f16 keeps 11 significant bits; measured
   ~2e-3 on the tiny fixtures, so 0.05 leaves a 25x margin without letting a wrong kernel
   through: wrong kernels miss by O(1)), and 0.05 too when the prefill GEMMs ran on the matrix
   units (Tuning.gemm_sgmat: activations and weights rounded to f16 as they are staged, the
   same 11 bits). The reference logits are
   cached on disk (``$RWKVLAB_CACHE`` or ``~/.cache/rwkvlab``, key: file size, mtime, SHA-256
   of the first MiB and of the first bytes of every tensor, prompt tokens); ``--no-reference``
   skips the check for shapes too big for the host, and the record then says "not checked".

:func:`run_bench` runs the protocol and returns a :class:`BenchRecord`; :func:`save_bench`
appends it to a history file (the seed format with extra rows Backend, Path, Weights, Fusions,
Chunk, Tuning, Dispatches/token, Load phases, Commit, Logit error) and every raw sample to its
JSON-lines sidecar.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rwkvlab.history import HistoryWriteError, RunRecord, append_run, append_sidecar, read_history_quietly
from rwkvlab.options import Options, OptionsError, from_args, from_record
from rwkvlab.quality import HASH_TOKENS, SHOWN_TOKENS, quality_hash
from rwkvlab.synth import ModelNotFoundError, model_from_args, resolve_model

# Written for this lab: plain English with digits, punctuation and a line break, so that
# byte-level and word-level vocabs both see ordinary text.
PROMPT_TEXT = (
    "The lighthouse keeper climbed the spiral stairs at dusk, counting all 112 steps as his "
    "father had taught him. Below, the harbour filled with small boats coming home from the "
    "day's fishing, their lanterns swaying over the dark water. He trimmed the wick, polished "
    "the great lens until it shone, and wrote the time, the wind and the state of the sea into "
    "the log book, as every keeper before him had done.\n"
)

FILE_FORMAT_TOLERANCE = 1e-3  # max |logit error| when the GPU uses every tensor in its file format
F16_AT_LOAD_TOLERANCE = 0.05  # some matrix was rounded to f16 at load (see the docstring)
NOT_CHECKED = "not checked"
# Bump when the reference forward or the key changes, so stale cached logits are never used.
REFERENCE_CACHE_VERSION = 1
_KEY_HEAD_BYTES = 1 << 20  # the first MiB of the file: header, metadata, vocab
_KEY_TENSOR_BYTES = 4096  # and the first bytes of every tensor's data
# Host memory the float64 reference needs per weight: 8 for its copy, 4 for the float32
# dequantized weights it is built from.
_REFERENCE_BYTES_PER_WEIGHT = 12


class BenchError(RuntimeError):
    """A benchmark could not run; the message says what to change."""


@dataclass(frozen=True)
class BenchSettings:
    """How much to measure: prompt and generation lengths, warmups, repeats, the reference check."""

    prefill: int = 128
    generate: int = 64
    warmup: int = 2
    repeat: int = 3
    reference: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        for name, low in (("prefill", 1), ("generate", 1), ("warmup", 0), ("repeat", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise BenchError(f"--{name} must be a whole number >= {low}, got {value!r}")


def prompt_tokens(tokenizer, n: int, text: str = PROMPT_TEXT) -> list[int]:
    """The benchmark prompt: ``text``'s tokens repeated (or cut) to exactly ``n`` tokens."""
    base = tokenizer.encode(text)
    if not base:
        raise BenchError("the benchmark prompt encodes to no tokens with this model's vocab")
    return [base[i % len(base)] for i in range(n)]


# --------------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------------

@dataclass
class BenchRecord:
    """One benchmark run: what ran, every timing sample, and the proof its output is right."""

    title: str
    change: str
    timestamp: datetime
    model: str  # file name, as the history's Model row shows it
    model_path: str
    layers: int
    embedding: int
    gpu: str  # adapter name
    adapter: dict[str, str]  # name, backend, adapter_type, description
    options: Options
    settings: BenchSettings
    prompt: list[int]
    load_ms: float
    engine_load_ms: float | None  # the engine's own load_seconds, without the first step
    prefill_seconds: list[float]  # per timed repeat
    generation_seconds: list[float]
    warmup_prefill_seconds: list[float]
    warmup_generation_seconds: list[float]
    quality_tokens: list[int]  # the 32 greedy tokens after the prompt
    consistent: bool  # every timed generation gave the same tokens as the quality run
    logit_error: float | None  # None: not checked
    logit_tolerance: float
    reference: str  # "computed", "cached" or "not checked"
    dispatches_per_token: int | None
    commit: str
    fingerprint: str = ""  # the model file's content (rwkvlab.gguf.fingerprint); "" unknown
    environment: dict[str, str] = field(default_factory=dict)  # rwkvlab.gpu.environment + commit
    kernel_tuning: dict[str, Any] = field(default_factory=dict)  # every kernel shape the engine used
    step_weight_bytes: int | None = None  # weight bytes a generation step reads (Engine.step_weight_bytes)
    # Where the load time went: each phase of rwkvlab.engine.LOAD_PHASES, and "first_step", as
    # [start, end] in ms from the start of the load clock. "upload" and "pipelines" run beside
    # the others where the runtime allows, so durations add up to more than load_ms there.
    load_phases: dict[str, list[float]] = field(default_factory=dict)
    pipelines_built: int | None = None  # pipelines the load compiled
    compile_cpu_ms: float | None = None  # the CPU time compiling them took, added up (not on Dawn)

    @property
    def quality_hash(self) -> str:
        return quality_hash(self.quality_tokens)

    @property
    def prefill_tps_samples(self) -> list[float]:
        return [len(self.prompt) / s for s in self.prefill_seconds]

    @property
    def generation_tps_samples(self) -> list[float]:
        return [self.settings.generate / s for s in self.generation_seconds]

    @property
    def prefill_tps(self) -> float:
        """Median prefill rate over the timed repeats (tok/s)."""
        return statistics.median(self.prefill_tps_samples)

    @property
    def generation_tps(self) -> float:
        """Median generation rate over the timed repeats (tok/s)."""
        return statistics.median(self.generation_tps_samples)

    @property
    def logit_ok(self) -> bool | None:
        """Whether the logit error is within tolerance; None when it was not checked."""
        if self.logit_error is None:
            return None
        return bool(self.logit_error <= self.logit_tolerance)

    def extra_rows(self) -> dict[str, str | int | float]:
        """The history rows beyond the seed format, in the order they are written."""
        return {
            "Backend": self.adapter.get("backend", self.options.backend),
            "Path": self.options.path,
            "Weights": self.options.weights,
            # the seed files' way of writing a list in a cell
            "Fusions": ", ".join(sorted(self.options.fusions)) or "none",
            "Chunk": self.options.chunk,
            "Tuning": self.options.tuning or "default",
            "Dispatches/token": "n/a" if self.dispatches_per_token is None else int(self.dispatches_per_token),
            **({"Load phases": load_phases_text(self.load_phases)} if self.load_phases else {}),
            # In backticks: the history reader keeps it text (a hash like 1234e56 is not a number).
            "Commit": f"`{self.commit}`",
            "Logit error": NOT_CHECKED if self.logit_error is None else float(f"{self.logit_error:.3g}"),
        }

    def to_run_record(self) -> RunRecord:
        """The run as the history writes it (medians, hash, first 16 tokens, extra rows)."""
        return RunRecord(
            title=self.title, change=self.change, timestamp=self.timestamp, model=self.model,
            version="V7", layers=self.layers, embedding=self.embedding, gpu=self.gpu,
            load_ms=self.load_ms, prefill_tps=self.prefill_tps, generation_tps=self.generation_tps,
            quality_hash=self.quality_hash, quality_tokens=self.quality_tokens, extra=self.extra_rows(),
        )

    def sidecar_record(self) -> dict[str, Any]:
        """Every raw sample and the full configuration, for the history's JSON-lines sidecar."""
        return {
            "timestamp": self.timestamp, "change": self.change, "title": self.title,
            "model": self.model, "model_path": self.model_path,
            "samples": {
                "load_ms": [self.load_ms],
                "prefill_tps": self.prefill_tps_samples,
                "generation_tps": self.generation_tps_samples,
                "prefill_s": self.prefill_seconds,
                "generation_s": self.generation_seconds,
                "warmup_prefill_s": self.warmup_prefill_seconds,
                "warmup_generation_s": self.warmup_generation_seconds,
            },
            "engine_load_ms": self.engine_load_ms,
            "options": self.options.as_record(),
            "settings": asdict(self.settings),
            "adapter": self.adapter,
            "prompt_tokens": len(self.prompt),
            "quality_tokens": self.quality_tokens,
            "consistent": self.consistent,
            "logit_error": self.logit_error,
            "logit_tolerance": self.logit_tolerance,
            "reference": self.reference,
            "dispatches_per_token": self.dispatches_per_token,
            "commit": self.commit,
            "fingerprint": self.fingerprint,
            "environment": self.environment,
            "kernel_tuning": self.kernel_tuning,
            "step_weight_bytes": self.step_weight_bytes,
            "load_phases_ms": self.load_phases,
            "pipelines_built": self.pipelines_built,
            "compile_cpu_ms": self.compile_cpu_ms,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (``bench --json``); :meth:`from_dict` reads it back."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["timestamp"] = self.timestamp.isoformat()
        d["options"] = self.options.as_record()
        d["settings"] = asdict(self.settings)
        d.update(quality_hash=self.quality_hash, prefill_tps=self.prefill_tps,
                 generation_tps=self.generation_tps, logit_ok=self.logit_ok)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BenchRecord":
        """The record from :meth:`to_dict`'s output (derived keys are ignored)."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        values["timestamp"] = datetime.fromisoformat(d["timestamp"])
        values["options"] = from_record(d["options"])
        values["settings"] = BenchSettings(**d["settings"])
        return cls(**values)


def load_phases_text(spans: dict[str, list[float]]) -> str:
    """The history's Load phases cell: each phase's duration in ms, in the order they started
    (``file 136, layout 12, upload* 440, ... first_step 40 ms``; * marks phases that ran beside
    the others)."""
    from rwkvlab.engine import BACKGROUND_PHASES

    ordered = sorted(spans.items(), key=lambda kv: kv[1][0])
    return ", ".join(f"{n}{'*' if n in BACKGROUND_PHASES else ''} {t1 - t0:.0f}" for n, (t0, t1) in ordered) + " ms"


def logit_tolerance(file_types: dict[str, str], gpu_formats: dict[str, str], f16_products: bool = False) -> float:
    """The tolerance of the numeric check, from each tensor's file type and its format on the GPU:
    1e-3 when the GPU reads every tensor as stored (the reference uses the same dequantized
    numbers), 0.05 when some tensor was converted (f16 at load) or when `f16_products` (the
    prefill GEMMs rounded their inputs to f16: Tuning.gemm_sgmat)."""
    converted = [n for n, fmt in gpu_formats.items() if file_types.get(n) != fmt]
    return F16_AT_LOAD_TOLERANCE if converted or f16_products else FILE_FORMAT_TOLERANCE


# --------------------------------------------------------------------------------------------
# Running the protocol
# --------------------------------------------------------------------------------------------

def run_bench(model: str | os.PathLike, options: Options | None = None,
              settings: BenchSettings | None = None, *, title: str = "", change: str = "",
              on_progress: Callable[[int, int, str], None] | None = None) -> BenchRecord:
    """Run the benchmark protocol (module docstring) on ``model`` and return its record.

    ``model`` is a GGUF path or a preset name (f32). Nothing is written to any history; see
    :func:`save_bench`. Raises :class:`BenchError` / ``OptionsError`` / ``GGUFError`` with a
    message a user can act on before any GPU work when the setup cannot run.
    ``on_progress(step, steps, stage)`` follows the protocol's steps (:func:`bench_steps`).
    """
    from rwkvlab.gguf import fingerprint, read_model
    from rwkvlab.gpu import resolve_options
    from rwkvlab.tokenizer import Tokenizer

    options = resolve_options(options)  # the record holds what ran: "auto" resolved
    settings = settings or BenchSettings()
    path = resolve_model(model)
    # the engine's load scans the weights for NaN / Inf (and warns); one scan per run is enough
    host_model = read_model(path, check_values=False)
    prompt = prompt_tokens(Tokenizer.from_model(host_model), settings.prefill)
    cached = reference_cache_file(path, host_model, prompt) if settings.reference else None
    if settings.reference and not cached.exists():
        check_reference_fits(host_model)
    title = title or f"{path.stem}"
    change = change or options.text()
    timestamp = datetime.now(timezone.utc)

    bar = _Progress(settings, on_progress)
    try:
        timings = _measure(path, options, settings, prompt, bar)
        bar.set_description("reference")
        error, source = None, NOT_CHECKED
        if settings.reference:
            ref_logits, source = reference_logits(host_model, prompt, cached, settings.progress)
            error = float(np.max(np.abs(timings.logits.astype(np.float64) - ref_logits.astype(np.float64))))
        bar.update(1)
    finally:
        bar.close()

    info = timings.adapter
    commit = git_commit()
    return BenchRecord(
        title=title, change=change, timestamp=timestamp, model=path.name, model_path=str(path),
        layers=host_model.spec.n_layer, embedding=host_model.spec.n_embd, gpu=info["name"],
        adapter=info, options=options, settings=settings, prompt=prompt,
        load_ms=timings.load_s * 1000.0,
        engine_load_ms=None if timings.engine_load_s is None else timings.engine_load_s * 1000.0,
        prefill_seconds=timings.prefill_s, generation_seconds=timings.generation_s,
        warmup_prefill_seconds=timings.warmup_prefill_s, warmup_generation_seconds=timings.warmup_generation_s,
        quality_tokens=timings.quality_tokens, consistent=timings.consistent,
        logit_error=error, reference=source,
        logit_tolerance=logit_tolerance({n: t.ggml_type for n, t in host_model.tensors.items()},
                                        timings.gpu_formats, bool(timings.kernel_tuning.get("gemm_sgmat"))),
        dispatches_per_token=timings.dispatches_per_token, commit=commit,
        fingerprint=fingerprint(path), environment={**timings.environment, "commit": commit},
        kernel_tuning=timings.kernel_tuning, step_weight_bytes=timings.step_weight_bytes,
        load_phases=timings.load_phases, pipelines_built=timings.pipelines_built,
        compile_cpu_ms=timings.compile_cpu_ms,
    )


def bench_steps(settings: BenchSettings) -> int:
    """Steps of the protocol: load, warmup and timed rounds (prefill + generation each), the
    quality run, the reference."""
    return 1 + 2 * (settings.warmup + settings.repeat) + 1 + 1


class _Progress:
    """The protocol's progress: a tqdm bar on stderr for people, and ``on_progress(step, steps,
    stage)`` for programs (``--events``: the worker reads these, never the bar's redraws)."""

    def __init__(self, settings: BenchSettings, on_progress: Callable[[int, int, str], None] | None) -> None:
        from tqdm import tqdm

        self.total, self.n, self.stage = bench_steps(settings), 0, "bench"
        self.bar = tqdm(total=self.total, desc=self.stage, unit="step", file=sys.stderr,
                        disable=not settings.progress, leave=False)
        self.on_progress = on_progress

    def set_description(self, stage: str) -> None:
        self.stage = stage
        self.bar.set_description(stage)
        self._tell()

    def update(self, steps: int = 1) -> None:
        self.n += steps
        self.bar.update(steps)
        self._tell()

    def close(self) -> None:
        self.bar.close()

    def _tell(self) -> None:
        if self.on_progress:
            self.on_progress(self.n, self.total, self.stage)


@dataclass
class _Timings:
    load_s: float
    engine_load_s: float | None
    prefill_s: list[float] = field(default_factory=list)
    generation_s: list[float] = field(default_factory=list)
    warmup_prefill_s: list[float] = field(default_factory=list)
    warmup_generation_s: list[float] = field(default_factory=list)
    quality_tokens: list[int] = field(default_factory=list)
    consistent: bool = True
    logits: np.ndarray | None = None  # after the prompt, from the last timed prefill
    adapter: dict[str, str] = field(default_factory=dict)
    dispatches_per_token: int | None = None
    gpu_formats: dict[str, str] = field(default_factory=dict)  # tensor -> format the GPU reads
    environment: dict[str, str] = field(default_factory=dict)
    kernel_tuning: dict[str, Any] = field(default_factory=dict)
    step_weight_bytes: int | None = None
    load_phases: dict[str, list[float]] = field(default_factory=dict)
    pipelines_built: int | None = None
    compile_cpu_ms: float | None = None


def _measure(path: Path, options: Options, settings: BenchSettings, prompt: list[int], bar) -> _Timings:
    """Load, warm up and time the engine; the engine is released before this returns."""
    from rwkvlab.engine import load
    from rwkvlab.gpu import environment, gpu_for

    # The device is per process and cached; make it outside the clock so load time is the model's.
    gpu_for(options)

    bar.set_description("load")
    start = time.perf_counter()
    engine = load(path, options, progress=settings.progress)
    stepped = time.perf_counter()
    np.asarray(engine.step(prompt[0]))  # first token ready: its logits are on the host
    end = time.perf_counter()
    engine_load_s = getattr(engine, "load_seconds", None)
    t = _Timings(load_s=end - start, engine_load_s=None if engine_load_s is None else float(engine_load_s))
    phases = getattr(engine, "load_phases", None)
    if phases is not None:
        def ms(at: float) -> float:  # a perf_counter reading as ms from the start of the clock
            return round((at - start) * 1000.0, 3)

        t.load_phases = {n: [ms(phases.start + t0), ms(phases.start + t1)] for n, (t0, t1) in phases.spans.items()}
        t.load_phases["first_step"] = [ms(stepped), ms(end)]
        t.pipelines_built = phases.pipelines_built
        if phases.compile_cpu_seconds is not None:
            t.compile_cpu_ms = round(phases.compile_cpu_seconds * 1000.0, 3)
    bar.update(1)

    generated: list[list[int]] = []
    for i in range(settings.warmup + settings.repeat):
        warm = i < settings.warmup
        label = f"warmup {i + 1}/{settings.warmup}" if warm else f"repeat {i - settings.warmup + 1}/{settings.repeat}"
        bar.set_description(f"prefill {label}")
        seconds, logits = _time_prefill(engine, prompt)
        (t.warmup_prefill_s if warm else t.prefill_s).append(seconds)
        t.logits = logits
        bar.update(1)
        bar.set_description(f"generate {label}")
        seconds, tokens = _time_generation(engine, prompt, settings.generate)
        (t.warmup_generation_s if warm else t.generation_s).append(seconds)
        generated.append(tokens)
        bar.update(1)

    bar.set_description("quality tokens")
    engine.reset()
    t.quality_tokens = [int(x) for x in engine.generate(prompt, HASH_TOKENS)]
    shared = min(settings.generate, HASH_TOKENS)
    t.consistent = all(g[:shared] == t.quality_tokens[:shared] and g == generated[0] for g in generated)
    bar.update(1)

    info = engine.gpu.info
    t.adapter = {"name": info.name, "backend": info.backend, "adapter_type": info.adapter_type,
                 "description": info.description}
    t.environment = environment(engine.gpu)
    t.kernel_tuning = engine.tuning.as_record()
    dpt = getattr(engine, "dispatches_per_token", None)
    t.dispatches_per_token = None if dpt is None else int(dpt)
    t.gpu_formats = dict(engine.weight_formats)
    t.step_weight_bytes = getattr(engine, "step_weight_bytes", None)
    del engine  # GPU buffers go before the host builds the (possibly large) reference
    return t


def _time_prefill(engine, prompt: list[int]) -> tuple[float, np.ndarray]:
    engine.reset()
    start = time.perf_counter()
    logits = np.asarray(engine.prefill(prompt))  # returns host logits: the readback syncs
    return time.perf_counter() - start, logits


def _time_generation(engine, prompt: list[int], n: int) -> tuple[float, list[int]]:
    engine.reset()
    if len(prompt) > 1:
        np.asarray(engine.prefill(prompt[:-1]))  # untimed; its readback also drains the queue
    start = time.perf_counter()
    tokens = engine.generate(prompt[-1:], n)  # n forward passes, each yielding one token
    seconds = time.perf_counter() - start
    return seconds, [int(x) for x in tokens]


# --------------------------------------------------------------------------------------------
# The NumPy reference, cached on disk
# --------------------------------------------------------------------------------------------

def reference_cache_file(path: Path, model, prompt: list[int]) -> Path:
    """Where the reference logits for (this file's content, this prompt) are cached.

    The key covers size and mtime (a rewritten file), the SHA-256 of the first MiB (header,
    metadata, vocab) and of the first 4 KiB of every tensor (different weights in an equal-
    sized file), and the prompt tokens. Hashing the whole file would cost as much as a load.
    """
    from rwkvlab.synth import cache_dir

    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(_KEY_HEAD_BYTES))
    for name in sorted(model.tensors):
        digest.update(name.encode())
        digest.update(bytes(model.tensors[name].raw[:_KEY_TENSOR_BYTES]))
    key = json.dumps([REFERENCE_CACHE_VERSION, stat.st_size, stat.st_mtime_ns, digest.hexdigest(), prompt])
    name = hashlib.sha256(key.encode()).hexdigest()[:32]
    return cache_dir() / "reference" / f"{path.stem}-{name}.npy"


def check_reference_fits(model) -> None:
    """Raise BenchError when the float64 reference would not fit in this host's free memory."""
    need = sum(t.n_elements for t in model.tensors.values()) * _REFERENCE_BYTES_PER_WEIGHT
    free = _available_memory()
    if free is not None and need > free:
        raise BenchError(
            f"the NumPy reference check of {model.path.name} needs about {need / 2**30:.1f} GiB of host "
            f"memory and {free / 2**30:.1f} GiB is available; pass --no-reference (the run will say "
            f"'{NOT_CHECKED}'), or run the check once on a bigger host (the logits are cached)")


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None  # not Linux: no check, the reference simply runs


def reference_logits(model, prompt: list[int], cache_file: Path, progress: bool = False) -> tuple[np.ndarray, str]:
    """The reference logits after ``prompt`` and where they came from ("cached" or "computed")."""
    if cache_file.exists():
        try:
            return np.load(cache_file), "cached"
        except (OSError, ValueError):
            pass  # a damaged cache file is recomputed and replaced
    from tqdm import tqdm

    from rwkvlab.reference import Reference

    ref = Reference(model)
    # The whole prompt at once (Reference.prefill_chunk: the step loop's math with batched matrix
    # products), in chunks of 512 for the bar and a bounded [T, F] intermediate.
    logits = None
    bar = tqdm(total=len(prompt), desc="NumPy reference", unit="tok", file=sys.stderr, disable=not progress, leave=False)
    for start in range(0, len(prompt), 512):
        chunk = prompt[start: start + 512]
        logits = ref.prefill_chunk(chunk)
        bar.update(len(chunk))
    bar.close()
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, logits)
    os.replace(tmp, cache_file)  # parallel benches may race here; either complete file wins
    return logits, "computed"


# --------------------------------------------------------------------------------------------
# Provenance and history
# --------------------------------------------------------------------------------------------

# The files that define the engine a run measured: the package, its shaders and the build
# metadata (dependency bounds, what ships). Notebooks (JupyterLab's autosave rewrites them),
# docs, the history and the tests do not change what runs, so edits there keep a commit clean.
ENGINE_PATHS = ("rwkvlab", "shaders", "pyproject.toml")


def git_commit(repo: str | os.PathLike | None = None) -> str:
    """Short hash of the checkout the code runs from, ``-dirty`` when the engine's files
    (`ENGINE_PATHS`) differ from it, ``unknown`` outside git; $RWKVLAB_COMMIT wins."""
    if os.environ.get("RWKVLAB_COMMIT"):
        # A copy of the tree without its git history (a rented GPU machine) is told its commit.
        return os.environ["RWKVLAB_COMMIT"]
    where = Path(repo) if repo is not None else Path(__file__).resolve().parent
    # Untracked files inside the engine's folders count as changes too (ignored ones such as
    # __pycache__ do not): a new rwkvlab/<name>/ package shadows the tracked rwkvlab/<name>.py,
    # shaders are found by file name, and a wheel ships every shaders/*.wgsl and rwkvlab/data
    # file, so a checkout of the commit alone may not rebuild what ran. A stray file costing a
    # needless -dirty is cheaper than a measurement credited to code that did not produce it.
    # ":(top)" anchors the paths at the repository root whichever folder git runs in.
    engine = [f":(top){path}" for path in ENGINE_PATHS]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", *engine],
                               cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def slug(text: str) -> str:
    """A file-name-safe form of a GPU name: ``"Apple M2 Max"`` -> ``"apple-m2-max"``."""
    return re.sub(r"[^0-9a-z]+", "-", text.lower()).strip("-") or "gpu"


def history_file(gpu: str, history_dir: str | os.PathLike = "data/benchmarks",
                 file: str | None = None) -> Path:
    """``<history_dir>/<file>.md``; ``file`` defaults to the slugified GPU name (every run on a
    GPU, engine or micro-benchmark, lands in that GPU's file)."""
    name = file or slug(gpu)
    if name.endswith(".md"):
        name = name[:-3]
    return Path(history_dir) / f"{name}.md"


@dataclass(frozen=True)
class Verdict:
    """Is the output still right, and is it slower? The lab's verdict rule
    (:mod:`rwkvlab.verdicts`) on this run as if appended to the history, and the logit check."""

    output: str  # "first run", "same", "changed"
    output_reason: str
    logits: str  # "ok", "too large", "not checked"
    logits_reason: str
    judged: dict[str, Any] = field(default_factory=dict)  # the run's row of rwkvlab.verdicts.verdicts

    @property
    def ok(self) -> bool:
        return self.output != "changed" and self.logits != "too large"


def history_frame(record: BenchRecord, file: str = "this run"):
    """The run as :func:`rwkvlab.history.read_history` would read it back once saved."""
    from rwkvlab.history import frame_of_run

    return frame_of_run(record.to_run_record(), record.sidecar_record(), file)


def judge_output(record: BenchRecord, history: pd.DataFrame, file: str = "this run") -> tuple[str, str, pd.Series]:
    """The run's verdicts as if appended to ``history`` under ``file`` (rwkvlab.verdicts), and its
    output as bench and the panel say it: "first run", "same" or "changed", with the reason."""
    from rwkvlab.verdicts import judge_new

    judged = judge_new(history, history_frame(record, file)).iloc[0]
    if judged["output"] == "baseline":
        return "first run", f"first run of its kind: {judged['output_reason']}", judged
    if judged["output"] == "changed":
        return "changed", f"OUTPUT CHANGED: {judged['output_reason']}", judged
    return str(judged["output"]), str(judged["output_reason"]), judged


def judge(record: BenchRecord, history: str | os.PathLike) -> Verdict:
    """The verdicts of ``record`` as if appended to ``history`` (a .md file): the output against
    the baseline of its output key (model fingerprint, prompt and generation lengths) across
    every history file in that folder, the speeds against its title and its history
    (:mod:`rwkvlab.verdicts`, the rule the panel, ``history`` and reports apply), and the logits
    against the NumPy reference."""
    # named for the file it would be saved to: its title's earlier runs there are its vs_title set
    output, why, judged = judge_output(record, read_history_quietly(Path(history).parent), Path(history).name)
    if record.logit_error is None:
        logits, lwhy = "not checked", "logits not checked against the NumPy reference (--no-reference)"
    elif record.logit_ok:
        logits, lwhy = "ok", (f"max |logit error| {record.logit_error:.3g} vs the NumPy reference "
                              f"({record.reference}): within tolerance {record.logit_tolerance:g}")
    else:
        logits, lwhy = "too large", (f"LOGIT ERROR {record.logit_error:.3g} vs the NumPy reference exceeds "
                                     f"tolerance {record.logit_tolerance:g}: the output is wrong")
    return Verdict(output, why, logits, lwhy, judged.to_dict())


def save_bench(record: BenchRecord, history: str | os.PathLike) -> int:
    """Append the run to ``history`` (a .md file) and its samples to the sidecar; return its line."""
    path = Path(history)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = append_run(path, record.to_run_record())
    append_sidecar(path, record.sidecar_record())
    return line


def save_or_error(record: BenchRecord, history: str | os.PathLike) -> dict[str, Any]:
    """:func:`save_bench`, answering where the run went (``file``, ``line``) or, when it could
    not be written, the ``error`` that kept it out (the measurement itself is not lost)."""
    try:
        return {"file": str(history), "line": save_bench(record, history)}
    except (HistoryWriteError, OSError) as err:  # OSError covers filelock.Timeout too
        return {"error": str(err)}


def format_summary(record: BenchRecord, verdict: Verdict) -> str:
    """What `rwkvlab bench` prints: the numbers, then whether the output is still right."""
    def spread(samples: list[float]) -> str:
        return f"[{min(samples):.2f} .. {max(samples):.2f}]"

    s, o = record.settings, record.options
    lines = [
        f"rwkvlab bench  {record.model}  on {record.gpu} ({record.adapter.get('backend', '?')}, "
        f"{record.adapter.get('adapter_type', '?')})",
        f"  options      {o.text()}",
        f"  protocol     prompt {len(record.prompt)} tok, generate {s.generate} tok, {s.warmup} warmup + "
        f"{s.repeat} timed rounds (median [min .. max])",
        f"  load         {record.load_ms:10.2f} ms",
        *([f"  load phases  {load_phases_text(record.load_phases)}"] if record.load_phases else []),
        f"  prefill      {record.prefill_tps:10.2f} tok/s  {spread(record.prefill_tps_samples)}",
        f"  generation   {record.generation_tps:10.2f} tok/s  {spread(record.generation_tps_samples)}",
        f"  dispatches   {record.dispatches_per_token if record.dispatches_per_token is not None else 'n/a'} per token",
        f"  commit       {record.commit}",
        f"  tokens       {record.quality_tokens[:SHOWN_TOKENS]}",
        f"  hash         {record.quality_hash}",
        "output",
        f"  {'OK  ' if verdict.output != 'changed' else 'FAIL'} tokens  {verdict.output_reason}",
        f"  {'OK  ' if verdict.logits == 'ok' else 'FAIL' if verdict.logits == 'too large' else '--  '} logits  "
        f"{verdict.logits_reason}",
    ]
    if not record.consistent:
        lines.append("  FAIL repeat   the timed generations did not all give the quality run's tokens: "
                     "the engine is not deterministic")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """The BenchSettings of a `bench`/`sweep` command line."""
    return BenchSettings(prefill=args.prefill, generate=args.generate, warmup=args.warmup,
                         repeat=args.repeat, reference=not args.no_reference, progress=not args.no_progress)


# Exit status of `rwkvlab bench` (and the worker the lab and sweep start): 1 is reserved for a
# failed logit check, whose run is saved, so a run that could not be saved needs its own code.
EXIT_OK, EXIT_LOGITS, EXIT_NOT_RUN, EXIT_NOT_SAVED, EXIT_GATE = 0, 1, 2, 3, 4


def replay_of(where: str) -> tuple[Path, Options, BenchSettings, pd.Series]:
    """What a recorded run (``FILE.md:LINE``) ran, from its record alone: the model file (checked
    against the recorded content fingerprint), the resolved options with their tuning, and the
    bench settings. Raises :class:`BenchError` naming what the record lacks."""
    from rwkvlab.gguf import fingerprint

    file, _, line = where.rpartition(":")
    if not file or not line.isdigit():
        raise BenchError(f"--replay {where!r}: expected FILE.md:LINE (a run's ### heading line)")
    if not Path(file).is_file():
        raise BenchError(f"--replay {where!r}: {file} is not a file")
    df = read_history_quietly(file)
    rows = df[df["line"] == int(line)]
    if rows.empty:
        raise BenchError(f"--replay {where!r}: no run heading on line {line} of {file}")
    row = rows.iloc[0]
    if not row["options"] or not row["settings"] or pd.isna(row["model_path"]):
        raise BenchError(f"--replay {where!r}: the run has no sidecar record with its options, settings and "
                         f"model path ({Path(file).name}.jsonl), so it cannot be replayed")
    model = Path(row["model_path"])
    if not model.is_file():
        raise BenchError(f"--replay {where!r}: the run's model {model} is not on this machine")
    if not pd.isna(row["fingerprint"]) and fingerprint(model) != row["fingerprint"]:
        raise BenchError(f"--replay {where!r}: {model} is not the file the run measured (content "
                         f"{fingerprint(model)}, recorded {row['fingerprint']})")
    known = {f.name for f in fields(BenchSettings)}
    settings = BenchSettings(**{k: v for k, v in row["settings"].items() if k in known})
    return model, from_record(row["options"]), settings, row


def cli_bench(args: argparse.Namespace) -> int:
    """`rwkvlab bench`: run, print, append to the history. Exit 0 done, 1 the logit check failed
    (run saved), 2 it could not run (nothing saved), 3 measured but the history could not be
    written (the measurement is printed, nothing saved), 4 a ``--fail-on`` gate failed (run
    saved)."""
    from rwkvlab.engine import EngineError
    from rwkvlab.gguf import GGUFError
    from rwkvlab.gpu import NoAdapterError
    from rwkvlab.history import check_appendable
    from rwkvlab.kernels import KernelError
    from rwkvlab.verdicts import GATES, gate_failures

    human = sys.stderr if args.json else sys.stdout
    if not args.no_save:
        # Find out before minutes of measuring whether there is anywhere to save the run. The
        # file name can depend on the GPU, so without --file only the folder can be checked.
        target = Path(args.history_dir) / f"{args.file}.md" if args.file else Path(args.history_dir)
        try:
            check_appendable(target)
        except HistoryWriteError as err:
            print(f"rwkvlab bench: {err}; nothing measured", file=sys.stderr)
            return EXIT_NOT_RUN
    try:
        gates = {g.strip() for g in (args.fail_on or "").split(",") if g.strip()}
        unknown = sorted(gates - set(GATES))
        if unknown:
            raise OptionsError(f"--fail-on {', '.join(unknown)}: available: {', '.join(GATES)}")
        if args.replay:
            model, options, settings, row = replay_of(args.replay)
            settings = replace(settings, progress=not args.no_progress)
            title = args.title or str(row["title"])
            change = args.change or f"replay of {Path(args.replay).name}: {row['change']}"
        else:
            model, options, settings = model_from_args(args), from_args(args), settings_from_args(args)
            title, change = args.title or "", args.change or ""
        record = run_bench(model, options, settings, title=title, change=change,
                           on_progress=_event_printer() if args.events else None)
    except (BenchError, ModelNotFoundError, OptionsError, GGUFError, NoAdapterError, EngineError,
            KernelError) as err:
        print(f"rwkvlab bench: {err}", file=sys.stderr)
        return EXIT_NOT_RUN
    history = history_file(record.gpu, args.history_dir, args.file)
    verdict = judge(record, history)
    print(format_summary(record, verdict), file=human)
    saved: dict[str, Any] = {} if args.no_save else save_or_error(record, history)
    if "line" in saved:
        print(f"saved        {history}:{saved['line']} (samples in {history.name}.jsonl)", file=human)
    if args.json:
        out = record.to_dict()
        out.update(verdict=asdict(verdict), saved=saved)
        print(json.dumps(out, default=_json_default))
    if "error" in saved:
        print(f"rwkvlab bench: the run was measured but not saved to {history}: {saved['error']}", file=sys.stderr)
        return EXIT_NOT_SAVED
    if record.logit_ok is False:
        return EXIT_LOGITS
    gate = gate_failures(pd.Series(verdict.judged), gates)
    for why in gate:
        print(f"rwkvlab bench: --fail-on: {why}", file=sys.stderr)
    return EXIT_GATE if gate else EXIT_OK


def _event_printer() -> Callable[[int, int, str], None]:
    """``--events``: each progress step as one JSON line on stdout, for the worker runner
    (rwkvlab.worker); the record, with ``--json``, stays the last line."""
    def tell(step: int, steps: int, stage: str) -> None:
        print(json.dumps({"event": "progress", "step": step, "steps": steps, "stage": stage}), flush=True)
    return tell


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # NumPy scalars
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
