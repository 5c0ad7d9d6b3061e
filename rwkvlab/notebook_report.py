"""`rwkvlab report --notebooks`: run the lab's notebooks and export them as one shareable HTML page.

Each notebook is executed afresh (nbclient, its own kernel, working directory = the notebook's
folder, so relative paths resolve as in JupyterLab); the notebook files are never written. The
results become one self-contained page that works offline:

- Figures are stored in the notebooks as plotly's JSON mime bundle
  (``application/vnd.plotly.v1+json``, the ``plotly_mimetype`` renderer the notebooks pin):
  a few kB each, where the ``notebook`` renderer put the ~4.8 MB plotly.js into every
  notebook. nbconvert's HTML cannot draw that bundle, so each one becomes an inline plotly
  figure here, and the page inlines plotly.js exactly once, before the first notebook. (A
  notebook that still uses the ``notebook`` renderer brings its own copy of plotly.js: it is
  dropped, the page's copy serves its figures too.)
- Script tags that load from a CDN (require.js, MathJax) are left out: nothing on the page
  fetches anything.
- Widgets need a kernel. Widget state is not stored, so an output that also carries an HTML
  form (the lab panel shows a static snapshot of itself) is shown as that snapshot; any other
  widget becomes a note saying where to use it live.
- A cell that raises is shown with its traceback in the page, the notebook is marked failed in
  the contents, and the command exits with status 1.

``rwkvlab report`` (the history report) links to this page when it sits beside it under its
default name (:data:`DEFAULT_OUTPUT`), and this page links back to ``report.html`` likewise.
"""
from __future__ import annotations

import argparse
import copy
import html
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import nbformat

DEFAULT_OUTPUT = "lab-report.html"
HISTORY_REPORT = "report.html"  # rwkvlab report's default output name
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
PLOTLY_JSON = "application/vnd.plotly.v1+json"
# Figures fill the page's width and follow it when the window is resized.
FIGURE_CONFIG = {"displaylogo": False, "responsive": True}
_CDN_SCRIPT = re.compile(r"<script[^>]*\bsrc=[\"']https?://[^\"']*[\"'][^>]*>\s*</script>", re.IGNORECASE)
_STYLE = re.compile(r"<style[^>]*>.*?</style>", re.DOTALL | re.IGNORECASE)
_MAIN = re.compile(r"<main>(.*)</main>", re.DOTALL)


def lab_notebooks(folder: str | Path | None = None) -> list[Path]:
    """The lab's notebooks in order: ``notebooks/*.ipynb`` of the checkout (or of ``folder``)."""
    if folder is None:
        from rwkvlab.lab import repo_root

        root = repo_root()
        folder = (root / "notebooks") if root is not None else Path("notebooks")
    folder = Path(folder)
    found = sorted(p for p in folder.glob("*.ipynb") if not p.name.startswith("."))
    if not found:
        raise FileNotFoundError(f"no notebooks (*.ipynb) in {folder}; run from the repository root "
                                "or name the notebooks to run")
    return found


@dataclass
class NotebookRun:
    """One executed notebook: the executed copy, how long it took, the first error (if any)."""

    path: Path
    notebook: nbformat.NotebookNode
    seconds: float
    error: str | None  # "cell N: ExceptionName: message"

    @property
    def anchor(self) -> str:
        return "nb-" + re.sub(r"[^0-9A-Za-z_-]+", "-", self.path.stem)


def execute_notebook(path: str | Path, timeout: float = 600.0) -> NotebookRun:
    """Run a copy of the notebook at ``path`` top to bottom in a fresh kernel.

    Errors do not stop the run (the traceback stays in the output for the page); the first
    one is reported on the result. ``timeout`` is per cell, in seconds.
    """
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    kernel = nb.metadata.get("kernelspec", {}).get("name", "python3")
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel, allow_errors=True,
                            store_widget_state=False,
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    start = time.perf_counter()
    client.execute()
    return NotebookRun(path, nb, time.perf_counter() - start, _first_error(nb))


def _first_error(nb: nbformat.NotebookNode) -> str | None:
    for number, cell in enumerate(nb.cells, 1):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return f"cell {number}: {out.get('ename')}: {out.get('evalue')}"
    return None


def _is_plotly_bundle(html_text: str) -> bool:
    """The output plotly's "notebook" renderer emits once per kernel: the plotly.js library."""
    return "window.PlotlyConfig" in html_text and "plotly.js v" in html_text[:2000] and len(html_text) > 100_000


def figure_html(figure: dict) -> str:
    """A plotly JSON mime bundle as an HTML ``<div>`` that draws it with the page's plotly.js."""
    import plotly.io as pio

    return pio.to_html(figure, include_plotlyjs=False, full_html=False, config=FIGURE_CONFIG,
                       default_height="450px", validate=False)


