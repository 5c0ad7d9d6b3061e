"""A real browser: JupyterLab serves notebooks/02_fusion_lab.ipynb, headless Chromium runs it,
presses the panel's Run button and waits for the result table and the plot to update: the new
run must be drawn (its points counted in the SVG, before and after), the figure must follow the
page's width, and a reload of the saved notebook must still draw it.

Chromium is Debian's (/usr/bin/chromium, installed by scripts/setup.sh), driven by the Python
Playwright package; Playwright's own browser download is never used. The server runs on
127.0.0.1 with a random free port and a token, serving a copy of the notebook in a temporary
folder (autosave cannot touch the committed one), and is stopped, with its kernels, whether the
test passes or not. Set RWKVLAB_SCREENSHOTS=docs to also write docs/panel.png and
docs/history.png (the README's screenshots).

Two more tests open HTML reports with every network request refused: the notebook report
(rwkvlab report --notebooks), whose plots must draw, and the history report (rwkvlab report),
whose run table must sort and filter.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from playwright.sync_api import expect, sync_playwright

from rwkvlab.options import FUSIONS

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
NOTEBOOK = "02_fusion_lab.ipynb"
# Lavapipe runs the notebook's five benchmark workers and two profiles in ~25 s; the margin is
# for a loaded CI machine.
RUN_ALL_TIMEOUT_S = 240
RUN_CLICK_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server we started and the kernels it started (its own process group)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)  # the group of our own child, by its id
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a copy of the notebook: (base URL, token, notebook folder)."""
    work = tmp_path_factory.mktemp("jupyterlab")
    notebooks = work / "notebooks"
    notebooks.mkdir()
    shutil.copy(REPO / "notebooks" / NOTEBOOK, notebooks / NOTEBOOK)
    # No news or update-check toast over the screenshots.
    settings = work / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(work / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(work / "workspaces"), JUPYTER_RUNTIME_DIR=str(work / "runtime"))
    env.setdefault("XDG_RUNTIME_DIR", str(work / "runtime"))
    log = open(work / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={notebooks}"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=notebooks, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"JupyterLab did not start (exit {proc.poll()}); its log:\n"
                                   + (work / "server.log").read_text(errors="replace")[-4000:])
            time.sleep(0.3)
        yield base, token, notebooks
    finally:
        _stop(proc)
        log.close()


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: run scripts/setup.sh (apt-get install chromium)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _prompts(page) -> list[str]:
    return page.eval_on_selector_all(".jp-CodeCell .jp-InputPrompt", "els => els.map(e => e.textContent.trim())")


# The rendered points of the live plot's session traces, per speed panel: plotly.js binds each
# trace's calculated data (trace included) to the SVG group it draws the trace in.
_SESSION_POINTS = """(gd, name) => Array.from(gd.querySelectorAll('.scatterlayer g.trace'))
    .filter(g => g.__data__ && g.__data__[0] && g.__data__[0].trace.name === name)
    .map(g => g.querySelectorAll('path.point').length)"""


def _settled(read, done, timeout: float = 20.0):
    """Poll ``read()`` until ``done(value)`` or the timeout; return the last value."""
    deadline = time.time() + timeout
    while True:
        value = read()
        if done(value) or time.time() > deadline:
            return value
        time.sleep(0.25)


def _expect_session_points(plot, n: int) -> None:
    from rwkvlab.plots import SESSION_NAME

    counts = _settled(lambda: plot.evaluate(_SESSION_POINTS, SESSION_NAME) if plot.count() else [],
                      lambda c: c == [n, n], timeout=60)
    assert counts == [n, n], f"session points drawn per panel: {counts}, expected {n} on each"


def _drawn_points(plot) -> int:
    return plot.evaluate("gd => gd.querySelectorAll('.scatterlayer path.point').length")


