"""`python -m rwkvlab.wkv_bench` on lavapipe: every shape is proven right before it is timed."""
from __future__ import annotations

import io

from rwkvlab import wkv_bench
from rwkvlab.options import KERNEL_PATHS


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


def test_cli_refuses_a_shape_the_kernel_has_not(capsys):
    assert wkv_bench.main(["--small", "--wgs", "96"]) == 2
    assert "wkv_wg [96]" in capsys.readouterr().err
