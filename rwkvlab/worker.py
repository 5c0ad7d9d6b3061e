"""The benchmark worker: one ``rwkvlab bench --json --events`` subprocess per run.

The panel (``lab.py``), sweeps (``sweep.py``) and the cluster path all run benchmarks through
:func:`run_worker`: a GPU driver that crashes or hangs costs that run, never the caller. The
worker reports its progress as structured events, one JSON line per protocol step on stdout
(``{"event": "progress", "step", "steps", "stage"}``), then the record as the last line; its
stderr is for people.

That stderr also carries tqdm bars. tqdm redraws a bar after a ``\\r``, moves between nested bars
with ANSI cursor escapes (``ESC[A``), and never ends a bar's line, so a warning printed while a
bar is open lands right after the bar's text and an escape code. A worker killed mid-run leaves
only such redraws at the end. stderr is cut into pieces here, so the line that says why a worker
failed is the last thing it wrote for a person, never a bar fragment or a raw escape code.
"""
from __future__ import annotations

import codecs
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rwkvlab.bench import BenchRecord, BenchSettings
from rwkvlab.options import Options, to_args

# Where one piece of terminal output ends: a newline, a carriage return (a redraw from the start
# of the line), or an escape sequence (a cursor move: what follows is drawn somewhere else).
# Escapes are CSI sequences (ESC [ parameters final-byte) and the two-byte ESC @..Z \ ^ _ ones;
# "ESC [" and "ESC ]" alone are left whole so a sequence cut by a read still joins its rest.
_BREAK = re.compile(r"\r|\n|\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-Z\\^_])")
# What is left once the pieces are cut: the start of a sequence the worker never finished (it was
# killed mid-write), a lone ESC, a bell or another control byte.
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*|[\x00-\x08\x0b-\x1f\x7f]")
# One state of a tqdm bar with a known total: "desc:  40%|████      | 4/10 [...]".
TQDM_BAR = re.compile(r"^\s*(?P<desc>[^\r\n]*?):\s+\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)")
BENCH_ERROR = "rwkvlab bench:"  # how bench starts the line that says what to change


def split_pieces(text: str) -> list[str]:
    """``text`` cut at newlines, carriage returns and escape sequences. When reading a stream,
    the last piece may be unfinished: keep it and prepend it to the next read."""
    return _BREAK.split(text)


def clean(piece: str) -> str:
    """One piece without leftover control bytes or surrounding blanks ("" for a bar's erasure)."""
    return _CONTROL.sub("", piece).strip()


def human(piece: str) -> str:
    """One piece as a line for a person: cleaned, or "" when blank or a state of a bar."""
    piece = clean(piece)
    return "" if TQDM_BAR.match(piece) else piece


def last_words(lines: Sequence[str]) -> str:
    """Why a worker failed: bench's own error line (it says what to change; a multi-line cause
    such as a shader diagnostic follows it), else the last line (a traceback's exception, a
    driver's message), else ``"no message"``."""
    own = [line for line in lines if line.startswith(BENCH_ERROR)]
    return own[-1] if own else lines[-1] if lines else "no message"


# ----------------------------------------------------------------------------------------------
# Running one worker

KEPT_LINES = 300  # stderr lines kept for the log and the error text (bar states not counted)


def bench_command(model_args: Sequence[str], options: Options, settings: BenchSettings, *,
                  history_dir: str | os.PathLike, save: bool = False, title: str = "", change: str = "",
                  file: str | None = None, python: str = sys.executable) -> list[str]:
    """The ``python -m rwkvlab.cli bench ... --json --events`` line of one run.

    ``model_args`` names the model (``--model FILE`` or ``--preset P --format F``); the options
    travel through their one converter (:func:`rwkvlab.options.to_args`). Without ``save``,
    ``--history-dir`` only lets bench judge the run against the history; nothing is written.
    """
    cmd = [python, "-m", "rwkvlab.cli", "bench", *model_args, *to_args(options),
           "--prefill", str(settings.prefill), "--generate", str(settings.generate),
           "--warmup", str(settings.warmup), "--repeat", str(settings.repeat),
           "--history-dir", str(history_dir), "--json", "--events"]
    if title:
        cmd += ["--title", title]
    if change:
        cmd += ["--change", change]
    if file:
        cmd += ["--file", file]
    if not settings.reference:
        cmd.append("--no-reference")
    if not settings.progress:
        cmd.append("--no-progress")
    if not save:
        cmd.append("--no-save")
    return cmd


