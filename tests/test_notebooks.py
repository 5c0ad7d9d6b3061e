"""The committed notebooks stay small: figures as plotly JSON, never plotly.js inside them.

The "notebook" renderer put the ~4.8 MB plotly.js into every notebook with a figure (20 MB for
the lab); the JSON mime bundle is a few kB per figure and JupyterLab draws it with its own
plotly.js. Offline HTML gets plotly.js from `rwkvlab report --notebooks`, once per page.
"""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
PLOTLY_JSON = "application/vnd.plotly.v1+json"
ALL_NOTEBOOKS_LIMIT = 1_000_000  # bytes, the lab's notebooks together


def _outputs(path: Path):
    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        yield from cell.get("outputs", [])


def test_the_notebooks_together_are_under_a_megabyte():
    sizes = {p.name: p.stat().st_size for p in NOTEBOOKS}
    assert len(sizes) >= 5, sizes
    assert sum(sizes.values()) < ALL_NOTEBOOKS_LIMIT, sizes


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_figures_are_stored_as_plotly_json_without_plotly_js(path):
    for out in _outputs(path):
        data = out.get("data", {})
        html = data.get("text/html", "")
        html = "".join(html) if isinstance(html, list) else html
        assert "plotly.js v" not in html and "window.PlotlyConfig" not in html, path.name
        if PLOTLY_JSON in data:
            figure = data[PLOTLY_JSON]
            assert {"data", "layout"} <= set(figure), path.name
            assert len(json.dumps(figure)) < 200_000, path.name  # a figure, not a library


def test_notebooks_that_draw_figures_pin_the_json_renderer():
    # Each notebook with a figure names the renderer itself: plotly's default depends on where
    # the kernel runs, and "notebook" would put plotly.js back into the file.
    for path in NOTEBOOKS:
        twin = path.with_suffix(".py").read_text(encoding="utf-8")
        if ".show()" in twin:
            assert 'pio.renderers.default = "plotly_mimetype"' in twin, path.name
