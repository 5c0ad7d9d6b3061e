"""The benchmark history: Markdown run logs in, a pandas DataFrame out, new runs appended safely.

A history file (``data/benchmarks/*.md``) is Markdown written for people and read by machines::

    ## <title>                                   groups runs: the before/after of one change
    ### 2026-01-04 06:02:59 - <change>           one run; the timestamp is UTC
    | Metric | Value |                           its metric table (bold: Load Time, Prefill,
    ...                                          Generation; extra metric rows sit after
    | Quality Hash | `c55251c506e49c98` |        Generation and before Quality Hash)
    <details> ... [33, 236, 149, 157, ...] ...   the first 16 of the 32 greedy tokens

Reading is forgiving because these files are edited by hand: free text, tables that are not
runs, missing rows, repeated or out-of-order headings and truncated files are all expected.
Every ``###`` entry that looks like a run becomes a row, whatever is wrong with it, and every
problem is reported as a :class:`HistoryWarning` naming ``file:line``; reading never raises.
Markdown structure comes from markdown-it-py (CommonMark plus tables), so a ``## `` inside a
code block is not taken for a section.

Writing only ever inserts a run at a section boundary or appends at the end: bytes already
in a file are never changed. Each write replaces the file atomically (temporary file in the
same folder, then ``os.replace``) while holding ``<file>.lock``, so readers never see half a
run and concurrent writers in several processes lose nothing.

A JSON-lines *sidecar* ``<file>.jsonl`` (e.g. ``m2max-loading.md.jsonl``) may sit next to a
history file. Each line is one JSON object with the run's ``timestamp`` (ISO 8601, UTC when no
zone is given) and ``change``, which identify the run in that file, and optionally
``samples``: a mapping of metric name to the per-repeat measurements (e.g.
``{"prefill_tps": [218.1, 219.0, 218.7]}``). That mapping becomes the run's ``samples`` cell
(``{}`` for runs without a record); other keys are kept in the file for people and later
readers. Records are added with :func:`append_sidecar`.
"""
from __future__ import annotations

import gc
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from glob import escape as glob_escape
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock
from markdown_it import MarkdownIt
from markdown_it.token import Token

from .quality import SHOWN_TOKENS, quality_hash

__all__ = [
    "COLUMNS",
    "HistoryWarning",
    "HistoryWriteError",
    "RunRecord",
    "append_run",
    "append_sidecar",
    "check_appendable",
    "format_run",
    "frame_of_run",
    "printable",
    "read_history",
    "read_history_quietly",
    "read_sidecar",
    "sidecar_path",
    "snake_case",
]

# The fixed columns, in order. Extra metric rows follow as columns, in order of first appearance.
COLUMNS = [
    "file", "title", "timestamp", "change", "model", "version", "layers", "embedding", "gpu",
    "load_ms", "prefill_tps", "generation_tps", "quality_hash", "quality_tokens", "line", "samples",
    # From the run's sidecar record (missing for runs without one, such as the seed files'):
    # the prompt and generation lengths, the model file's content fingerprint, the resolved
    # options (Options.as_record), the environment it ran in (GPU, driver, versions, OS), the
    # bench settings and the model file's path: what `rwkvlab bench --replay` needs.
    "prompt_tokens", "generate_tokens", "fingerprint", "options", "environment", "settings", "model_path",
    "step_weight_bytes",  # weight bytes one generation step reads (bandwidth = bytes x tok/s)
]
_STR_COLUMNS = ["file", "title", "change", "model", "version", "gpu", "quality_hash", "fingerprint", "model_path"]
_INT_COLUMNS = ["layers", "embedding", "prompt_tokens", "generate_tokens", "step_weight_bytes"]
_FLOAT_COLUMNS = ["load_ms", "prefill_tps", "generation_tps"]

MISSING = "n/a"  # written where a value was not measured; read back as missing, silently

# A new file starts with this header: the same shape as the seed files' header.
NEW_FILE_HEADER = """# Benchmark Results

Each `###` entry below is one benchmark run; runs of one experiment share a `##` title.

**How to use:**
1. Benchmark the unchanged code under a title that names the experiment
2. Make the change
3. Benchmark again under the same title, so the before and after runs sit together

---

"""


class HistoryWarning(UserWarning):
    """Something in a history file could not be read as expected; the message names file:line."""


class HistoryWriteError(ValueError):
    """A run could not be appended; the file was left unchanged."""


# --------------------------------------------------------------------------------------------
# Records and the metric rows of the table
# --------------------------------------------------------------------------------------------