@dataclass
class WorkerResult:
    """What one worker run gave: the record (None when it failed), bench's JSON (with its verdict
    and where it saved the run), the exit status, why it failed, its stderr lines, the time."""

    record: BenchRecord | None
    raw: dict[str, Any] | None
    returncode: int | None
    error: str | None
    stderr: list[str]
    seconds: float


def worker_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment plus ``extra``, with this package importable in the worker (a bare
    checkout imported through sys.path, not installed, must still be found by ``python -m``)."""
    env = {**os.environ, **(extra or {})}
    here = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_worker(cmd: Sequence[str], *, timeout: float = 1800.0,
               on_progress: Callable[[int, int, str], None] | None = None,
               on_line: Callable[[str], None] | None = None,
               on_start: Callable[[subprocess.Popen], None] | None = None,
               relay: bool = False, env: Mapping[str, str] | None = None) -> WorkerResult:
    """Run ``cmd`` (:func:`bench_command`) and read its record.

    ``on_progress(step, steps, stage)`` receives bench's progress events, ``on_line`` every
    stderr line for a person (summary, warnings), ``on_start`` the process (to stop it);
    ``relay`` also copies the worker's stderr, bars and all, to this process's stderr (a
    terminal user watching a sweep); ``env`` adds variables to the worker's environment (a
    sweep task's ``RWKVLAB_ADAPTER``). Exit 0, 1 (the logit check failed), 3 (measured, not
    saved) or 4 (a gate failed) with a record on stdout is a result; anything else is a failure
    described by bench's own error line, or by how the worker died.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=worker_env(env))
    if on_start:
        on_start(proc)
    records: list[dict[str, Any]] = []
    reader = threading.Thread(target=_read_events, args=(proc.stdout, records, on_progress), daemon=True)
    reader.start()
    timed_out = threading.Event()

    def stop() -> None:
        timed_out.set()
        proc.kill()  # our own child, by its handle

    timer = threading.Timer(timeout, stop)
    timer.start()
    lines: list[str] = []

    def keep(piece: str) -> None:
        line = human(piece)
        if line:
            lines.append(line)
            del lines[:-KEPT_LINES]
            if on_line:
                on_line(line)

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    try:
        while chunk := os.read(proc.stderr.fileno(), 4096):
            text = decoder.decode(chunk)
            if relay:  # text, not sys.stderr.buffer: a notebook's stderr has no byte buffer
                sys.stderr.write(text)
                sys.stderr.flush()
            *pieces, pending = split_pieces(pending + text)  # the last piece may be unfinished
            for piece in pieces:
                keep(piece)
        keep(pending)
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:  # interrupted while reading: never leave the worker running
            proc.kill()
            proc.wait()
    reader.join()
    proc.stdout.close()
    proc.stderr.close()
    seconds = time.perf_counter() - start
    if timed_out.is_set():
        return WorkerResult(None, None, proc.returncode, f"stopped after {timeout:g} s (its time limit)",
                            lines, seconds)
    if proc.returncode in (0, 1, 3, 4) and records:
        try:
            return WorkerResult(BenchRecord.from_dict(records[-1]), records[-1], proc.returncode, None, lines,
                                seconds)
        except (KeyError, TypeError, ValueError) as err:
            return WorkerResult(None, records[-1], proc.returncode,
                                f"the worker's record could not be read ({type(err).__name__}: {err})", lines, seconds)
    return WorkerResult(None, None, proc.returncode, failure_text(proc.returncode, lines), lines, seconds)


def _read_events(stream, records: list[dict[str, Any]], on_progress) -> None:
    """The worker's stdout: progress events go to ``on_progress``, records are kept."""
    for raw in stream:
        try:
            item = json.loads(raw)
        except ValueError:  # not ours (a library printing to stdout): not an event
            continue
        if not isinstance(item, dict):
            continue
        if item.get("event") == "progress":
            if on_progress:
                try:
                    on_progress(int(item["step"]), int(item["steps"]), str(item["stage"]))
                except (KeyError, TypeError, ValueError):
                    pass
        elif "event" not in item:
            records.append(item)


def failure_text(returncode: int | None, lines: Sequence[str]) -> str:
    """Why a worker gave no record: how it ended, then bench's own error line (it says what to
    change) or the last line it wrote for a person."""
    how = f"killed by signal {-returncode}" if returncode is not None and returncode < 0 else f"exit {returncode}"
    return f"{how}: {last_words(lines)}"
