"""Figures of the benchmark history: speed per model and GPU in run order, before/after per
title, load-time spread, and the lab panel's live plot (the history plus this session's runs).

Input is the DataFrame of `rwkvlab.history.read_history` and, where output correctness is shown,
the frame of `rwkvlab.verdicts.verdicts` (same index). Nothing here parses Markdown or touches
the GPU; every figure function returns a plain `plotly.graph_objects.Figure`, and the live plot
is such a figure shown again, whole, in an ipywidgets ``Output`` (see :func:`show_live`).

A run whose greedy output changed must never pass for a speed-up, so every speed figure draws
those runs with one unmistakable mark (a large red X, legend entry "output changed") on top of
whatever else it shows.
"""
from __future__ import annotations

import html
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

CHANGED_NAME = "output changed"
UNKNOWN_NAME = "output unknown"
CHANGE_POINT_NAME = "speed change point"

SPEED_METRICS = (("prefill", "prefill_tps", "Prefill"), ("generation", "generation_tps", "Generation"))
SPEED_UNIT = "tok/s"
LOAD_UNIT = "ms"

# Speed verdict -> bar colour. Regression is orange, not red, so that red stays reserved for
# "output changed": a wrong answer must not look like "merely slower".
VERDICT_COLOURS = {
    "improvement": "#2ca02c",
    "within noise": "#9aa5b1",
    "regression": "#ff7f0e",
    "no reference": "#d9dee4",
}
CHANGED_MARKER = dict(symbol="x", size=15, color="#d62728", line=dict(width=1.5, color="#6b0000"))
UNKNOWN_MARKER = dict(symbol="circle-open", size=13, color="#555555", line=dict(width=2))
CHANGE_POINT_MARKER = dict(symbol="diamond-open", size=17, color="#111111", line=dict(width=2))
FONT = dict(family="Helvetica, Arial, sans-serif", size=12)


def run_id(df: pd.DataFrame) -> pd.Series:
    """A short, stable name per run: ``<history file name>:<line>``.

    Figures carry it as trace ``ids`` so tests and readers can tell exactly which runs a trace
    draws, independent of the DataFrame's index.
    """
    return df["file"].map(lambda f: Path(str(f)).name) + ":" + df["line"].astype(int).astype(str)


def run_order(df: pd.DataFrame) -> pd.Series:
    """Each run's position, 1..n, in time order (runs without a time last, in file order).

    The timeline's x axis: a day of back-to-back runs spreads out instead of collapsing into
    one vertical line, and a speed regression shows as a step between neighbouring runs.
    """
    keys = pd.DataFrame({"t": pd.to_datetime(df["timestamp"], utc=True), "file": df["file"].astype(str),
                         "line": df["line"].astype(int)}, index=df.index)
    ordered = keys.sort_values(["t", "file", "line"], kind="stable", na_position="last").index
    return pd.Series(range(1, len(df) + 1), index=ordered).reindex(df.index)


def series_name(df: pd.DataFrame) -> pd.Series:
    """The timeline's series of each run: its model file and GPU (speeds differ by both)."""
    gpu = df["gpu"].fillna("unknown GPU").astype(str)
    return (df["model"].astype(str) + " · " + gpu).astype(object)


