"""Hostile history files: each known way to break the reader has its own test, then a corpus.

Issue 12 listed inputs that crashed, hung or silently misread the history (deep JSON in a
sidecar, quadratic regexes, NUL bytes, ANSI escapes, out-of-range timestamps, analysis tables
read as runs, a writer killed mid-append, and sizes that made verdicts quadratic). Every one
must now end as a HistoryWarning naming file:line (or a clear error where writing cannot
go on), in bounded time, printing no control characters to a terminal.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import re
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest

from rwkvlab import bench as bench_module
from rwkvlab import cli
from rwkvlab.bench import BenchRecord, BenchSettings
from rwkvlab.history import (
    HistoryWriteError,
    RunRecord,
    append_run,
    check_appendable,
    format_run,
    read_history,
    sidecar_path,
)
from rwkvlab.options import Options
from rwkvlab.report import format_table, summarize, summary_text, to_csv, to_json
from rwkvlab.verdicts import verdicts
from conftest import SEED_HISTORY
from conftest import read_with_warnings as read_warned

REPO = Path(__file__).resolve().parents[1]
LOADING = REPO / "data" / "benchmarks" / "m2max-loading.md"
UTC = timezone.utc




def small_history(tmp_path: Path, n: int = 3, name: str = "h.md") -> Path:
    """A valid history of ``n`` runs under one title, written by the writer itself."""
    path = tmp_path / name
    for i in range(n):
        append_run(path, RunRecord(
            title="T", change=f"run {i}", timestamp=datetime(2026, 3, 1, 12, 0, i, tzinfo=UTC),
            model="m.gguf", layers=12, embedding=768, gpu="G", load_ms=1000.0 + i,
            prefill_tps=300.0 + i, generation_tps=40.0, quality_tokens=[1, 2, 3] * 11))
    return path


def sidecar_line(i: int) -> str:
    return json.dumps({"timestamp": f"2026-03-01T12:00:0{i}+00:00", "change": f"run {i}",
                       "samples": {"prefill_tps": [300.0 + i] * 3}})


# ------------------------------------------------------------------------------------------
# Sidecar lines that are not records
# ------------------------------------------------------------------------------------------

def test_deeply_nested_sidecar_line_is_skipped_with_file_and_line(tmp_path):
    path = small_history(tmp_path)
    side = sidecar_path(path)
    side.write_text("\n".join([sidecar_line(0), "[" * 100_000, sidecar_line(1), "{\"a\":" * 50_000,
                               "9" * 10_000, sidecar_line(2)]) + "\n")
    df, messages = read_warned(path)
    assert [s["prefill_tps"][0] for s in df["samples"]] == [300.0, 301.0, 302.0]
    assert f"{side}:2: JSON nested too deeply to read; line skipped" in messages
    assert any(m.startswith(f"{side}:4: ") for m in messages)
    assert any(m.startswith(f"{side}:5: ") for m in messages)
    assert len(messages) == 3


def test_nested_samples_are_dropped_not_joined(tmp_path):
    """A sample value nested just below the parser's limit would break report writers later."""
    path = small_history(tmp_path, 1)
    deep = "[" * 500 + "]" * 500
    sidecar_path(path).write_text(
        f'{{"timestamp": "2026-03-01 12:00:00", "change": "run 0", '
        f'"samples": {{"prefill_tps": [1.0, 2.0], "deep": {deep}, "flag": [true]}}}}\n')
    df, messages = read_warned(path)
    assert df["samples"][0] == {"prefill_tps": [1.0, 2.0]}
    assert messages == [f"{sidecar_path(path)}:1: samples['deep'] is not a list of numbers; that metric not joined",
                        f"{sidecar_path(path)}:1: samples['flag'] is not a list of numbers; that metric not joined"]


