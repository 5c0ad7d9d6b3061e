"""The history as text (`rwkvlab history`) and as one standalone HTML page (`rwkvlab report`).

Both start from the same two frames: the runs (`rwkvlab.history.read_history`) and their
verdicts (`rwkvlab.verdicts.verdicts`). The HTML page inlines plotly.js exactly once and loads
nothing from the network, so a report mailed around or opened on a plane still shows its plots.
"""
from __future__ import annotations

import argparse
import html
import io
import json
import math
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from rwkvlab import plots
from rwkvlab.history import printable, read_history
from rwkvlab.verdicts import verdicts as compute_verdicts

SPEED_VERDICT_COLUMNS = (
    "prefill_vs_title", "generation_vs_title", "prefill_vs_history", "generation_vs_history",
    "load_vs_history",
)


@dataclass(frozen=True)
class Summary:
    """Counts a reader wants before any table: how much history, and how much of it is wrong."""

    runs: int
    files: int
    models: int
    titles: int
    output_changed: int
    output_unknown: int
    # Runs with unchanged output whose prefill or generation is slower beyond noise than
    # their title's reference run, or than their recent history.
    slower_than_title: int
    slower_than_history: int
    first: pd.Timestamp | None
    last: pd.Timestamp | None


def summarize(df: pd.DataFrame, verdicts: pd.DataFrame) -> Summary:
    """Count runs, files, models, titles, changed/unknown outputs and speed regressions."""
    comparable = verdicts["output"] != "changed"

    def slower(ref: str) -> int:
        hit = (verdicts[f"prefill_vs_{ref}"] == "regression") | (verdicts[f"generation_vs_{ref}"] == "regression")
        return int((hit & comparable).sum())

    times = df["timestamp"].dropna()
    return Summary(
        runs=len(df),
        files=df["file"].nunique(),
        models=df["model"].nunique(),
        titles=df[["file", "title"]].drop_duplicates().shape[0],
        output_changed=int((verdicts["output"] == "changed").sum()),
        output_unknown=int((verdicts["output"] == "unknown").sum()),
        slower_than_title=slower("title"),
        slower_than_history=slower("history"),
        first=times.min() if len(times) else None,
        last=times.max() if len(times) else None,
    )


def summary_text(summary: Summary) -> str:
    """The summary as one deterministic paragraph (used by the CLI table and the notebook)."""
    span = ""
    if summary.first is not None:
        span = f", {summary.first:%Y-%m-%d %H:%M} to {summary.last:%Y-%m-%d %H:%M} UTC"
    return (
        f"{summary.runs} runs in {summary.files} files ({summary.titles} titles, "
        f"{summary.models} models{span}); output changed in {summary.output_changed}, "
        f"unknown in {summary.output_unknown}; with unchanged output, {summary.slower_than_title} "
        f"slower than their title's reference and {summary.slower_than_history} slower than "
        "their history (prefill or generation, beyond noise)"
    )


# -- machine-readable and fixed-width text -----------------------------------------------------

def history_frame(df: pd.DataFrame, verdicts: pd.DataFrame) -> pd.DataFrame:
    """Runs and all their verdict columns in one frame, timestamps as ISO 8601 strings."""
    extra = [c for c in verdicts.columns if c not in df.columns]
    frame = df.join(verdicts[extra])
    # Built as objects: mapping an all-NaT column gave back a datetime column of NaT, which
    # the CSV writer's checks could not handle (a file whose every heading date was broken).
    frame["timestamp"] = pd.Series([t.isoformat() if pd.notna(t) else None for t in frame["timestamp"]],
                                   index=frame.index, dtype=object)
    return frame


