"""`rwkvlab history` and `rwkvlab report` end to end on the seed history (86 runs in 4 files).

Every output format is read back and compared with read_history/verdicts row by row; the HTML
report is checked for being standalone: plotly.js inlined exactly once, nothing fetched from
the network.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pandas as pd
import plotly.offline
import pytest

from rwkvlab import report
from rwkvlab.cli import main
from rwkvlab.history import read_history
from rwkvlab.verdicts import verdicts
from conftest import SEED_HISTORY

REPO = Path(__file__).resolve().parents[1]
N_RUNS = 86
EXTERNAL = re.compile(r"<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=\s*[\"']?\s*(https?:)?//", re.I)


@pytest.fixture(scope="module")
def seed() -> tuple[pd.DataFrame, pd.DataFrame]:
    df = read_history(SEED_HISTORY)
    return df, verdicts(df)


@pytest.fixture(scope="module")
def report_page(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("report") / "tmp.html"
    assert main(["report", *map(str, SEED_HISTORY), "-o", str(out)]) == 0
    return out.read_text(encoding="utf-8")


def test_report_command_prints_the_path(tmp_path, capsys):
    out = tmp_path / "sub" / "r.html"
    assert main(["report", *map(str, SEED_HISTORY), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.stat().st_size > 4_000_000  # the inlined plotly.js bundle alone is ~4.8 MB


def test_report_inlines_plotly_js_exactly_once(report_page):
    bundle = plotly.offline.get_plotlyjs()
    # The bundle's first 2 kB (version banner and module prologue) identify it.
    assert report_page.count(bundle[:2000]) == 1
    assert report_page.count("Plotly.newPlot(") == 3  # one GPU: timeline, before/after, load spread


def test_report_loads_nothing_from_the_network(report_page):
    assert EXTERNAL.search(report_page) is None
    assert EXTERNAL.search('<script src="https://cdn.plot.ly/x.js">')  # the check itself works
    assert EXTERNAL.search("<link rel=stylesheet href=//fonts.example/x.css>")


def test_report_summary_and_table_match_the_history(report_page, seed):
    df, v = seed
    n_changed = int((v["output"] == "changed").sum())
    assert f'<div class="n">{N_RUNS}</div><div class="k">runs</div>' in report_page
    assert f'<div class="n">4</div><div class="k">files</div>' in report_page
    assert f'<div class="n">{df["model"].nunique()}</div><div class="k">models</div>' in report_page
    assert f'<div class="n">{n_changed}</div><div class="k">output changed</div>' in report_page
    table = report_page[report_page.index("<table id='runs-table'>"):]
    table = table[:table.index("</table>")]
    assert table.count("<tr") == N_RUNS + 1  # header row + one per run
    assert len(re.findall(r"<tr class='changed[ ']", table)) == n_changed
    assert table.count("data-output='changed'") == n_changed  # what the output filter matches


def test_summary_counts(seed):
    df, v = seed
    s = report.summarize(df, v)
    assert (s.runs, s.files, s.models) == (86, 4, 3)
    assert s.titles == df[["file", "title"]].drop_duplicates().shape[0]
    assert s.output_changed == int((v["output"] == "changed").sum())
    ok = v["output"] != "changed"
    for ref, count in (("title", s.slower_than_title), ("history", s.slower_than_history)):
        slow = (v[f"prefill_vs_{ref}"] == "regression") | (v[f"generation_vs_{ref}"] == "regression")
        assert count == int((slow & ok).sum())
    assert f"{s.first:%Y-%m-%d %H:%M}" == "2025-12-31 02:16"
    assert f"{s.last:%Y-%m-%d %H:%M}" == "2026-01-04 09:31"


def test_report_escapes_text_from_the_history(seed):
    df, v = seed
    df = df.copy()
    df["change"] = df["change"].astype(object)
    df.loc[df.index[0], "change"] = "</td><script>alert(1)</script>"
    page = report.report_html(df, v, sources=["x"])
    assert "<script>alert(1)" not in page
    assert "&lt;/td&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_history_csv_has_every_run_and_its_verdicts(seed, capsys):
    df, v = seed
    assert main(["history", *map(str, SEED_HISTORY), "--format", "csv"]) == 0
    back = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert len(back) == N_RUNS
    assert list(back["line"]) == list(df["line"])
    assert list(back["prefill_tps"]) == list(df["prefill_tps"])
    assert list(back["output"]) == list(v["output"])
    assert list(back["generation_vs_history"]) == list(v["generation_vs_history"])
    assert json.loads(back["quality_tokens"][0]) == list(df["quality_tokens"][0])
    assert list(pd.to_datetime(back["timestamp"])) == list(df["timestamp"])


def test_history_json_has_every_run(seed, capsys):
    df, v = seed
    assert main(["history", *map(str, SEED_HISTORY), "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == N_RUNS
    assert [r["quality_hash"] for r in records] == list(df["quality_hash"])
    assert [r["output"] for r in records] == list(v["output"])
    assert [r["load_ms"] for r in records] == list(df["load_ms"])
    assert records[0]["quality_tokens"] == list(df["quality_tokens"][0])


def test_history_table_is_one_aligned_line_per_run(seed, capsys, monkeypatch):
    df, v = seed
    monkeypatch.chdir(REPO)  # the default path, data/benchmarks, is relative to the repo root
    assert main(["history"]) == 0  # the default folder reads (it holds the seeds and newer runs)
    assert len(capsys.readouterr().out.splitlines()) > N_RUNS
    assert main(["history", *map(str, SEED_HISTORY)]) == 0
    out = capsys.readouterr().out.splitlines()
    header, rule = out[0], out[1]
    rows = out[2:2 + N_RUNS]
    assert header.split()[:3] == ["file", "time", "(UTC)"] and set(rule) == {"-"}
    assert out[2 + N_RUNS] == ""  # then a blank line and the summary
    assert out[3 + N_RUNS].startswith(f"{N_RUNS} runs in 4 files")
    stems = [Path(f).stem for f in df["file"]]
    for row, stem, (_, run), output in zip(rows, stems, df.iterrows(), v["output"]):
        assert row.startswith(stem)
        assert f"{run['prefill_tps']:.1f}" in row and run["quality_hash"] in row and output in row
    # Fixed width: the output column starts at the same place on every line.
    starts = {row.index(run_out, header.index("output")) for row, run_out in zip(rows, v["output"])}
    assert starts == {header.index("output")}


@pytest.mark.parametrize("command", [["history"], ["history", "--format", "json"], ["report", "-o", "x.html"]])
def test_missing_path_is_exit_2_naming_it(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([command[0], "no/such/history.md", *command[1:]]) == 2
    err = capsys.readouterr().err
    assert "no/such/history.md: no such file or folder" in err
    assert not (tmp_path / "x.html").exists()


def test_default_path_outside_the_repo_is_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["history"]) == 2
    assert "data/benchmarks: no such file or folder" in capsys.readouterr().err


def test_folder_without_runs_is_exit_2(tmp_path, capsys):
    (tmp_path / "notes.md").write_text("# Just notes\n\nNo runs here.\n")
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r.html")]) == 2
    assert "no benchmark runs" in capsys.readouterr().err


# The history tools on a machine without wgpu: a finder that refuses the GPU packages stands in
# for their absence, so any import of them on the way fails the command.
_NO_GPU = """
import sys
class NoGPU:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("wgpu", "wgpudawn"):
            raise ImportError(f"{name} is not installed here")