def test_history_command_survives_a_bad_sidecar(tmp_path, capsys):
    path = small_history(tmp_path)
    sidecar_path(path).write_text("[" * 100_000 + "\n" + sidecar_line(1) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = cli.main(["history", str(path)])
    assert status == 0
    assert f"{sidecar_path(path)}:1: JSON nested too deeply to read; line skipped" in [str(w.message) for w in caught]
    assert capsys.readouterr().out.count("run ") == 3


def fake_record(history_dir: Path) -> BenchRecord:
    return BenchRecord(
        title="T", change="bench", timestamp=datetime(2026, 3, 2, tzinfo=UTC), model="m.gguf",
        model_path=str(history_dir / "m.gguf"), layers=12, embedding=768, gpu="G",
        adapter={"name": "G", "backend": "vulkan"}, options=Options(), settings=BenchSettings(progress=False),
        prompt=[1] * 8, load_ms=1000.0, engine_load_ms=900.0, prefill_seconds=[0.1] * 3,
        generation_seconds=[0.2] * 3, warmup_prefill_seconds=[0.1], warmup_generation_seconds=[0.2],
        quality_tokens=[1, 2, 3] * 11, consistent=True, logit_error=None, logit_tolerance=1e-3,
        reference="not checked", dispatches_per_token=96, commit="abc1234",
    )


@pytest.fixture
def fake_bench(monkeypatch, tmp_path):
    """`rwkvlab bench` with the measurement replaced: counts how often it would have measured."""
    measured = []

    def run_bench(*args, **kwargs):
        measured.append(1)
        return fake_record(tmp_path)

    monkeypatch.setattr(bench_module, "run_bench", run_bench)
    monkeypatch.setattr(bench_module, "model_from_args", lambda args: tmp_path / "m.gguf")
    return measured


def bench_args(folder: Path, *extra: str):
    return cli.build_parser().parse_args(
        ["bench", "--file", "h", "--history-dir", str(folder), "--no-progress", *extra])


def test_bench_saves_beside_a_bad_sidecar_line(tmp_path, fake_bench, capsys):
    path = small_history(tmp_path)
    sidecar_path(path).write_text("[" * 100_000 + "\n")
    assert bench_module.cli_bench(bench_args(tmp_path)) == bench_module.EXIT_OK  # judge reads it quietly
    assert fake_bench == [1]
    df, _ = read_warned(path)
    assert list(df["change"]) == ["run 0", "run 1", "run 2", "bench"]
    assert df["samples"].iloc[-1]["prefill_tps"] == [80.0] * 3


def test_bench_refuses_before_measuring_when_the_history_is_read_only(tmp_path, fake_bench, capsys):
    path = small_history(tmp_path)
    path.chmod(0o444)
    assert bench_module.cli_bench(bench_args(tmp_path)) == bench_module.EXIT_NOT_RUN
    assert fake_bench == []
    assert "is read-only" in capsys.readouterr().err
    with pytest.raises(HistoryWriteError, match="not a folder"):
        check_appendable(path / "below-a-file")


def test_bench_that_cannot_save_after_measuring_has_its_own_exit_code(tmp_path, fake_bench, capsys, monkeypatch):
    small_history(tmp_path)

    def refuse(path, record):
        raise HistoryWriteError(f"{path}: the new run would not read back")

    monkeypatch.setattr(bench_module, "append_run", refuse)
    status = bench_module.cli_bench(bench_args(tmp_path, "--json"))
    assert status == bench_module.EXIT_NOT_SAVED != bench_module.EXIT_LOGITS
    out, err = capsys.readouterr()
    assert "measured but not saved" in err and "would not read back" in err
    assert json.loads(out.splitlines()[-1])["saved"] == {"error": f"{tmp_path / 'h.md'}: the new run would not read back"}


# ------------------------------------------------------------------------------------------
# Headings: timestamps pandas cannot hold, and regexes that must stay linear
# ------------------------------------------------------------------------------------------

def with_headings(*stamps: str) -> str:
    """The loading seed with its first run headings' timestamps replaced, in order."""
    text = LOADING.read_text(encoding="utf-8")
    heads = list(re.finditer(r"^### (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", text, flags=re.M))[:len(stamps)]
    for head, stamp in reversed(list(zip(heads, stamps))):
        text = text[:head.start(1)] + stamp + text[head.end(1):]
    return text


def test_nanoseconds_next_to_a_far_year_read_with_a_warning(tmp_path):
    """pd.to_datetime unified such a column to nanoseconds and raised OutOfBoundsDatetime."""
    path = tmp_path / "h.md"
    path.write_text(with_headings("2026-01-04 06:02:59.123456789", "2500-01-01 00:00:00", "1500-06-01 00:00:00"))
    df, messages = read_warned(path)
    assert len(df) == 12 and str(df["timestamp"].dtype) == "datetime64[us, UTC]"
    assert list(df["timestamp"][:3]) == [pd.Timestamp("2026-01-04 06:02:59.123456+00:00"),
                                         pd.Timestamp("2500-01-01 00:00:00+00:00"),
                                         pd.Timestamp("1500-06-01 00:00:00+00:00")]
    assert messages == [f"{path}:18: timestamp '2026-01-04 06:02:59.123456789' has digits beyond the "
                        "microsecond; read to the microsecond"]
    verdicts(df)


@pytest.mark.parametrize("stamp, problem", [
    ("0000-01-01 00:00:00", "is not a valid date and time"),  # pandas read it as 1972
    ("9999-12-31 23:59:59-05:00", "falls outside the years 1-9999 once converted to UTC"),  # pandas wrapped it
    ("0001-01-01 00:00:00+05:00", "falls outside the years 1-9999 once converted to UTC"),
    ("2026-02-30 10:00:00", "is not a valid date and time"),
    ("2026-01-01 10:00:00+24:00", "is not a valid date and time"),
])
def test_impossible_timestamps_are_missing_with_a_warning(tmp_path, stamp, problem):
    path = tmp_path / "h.md"
    path.write_text(with_headings(stamp))
    df, messages = read_warned(path)
    assert len(df) == 12 and pd.isna(df["timestamp"][0]) and df["change"][0].startswith("Baseline after")
    assert messages == [f"{path}:18: timestamp '{stamp}' {problem}; kept as missing"]


def test_sidecar_timestamps_use_the_same_parser(tmp_path):
    path = small_history(tmp_path, 2)
    sidecar_path(path).write_text(
        '{"timestamp": "2026-03-01T12:00:00.000000999Z", "change": "run 0", "samples": {"x": [1]}}\n'
        '{"timestamp": "0000-03-01T12:00:01", "change": "run 1"}\n')
    df, messages = read_warned(path)
    assert df["samples"][0] == {"x": [1]}
    assert [m.split(": ", 1)[1] for m in messages] == [
        "no run in h.md has timestamp 0000-03-01T12:00:01 and change 'run 1'; record not joined",
        "1 run(s) have no record in h.md.jsonl (lines 37); their samples are missing (was a write interrupted?)",
    ]


HOSTILE_HEADINGS = {
    "spaces": " " * 50_000 + "x",
    "stamp then spaces": "2026-01-04 06:02:59" + " " * 50_000 + "x",
    "stamp then tabs and spaces": "2026-01-04 06:02:59" + "\t " * 25_000 + "x",
    "stamp, spaces, UTC": "2026-01-04 06:02:59" + " " * 50_000 + "UTCx",
    "stamp, spaces, dash": "2026-01-04 06:02:59" + " " * 25_000 + "-" + " " * 25_000,
    "dashes": "2026-01-04 06:02:59 " + "- " * 25_000,
    "digits": "2026-01-04 06:02:59." + "1" * 50_000 + "x",
}
HOSTILE_CELLS = {
    "number then spaces": "1" + " " * 50_000 + "!",
    "digits then junk": "1" * 50_000 + "x!",
    "unit run": "1 " + "a" * 50_000 + "/",
    "tokens": "[" + "1 " * 25_000 + "x",
    "token commas": "[" + "1, " * 16_000 + "x",
    "pipes": "|" * 50_000,
    "dash row": ":" + "-" * 50_000 + "x",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_HEADINGS) + sorted(HOSTILE_CELLS))
