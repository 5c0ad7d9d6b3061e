"""Micro-benchmark measurements as runs of the benchmark history.

`python -m rwkvlab.kernel_bench` (mat-vec GB/s), `rwkvlab.gemm_bench` (GEMM TFLOP/s) and
`rwkvlab.wkv_bench` (wkv_fused us) each write one run per measurement (one kernel on one
problem, one kernel path, one tuning) into the same history as `rwkvlab bench`, so the lab
reads, judges and reports their figures like the engine's speeds. A run as written::

    ## kernel_bench                                      the bench's name (or --title)
    ### 2026-06-01 12:00:00 - Q8_0 65536x2560 path=native tuning=default
    | Model | matvec Q8_0 65536x2560 |                    what was measured: kernel and problem
    | GPU | NVIDIA H200 |                                 the adapter
    | **Load Time** ... **Generation** | **n/a** |        not measured here
    | Bandwidth | 2600.5 GB/s |                           the figure (FIGURES), median of passes
    | Backend | vulkan |  | Path | native |  | Tuning | default |
    | Clock | gpu |                                       timestamp queries, or wall clock
    | Check | max error 4.5e-05 of tolerance (...) |     the NumPy check it passed before timing
    | Commit | `1a2b3c4` |
    | Quality Hash | `n/a` |

The sidecar record beside it holds the figure and the seconds per dispatch of every timed
pass (``samples``), the options (backend, path, tuning override text in Options.tuning's
spelling), the whole kernel tuning the device resolved, what the bench measured in detail,
the environment (`rwkvlab.gpu.environment`) and the commit.

No quality hash: an engine run's hash covers greedy tokens, which must be identical from run
to run; a kernel's raw output is floating point whose last bits legitimately move with the
tuning and the GPU (summation order), so a hash of it would call every tuning "output
changed" and drop its speed from the references. What proves a micro run right is its Check
row: every measurement is compared with float64 NumPy before it is timed, and a measurement
that fails is reported and never recorded. `rwkvlab.verdicts` thus gives these runs the
output verdict "unknown", and their figures count.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from rwkvlab.history import (HistoryWriteError, RunRecord, append_run, append_sidecar, check_appendable,
                             snake_case)
from rwkvlab.options import normalize_tuning
from rwkvlab.verdicts import MICRO_METRICS

# verdicts.MICRO_METRICS name -> the row label that holds it; read_history names the column
# snake_case(label), which is what the verdicts read.
FIGURES = {"bandwidth": "Bandwidth", "throughput": "Throughput", "kernel_time": "Kernel time"}
assert all(snake_case(label) == MICRO_METRICS[name][0] for name, label in FIGURES.items()), FIGURES

DEFAULT_HISTORY_DIR = "data/benchmarks"  # as `rwkvlab bench`
# Exit status of a bench whose history could not be written: 2 before anything was measured
# (the folder is not writable), 3 after (measured and printed, a run could not be saved).
EXIT_NOT_RUN, EXIT_NOT_SAVED = 2, 3


class NotSavedError(RuntimeError):
    """A measured run could not be appended to the history; the message names the file."""


@dataclass
class MicroRun:
    """One micro-benchmark measurement, ready to be written as a history run."""

    model: str  # the kernel and its problem, e.g. "matvec Q8_0 65536x2560": the speed key
    change: str  # the problem, path and tuning, e.g. "Q8_0 65536x2560 path=native tuning=default"
    figure: str  # a key of FIGURES
    value: float  # the figure, in MICRO_METRICS' unit
    samples: list[float]  # the figure per timed pass
    seconds: list[float]  # seconds per dispatch per timed pass
    path: str  # kernel path
    tuning: str  # the tuning overrides measured (Options.tuning text); "" = the device's own
    clock: str  # "gpu" (timestamp queries) or "wall"
    check: str  # how the output compared with NumPy (it passed: failures are never recorded)
    rows: dict[str, str | int | float] = field(default_factory=dict)  # further rows of its table
    details: dict[str, Any] = field(default_factory=dict)  # further sidecar fields
    kernel_tuning: dict[str, Any] = field(default_factory=dict)  # kernels.Tuning.as_record()
    timestamp: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    def __post_init__(self) -> None:
        if self.figure not in FIGURES:
            raise ValueError(f"figure {self.figure!r} is not one of {', '.join(FIGURES)}")
        self.tuning = normalize_tuning(self.tuning)

    @property
    def unit(self) -> str:
        return MICRO_METRICS[self.figure][2]


def tuning_text(overrides: str) -> str:
    """Tuning overrides as a change text and the Tuning row write them: Options.tuning's one
    spelling (normalize_tuning: checked, sorted), "default" for none."""
    return normalize_tuning(overrides) or "default"


def figure_text(value: float, unit: str) -> str:
    """``value`` to 4 significant digits, never in exponent form, then its unit: ``"2601 GB/s"``,
    ``"0.7234 GB/s"``. Four digits resolve 0.1% at worst, finer than any noise band."""
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"a measured figure must be a positive number, got {value!r} {unit}")
    decimals = min(12, max(0, 3 - math.floor(math.log10(value))))
    return f"{value:.{decimals}f} {unit}"


def run_record(run: MicroRun, title: str, gpu: str, backend: str, commit: str) -> RunRecord:
    """The history run of ``run``: the engine's speeds missing, the figure an extra row."""
    rows: dict[str, str | int | float] = {
        FIGURES[run.figure]: figure_text(run.value, run.unit),
        "Backend": backend,
        "Path": run.path,
        "Tuning": tuning_text(run.tuning),  # as engine runs write it
        "Clock": run.clock,
        **run.rows,
        "Check": run.check,
        "Commit": f"`{commit}`",  # backticks: read back as text, as bench writes it
    }
    return RunRecord(title=title, change=run.change, timestamp=run.timestamp, model=run.model, gpu=gpu,
                     load_ms=None, prefill_tps=None, generation_tps=None, extra=rows)


