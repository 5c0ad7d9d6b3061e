"""The history reader and writer against the four seed files and hand-made broken ones.

The seed files in data/benchmarks/ were written by the original benchmark program, so they
fix both what the reader must return and, byte for byte, what the writer must produce.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest

from rwkvlab.history import (
    COLUMNS,
    HistoryWriteError,
    RunRecord,
    append_run,
    append_sidecar,
    format_run,
    sidecar_path,
)
from rwkvlab.quality import quality_hash
from conftest import read_with_warnings as read_quietly
from conftest import SEED_HISTORY

REPO = Path(__file__).resolve().parents[1]
SEEDS = REPO / "data" / "benchmarks"
ARCH = SEEDS / "m2max-architecture-opts.md"
LOADING = SEEDS / "m2max-loading.md"
CACHING = SEEDS / "m2max-caching-and-gemv.md"
FUSION = SEEDS / "m2max-fusion-and-metal.md"
UTC = timezone.utc




def run_at(df: pd.DataFrame, file: str, line: int) -> pd.Series:
    rows = df[(df["file"] == file) & (df["line"] == line)]
    assert len(rows) == 1, f"expected one run at {file}:{line}, found {len(rows)}"
    return rows.iloc[0]


def record_from_row(row: pd.Series) -> RunRecord:
    """The RunRecord that would write this run again (values as the file shows them)."""
    return RunRecord(
        title=row["title"], change=row["change"], timestamp=row["timestamp"].to_pydatetime(),
        model=row["model"], version=row["version"], layers=int(row["layers"]),
        embedding=int(row["embedding"]), gpu=row["gpu"], load_ms=row["load_ms"],
        prefill_tps=row["prefill_tps"], generation_tps=row["generation_tps"],
        quality_hash=row["quality_hash"], quality_tokens=list(row["quality_tokens"]),
    )


def without_lines(text: str, first: int, last: int) -> str:
    """``text`` with its 1-based lines first..last (inclusive) removed."""
    lines = text.splitlines(keepends=True)
    return "".join(lines[: first - 1] + lines[last:])


@pytest.fixture(scope="module")
def seeds() -> pd.DataFrame:
    df, messages = read_quietly(SEED_HISTORY)
    assert messages == []  # the seed files are well formed: not one warning
    return df


# ------------------------------------------------------------------------------------------
# Reading the seeds
# ------------------------------------------------------------------------------------------

def test_seed_run_counts_per_file(seeds):
    counts = seeds.groupby("file").size().to_dict()
    assert counts == {
        "m2max-architecture-opts.md": 5, "m2max-loading.md": 12,
        "m2max-caching-and-gemv.md": 7, "m2max-fusion-and-metal.md": 62,
    }
    assert len(seeds) == 86
    # a folder reads its *.md files sorted by name, each in file order
    assert list(seeds["file"].drop_duplicates()) == sorted(counts)
    for _, group in seeds.groupby("file"):
        assert group["line"].is_monotonic_increasing


def test_columns_and_dtypes(seeds):
    assert list(seeds.columns) == COLUMNS  # the seeds have no extra metric rows
    assert str(seeds["timestamp"].dtype) == "datetime64[us, UTC]"
    for col in ("layers", "embedding"):
        assert str(seeds[col].dtype) == "Int64"
    for col in ("load_ms", "prefill_tps", "generation_tps"):
        assert seeds[col].dtype == "float64"
    for col in ("file", "title", "change", "model", "version", "gpu", "quality_hash"):
        assert pd.api.types.is_string_dtype(seeds[col]), col
    assert seeds["line"].dtype == "int64"
    assert seeds.attrs["units"] == {"load_ms": "ms", "prefill_tps": "tok/s", "generation_tps": "tok/s"}
    assert all(s == {} for s in seeds["samples"])  # no sidecars next to the seeds


def test_every_seed_run_is_complete(seeds):
    assert not seeds[["timestamp", "load_ms", "prefill_tps", "generation_tps", "layers", "embedding"]].isna().any().any()
    assert set(seeds["gpu"]) == {"Apple M2 Max"}
    assert set(seeds["version"]) == {"V7"}
    assert set(seeds["layers"]) == {32} and set(seeds["embedding"]) == {2560}
    assert all(len(t) == 16 for t in seeds["quality_tokens"])
    assert all(re.fullmatch(r"[0-9a-f]{15,16}", h) for h in seeds["quality_hash"])
    assert seeds["model"].value_counts().to_dict() == {
        "2.9b-Q8_0.gguf": 41, "2.9b-Q4_K_M.gguf": 31, "rwkv7-g1b-2.9b-20251205-ctx8192-Q4_K_M.gguf": 14,
    }


def test_spot_values_architecture_opts(seeds):
    run = run_at(seeds, ARCH.name, 90)
    assert run["title"] == "Fused State Loop"
    assert run["change"] == "Fused two loops in time_mix_v7 to read state once per j iteration"
    assert run["timestamp"] == pd.Timestamp("2026-01-01 05:14:11", tz="UTC")
    assert (run["load_ms"], run["prefill_tps"], run["generation_tps"]) == (4468.99, 154.70, 44.36)
    assert run["quality_hash"] == "bcbb65bac1fd4a96"
    assert run["quality_tokens"] == [33, 3319, 153, 129] + [3319, 153, 129] * 4


def test_spot_values_loading_with_out_of_order_runs(seeds):
    first = run_at(seeds, LOADING.name, 18)
    assert first["model"] == "rwkv7-g1b-2.9b-20251205-ctx8192-Q4_K_M.gguf"
    assert (first["load_ms"], first["prefill_tps"], first["generation_tps"]) == (7519.07, 151.74, 43.52)
    # The 04:42:19 run was filed into "Zero-Copy Lazy Loading" after "Zero-Copy Mmap" (04:16:28)
    # existed, so file order and time order disagree; both runs keep their own section.
    later = run_at(seeds, LOADING.name, 134)
    earlier = run_at(seeds, LOADING.name, 159)
    assert later["title"] == "Zero-Copy Lazy Loading" and earlier["title"] == "Zero-Copy Mmap"
    assert later["change"] == "Using Arc<Mmap> for zero-copy lazy loading"
    assert later["timestamp"] > earlier["timestamp"]
    assert later["load_ms"] == 7557.06 and earlier["load_ms"] == 7361.74


def test_spot_values_caching_and_gemv(seeds):
    run = run_at(seeds, CACHING.name, 114)
    assert run["title"] == "Adaptive GEMV/GEMM Selection"
    assert run["change"] == "Changed turbo threshold from multiple-of-32 to N>64 for adaptive matmul selection"
    assert (run["load_ms"], run["prefill_tps"], run["generation_tps"]) == (4426.19, 218.43, 44.14)
    assert run["quality_hash"] == "3895ad4add71cff0"
    # the same title "Baseline" opens two other files too: titles are per file
    assert run_at(seeds, CACHING.name, 18)["title"] == "Baseline"


def test_spot_values_fusion_and_metal(seeds):
    run = run_at(seeds, FUSION.name, 1216)  # a hash of 15 hex digits (no zero padding)
    assert run["quality_hash"] == "f091452164ed0fc"
    assert run["title"] == "Metal Q8_0" and run["change"] == "Debug"
    assert run["timestamp"] == pd.Timestamp("2026-01-04 09:17:56", tz="UTC")
    assert (run["load_ms"], run["prefill_tps"], run["generation_tps"]) == (4524.61, 87.61, 39.00)
    assert run["quality_tokens"] == [46, 332, 46, 332, 46, 332, 332, 46, 332, 332, 46, 332, 332, 46, 332, 332]
    # a Q8_0 run filed (two days later) into the Q4_K_M "Metal Test" section
    late = run_at(seeds, FUSION.name, 271)
    assert (late["title"], late["model"], late["prefill_tps"]) == ("Metal Test", "2.9b-Q8_0.gguf", 596.39)
    assert late["quality_tokens"] == [2361] * 16
    # the fusion file's "## Baseline" holds a Q4_K_M run then three Q8_0 runs two days later
    baseline = seeds[(seeds["file"] == FUSION.name) & (seeds["title"] == "Baseline")]
    assert list(baseline["line"]) == [458, 480, 503, 526]
    assert list(baseline["model"]) == ["2.9b-Q4_K_M.gguf"] + ["2.9b-Q8_0.gguf"] * 3


# ------------------------------------------------------------------------------------------
# The quality hash against the seeds
# ------------------------------------------------------------------------------------------

def test_quality_hash_readme_example_and_no_padding():
    assert quality_hash([33, 3319, 153, 129] * 8) == "3895ad4add71cff0"
    assert quality_hash([1]) == "1"  # unpadded hex, so short hashes are legitimate
    assert quality_hash([7] * 40) == quality_hash([7] * 32)  # only the first 32 tokens count


def test_quality_hash_reproduces_seed_hashes_where_tokens_determine_it(seeds):
    """Only 16 of the 32 hashed tokens are shown. Where they repeat with period 4 the run most
    likely kept repeating, so the 32 are the 16 twice: the hash must then match. One run breaks
    the pattern; its hash shows the 32nd token differed, which the test pins down exactly."""
    periodic = [r for r in seeds.itertuples() if r.quality_tokens == r.quality_tokens[:4] * 4]
    assert len(periodic) == 71
    mismatched = [r for r in periodic if quality_hash(r.quality_tokens[:4] * 8) != r.quality_hash]
    assert [(r.file, r.line) for r in mismatched] == [(FUSION.name, 1446)]
    odd = mismatched[0]
    assert odd.quality_hash == "4382872596391595"
    assert quality_hash([2361] * 31 + [27854]) == odd.quality_hash
    # every file has periodic runs whose hash is reproduced
    assert {r.file for r in periodic if r not in mismatched} == set(seeds["file"])


# ------------------------------------------------------------------------------------------
# Reading broken and unusual input
# ------------------------------------------------------------------------------------------

RUN = """### 2026-02-01 10:00:00 - {change}