def test_long_hostile_lines_parse_in_linear_time(tmp_path, name):
    """50,000-character lines: a quadratic regex takes tens of seconds here, a linear one
    milliseconds (the old heading regex took about 8 s on 20,000 tab-space pairs)."""
    if name in HOSTILE_HEADINGS:
        text = f"## T\n\n### {HOSTILE_HEADINGS[name]}\n\n| Metric | Value |\n|---|---|\n| Prefill | 1 tok/s |\n"
    else:
        cell = HOSTILE_CELLS[name]
        text = (f"## T\n\n### 2026-01-04 06:02:59 - a\n\n| Metric | Value |\n|---|---|\n| Prefill | {cell} |\n"
                f"| Kernel | {cell} |\n| Metric | Value |\n| {cell}\n\n```\n{cell}\n```\n")
    path = tmp_path / "h.md"
    path.write_text(text)
    started = time.perf_counter()
    df, messages = read_warned(path)
    verdicts(df)
    assert time.perf_counter() - started < 2.0
    assert len(df) == 1 and all(len(m) < 1000 for m in messages)


# ------------------------------------------------------------------------------------------
# NUL, control characters, analysis tables, files that hold no run
# ------------------------------------------------------------------------------------------

def test_nul_before_every_newline_reads_every_run_with_one_warning(tmp_path):
    path = tmp_path / "h.md"
    path.write_bytes(LOADING.read_bytes().replace(b"\n", b"\x00\n"))
    df, messages = read_warned(path)
    clean, _ = read_warned(LOADING)
    assert len(df) == len(clean) == 12
    assert df.drop(columns="file").equals(clean.drop(columns="file"))
    newlines = LOADING.read_bytes().count(b"\n")
    assert messages == [f"{path}:1: {newlines} NUL character(s) from here on "
                        "(a UTF-16 file, or a corrupted one?); removed before reading"]


