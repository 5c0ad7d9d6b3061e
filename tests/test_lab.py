"""The lab panel (rwkvlab.lab) and the notebook report (rwkvlab.notebook_report), without a browser.

Verdict maths is checked against hand computations; the panel runs real `rwkvlab bench` workers
on lavapipe (tiny model, short lengths) and the real llama.cpp Q8_0 fixture; the notebook
report executes small real notebooks. tests/test_browser.py drives the same panel in Chromium.
"""
from __future__ import annotations

import math
import shutil
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from conftest import WORKER_KILLED_MID_BAR, WORKER_LAST_LINE
from rwkvlab import bench, plots
from rwkvlab.bench import BenchRecord, BenchSettings
from rwkvlab.history import read_history
from rwkvlab.baseline import (Baseline, baseline_from_history, baseline_from_record, compare, repeat_sigma,
                              speed_noise)
from rwkvlab.bench import bench_steps
from rwkvlab.lab import LabError, ModelChoice, Panel, default_history_dir, prepare_kernel, worker_command
from rwkvlab.worker import run_worker
from rwkvlab import options as options_mod
from rwkvlab.options import Options
from rwkvlab.verdicts import DEFAULT_SIGMA, Z, estimate_noise

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(prefill=16, generate=8, warmup=1, repeat=2)  # ~1 s of GPU work per run on lavapipe

prepare_kernel()  # quiet Mesa's probe in the workers too (XDG_RUNTIME_DIR)


def make_record(**changes) -> BenchRecord:
    """A plausible record; speeds set through per-repeat seconds (prompt 16 tok, generate 8)."""
    prefill_tps = changes.pop("prefill_tps", [200.0, 202.0, 198.0])
    generation_tps = changes.pop("generation_tps", [100.0, 101.0, 99.0])
    values = dict(
        title="t", change="c", timestamp=datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc), model="m.gguf",
        model_path="/x/m.gguf", layers=2, embedding=256, gpu="GPU A",
        adapter={"name": "GPU A", "backend": "vulkan", "adapter_type": "CPU", "description": ""},
        options=Options(fusions=frozenset()), settings=BenchSettings(prefill=16, generate=8, warmup=1, repeat=3),
        prompt=list(range(16)), load_ms=400.0, engine_load_ms=350.0,
        prefill_seconds=[16 / x for x in prefill_tps], generation_seconds=[8 / x for x in generation_tps],
        warmup_prefill_seconds=[0.1], warmup_generation_seconds=[0.1], quality_tokens=list(range(32)),
        consistent=True, logit_error=1e-5, logit_tolerance=1e-3, reference="computed", dispatches_per_token=44,
        commit="abc1234",
    )
    values.update(changes)
    return BenchRecord(**values)


def as_baseline(record: BenchRecord, key: str = "session:1") -> Baseline:
    return baseline_from_record(record, key, f"run {key}")


# --------------------------------------------------------------------------------------------
# Verdict maths
# --------------------------------------------------------------------------------------------

def history_of(*records: BenchRecord) -> pd.DataFrame:
    """The history these runs make once saved (what the output rule reads)."""
    return pd.concat([bench.history_frame(r) for r in records], ignore_index=True)


def test_repeat_sigma_is_the_pooled_spread_of_log_repeats():
    a, b = [100.0, 104.0, 97.0], [50.0, 51.0]
    # pooled variance of log values, weighted by degrees of freedom (2 + 1)
    var = (np.var(np.log(a), ddof=1) * 2 + np.var(np.log(b), ddof=1) * 1) / 3
    sigma, dof = repeat_sigma([a, b])
    assert dof == 3 and sigma == pytest.approx(math.sqrt(var), rel=1e-12)
    assert repeat_sigma([[100.0], []]) is None  # a single repeat says nothing about noise


