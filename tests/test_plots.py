"""The history figures: the right runs marked as wrong output, units on every axis, hover text.

The figures are checked against the seed history (data/benchmarks, 86 runs in 4 files) with a
verdict frame built here by a rule the test states, so each assertion knows exactly which runs
must carry the "output changed" mark; one test also uses the real `verdicts()`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rwkvlab import plots
from rwkvlab.history import read_history
from conftest import SEED_HISTORY

REPO = Path(__file__).resolve().parents[1]
N_RUNS = 86


@pytest.fixture(scope="module")
def runs() -> pd.DataFrame:
    df = read_history(SEED_HISTORY)
    assert len(df) == N_RUNS
    return df


def hand_verdicts(df: pd.DataFrame, changed: np.ndarray, unknown: np.ndarray | None = None) -> pd.DataFrame:
    """A verdict frame in the schema of rwkvlab.verdicts with the given output flags."""
    unknown = np.zeros(len(df), bool) if unknown is None else unknown
    v = pd.DataFrame(index=df.index)
    v["output"] = np.where(changed, "changed", np.where(unknown, "unknown", "same"))
    v["output_reason"] = "set by the test"
    cycle = np.array(["improvement", "regression", "within noise", "no reference"])
    for m in ("prefill", "generation", "load"):
        for ref in ("title", "history"):
            v[f"{m}_vs_{ref}"] = cycle[np.arange(len(df)) % 4]
            v[f"{m}_vs_{ref}_reason"] = "set by the test"
        v[f"{m}_change_point"] = False
    return v


def changed_by_hash(df: pd.DataFrame) -> np.ndarray:
    """The test's rule: output changed = hash differs from the first run of the same model."""
    first = df.groupby("model")["quality_hash"].transform("first")
    return (df["quality_hash"] != first).to_numpy()


def traces(fig, name):
    return [t for t in fig.data if t.name == name]


def test_timeline_marks_exactly_the_changed_runs(runs):
    changed = changed_by_hash(runs)
    assert 0 < changed.sum() < N_RUNS  # the rule must split the seed data to be a real check
    fig = plots.timeline(runs, hand_verdicts(runs, changed))
    expected = set(plots.run_id(runs)[changed])
    marks = traces(fig, plots.CHANGED_NAME)
    assert len(marks) == 2, "one 'output changed' trace per subplot (prefill, generation)"
    for trace, column in zip(marks, ("prefill_tps", "generation_tps")):
        assert set(trace.ids) == expected and len(trace.ids) == len(expected)
        assert trace.marker.symbol == "x" and trace.marker.color == "#d62728"
        # The X sits on the run's own value, not somewhere near it.
        by_id = dict(zip(plots.run_id(runs), runs[column]))
        assert list(trace.y) == [by_id[i] for i in trace.ids]
    assert sum(t.showlegend is not False for t in marks) == 1, "legend entry appears once"


def test_timeline_with_the_real_verdicts(runs):
    from rwkvlab.verdicts import verdicts

    v = verdicts(runs)
    fig = plots.timeline(runs, v)
    expected = set(plots.run_id(runs)[(v["output"] == "changed").to_numpy()])
    for trace in traces(fig, plots.CHANGED_NAME):
        assert set(trace.ids) == expected


def test_timeline_has_one_line_per_model_and_gpu_in_run_order(runs):
    fig = plots.timeline(runs, hand_verdicts(runs, changed_by_hash(runs)))
    series = sorted(set(runs["model"] + " · " + runs["gpu"]))
    assert len(series) == 3  # the seed: three model files, all on the M2 Max
    for axis in ("y", "y2"):
        lines = [t for t in fig.data if t.yaxis == axis and t.mode == "lines+markers"]
        assert sorted(t.name for t in lines) == series
        assert sum(len(t.x) for t in lines) == N_RUNS
        # x is the run's place in time order: 1..86 once each, rising along every line.
        assert sorted(x for t in lines for x in t.x) == list(range(1, N_RUNS + 1))
        assert all(list(t.x) == sorted(t.x) for t in lines)
    order = plots.run_order(runs)
    by_time = runs.assign(o=order).sort_values("o")["timestamp"]
    assert by_time.is_monotonic_increasing
    assert fig.layout.yaxis.type == fig.layout.yaxis2.type == "log"  # 20 and 15,000 tok/s both readable
    assert "tok/s" in fig.layout.yaxis.title.text and "prefill" in fig.layout.yaxis.title.text
    assert "tok/s" in fig.layout.yaxis2.title.text and "generation" in fig.layout.yaxis2.title.text
    assert "time order" in fig.layout.xaxis2.title.text
    assert fig.layout.width is None  # the figure follows its page or cell
    assert fig.layout.title.text