| Metric | Value |
|--------|-------|
| Model | m.gguf |
| Version | V7 |
| Layers | 12 |
| Embedding | 768 |
| GPU | llvmpipe |
| **Load Time** | **{load}** |
| **Prefill** | **100.50 tok/s** |
| **Generation** | **20.25 tok/s** |
| Quality Hash | `abc` |

<details><summary>Quality tokens (first 16)</summary>

```
[1, 2, 3]
```

</details>

"""


def write(tmp_path: Path, text: str, name: str = "h.md") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_broken_values_keep_the_run_and_name_file_and_line(tmp_path):
    text = "# B\n\n## T\n\n" + RUN.format(change="bad load", load="fast ms")  # heading at line 5
    path = write(tmp_path, text)
    df, messages = read_quietly(path)
    assert len(df) == 1
    run = df.iloc[0]
    assert math.isnan(run["load_ms"]) and run["prefill_tps"] == 100.5 and run["line"] == 5
    assert run["quality_tokens"] == [1, 2, 3] and run["quality_hash"] == "abc"
    assert messages == [f"{path}:14: Load Time 'fast ms' is not a number in ms; kept as missing"]


def test_load_time_in_seconds_is_converted(tmp_path):
    df, messages = read_quietly(write(tmp_path, "## T\n\n" + RUN.format(change="s", load="7.5 s")))
    assert df.iloc[0]["load_ms"] == 7500.0 and messages == []


def test_bad_heading_timestamp_keeps_the_run(tmp_path):
    text = "## T\n\n" + RUN.format(change="x", load="1 ms").replace("2026-02-01 10:00:00", "2026-02-30 10:00:00")
    text += "### 2026-2-1 9:00 - loose\n\n| Metric | Value |\n|---|---|\n| Prefill | 5 tok/s |\n"
    path = write(tmp_path, text)
    df, messages = read_quietly(path)
    assert list(df["line"]) == [3, 25]
    assert df["timestamp"].isna().all()
    assert df.iloc[0]["change"] == "x" and df.iloc[0]["prefill_tps"] == 100.5
    assert df.iloc[1]["prefill_tps"] == 5.0
    assert any(m.startswith(f"{path}:3: timestamp '2026-02-30 10:00:00' is not a valid") for m in messages)
    assert any(m.startswith(f"{path}:25: run heading '2026-2-1 9:00 - loose'") for m in messages)


def test_unparseable_table_still_gives_a_row_with_nans(tmp_path):
    text = "## T\n\n### 2026-02-01 10:00:00 - garbage\n\n| Metric | Value |\n|---|---|\n| ??? |\n\nno tokens\n"
    path = write(tmp_path, text)
    df, messages = read_quietly(path)
    assert len(df) == 1
    run = df.iloc[0]
    assert run["change"] == "garbage" and run["line"] == 3
    assert run[["load_ms", "prefill_tps", "generation_tps"]].isna().all()
    assert pd.isna(run["quality_hash"]) and run["quality_tokens"] == []
    assert f"{path}:7: metric row with label '???' has no name; row ignored" in messages
    assert any(m.startswith(f"{path}:5: metric table lacks the rows Model, Version") for m in messages)
    assert f"{path}:3: run has no quality tokens block ([t0, t1, ...]); kept as an empty list" in messages


def test_table_without_delimiter_row_is_read_line_by_line(tmp_path):
    text = "## T\n\n" + RUN.format(change="x", load="1.50 ms").replace("|--------|-------|\n", "")
    path = write(tmp_path, text)
    df, messages = read_quietly(path)
    run = df.iloc[0]
    assert (run["model"], run["load_ms"], run["generation_tps"], run["layers"]) == ("m.gguf", 1.5, 20.25, 12)
    assert messages == [f"{path}:5: metric table is not valid Markdown (is the |---|---| line missing?); "
                        "values read line by line"]


def test_truncated_file_keeps_the_last_run(tmp_path):
    full = "## T\n\n" + RUN.format(change="a", load="1 ms") + RUN.format(change="b", load="2 ms")
    cut = full[: full.index("| **Prefill** |", full.index("- b"))]  # ends inside run b's table
    path = write(tmp_path, cut)
    df, messages = read_quietly(path)
    assert list(df["change"]) == ["a", "b"]
    assert df.iloc[1]["load_ms"] == 2.0 and math.isnan(df.iloc[1]["prefill_tps"])
    assert f"{path}:27: metric table lacks the rows Prefill, Generation, Quality Hash; those values are missing" in messages


def test_free_form_sections_and_stray_text_are_not_runs(tmp_path):
    text = (
        "# Benchmark Results\n\nstray text\n\n## Analysis\n\nThe fused path wins because...\n\n"
        "| kernel | ms |\n|---|---|\n| wkv | 1.2 |\n\n### Observations\n\nprose only\n\n"
        "```\n## not a section\n### 2026-01-01 00:00:00 - not a run either\n```\n\n"
        "## T\n\n" + RUN.format(change="real", load="1 ms") + "trailing notes\n"
    )
    df, messages = read_quietly(write(tmp_path, text))
    assert list(df["change"]) == ["real"] and list(df["title"]) == ["T"]
    assert messages == []


def test_extra_metric_rows_become_columns_in_order_of_appearance(tmp_path):
    run_a = RUN.format(change="a", load="1 ms").replace(
        "| Quality Hash |", "| VRAM Peak (MiB) | 512.5 MiB |\n| Kernel Path | native |\n| Quality Hash |")
    run_b = RUN.format(change="b", load="1 ms").replace(
        "| Quality Hash |", "| Dispatches | 96 |\n| VRAM Peak (MiB) | 600 |\n| Quality Hash |")
    df, messages = read_quietly(write(tmp_path, "## T\n\n" + run_a + run_b))
    assert list(df.columns) == COLUMNS + ["vram_peak_mib", "kernel_path", "dispatches"]
    assert list(df["vram_peak_mib"]) == [512.5, 600.0] and df["vram_peak_mib"].dtype == "float64"
    assert df.attrs["units"]["vram_peak_mib"] == "MiB"
    assert df["kernel_path"].iloc[0] == "native" and pd.isna(df["kernel_path"].iloc[1])
    assert math.isnan(df["dispatches"].iloc[0]) and df["dispatches"].iloc[1] == 96.0
    assert messages == []


def test_extra_values_absent_markers_units_and_literal_text(tmp_path):
    """A bench run writes rows such as Logit error (``not checked`` when skipped) and Commit."""
    def run(change, logit, commit, dispatches):
        return RUN.format(change=change, load="1 ms").replace(
            "| Quality Hash |", f"| Logit error | {logit} |\n| Commit | {commit} |\n"
                               f"| Dispatches/token | {dispatches} |\n| Quality Hash |")
    text = "## T\n\n" + run("a", "1.2e-05", "1234abc", "96") + run("b", "not checked", "`1234567`", "n/a")
    df, messages = read_quietly(write(tmp_path, text))
    assert messages == []
    assert df["logit_error"].tolist()[0] == 1.2e-05 and math.isnan(df["logit_error"].iloc[1])
    assert df["dispatches_token"].iloc[0] == 96.0 and math.isnan(df["dispatches_token"].iloc[1])
    # "1234abc" is no number with unit "abc"; a value in backticks is literal text
    assert df["commit"].tolist() == ["1234abc", "1234567"] and pd.api.types.is_string_dtype(df["commit"])
    df, _ = read_quietly(write(tmp_path, "## T\n\n" + run("c", "2e-3", "7654321", "12ms"), "one.md"))
    assert df["commit"].tolist() == [7654321.0]  # an unquoted all-digit value is a number
    assert df["dispatches_token"].tolist() == [12.0] and df.attrs["units"]["dispatches_token"] == "ms"


def test_duplicate_runs_are_both_kept_with_a_warning(tmp_path):
    path = write(tmp_path, "## T\n\n" + RUN.format(change="same", load="1 ms") * 2)
    df, messages = read_quietly(path)
    assert len(df) == 2
    assert messages == [f"{path}:25: same timestamp and change as the run at line 3; both kept"]


def test_missing_path_invalid_utf8_and_empty_input(tmp_path):
    df, messages = read_quietly(tmp_path / "nope.md")
    assert df.empty and list(df.columns) == COLUMNS
    assert messages == [f"{tmp_path / 'nope.md'}: no such file or folder; nothing read from it"]
    path = tmp_path / "latin1.md"
    path.write_bytes(("## T\n\n" + RUN.format(change="caf\xe9", load="1 ms")).encode("latin-1"))
    df, messages = read_quietly(path)
    assert len(df) == 1 and df.iloc[0]["change"] == "caf\ufffd"
    assert messages == [f"{path}:3: is not valid UTF-8 from here on; undecodable bytes were read as U+FFFD (save the file as UTF-8)"]
    df, messages = read_quietly(write(tmp_path, "", "empty.md"))
    assert df.empty and messages == []


def test_paths_folders_and_lists(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path, "## T\n\n" + RUN.format(change="b", load="1 ms"), "sub/b.md")
    write(tmp_path, "## T\n\n" + RUN.format(change="a", load="1 ms"), "sub/a.md")
    write(tmp_path, "not history", "sub/notes.txt")
    one = write(tmp_path, "## T\n\n" + RUN.format(change="c", load="1 ms"), "c.md")
    df, _ = read_quietly([tmp_path / "sub", str(one)])
    assert list(df["file"]) == ["a.md", "b.md", "c.md"]
    assert len(read_quietly(ARCH)[0]) == 5 and len(read_quietly(str(ARCH))[0]) == 5


# ------------------------------------------------------------------------------------------
# Writing: the seeds' exact layout, round trips, safety
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "seed, first, last, why",
    [
        (FUSION, 271, 293, "a run filed into the middle of a section (before '## Metal V7 Test')"),
        (LOADING, 134, 156, "a run filed at the end of a section followed by another section"),
        (FUSION, 1444, 1469, "a run at the end of the file's last section"),
        (ARCH, 112, 136, "a new section at the end of the file"),
    ],
)
def test_append_reproduces_the_seed_bytes(tmp_path, seeds, seed, first, last, why):
    """Remove a run the original program wrote, write it again: the file must be identical."""
    original = seed.read_text(encoding="utf-8")
    heading_line = first if original.splitlines()[first - 1].startswith("### ") else first + 2
    row = run_at(seeds, seed.name, heading_line)
    path = write(tmp_path, without_lines(original, first, last))
    line = append_run(path, record_from_row(row))
    assert path.read_text(encoding="utf-8") == original, why
    assert line == heading_line


def test_new_file_gets_a_header_then_the_seed_layout(tmp_path, seeds):
    path = tmp_path / "new.md"
    append_run(path, record_from_row(run_at(seeds, ARCH.name, 18)))
    text = path.read_text(encoding="utf-8")
    seed = ARCH.read_text(encoding="utf-8")
    assert text.startswith("# Benchmark Results\n\n") and "\n---\n\n## Baseline\n\n" in text
    assert text[text.index("## Baseline"):] == seed[seed.index("## Baseline"):seed.index("## Shader Opt 1")]


def test_round_trip_with_extras_missing_values_and_escapes(tmp_path):
    path = tmp_path / "lab.md"
    stamp = datetime(2026, 3, 1, 12, 30, 5, 999_999, tzinfo=UTC)
    record = RunRecord(
        "Fusion | on", "fused LN+TS\nsecond line", timestamp=stamp, model="tiny|x.gguf", version="V7",
        layers=12, embedding=768, gpu="llvmpipe (LLVM 17)", load_ms=1234.5678, prefill_tps=99.999,
        generation_tps=None, quality_tokens=list(range(40)),
        extra={"VRAM Peak (MiB)": 123.456789, "dispatches": 96, "kernel path": "native", "p50": "12.5 ms"},
    )
    line = append_run(path, record)
    df, messages = read_quietly(path)
    assert messages == []
    run = df.iloc[0]
    assert run["line"] == line == 14
    assert (run["title"], run["change"]) == ("Fusion | on", "fused LN+TS second line")
    assert run["timestamp"] == pd.Timestamp("2026-03-01 12:30:05", tz="UTC")  # whole seconds
    assert (run["model"], run["gpu"], run["layers"], run["embedding"]) == ("tiny|x.gguf", "llvmpipe (LLVM 17)", 12, 768)
    assert run["load_ms"] == 1234.57 and run["prefill_tps"] == 100.0 and math.isnan(run["generation_tps"])
    assert run["quality_hash"] == quality_hash(range(32)) and run["quality_tokens"] == list(range(16))
    assert (run["vram_peak_mib"], run["dispatches"], run["kernel_path"], run["p50"]) == (123.456789, 96.0, "native", 12.5)
    assert "| **Generation** | **n/a** |" in path.read_text()


def test_append_goes_to_the_last_section_with_that_title(tmp_path):
    path = write(tmp_path, "## A\n\n" + RUN.format(change="1", load="1 ms") + "## B\n\n"
                 + RUN.format(change="2", load="1 ms") + "## A\n\n" + RUN.format(change="3", load="1 ms")
                 + "## C\n\nnotes\n")
    append_run(path, RunRecord("A", "4", timestamp=datetime(2026, 3, 1, tzinfo=UTC)))
    df, _ = read_quietly(path)
    assert list(zip(df["title"], df["change"])) == [("A", "1"), ("B", "2"), ("A", "3"), ("A", "4")]
    assert path.read_text().endswith("## C\n\nnotes\n")


def test_refusals_leave_the_file_alone(tmp_path):
    unclosed = write(tmp_path, "## T\n\n```\nnever closed\n", "open.md")
    before = unclosed.read_bytes()
    with pytest.raises(HistoryWriteError, match="unclosed ``` code block"):
        append_run(unclosed, RunRecord("T", "x"))
    assert unclosed.read_bytes() == before
    readonly = write(tmp_path, "## T\n", "ro.md")
    readonly.chmod(0o444)
    with pytest.raises(HistoryWriteError, match="is read-only"):
        append_run(readonly, RunRecord("T", "x"))
    assert readonly.read_text() == "## T\n"
    with pytest.raises(ValueError, match="no time zone"):
        RunRecord("T", "x", timestamp=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="clashes with the fixed column 'load_ms'"):
        RunRecord("T", "x", extra={"Load MS": 1.0})
    with pytest.raises(ValueError, match="not 1-16 hex digits"):
        RunRecord("T", "x", quality_hash="xyz")


def test_format_run_matches_a_seed_block(seeds):
    seed = FUSION.read_text(encoding="utf-8").splitlines(keepends=True)
    block = "".join(seed[1215:1237])  # lines 1216..1237: heading to the blank after </details>
    assert format_run(record_from_row(run_at(seeds, FUSION.name, 1216))) == block


# ------------------------------------------------------------------------------------------
# Sidecar
# ------------------------------------------------------------------------------------------

def test_sidecar_records_join_onto_their_runs(tmp_path):
    path = tmp_path / "lab.md"
    t1, t2 = datetime(2026, 3, 1, 1, tzinfo=UTC), datetime(2026, 3, 1, 2, tzinfo=UTC)
    append_run(path, RunRecord("T", "one", timestamp=t1, prefill_tps=100.0))
    append_run(path, RunRecord("T", "two", timestamp=t2, prefill_tps=101.0))
    append_sidecar(path, {"timestamp": t2, "change": "two", "samples": {"prefill_tps": [100.5, 101.5, 101.0]},
                          "options": {"fusions": ["att_ln_ts"]}})
    append_sidecar(path, {"timestamp": "2026-03-01T00:00:00Z", "change": "nobody", "samples": {}})
    with sidecar_path(path).open("a") as handle:
        handle.write("{not json\n")
    assert sidecar_path(path).name == "lab.md.jsonl"
    assert json.loads(sidecar_path(path).read_text().splitlines()[0])["timestamp"] == "2026-03-01T02:00:00+00:00"
    df, messages = read_quietly(path)
    assert df.iloc[0]["samples"] == {} and df.iloc[1]["samples"] == {"prefill_tps": [100.5, 101.5, 101.0]}
    side = sidecar_path(path)
    assert messages == [
        f"{side}:2: no run in lab.md has timestamp 2026-03-01T00:00:00Z and change 'nobody'; record not joined",
        f"{side}:3: not valid JSON (Expecting property name enclosed in double quotes); line skipped",
    ]
    with pytest.raises(ValueError, match="needs 'timestamp' and 'change'"):
        append_sidecar(path, {"samples": {}})


def test_history_and_verdicts_never_import_wgpu():
    """The history tools must run on machines without a GPU stack (a fresh interpreter checks)."""
    code = "import sys, rwkvlab.history, rwkvlab.verdicts; print(sorted(m for m in sys.modules if m.startswith('wgpu')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
