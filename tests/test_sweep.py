"""`rwkvlab sweep`: the cross product, fresh subprocesses, and the best *correct* configuration.

The selection logic is tested on hand-made rows (fast, every corner); the subprocess runner on
tiny Python commands (a crash, a hang, a bad exit); and one real sweep of two configurations
runs on lavapipe with the tiny llama.cpp fixture (two bench subprocesses, ~6 s).
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest

from conftest import WORKER_KILLED_MID_BAR, WORKER_LAST_LINE
from rwkvlab.bench import BenchSettings, settings_from_args
from rwkvlab.cli import build_parser, main
from rwkvlab.history import HistoryWarning, read_history, sidecar_path
from rwkvlab.options import FUSIONS, Options, OptionsError, from_args
from rwkvlab import options as options_mod
from rwkvlab.sweep import (VARIABLE, Config, SweepResult, SweepRow, baseline_options, configurations, parse_vary,
                           pick_best, with_baseline)
from rwkvlab.worker import bench_command, run_worker

SMALL = ["--prefill", "8", "--generate", "4", "--warmup", "0", "--repeat", "1", "--no-progress"]


# --------------------------------------------------------------------------------------------
# Building the configurations
# --------------------------------------------------------------------------------------------

def test_parse_vary_and_cross_product():
    vary = parse_vary(["path=webgpu,native", "weights=native,f16", "gemm-min-tokens=2,8"])
    assert vary == {"path": ["webgpu", "native"], "weights": ["native", "f16"], "gemm_min_tokens": ["2", "8"]}
    configs = configurations(Options(chunk=32), vary)
    assert len(configs) == 8
    assert configs[0].label == "path=webgpu weights=native gemm_min_tokens=2"
    assert configs[-1].options == Options(chunk=32, path="native", weights="f16", gemm_min_tokens=8)
    assert len({c.options for c in configs}) == 8  # every combination once
    assert all(c.options.chunk == 32 for c in configs)  # options not varied keep the base value


def test_runtime_is_sweepable_and_travels_to_the_worker():
    configs = configurations(Options(), parse_vary(["runtime=wgpu-native,dawn"]))
    assert [c.options.runtime for c in configs] == ["wgpu-native", "dawn"]
    assert [c.label for c in configs] == ["runtime=wgpu-native", "runtime=dawn"]
    args = options_mod.to_args(configs[1].options)
    assert args[args.index("--runtime") + 1] == "dawn"
    with pytest.raises(OptionsError, match="unknown runtime 'webkit'; available: wgpu-native, dawn"):
        parse_vary(["runtime=webkit"])


def test_fusion_values():
    configs = configurations(Options(), parse_vary(["fusions=none,all"]))
    assert [c.options.fusions for c in configs] == [frozenset(), frozenset(tuple(FUSIONS))]
    assert [c.label for c in configs] == ["fusions=none", "fusions=all"]


@pytest.mark.parametrize("item, message", [
    ("colour=red", "unknown option 'colour'; available: " + ", ".join(VARIABLE)),
    ("path=webgpu,fastest", "unknown path 'fastest'; available: auto, webgpu, native"),
    ("chunk=64,big", "chunk='big': expected a whole number"),
    ("fusions=nosuch", "unknown fusion 'nosuch'"),
    ("path", "expected OPTION=V1,V2"),
    ("path=", "expected OPTION=V1,V2"),
])
def test_bad_vary_fails_before_anything_runs(item, message):
    with pytest.raises(OptionsError) as err:
        parse_vary([item])
    assert message in str(err.value)


def test_vary_twice_is_refused():
    with pytest.raises(OptionsError, match="given twice"):
        parse_vary(["path=webgpu", "path=native"])


def test_baseline_is_added_only_when_missing():
    # the baseline is the unfused plan on the portable path, whatever the defaults
    base = Options(chunk=16, path="webgpu", fusions=frozenset())
    assert baseline_options(Options(path="native", weights="f16", chunk=16)) == base
    configs, added = with_baseline(base, configurations(base, parse_vary(["path=native", "weights=f16"])))
    assert added and configs[0].options == base and len(configs) == 2
    configs, added = with_baseline(base, configurations(base, parse_vary(["path=webgpu,native"])))
    assert not added and len(configs) == 2


def test_bench_command_reproduces_the_configuration(tmp_path):
    options = Options(backend="vulkan", path="native", weights="f16", chunk=16, gemm_min_tokens=4,
                      fusions=frozenset(tuple(FUSIONS)))
    settings = BenchSettings(prefill=20, generate=10, warmup=1, repeat=5, reference=False, progress=False)
    cmd = bench_command(["--model", str(tmp_path / "m.gguf")], options, settings, title="T", change="C",
                        file="f", history_dir=str(tmp_path), save=False)
    assert cmd[1:4] == ["-m", "rwkvlab.cli", "bench"] and "--json" in cmd and "--events" in cmd
    args = build_parser().parse_args(cmd[3:])
    assert from_args(args) == options
    assert settings_from_args(args) == settings
    assert (args.title, args.change, args.file, args.no_save, args.model) == ("T", "C", "f", True, str(tmp_path / "m.gguf"))


# --------------------------------------------------------------------------------------------
# Choosing the best correct configuration
# --------------------------------------------------------------------------------------------

def _row(label: str, gen: float | None, hash_: str = "abc", logit_ok: bool | None = True, **opts) -> SweepRow:
    config = Config(Options(**opts), label)
    if gen is None:
        return SweepRow(config, None, "exit 2: boom", 2, 1.0)
    result = {"generation_tps": gen, "prefill_tps": 2 * gen, "load_ms": 10.0, "quality_hash": hash_,
              "logit_ok": logit_ok, "logit_error": None if logit_ok is None else (1e-6 if logit_ok else 0.5)}
    return SweepRow(config, result, None, 0, 1.0)


def _said(rows: list[SweepRow]) -> dict[int, tuple[str, str]]:
    """What the output rule says of these rows when the first is the earliest of its kind."""
    first = rows[0].get("quality_hash")
    return {i: ("baseline" if i == 0 else "same" if r.get("quality_hash") == first else "changed", "test")
            for i, r in enumerate(rows) if r.ran}


def test_best_is_the_fastest_correct_row():
    base = _row("base", 10.0)
    rows = [base,
            _row("wrong tokens, fastest", 50.0, hash_="def", path="native"),
            _row("wrong logits", 40.0, logit_ok=False, weights="f16"),
            _row("crashed", None, chunk=8),
            _row("right", 20.0, path="native", weights="f16"),
            _row("right, slower", 15.0, chunk=16)]
    result = SweepResult(rows, base, judged=_said(rows))
    result.best = pick_best(result)
    assert result.best.config.label == "right"
    assert [result.status(r) for r in rows] == ["baseline", "WRONG (tokens)", "WRONG (logits)", "FAILED",
                                                "same", "same"]
    table = result.table()
    assert "*  right " in table and "FAILED: exit 2: boom" in table
    summary = result.summary()
    assert "best correct configuration: right  (20.00 tok/s generation" in summary
    assert "1 configuration(s) failed to run: crashed" in summary


def test_unchecked_logits_still_need_the_baselines_tokens():
    base = _row("base", 10.0, logit_ok=None)
    rows = [base, _row("other", 30.0, logit_ok=None, path="native")]
    result = SweepResult(rows, base, judged=_said(rows))
    assert pick_best(result).config.label == "other"
    assert result.status(base) == "baseline (logits not checked)"


def test_the_first_run_of_its_kind_is_the_baseline_when_the_plain_plan_failed():
    """The output rule, not the sweep, picks the baseline: with the plain plan crashed, the next
    run of the model and lengths is the earliest of its kind, so it is judged "baseline"."""
    base = _row("base", None)
    rows = [base, _row("other", 30.0, path="native")]
    result = SweepResult(rows, base, judged={1: ("baseline", "its earliest run")})
    assert pick_best(result).config.label == "other"
    assert result.status(rows[0]) == "FAILED" and result.status(rows[1]) == "baseline"
    assert "plain plan" not in result.summary()
    assert result.output(rows[0]) == ("unknown", "did not run")


# --------------------------------------------------------------------------------------------
# One configuration, one subprocess
# --------------------------------------------------------------------------------------------

def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_the_worker_runner_reads_the_json_record(capfd):
    row = run_worker(_py("import json,sys; print('progress', file=sys.stderr); "
                         "print(json.dumps({'generation_tps': 3.0}))"), timeout=60, relay=True)
    assert row.raw is not None and row.raw == {"generation_tps": 3.0} and row.returncode == 0
    assert "progress" in capfd.readouterr().err  # the child's stderr streams through


def test_a_crash_costs_one_row():
    row = run_worker(_py("import os; os.abort()"), timeout=60, relay=True)
    assert row.raw is None and row.error.startswith("killed by signal 6")
    row = run_worker(_py("import sys; print('rwkvlab bench: no adapter', file=sys.stderr); sys.exit(2)"),
                     timeout=60, relay=True)
    assert row.raw is None and row.error == "exit 2: rwkvlab bench: no adapter"
    row = run_worker(_py(
        "import sys; print('rwkvlab bench: shader x does not compile:\\n  detail\\n  more', file=sys.stderr); "
        "sys.exit(2)"), timeout=60, relay=True)
    assert row.error == "exit 2: rwkvlab bench: shader x does not compile:"
    row = run_worker(_py("print('not json')"), timeout=60, relay=True)
    assert row.raw is None and row.error.startswith("exit 0")


def test_a_worker_killed_mid_bar_names_its_last_human_line(capfd):
    row = run_worker(_py(WORKER_KILLED_MID_BAR), timeout=60, relay=True)
    assert row.raw is None and row.error == f"killed by signal 9: {WORKER_LAST_LINE}"
    assert "\x1b[A" in capfd.readouterr().err  # the terminal still gets the bars as drawn


def test_a_hang_is_stopped():
    row = run_worker(_py("import time; time.sleep(60)"), timeout=1.0, relay=True)
    assert row.raw is None and row.error == "stopped after 1 s (its time limit)" and row.seconds < 30


# --------------------------------------------------------------------------------------------
# A real sweep on lavapipe
# --------------------------------------------------------------------------------------------

def test_sweep_of_two_configurations_on_the_tiny_fixture(fixtures_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RWKVLAB_CACHE", str(tmp_path / "cache"))
    history = tmp_path / "sweep.md"
    # --fusions none: the unfused webgpu configuration (the sweep's baseline) is one of the two
    rc = main(["sweep", "--model", str(fixtures_dir / "tiny-f32.gguf"), "--vary", "path=webgpu,native",
               "--fusions", "none",
               "--title", "Paths", "--file", "sweep", "--history-dir", str(tmp_path), *SMALL])
    out = capsys.readouterr().out
    assert rc == 0, out
    with warnings.catch_warnings():
        warnings.simplefilter("error", HistoryWarning)
        df = read_history(history)
    assert list(df["change"]) == ["path=webgpu", "path=native"]
    assert set(df["title"]) == {"Paths"} and list(df["path"]) == ["webgpu", "native"]
    assert all(df["samples"].map(lambda s: len(s["generation_s"]) == 1))
    assert len(sidecar_path(history).read_text().splitlines()) == 2
    # The table has both rows; the best is a correct one: the webgpu path is the baseline, and
    # the native path (f32 file, f32 weights) must reproduce its tokens.
    assert "path=webgpu" in out and "path=native" in out and "baseline" in out
    best = [line for line in out.splitlines() if line.startswith("*")]
    assert len(best) == 1 and ("same" in best[0] or "baseline" in best[0])
    assert "best correct configuration: path=" in out
    fastest = df.loc[df["generation_tps"].idxmax(), "change"]
    if df["quality_hash"].nunique() == 1:
        assert f"best correct configuration: {fastest} " in out
    assert f"runs appended to {history}" in out
    assert json.loads(sidecar_path(history).read_text().splitlines()[0])["options"]["path"] == "webgpu"


def test_sweep_bad_arguments_exit_2(tmp_path, capsys):
    assert main(["sweep", "--preset", "tiny", "--vary", "colour=red", "--history-dir", str(tmp_path)]) == 2
    assert "unknown option 'colour'" in capsys.readouterr().err
    assert not any(Path(tmp_path).iterdir())
