"""`python -m rwkvlab.wkv_bench` on lavapipe: every shape is proven right before it is timed."""
from __future__ import annotations

import io

from rwkvlab import wkv_bench
from rwkvlab.options import KERNEL_PATHS
from conftest import read_micro_runs, wait_for_next_second


def test_small_run_checks_then_times_every_shape():
    """Two wkv_wg values on both paths: each equals the unfused plan bit for bit and float64
    NumPy within tolerance (a 'checked' line), then is timed at T = 1 and 8 with GPU
    timestamps (lavapipe has them)."""
    out = io.StringIO()
    timings, failures = wkv_bench.run(wgs=(64, 256), size="small", repeats=1, out=out)
    assert failures == []
    assert {(t.path, t.wg, t.T) for t in timings} == {
        (p, wg, T) for p in KERNEL_PATHS for wg in (64, 256) for T in (1, 8)}
    assert all(t.clock == "gpu" and t.seconds > 0 and t.heads == 4 for t in timings)
    assert out.getvalue().count("checked: ") == 4
    from rwkvlab.gpu import get_gpu

    if get_gpu("auto", native=False).info.adapter_type == "CPU":  # GPUs: conftest.assert_same_plan
        assert out.getvalue().count("checked: equals the unfused plan bit for bit") == 4


def test_a_wrong_answer_is_reported_and_not_timed(monkeypatch):
    """With NumPy's answer moved (the kernel cannot match it), the shape fails its check and
    nothing is timed."""
    real = wkv_bench.reference

    def moved(x):
        want, S = real(x)
        return want + 1.0, S

    monkeypatch.setattr(wkv_bench, "reference", moved)
    timed = []
    monkeypatch.setattr(wkv_bench, "bench", lambda *a, **k: timed.append(a))
    timings, failures = wkv_bench.run(paths=("webgpu",), wgs=(256,), size="small", out=io.StringIO())
    assert timings == [] and timed == []
    assert len(failures) == 1 and "wkv_wg=256: off float64 NumPy" in failures[0]


def test_cli_refuses_a_shape_the_kernel_has_not(capsys, tmp_path):
    assert wkv_bench.main(["--small", "--wgs", "96", "--history-dir", str(tmp_path)]) == 2
    assert "wkv_wg [96]" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_runs_the_history_reads_and_judges(capsys, tmp_path):
    """A run per path x wkv_wg x T: model "wkv_fused H=4 T=<T>", GPU microseconds per dispatch
    in a Kernel time row (lower is better), the check with its comparison to the unfused plan;
    the second call's runs are judged against the first's."""
    args = ["--small", "--paths", "webgpu", "--wgs", "64", "--repeats", "3", "--history-dir", str(tmp_path)]
    assert wkv_bench.main(args) == 0
    first = capsys.readouterr().out
    wait_for_next_second()
    assert wkv_bench.main(args) == 0
    df, judged = read_micro_runs(tmp_path, "wkv_bench", "kernel_time", "us", 4)
    assert list(df["model"]) == ["wkv_fused H=4 T=1", "wkv_fused H=4 T=8"] * 2
    assert list(df["change"][:2]) == ["H=4 T=1 path=webgpu tuning=wkv_wg=64", "H=4 T=8 path=webgpu tuning=wkv_wg=64"]
    assert (df["tuning"] == "wkv_wg=64").all() and df["check"].str.contains("the unfused plan").all()
    assert all(len(s["kernel_time"]) == 3 for s in df["samples"])
    for T, us in zip((1, 8), df["kernel_time"][:2]):  # the printed figure, recorded to 4 digits
        line = next(x for x in first.splitlines() if f"T={T} " in x)
        printed = float(line.split(" us/dispatch")[0].split()[-1])
        assert abs(printed - us) <= 0.005 + 5e-4 * printed, (line, us)
    assert list(judged["kernel_time_vs_title"][:2]) == ["no reference"] * 2
    assert judged["kernel_time_vs_title"][2:].isin(["improvement", "regression", "within noise"]).all()


def test_prefill_shapes_are_checked_then_timed_next_to_wkv_fused():
    """On the native path the prefill part times wkv_fused (the old plan, at the device's
    wkv_wg) at T = 8 and 37, then per wkv_prefill shape checks kv_prep + wkv_prefill +
    groupnorm_out against float64 NumPy and times wkv_prefill alone and the three dispatches,
    with a line comparing old and new per token. A shape wider than a subgroup fails its
    check and is not timed; the webgpu path (no subgroups) has no prefill part."""
    out = io.StringIO()
    timings, failures = wkv_bench.run(paths=KERNEL_PATHS, wgs=(64,), size="small", repeats=1, out=out,
                                      prefill_shapes=("default", (8, 2), (64, 4)))
    native = [t for t in timings if t.path == "native"]
    assert {(t.kernel, t.T) for t in native if t.kernel == "wkv_fused"} == {("wkv_fused", T) for T in (1, 8, 37)}
    from rwkvlab.gpu import get_gpu

    tuning = wkv_bench.kn.choose_tuning(get_gpu("auto", native=True), "native")
    want = {(k, T, shape) for k in ("wkv_prefill", wkv_bench.CHAIN) for T in (8, 37)
            for shape in ((tuning.wkv_lanes, tuning.wkv_rows), (8, 2))}
    assert {(t.kernel, t.T, t.shape) for t in native if t.kernel != "wkv_fused"} == want
    assert all(t.kernel == "wkv_fused" for t in timings if t.path == "webgpu")
    assert all(t.seconds > 0 and t.max_error < 1 for t in timings)
    text = out.getvalue()
    assert text.count(f"checked: {wkv_bench.CHAIN}") == 2 and text.count("us per prompt token") == 4
    assert len(failures) == 1 and "wkv_prefill: WG=256, LANES=64" in failures[0]
    run = next(t for t in native if t.kernel == wkv_bench.CHAIN).micro_run(tuning.as_record())
    assert run.model == f"{wkv_bench.CHAIN} H=4 T=8" and run.tuning.startswith("wkv_lanes=")
    assert "differs from wkv_fused by up to" in run.check


def test_prefill_shapes_on_the_command_line(capsys, tmp_path):
    assert wkv_bench.parse_shapes("none") == () and wkv_bench.parse_shapes("default,8x16") == ("default", (8, 16))
    assert wkv_bench.main(["--small", "--prefill-shapes", "8by16", "--history-dir", str(tmp_path)]) == 2
    assert "8by16" in capsys.readouterr().err
