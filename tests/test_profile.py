"""Per-kernel GPU profile of a generation step (rwkvlab.profile) on the tiny fixture."""
from __future__ import annotations

import dataclasses

import pytest

from rwkvlab import cli
from rwkvlab.engine import load
from rwkvlab.options import Options
from rwkvlab.profile import ablate, profile


@pytest.fixture(scope="module")
def engine(fixtures_dir):
    return load(fixtures_dir / "tiny-f32.gguf", Options(fusions=frozenset()), progress=False)  # unfused labels


def test_every_dispatch_is_timed_once(engine):
    p = profile(engine, n_tokens=3)
    assert p.has_timestamps and p.method == "timestamps inside the pass"
    # the table accounts for the whole step plan: one call per dispatch, nothing twice
    assert p.table["calls"].sum() == p.dispatches_per_token == engine.dispatches_per_token
    assert (p.table["us_per_token"] > 0).all()
    assert p.table["share"].sum() == pytest.approx(1.0)
    assert p.gpu_us_per_token == pytest.approx(p.table["us_per_token"].sum())
    # grouped over layers: the tiny model has 2 layers, so each per-layer op appears twice
    wkv = p.table[p.table["label"] == "att.wkv"]
    assert list(wkv["calls"]) == [2]
    assert p.table["us_per_token"].is_monotonic_decreasing


def test_profiling_leaves_the_engine_fresh(engine):
    engine.reset()
    before = engine.generate([0, 33, 72], 8)
    profile(engine, n_tokens=2)
    assert engine.generate([0, 33, 72], 8) == before


def test_one_pass_per_dispatch_when_passes_cannot_hold_timestamps(engine):
    real = engine.gpu
    engine.gpu = dataclasses.replace(real, features=real.features - {"timestamp-query-inside-passes"})
    try:
        p = profile(engine, n_tokens=2)
    finally:
        engine.gpu = real
    assert p.method == "one pass per dispatch"
    assert p.table["calls"].sum() == engine.dispatches_per_token


def test_without_timestamps_it_says_so_and_keeps_wall_time(engine):
    real = engine.gpu
    engine.gpu = dataclasses.replace(real, features=frozenset())
    try:
        p = profile(engine, n_tokens=2)
    finally:
        engine.gpu = real
    assert not p.has_timestamps and p.table.empty
    assert p.wall_us_per_token > 0
    assert "no per-kernel GPU times" in p.text()


def test_cli(fixtures_dir, capsys):
    assert cli.main(["profile", "--model", str(fixtures_dir / "tiny-f32.gguf"), "--tokens", "2",
                     "--fusions", "all", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "dispatches/token" in out and "us/token" in out and "wkv" in out
    assert cli.main(["profile", "--model", str(fixtures_dir / "nope.gguf"), "--no-progress"]) == 2
    assert "nope.gguf" in capsys.readouterr().err


def test_prefill_chunk_profile_is_per_prompt_token(engine):
    p = profile(engine, n_tokens=2, chunk=8)
    assert p.has_timestamps
    assert p.table["calls"].sum() == len(engine.plan(8, "last"))
    # the chunk's gemm/matvec products and the state update (wkv_prefill on the native path)
    wkv = "att.wkv_prefill" if engine.tuning.subgroups else "att.wkv"
    assert {wkv, "att.groupnorm", "ffn.key"} <= set(p.table["label"])
    assert p.wall_us_per_token > 0


def test_ablation_accounts_for_every_op_and_leaves_the_engine_fresh(engine):
    engine.reset()
    before = engine.generate([0, 33, 72], 8)
    a = ablate(engine, n_tokens=2, repeat=1)
    assert a.dispatches_per_token == engine.dispatches_per_token
    assert a.table["calls"].sum() == a.dispatches_per_token  # every dispatch in one row
    assert {"embed", "att.wkv", "ffn.key", "head", "argmax"} <= set(a.table["label"])
    assert a.step_us > 0 and a.floor_us > 0
    assert a.table["per_call_us"].tolist() == pytest.approx((a.table["without_us"] / a.table["calls"]).tolist())
    assert "a dispatch costs at least" in a.text() and "without" in a.text()
    assert engine.generate([0, 33, 72], 8) == before


def test_cli_ablate(fixtures_dir, capsys):
    assert cli.main(["profile", "--model", str(fixtures_dir / "tiny-f32.gguf"), "--tokens", "2", "--ablate",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "a dispatch costs at least" in out and "ffn.key" in out
    assert cli.main(["profile", "--model", str(fixtures_dir / "tiny-f32.gguf"), "--ablate",
                     "--prefill-chunk", "8", "--no-progress"]) == 2
    assert "--ablate" in capsys.readouterr().err