def test_utf16_file_is_read_with_a_warning(tmp_path):
    path = tmp_path / "h.md"
    path.write_bytes(LOADING.read_text(encoding="utf-8").encode("utf-16"))
    df, messages = read_warned(path)
    assert len(df) == 12 and messages == [f"{path}: is UTF-16 (byte order mark); read as such, but save it as UTF-8"]


def test_text_without_runs_is_never_silently_empty(tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("# Notes\n\nSome prose, a table:\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    df, messages = read_warned(path)
    assert df.empty and messages == [
        f"{path}: holds text but no run ('### <YYYY-MM-DD HH:MM:SS> - <change>' with a | Metric | Value | "
        "table); nothing read from it"]
    (tmp_path / "blank.md").write_text("\n  \n")
    assert read_warned(tmp_path / "blank.md")[1] == []


ANSI = "\x1b[2J\x1b[31mred\x1b[0m\x9b1m\u202eevil"


def test_ansi_escapes_never_reach_the_terminal(tmp_path, capsys):
    path = tmp_path / f"h{chr(27)}[31m.md"
    text = LOADING.read_text(encoding="utf-8")
    text = text.replace("Baseline after", "Baseline " + ANSI, 1).replace("## Batched", "## " + ANSI + " Batched", 1)
    text = text.replace("| GPU | Apple M2 Max |", f"| GPU | Apple {ANSI} |", 1)
    path.write_text(text.replace("| Quality Hash |", f"| Note {ANSI} | {ANSI} |\n| Quality Hash |", 1))
    side = sidecar_path(path)
    side.write_text('{"timestamp": "2026-01-01T00:00:00", "change": "' + ANSI.encode("unicode_escape").decode()
                    .replace("\\x", "\\u00") + '"}\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = read_history(path)
        for fmt in ("table", "csv", "json"):
            assert cli.main(["history", "--format", fmt, str(path)]) == 0
    out, err = capsys.readouterr()
    messages = [str(w.message) for w in caught]
    assert df["gpu"][0] == "Apple " + ANSI  # the data keeps what the file says; printing escapes it
    assert any(".md:16: 20 control character(s) from here on (first U+001B" in m for m in messages)
    for shown in [out, err, *messages]:
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e]", shown), shown[:200]
    assert "\\x1b[31mred" in out


def test_analysis_table_under_a_heading_is_not_a_run(tmp_path):
    text = LOADING.read_text(encoding="utf-8")
    text += ("\n### Analysis\n\n| Metric | Current | Target | Gap |\n|---|---|---|---|\n"
             "| Speedup | 1.2x | 2x | 0.8x |\n| Prefill | 150 | 200 | 50 |\n\n### Notes\n\nprose\n")
    path = tmp_path / "h.md"
    path.write_text(text)
    df, messages = read_warned(path)
    line = text.splitlines().index("### Analysis") + 1
    assert len(df) == 12
    assert messages == [f"{path}:{line}: section 'Analysis' is not a run (no '<timestamp> - <change>' heading, "
                        "and no | Metric | Value | table of run metrics); skipped"]
    # An undated heading over a real run table is still a run, as before, with its warning.
    path.write_text(text.replace("### 2025-12-31 02:16:41 - Baseline", "### Baseline", 1))
    df, messages = read_warned(path)
    assert len(df) == 12 and pd.isna(df["timestamp"][0]) and df["prefill_tps"][0] == 151.74
    assert any(":18: run heading 'Baseline after" in m for m in messages)


def test_seed_files_still_read_cleanly():
    df, messages = read_warned(SEED_HISTORY)
    assert len(df) == 86 and messages == []


# ------------------------------------------------------------------------------------------
# A writer killed inside append_run / between the run and its samples
# ------------------------------------------------------------------------------------------

KILLED_WRITER = """
import os, sys
from datetime import datetime, timezone
from rwkvlab import history
from rwkvlab.history import RunRecord, append_run, append_sidecar

path, where = sys.argv[1], sys.argv[2]
stamp = datetime(2026, 3, 1, 13, tzinfo=timezone.utc)
record = RunRecord(title="T", change=f"killed {where}", timestamp=stamp, model="m.gguf", prefill_tps=1.0)
if where == "replace":
    # The temporary file is written and synced; the process dies before it replaces the file.
    history.os.replace = lambda *args: os._exit(9)
append_run(path, record)
if where == "between":
    os._exit(9)  # the run is in the file, its samples never reach the sidecar
append_sidecar(path, {"timestamp": stamp, "change": record.change, "samples": {"prefill_tps": [1.0]}})
"""


def kill_writer(path: Path, where: str) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path), where], capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 9, proc.stderr.decode()


