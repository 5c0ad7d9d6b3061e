"""Property tests: reading never raises or drops a run; appending only inserts, and reads back.

Hypothesis builds the inputs from three sources: arbitrary Unicode, shuffled seed lines mixed
with lines chosen to trip a Markdown reader, and seed files cut at arbitrary points.
"""
from __future__ import annotations

import math
import re
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rwkvlab.history import (
    HistoryWarning,
    HistoryWriteError,
    RunRecord,
    append_run,
    parse_history_text,
    read_history,
)
from conftest import SEED_HISTORY

REPO = Path(__file__).resolve().parents[1]
SEEDS = REPO / "data" / "benchmarks"
LOADING_TEXT = (SEEDS / "m2max-loading.md").read_text(encoding="utf-8")
SEED_LINES = sorted({line for p in SEED_HISTORY for line in p.read_text(encoding="utf-8").splitlines()})
TRICKY_LINES = [
    "```", "~~~", "```bash", "## ", "##", "# Title", "### ", "###", "### 2026-13-45 99:99:99 - bad",
    "### 2026-01-01 00:00:00", "### 2026-01-01T00:00:00Z - iso", "### notes", "#### deeper", "| a |",
    "|---|", "|---|---|---|", "| Metric | Value | Extra |", "| **Load Time** | **1e999 ms** |",
    "| Layers | 99999999999999999999999 |", "| Prefill | -nan tok/s |", "| Quality Hash | `XYZ` |",
    "| Quality Hash | `n/a` |", "| | |", "|", "[1, 2,", "[]", "[-1, 2]", "<details>", "<pre>", "</pre>",
    "<!--", "-->", "    ### indented code", "> ### quoted", "- ### listed", "Title\n---", "\t", "\r", "\x00",
    "| \\| | \\|\\| |", "**", "`", "\u2028",
]
UTC = timezone.utc
RUN_HEADING = re.compile(r"^### \d{4}-\d{1,2}-\d", re.MULTILINE)


def parse(text: str) -> list[dict]:
    """Parse and check that only HistoryWarnings came out (anything else is a bug)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = parse_history_text(text, "prop.md")
    assert all(issubclass(w.category, HistoryWarning) for w in caught), [str(w.message) for w in caught]
    return rows


markdownish = st.lists(st.sampled_from(SEED_LINES + TRICKY_LINES), max_size=60).map("\n".join)


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(), markdownish))
def test_any_text_parses_without_raising(text):
    rows = parse(text)
    assert all(isinstance(r["line"], int) and r["line"] >= 1 for r in rows)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.binary(max_size=400).map(lambda b: b.decode("latin-1")), markdownish))
def test_read_history_builds_a_frame_from_any_file(tmp_path, text):
    path = tmp_path / "any.md"
    path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HistoryWarning)
        df = read_history(path)
    assert len(df) == len(parse(text.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")))


FULL_ROWS = parse(LOADING_TEXT)


@settings(max_examples=120, deadline=None)
@given(st.integers(min_value=0, max_value=len(LOADING_TEXT)))
def test_cut_seed_keeps_every_run_it_still_shows(cut):
    """Every run heading left in a cut file is a row; runs cut after their block read unchanged."""
    text = LOADING_TEXT[:cut]
    rows = parse(text)
    assert len(rows) == len(RUN_HEADING.findall(text))
    for row, full in zip(rows, FULL_ROWS):
        assert row["line"] == full["line"]
        block_end = LOADING_TEXT.index("</details>", LOADING_TEXT.index(f"- {full['change']}")) + len("</details>")
        if cut >= block_end:
            assert {k: row[k] for k in full} == full


# Text that Markdown reads back as written: no newlines, no Markdown marks at the ends.
plain_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp"), exclude_characters="#*`_\\<>[]"),
    max_size=30,
)
numbers = st.one_of(st.none(), st.just(math.nan), st.just(math.inf), st.floats(min_value=-1e12, max_value=1e12))
ints = st.one_of(st.none(), st.integers(min_value=-10**12, max_value=10**12))
stamps = st.datetimes(min_value=datetime(1000, 1, 1), max_value=datetime(9999, 1, 1), timezones=st.just(UTC))
extra_values = st.one_of(st.integers(-10**9, 10**9), st.floats(allow_nan=False, allow_infinity=False), plain_text)


def records(text=plain_text) -> st.SearchStrategy[RunRecord]:
    extras = st.dictionaries(st.from_regex(r"[A-Z][a-z]{2,8} [a-z]{2,6}", fullmatch=True), extra_values, max_size=3)
    return st.builds(
        RunRecord, title=text, change=text, timestamp=stamps, model=text, version=text, layers=ints,
        embedding=ints, gpu=text, load_ms=numbers, prefill_tps=numbers, generation_tps=numbers,
        quality_tokens=st.lists(st.integers(0, 2**20), max_size=40), extra=extras,
    )


def read_back(path: Path, line: int) -> pd.Series:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HistoryWarning)
        df = read_history(path)
    rows = df[df["line"] == line]
    assert len(rows) == 1
    return rows.iloc[0]


def shown(value: float | None) -> float:
    return float("nan") if value is None or not math.isfinite(value) else float(f"{value:.2f}")


def same(a, b) -> bool:
    return (pd.isna(a) and pd.isna(b)) if (pd.isna(a) or pd.isna(b)) else a == b


@settings(max_examples=60, deadline=None)
@given(st.lists(records(), min_size=1, max_size=4))
def test_plain_records_always_append_and_read_back(recs):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "lab.md"
        for rec in recs:
            line = append_run(path, rec)
            row = read_back(path, line)
            assert (row["title"], row["change"], row["model"], row["version"], row["gpu"]) == (
                rec.title, rec.change, rec.model, rec.version, rec.gpu)
            assert row["timestamp"] == pd.Timestamp(rec.timestamp)
            assert same(row["layers"], rec.layers) and same(row["embedding"], rec.embedding)
            for col in ("load_ms", "prefill_tps", "generation_tps"):
                assert same(row[col], shown(getattr(rec, col)))
            assert row["quality_tokens"] == rec.quality_tokens[:16]
            assert same(row["quality_hash"], rec.quality_hash or float("nan"))


any_text = st.text(max_size=30)


@settings(max_examples=100, deadline=None)
@given(existing=st.one_of(markdownish, st.text(max_size=300), st.integers(0, len(LOADING_TEXT)).map(lambda k: LOADING_TEXT[:k])),
       rec=records(any_text))
def test_append_only_inserts_at_a_line_boundary(existing, rec):
    """The old bytes survive whole: new == old[:k] + insert + old[k:], k at a line start or the end.
    When the run would not read back as written, the append is refused and nothing changes."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "h.md"
        old = existing.encode("utf-8", errors="surrogatepass")
        path.write_bytes(old)
        try:
            append_run(path, rec)
        except HistoryWriteError:
            event("append refused")
            assert path.read_bytes() == old
            return
        event("append inserted")
        new = path.read_bytes()
        assert len(new) > len(old)
        prefix = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), len(old))
        # the insert may start with bytes equal to old[prefix:], so search the split point
        splits = [k for k in range(prefix + 1) if new[:k] == old[:k] and new.endswith(old[k:])]
        assert splits, "old bytes were changed, not only inserted into"
        assert any(k in (0, len(old)) or old[k - 1:k] in (b"\n", b"\r") for k in splits)