def to_csv(df: pd.DataFrame, verdicts: pd.DataFrame) -> str:
    """CSV, one row per run; list and mapping cells (quality tokens, samples) as JSON text."""
    frame = history_frame(df, verdicts)
    nested = (list, tuple, dict)
    for column in frame.columns:
        if any(isinstance(v, nested) for v in frame[column].tolist()):
            frame[column] = frame[column].map(lambda v: json.dumps(_plain(v)) if isinstance(v, nested) else v)
    # Text from the history goes to a terminal as often as to a spreadsheet: no escapes in it.
    frame = frame.map(lambda v: printable(v) if isinstance(v, str) else v)
    frame.columns = [printable(str(c)) for c in frame.columns]
    out = io.StringIO()
    frame.to_csv(out, index=False)
    return out.getvalue()


def to_json(df: pd.DataFrame, verdicts: pd.DataFrame) -> str:
    """A JSON array, one object per run (one run per line); missing values are null."""
    records = history_frame(df, verdicts).to_dict(orient="records")
    lines = [json.dumps({k: _plain(v) for k, v in r.items()}) for r in records]
    return "[\n" + ",\n".join(lines) + "\n]" if lines else "[]"


# (header, column, width, align). Text is cut to the width with an ellipsis so rows stay aligned.
TABLE_COLUMNS = (
    ("file", "file_stem", 24, "<"),
    ("time (UTC)", "time", 16, "<"),
    ("title", "title", 24, "<"),
    ("change", "change", 34, "<"),
    ("load ms", "load_ms", 8, ">"),
    ("prefill", "prefill_tps", 7, ">"),
    ("gen", "generation_tps", 6, ">"),
    ("hash", "quality_hash", 16, "<"),
    ("output", "output", 8, "<"),
    ("prefill/title", "prefill_vs_title", 13, "<"),
    ("gen/title", "generation_vs_title", 12, "<"),
    ("prefill/hist", "prefill_vs_history", 12, "<"),
    ("gen/hist", "generation_vs_history", 12, "<"),
)


def format_table(df: pd.DataFrame, verdicts: pd.DataFrame) -> str:
    """Readable fixed-width text: a header, a rule, then one line per run (no index)."""
    runs = df.join(verdicts[[c for c in verdicts.columns if c not in df.columns]])
    runs = runs.assign(
        file_stem=runs["file"].map(lambda f: Path(str(f)).stem),
        time=runs["timestamp"].map(lambda t: f"{t:%Y-%m-%d %H:%M}" if pd.notna(t) else ""),
    )
    def cell(value, width: int, align: str) -> str:
        if isinstance(value, float):
            text = "" if math.isnan(value) else f"{value:.1f}"
        else:
            text = "" if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value)
        text = printable(text)
        if len(text) > width:
            text = text[: width - 1] + "…"
        return f"{text:{align}{width}}"

    header = "  ".join(cell(h, w, a) for h, _, w, a in TABLE_COLUMNS).rstrip()
    lines = [header, "-" * len(header)]
    for _, r in runs.iterrows():
        lines.append("  ".join(cell(r[c], w, a) for _, c, w, a in TABLE_COLUMNS).rstrip())
    return "\n".join(lines)


# -- HTML report -------------------------------------------------------------------------------

