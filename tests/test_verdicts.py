"""Verdicts on the seed history (whose wrong fast runs are known) and on constructed histories."""
from __future__ import annotations

import math
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rwkvlab.history import HistoryWarning, RunRecord, append_run, read_history
from rwkvlab.verdicts import (
    DEFAULT_SIGMA,
    MICRO_METRICS,
    SIGMA_FLOOR,
    Z,
    change_points,
    estimate_noise,
    judge,
    verdicts,
)
from conftest import SEED_HISTORY

REPO = Path(__file__).resolve().parents[1]
FUSION = "m2max-fusion-and-metal.md"
UTC = timezone.utc
SPEED = ("improvement", "regression", "within noise", "no reference")


@pytest.fixture(scope="module")
def seeds() -> tuple[pd.DataFrame, pd.DataFrame]:
    df = read_history(SEED_HISTORY)
    return df, verdicts(df)


def history(tmp_path: Path, runs: list[dict]) -> pd.DataFrame:
    """Write runs (dicts of RunRecord fields; one hour apart by default) and read them back."""
    path = tmp_path / "lab.md"
    start = datetime(2026, 6, 1, tzinfo=UTC)
    for k, fields in enumerate(runs):
        base = dict(title="T", change=f"run {k}", timestamp=start + timedelta(hours=k), model="m.gguf",
                    gpu="gpu", load_ms=1000.0, prefill_tps=100.0, generation_tps=50.0, quality_hash="abc")
        append_run(path, RunRecord(**{**base, **fields}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", HistoryWarning)
        return read_history(path)


# ------------------------------------------------------------------------------------------
# The seed history
# ------------------------------------------------------------------------------------------

def test_columns_values_and_index(seeds):
    df, v = seeds
    assert v.index.equals(df.index)
    expected = ["output", "output_reason"]
    for m in ("prefill", "generation", "load", "bandwidth", "throughput", "kernel_time"):
        expected += [f"{m}_vs_title", f"{m}_vs_title_reason", f"{m}_vs_history", f"{m}_vs_history_reason",
                     f"{m}_change_point"]
    assert list(v.columns) == expected
    assert set(v["output"]) <= {"baseline", "same", "changed", "unknown"}
    # the seeds hold no micro-benchmark run: nothing of theirs is judged, each run says why
    for m, (column, _, _) in MICRO_METRICS.items():
        assert (v[f"{m}_vs_title"] == "no reference").all() and (v[f"{m}_vs_history"] == "no reference").all()
        assert (v[f"{m}_vs_title_reason"] == f"no {column} value in this run").all()
        assert not v[f"{m}_change_point"].any()
    for m in ("prefill", "generation", "load"):
        assert set(v[f"{m}_vs_title"]) <= set(SPEED) and set(v[f"{m}_vs_history"]) <= set(SPEED)
        assert v[f"{m}_change_point"].dtype == bool
    reasons = v[[c for c in v.columns if c.endswith("_reason")]]
    assert reasons.map(lambda r: isinstance(r, str) and len(r) > 10).all().all()
    # rows in another order under other labels get the same verdicts (time order decides)
    perm = df.sample(frac=1, random_state=3).index
    shuffled = df.loc[perm].set_axis([f"r{i}" for i in range(len(df))])
    again = verdicts(shuffled)
    assert list(again.index) == list(shuffled.index)
    pd.testing.assert_frame_equal(again.reset_index(drop=True), v.loc[perm].reset_index(drop=True))


def test_metal_q8_0_and_everything_after_tensorop_caching_changed_output(seeds):
    df, v = seeds
    metal = df["title"] == "Metal Q8_0"
    assert metal.sum() == 15 and (v.loc[metal, "output"] == "changed").all()
    q8 = df["model"] == "2.9b-Q8_0.gguf"
    after = q8 & (df["timestamp"] >= pd.Timestamp("2026-01-04 08:13:31", tz="UTC"))
    assert after.sum() == 19 and (v.loc[after, "output"] == "changed").all()
    # the other two wrong runs: a bad fusion and a bad shader, both fixed right after
    odd = df[(v["output"] == "changed") & ~after]
    assert sorted(odd["title"]) == ["Fused State Loop", "Fused Test"]
    assert (v["output"] == "changed").sum() == 21 and (v["output"] == "unknown").sum() == 0


def test_one_baseline_per_model_and_why(seeds):
    df, v = seeds
    base = df[v["output"] == "baseline"]
    assert sorted(zip(base["model"], base["file"], base["line"])) == [
        ("2.9b-Q4_K_M.gguf", "m2max-architecture-opts.md", 18),  # earliest run under "Baseline"
        ("2.9b-Q8_0.gguf", FUSION, 480),  # "## Baseline", not the wrong-output "WebGPU Baseline"
        ("rwkv7-g1b-2.9b-20251205-ctx8192-Q4_K_M.gguf", "m2max-loading.md", 18),  # no Baseline title
    ]
    i = df.index[(df["file"] == FUSION) & (df["line"] == 1216)][0]
    assert v.at[i, "output_reason"] == (
        f"hash f091452164ed0fc differs from hash c55251c506e49c98 of baseline {FUSION} 'Baseline' "
        "2026-01-04 05:37:23 (line 480)"
    )
    j = df.index[(df["file"] == "m2max-loading.md") & (df["line"] == 18)][0]
    assert "its earliest run (no title names a baseline)" in v.at[j, "output_reason"]


def test_seed_noise_estimates(seeds):
    df, _ = seeds
    # 25 pairs of consecutive repeats; MAD about zero scaled to one run's standard deviation
    expect = {"prefill_tps": 0.00367, "generation_tps": 0.00441, "load_ms": 0.0201}
    for column, sigma in expect.items():
        noise = estimate_noise(df, column)
        assert noise["Apple M2 Max"].pairs == 25
        assert noise["Apple M2 Max"].sigma == pytest.approx(sigma, rel=0.01)


def run_index(df: pd.DataFrame, file: str, line: int):
    return df.index[(df["file"] == file) & (df["line"] == line)][0]


def test_clearly_faster_runs_are_improvements(seeds):
    df, v = seeds
    gemv = run_index(df, "m2max-caching-and-gemv.md", 114)  # prefill 152 -> 218 tok/s, same output
    assert v.at[gemv, "prefill_vs_history"] == "improvement" and v.at[gemv, "prefill_change_point"]
    assert v.at[gemv, "prefill_vs_history_reason"].startswith("change point: the level moves")
    assert "+43.9% vs 152.25 tok/s" in v.at[gemv, "prefill_vs_history_reason"]
    assert v.at[gemv, "generation_vs_history"] == "within noise"
    fused = run_index(df, FUSION, 41)  # pack_kvakk after "Baseline before fusion" under one title
    assert v.loc[fused, ["prefill_vs_title", "generation_vs_title", "load_vs_title"]].tolist() == ["improvement"] * 3
    assert v.at[fused, "load_vs_title_reason"].startswith("-18.3% vs 5242.61 ms")  # lower load is better
    q4k = run_index(df, FUSION, 296)  # "Enabled Q4K loading": prefill 219 -> 95 tok/s
    assert v.at[q4k, "prefill_vs_history"] == "regression" and v.at[q4k, "prefill_change_point"]
    assert v.at[q4k, "load_vs_history"] == "improvement"  # it loads faster, though


def test_repeats_of_one_setup_are_within_noise(seeds):
    df, v = seeds
    for title, count in (("Metal Test", 9), ("Metal V7 Test", 7)):
        rows = df.index[(df["file"] == FUSION) & (df["title"] == title) & (df["model"] == "2.9b-Q4_K_M.gguf")]
        assert len(rows) == count
        first, repeats = rows[0], rows[1:]
        assert (v.loc[first, ["prefill_vs_title", "generation_vs_title", "load_vs_title"]] == "no reference").all()
        for m in ("prefill", "generation", "load"):
            assert (v.loc[repeats, f"{m}_vs_title"] == "within noise").all(), (title, m)
            assert not v.loc[repeats, f"{m}_change_point"].any()


def test_fast_wrong_runs_do_not_count(seeds):
    df, v = seeds
    fast = run_index(df, FUSION, 1423)  # "Fixed discount loading": 390 tok/s with wrong output
    assert v.at[fast, "output"] == "changed"
    assert v.at[fast, "prefill_vs_history"] == "improvement"
    assert v.at[fast, "prefill_vs_history_reason"].endswith("output changed, so this speed does not count")
    # wrong runs never enter a reference: the whole "Metal Q8_0" title has none
    metal = df.index[df["title"] == "Metal Q8_0"]
    assert (v.loc[metal, "prefill_vs_title"] == "no reference").all()
    assert "(1 changed excluded)" in v.at[metal[1], "prefill_vs_title_reason"]
    # nor a change point: those live on the series of correct runs only
    assert not v.loc[v["output"] == "changed", ["prefill_change_point", "generation_change_point", "load_change_point"]].any().any()


# ------------------------------------------------------------------------------------------
# Constructed histories
# ------------------------------------------------------------------------------------------

def test_wrong_fast_run_is_no_reference_for_the_next_correct_one(tmp_path):
    df = history(tmp_path, [
        {"prefill_tps": 100.0}, {"prefill_tps": 100.2}, {"prefill_tps": 99.9},
        {"prefill_tps": 200.0, "quality_hash": "bad"},  # twice as fast, wrong output
        {"prefill_tps": 100.1},
    ])
    v = verdicts(df)
    assert list(v["output"]) == ["baseline", "same", "same", "changed", "same"]
    assert v.at[3, "prefill_vs_title"] == "improvement"
    assert v.at[4, "prefill_vs_title"] == "within noise" and v.at[4, "prefill_vs_history"] == "within noise"
    assert "1 run(s) with changed output excluded" in v.at[4, "prefill_vs_title_reason"]


def test_load_time_direction_and_missing_values(tmp_path):
    df = history(tmp_path, [{"load_ms": 1000.0}, {"load_ms": 1500.0}, {"load_ms": 500.0},
                            {"load_ms": None, "quality_hash": ""}])
    v = verdicts(df)
    # with 0 repeat pairs the band comes from the default noise: 3 * 2% * sqrt(2) = 8.5%
    assert v.at[1, "load_vs_title"] == "regression" and v.at[2, "load_vs_title"] == "improvement"
    assert f"sigma {DEFAULT_SIGMA:.2%} from default 2.0%: only 0 repeat pairs" in v.at[1, "load_vs_title_reason"]
    assert v.at[3, "load_vs_title"] == "no reference" and v.at[3, "load_vs_title_reason"] == "no load_ms value in this run"
    assert v.at[3, "output"] == "unknown" and v.at[3, "output_reason"] == "no quality hash recorded"


def test_history_verdict_uses_the_regime_since_the_last_change_point(tmp_path):
    rng = np.random.default_rng(5)
    values = list(100 * np.exp(rng.normal(0, 0.003, 8))) + list(130 * np.exp(rng.normal(0, 0.003, 8)))
    # repeats (same change text) give the noise estimate; titles differ so vs_title says nothing
    df = history(tmp_path, [{"prefill_tps": float(x), "change": "same setup", "title": f"T{k}"}
                            for k, x in enumerate(values)])
    v = verdicts(df)
    assert list(np.flatnonzero(v["prefill_change_point"])) == [8]
    assert v.at[8, "prefill_vs_history"] == "improvement"
    # after the step the reference is the new level, so runs at 130 are not "improvements" again
    assert (v.loc[9:, "prefill_vs_history"] == "within noise").all()
    assert "since the last change point" in v.at[12, "prefill_vs_history_reason"]
    assert (v["prefill_vs_title"] == "no reference").all()


def test_empty_history():
    df = read_history([])
    v = verdicts(df)
    assert v.empty and "output" in v.columns and "load_change_point" in v.columns


# ------------------------------------------------------------------------------------------
# The maths on its own
# ------------------------------------------------------------------------------------------

def repeats(rng: np.random.Generator, setups: int, wild: float) -> pd.DataFrame:
    """4 repeats per setup with 1% log-normal noise; a fraction ``wild`` of runs is 3x off."""
    rows = []
    for setup in range(setups):
        for _ in range(4):
            x = 200.0 * math.exp(rng.normal(0, 0.01)) * (3.0 if rng.random() < wild else 1.0)
            rows.append({"model": "m", "gpu": "g", "change": f"s{setup}", "quality_hash": "h",
                         "timestamp": pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(minutes=len(rows)),
                         "prefill_tps": x})
    return pd.DataFrame(rows)


def test_noise_estimator_recovers_a_known_sigma():
    """600 pairs of 1% noise: the MAD's relative standard error is about 1.17/sqrt(600) = 4.8%,
    so the estimate must land within 12% (2.5 standard errors) of the true 1%."""
    noise = estimate_noise(repeats(np.random.default_rng(11), 200, 0.0), "prefill_tps")
    assert noise["g"].pairs == 600 and noise[None].sigma == noise["g"].sigma
    assert noise["g"].sigma == pytest.approx(0.01, rel=0.12)


def test_noise_estimator_shrugs_off_wild_repeats():
    """With 5% of runs 3x off (about 10% of pairs spoiled) the median moves only a little
    (expected bias +13%: the 55th instead of the 50th percentile), while a plain standard
    deviation of the same differences is blown up more than tenfold."""
    df = repeats(np.random.default_rng(12), 200, 0.05)
    sigma = estimate_noise(df, "prefill_tps")["g"].sigma
    assert 0.01 <= sigma <= 0.0135
    d = np.concatenate([np.diff(g["prefill_tps"].to_numpy()) / g["prefill_tps"].to_numpy()[:-1]
                        for _, g in df.groupby("change")])
    assert np.std(d) / math.sqrt(2) > 10 * 0.01


def test_judge_band_and_direction():
    sigma = 0.01
    band = Z * sigma * math.sqrt(1 + 1 / 3)
    assert judge(100 * (1 + 0.9 * band), [100, 99, 101], +1, sigma) == ("within noise", pytest.approx(0.9 * band), pytest.approx(band))
    assert judge(100 * (1 + 1.1 * band), [100, 99, 101], +1, sigma)[0] == "improvement"
    assert judge(100 * (1 + 1.1 * band), [100, 99, 101], -1, sigma)[0] == "regression"  # e.g. load time
    assert judge(100 * (1 - 1.1 * band), [100, 99, 101], +1, sigma)[0] == "regression"


def test_change_points_on_synthetic_series():
    rng = np.random.default_rng(2)
    noise = 100 * np.exp(rng.normal(0, 0.004, 40))
    assert not change_points(noise, 0.004).any()
    step = noise.copy()
    step[25:] *= 1.05  # ~12 sigma
    assert list(np.flatnonzero(change_points(step, 0.004))) == [25]
    blip = noise.copy()
    blip[10] *= 0.8  # one wild run is not a step (L1 cost, segments of at least 2)
    assert not change_points(blip, 0.004).any()
    assert not change_points(np.array([100.0, 150.0, 150.0]), 0.004).any()  # too short to tell
    assert not change_points(noise, 0.0).any()  # sigma is floored at SIGMA_FLOOR
    assert SIGMA_FLOOR > 0


def test_the_committed_h100_history_has_no_false_output_change():
    """Its 32- and 64-token checked runs (lines 75, 2095, 2127) were once judged against 128- and
    512-token runs and marked "changed"; grouped by prompt and generation length they are the
    baselines of their own lengths. Every run committed so far has the output of its baseline
    (later runs are appended after line 2160 and cannot change these verdicts: baselines are
    the earliest runs)."""
    path = Path(__file__).resolve().parents[1] / "data" / "benchmarks" / "nvidia-h100-80gb-hbm3.md"
    df = read_history(path)
    v = verdicts(df)
    early = (df["line"] <= 2160).to_numpy()
    assert early.sum() == 69
    assert not (v["output"][early] == "changed").any(), v[early & (v["output"] == "changed").to_numpy()]
    for line in (75, 2095, 2127):
        row = v[(df["line"] == line).to_numpy()].iloc[0]
        assert row["output"] == "baseline" and "prompt " in row["output_reason"], row["output_reason"]


# ------------------------------------------------------------------------------------------
# Micro-benchmark figures (rwkvlab.micro_records writes them as extra rows)
# ------------------------------------------------------------------------------------------

def test_micro_figures_are_judged_where_a_run_has_one(tmp_path):
    """Kernel time is better lower, bandwidth higher; each is compared only among runs of one
    measured problem (the model) under one title; an engine run in the same file gets "no
    reference" for them and keeps its own verdicts; the micro runs' output is "unknown"."""
    engine = dict(title="engine", model="m.gguf")
    micro = dict(load_ms=None, prefill_tps=None, generation_tps=None, quality_hash="")
    df = history(tmp_path, [
        engine,
        {**engine, "prefill_tps": 80.0},
        {**micro, "title": "wkv_bench", "model": "wkv_fused H=40 T=1", "extra": {"Kernel time": "10.0 us"}},
        {**micro, "title": "wkv_bench", "model": "wkv_fused H=40 T=1", "extra": {"Kernel time": "13.0 us"}},
        {**micro, "title": "wkv_bench", "model": "wkv_fused H=40 T=64", "extra": {"Kernel time": "90.0 us"}},
        {**micro, "title": "kernel_bench", "model": "matvec Q8_0 2560x2560", "extra": {"Bandwidth": "1000 GB/s"}},
        {**micro, "title": "kernel_bench", "model": "matvec Q8_0 2560x2560", "extra": {"Bandwidth": "1300 GB/s"}},
    ])
    assert df.attrs["units"]["kernel_time"] == "us" and df.attrs["units"]["bandwidth"] == "GB/s"
    v = verdicts(df)
    assert list(v["output"][2:]) == ["unknown"] * 5
    assert list(v["kernel_time_vs_title"]) == ["no reference"] * 3 + ["regression"] + ["no reference"] * 3
    assert "+30.0% vs 10.00 us" in v.at[3, "kernel_time_vs_title_reason"]
    assert v.at[4, "kernel_time_vs_title_reason"].startswith("no earlier run")  # another T: another problem
    assert list(v["bandwidth_vs_title"]) == ["no reference"] * 6 + ["improvement"]
    assert list(v["bandwidth_vs_history"]) == ["no reference"] * 6 + ["improvement"]
    assert v.at[0, "bandwidth_vs_title_reason"] == "no bandwidth value in this run"
    assert v.at[1, "prefill_vs_title"] == "regression"  # the engine runs are judged as before
    assert (v["throughput_vs_title"] == "no reference").all()


def test_a_figure_no_run_has_is_judged_as_if_its_column_were_empty(seeds):
    """An absent column takes a shortcut; it must say exactly what the full comparison says of
    runs without a value (checked by giving one seed run a bandwidth, which forces it)."""
    df, v = seeds
    forced = df.assign(bandwidth=np.nan)
    forced.loc[forced.index[0], "bandwidth"] = 100.0
    w = verdicts(forced)
    rest = w.index[1:]
    for column in [c for c in v.columns if c.startswith("bandwidth_")]:
        assert w.loc[rest, column].equals(v.loc[rest, column]), column
    assert w.drop(columns=[c for c in w.columns if c.startswith("bandwidth_")]).equals(
        v.drop(columns=[c for c in v.columns if c.startswith("bandwidth_")]))