def test_a_faster_run_with_the_same_output_is_an_improvement_beyond_noise():
    base = make_record()
    new = make_record(generation_tps=[130.0, 131.0, 129.0], timestamp=base.timestamp + timedelta(minutes=5))
    c = compare(new, as_baseline(base), history=history_of(base))
    gen = c.speed["generation"]
    # No history: the noise is verdicts' default 2% (the repeats' own spread, ~1%, is smaller);
    # two single runs compared: band = Z * sigma * sqrt(1 + 1).
    assert gen.verdict == "improvement"
    assert gen.delta == pytest.approx(130.0 / 100.0 - 1)
    assert gen.band == pytest.approx(Z * DEFAULT_SIGMA * math.sqrt(2))
    assert c.speed["prefill"].verdict == "within noise" and c.speed["prefill"].delta == pytest.approx(0)
    assert c.output.verdict == "same" and c.logits.verdict == "ok"
    t = c.table
    assert t.loc["generation (tok/s)", "verdict"] == "improvement"
    assert t.loc["generation (tok/s)", "change"] == "+30.0%"
    assert t.loc["quality hash", "this run"] == t.loc["quality hash", "baseline"] == new.quality_hash
    assert t.loc["quality hash", "verdict"] == "same"


@pytest.mark.parametrize("tokens, verdict", [(None, "same"), ([1] * 32, "changed")])
def test_bench_panel_and_report_give_a_run_one_output_verdict(tmp_path, tokens, verdict):
    """The one rule (rwkvlab.verdicts): bench before saving, the panel with the history in hand,
    and the history/report after saving all say the same of the same run, for the same reason."""
    from rwkvlab.verdicts import verdicts

    base = make_record(title="T", change="before")
    run = make_record(title="T", change="after", timestamp=base.timestamp + timedelta(minutes=5),
                      **({"quality_tokens": tokens} if tokens else {}))
    history = tmp_path / "gpu-a.md"
    bench.save_bench(base, history)
    from_bench = bench.judge(run, history)
    from_panel = compare(run, None, history=read_history(tmp_path)).output
    bench.save_bench(run, history)
    saved = read_history(tmp_path)
    from_report = verdicts(saved).iloc[int((saved["change"] == "after").to_numpy().argmax())]
    assert from_bench.output == from_panel.verdict == from_report["output"] == verdict
    assert from_report["output_reason"] in from_bench.output_reason
    assert from_report["output_reason"] in from_panel.reason


def test_noisy_repeats_widen_the_band():
    base = make_record(generation_tps=[100.0, 80.0, 120.0])
    new = make_record(generation_tps=[112.0, 90.0, 135.0])
    gen = compare(new, as_baseline(base)).speed["generation"]
    sigma, _ = repeat_sigma([[112.0, 90.0, 135.0], [100.0, 80.0, 120.0]])
    assert sigma > DEFAULT_SIGMA
    assert gen.band == pytest.approx(Z * sigma * math.sqrt(2)) and gen.verdict == "within noise"
    assert "spread of these runs' repeats" in gen.reason


def test_slower_load_is_a_regression():
    base = make_record()
    slow = make_record(load_ms=600.0)
    load = compare(slow, as_baseline(base)).speed["load"]
    assert load.verdict == "regression" and load.delta == pytest.approx(0.5)


def test_changed_output_is_flagged_and_its_speed_does_not_count():
    base = make_record()
    wrong = make_record(quality_tokens=[1] * 32, generation_tps=[300.0, 301.0, 299.0])
    c = compare(wrong, as_baseline(base), history=history_of(base))
    assert c.output.verdict == "changed" and base.quality_hash in c.output.reason
    assert c.speed["generation"].verdict == "improvement"
    assert "does not count" in c.speed["generation"].reason
    assert c.table.loc["quality hash", "verdict"] == "changed"


def test_logit_error_beyond_tolerance_is_too_large_and_unchecked_is_said():
    assert compare(make_record(logit_error=0.5), None).logits.verdict == "too large"
    assert compare(make_record(logit_error=None), None).logits.verdict == "not checked"


def test_other_model_or_gpu_is_not_comparable_and_no_baseline_is_a_first_run():
    base = make_record()
    other_model = compare(make_record(model="other.gguf"), as_baseline(base), history=history_of(base))
    assert other_model.output.verdict == "first run"  # its own baseline, by the one output rule
    assert other_model.speed["generation"].verdict == "not comparable"
    other_gpu = compare(make_record(gpu="GPU B"), as_baseline(base), history=history_of(base))
    assert other_gpu.output.verdict == "same"  # greedy tokens should not depend on the GPU
    assert other_gpu.speed["prefill"].verdict == "not comparable"
    first = compare(make_record(), None)
    assert first.output.verdict == "first run" and first.speed["load"].verdict == "no baseline"