def load(paths: list[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The runs at `paths` (files or folders) and their verdicts.

    Raises FileNotFoundError naming a path that does not exist and ValueError when the paths
    hold no runs at all: both mean the user pointed at the wrong place, which the history
    reader itself only warns about.
    """
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(
                f"{p}: no such file or folder. Give benchmark history Markdown files or folders "
                "holding them (the default, data/benchmarks, is relative to the current "
                "directory: run from the repository root)."
            )
    df = read_history([Path(p) for p in paths])
    if df.empty:
        raise ValueError(
            f"no benchmark runs ('### <time> - <change>' entries) found in "
            f"{', '.join(map(str, paths))}; point it at the history Markdown files."
        )
    return df, compute_verdicts(df)


# The report records the newest run it shows here, so the next report over the same file can
# say what is new since.
NEWEST_RUN_META = "rwkvlab-newest-run"
_NEWEST_RUN = re.compile(r'<meta name="' + NEWEST_RUN_META + r'" content="([^"]*)"')
LAST_DAY = pd.Timedelta(hours=24)


def previous_newest_run(report: str | Path) -> pd.Timestamp | None:
    """The newest run time a report written by :func:`write_report` recorded (None if the file
    is missing or was not written by it)."""
    try:
        head = Path(report).read_text(encoding="utf-8", errors="replace")[:4000]
    except OSError:
        return None
    found = _NEWEST_RUN.search(head)
    if not found or not found.group(1):
        return None
    try:
        return pd.Timestamp(found.group(1)).tz_convert("UTC")
    except (ValueError, TypeError):
        return None


def parse_since(text: str) -> pd.Timestamp:
    """``--since``: an ISO 8601 date or date and time; UTC unless it names a zone."""
    try:
        when = pd.Timestamp(text)
    except (ValueError, TypeError):
        raise ValueError(f"--since {text!r}: give a date or time such as 2026-01-03 or 2026-01-03T14:00") from None
    return when.tz_localize("UTC") if when.tzinfo is None else when.tz_convert("UTC")


@dataclass(frozen=True)
class Changes:
    """The runs a report lists as new, and the rule that chose them (said in the page)."""

    mask: pd.Series  # bool, aligned with the runs
    since: pd.Timestamp | None
    rule: str


def changes_since(df: pd.DataFrame, since: pd.Timestamp | None, rule: str | None = None) -> Changes:
    """Runs recorded after ``since``; without it, the last day of recording (the runs within
    24 hours of the newest run) so a first report still says what happened last."""
    times = pd.to_datetime(df["timestamp"], utc=True)
    if since is None:
        newest = times.max()
        if pd.isna(newest):
            return Changes(pd.Series(False, index=df.index), None, "no run has a time")
        since = newest - LAST_DAY
        rule = rule or f"the last day of recording: runs after {since:%Y-%m-%d %H:%M} UTC (24 h before the newest run)"
    rule = rule or f"runs after {since:%Y-%m-%d %H:%M} UTC"
    return Changes((times > since).fillna(False), since, rule)


def write_report(paths: list[str | Path], output: str | Path, since: pd.Timestamp | None = None) -> Path:
    """Read the history at `paths`, write a standalone HTML report to `output`, return its path.

    "What changed" lists the runs after ``since``; without it, the runs newer than the newest
    run of the report being overwritten at ``output``; without that, the last day of recording.
    """
    from rwkvlab.notebook_report import notebook_report_beside

    df, verdicts = load(paths)
    output = Path(output)
    if since is not None:
        changes = changes_since(df, since, f"runs after {since:%Y-%m-%d %H:%M} UTC (--since)")
    else:
        previous = previous_newest_run(output)
        changes = changes_since(df, previous, None if previous is None else
                                f"runs newer than the newest run of the previous {output.name} "
                                f"({previous:%Y-%m-%d %H:%M} UTC)")
    page = report_html(df, verdicts, sources=[str(p) for p in paths],
                       notebook_report=notebook_report_beside(output), changes=changes)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page, encoding="utf-8")
    return output


def report_html(df: pd.DataFrame, verdicts: pd.DataFrame, sources: list[str],
                notebook_report: str | None = None, changes: Changes | None = None) -> str:
    """The whole report page: the summary and what changed first, then one section per GPU
    (its plots, sized to the page), then every run in one table that sorts and filters in the
    page itself. plotly.js and the table's script are inlined; nothing is fetched."""
    from plotly.offline import get_plotlyjs

    lab_link = (f'<p class="meta">Lab notebooks, executed: <a href="{html.escape(notebook_report, quote=True)}">'
                f"{html.escape(notebook_report)}</a></p>") if notebook_report else ""
    changes = changes or changes_since(df, None)
    summary = summarize(df, verdicts)
    gpus = _gpus(df)
    newest = pd.to_datetime(df["timestamp"], utc=True).max()
    contents = "".join(
        ["<li><a href='#summary'>Summary</a></li><li><a href='#changes'>What changed</a></li>"]
        + [f"<li><a href='#{_gpu_anchor(g)}'>{html.escape(g)}</a> ({int((_gpu_of(df) == g).sum())} runs)</li>"
           for g in gpus]
        + ["<li><a href='#runs'>Every run</a></li>"])
    sections = "\n".join(_gpu_section(df, verdicts, g) for g in gpus)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="{NEWEST_RUN_META}" content="{newest.isoformat() if pd.notna(newest) else ''}">
<title>rwkvlab benchmark report</title>
<style>{_CSS}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head>
<body>
<header>
<h1>rwkvlab benchmark report</h1>
<p class="meta">history: {html.escape(", ".join(sources))} · generated {generated}</p>
{lab_link}
<nav><ol>{contents}</ol></nav>
</header>
{_summary_html(summary)}
{_changes_html(df, verdicts, changes)}
{sections}
<section id="runs"><h2>Every run, with its verdicts</h2>
<p class="meta">Speed verdicts compare a run with its title's reference run (<em>vs title</em>) and
with the runs before it (<em>vs history</em>). Hover a verdict for its reason. Rows marked red
changed the model's greedy output: their speed is not comparable. Click a column's header to sort.</p>
{_filters_html(df, gpus)}
{_verdict_table_html(df, verdicts, changes)}
</section>
<script>{_TABLE_JS}</script>
</body>
</html>
"""


def _gpu_of(df: pd.DataFrame) -> pd.Series:
    return df["gpu"].fillna("unknown GPU").astype(str)


def _gpus(df: pd.DataFrame) -> list[str]:
    """GPUs by their newest run, newest first: the machine worked on last leads."""
    times = pd.to_datetime(df["timestamp"], utc=True)
    newest = times.groupby(_gpu_of(df)).max()
    return sorted(newest.index, key=lambda g: (pd.isna(newest[g]), -(newest[g].value if pd.notna(newest[g]) else 0), g))


def _gpu_anchor(gpu: str) -> str:
    return "gpu-" + (re.sub(r"[^0-9a-z]+", "-", gpu.lower()).strip("-") or "unknown")


def _figure_div(fig) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, config=_FIGURE_CONFIG, default_height="450px")


def _gpu_section(df: pd.DataFrame, verdicts: pd.DataFrame, gpu: str) -> str:
    mine = _gpu_of(df) == gpu
    part, judged = df[mine], verdicts[mine]
    s = summarize(part, judged)
    wrong = (f"<button type='button' class='show-runs bad' data-gpu='{html.escape(gpu, quote=True)}' "
             f"data-output='changed'>show the {s.output_changed} run{'s' if s.output_changed != 1 else ''} "
             "whose output changed</button>") if s.output_changed else "<span class='good'>no output changed</span>"
    before_after = plots.before_after(part, judged)
    n_titles = part.groupby(["file", "title"])["line"].size().ge(2).sum()
    return f"""<section class="gpu" id="{_gpu_anchor(gpu)}">
<h2>{html.escape(gpu)}</h2>
<p class="meta">{html.escape(summary_text(s))}. {wrong}
<button type='button' class='show-runs' data-gpu='{html.escape(gpu, quote=True)}'>show its runs in the table</button></p>
{_figure_div(plots.timeline(part, judged, title=f"{gpu}: prefill and generation per model, in run order (red X: output changed)"))}
<details><summary>Before / after per title ({n_titles} titles with at least 2 runs)</summary>
{_figure_div(before_after)}</details>
<details><summary>Load time per model</summary>{_figure_div(plots.load_spread(part))}</details>
</section>"""


_CHANGE_COLUMNS = ("time (UTC)", "GPU", "model", "change", "prefill tok/s", "generation tok/s", "output",
                   "prefill vs history", "generation vs history")


def _changes_html(df: pd.DataFrame, verdicts: pd.DataFrame, changes: Changes) -> str:
    new = df[changes.mask.to_numpy()]
    judged = verdicts.loc[new.index]
    head = f"<section id='changes'><h2>What changed</h2><p class='meta'>New: {html.escape(changes.rule)}.</p>"
    if new.empty:
        return head + "<p>No new runs.</p></section>"
    s = summarize(new, judged)
    order = pd.to_datetime(new["timestamp"], utc=True).sort_values(ascending=False).index
    rows = []
    for i in order:
        r, v = new.loc[i], judged.loc[i]
        when = f"{r['timestamp']:%Y-%m-%d %H:%M}" if pd.notna(r["timestamp"]) else ""
        row = pd.concat([r, v])
        cls = " class='changed'" if v["output"] == "changed" else ""
        rows.append(
            f"<tr{cls}><td class='nowrap'><a href='#{_row_id(r)}'>{when}</a></td><td>{html.escape(str(r['gpu']))}</td>"
            f"<td>{html.escape(str(r['model']))}</td><td>{html.escape(str(r['change']))}</td>"
            f"<td class='num'>{_fmt(r['prefill_tps'])}</td><td class='num'>{_fmt(r['generation_tps'])}</td>"
            + _verdict_cell(row, "output") + _verdict_cell(row, "prefill_vs_history")
            + _verdict_cell(row, "generation_vs_history") + "</tr>")
    header = "".join(f"<th>{h}</th>" for h in _CHANGE_COLUMNS)
    return (head + f"<p>{len(new)} new run{'s' if len(new) != 1 else ''}: output changed in "
            f"<b>{s.output_changed}</b>; with unchanged output, {s.slower_than_history} slower than their "
            "history. <button type='button' class='show-runs' data-new='1'>show them in the table</button></p>"
            f"<div class='scroll short'><table class='changes'><thead><tr>{header}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div></section>")


def _summary_html(s: Summary) -> str:
    cards = [
        ("runs", s.runs, "", None), ("files", s.files, "", None), ("models", s.models, "", None),
        ("titles", s.titles, "", None),
        ("output changed", s.output_changed, "bad" if s.output_changed else "good", "changed"),
        ("output unknown", s.output_unknown, "warn" if s.output_unknown else "", "unknown"),
        ("slower than title reference", s.slower_than_title, "warn" if s.slower_than_title else "", None),
        ("slower than history", s.slower_than_history, "warn" if s.slower_than_history else "", None),
    ]
    items = []
    for k, n, cls, output in cards:
        body = f'<div class="n">{n}</div><div class="k">{html.escape(k)}</div>'
        if output and n:
            # One click from the count to exactly those runs in the table.
            items.append(f'<button type="button" class="card show-runs {cls}" data-output="{output}">{body}</button>')
        else:
            items.append(f'<div class="card {cls}">{body}</div>')
    return f'<section id="summary" class="summary">{"".join(items)}<p>{html.escape(summary_text(s))}.</p></section>'


def _filters_html(df: pd.DataFrame, gpus: list[str]) -> str:
    gpu_options = "".join(f"<option value='{html.escape(g, quote=True)}'>{html.escape(g)}</option>" for g in gpus)
    outputs = "".join(f"<option value='{o}'>{o}</option>" for o in ("changed", "same", "baseline", "unknown"))
    return f"""<div class="filters" role="search">
<label>find <input id="filter-text" type="search" placeholder="words in any column: model, change, hash..."></label>
<label>GPU <select id="filter-gpu"><option value="">all</option>{gpu_options}</select></label>
<label>output <select id="filter-output"><option value="">all</option>{outputs}</select></label>
<label><input id="filter-slower" type="checkbox"> slower beyond noise</label>
<label><input id="filter-new" type="checkbox"> new</label>
<button type="button" id="filter-clear">clear</button>
<span id="filter-count" class="meta">{len(df)} of {len(df)} runs</span>
</div>"""


def _row_id(r: pd.Series) -> str:
    return "run-" + re.sub(r"[^0-9A-Za-z_-]+", "-", f"{Path(str(r['file'])).name}-{int(r['line'])}")


def _verdict_table_html(df: pd.DataFrame, verdicts: pd.DataFrame, changes: Changes | None = None) -> str:
    runs = df.join(verdicts[[c for c in verdicts.columns if c not in df.columns]])
    new = changes.mask if changes is not None else pd.Series(False, index=df.index)
    head = ("file:line", "time (UTC)", "GPU", "title", "change", "model", "load ms", "prefill tok/s",
            "generation tok/s", "hash", "output") + tuple(c.replace("_", " ") for c in SPEED_VERDICT_COLUMNS)
    numeric = {"load ms", "prefill tok/s", "generation tok/s"}
    rows = []
    for i, r in runs.iterrows():
        when = f"{r['timestamp']:%Y-%m-%d %H:%M:%S}" if pd.notna(r["timestamp"]) else ""
        cells = [
            f"<td>{html.escape(Path(str(r['file'])).name)}:{int(r['line'])}</td>",
            f"<td class='nowrap'>{when}</td>",
            f"<td>{html.escape(str(r['gpu']))}</td>",
            f"<td>{html.escape(str(r['title']))}</td>",
            f"<td>{html.escape(str(r['change']))}</td>",
            f"<td>{html.escape(str(r['model']))}</td>",
            *(f"<td class='num' data-v='{'' if pd.isna(r[c]) else float(r[c])!r}'>{_fmt(r[c])}</td>"
              for c in ("load_ms", "prefill_tps", "generation_tps")),
            f"<td><code>{html.escape(str(r['quality_hash']))}</code></td>",
            _verdict_cell(r, "output"),
            *(_verdict_cell(r, c) for c in SPEED_VERDICT_COLUMNS if c in runs.columns),
        ]
        slower = any(r.get(c) == "regression" for c in SPEED_VERDICT_COLUMNS if "load" not in c)
        classes = " ".join(c for c, on in (("changed", r["output"] == "changed"), ("slower", slower)) if on)
        attrs = (f" id='{_row_id(r)}' data-gpu='{html.escape(str(r['gpu']), quote=True)}'"
                 f" data-output='{html.escape(str(r['output']), quote=True)}' data-new='{int(bool(new.loc[i]))}'")
        row_class = f" class='{classes}'" if classes else ""
        rows.append(f"<tr{row_class}{attrs}>{''.join(cells)}</tr>")
    header = "".join(
        f"<th data-type='{'num' if h in numeric else 'text'}'><button type='button' class='sort'>{html.escape(h)}</button></th>"
        for h in head)
    return (f"<div class='scroll table'><table id='runs-table'><thead><tr>{header}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def _verdict_cell(r: pd.Series, column: str) -> str:
    value = r[column]
    reason = r.get(f"{column}_reason", "")
    text = "" if pd.isna(value) else str(value)
    tip = "" if reason is None or (not isinstance(reason, str) and pd.isna(reason)) else str(reason)
    css = "v-" + text.replace(" ", "-")
    return f"<td class='{css}' title='{html.escape(tip, quote=True)}'>{html.escape(text)}</td>"


def _fmt(value) -> str:
    return "" if pd.isna(value) else f"{value:.2f}"


def _plain(value):
    """JSON-safe scalars: NaN/NaT to null, NumPy numbers to Python numbers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # NumPy arrays and scalars
        return _plain(value.tolist())
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is pd.NaT or value is pd.NA:
        return None
    return value


_FIGURE_CONFIG = {"displaylogo": False, "responsive": True}

_CSS = """
body { font: 14px/1.45 Helvetica, Arial, sans-serif; color: #1a202c; margin: 0 auto; max-width: 1400px;
       padding: 0 24px 48px; background: #fff; }
h1 { font-size: 24px; margin: 24px 0 4px; } h2 { font-size: 18px; margin: 32px 0 8px; }
.meta { color: #5a6473; margin: 4px 0 12px; }
nav ol { display: flex; flex-wrap: wrap; gap: 4px 22px; margin: 4px 0 14px; padding-left: 20px; }
.summary { display: flex; flex-wrap: wrap; gap: 10px; align-items: stretch; }
.summary p { flex-basis: 100%; margin: 6px 0 0; color: #2d3748; }
.card { border: 1px solid #d9dee4; border-radius: 6px; padding: 8px 14px; min-width: 90px; background: #fff;
        font: inherit; text-align: left; color: inherit; }
button.card { cursor: pointer; } button.card:hover { box-shadow: 0 0 0 2px #9aa5b1; }
.card .n { font-size: 22px; font-weight: bold; } .card .k { color: #5a6473; font-size: 12px; }
.card.bad { border-color: #d62728; background: #fdecec; } .card.bad .n { color: #b01c1c; }
.card.good .n { color: #22863a; } .card.warn { border-color: #ff7f0e; background: #fff5eb; }
.good { color: #22863a; }
button.show-runs { font: inherit; font-size: 12px; border: 1px solid #9aa5b1; border-radius: 4px; background: #f4f6f8;
                   cursor: pointer; padding: 1px 8px; }
button.show-runs.bad { border-color: #d62728; color: #b01c1c; background: #fdecec; }
section.gpu { border-top: 3px solid #d9dee4; margin-top: 28px; }
details { margin: 8px 0; } details > summary { cursor: pointer; color: #2d3748; font-weight: bold; }
.scroll { overflow: auto; } .scroll.table { max-height: 80vh; } .scroll.short { max-height: 420px; }
.filters { display: flex; flex-wrap: wrap; gap: 6px 14px; align-items: center; margin: 8px 0; font-size: 13px; }
.filters input[type=search] { width: 300px; }
table { border-collapse: collapse; font-size: 12px; width: 100%; }
th, td { border-bottom: 1px solid #e6e9ed; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f4f6f8; position: sticky; top: 0; z-index: 1; }
th button.sort { font: inherit; font-weight: bold; border: 0; background: none; padding: 0; cursor: pointer; text-align: left; }
th[aria-sort=ascending] button.sort::after { content: " \\25B2"; }
th[aria-sort=descending] button.sort::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } td.nowrap { white-space: nowrap; }
tr.changed td:first-child { border-left: 4px solid #d62728; } tr.changed { background: #fff3f3; }
tr:target { outline: 2px solid #1f77b4; }
.v-changed { color: #b01c1c; font-weight: bold; } .v-unknown { color: #8a5a00; }
.v-improvement { color: #22863a; } .v-regression { color: #c05600; font-weight: bold; }
.v-within-noise, .v-no-reference, .v-same, .v-baseline { color: #5a6473; }
/* A speed verdict of a run whose output changed does not count: struck through. */
tr.changed .v-improvement, tr.changed .v-regression { color: #9aa5b1; font-weight: normal;
  text-decoration: line-through; }
"""

# The table's sorting and filtering, and the buttons that show a set of runs in it: plain DOM
# code inlined in the page (a report must work offline, so no library from a CDN).
_TABLE_JS = """
(function () {
  const table = document.getElementById('runs-table');
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const $ = (id) => document.getElementById(id);
  const text = $('filter-text'), gpu = $('filter-gpu'), output = $('filter-output');
  const slower = $('filter-slower'), fresh = $('filter-new'), count = $('filter-count');
  rows.forEach((r) => { r.dataset.text = r.textContent.toLowerCase(); });

  function apply() {
    const words = text.value.toLowerCase().split(/\\s+/).filter(Boolean);
    let shown = 0;
    rows.forEach((r) => {
      const ok = words.every((w) => r.dataset.text.includes(w))
        && (!gpu.value || r.dataset.gpu === gpu.value)
        && (!output.value || r.dataset.output === output.value)
        && (!slower.checked || r.classList.contains('slower'))
        && (!fresh.checked || r.dataset.new === '1');
      r.hidden = !ok;
      shown += ok;
    });
    count.textContent = shown + ' of ' + rows.length + ' runs';
  }
  [text, gpu, output, slower, fresh].forEach((el) => el.addEventListener('input', apply));
  [gpu, output, slower, fresh].forEach((el) => el.addEventListener('change', apply));

  function clear() {
    text.value = gpu.value = output.value = '';
    slower.checked = fresh.checked = false;
    apply();
  }
  $('filter-clear').addEventListener('click', clear);

  // Sorting: numbers by value (empty cells last), text by locale order; a second click reverses.
  const heads = Array.from(table.tHead.rows[0].cells);
  heads.forEach((th, col) => th.querySelector('button').addEventListener('click', () => {
    const dir = th.getAttribute('aria-sort') === 'ascending' ? -1 : 1;
    heads.forEach((h) => h.removeAttribute('aria-sort'));
    th.setAttribute('aria-sort', dir === 1 ? 'ascending' : 'descending');
    const num = th.dataset.type === 'num';
    const key = (r) => { const c = r.cells[col]; return num ? (c.dataset.v === '' ? NaN : parseFloat(c.dataset.v)) : c.textContent.trim(); };
    const sorted = rows.slice().sort((a, b) => {
      const x = key(a), y = key(b);
      if (num) {
        if (isNaN(x) || isNaN(y)) return isNaN(x) - isNaN(y);
        return dir * (x - y);
      }
      return dir * x.localeCompare(y, undefined, {numeric: true});
    });
    sorted.forEach((r) => body.appendChild(r));
  }));

  // Buttons elsewhere on the page (summary cards, GPU sections, what changed) show their runs here.
  document.querySelectorAll('button.show-runs').forEach((b) => b.addEventListener('click', () => {
    clear();
    gpu.value = b.dataset.gpu || '';
    output.value = b.dataset.output || '';
    fresh.checked = b.dataset.new === '1';
    apply();
    document.getElementById('runs').scrollIntoView();
  }));
  // A link to one run (from "what changed") must land on a visible row.
  function reveal() {
    const row = location.hash && document.getElementById(location.hash.slice(1));
    if (row && row.hidden) { clear(); row.scrollIntoView(); }
  }
  window.addEventListener('hashchange', reveal);
  // A figure in a closed <details> was drawn at no width: size it when opened.
  document.querySelectorAll('details').forEach((d) => d.addEventListener('toggle', () => {
    if (d.open && window.Plotly) d.querySelectorAll('.js-plotly-plot').forEach((g) => Plotly.Plots.resize(g));
  }));
  apply();
})();
"""


# -- CLI handlers (argument definitions live in rwkvlab/cli.py) -------------------------------

def cli_history(args: argparse.Namespace) -> int:
    """`rwkvlab history`: print one row per run with its key verdicts (table, csv or json)."""
    try:
        df, verdicts = load(args.paths)
    except (FileNotFoundError, ValueError) as err:
        print(f"rwkvlab history: {err}", file=sys.stderr)
        return 2
    if args.format == "speed-table":
        from rwkvlab.speed_table import speed_table

        print(speed_table(df, verdicts))
    elif args.format == "csv":
        sys.stdout.write(to_csv(df, verdicts))
    elif args.format == "json":
        sys.stdout.write(to_json(df, verdicts) + "\n")
    else:
        print(format_table(df, verdicts))
        print()
        print(summary_text(summarize(df, verdicts)) + ".")
    return 0


def cli_report(args: argparse.Namespace) -> int:
    """`rwkvlab report`: write the standalone HTML report and print its path (with
    --notebooks: the notebook report, see rwkvlab.notebook_report)."""
    if getattr(args, "notebooks", None) is not None:
        from rwkvlab.notebook_report import cli_notebooks_report

        return cli_notebooks_report(args)
    try:
        since = parse_since(args.since) if getattr(args, "since", None) else None
        path = write_report(args.paths, args.output or "report.html", since=since)
    except (FileNotFoundError, ValueError) as err:
        print(f"rwkvlab report: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0