def prepare_for_page(nb: nbformat.NotebookNode, source: str) -> tuple[nbformat.NotebookNode, bool]:
    """A copy of ``nb`` ready for the page, and whether it draws any plotly figure.

    Plotly JSON outputs become inline figures (they need the page's plotly.js); a plotly.js
    bundle some notebook carried itself is taken out; widget outputs without an HTML form get
    a note instead; stored widget state is dropped (it cannot run offline).
    """
    nb = copy.deepcopy(nb)
    nb.metadata.pop("widgets", None)
    figures = False
    for cell in nb.cells:
        kept = []
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if PLOTLY_JSON in data:
                # The JSON is what the page draws; a PNG JupyterLab cached beside it would only
                # be a stale picture of the same figure.
                figure = data.pop(PLOTLY_JSON)
                data.pop("image/png", None)
                data["text/html"] = figure_html(figure)
                figures = True
            text = data.get("text/html", "")
            text = "".join(text) if isinstance(text, list) else text
            if text and _is_plotly_bundle(text):
                figures = True
                continue
            if "plotly-graph-div" in text:
                figures = True
            if WIDGET_VIEW in data and "text/html" not in data:
                plain = data.get("text/plain", "a widget")
                plain = "".join(plain) if isinstance(plain, list) else plain
                data["text/html"] = (
                    "<div class='rwkvlab-widget-note'>Interactive widget "
                    f"(<code>{html.escape(plain[:120])}</code>): widgets need a running kernel. Open "
                    f"<code>{html.escape(source)}</code> in JupyterLab (<code>make lab</code>) to use it.</div>")
            kept.append(out)
        if cell.cell_type == "code":
            cell.outputs = kept
    return nb, figures


def _export(nb: nbformat.NotebookNode) -> tuple[list[str], str]:
    """(style blocks, the cells' HTML) of a notebook through nbconvert's JupyterLab template."""
    from nbconvert import HTMLExporter

    page, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    head, _, body = page.partition("</head>")
    main = _MAIN.search(body)
    cells = main.group(1) if main else body
    return _STYLE.findall(head), _CDN_SCRIPT.sub("", cells)


def report_page(runs: list[NotebookRun], *, history_report: str | None = None) -> str:
    """The whole page: contents, then every notebook's cells; plotly.js inlined once."""
    from rwkvlab.bench import git_commit

    styles: list[str] = []
    figures = False
    sections = []
    for run in runs:
        source = _display_path(run.path)
        nb, found = prepare_for_page(run.notebook, source)
        figures = figures or found
        nb_styles, cells = _export(nb)
        styles = styles or nb_styles
        state = (f"<span class='failed'>FAILED at {html.escape(run.error)}</span>" if run.error
                 else "<span class='ok'>ran without errors</span>")
        sections.append(
            f"<section class='notebook' id='{run.anchor}'><div class='nb-head'><code>{html.escape(source)}</code>"
            f" · {run.seconds:.1f} s · {state}</div>{cells}</section>")
    contents = "".join(
        f"<li><a href='#{r.anchor}'>{html.escape(_title(r.notebook) or r.path.stem)}</a> "
        f"<span class='meta'>({html.escape(r.path.name)}{', FAILED' if r.error else ''})</span></li>"
        for r in runs)
    back = (f"<p>History report: <a href='{html.escape(history_report, quote=True)}'>"
            f"{html.escape(history_report)}</a></p>") if history_report else ""
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    plotly_js = _plotly_js() if figures else "<!-- no plotly figures in these notebooks -->"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>rwkvlab lab report</title>
{''.join(styles)}
<style>{_CSS}</style>
</head>
<body class="jp-Notebook" data-jp-theme-light="true" data-jp-theme-name="JupyterLab Light">
{plotly_js}
<header class="lab-report">
<h1>rwkvlab lab report</h1>
<p class="meta">The lab's notebooks, executed {generated} at commit {html.escape(git_commit())}. Plots
work offline; widgets are static snapshots (the live panel needs a kernel: <code>make lab</code>).</p>
{back}
<ol>{contents}</ol>
</header>
<main>
{''.join(sections)}
</main>
</body>
</html>
"""


def _plotly_js() -> str:
    """plotly.js (the copy the installed plotly ships) as one inline script."""
    from plotly.offline import get_plotlyjs

    return f'<script type="text/javascript">{get_plotlyjs()}</script>'


def _title(nb: nbformat.NotebookNode) -> str | None:
    """The first Markdown heading of the notebook."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return None


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def write_notebook_report(notebooks: list[str | Path] | None = None, output: str | Path = DEFAULT_OUTPUT,
                          *, timeout: float = 600.0, log=None) -> tuple[Path, list[NotebookRun]]:
    """Execute ``notebooks`` (default: :func:`lab_notebooks`) and write the page to ``output``.

    ``log(line)`` hears about each notebook as it starts and ends. Returns the page's path and
    the runs (check ``run.error``).
    """
    paths = [Path(p) for p in notebooks] if notebooks else lab_notebooks()
    for p in paths:
        if p.suffix != ".ipynb" or not p.is_file():
            raise FileNotFoundError(f"{p}: not a notebook file (*.ipynb); name existing notebooks, "
                                    "or none for all of notebooks/")
    runs = []
    for p in paths:
        if log:
            log(f"running {p} ...")
        run = execute_notebook(p, timeout=timeout)
        if log:
            log(f"  {p.name}: {run.seconds:.1f} s" + (f", FAILED at {run.error}" if run.error else ""))
        runs.append(run)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    history = output.parent / HISTORY_REPORT
    page = report_page(runs, history_report=HISTORY_REPORT if history.is_file() else None)
    output.write_text(page, encoding="utf-8")
    return output, runs