def test_killed_writer_leaves_no_silent_damage(tmp_path):
    path = small_history(tmp_path, 2)
    sidecar_path(path).write_text(sidecar_line(0) + "\n" + sidecar_line(1) + "\n")
    before = path.read_bytes()
    kill_writer(path, "replace")
    leftovers = sorted(p.name for p in tmp_path.glob(".h.md.*.tmp"))
    assert len(leftovers) == 1 and path.read_bytes() == before  # the file is whole, a temp is left
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        append_run(path, RunRecord(title="T", change="next", timestamp=datetime(2026, 3, 1, 14, tzinfo=UTC)))
    assert [str(w.message) for w in caught] == [
        f"{tmp_path / leftovers[0]}: temporary file of an interrupted write to h.md removed (its writer stopped "
        "before replacing the file; the file itself is whole)"]
    assert not list(tmp_path.glob(".h.md.*.tmp"))
    kill_writer(path, "between")
    df, messages = read_warned(path)
    assert list(df["change"]) == ["run 0", "run 1", "next", "killed between"]
    assert messages == [f"{path}:60: 2 run(s) have no record in h.md.jsonl (lines 60, 83); their samples "
                        "are missing (was a write interrupted?)"]


# ------------------------------------------------------------------------------------------
# The corpus: hundreds of damaged files, built the same way on every run
# ------------------------------------------------------------------------------------------

