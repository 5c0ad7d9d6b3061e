"""rwkvlab.gemm_bench on lavapipe: it checks every measurement against NumPy before timing it,
never times a wrong kernel, and sweeps tile shapes in one process."""
from __future__ import annotations

import io

import numpy as np
import pytest

from rwkvlab import gemm_bench
from rwkvlab import kernels as kn
from rwkvlab.gpu import get_gpu
from conftest import read_micro_runs, wait_for_next_second

TUNINGS = ("", "gemm_rows=32,gemm_k=16")  # the device's default shape and the smallest


def test_gemm_bench_small_checks_and_times_each_tuning():
    """Every format x shape x tuning is checked (all tokens, every row of these small matrices)
    and timed with GPU timestamps (lavapipe has them)."""
    out = io.StringIO()
    timings, failures = gemm_bench.run(formats=("F16", "Q4_K"), size="small", tunings=TUNINGS,
                                       repeats=1, out=out)
    assert failures == []
    got = {(t.fmt, t.name, t.rows, t.cols, t.tokens, t.tuning) for t in timings}
    assert got == {(f, name, M, K, 67, tuning) for f in ("F16", "Q4_K")
                   for name, (M, K) in gemm_bench.SHAPES["small"].items() for tuning in TUNINGS}
    for t in timings:
        assert t.clock == "gpu" and t.seconds > 0 and t.max_error < 1, t
    assert len(out.getvalue().splitlines()) == 1 + len(timings)


def test_gemm_bench_never_times_a_wrong_kernel(monkeypatch):
    """NumPy's answer for one output moved by twice its tolerance: reported, and the only pass
    encoded is the untimed one that produced the output."""
    gpu = get_gpu("auto", native=False)
    kernels = kn.kernels_for(gpu, kn.choose_tuning(gpu, "webgpu", ""))
    problem = gemm_bench.Problem.make("Q8_0", 96, 256, 67, np.random.default_rng(0))
    problem.want[66, 95] += 2 * gemm_bench.REL_TOL * problem.scale[66, 95]
    weights = gemm_bench.RotatedWeights(gpu.device, gpu.limits, kn.rows_for_gpu(problem.raw, "Q8_0", 256), 1 << 20)
    passes, encode = [], kn.encode
    monkeypatch.setattr(kn, "encode", lambda cp, plan: (passes.append(len(plan)), encode(cp, plan)))
    with pytest.raises(gemm_bench.KernelCheckError, match="Q8_0 96x256 T=67 .*: token 66 row 95 .* not timed"):
        gemm_bench.bench_gemm(kernels, "webgpu", problem, weights, 67, "", size="small")
    assert passes == [1]


def test_gemm_bench_cli(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default history folder would be: --no-save writes nothing
    assert gemm_bench.main(["--small", "--formats", "Q6_K", "--tunings", "gemm_rows=64,gemm_k=16",
                            "--repeats", "1", "--no-save"]) == 0
    out = capsys.readouterr().out
    assert out.count("webgpu  Q6_K") == 3 and "3 measured, 0 failed" in out
    assert gemm_bench.main(["--small", "--formats", "Q6_K", "--tunings", "gemm_rows=48", "--no-save"]) == 2
    assert "gemm_rows" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_gemm_bench_writes_runs_the_history_reads_and_judges(capsys, tmp_path):
    """A run per product x T x tuning: model "gemm <fmt> <name> <M>x<K> T=<T>", TFLOP/s in a
    Throughput row, the tuning override in Options.tuning's spelling (sorted); the second
    call's runs are judged against the first's (vs title)."""
    args = ["--small", "--formats", "F16", "--tunings", ";gemm_rows=32,gemm_k=16", "--repeats", "2",
            "--history-dir", str(tmp_path), "--title", "gemm tiles"]
    assert gemm_bench.main(args) == 0
    assert "# 6 run(s) saved to " in capsys.readouterr().out
    wait_for_next_second()
    assert gemm_bench.main(args) == 0
    df, judged = read_micro_runs(tmp_path, "gemm tiles", "throughput", "TFLOP/s", 12)
    assert set(df["model"]) == {f"gemm F16 {name} {M}x{K} T=67" for name, (M, K) in gemm_bench.SHAPES["small"].items()}
    assert set(df["tuning"]) == {"default", "gemm_k=16,gemm_rows=32"}
    assert {run["options"]["tuning"] for _, run in df.iterrows()} == {"", "gemm_k=16,gemm_rows=32"}
    assert df["change"].str.endswith(("path=webgpu tuning=default", "path=webgpu tuning=gemm_k=16,gemm_rows=32")).all()
    assert judged["throughput_vs_title"][6:].isin(["improvement", "regression", "within noise"]).all()
    assert (judged[["bandwidth_vs_title", "kernel_time_vs_title"]] == "no reference").all().all()
