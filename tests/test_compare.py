"""`rwkvlab compare`: selectors, the side-by-side verdicts, and the CLI's exit codes.

Read against the committed H100 history (runs are only ever appended there, so the runs these
tests name keep their lines and values).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from rwkvlab.cli import main
from rwkvlab.compare import SelectorError, compare_runs, select
from rwkvlab.history import HistoryWarning, read_history

H100 = Path(__file__).resolve().parents[1] / "data" / "benchmarks" / "nvidia-h100-80gb-hbm3.md"


@pytest.fixture(scope="module")
def h100():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HistoryWarning)
        return read_history(H100)


def test_selectors_pick_a_run_a_title_or_an_option_set(h100):
    assert len(select(h100, f"{H100}:14")) == 1
    assert set(select(h100, "title=2.9B Q8_0 checked")["title"]) == {"2.9B Q8_0 checked"}
    unfused = select(h100, "fusions=none,model=q8_0.gguf")
    assert len(unfused) and set(unfused["model"]) == {"q8_0.gguf"}
    assert all(not o.get("fusions") for o in unfused["options"])
    for bad, says in (("nothing", "expected FILE.md:LINE"), ("title=No such title", "names no run"),
                      ("path", "expected"), ("fusions=warp", "unknown fusion")):
        with pytest.raises((SelectorError, ValueError), match=says):
            select(h100, bad)


def test_fused_against_unfused_per_model_and_lengths(h100):
    a = select(h100, "fusions=none,model=q8_0.gguf")
    b = select(h100, "fusions=default,model=q8_0.gguf")
    result = compare_runs(h100, a, b)
    rows = result.rows.set_index("metric")
    assert rows.loc["generation (tok/s)", "verdict"] == "improvement"  # 181 -> 310 tok/s measured
    assert rows.loc["output (quality hash)", "verdict"] == "same"  # fusions keep the output
    assert rows.loc["output (quality hash)", "A"] == "a250f6ff789cffbb"
    assert "prompt 512 / generate 128" in rows.loc["generation (tok/s)", "runs"]


def test_cli_prints_the_table_and_gates(capsys):
    assert main(["compare", "fusions=none,model=q8_0.gguf", "fusions=default,model=q8_0.gguf", str(H100)]) == 0
    out = capsys.readouterr().out
    assert "generation (tok/s)" in out and "improvement" in out and "\x1b" not in out
    # B = the unfused runs judged against the fused ones: slower generation, a regression
    assert main(["compare", "fusions=default,model=q8_0.gguf", "fusions=none,model=q8_0.gguf", str(H100),
                 "--fail-on-regression"]) == 1
    assert main(["compare", "title=No such title", "fusions=none", str(H100)]) == 2
    assert "names no run" in capsys.readouterr().err