def test_fusion_lab_runs_in_jupyterlab_and_the_run_button_works(lab, browser, tmp_path):
    base, token, _ = lab
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(f"{base}/lab/tree/{NOTEBOOK}?reset&token={token}")
    page.wait_for_selector(".jp-NotebookPanel .jp-CodeCell")
    # The kernel is ready when the status bar says so (the toolbar's indicator reads "idle"
    # before any kernel is connected).
    expect(page.locator(".jp-StatusBar-Widget", has_text=re.compile(r"\| Idle"))).to_be_visible(timeout=60_000)

    # Run All Cells from the menu, then wait until every code cell has an execution count.
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
    deadline = time.time() + RUN_ALL_TIMEOUT_S
    while True:
        prompts = _prompts(page)
        if prompts and all(re.fullmatch(r"\[\d+\]:", p) for p in prompts) and int(prompts[-1][1:-2]) > 3:
            break
        if time.time() > deadline:
            page.screenshot(path=str(tmp_path / "run-all.png"))
            pytest.fail(f"Run All did not finish in {RUN_ALL_TIMEOUT_S} s: prompts {prompts}; "
                        f"screenshot {tmp_path / 'run-all.png'}")
        time.sleep(0.5)
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts()
    assert not [e for e in errors if "Traceback" in e or "Error" in e], errors

    # The panel rendered as a live widget and shows the notebook's runs: unfused, each fusion
    # alone, all of them.
    runs = len(FUSIONS) + 2
    panel = page.locator(".rwkvlab-panel")
    panel.scroll_into_view_if_needed()
    expect(panel.locator(f".rwkvlab-result-table[data-run='{runs}']")).to_be_visible()
    plot = panel.locator(".rwkvlab-live-plot .js-plotly-plot")
    plot_title = plot.locator(".gtitle")
    expect(plot_title).to_contain_text(f"this session: {runs} runs")
    _expect_session_points(plot, runs)
    before = _drawn_points(plot)

    # Click Run: one more worker; the table and the plot must follow, with the new run drawn
    # (a star on both speed panels), not merely named in the title.
    panel.locator("button.rwkvlab-run").click()
    expect(panel.locator(f".rwkvlab-result-table[data-run='{runs + 1}']")).to_be_visible(
        timeout=RUN_CLICK_TIMEOUT_S * 1000)
    expect(plot_title).to_contain_text(f"this session: {runs + 1} runs")
    _expect_session_points(plot, runs + 1)
    assert _drawn_points(plot) == before + 2
    table = panel.locator(".rwkvlab-result-table table").inner_text()
    assert "quality hash" in table and "generation (tok/s)" in table
    assert re.search(r"logit error\s+\S+\s+\S+\s+tolerance [\d.e-]+\s+ok", table), table
    status = panel.locator(".rwkvlab-status").inner_text()
    assert status.startswith(f"run {runs + 1} done"), status

    # The figure follows the page's width, all of it (legend included) inside its cell.
    wide = plot.bounding_box()["width"]
    page.set_viewport_size({"width": 1000, "height": 1000})
    narrow = _settled(lambda: plot.bounding_box()["width"], lambda w: w < wide - 300)
    cell = panel.locator(".rwkvlab-live-plot").bounding_box()
    assert narrow < wide - 300 and narrow <= cell["width"] + 1, (wide, narrow, cell)
    page.set_viewport_size({"width": 1500, "height": 1000})

    # A view made later (the notebook saved and the page reloaded, the kernel still running)
    # draws the plot as it is now, this run included.
    page.keyboard.press("Control+s")
    expect(page.locator(".jp-mod-dirty")).to_have_count(0)
    page.reload()
    panel = page.locator(".rwkvlab-panel")
    panel.scroll_into_view_if_needed(timeout=60_000)
    plot = panel.locator(".rwkvlab-live-plot .js-plotly-plot")
    _expect_session_points(plot, runs + 1)

    # Pictures for people: the whole panel in view, no file browser beside it.
    page.set_viewport_size({"width": 1500, "height": 2600})
    page.locator(".lm-TabBar-tab[data-id='filebrowser']").click()  # closes the left sidebar
    shots = {"panel.png": panel.locator(".rwkvlab-controls"), "history.png": plot}
    for name, where in shots.items():
        where.scroll_into_view_if_needed()
        where.screenshot(path=str(tmp_path / name))
        assert (tmp_path / name).stat().st_size > 10_000  # a real picture, not an empty box
    target = os.environ.get("RWKVLAB_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for name in shots:
            shutil.copy(tmp_path / name, Path(target) / name)
    page.close()


def test_notebook_report_plots_draw_offline(browser, tmp_path):
    from rwkvlab.notebook_report import write_notebook_report

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(
        "import plotly.io as pio\npio.renderers.default = 'plotly_mimetype'\nimport plotly.graph_objects as go\n"
        f"go.Figure(go.Bar(x=['a', 'b'], y=[{i}, 4], name='bars {i}')).show()") for i in (1, 2)]
    nbformat.write(nb, str(tmp_path / "figures.ipynb"))
    out, runs = write_notebook_report([tmp_path / "figures.ipynb"], tmp_path / "lab-report.html")
    assert runs[0].error is None

    context, page, refused = _offline_page(browser, tmp_path)
    page.goto(out.as_uri())
    graphs = page.locator(".plotly-graph-div")
    expect(graphs).to_have_count(2)
    for i in range(2):
        expect(graphs.nth(i).locator(".main-svg").first).to_be_attached()
        expect(graphs.nth(i).locator(".bars path")).to_have_count(2)  # both bars drawn
    assert refused == []  # nothing on the page reaches for the network
    context.close()