def test_a_model_on_two_gpus_is_two_series(runs):
    df = runs.copy()
    df.loc[df.index[:5], "gpu"] = "NVIDIA H100 80GB HBM3"
    fig = plots.timeline(df, hand_verdicts(df, np.zeros(len(df), bool)))
    names = {t.name for t in fig.data if t.mode == "lines+markers"}
    model = df.at[df.index[0], "model"]
    assert {f"{model} · NVIDIA H100 80GB HBM3", f"{model} · Apple M2 Max"} <= names


def test_timeline_without_changed_runs_keeps_an_empty_mark_trace(runs):
    fig = plots.timeline(runs, hand_verdicts(runs, np.zeros(len(runs), bool)))
    marks = traces(fig, plots.CHANGED_NAME)
    assert len(marks) == 2 and all(len(t.ids) == 0 for t in marks)
    assert not traces(fig, plots.UNKNOWN_NAME)


def test_timeline_marks_unknown_output_separately(runs):
    unknown = np.zeros(len(runs), bool)
    unknown[[3, 40]] = True
    fig = plots.timeline(runs, hand_verdicts(runs, np.zeros(len(runs), bool), unknown))
    for trace in traces(fig, plots.UNKNOWN_NAME):
        assert set(trace.ids) == set(plots.run_id(runs).iloc[[3, 40]])


def test_hover_names_change_title_time_and_hash(runs):
    fig = plots.timeline(runs, hand_verdicts(runs, changed_by_hash(runs)))
    row = runs.iloc[0]
    rid = plots.run_id(runs).iloc[0]
    line = next(t for t in fig.data if t.mode == "lines+markers" and rid in t.ids)
    text = line.text[list(line.ids).index(rid)]
    assert row["change"] in text and row["title"] in text and row["quality_hash"] in text
    assert f"{row['timestamp']:%Y-%m-%d %H:%M:%S}" in text


def test_hover_escapes_html(runs):
    df = runs.head(3).copy()
    df["change"] = df["change"].astype(object)
    df.loc[df.index[0], "change"] = "<b>bold</b> & <script>"
    fig = plots.timeline(df, hand_verdicts(df, np.zeros(3, bool)))
    texts = [s for t in fig.data if t.text is not None for s in t.text]
    assert any("&lt;script&gt;" in s for s in texts)
    assert not any("<script>" in s for s in texts)


def test_before_after_groups_runs_per_title_and_marks_changed(runs):
    changed = changed_by_hash(runs)
    fig = plots.before_after(runs, hand_verdicts(runs, changed))
    sizes = runs.groupby(["file", "title"])["line"].transform("size")
    shown = (sizes >= 2).to_numpy()
    ids = plots.run_id(runs)
    bars = [t for t in fig.data if t.type == "bar"]
    assert len(bars) == 2
    for bar in bars:
        assert set(bar.ids) == set(ids[shown]) and len(bar.ids) == shown.sum()
        titles, labels = bar.y
        # Runs of one title are adjacent (side by side), and numbered 1..n in time order.
        blocks = [t for i, t in enumerate(titles) if i == 0 or titles[i - 1] != t]
        assert len(blocks) == len(set(blocks)) == runs[shown][["file", "title"]].drop_duplicates().shape[0]
    for mark in traces(fig, plots.CHANGED_NAME):
        assert set(mark.ids) == set(ids[shown & changed])
    assert "tok/s" in fig.layout.xaxis.title.text and "tok/s" in fig.layout.xaxis2.title.text


def test_before_after_bar_colours_follow_the_title_verdict(runs):
    v = hand_verdicts(runs, changed_by_hash(runs))
    fig = plots.before_after(runs, v, min_runs=1)
    bar = next(t for t in fig.data if t.type == "bar" and t.xaxis == "x")
    by_id = dict(zip(plots.run_id(runs), v["prefill_vs_title"]))
    assert len(bar.ids) == N_RUNS
    assert list(bar.marker.color) == [plots.VERDICT_COLOURS[by_id[i]] for i in bar.ids]


def test_same_title_in_two_files_stays_two_groups(runs):
    fig = plots.before_after(runs, hand_verdicts(runs, changed_by_hash(runs)), min_runs=1)
    titles = set(next(t for t in fig.data if t.type == "bar").y[0])
    # "Baseline" heads sections of three seed files; each keeps its own group, labelled by file.
    assert "Baseline" not in titles
    assert sum(t.startswith("Baseline · ") for t in titles) == 3