def test_speed_noise_takes_the_history_estimate_for_the_gpu():
    seeds = read_history(REPO / "data" / "benchmarks")
    noise = {c: estimate_noise(seeds, c) for c in ("prefill_tps", "generation_tps", "load_ms")}
    m2 = noise["prefill_tps"]["Apple M2 Max"]
    assert speed_noise("prefill_tps", "Apple M2 Max", noise, []).sigma == m2.sigma
    # An unknown GPU falls back to the pooled estimate, as rwkvlab.verdicts does.
    assert speed_noise("prefill_tps", "GPU X", noise, []).sigma == noise["prefill_tps"][None].sigma


# --------------------------------------------------------------------------------------------
# Baselines, commands, workers
# --------------------------------------------------------------------------------------------

def test_a_saved_run_reads_back_as_the_same_baseline(tmp_path):
    record = make_record(title="Lab", change="fusions all")
    history = tmp_path / "gpu-a.md"
    line = bench.save_bench(record, history)
    row = read_history(history).iloc[0]
    from_file = baseline_from_history(row)
    direct = as_baseline(record)
    assert from_file.key == f"history:gpu-a.md:{line}"
    for name in ("model", "gpu", "quality_hash", "dispatches_per_token"):
        assert getattr(from_file, name) == getattr(direct, name), name
    for name in ("load_ms", "prefill_tps", "generation_tps"):  # the history keeps 2 decimals
        assert getattr(from_file, name) == pytest.approx(getattr(direct, name), abs=0.006), name
    assert from_file.samples["generation_tps"] == pytest.approx(record.generation_tps_samples)
    assert from_file.logit_error == pytest.approx(1e-5)
    assert "fusions=none" in from_file.options


def test_worker_command_parses_back_to_the_same_options_and_settings():
    from rwkvlab.cli import build_parser

    options = Options(backend="vulkan", path="native", weights="f16", chunk=32, gemm_min_tokens=4,
                      fusions=frozenset({"proj", "wkv"}), tuning="wkv_wg=512,matvec_rows=4")
    settings = BenchSettings(prefill=20, generate=10, warmup=0, repeat=5, reference=False)
    cmd = worker_command(ModelChoice("0.1b", "q8_0"), options, settings, "/tmp/h", python="py")
    assert cmd[:3] == ["py", "-m", "rwkvlab.cli"] and "--no-save" in cmd and "--json" in cmd
    args = build_parser().parse_args(cmd[3:])
    assert options_mod.from_args(args) == options
    back = bench.settings_from_args(args)
    assert (back.prefill, back.generate, back.warmup, back.repeat, back.reference) == (20, 10, 0, 5, False)
    assert (args.preset, args.synth_format, args.history_dir) == ("0.1b", "q8_0", "/tmp/h")


def test_model_choice_names_what_is_wrong(tmp_path):
    with pytest.raises(LabError, match="does not exist"):
        ModelChoice(preset=None, path=str(tmp_path / "missing.gguf")).cli_args()
    with pytest.raises(LabError, match="unknown preset 'huge'.*tiny"):
        ModelChoice(preset="huge")


def test_worker_reports_progress_and_a_real_record():
    events = []
    settings = BenchSettings(**SMALL)
    cmd = worker_command(ModelChoice("tiny", "f32"), Options(), settings, "/nonexistent-history")
    result = run_worker(cmd, on_progress=lambda n, total, stage: events.append((n, total, stage)))
    assert result.error is None and result.returncode == 0
    r = result.record
    # the worker records what ran: Options() with its auto path resolved for this adapter
    from rwkvlab.gpu import resolve_options
    assert r.options == resolve_options(Options()) != Options()
    assert r.settings.prefill == 16 and len(r.prompt) == 16
    assert r.logit_ok and r.consistent and len(r.quality_tokens) == 32
    # events as the protocol goes (a stage change, then its step done), the count never going back
    steps = [n for n, _, _ in events]
    assert steps == sorted(steps) and sorted(set(steps) - {0}) == list(range(1, bench_steps(settings) + 1))
    assert {total for _, total, _ in events} == {bench_steps(settings)}
    assert {"load", "quality tokens", "reference"} <= {stage for _, _, stage in events}