SMALL_VALID = format_run(RunRecord(
    title="", change="small", timestamp=datetime(2026, 4, 1, tzinfo=UTC), model="m.gguf", layers=2,
    embedding=64, gpu="G", load_ms=10.0, prefill_tps=100.0, generation_tps=10.0, quality_tokens=[5] * 32,
    extra={"Backend": "vulkan"}))
BASES = {p.stem: p.read_text(encoding="utf-8") for p in SEED_HISTORY}
BASES["small"] = "# Benchmark Results\n\n## Small\n\n" + SMALL_VALID + "\n" + SMALL_VALID.replace("small", "again")
INJECTIONS = ["\x00", "\x1b[2J\x1b[31m", "\x9b31m", "\u202e", "\x07\x08\x7f", "\r", "\u2028", "\ufeff",
              "[" * 20_000, "|" * 20_000, " " * 20_000, "\t " * 10_000, "1" * 20_000, "*_`" * 5_000,
              "```", "<details>", "<!--", "### ", "## ", "| Metric | Value |", "|---|---|", "\\"]
BAD_STAMPS = ["0000-00-00 00:00:00", "9999-12-31 23:59:59-05:00", "2026-01-04 06:02:59.123456789",
              "2500-01-01 00:00:00", "1500-01-01 00:00:00", "2026-02-30 25:61:61", "2026-01-04T06:02:59Z",
              "2026-01-04 06:02", "99999-01-01 00:00:00", "2026-01-04 06:02:59 UTC", "2026-01-04 06:02:59+99:99"]
GARBAGE_ROWS = ["| Prefill | ∞ tok/s |", "| Layers | 1e400 |", "| **Load Time** | **-0 ms** |", "| | |",
                "| Quality Hash | `" + "f" * 40 + "` |", "| Generation | nan |", "| a | b | c | d | e |",
                "|:-:|", "| Model |", "| Metric | Current | Target | Gap |", "[1, 2, 3", "[" + ", ".join(["7"] * 5000) + "]"]