def _offline_page(browser, tmp_path):
    """A page that may load file: URLs only; every other request is refused and recorded."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    refused: list[str] = []

    def offline(route):
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    context.route("**/*", offline)
    return context, context.new_page(), refused


def _visible_rows(page) -> list[dict]:
    return page.evaluate("""() => Array.from(document.querySelectorAll('#runs-table tbody tr'))
        .filter(r => !r.hidden).map(r => ({id: r.id, output: r.dataset.output,
            gen: r.cells[8].dataset.v === '' ? null : parseFloat(r.cells[8].dataset.v),
            text: r.textContent}))""")


def test_history_report_sorts_and_filters_offline(browser, tmp_path):
    from conftest import SEED_HISTORY
    from rwkvlab.history import read_history
    from rwkvlab.report import write_report
    from rwkvlab.verdicts import verdicts

    out = write_report(SEED_HISTORY, tmp_path / "report.html")
    df = read_history(SEED_HISTORY)
    judged = verdicts(df)
    n_changed = int((judged["output"] == "changed").sum())
    context, page, refused = _offline_page(browser, tmp_path)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(out.as_uri())
    expect(page.locator("#filter-count")).to_have_text(f"{len(df)} of {len(df)} runs")
    expect(page.locator("section.gpu .js-plotly-plot .scatterlayer path.point").first).to_be_attached()

    # Sort by generation speed: fastest first after two clicks, slowest first after one.
    head = page.locator("#runs-table th", has_text="generation tok/s").locator("button")
    head.click()
    speeds = [r["gen"] for r in _visible_rows(page)]
    assert speeds == sorted(speeds) and len(speeds) == len(df)
    head.click()
    speeds = [r["gen"] for r in _visible_rows(page)]
    assert speeds == sorted(speeds, reverse=True)
    assert speeds[0] == df["generation_tps"].max()

    # Filter by words: every shown row has them, and exactly the runs whose text has them show.
    model = df["model"].iloc[0]
    page.locator("#filter-text").fill(model.upper())  # case does not matter
    shown = _visible_rows(page)
    assert len(shown) == int((df["model"] == model).sum()) and all(model in r["text"] for r in shown)
    page.locator("#filter-clear").click()
    assert len(_visible_rows(page)) == len(df)

    # One click from the summary's count to exactly the runs whose output changed.
    page.locator("#summary button.card[data-output='changed']").click()
    shown = _visible_rows(page)
    assert len(shown) == n_changed > 0 and {r["output"] for r in shown} == {"changed"}
    expect(page.locator("#filter-count")).to_have_text(f"{n_changed} of {len(df)} runs")
    assert page.evaluate("document.getElementById('runs').getBoundingClientRect().top") < 200  # scrolled there
    assert not errors, errors
    assert refused == []  # the page asked the network for nothing
    context.close()