def timeline(df: pd.DataFrame, verdicts: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Prefill and generation tok/s against run order, one line per model and GPU.

    Two stacked subplots share the run axis (:func:`run_order`; the hover names the time).
    Speeds are on a log axis, so a 0.1b model at 1,500 tok/s and a 2.9B one at 300 (or a CPU
    adapter at 20) are all readable and a 10% step looks the same size at any speed. Runs
    whose output changed get a red X, runs with no usable quality hash a grey ring, and
    detected speed change points a black diamond.
    """
    runs = _with_verdicts(df, verdicts)
    runs = runs.assign(_order=run_order(runs), _series=series_name(runs)).sort_values("_order", kind="stable")
    x = runs["_order"]
    hover = _hover_text(runs)
    ids = run_id(runs)
    colours = _series_colours(runs["_series"])

    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.09,
        subplot_titles=[f"{label} speed ({SPEED_UNIT}, log scale)" for _, _, label in SPEED_METRICS],
    )
    shown: set[str] = set()  # legend entries already added, so each appears once
    for row, (metric, column, label) in enumerate(SPEED_METRICS, start=1):
        for name, colour in colours.items():
            mine = (runs["_series"] == name).to_numpy()
            fig.add_trace(go.Scatter(
                x=x[mine], y=runs[column][mine], ids=ids[mine], text=hover[mine],
                mode="lines+markers", name=name, legendgroup=name, showlegend=_first(shown, name),
                line=dict(color=colour, width=1.5), marker=dict(color=colour, size=6),
                hovertemplate="%{text}<extra></extra>",
            ), row=row, col=1)
        for mask, name, marker in _overlays(runs, metric):
            fig.add_trace(go.Scatter(
                x=x[mask], y=runs[column][mask], ids=ids[mask], text=hover[mask],
                mode="markers", name=name, legendgroup=name, showlegend=_first(shown, name),
                marker=marker, hovertemplate="%{text}<extra>" + name + "</extra>",
            ), row=row, col=1)
        fig.update_yaxes(title_text=f"{label.lower()} ({SPEED_UNIT})", type="log", row=row, col=1)
    fig.update_xaxes(title_text="run, in time order (hover for its time)", row=2, col=1)
    fig.update_layout(
        font=FONT, hovermode="closest", template="plotly_white",
        **_header(title or "Prefill and generation speed per model and GPU (red X: output changed, not comparable)",
                  height=720, left=70),
    )
    return fig


def before_after(df: pd.DataFrame, verdicts: pd.DataFrame, min_runs: int = 2) -> go.Figure:
    """Per benchmark title, its runs side by side (prefill | generation), oldest first.

    A title is a ``## Title`` section of one history file; only titles with at least
    `min_runs` runs are drawn, because a lone run has nothing beside it to compare with.
    Bars are coloured by the run's speed verdict against its title's reference; runs whose
    output changed carry a red X at the end of their bar.
    """
    runs = _with_verdicts(df, verdicts)
    runs = runs[runs.groupby(["file", "title"], sort=False)["line"].transform("size") >= min_runs]
    first_seen = runs.groupby(["file", "title"], sort=False)["timestamp"].transform("min")
    runs = runs.assign(_first=first_seen).sort_values(["_first", "file", "title", "timestamp"], kind="stable")
    y = [_title_labels(runs), _run_labels(runs)]
    hover = _hover_text(runs)
    ids = run_id(runs)

    fig = make_subplots(
        rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.03,
        subplot_titles=[f"{label} ({SPEED_UNIT})" for _, _, label in SPEED_METRICS],
    )
    shown: set[str] = set()
    for col, (metric, column, label) in enumerate(SPEED_METRICS, start=1):
        verdict = runs[f"{metric}_vs_title"].fillna("no reference")
        # One bar trace per metric (colour per bar) keeps the category order exactly the
        # order of `runs`; one trace per verdict would let plotly reorder the categories.
        fig.add_trace(go.Bar(
            x=runs[column], y=y, ids=ids, text=hover, orientation="h",
            marker=dict(color=[VERDICT_COLOURS.get(v, "#d9dee4") for v in verdict],
                        line=dict(width=0.5, color="#4a5568")),
            texttemplate="%{x:.1f}", textposition="inside", insidetextanchor="end",
            name=f"{label.lower()} ({SPEED_UNIT})", showlegend=False,
            hovertemplate="%{text}<br>verdict vs title: %{customdata}<extra></extra>",
            customdata=verdict,
        ), row=1, col=col)
        changed = (runs["output"] == "changed").to_numpy()
        fig.add_trace(go.Scatter(
            x=runs[column][changed], y=[y[0][changed], y[1][changed]], ids=ids[changed],
            text=hover[changed], mode="markers", name=CHANGED_NAME, legendgroup=CHANGED_NAME,
            showlegend=_first(shown, CHANGED_NAME), marker=CHANGED_MARKER,
            hovertemplate="%{text}<extra>" + CHANGED_NAME + "</extra>",
        ), row=1, col=col)
        fig.update_xaxes(title_text=f"{label.lower()} ({SPEED_UNIT})", rangemode="tozero", row=1, col=col)
    for verdict_name, colour in VERDICT_COLOURS.items():
        # Legend-only swatches explaining the bar colours (no data points).
        fig.add_trace(go.Scatter(
            x=[None], y=[None], mode="markers", name=f"vs title: {verdict_name}",
            marker=dict(symbol="square", size=12, color=colour), hoverinfo="skip",
        ), row=1, col=1)
    fig.update_yaxes(autorange="reversed", title_text="title / run", row=1, col=1)
    n_titles = runs[["file", "title"]].drop_duplicates().shape[0]
    fig.update_layout(
        font=FONT, template="plotly_white", bargap=0.25,
        **_header(f"Before / after per title ({n_titles} titles with at least {min_runs} runs)",
                  height=max(360, 190 + 17 * len(runs)), left=20),
    )
    return fig


def load_spread(df: pd.DataFrame, by: str = "model") -> go.Figure:
    """Load time (ms) spread as a box with every run drawn beside it, per model or per file.

    `by` is ``"model"`` (load time depends mostly on the file loaded) or ``"file"`` (to see
    how one history file's loading experiments spread).
    """
    if by not in ("model", "file"):
        raise ValueError(f"load_spread(by={by!r}): choose 'model' or 'file'")
    runs = df.assign(file_stem=df["file"].map(lambda f: Path(str(f)).stem))
    key = "model" if by == "model" else "file_stem"
    hover = _hover_text(runs)
    ids = run_id(runs)
    palette = qualitative.Safe
    fig = go.Figure()
    for i, (group, part) in enumerate(runs.groupby(key, sort=True)):
        mine = runs.index.isin(part.index)
        n = int(part["load_ms"].notna().sum())
        fig.add_trace(go.Box(
            y=part["load_ms"], ids=ids[mine], text=hover[mine], name=f"{group} (n={n})",
            boxpoints="all", jitter=0.45, pointpos=0, marker=dict(size=6, opacity=0.8),
            line=dict(width=1.5), fillcolor="rgba(0,0,0,0)", marker_color=palette[i % len(palette)],
            hovertemplate="%{text}<extra></extra>",
        ))
    fig.update_yaxes(title_text=f"load time ({LOAD_UNIT})", rangemode="tozero")
    fig.update_xaxes(title_text=by)
    fig.update_layout(
        title=f"Load time spread per {by}", height=460, font=FONT, template="plotly_white",
        showlegend=False, margin=dict(t=60, l=70, r=20, b=80),
    )
    return fig


# -- the lab panel's live plot -----------------------------------------------------------------

SESSION_NAME = "this session"
SESSION_MARKER = dict(symbol="star", size=16, color="#111111", line=dict(width=1, color="#ffffff"))
SESSION_COLUMNS = ("number", "timestamp", "model", "gpu", "change", "quality_hash", "output", "logits",
                   "prefill_tps", "generation_tps", "wrong")
PLOTLY_JSON = "application/vnd.plotly.v1+json"
LIVE_CONFIG = {"displaylogo": False, "responsive": True}


def live_figure(history: pd.DataFrame, verdicts: pd.DataFrame | None, session: pd.DataFrame) -> go.Figure:
    """The history's :func:`timeline` with this session's runs after it: a star each, a red X
    where the run's output or logits are wrong.

    ``session`` has the columns of :data:`SESSION_COLUMNS`, one row per run of the panel in
    order (``wrong`` is the panel's judgement, ``output`` and ``logits`` its verdict words for
    the hover). Session runs take the run numbers after the history's last, past a dotted line.
    """
    missing = [c for c in SESSION_COLUMNS if c not in session.columns]
    if missing:
        raise ValueError(f"session frame lacks column(s) {', '.join(missing)}; columns: {', '.join(SESSION_COLUMNS)}")
    n = len(session)
    title = f"The history and this session's runs (★); red X: output changed · this session: {n} run{'s' if n != 1 else ''}"
    if len(history) and verdicts is not None:
        fig = timeline(history, verdicts, title=title)
    else:
        fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.09,
                            subplot_titles=[f"{label} speed ({SPEED_UNIT}, log scale)" for _, _, label in SPEED_METRICS])
        for row, (_, _, label) in enumerate(SPEED_METRICS, start=1):
            fig.update_yaxes(title_text=f"{label.lower()} ({SPEED_UNIT})", type="log", row=row, col=1)
        fig.update_xaxes(title_text="run, in time order (hover for its time)", row=2, col=1)
        fig.update_layout(font=FONT, template="plotly_white", **_header(title, height=640, left=70))
    start = len(history)
    x = list(range(start + 1, start + n + 1))
    wrong = session["wrong"].astype(bool).tolist()
    hover = [_session_hover(r) for _, r in session.iterrows()]
    for row, (_, column, _) in enumerate(SPEED_METRICS, start=1):
        fig.add_trace(go.Scatter(
            x=x, y=session[column].astype(float).tolist(), text=hover, mode="markers", name=SESSION_NAME,
            legendgroup=SESSION_NAME, showlegend=row == 1, hovertemplate="%{text}<extra>" + SESSION_NAME + "</extra>",
            marker=dict(SESSION_MARKER, symbol=["x" if w else "star" for w in wrong],
                        color=[CHANGED_MARKER["color"] if w else SESSION_MARKER["color"] for w in wrong]),
        ), row=row, col=1)
    if start and n:
        fig.add_vline(x=start + 0.5, line=dict(dash="dot", width=1, color="#5a6473"))
    return fig


def _session_hover(r: pd.Series) -> str:
    when = pd.Timestamp(r["timestamp"]).strftime("%Y-%m-%d %H:%M:%S UTC") if pd.notna(r["timestamp"]) else "no time"
    return (f"<b>run {int(r['number'])}: {html.escape(str(r['change']))}</b><br>"
            f"{when} · {html.escape(str(r['model']))} on {html.escape(str(r['gpu']))}<br>"
            f"hash {html.escape(str(r['quality_hash']))} (output: {html.escape(str(r['output']))}; "
            f"logits: {html.escape(str(r['logits']))})<br>"
            f"prefill {_num(r['prefill_tps'])} tok/s · generation {_num(r['generation_tps'])} tok/s")


def live_widget():
    """An empty ipywidgets ``Output`` for :func:`show_live` to draw into, as wide as its cell."""
    import ipywidgets as w

    out = w.Output(layout=w.Layout(width="100%"))
    out.add_class("rwkvlab-live-plot")
    return out


def show_live(widget, fig: go.Figure) -> None:
    """Replace what ``widget`` (from :func:`live_widget`) shows with ``fig``, whole.

    Why not a ``go.FigureWidget``: it syncs only the figure it was built with; every later
    change travels as a one-off message to the views open at that moment. A view made later
    (the page reloaded, the notebook reopened) or one whose frontend model was not yet
    listening draws the old figure, and then applies restyles meant for traces it lacks. The
    ``Output``'s outputs are its whole state, so every view draws the current figure; each is
    a plotly JSON bundle that JupyterLab draws with its own plotly.js and resizes with the
    page. Assigning ``outputs`` (never ``with widget:``) is safe from the Run button's thread.
    """
    import json

    bundle = {PLOTLY_JSON: {**json.loads(fig.to_json()), "config": LIVE_CONFIG}, "text/plain": describe(fig)}
    widget.outputs = ({"output_type": "display_data", "data": bundle, "metadata": {}},)



def describe(fig: go.Figure) -> str:
    """A short, deterministic text summary of a figure: title, axis titles, points per trace.

    Notebooks print it next to the figure so that nbval checks what the figure shows without
    comparing plotly's JSON (which changes with every plotly release).
    """
    lines = [f"figure: {fig.layout.title.text}"]
    axes = sorted(k for k in fig.layout.to_plotly_json() if k.startswith(("xaxis", "yaxis")))
    for name in axes:
        title = fig.layout[name].title.text
        if title:
            lines.append(f"  {name}: {title}")
    for trace in fig.data:
        values = trace.y if trace.type == "box" else trace.x
        n = 0 if values is None else int(pd.notna(pd.Series(list(values), dtype=object)).sum())
        if n == 0:
            continue  # legend-only swatch
        where = f" [{trace.xaxis}/{trace.yaxis}]" if trace.type != "box" else ""
        lines.append(f"  {trace.type} '{trace.name}'{where}: {n} points")
    return "\n".join(lines)


# -- helpers -------------------------------------------------------------------------------

# Line colours per series. Red is left out on purpose: it means "output changed".
SERIES_COLOURS = ("#1f77b4", "#9467bd", "#17becf", "#8c564b", "#bcbd22", "#e377c2", "#7f7f7f", "#2ca02c",
                  "#393b79", "#637939", "#8c6d31", "#7b4173", "#3182bd", "#e6550d")


def _header(title: str, height: int, left: int, top: int = 140, bottom: int = 60) -> dict:
    """Layout for a title pinned to the top and a horizontal legend under it.

    The legend sits a fixed 34 px above the plot area (clear of the subplot titles) and may
    wrap to two or three rows in a narrow notebook column; the top margin leaves room for that
    without the legend running into the figure title.
    """
    plot_height = height - top - bottom
    return dict(
        height=height,
        title=dict(text=title, x=0.01, xanchor="left", y=1 - 12 / height, yanchor="top"),
        legend=dict(orientation="h", yanchor="bottom", y=1 + 34 / plot_height, x=0),
        margin=dict(t=top, l=left, r=20, b=bottom),
    )


def _with_verdicts(df: pd.DataFrame, verdicts: pd.DataFrame) -> pd.DataFrame:
    """The runs with their verdict columns and a short file label, rows aligned by index."""
    missing = [c for c in ("output", "prefill_vs_title", "generation_vs_title") if c not in verdicts.columns]
    if missing:
        raise ValueError(
            f"verdicts frame lacks column(s) {', '.join(missing)}; pass the result of "
            "rwkvlab.verdicts.verdicts(df) for the same DataFrame"
        )
    if not verdicts.index.equals(df.index):
        raise ValueError(
            f"verdicts index does not match the runs ({len(verdicts)} vs {len(df)} rows); "
            "compute verdicts(df) on the same DataFrame you plot"
        )
    extra = [c for c in verdicts.columns if c not in df.columns]
    runs = df.join(verdicts[extra])
    return runs.assign(file_stem=runs["file"].map(lambda f: Path(str(f)).stem))


def _overlays(runs: pd.DataFrame, metric: str):
    """(row mask, legend name, marker) for each mark drawn over the speed lines."""
    marks = [
        ((runs["output"] == "changed").to_numpy(), CHANGED_NAME, CHANGED_MARKER),
        ((runs["output"] == "unknown").to_numpy(), UNKNOWN_NAME, UNKNOWN_MARKER),
    ]
    column = f"{metric}_change_point"
    if column in runs.columns:
        marks.append((runs[column].fillna(False).astype(bool).to_numpy(), CHANGE_POINT_NAME, CHANGE_POINT_MARKER))
    # The changed-output trace is always present (possibly empty) so readers and tests can
    # rely on it; the others only when there is something to mark.
    return [m for m in marks if m[1] == CHANGED_NAME or m[0].any()]


def _hover_text(runs: pd.DataFrame) -> pd.Series:
    """One HTML hover label per run: change, title, time, model, hash, numbers."""
    def label(r) -> str:
        when = r["timestamp"].strftime("%Y-%m-%d %H:%M:%S UTC") if pd.notna(r["timestamp"]) else "no time"
        output = f" (output: {r['output']})" if "output" in r and pd.notna(r.get("output")) else ""
        return (
            f"<b>{html.escape(str(r['change']))}</b><br>"
            f"title: {html.escape(str(r['title']))} · {html.escape(Path(str(r['file'])).name)}:{r['line']}<br>"
            f"{when} · {html.escape(str(r['model']))} on {html.escape(str(r.get('gpu', '')))}<br>"
            f"hash {html.escape(str(r['quality_hash']))}{output}<br>"
            f"prefill {_num(r['prefill_tps'])} tok/s · generation {_num(r['generation_tps'])} tok/s"
            f" · load {_num(r['load_ms'])} ms"
        )
    return pd.Series([label(r) for _, r in runs.iterrows()], index=runs.index, dtype=object)


def _num(value) -> str:
    return "n/a" if pd.isna(value) else f"{value:.2f}"


def _series_colours(names: pd.Series) -> dict[str, str]:
    return {s: SERIES_COLOURS[i % len(SERIES_COLOURS)] for i, s in enumerate(sorted(names.unique()))}


def _title_labels(runs: pd.DataFrame) -> pd.Series:
    """The title, plus the file when the same title appears in several files ("Baseline")."""
    files_per_title = runs.groupby("title")["file"].transform("nunique")
    return runs["title"].where(files_per_title == 1, runs["title"] + " · " + runs["file_stem"]).astype(object)


def _run_labels(runs: pd.DataFrame, width: int = 34) -> pd.Series:
    """Short per-run label, unique within its title: position and the change, shortened."""
    pos = runs.groupby(["file", "title"], sort=False).cumcount() + 1
    change = runs["change"].astype(str).map(lambda c: c if len(c) <= width else c[: width - 1] + "…")
    return (pos.astype(str) + ". " + change).astype(object)


def _first(shown: set[str], name: str) -> bool:
    """True the first time `name` is seen: show each legend entry once across subplots."""
    if name in shown:
        return False
    shown.add(name)
    return True