def test_load_spread_per_model_and_per_file(runs):
    fig = plots.load_spread(runs)
    assert [t.type for t in fig.data] == ["box"] * runs["model"].nunique()
    assert sum(len(t.y) for t in fig.data) == N_RUNS
    assert fig.layout.yaxis.title.text == "load time (ms)"
    per_model = {t.name.split(" (n=")[0]: sorted(t.y) for t in fig.data}
    for model, part in runs.groupby("model"):
        assert per_model[model] == sorted(part["load_ms"])
    assert len(plots.load_spread(runs, by="file").data) == runs["file"].nunique()
    with pytest.raises(ValueError, match="choose 'model' or 'file'"):
        plots.load_spread(runs, by="gpu")


def test_mismatched_verdicts_are_refused_with_a_reason(runs):
    v = hand_verdicts(runs, changed_by_hash(runs))
    with pytest.raises(ValueError, match="same DataFrame"):
        plots.timeline(runs, v.iloc[:10])
    with pytest.raises(ValueError, match="lacks column"):
        plots.timeline(runs, v.drop(columns=["output"]))


def test_describe_is_deterministic_text(runs):
    v = hand_verdicts(runs, changed_by_hash(runs))
    text = plots.describe(plots.timeline(runs, v))
    assert text == plots.describe(plots.timeline(runs, v))
    n_changed = int(changed_by_hash(runs).sum())
    assert f"scatter 'output changed' [x/y]: {n_changed} points" in text
    assert "yaxis: prefill (tok/s)" in text


def test_runs_with_missing_numbers_and_time_are_drawn_without_them(runs):
    # Hand-edited history can lack a speed, a load time or a parseable timestamp; the figures
    # must still build, simply leaving those points out.
    df = runs.copy()
    df.loc[df.index[0], "prefill_tps"] = float("nan")
    df.loc[df.index[1], "load_ms"] = float("nan")
    df.loc[df.index[2], "timestamp"] = pd.NaT
    v = hand_verdicts(df, changed_by_hash(df))
    fig = plots.timeline(df, v)
    assert plots.run_order(df).iloc[2] == N_RUNS  # no time: drawn last
    prefill_lines = [t for t in fig.data if t.yaxis == "y" and t.mode == "lines+markers"]
    assert sum(pd.notna(pd.Series(list(t.y), dtype=float)).sum() for t in prefill_lines) == N_RUNS - 1
    assert "n/a tok/s" in " ".join(s for t in prefill_lines for s in t.text)
    assert sum(len(t.y) for t in plots.load_spread(df).data) == N_RUNS
    assert "box '2.9b-Q4_K_M.gguf (n=30)'" in plots.describe(plots.load_spread(df))
    plots.before_after(df, v)


def session_frame(*rows) -> pd.DataFrame:
    base = dict(timestamp=pd.Timestamp("2026-02-01", tz="UTC"), model="tiny.gguf", gpu="llvmpipe",
                change="a run", quality_hash="00ff", output="same", logits="ok")
    return pd.DataFrame([{**base, "number": i + 1, **r} for i, r in enumerate(rows)])


def test_live_figure_puts_the_session_after_the_history(runs):
    v = hand_verdicts(runs, changed_by_hash(runs))
    session = session_frame(dict(prefill_tps=40.0, generation_tps=12.0, wrong=False),
                            dict(prefill_tps=41.0, generation_tps=0.5, wrong=True, output="changed"))
    fig = plots.live_figure(runs, v, session)
    mine = traces(fig, plots.SESSION_NAME)
    assert [list(t.x) for t in mine] == [[N_RUNS + 1, N_RUNS + 2]] * 2
    assert [list(t.y) for t in mine] == [[40.0, 41.0], [12.0, 0.5]]
    assert list(mine[0].marker.symbol) == ["star", "x"]  # the wrong run is a red X
    assert list(mine[0].marker.color)[1] == plots.CHANGED_MARKER["color"]
    assert "output: changed" in mine[1].text[1]
    assert fig.layout.title.text.endswith("this session: 2 runs")
    assert fig.layout.yaxis.type == "log"
    empty = plots.live_figure(runs.iloc[:0], None, session.iloc[:1])
    assert [list(t.x) for t in traces(empty, plots.SESSION_NAME)] == [[1], [1]]
    with pytest.raises(ValueError, match="lacks column"):
        plots.live_figure(runs, v, session.drop(columns=["wrong"]))


def test_show_live_replaces_the_whole_figure():
    out = plots.live_widget()
    session = session_frame(dict(prefill_tps=40.0, generation_tps=12.0, wrong=False))
    plots.show_live(out, plots.live_figure(pd.DataFrame(), None, session))
    plots.show_live(out, plots.live_figure(pd.DataFrame(), None, pd.concat([session, session])))
    assert len(out.outputs) == 1  # the newest figure only, never a pile of them
    shown = out.outputs[0]["data"][plots.PLOTLY_JSON]
    assert [len(t["x"]) for t in shown["data"] if t["name"] == plots.SESSION_NAME] == [2, 2]
    assert shown["config"]["responsive"] and "width" not in shown["layout"]