SIDECARS = [
    "[" * 100_000, "{" * 10, '{"timestamp": "x", "change": 1}', "9" * 5_000, "\x00\x1b[31m{}\n",
    '{"timestamp": "2025-12-31T02:16:41Z", "change": "Baseline after removing per-layer GPU sync", '
    '"samples": {"prefill_tps": [' + "[" * 900 + "]" * 900 + '], "x": "\x1b[31m"}}',
    '{"timestamp": "2025-12-31T02:16:41Z", "change": "Baseline after removing per-layer GPU sync", '
    '"samples": {"prefill_tps": [1e999, -1, 0]}}',
    '{"timestamp": "0000-01-01T00:00:00", "change": "\\u001b[2J"}', "\ud800".encode("utf-8", "surrogatepass").decode("latin-1"),
]
# Anything a terminal acts on: C0 but newline, DEL, C1, bidi overrides.
TERMINAL_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def mutate(text: str, rng: random.Random, kind: str) -> str:
    """One kind of damage, placed at random (seeded) points of ``text``."""
    lines = text.splitlines(keepends=True)
    if kind == "truncate":
        return text[: rng.randrange(len(text) + 1)]
    if kind == "byte flips":
        data = bytearray(text.encode("utf-8"))
        for _ in range(rng.randint(1, 40)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return data.decode("utf-8", errors="surrogateescape")
    if kind == "inject":
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(len(text) + 1)
            text = text[:at] + rng.choice(INJECTIONS) + text[at:]
        return text
    if kind == "nul lines":
        return text.replace("\n", "\x00\n")
    if kind == "crlf":
        return text.replace("\n", "\r\n")
    if kind == "bad dates":
        heads = list(re.finditer(r"^### (\S+ \S+)", text, flags=re.M))
        for head in sorted(rng.sample(heads, min(len(heads), 3)), key=lambda m: -m.start()):
            text = text[:head.start(1)] + rng.choice(BAD_STAMPS) + text[head.end(1):]
        return text
    if kind == "duplicate headings":
        heads = [i for i, line in enumerate(lines) if line.startswith("##")]
        for i in sorted(rng.sample(heads, min(len(heads), 4)), reverse=True):
            lines[i:i] = [lines[i]] * rng.randint(1, 3)
        return "".join(lines)
    if kind == "table garbage":
        for _ in range(rng.randint(1, 8)):
            lines.insert(rng.randrange(len(lines) + 1), rng.choice(GARBAGE_ROWS) + "\n")
        return "".join(lines)
    if kind == "shuffle":
        rng.shuffle(lines)
        return "".join(lines)
    if kind == "huge line":
        lines.insert(rng.randrange(len(lines) + 1), "### 2026-01-04 06:02:59" + rng.choice(INJECTIONS[8:14]) * 2 + "\n")
        return "".join(lines)
    raise ValueError(kind)


KINDS = ["truncate", "byte flips", "inject", "nul lines", "crlf", "bad dates", "duplicate headings",
         "table garbage", "shuffle", "huge line"]


def corpus() -> list[tuple[str, bytes, str | None]]:
    """(name, file bytes, sidecar text or None): 5 bases x 10 kinds x 5 seeds, every fifth
    with a hostile sidecar, plus a few whole-file oddities."""
    cases = []
    for base_name, base in BASES.items():
        for kind in KINDS:
            for seed in range(5):
                rng = random.Random(f"{base_name}/{kind}/{seed}")
                text = mutate(base, rng, kind)
                side = "\n".join(rng.sample(SIDECARS, 3)) if seed == 4 else None
                cases.append((f"{base_name}-{kind}-{seed}", text.encode("utf-8", errors="surrogateescape"), side))
    cases += [("utf16", BASES["small"].encode("utf-16"), None), ("empty", b"", None),
              ("binary", bytes(range(256)) * 40, None), ("only-nul", b"\x00" * 5000, SIDECARS[0])]
    return cases


CORPUS = corpus()


@pytest.mark.parametrize("name, data, side", CORPUS, ids=[c[0] for c in CORPUS])
def test_hostile_corpus(tmp_path, name, data, side):
    """Reading, judging and printing a damaged file: only HistoryWarnings, in bounded time,
    and nothing on the terminal that a terminal would act on."""
    path = tmp_path / "h.md"
    path.write_bytes(data)
    if side is not None:
        sidecar_path(path).write_text(side, encoding="utf-8", errors="surrogateescape")
    started = time.perf_counter()
    df, messages = read_warned(path)
    judged = verdicts(df)
    printed = [to_csv(df, judged), to_json(df, judged), format_table(df, judged)]
    if len(df):
        printed.append(summary_text(summarize(df, judged)))
    assert time.perf_counter() - started < 10, name
    assert len(judged) == len(df)
    for text in printed:
        assert not TERMINAL_CONTROL.search(text.replace("\r\n", "\n")), (name, TERMINAL_CONTROL.search(text))
    for message in messages:
        assert not TERMINAL_CONTROL.search(message), (name, message[:200])
        assert len(message) < 2000, (name, message[:200])
    if data.strip(b" \t\r\n"):
        assert len(df) or messages, f"{name}: a non-empty file read as zero runs without a warning"