def test_worker_failures_say_why():
    bad = worker_command(ModelChoice("tiny"), Options(backend="metal"), BenchSettings(**SMALL), "/tmp")
    result = run_worker(bad)
    assert result.record is None and result.returncode == 2
    assert "backend 'metal' is not available" in result.error

    killed = run_worker([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert killed.record is None and "killed by signal 9" in killed.error

    start = time.perf_counter()
    slow = run_worker([sys.executable, "-c", "import time; time.sleep(60)"], timeout=1.0)
    assert slow.record is None and "stopped after 1 s" in slow.error
    assert time.perf_counter() - start < 20


def test_a_worker_killed_mid_bar_is_reported_by_its_last_human_line():
    stages = []
    killed = run_worker([sys.executable, "-c", WORKER_KILLED_MID_BAR],
                        on_progress=lambda n, total, stage: stages.append(stage))
    assert killed.record is None and killed.returncode == -9
    assert "killed by signal 9" in killed.error and killed.error.endswith(f": {WORKER_LAST_LINE}")
    assert not any(c in killed.error for c in "\x1b\r")
    assert killed.stderr == [WORKER_LAST_LINE]  # the log holds the person's line, not the bars
    assert stages == []  # progress comes from bench's events on stdout, never from bar redraws


def test_default_history_dir_is_the_checkouts():
    assert default_history_dir() == REPO / "data" / "benchmarks"


# --------------------------------------------------------------------------------------------
# The panel, end to end (real workers on lavapipe)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def panel(tmp_path_factory):
    history = tmp_path_factory.mktemp("history")
    p = Panel(history_dir=history)
    p.configure(**SMALL)
    return p


def test_panel_offers_this_machines_backends_and_every_fusion(panel):
    from rwkvlab.gpu import available_backends
    from rwkvlab.options import FUSIONS

    assert [v for _, v in panel.backend.options] == available_backends()
    assert set(panel.fusion_boxes) == set(FUSIONS)
    # the panel starts from the defaults every command starts from (path auto: resolved by the
    # worker against the adapter it runs on, and recorded resolved)
    assert panel.options() == Options() and panel.options().path == "auto"
    assert panel.model_choice() == ModelChoice("tiny", "f32")
    with pytest.raises(LabError, match="available"):
        panel.configure(backend="metal")
    with pytest.raises(LabError, match="unknown fusion"):
        panel.configure(fusions=["nope"])


def test_panel_offers_the_runtimes_that_find_an_adapter_and_records_the_choice(panel):
    """This machine has both: wgpu-native on Debian's lavapipe, Dawn on the Mesa 25 lavapipe
    `make setup` unpacks; a runtime that finds nothing is not offered."""
    from rwkvlab.gpu import available_runtimes

    assert list(panel.runtime.options) == available_runtimes() == ["wgpu-native", "dawn"]
    assert panel.runtime.value == "wgpu-native"
    panel.configure(runtime="dawn")
    try:
        assert panel.options().runtime == "dawn"
        command = panel.command()
        assert command[command.index("--runtime") + 1] == "dawn"
    finally:
        panel.configure(runtime="wgpu-native")
    with pytest.raises(LabError, match="available: wgpu-native, dawn"):
        panel.configure(runtime="webkit")


def test_panel_runs_compares_plots_and_saves(panel):
    panel.configure(fusions="none")
    first = panel.run()
    assert panel.last_record is first and first.logit_ok
    assert panel.last_comparison.output.verdict == "first run"  # empty history, first run
    assert panel.progress.value == panel.progress.max == bench_steps(panel.settings())
    assert "data-run='1'" in panel.result.value

    # The button's way: a worker thread, then the same result fields.
    panel.configure(fusions="all")
    panel.run_button.click()
    panel.wait(120)
    assert panel.last_error is None and len(panel.runs) == 2
    fused = panel.last_record
    assert fused.options.fusions == frozenset(panel.fusion_boxes)
    cmp_ = panel.last_comparison
    assert cmp_.baseline.key == "session:1"  # auto: the latest earlier run of this model and GPU
    assert cmp_.output.verdict == "same" and cmp_.logits.verdict == "ok"  # fusions keep the output
    table = panel.result_table
    assert table.loc["dispatches/token", "this run"] == str(fused.dispatches_per_token)
    assert int(table.loc["dispatches/token", "baseline"]) > fused.dispatches_per_token
    assert table.loc["quality hash", "this run"] == first.quality_hash
    # The live plot shows both runs: what the Output widget holds is the whole current figure.
    (shown,) = panel.plot.outputs
    figure = shown["data"][plots.PLOTLY_JSON]
    session = [t for t in figure["data"] if t["name"] == plots.SESSION_NAME]
    assert [t["y"] for t in session] == [[first.prefill_tps, fused.prefill_tps],
                                         [first.generation_tps, fused.generation_tps]]
    assert figure["layout"]["title"]["text"].endswith("this session: 2 runs")
    assert list(panel.session_table()["output"]) == ["first run", "same"]

    where = panel.save(title="Lab panel test", change="all fusions")
    df = read_history(panel.history_dir)
    assert len(df) == 1 and where == f"{Path(df.at[0, 'file']).name}:{df.at[0, 'line']}"
    assert (df.at[0, "title"], df.at[0, "change"], df.at[0, "quality_hash"]) == (
        "Lab panel test", "all fusions", fused.quality_hash)
    assert df.at[0, "samples"]["generation_tps"] == pytest.approx(fused.generation_tps_samples)
    with pytest.raises(LabError, match="already saved"):
        panel.save()
    assert f"history:{where}" in [k for _, k in panel.baseline_choices()]


def test_panel_runs_a_gguf_file_against_a_chosen_baseline(panel, fixtures_dir):
    # llama.cpp's own Q8_0 file: the GPU reads its blocks as stored, so bench's tolerance is 1e-3.
    model = fixtures_dir / "tiny-q8_0.gguf"
    panel.configure(model=str(model), fusions="none", baseline="none")
    assert panel.command()[4:6] == ["--model", str(model)]
    record = panel.run()
    assert record.model == "tiny-q8_0.gguf" and record.logit_tolerance == 1e-3 and record.logit_ok
    assert panel.last_comparison.output.verdict == "first run"
    panel.configure(baseline="session:1")
    panel.run()
    # the output by the one rule: the same as this file's first run above (unsaved runs of the
    # session count); the speed against the chosen baseline, which ran another file
    assert panel.last_comparison.output.verdict == "same"
    assert panel.last_comparison.speed["generation"].verdict == "not comparable"
    panel.configure(model="tiny", baseline="auto")


def test_panel_errors_are_shown_and_leave_it_usable(panel, tmp_path):
    panel.configure(model=str(tmp_path / "missing.gguf"))
    with pytest.raises(LabError, match="missing.gguf does not exist"):
        panel.run()
    assert "missing.gguf" in panel.last_error and "missing.gguf" in panel.status.value
    assert not panel.run_button.disabled
    panel.configure(model="tiny")

    # Stop: the worker is killed, the kernel (this process) carries on.
    panel.configure(prefill=512, generate=256, repeat=5)
    thread = panel.start()
    deadline = time.time() + 30
    while panel._proc is None and time.time() < deadline:
        time.sleep(0.05)
    panel.stop()
    thread.join(60)
    assert "killed by signal" in panel.last_error and not panel.run_button.disabled
    panel.configure(**SMALL)


def test_panel_status_line_escapes_outside_text(panel, tmp_path):
    """Text from outside (here a model path; as well a worker's error line or a model's
    architecture name) reaches the status widget as text, never as markup it would render."""
    attack = "<img src=x onerror=alert(1)>"
    panel.configure(model=str(tmp_path / f"{attack}.gguf"))
    with pytest.raises(LabError, match="does not exist"):
        panel.run()
    assert attack in panel.last_error
    assert "<img" not in panel.status.value and "&lt;img src=x onerror=alert(1)&gt;" in panel.status.value
    panel.configure(model="tiny")
    # A progress stage is escaped once, like everything else (not twice: "&amp;lt;").
    panel._on_progress(-1, 0, "prefill <b>&</b>")
    assert panel.status.value.endswith(">running: prefill &lt;b&gt;&amp;&lt;/b&gt;</span>")


def test_panel_displays_as_a_widget_with_a_static_snapshot(panel):
    bundle = panel._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == panel.widget.model_id
    assert "static snapshot" in bundle["text/html"] and "rwkvlab-result-table" in bundle["text/html"]
    assert bundle["text/plain"].startswith("rwkvlab lab panel")


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------

def _notebook(path: Path, *sources: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {path.stem} title")] + [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nb, str(path))
    return path


# The lab's notebooks store figures as plotly JSON; a notebook on the "notebook" renderer
# carries its own plotly.js, which the page must drop in favour of its single copy.
FIGURE = ("import plotly.io as pio\npio.renderers.default = 'plotly_mimetype'\nimport plotly.graph_objects as go\n"
          "go.Figure(go.Bar(x=[1, 2], y=[3, 4])).show()")
FIGURE_WITH_PLOTLY_JS = FIGURE.replace("'plotly_mimetype'", "'notebook'")


def test_notebook_report_is_one_offline_page(tmp_path):
    from rwkvlab.cli import main
    from rwkvlab.notebook_report import write_notebook_report

    a = _notebook(tmp_path / "a.ipynb", FIGURE, "import ipywidgets\nipywidgets.IntSlider(value=3)",
                  f"from rwkvlab.lab import Panel\nPanel(history_dir={str(tmp_path / 'h')!r})")
    b = _notebook(tmp_path / "b.ipynb", FIGURE_WITH_PLOTLY_JS, "print('hello from b')")
    before = a.read_bytes()
    out, runs = write_notebook_report([a, b], tmp_path / "lab-report.html")
    assert a.read_bytes() == before  # notebooks are executed as copies
    assert [r.error for r in runs] == [None, None]
    page = out.read_text()
    assert page.count("* plotly.js v") == 1  # the library once, for both notebooks
    assert page.count('class="plotly-graph-div"') == 2
    assert "application/vnd.plotly.v1+json" not in page  # every JSON figure became HTML
    assert "IntSlider(value=3)" in page and "widgets need a running kernel" in page
    assert "rwkvlab-snapshot" in page  # the panel's own static picture
    assert "hello from b" in page and "href='#nb-a'" in page and "href='#nb-b'" in page
    assert "<script src=" not in page.replace("<script src=\"data:", "")  # nothing fetched from a CDN

    broken = _notebook(tmp_path / "c.ipynb", "raise ValueError('boom')", "print('after')")
    assert main(["report", "--notebooks", str(broken), "-o", str(tmp_path / "c.html")]) == 1
    page = (tmp_path / "c.html").read_text()
    assert "FAILED at cell 2: ValueError: boom" in page and "after" in page


def test_history_report_links_the_notebook_report_beside_it(tmp_path):
    from rwkvlab.report import write_report

    history = tmp_path / "history"
    shutil.copytree(REPO / "data" / "benchmarks", history)
    alone = write_report([history], tmp_path / "report.html").read_text()
    assert "lab-report.html" not in alone
    (tmp_path / "lab-report.html").write_text("<html></html>")
    linked = write_report([history], tmp_path / "report.html").read_text()
    assert 'href="lab-report.html"' in linked


def test_lab_notebooks_are_the_checkouts():
    from rwkvlab.notebook_report import lab_notebooks

    names = [p.name for p in lab_notebooks()]
    assert names[:2] == ["00_quickstart.ipynb", "01_history.ipynb"] and "02_fusion_lab.ipynb" in names


def test_result_table_is_a_dataframe_of_text(panel):
    assert isinstance(panel.result_table, pd.DataFrame)
    assert list(panel.result_table.columns) == ["this run", "baseline", "change", "verdict"]
