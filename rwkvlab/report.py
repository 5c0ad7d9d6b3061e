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


def write_report(paths: list[str | Path], output: str | Path) -> Path:
    """Read the history at `paths`, write a standalone HTML report to `output`, return its path."""
    from rwkvlab.notebook_report import notebook_report_beside

    df, verdicts = load(paths)
    output = Path(output)
    page = report_html(df, verdicts, sources=[str(p) for p in paths],
                       notebook_report=notebook_report_beside(output))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page, encoding="utf-8")
    return output


def report_html(df: pd.DataFrame, verdicts: pd.DataFrame, sources: list[str],
                notebook_report: str | None = None) -> str:
    """The whole report page: summary, plots (plotly.js inlined once), verdict table; with a
    link to the notebook report (`rwkvlab report --notebooks`) when its relative path is given."""
    lab_link = (f'<p class="meta">Lab notebooks, executed: <a href="{html.escape(notebook_report, quote=True)}">'
                f"{html.escape(notebook_report)}</a></p>") if notebook_report else ""
    summary = summarize(df, verdicts)
    figures = [
        ("Speed over time", plots.timeline(df, verdicts)),
        ("Before / after per title", plots.before_after(df, verdicts)),
        ("Load time", plots.load_spread(df)),
    ]
    config = {"displaylogo": False, "responsive": True}
    # The first figure carries the plotly.js bundle (~4.8 MB); the others reuse it.
    figure_html = "\n".join(
        f"<section><h2>{html.escape(name)}</h2>"
        + fig.to_html(full_html=False, include_plotlyjs=(i == 0), config=config)
        + "</section>"
        for i, (name, fig) in enumerate(figures)
    )
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>rwkvlab benchmark report</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>rwkvlab benchmark report</h1>
<p class="meta">history: {html.escape(", ".join(sources))} · generated {generated}</p>
{lab_link}
</header>
{_summary_html(summary)}
{figure_html}
<section><h2>Verdicts, one row per run</h2>
<p class="meta">Speed verdicts compare a run with its title's reference run (<em>vs title</em>) and
with the runs before it (<em>vs history</em>). Hover a verdict for its reason. Rows marked red
changed the model's greedy output: their speed is not comparable.</p>
{_verdict_table_html(df, verdicts)}
</section>
</body>
</html>
"""


def _summary_html(s: Summary) -> str:
    cards = [
        ("runs", s.runs, ""), ("files", s.files, ""), ("models", s.models, ""), ("titles", s.titles, ""),
        ("output changed", s.output_changed, "bad" if s.output_changed else "good"),
        ("output unknown", s.output_unknown, "warn" if s.output_unknown else ""),
        ("slower than title reference", s.slower_than_title, "warn" if s.slower_than_title else ""),
        ("slower than history", s.slower_than_history, "warn" if s.slower_than_history else ""),
    ]
    items = "".join(
        f'<div class="card {cls}"><div class="n">{n}</div><div class="k">{html.escape(k)}</div></div>'
        for k, n, cls in cards
    )
    return f'<section class="summary">{items}<p>{html.escape(summary_text(s))}.</p></section>'


def _verdict_table_html(df: pd.DataFrame, verdicts: pd.DataFrame) -> str:
    runs = df.join(verdicts[[c for c in verdicts.columns if c not in df.columns]])
    head = ("file:line", "time (UTC)", "title", "change", "model", "load ms", "prefill tok/s",
            "generation tok/s", "hash", "output") + tuple(c.replace("_", " ") for c in SPEED_VERDICT_COLUMNS)
    rows = []
    for _, r in runs.iterrows():
        when = f"{r['timestamp']:%Y-%m-%d %H:%M:%S}" if pd.notna(r["timestamp"]) else ""
        cells = [
            f"<td>{html.escape(Path(str(r['file'])).name)}:{int(r['line'])}</td>",
            f"<td class='nowrap'>{when}</td>",
            f"<td>{html.escape(str(r['title']))}</td>",
            f"<td>{html.escape(str(r['change']))}</td>",
            f"<td>{html.escape(str(r['model']))}</td>",
            *(f"<td class='num'>{_fmt(r[c])}</td>" for c in ("load_ms", "prefill_tps", "generation_tps")),
            f"<td><code>{html.escape(str(r['quality_hash']))}</code></td>",
            _verdict_cell(r, "output"),
            *(_verdict_cell(r, c) for c in SPEED_VERDICT_COLUMNS if c in runs.columns),
        ]
        row_class = " class='changed'" if r["output"] == "changed" else ""
        rows.append(f"<tr{row_class}>{''.join(cells)}</tr>")
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f"<div class='scroll'><table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"


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


_CSS = """
body { font: 14px/1.45 Helvetica, Arial, sans-serif; color: #1a202c; margin: 0 auto; max-width: 1400px;
       padding: 0 24px 48px; background: #fff; }
h1 { font-size: 24px; margin: 24px 0 4px; } h2 { font-size: 18px; margin: 32px 0 8px; }
.meta { color: #5a6473; margin: 4px 0 12px; }
.summary { display: flex; flex-wrap: wrap; gap: 10px; align-items: stretch; }
.summary p { flex-basis: 100%; margin: 6px 0 0; color: #2d3748; }
.card { border: 1px solid #d9dee4; border-radius: 6px; padding: 8px 14px; min-width: 90px; }
.card .n { font-size: 22px; font-weight: bold; } .card .k { color: #5a6473; font-size: 12px; }
.card.bad { border-color: #d62728; background: #fdecec; } .card.bad .n { color: #b01c1c; }
.card.good .n { color: #22863a; } .card.warn { border-color: #ff7f0e; background: #fff5eb; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 12px; width: 100%; }
th, td { border-bottom: 1px solid #e6e9ed; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f4f6f8; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } td.nowrap { white-space: nowrap; }
tr.changed td:first-child { border-left: 4px solid #d62728; } tr.changed { background: #fff3f3; }
.v-changed { color: #b01c1c; font-weight: bold; } .v-unknown { color: #8a5a00; }
.v-improvement { color: #22863a; } .v-regression { color: #c05600; font-weight: bold; }
.v-within-noise, .v-no-reference, .v-same, .v-baseline { color: #5a6473; }
/* A speed verdict of a run whose output changed does not count: struck through. */
tr.changed .v-improvement, tr.changed .v-regression { color: #9aa5b1; font-weight: normal;
  text-decoration: line-through; }
"""


# -- CLI handlers (argument definitions live in rwkvlab/cli.py) -------------------------------

def cli_history(args: argparse.Namespace) -> int:
    """`rwkvlab history`: print one row per run with its key verdicts (table, csv or json)."""
    try:
        df, verdicts = load(args.paths)
    except (FileNotFoundError, ValueError) as err:
        print(f"rwkvlab history: {err}", file=sys.stderr)
        return 2
    if args.format == "csv":
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
        path = write_report(args.paths, args.output or "report.html")
    except (FileNotFoundError, ValueError) as err:
        print(f"rwkvlab report: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0
