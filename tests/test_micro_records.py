"""rwkvlab.micro_records without a GPU: how a micro-benchmark measurement is written, that the
history reads it back as written, and that every consumer of the history (verdicts, `rwkvlab
history`, `rwkvlab report`, the plots, `rwkvlab compare`) takes micro runs beside engine runs."""
from __future__ import annotations

import warnings
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from rwkvlab import micro_records, plots
from rwkvlab.history import HistoryWarning, RunRecord, append_run, append_sidecar, read_history
from rwkvlab.micro_records import MicroRun, figure_text
from rwkvlab.verdicts import MICRO_METRICS, verdicts

START = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
ENV = {"gpu": "Test GPU", "backend": "vulkan", "adapter_type": "DiscreteGPU"}


def micro(figure: str, value: float, k: int, model: str = "matvec Q8_0 2560x2560", path: str = "native",
          tuning: str = "") -> MicroRun:
    return MicroRun(model=model, change=f"{model.split(' ', 1)[1]} path={path} tuning={tuning or 'default'}",
                    figure=figure, value=value, samples=[value * 0.99, value, value * 1.01],
                    seconds=[1e-6, 1e-6, 1e-6], path=path, tuning=tuning, clock="gpu",
                    check="max error 0.01 of tolerance (test)", timestamp=START + timedelta(minutes=k))


def write(path, run: MicroRun, title: str) -> None:
    append_run(path, micro_records.run_record(run, title, "Test GPU", "vulkan", "abc1234"))
    append_sidecar(path, micro_records.sidecar_record(run, title, "vulkan", ENV, "abc1234"))


@pytest.fixture
def mixed(tmp_path):
    """One history file: two engine runs, and micro runs of each bench, two of each problem."""
    path = tmp_path / "test-gpu.md"
    for k, prefill in enumerate((100.0, 101.0)):
        append_run(path, RunRecord(title="engine", change=f"run {k}", timestamp=START - timedelta(hours=1 - k),
                                   model="m.gguf", gpu="Test GPU", load_ms=900.0, prefill_tps=prefill,
                                   generation_tps=50.0, quality_tokens=list(range(32))))
    for k, value in enumerate((1000.0, 1500.0)):
        write(path, micro("bandwidth", value, k, tuning="matvec_rows=2" if k else ""), "kernel_bench")
    for k, value in enumerate((20.0, 20.02)):
        write(path, micro("throughput", value, 2 + k, model="gemm F16 ffn.key 10240x2560 T=512"), "gemm_bench")
    for k, value in enumerate((5.0, 7.5)):
        write(path, micro("kernel_time", value, 4 + k, model="wkv_fused H=40 T=1", tuning="wkv_wg=256"), "wkv_bench")
    return path


def test_figure_text_keeps_four_digits_without_an_exponent():
    assert figure_text(2600.5, "GB/s") == "2600 GB/s"  # 2600.5 rounds half to even
    assert figure_text(22.4137, "TFLOP/s") == "22.41 TFLOP/s"
    assert figure_text(0.0032904, "TFLOP/s") == "0.003290 TFLOP/s"
    assert figure_text(24051.8, "us") == "24052 us"
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive number"):
            figure_text(bad, "us")


def test_a_run_names_a_known_figure_and_a_valid_tuning():
    with pytest.raises(ValueError, match="figure 'bandwith'"):
        micro("bandwith", 1.0, 0)
    assert micro("bandwidth", 1.0, 0, tuning="matvec_rows=2,matvec_pieces=8").tuning == "matvec_pieces=8,matvec_rows=2"
    with pytest.raises(ValueError, match="matvec_rows=3"):
        micro("bandwidth", 1.0, 0, tuning="matvec_rows=3")


def test_the_runs_read_back_as_written_and_are_judged(mixed):
    with warnings.catch_warnings():
        warnings.simplefilter("error", HistoryWarning)
        df = read_history(mixed)
    micro_runs = df[df["title"] != "engine"]
    assert list(micro_runs["bandwidth"].dropna()) == [1000.0, 1500.0]
    assert list(micro_runs["throughput"].dropna()) == [20.0, 20.02]
    assert list(micro_runs["kernel_time"].dropna()) == [5.0, 7.5]
    for name, (column, _, unit) in MICRO_METRICS.items():
        assert df.attrs["units"][column] == unit
    assert list(micro_runs["tuning"][:2]) == ["default", "matvec_rows=2"]
    assert list(micro_runs["commit"].unique()) == ["abc1234"]  # backticks keep it text
    assert micro_runs["samples"].iloc[0] == {"bandwidth": [990.0, 1000.0, 1010.0], "seconds": [1e-6] * 3}
    assert micro_runs["options"].iloc[1] == {"backend": "vulkan", "path": "native", "tuning": "matvec_rows=2"}
    v = verdicts(df)
    assert list(v["output"]) == ["baseline", "same"] + ["unknown"] * 6
    assert list(v["bandwidth_vs_title"][2:4]) == ["no reference", "improvement"]  # tuning vs tuning
    assert list(v["throughput_vs_title"][4:6]) == ["no reference", "within noise"]
    assert list(v["kernel_time_vs_title"][6:8]) == ["no reference", "regression"]  # +50% time
    assert (v["prefill_vs_title"][2:] == "no reference").all()


def test_history_report_and_plots_take_micro_runs(mixed, tmp_path, capsys):
    """`rwkvlab history` (every format), `rwkvlab report` and the figures it draws work on a
    history holding micro runs; those runs have no engine speeds, so the speed figures draw
    nothing for them, and no figure shows their own numbers yet (see docs/perf-notes.md)."""
    from rwkvlab.cli import main as cli
    from rwkvlab.report import write_report

    for fmt in ("table", "csv", "json"):
        assert cli(["history", str(mixed), "--format", fmt]) == 0
    out = capsys.readouterr().out
    assert "kernel_bench" in out and "wkv_fused H=40 T=1" in out and "bandwidth_vs_title" in out
    page = write_report([mixed], tmp_path / "report.html").read_text()
    assert "Q8_0 2560x2560 path=native tuning=matvec_rows=2" in page
    df = read_history(mixed)
    v = verdicts(df)
    micro_ids = set(plots.run_id(df[df["title"] != "engine"]))
    for fig in (plots.timeline(df, v), plots.before_after(df, v), plots.load_spread(df)):
        drawn = [(i, x, y) for trace in fig.data if trace.ids is not None
                 for i, x, y in zip(trace.ids, trace.x if trace.x is not None else [None] * len(trace.ids),
                                    trace.y if trace.y is not None else [None] * len(trace.ids))]
        assert drawn
        for i, x, y in drawn:
            if i in micro_ids and fig.data[0].type != "box":
                value = x if fig.data[0].type == "bar" else y
                assert value is None or np.isnan(value)


def test_compare_judges_the_figure_and_calls_hashless_output_unknown(mixed):
    """Two tunings of one matrix side by side: the bandwidth judged, no engine speed row, and
    the output "unknown" (neither side has a hash), which is not a regression."""
    from rwkvlab.compare import compare_runs, select

    df = read_history(mixed)
    result = compare_runs(df, select(df, "change=Q8_0 2560x2560 path=native tuning=default"),
                          select(df, "tuning=matvec_rows=2"))
    assert list(result.rows["metric"]) == ["bandwidth (GB/s)", "output (quality hash)"]
    assert list(result.rows["verdict"]) == ["improvement", "unknown"]
    assert not result.regressed()