def refresh_notebook(path: str | Path, timeout: float = 600.0) -> NotebookRun:
    """Re-execute the notebook at ``path`` and write it back: the outputs nbval compares.

    Widget state (megabytes of JavaScript per FigureWidget, useless without a kernel) and
    per-cell execution timestamps are not kept, so a refresh changes only what ran differently.
    Edit the jupytext pair (``notebooks/*.py``) and ``jupytext --sync`` it first.
    """
    run = execute_notebook(path, timeout=timeout)
    for cell in run.notebook.cells:
        cell.metadata.pop("execution", None)
    run.notebook.metadata.pop("widgets", None)
    nbformat.write(run.notebook, str(path))
    return run


def notebook_report_beside(history_report: str | Path) -> str | None:
    """The relative link from a history report to the notebook report beside it, if one is there."""
    candidate = Path(history_report).parent / DEFAULT_OUTPUT
    return DEFAULT_OUTPUT if candidate.is_file() else None


def cli_notebooks_report(args: argparse.Namespace) -> int:
    """`rwkvlab report --notebooks [NOTEBOOK ...] [-o lab-report.html]`: exit 0 when every
    notebook ran without errors, 1 when one failed (the page is written anyway), 2 when the
    notebooks could not be found."""
    try:
        path, runs = write_notebook_report(args.notebooks or None, args.output or DEFAULT_OUTPUT,
                                           timeout=args.timeout,
                                           log=lambda line: print(line, file=sys.stderr))
    except FileNotFoundError as err:
        print(f"rwkvlab report: {err}", file=sys.stderr)
        return 2
    print(path)
    failed = [r for r in runs if r.error]
    for r in failed:
        print(f"rwkvlab report: {r.path} failed at {r.error}", file=sys.stderr)
    return 1 if failed else 0


_CSS = """
body.jp-Notebook { max-width: 1200px; margin: 0 auto; padding: 0 24px 48px; }
header.lab-report { font: 14px/1.45 Helvetica, Arial, sans-serif; }
header.lab-report h1 { font-size: 26px; margin: 24px 0 4px; }
.meta { color: #5a6473; }
section.notebook { border-top: 3px solid #d9dee4; margin-top: 32px; padding-top: 8px; }
.nb-head { font: 12px Helvetica, Arial, sans-serif; color: #5a6473; margin-bottom: 8px; }
.nb-head .ok { color: #22863a; } .nb-head .failed, li .failed { color: #b01c1c; font-weight: bold; }
.rwkvlab-widget-note { border: 1px dashed #9aa5b1; border-radius: 4px; padding: 6px 10px; color: #5a6473;
  font: 12px Helvetica, Arial, sans-serif; background: #f7f9fb; }
"""


def main(argv: list[str] | None = None) -> int:
    """``python -m rwkvlab.notebook_report refresh NOTEBOOK ...``: re-execute notebooks in place."""
    parser = argparse.ArgumentParser(prog="python -m rwkvlab.notebook_report",
                                     description="Re-execute notebooks in place (their committed outputs "
                                     "are what nbval compares), without widget state.")
    parser.add_argument("action", choices=["refresh"])
    parser.add_argument("notebooks", nargs="+", help="notebook files (*.ipynb)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one cell may take (default: 600)")
    args = parser.parse_args(argv)
    status = 0
    for path in args.notebooks:
        run = refresh_notebook(path, timeout=args.timeout)
        print(f"{path}: {run.seconds:.1f} s" + (f", FAILED at {run.error}" if run.error else ""))
        status = status or (1 if run.error else 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