@dataclass
class RunRecord:
    """One benchmark run as :func:`append_run` writes it.

    ``timestamp`` must be timezone-aware (default: now, UTC); it is stored in UTC at whole-second
    resolution because that is what the file records. Newlines in text fields become spaces.
    ``quality_hash`` defaults to the hash of ``quality_tokens`` (give all 32 tokens; the file
    shows the first 16). ``None`` or NaN for a number is written as ``n/a`` and reads back as
    missing. ``extra`` holds further metric rows (name -> value), written in insertion order.
    """

    title: str
    change: str
    timestamp: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    model: str = ""
    version: str = "V7"
    layers: int | None = None
    embedding: int | None = None
    gpu: str = ""
    load_ms: float | None = None
    prefill_tps: float | None = None
    generation_tps: float | None = None
    quality_hash: str = ""
    quality_tokens: list[int] = field(default_factory=list)
    extra: dict[str, str | float | int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.timestamp.tzinfo is None:
            raise ValueError(
                f"RunRecord.timestamp {self.timestamp} has no time zone; history timestamps are UTC, "
                "so pass an aware datetime, e.g. datetime.now(timezone.utc)"
            )
        self.timestamp = self.timestamp.astimezone(timezone.utc).replace(microsecond=0)
        for name in ("title", "change", "model", "version", "gpu"):
            setattr(self, name, _one_line(getattr(self, name)))
        self.quality_tokens = [int(t) for t in self.quality_tokens]
        if not self.quality_hash and self.quality_tokens:
            self.quality_hash = quality_hash(self.quality_tokens)
        self.quality_hash = self.quality_hash.strip().lower()
        if self.quality_hash and not _HASH_RE.fullmatch(self.quality_hash):
            raise ValueError(f"RunRecord.quality_hash {self.quality_hash!r} is not 1-16 hex digits")
        columns: dict[str, str] = {}
        for key in self.extra:
            _check_extra_name(key)
            column = snake_case(str(key))
            if column in columns:
                raise ValueError(f"extra metrics {columns[column]!r} and {key!r} would share the column {column!r}")
            columns[column] = key


@dataclass(frozen=True)
class _Metric:
    """A known row of the metric table: its label, column, kind and (for numbers) unit."""

    label: str
    column: str
    kind: str  # "str", "int", "hash", or "float"
    unit: str = ""
    bold: bool = False


_METRICS = [
    _Metric("Model", "model", "str"),
    _Metric("Version", "version", "str"),
    _Metric("Layers", "layers", "int"),
    _Metric("Embedding", "embedding", "int"),
    _Metric("GPU", "gpu", "str"),
    _Metric("Load Time", "load_ms", "float", "ms", bold=True),
    _Metric("Prefill", "prefill_tps", "float", "tok/s", bold=True),
    _Metric("Generation", "generation_tps", "float", "tok/s", bold=True),
    _Metric("Quality Hash", "quality_hash", "hash"),
]
_METRIC_BY_LABEL = {m.label.lower(): m for m in _METRICS}
# Load times written in other units are converted to milliseconds rather than rejected.
_TIME_UNITS_MS = {"ms": 1.0, "s": 1000.0, "sec": 1000.0, "us": 1e-3, "µs": 1e-3, "μs": 1e-3}
_RATE_UNITS = {"tok/s", "tokens/s", "t/s", ""}

_HASH_RE = re.compile(r"[0-9a-f]{1,16}")
# A unit follows its number after a space ("512 MiB"), or directly when it is a common one
# ("12ms", "3x"): "1234abc" (a commit hash) must not read as 1234 of unit "abc".
_NUMBER_RE = re.compile(
    r"(?P<num>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf|infinity))"
    r"(?:(?P<space>\s+)(?P<unit>[A-Za-z%µμ][A-Za-z%µμ]*(?:/[A-Za-z]+)?)|(?P<attached>[A-Za-z%µμ/]+))?",
    re.IGNORECASE,
)
_ATTACHED_UNITS = {"%", "x", "ns", "us", "µs", "μs", "ms", "s", "b", "kb", "mb", "gb", "kib", "mib", "gib",
                   "tok/s", "t/s", "gb/s", "mb/s", "gflops", "tflops", "w", "mhz", "ghz"}
# Extra metric values that say "no value": missing in a numeric column, not a reason to make it text.
_ABSENT = {"", MISSING, "-", "\u2014", "none", "not checked", "not measured"}
_TOKENS_RE = re.compile(r"\[\s*(?:-?\d+\s*(?:,\s*-?\d+\s*)*,?\s*)?\]")
_DATE_START_RE = re.compile(r"\d{4}-\d{1,2}-\d{1,2}")
# A run's timestamp. Every quantifier sits between fixed characters, so one match attempt is
# linear in the heading's length: a heading of 20,000 spaces or tabs cannot make it backtrack
# quadratically (the earlier single heading regex had "\s*" then "\s+" back to back).
_STAMP_RE = re.compile(
    r"(?P<y>\d{4})-(?P<mo>\d{2})-(?P<d>\d{2})[ T](?P<h>\d{2}):(?P<mi>\d{2})"
    r"(?::(?P<s>\d{2})(?:\.(?P<frac>\d+))?)?"
    r"(?:\s*(?P<zone>Z|UTC|[+-]\d{2}:?\d{2}))?"
)
_DASHES = "-\u2013\u2014"
# The frame holds microseconds, not pandas' default nanoseconds, so that every year Python
# knows (1-9999) fits; finer digits are cut.
_TIME_FRACTION_DIGITS = 6


# C0 and C1 controls and DEL (ANSI escapes start with ESC or the one-byte CSI U+009B), and the
# bidirectional overrides that reorder what a terminal shows. Tab, LF and CR are layout.
_CONTROL_CODES = [c for c in range(0x20) if c not in (0x09, 0x0A, 0x0D)] + list(range(0x7F, 0xA0))
_BIDI_CODES = [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_CONTROL_RE = re.compile("[" + "".join(f"\\u{c:04x}" for c in _CONTROL_CODES) + "]")
_PRINTABLE = str.maketrans({c: (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}")
                            for c in [*range(0x20), *range(0x7F, 0xA0), *_BIDI_CODES]})


def printable(text: str) -> str:
    """``text`` safe for a terminal: control and bidi characters as ``\\x1b``-style escapes.

    History files are hand-edited and shared; text read from them must not be able to move
    the cursor, recolour or rewrite a terminal. Tabs and newlines are escaped too, so a
    value stays on its line of a table.
    """
    return text.translate(_PRINTABLE)


def snake_case(name: str) -> str:
    """Column name for a metric row label: ``"VRAM Peak (MiB)"`` -> ``"vram_peak_mib"``."""
    return re.sub(r"[^0-9a-z]+", "_", name.strip().strip("*").lower()).strip("_")


def _check_extra_name(name: str) -> None:
    column = snake_case(str(name))
    if not column:
        raise ValueError(f"extra metric name {name!r} has no letters or digits; give it a name")
    if column in COLUMNS or str(name).strip().lower() in _METRIC_BY_LABEL:
        raise ValueError(
            f"extra metric name {name!r} clashes with the fixed column {column!r}; "
            "use the RunRecord field instead, or rename the metric"
        )


def _one_line(text: str) -> str:
    # A newline inside a heading or a table cell would end it: store one line of text.
    return " ".join(str(text).split())


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

# Only the block structure is used (an inline token's raw content, never its children), so the
# inline pass, about half of the parse time of a large history, is switched off.
_MD = MarkdownIt("commonmark").enable("table").disable("inline")


def read_history(paths_or_dir: str | os.PathLike | Iterable[str | os.PathLike]) -> pd.DataFrame:
    """Read history files into one DataFrame, one row per run (``### <timestamp> - <change>``).

    ``paths_or_dir`` is a file, a folder (all its ``*.md`` files, sorted by name) or a list of
    either. Columns are :data:`COLUMNS` (strings use pandas' ``str`` dtype, ``timestamp`` is
    UTC, ``layers``/``embedding`` are ``Int64``, the three speeds are floats with NaN where
    missing, ``line`` is the 1-based line of the ``###`` heading) followed by one column per
    extra metric row (snake_case of its label; float where every value is a number with an
    optional unit, else str). ``df.attrs["units"]`` maps numeric columns to their unit.
    Malformed input gives :class:`HistoryWarning` messages naming file:line, never an exception.
    """
    rows: list[dict[str, Any]] = []
    extras: list[str] = []  # extra metric columns in order of first appearance
    for path in _history_files(paths_or_dir):
        file_rows = _read_file(path, extras)
        _join_sidecar(path, file_rows)
        rows.extend(file_rows)
    return _to_frame(rows, extras)


def read_history_quietly(paths_or_dir: str | os.PathLike | Iterable[str | os.PathLike]) -> pd.DataFrame:
    """:func:`read_history` without its warnings (``rwkvlab history`` reports those), and an
    empty frame where nothing exists yet: what judging new runs against the history reads."""
    items = [paths_or_dir] if isinstance(paths_or_dir, (str, os.PathLike)) else list(paths_or_dir)
    if not any(Path(p).exists() for p in items):
        return pd.DataFrame()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HistoryWarning)
        return read_history(items)


def _history_files(paths_or_dir: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    items = [paths_or_dir] if isinstance(paths_or_dir, (str, os.PathLike)) else list(paths_or_dir)
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.glob("*.md") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            _warn(path, None, "no such file or folder; nothing read from it")
    return files


def _warn(path: Path | str, line: int | None, message: str) -> None:
    where = f"{path}:{line}" if line else f"{path}"
    # Attribute the warning to the caller's line (a notebook cell), not to this module.
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    warnings.warn(HistoryWarning(printable(f"{where}: {message}")), stacklevel=level)


def _read_file(path: Path, extras: list[str]) -> list[dict[str, Any]]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        _warn(path, None, f"cannot be read ({exc.strerror}); no runs taken from it")
        return []
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        _warn(path, None, "is UTF-16 (byte order mark); read as such, but save it as UTF-8")
        return parse_history_text(data.decode("utf-16", errors="replace"), path, extras)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = data.decode("utf-8", errors="replace")
        _warn(path, data.count(b"\n", 0, exc.start) + 1,
              "is not valid UTF-8 from here on; undecodable bytes were read as U+FFFD (save the file as UTF-8)")
    return parse_history_text(text, path, extras)


def parse_history_text(text: str, path: Path | str = "<text>", extras: list[str] | None = None
                       ) -> list[dict[str, Any]]:
    """Parse the text of one history file into run dicts (see :func:`read_history`).

    ``path`` only names the source in the ``file`` column and in warnings. ``extras``, when
    given, collects the extra metric columns met, in order of first appearance.
    """
    extras = [] if extras is None else extras
    text = _check_controls(text, path)
    with _no_cyclic_gc():
        try:
            tokens = _MD.parse(text)
        except Exception as exc:  # markdown-it is robust, but a reader of hand-edited files must not stop
            _warn(path, None, f"Markdown parser failed ({exc!r}); no runs taken from this file")
            return []
        rows = []
        for block in _run_blocks(tokens):
            try:
                row = _parse_run(block, path, extras)
            except Exception as exc:  # a bug here must cost one run's values, never the run itself
                _warn(path, block.line, f"internal error while reading this run ({exc!r}); kept with missing values")
                row = _empty_row(path, block.title, block.line, block.heading)
            if row is not None:
                rows.append(row)
    _warn_duplicates(path, rows)
    if not rows and text.strip():
        # A file that says nothing would pass for an empty history: say what was expected.
        _warn(path, None, "holds text but no run ('### <YYYY-MM-DD HH:MM:SS> - <change>' with a "
                          "| Metric | Value | table); nothing read from it")
    return rows


def _check_controls(text: str, path: Path | str) -> str:
    """``text`` without NULs; one warning each for NULs and for other control characters."""
    nul = text.count("\x00")
    if nul:
        # A NUL makes a blank line non-blank, so one before every newline leaves a code
        # fence open to the end of the file and every run inside it: drop them instead.
        line = text.count("\n", 0, text.index("\x00")) + 1
        _warn(path, line, f"{nul} NUL character(s) from here on (a UTF-16 file, or a corrupted one?); "
                          "removed before reading")
        text = text.replace("\x00", "")
    found = _CONTROL_RE.search(text)
    if found:
        count = len(_CONTROL_RE.findall(text))
        line = text.count("\n", 0, found.start()) + 1
        _warn(path, line, f"{count} control character(s) from here on (first U+{ord(found.group()):04X}, "
                          "e.g. an ANSI escape); kept, shown escaped when printed")
    return text


@contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    # A 5 MB history is a million tokens. Each collection pass walks every live object, and
    # passes come every few hundred allocations, so parsing became quadratic (8.8 s instead of
    # 2.8 s for 10,000 runs). Tokens form no reference cycles: reference counting frees them.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass
class _Block:
    """The tokens of one ``###`` entry: from its heading up to the next heading of level 1-3."""

    title: str
    heading: str
    line: int
    tokens: list[Token]


def _run_blocks(tokens: list[Token]) -> list[_Block]:
    blocks: list[_Block] = []
    title = ""
    current: _Block | None = None
    for i, tok in enumerate(tokens):
        if tok.type == "heading_open" and tok.level == 0 and tok.tag in ("h1", "h2", "h3"):
            text = tokens[i + 1].content.strip() if i + 1 < len(tokens) else ""
            current = None
            if tok.tag == "h2":
                title = text
            elif tok.tag == "h1":
                title = ""  # a new top-level part: runs below it belong to no earlier section
            else:
                current = _Block(title, text, (tok.map[0] + 1) if tok.map else 0, [])
                blocks.append(current)
        elif current is not None:
            current.tokens.append(tok)
    return blocks


def _empty_row(path: Path | str, title: str, line: int, heading: str) -> dict[str, Any]:
    return {
        "file": Path(path).name, "title": title, "timestamp": pd.NaT, "change": heading,
        "model": float("nan"), "version": float("nan"), "layers": pd.NA, "embedding": pd.NA,
        "gpu": float("nan"), "load_ms": float("nan"), "prefill_tps": float("nan"),
        "generation_tps": float("nan"), "quality_hash": float("nan"), "quality_tokens": [],
        "line": line, "samples": {}, "prompt_tokens": None, "generate_tokens": None,
        "fingerprint": None, "options": {}, "environment": {}, "settings": {}, "model_path": None,
        "step_weight_bytes": None,
    }


def _parse_run(block: _Block, path: Path | str, extras: list[str]) -> dict[str, Any] | None:
    tables = _tables(block.tokens)
    metric_tables = [t for t in tables if _is_metric_table(t)]
    heading = _split_run_heading(block.heading)
    if heading is None and not _DATE_START_RE.match(block.heading):
        if not metric_tables:
            return None  # a free-form subsection (notes, analysis): not a run
        if not any(_is_run_table(t) for t in metric_tables):
            # e.g. "### Analysis" over | Metric | Current | Target | Gap |: a table about runs,
            # not one; reading it as a run would add a row of missing values to every plot.
            _warn(path, block.line, f"section {_clip(block.heading)!r} is not a run (no '<timestamp> - <change>' "
                                    "heading, and no | Metric | Value | table of run metrics); skipped")
            return None

    row = _empty_row(path, block.title, block.line, block.heading)
    if heading is None:
        _warn(path, block.line, f"run heading {_clip(block.heading)!r} is not '<YYYY-MM-DD HH:MM:SS> - <change>'; "
                                "kept with no timestamp")
    else:
        stamp_text, row["change"] = heading
        row["timestamp"], problem = _parse_timestamp(stamp_text)
        if problem:
            _warn(path, block.line, f"timestamp {_clip(stamp_text)!r} {problem}")

    if not metric_tables:
        _warn(path, block.line, "run has no metric table (| Metric | Value |); its metrics are missing")
    else:
        if len(metric_tables) > 1:
            _warn(path, metric_tables[1].line, "second metric table in one run ignored; the first one is used")
        _read_metric_table(metric_tables[0], row, path, extras)

    row["quality_tokens"] = _read_tokens(block.tokens, path, block.line)
    return row


@dataclass
class _Table:
    """A table's rows as (1-based line, cells); ``header`` is False for a line-by-line fallback."""

    line: int
    rows: list[tuple[int, list[str]]]
    header: bool = True


def _tables(tokens: list[Token]) -> list[_Table]:
    """Tables of a run: real Markdown tables, and pipe lines markdown-it did not take as a table."""
    tables: list[_Table] = []
    current: _Table | None = None
    cells: list[str] = []
    row_line = 0
    for tok in tokens:
        if tok.type == "table_open":
            current = _Table((tok.map[0] + 1) if tok.map else 0, [])
        elif tok.type == "tr_open":
            cells, row_line = [], (tok.map[0] + 1) if tok.map else 0
        elif tok.type == "inline" and current is not None:
            cells.append(tok.content)
        elif tok.type == "tr_close" and current is not None:
            current.rows.append((row_line, cells))
        elif tok.type == "table_close" and current is not None:
            tables.append(current)
            current = None
        elif tok.type == "inline" and tok.level == 1 and tok.content.lstrip().startswith("|") and tok.map:
            # A table with a broken or missing delimiter row is a paragraph to CommonMark; its
            # lines still carry the values, so read them one by one.
            lines = tok.content.split("\n")
            rows = [(tok.map[0] + 1 + k, _split_pipe_row(s)) for k, s in enumerate(lines) if s.strip().startswith("|")]
            tables.append(_Table(tok.map[0] + 1, rows, header=False))
    return tables


def _split_pipe_row(line: str) -> list[str]:
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    return [c.replace("\\|", "|").strip() for c in re.split(r"(?<!\\)\|", body)]


def _is_metric_table(table: _Table) -> bool:
    labels = [_plain(cells[0]).lower() for _, cells in table.rows if cells]
    return bool(labels) and (labels[0] == "metric" or any(label in _METRIC_BY_LABEL for label in labels))


def _is_run_table(table: _Table) -> bool:
    """A table that can only be a run's: two columns and at least one known metric row."""
    widths = [len([c for c in cells if c.strip()]) for _, cells in table.rows[:1]]
    labels = [_plain(cells[0]).lower() for _, cells in table.rows if cells]
    return widths[:1] != [] and widths[0] <= 2 and any(label in _METRIC_BY_LABEL for label in labels)


def _plain(cell: str) -> str:
    """A cell without its Markdown emphasis: ``**7519.07 ms**`` -> ``7519.07 ms``."""
    text = cell.strip()
    for mark in ("**", "__"):
        if len(text) >= 2 * len(mark) and text.startswith(mark) and text.endswith(mark):
            text = text[len(mark):-len(mark)].strip()
    return text


def _read_metric_table(table: _Table, row: dict[str, Any], path: Path | str, extras: list[str]) -> None:
    if not table.header:
        _warn(path, table.line, "metric table is not valid Markdown (is the |---|---| line missing?); "
                                "values read line by line")
    body = table.rows
    if body and body[0][1] and _plain(body[0][1][0]).lower() == "metric":
        body = body[1:]  # the header row
    if not table.header:
        body = [(n, cells) for n, cells in body if not all(re.fullmatch(r":?-+:?", c) for c in cells if c)]
    seen: dict[str, int] = {}
    for line, cells in body:
        if len(cells) < 2:
            _warn(path, line, f"metric row {_clip(repr(cells))} has no value cell; expected | <metric> | <value> |")
            continue
        if len(cells) > 2 and any(c.strip() for c in cells[2:]):
            _warn(path, line, f"metric row has {len(cells)} cells; only the first two are read")
        label, value = _plain(cells[0]), cells[1]
        metric = _METRIC_BY_LABEL.get(label.lower())
        column = metric.column if metric else snake_case(label)
        if not column:
            _warn(path, line, f"metric row with label {_clip(label)!r} has no name; row ignored")
            continue
        if column in seen:
            _warn(path, line, f"metric {_clip(label)!r} repeated (first at line {seen[column]}); the first value is kept")
            continue
        if metric is None and column in COLUMNS:
            _warn(path, line, f"metric {_clip(label)!r} would overwrite the {column!r} column; row ignored")
            continue
        seen[column] = line
        if metric is None:
            row[column] = _plain(value)
            if column not in extras:
                extras.append(column)
        else:
            row[column] = _read_known(metric, value, path, line)
    missing = [m.label for m in _METRICS if m.column not in seen]
    if missing:
        _warn(path, table.line, f"metric table lacks the rows {', '.join(missing)}; those values are missing")


def _read_known(metric: _Metric, cell: str, path: Path | str, line: int) -> Any:
    text = _plain(cell)
    if metric.kind == "hash":
        text = text.strip("`").strip()
    if text.lower() == MISSING:
        return pd.NA if metric.kind == "int" else float("nan")
    if metric.kind == "str":
        return text
    if metric.kind == "hash":
        value = text.lower()
        if _HASH_RE.fullmatch(value):
            return value
        _warn(path, line, f"Quality Hash {_clip(text)!r} is not 1-16 hex digits; kept as missing")
        return float("nan")
    if metric.kind == "int":
        if re.fullmatch(r"[-+]?\d{1,18}", text):  # 18 digits always fit the Int64 column
            return int(text)
        _warn(path, line, f"{metric.label} {_clip(text)!r} is not a whole number; kept as missing")
        return pd.NA
    parsed = _number_with_unit(text)
    if parsed is not None:
        number, unit = parsed
        if metric.unit == "ms" and unit.lower() in _TIME_UNITS_MS:
            return number * _TIME_UNITS_MS[unit.lower()]
        if metric.unit == "ms" and unit == "":
            return number
        if metric.unit == "tok/s" and unit.lower() in _RATE_UNITS:
            return number
    _warn(path, line, f"{metric.label} {_clip(text)!r} is not a number in {metric.unit}; kept as missing")
    return float("nan")


def _number_with_unit(text: str) -> tuple[float, str] | None:
    """``"151.74 tok/s"`` -> ``(151.74, "tok/s")``; None when the text is not a number."""
    match = _NUMBER_RE.fullmatch(text.strip())
    if match is None:
        return None
    attached = match.group("attached")
    if attached and attached.lower() not in _ATTACHED_UNITS:
        return None
    return float(match.group("num")), match.group("unit") or attached or ""


def _read_tokens(tokens: list[Token], path: Path | str, line: int) -> list[int]:
    """The quality tokens: the first code block (or paragraph) of the run holding ``[t0, t1, ...]``."""
    bad: Token | None = None
    for tok in tokens:
        if not (tok.type in ("fence", "code_block") or (tok.type == "inline" and tok.level == 1)):
            continue
        text = tok.content.strip()
        if not text.startswith("["):
            continue
        if _TOKENS_RE.fullmatch(text):
            values = [int(v) for v in re.findall(r"-?\d+", text)]
            if len(values) > SHOWN_TOKENS:
                _warn(path, _line_of(tok, line), f"{len(values)} quality tokens shown where the format shows "
                                                 f"{SHOWN_TOKENS}; all kept")
            return values
        bad = bad or tok
    if bad is not None:
        _warn(path, _line_of(bad, line), f"quality tokens {bad.content.strip()[:60]!r} are not a list of "
                                         "integers; kept as an empty list")
    else:
        _warn(path, line, "run has no quality tokens block ([t0, t1, ...]); kept as an empty list")
    return []


def _line_of(tok: Token, default: int) -> int:
    return (tok.map[0] + 1) if tok.map else default


def _clip(text: str, limit: int = 80) -> str:
    # Quoted input in a warning: enough to find it, not a 20,000-character line.
    return text if len(text) <= limit else text[:limit] + "..."


def _split_run_heading(heading: str) -> tuple[str, str] | None:
    """``(timestamp text, change)`` of a ``<timestamp> - <change>`` heading, else None."""
    match = _STAMP_RE.match(heading)
    if match is None:
        return None
    # Try with the zone first; "12:00 -0130 x" may also be "12:00" then the change "0130 x".
    ends = [match.end()] + ([match.start("zone")] if match.group("zone") else [])
    for end in ends:
        rest = heading[end:]
        if not rest.strip():
            return heading[:end].strip(), ""
        body = rest.lstrip()
        if len(body) < len(rest) and body[0] in _DASHES:
            return heading[:end].strip(), body[1:].strip()
    return None


def _parse_timestamp(text: str) -> tuple[pd.Timestamp, str | None]:
    """A heading or sidecar timestamp as UTC (no zone means UTC, the format's rule).

    Returns the timestamp (NaT when unusable) and, when something was wrong, what, for a
    warning. Parsed field by field rather than by pandas, whose parser turns a year 0000 into
    1972, wraps a zone shift past year 9999 and mixes nanosecond units into the column.
    """
    match = _STAMP_RE.fullmatch(str(text).strip())
    if match is None:
        return pd.NaT, "is not a valid date and time; kept as missing"
    frac = match.group("frac") or ""
    note = None
    if len(frac) > _TIME_FRACTION_DIGITS and frac[_TIME_FRACTION_DIGITS:].strip("0"):
        note = "has digits beyond the microsecond; read to the microsecond"
    zone = match.group("zone")
    try:
        if zone in (None, "Z", "UTC"):
            tz = timezone.utc
        else:
            sign = -1 if zone[0] == "-" else 1
            digits = zone[1:].replace(":", "")
            tz = timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
        local = datetime(int(match.group("y")), int(match.group("mo")), int(match.group("d")),
                         int(match.group("h")), int(match.group("mi")), int(match.group("s") or 0),
                         int(frac[:_TIME_FRACTION_DIGITS].ljust(_TIME_FRACTION_DIGITS, "0")), tzinfo=tz)
    except ValueError:
        return pd.NaT, "is not a valid date and time; kept as missing"
    try:
        utc = local.astimezone(timezone.utc)
    except OverflowError:
        return pd.NaT, "falls outside the years 1-9999 once converted to UTC; kept as missing"
    return pd.Timestamp(utc), note


def _warn_duplicates(path: Path | str, rows: list[dict[str, Any]]) -> None:
    first: dict[tuple, int] = {}
    for row in rows:
        if row["timestamp"] is pd.NaT:  # identity: pd.isna costs 50 us a call
            continue
        key = (row["timestamp"], row["change"])
        if key in first:
            _warn(path, row["line"], f"same timestamp and change as the run at line {first[key]}; both kept")
        else:
            first[key] = row["line"]


def _to_frame(rows: list[dict[str, Any]], extras: list[str]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=COLUMNS + extras)
    for col in _STR_COLUMNS:
        df[col] = df[col].astype("str")
    for col in _INT_COLUMNS:
        df[col] = df[col].astype("Int64")
    for col in _FLOAT_COLUMNS:
        df[col] = df[col].astype("float64")
    # Built at microseconds directly: pd.to_datetime would first unify the units, and one
    # nanosecond timestamp next to a year outside 1678-2261 raised OutOfBoundsDatetime.
    stamps = np.array([np.datetime64("NaT") if pd.isna(t) else t.tz_localize(None).to_datetime64()
                       for t in df["timestamp"]], dtype="datetime64[us]")
    df["timestamp"] = pd.Series(stamps, index=df.index).dt.tz_localize("UTC")
    df["line"] = df["line"].astype("int64")
    df["quality_tokens"] = df["quality_tokens"].astype(object)
    for col in ("samples", "options", "environment", "settings"):
        df[col] = [s if isinstance(s, dict) else {} for s in df[col]]
    units = {m.column: m.unit for m in _METRICS if m.unit}
    for col in extras:
        df[col], unit = _extra_column(df[col])
        if unit:
            units[col] = unit
    df.attrs["units"] = units
    return df


def _extra_column(values: pd.Series) -> tuple[pd.Series, str]:
    """Numbers (and the first unit met) when every value is a number or absent, else strings.

    Absent values (``n/a``, ``not checked``, ...) become NaN in a numeric column. A value in
    backticks is literal text: it keeps its column textual (the way to keep e.g. an all-digit
    commit hash a string) and loses the backticks.
    """
    cells = [v if isinstance(v, str) else None for v in values]
    given = [v for v in cells if v is not None and v.strip().lower() not in _ABSENT]
    parsed = [_number_with_unit(v) for v in given]
    if given and all(p is not None for p in parsed):
        unit = next((p[1] for p in parsed if p[1]), "")
        numbers = [float("nan") if v is None or v.strip().lower() in _ABSENT else _number_with_unit(v)[0]
                   for v in cells]
        return pd.Series(numbers, index=values.index, dtype="float64"), unit
    texts = [v[1:-1] if v is not None and len(v) >= 2 and v[0] == v[-1] == "`" else v for v in cells]
    return pd.Series(texts, index=values.index, dtype="str"), ""


# --------------------------------------------------------------------------------------------
# Sidecar
# --------------------------------------------------------------------------------------------

def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON-lines sidecar of a history file: ``runs.md`` -> ``runs.md.jsonl``."""
    return Path(f"{os.fspath(path)}.jsonl")


def read_sidecar(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    """The records of the sidecar of history file ``path``: ``(1-based line, record)`` pairs.

    Only lines holding a JSON object with a ``timestamp`` and a ``change`` are returned; every
    other non-blank line (torn, not JSON, nested too deep for the parser, a bare list, ...) is
    skipped with a :class:`HistoryWarning` naming ``file:line``. A missing sidecar gives ``[]``.
    Never raises.
    """
    return list(_sidecar_records(path))


def _sidecar_records(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    # A generator, so a reader's warnings about a line come in line order with its own.
    side = sidecar_path(path)
    if not side.is_file():
        return
    try:
        lines = side.read_bytes().decode("utf-8", errors="replace").splitlines()
    except OSError as exc:
        _warn(side, None, f"cannot be read ({exc.strerror}); samples not joined")
        return
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            _warn(side, number, f"not valid JSON ({exc.msg}); line skipped")
            continue
        except RecursionError:
            # The C decoder recurses once per bracket: a line of nested brackets would
            # otherwise escape every caller that only expects bad JSON.
            _warn(side, number, "JSON nested too deeply to read; line skipped")
            continue
        except ValueError as exc:  # e.g. an integer longer than Python converts from text
            _warn(side, number, f"JSON value cannot be read ({exc}); line skipped")
            continue
        if not isinstance(record, dict) or "timestamp" not in record or "change" not in record:
            _warn(side, number, "record needs a 'timestamp' and a 'change'; line skipped")
            continue
        yield number, record


def _described(record: dict[str, Any], side: Path, number: int) -> dict[str, Any]:
    """The columns a sidecar record adds to its run: lengths, fingerprint, options, environment.

    Only flat values get through (numbers, text, lists of text), for the reason
    :func:`_clean_samples` gives; a field of the wrong shape is left missing, with a warning.
    """
    out: dict[str, Any] = {}
    settings = record.get("settings") if isinstance(record.get("settings"), dict) else {}
    for column, value, limit in (("prompt_tokens", record.get("prompt_tokens"), 1 << 31),
                                 ("generate_tokens", settings.get("generate"), 1 << 31),
                                 ("step_weight_bytes", record.get("step_weight_bytes"), 1 << 50)):
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < limit:
            out[column] = value
        elif value is not None:
            _warn(side, number, f"{column} {str(value)[:40]!r} is not a count; not joined")
    fingerprint = record.get("fingerprint")
    if isinstance(fingerprint, str) and 0 < len(fingerprint) <= 128 and fingerprint.isalnum():
        out["fingerprint"] = fingerprint
    elif fingerprint not in (None, ""):  # "": the run's model content was not fingerprinted
        _warn(side, number, "fingerprint is not a hex string; not joined")
    model_path = record.get("model_path")
    if isinstance(model_path, str) and 0 < len(model_path) <= 4096:
        out["model_path"] = model_path
    for column in ("options", "environment", "settings"):
        value = record.get(column)
        if value is None:
            continue
        flat = isinstance(value, dict) and all(
            isinstance(v, (str, int, float, bool)) or v is None
            or (isinstance(v, list) and all(isinstance(x, str) for x in v)) for v in value.values())
        if flat:
            out[column] = {str(k): v for k, v in value.items()}
        else:
            _warn(side, number, f"{column!r} is not an object of plain values; not joined")
    return out


def frame_of_run(record: RunRecord, sidecar: dict[str, Any], file: str = "<new run>") -> pd.DataFrame:
    """The one-row DataFrame :func:`read_history` would give for ``record`` once written with
    ``sidecar`` beside it: how a run not yet saved is judged by the same rule as saved ones."""
    extras: list[str] = []
    rows = parse_history_text(f"## {_one_line(record.title)}\n\n{format_run(record)}", file, extras)
    for row in rows:
        row["line"] = 0  # not in any file yet
        row.update(_described(json.loads(json.dumps(sidecar, default=_json_default)), Path(file), 0))
        samples = sidecar.get("samples")
        row["samples"] = dict(samples) if isinstance(samples, dict) else {}
    return _to_frame(rows, extras)


def _clean_samples(samples: Any, side: Path, number: int) -> dict[str, list[float]] | None:
    """``samples`` as metric -> list of numbers; anything else is dropped with a warning.

    Report writers and notebooks walk these values recursively, so only the documented flat
    shape gets through: a nested value could be deep enough to break them.
    """
    if not isinstance(samples, dict):
        _warn(side, number, "'samples' is not a JSON object (metric -> values); not joined")
        return None
    clean: dict[str, list[float]] = {}
    for key, values in samples.items():
        if isinstance(values, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                            for v in values):
            clean[str(key)] = values
        else:
            _warn(side, number, f"samples[{str(key)[:40]!r}] is not a list of numbers; that metric not joined")
    return clean


def _join_sidecar(path: Path, rows: list[dict[str, Any]]) -> None:
    side = sidecar_path(path)
    if not side.is_file():
        return
    index = {}
    for row in rows:
        if row["timestamp"] is not pd.NaT:
            index.setdefault((row["timestamp"].floor("s"), row["change"]), []).append(row)
    joined: set[int] = set()
    for number, record in _sidecar_records(path):
        stamp, _ = _parse_timestamp(str(record["timestamp"]))
        key = (stamp.floor("s") if not pd.isna(stamp) else stamp, _one_line(str(record["change"])))
        matches = index.get(key, [])
        if not matches:
            _warn(side, number, f"no run in {path.name} has timestamp {str(record['timestamp'])[:40]} and "
                                f"change {str(record['change'])[:80]!r}; record not joined")
            continue
        for row in matches:
            joined.add(id(row))
        described = _described(record, side, number)
        for row in matches:
            row.update(described)
        samples = _clean_samples(record.get("samples", {}), side, number)
        if samples is None:
            continue
        for row in matches:
            if row["samples"]:
                _warn(side, number, f"a second record for the run at {path.name}:{row['line']}; the later one is used")
            row["samples"] = samples
    # A writer stopped between the run and its sidecar record leaves exactly this: say so
    # once per file rather than let the run pass for one that never had samples. Runs older
    # than the first recorded one predate the sidecar (hand-written, or seed runs): expected.
    recorded = [row["timestamp"] for row in rows if id(row) in joined]
    since = min(recorded) if recorded else None
    lacking = [row["line"] for row in rows if id(row) not in joined and row["timestamp"] is not pd.NaT
               and (since is None or row["timestamp"] > since)]
    if lacking:
        shown = ", ".join(str(n) for n in lacking[:5]) + (", ..." if len(lacking) > 5 else "")
        _warn(path, lacking[0], f"{len(lacking)} run(s) have no record in {side.name} (lines {shown}); "
                                "their samples are missing (was a write interrupted?)")


def append_sidecar(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON record to the sidecar of history file ``path`` (under the same lock).

    ``record`` needs ``timestamp`` (datetime or ISO string) and ``change`` matching a run of the
    history file; ``samples`` (metric -> list of numbers) is what :func:`read_history` joins.
    """
    if "timestamp" not in record or "change" not in record:
        raise ValueError(f"sidecar record for {path} needs 'timestamp' and 'change' keys; got {sorted(record)}")
    record = dict(record)
    stamp = record["timestamp"]
    if isinstance(stamp, datetime):
        if stamp.tzinfo is None:
            raise ValueError(f"sidecar timestamp {stamp} has no time zone; pass an aware (UTC) datetime")
        record["timestamp"] = stamp.astimezone(timezone.utc).replace(microsecond=0).isoformat()
    record["change"] = _one_line(str(record["change"]))
    line = json.dumps(record, default=_json_default, ensure_ascii=False) + "\n"
    path = Path(path).resolve()
    side = sidecar_path(path)
    _check_writable(side)
    with FileLock(f"{path}.lock", timeout=LOCK_TIMEOUT_S):
        _remove_stale_temporaries(path)
        old = side.read_bytes() if side.exists() else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"  # a torn last line stays on its own line, so this record stays readable
        _atomic_write(side, old + line.encode("utf-8"))


def _json_default(value: Any) -> Any:
    # NumPy scalars and arrays arrive from the bench runner; JSON needs plain numbers and lists.
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot store {type(value).__name__} in a sidecar record")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

LOCK_TIMEOUT_S = 120.0


def format_run(record: RunRecord) -> str:
    """The Markdown of one run, exactly as the seed files lay it out (ends with a blank line)."""
    *measured, hash_metric = _METRICS  # extra rows go between Generation and Quality Hash
    rows = [_metric_row(m, getattr(record, m.column)) for m in measured]
    rows += [(_one_line(str(k)), _format_extra(v)) for k, v in record.extra.items()]
    rows.append(_metric_row(hash_metric, record.quality_hash))
    table = "\n".join(f"| {_cell(k)} | {_cell(v)} |" for k, v in rows)
    shown = "[" + ", ".join(str(t) for t in record.quality_tokens[:SHOWN_TOKENS]) + "]"
    return (
        f"### {_format_timestamp(record.timestamp)} - {record.change}\n\n"
        "| Metric | Value |\n|--------|-------|\n"
        f"{table}\n\n"
        f"<details><summary>Quality tokens (first {SHOWN_TOKENS})</summary>\n\n"
        f"```\n{shown}\n```\n\n</details>\n\n"
    )


def _metric_row(metric: _Metric, value: Any) -> tuple[str, str]:
    """``(label, value)`` cells of a known metric in the seeds' style (bold, units, 2 decimals)."""
    if metric.kind == "float":
        text = _format_float(value, metric.unit)
    elif metric.kind == "int":
        text = _format_int(value)
    elif metric.kind == "hash":
        text = f"`{value or MISSING}`"
    else:
        text = value
    return (f"**{metric.label}**", f"**{text}**") if metric.bold else (metric.label, text)


def _format_timestamp(stamp: datetime) -> str:
    # Spelled out rather than strftime("%Y..."), which does not zero-pad years below 1000.
    return (f"{stamp.year:04d}-{stamp.month:02d}-{stamp.day:02d} "
            f"{stamp.hour:02d}:{stamp.minute:02d}:{stamp.second:02d}")


def _format_float(value: float | None, unit: str) -> str:
    if value is None or not math.isfinite(float(value)):
        return MISSING
    return f"{float(value):.2f} {unit}"


def _format_int(value: int | None) -> str:
    return MISSING if value is None else str(int(value))


def _format_extra(value: str | float | int) -> str:
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back as the same float
    return _one_line(str(value))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def append_run(path: str | os.PathLike, record: RunRecord) -> int:
    """Add ``record`` to history file ``path``; return the 1-based line of its ``###`` heading.

    The run goes at the end of the last ``## <title>`` section whose title equals
    ``record.title`` (a new section at the end of the file otherwise; a new or empty file gets
    the standard header first). Existing bytes are never changed, the file is replaced
    atomically under ``<path>.lock``, and the run is read back before the file is replaced:
    if it would not read back (e.g. the file ends inside an unclosed code block),
    :class:`HistoryWriteError` is raised and the file is left as it was.
    """
    path = Path(path).resolve()
    _check_writable(path)
    with FileLock(f"{path}.lock", timeout=LOCK_TIMEOUT_S):
        _remove_stale_temporaries(path)
        old = path.read_bytes() if path.exists() else b""
        # surrogateescape keeps undecodable bytes byte-exact through the text round trip
        text = old.decode("utf-8", errors="surrogateescape")
        offset, insert = _insertion(text, record)
        new_text = text[:offset] + insert + text[offset:]
        line = new_text.count("\n", 0, offset + insert.index("### ")) + 1
        _check_readback(path, new_text, line, record)
        _atomic_write(path, new_text.encode("utf-8", errors="surrogateescape"))
    return line


def check_appendable(path: str | os.PathLike) -> None:
    """Raise :class:`HistoryWriteError` when :func:`append_run` surely could not write ``path``.

    ``path`` is a history file, or a folder a history file will be created in (possibly not
    there yet). Cheap, so a caller can ask before spending minutes measuring; it cannot
    foresee everything (a full disk, a run that would not read back), so the append itself
    can still fail.
    """
    path = Path(path).resolve()
    if path.is_file():
        _check_writable(path)
        folder = path.parent
    else:
        folder = path
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise HistoryWriteError(f"{folder} is not a folder, so no history file can be created under it")
    # The temporary file, the lock file and os.replace all need the folder writable.
    if not os.access(folder, os.W_OK | os.X_OK):
        raise HistoryWriteError(f"{folder} is not writable, so no history file can be written there")


def _check_writable(path: Path) -> None:
    # os.replace would happily swap out a read-only file (and root passes every access check),
    # so honour the file's own mode: the seed histories are kept read-only on purpose.
    if path.exists() and not path.stat().st_mode & 0o222:
        raise HistoryWriteError(f"{path} is read-only; append to another history file instead "
                                "(or make it writable if you mean to extend it)")


def _insertion(text: str, record: RunRecord) -> tuple[int, str]:
    """Where the run goes in ``text`` and the exact text to insert there."""
    block = format_run(record)
    if not text.strip():
        return len(text), NEW_FILE_HEADER + f"## {record.title}\n\n" + block
    starts = _line_starts(text)
    sections = _sections(text)
    matching = [s for s in sections if s[0] == record.title]
    if not matching:
        return len(text), _gap(text, len(text), 1) + f"## {record.title}\n\n" + block
    _, _, end_line = matching[-1]
    if end_line is None:
        # The seeds append with two blank lines between the last run and the new one.
        return len(text), _gap(text, len(text), 2) + block
    offset = starts[end_line]
    return offset, _gap(text, offset, 1) + block + "\n"


def _gap(text: str, offset: int, blank_lines: int) -> str:
    """Newlines that make ``blank_lines`` blank lines between ``text[:offset]`` and what follows."""
    before = text[:offset]
    trailing = len(before) - len(before.rstrip("\n"))
    return "\n" * max(0, blank_lines + 1 - trailing)


def _line_starts(text: str) -> list[int]:
    # markdown-it numbers lines after turning \r\n and \r into \n; count lines the same way.
    return [0] + [m.end() for m in re.finditer(r"\r\n|\r|\n", text)]


def _sections(text: str) -> list[tuple[str, int, int | None]]:
    """``(title, heading line, line where the section ends or None at end of file)`` per ``##``."""
    tokens = _MD.parse(text)
    heads = [
        (tok.tag, tokens[i + 1].content.strip(), tok.map[0])
        for i, tok in enumerate(tokens)
        if tok.type == "heading_open" and tok.level == 0 and tok.tag in ("h1", "h2") and tok.map
    ]
    sections = []
    for k, (tag, title, line) in enumerate(heads):
        if tag == "h2":
            end = heads[k + 1][2] if k + 1 < len(heads) else None
            sections.append((title, line, end))
    return sections


def _check_readback(path: Path, new_text: str, line: int, record: RunRecord) -> None:
    """Parse the would-be file and insist the new run reads back with every value written."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HistoryWarning)
        rows = parse_history_text(new_text, path)
    row = next((r for r in rows if r["line"] == line), None)
    if row is None:
        problems = [f"no run is read at line {line}"]
    else:
        problems = [
            f"{name} {want!r} reads back as {row.get(name)!r}"
            for name, want in _written_values(record).items()
            if not _same(row.get(name), want)
        ]
    if problems:
        raise HistoryWriteError(
            f"{path}: the new run (title {record.title!r}, change {record.change!r}) would not read "
            f"back as written: {'; '.join(problems)}. The file was not changed. Usual causes: the "
            "file ends inside an unclosed ``` code block or HTML block (close it), or a text ends "
            "in ' #', a backslash or Markdown emphasis, which Markdown reads differently (reword it)."
        )


def _written_values(record: RunRecord) -> dict[str, Any]:
    """The values the reader must return for ``record``, column by column (before typing)."""
    def shown(value: float | None) -> float:
        return float("nan") if value is None or not math.isfinite(float(value)) else float(f"{float(value):.2f}")

    values: dict[str, Any] = {
        "title": record.title, "change": record.change, "timestamp": pd.Timestamp(record.timestamp),
        "model": record.model, "version": record.version, "gpu": record.gpu,
        "layers": pd.NA if record.layers is None else int(record.layers),
        "embedding": pd.NA if record.embedding is None else int(record.embedding),
        "load_ms": shown(record.load_ms), "prefill_tps": shown(record.prefill_tps),
        "generation_tps": shown(record.generation_tps),
        "quality_hash": record.quality_hash or float("nan"),
        "quality_tokens": record.quality_tokens[:SHOWN_TOKENS],
    }
    for key, value in record.extra.items():
        values[snake_case(str(key))] = _format_extra(value)
    return values


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, float) and math.isnan(want):
        return isinstance(got, float) and math.isnan(got)
    if want is pd.NA:
        return got is pd.NA
    return type(got) is type(want) and got == want


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporary files of ``path`` and its sidecar left by a writer that was killed.

    Call only while holding ``<path>.lock``: every writer holds it for as long as its
    temporary file exists, so any such file seen under the lock belongs to a dead writer.
    """
    for target in (path, sidecar_path(path)):
        pattern = re.compile(re.escape(f".{target.name}.") + r"\d+\.\d+\.tmp")
        for leftover in path.parent.glob(f".{glob_escape(target.name)}.*.tmp"):
            if pattern.fullmatch(leftover.name):
                try:
                    leftover.unlink()
                except OSError as exc:
                    _warn(leftover, None, f"temporary file of an interrupted write cannot be removed ({exc.strerror})")
                else:
                    _warn(leftover, None, f"temporary file of an interrupted write to {target.name} removed "
                                          "(its writer stopped before replacing the file; the file itself is whole)")


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so readers see the old file or the new one, never a mix."""
    mode = path.stat().st_mode & 0o777 if path.exists() else None
    for attempt in range(100):
        tmp = path.parent / f".{path.name}.{os.getpid()}.{attempt}.tmp"
        try:
            # 0o666 filtered by the umask, like any new file; an existing file keeps its mode.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    else:
        raise HistoryWriteError(f"{path}: cannot create a temporary file next to it (100 names taken)")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