def sidecar_record(run: MicroRun, title: str, backend: str, environment: dict[str, str],
                   commit: str) -> dict[str, Any]:
    """The sidecar record of ``run``: every pass, the options, the details, where it ran."""
    return {
        "timestamp": run.timestamp, "change": run.change, "title": title, "model": run.model,
        "samples": {MICRO_METRICS[run.figure][0]: list(run.samples), "seconds": list(run.seconds)},
        "options": {"backend": backend, "path": run.path, "tuning": run.tuning},
        "kernel_tuning": run.kernel_tuning,
        "bench": run.details,
        "check": run.check,
        "commit": commit,
        "environment": {**environment, "commit": commit},
    }


def save_run(run: MicroRun, *, title: str, gpu, history_dir: str | os.PathLike, commit: str) -> tuple[Path, int]:
    """Append ``run`` (measured on ``gpu``, a `rwkvlab.gpu.GPU`) to the history file of that
    GPU in ``history_dir`` and its sidecar; return the file and the line of the run."""
    from rwkvlab.gpu import environment

    from rwkvlab.bench import history_file

    path = history_file(gpu.info.name, history_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = append_run(path, run_record(run, title, gpu.info.name, gpu.info.backend, commit))
    append_sidecar(path, sidecar_record(run, title, gpu.info.backend, environment(gpu), commit))
    return path, line


# ----------------------------------------------------------------------------------------------
# The benches' command lines


def add_arguments(ap: argparse.ArgumentParser, title: str) -> None:
    """--history-dir, --no-save and --title, as every micro-benchmark takes them."""
    ap.add_argument("--history-dir", default=DEFAULT_HISTORY_DIR,
                    help="append every measurement to <DIR>/<gpu>.md, samples to its .jsonl "
                         f"(default {DEFAULT_HISTORY_DIR}, as `rwkvlab bench`)")
    ap.add_argument("--no-save", action="store_true", help="print only; write nothing to the history")
    ap.add_argument("--title", default=title, help=f"the ## title the runs go under (default {title})")


Saver = Callable[[MicroRun, Any], None]


def saver_from_args(args: argparse.Namespace) -> tuple[Saver | None, list[tuple[Path, int]]]:
    """(a function that saves one run measured on a GPU, the list of (file, line) it fills), or
    (None, []) with --no-save. Raises HistoryWriteError, before anything is measured, when
    the history folder cannot be written; the function raises NotSavedError when a run
    cannot be appended."""
    saved: list[tuple[Path, int]] = []
    if args.no_save:
        return None, saved
    from rwkvlab.bench import git_commit

    folder = Path(args.history_dir)
    if folder.exists() and not folder.is_dir():
        raise HistoryWriteError(f"--history-dir {folder} is not a folder")
    check_appendable(folder)
    commit = git_commit()  # once: the code does not change during a run

    def save(run: MicroRun, gpu) -> None:
        try:
            saved.append(save_run(run, title=args.title, gpu=gpu, history_dir=args.history_dir, commit=commit))
        except (HistoryWriteError, OSError) as e:  # OSError covers filelock.Timeout too
            raise NotSavedError(f"{run.change} was measured but not saved to {args.history_dir}: {e}") from e

    return save, saved


def main(bench: str, args: argparse.Namespace, measure: Callable[[Saver | None], tuple[list, list]]) -> int:
    """What a bench's main does around its measurements: open the history (unless --no-save),
    ``measure(save)`` -> (timings, failures), the closing lines. Exit 0, 1 when a measurement
    failed its check, 2 when nothing could run, 3 when a measured run could not be saved."""
    start = time.perf_counter()
    try:
        save, saved = saver_from_args(args)
    except HistoryWriteError as e:
        print(f"{bench}: {e}; nothing measured", file=sys.stderr)
        return EXIT_NOT_RUN
    try:
        timings, failures = measure(save)
    except NotSavedError as e:
        print(f"{bench}: {e}", file=sys.stderr)
        return EXIT_NOT_SAVED
    except ValueError as e:
        print(f"{bench}: {e}", file=sys.stderr)
        return EXIT_NOT_RUN
    print(f"# {len(timings)} measured, {len(failures)} failed, {time.perf_counter() - start:.1f} s")
    if save is not None:
        print(saved_text(saved))
    return 1 if failures else 0


def saved_text(saved: list[tuple[Path, int]]) -> str:
    """A closing line naming where the runs went."""
    files = sorted({str(path) for path, _ in saved})
    if not files:
        return "# nothing saved to the history"
    return f"# {len(saved)} run(s) saved to {', '.join(files)} (samples in the .jsonl beside it)"