sys.meta_path.insert(0, NoGPU())
from rwkvlab.cli import main
code = main(sys.argv[1:])
assert not any(m.split(".")[0] in ("wgpu", "wgpudawn") for m in sys.modules), "a GPU package was imported"
sys.exit(code)
"""


@pytest.mark.parametrize("command", [
    ["history", "--format", "csv"],
    ["report", "-o", "{tmp}/r.html"],
    ["compare", "title=Baseline 1", "title=Baseline 2"],
])
def test_history_tools_run_without_wgpu(command, tmp_path):
    import subprocess
    import sys

    argv = [c.format(tmp=tmp_path) for c in command] + [str(p) for p in SEED_HISTORY]
    done = subprocess.run([sys.executable, "-c", _NO_GPU, *argv], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]


def test_report_reads_summary_and_changes_first_then_each_gpu_then_the_table(seed):
    df, v = seed
    df = df.copy()
    df.loc[df.index[:10], "gpu"] = "NVIDIA H100 80GB HBM3"  # a second GPU for the sections
    page = report.report_html(df, v, sources=["x"])
    order = [page.index(m) for m in ('id="summary"', "id='changes'", 'id="gpu-apple-m2-max"',
                                     'id="gpu-nvidia-h100-80gb-hbm3"', 'id="runs"')]
    assert order[:2] == sorted(order[:2]) and max(order[:2]) < min(order[2:4]) < order[4]
    assert page.count('class="gpu"') == 2 and page.count("Plotly.newPlot(") == 6
    # Every wrong-output count is a button that shows exactly those runs in the table.
    n_changed = int((v["output"] == "changed").sum())
    assert f'data-output="changed"><div class="n">{n_changed}</div>' in page
    assert "<script src=" not in page and "function apply()" in page


def test_what_changed_is_newer_than_the_report_it_replaces(tmp_path, seed):
    df, v = seed
    out = tmp_path / "report.html"
    # Without the fusion file, whose runs go on for three days after the others' newest.
    earlier = [p for p in SEED_HISTORY if "fusion" not in p.name]
    assert main(["report", *map(str, earlier), "-o", str(out)]) == 0
    first = read_history(earlier)
    newest = first["timestamp"].max()
    assert report.previous_newest_run(out) == newest  # the page records its newest run
    assert main(["report", *map(str, SEED_HISTORY), "-o", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    expected = int((df["timestamp"] > newest).sum())
    assert 0 < expected < N_RUNS  # the fusion file brings runs after the others' newest
    assert f"newest run of the previous report.html ({newest:%Y-%m-%d %H:%M} UTC)" in page
    assert f"{expected} new runs" in page and page.count("data-new='1'><td") == expected


def test_what_changed_since_a_date_and_by_default_the_last_day(tmp_path, seed):
    df, v = seed
    since = report.parse_since("2026-01-03")
    changes = report.changes_since(df, since)
    assert int(changes.mask.sum()) == int((df["timestamp"] > since).sum()) > 0
    last_day = report.changes_since(df, None)
    assert int(last_day.mask.sum()) == int((df["timestamp"] > df["timestamp"].max() - pd.Timedelta(hours=24)).sum())
    assert "last day" in last_day.rule
    out = tmp_path / "r.html"
    assert main(["report", *map(str, SEED_HISTORY), "-o", str(out), "--since", "2026-01-03"]) == 0
    assert "(--since)" in out.read_text(encoding="utf-8")
    assert main(["report", *map(str, SEED_HISTORY), "-o", str(out), "--since", "last tuesday"]) == 2
