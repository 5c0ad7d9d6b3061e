"""`rwkvlab bench` on lavapipe with the tiny llama.cpp fixture: options, protocol, history, proof.

One benchmark of tiny-f32.gguf (a 32-token prompt, 16 generated tokens, 1 warmup, 3 repeats:
about two seconds on lavapipe) is run once for the module and saved to a temporary history;
most tests read what it produced. Reference logits are cached under a temporary
$RWKVLAB_CACHE so the tests never touch the user's cache.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rwkvlab.bench import (F16_AT_LOAD_TOLERANCE, FILE_FORMAT_TOLERANCE, NOT_CHECKED, PROMPT_TEXT, BenchError, BenchRecord,
                           BenchSettings, git_commit, history_file, judge, load_phases_text, logit_tolerance,
                           prompt_tokens, reference_cache_file, reference_logits, run_bench, save_bench, slug)
from rwkvlab.cli import main
from rwkvlab.gguf import read_model
from rwkvlab.history import HistoryWarning, read_history, sidecar_path
from rwkvlab.options import BACKENDS, FUSIONS, PATHS, WEIGHT_POLICIES, Options, OptionsError, parse_fusions
from rwkvlab.quality import quality_hash
from rwkvlab.reference import Reference
from rwkvlab.synth import ModelNotFoundError, resolve_model
from rwkvlab.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
SETTINGS = BenchSettings(prefill=32, generate=16, warmup=1, repeat=3, progress=False)
SMALL = ["--prefill", "8", "--generate", "4", "--warmup", "0", "--repeat", "1", "--no-progress"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private $RWKVLAB_CACHE for this module (and the subprocesses it starts)."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RWKVLAB_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def tiny(fixtures_dir) -> Path:
    return fixtures_dir / "tiny-f32.gguf"


@pytest.fixture(scope="module")
def bench(tiny, cache, tmp_path_factory):
    """(record, history file, line) of one benchmark of tiny-f32, saved to a fresh history."""
    record = run_bench(tiny, Options(), SETTINGS, title="Bench test", change="module fixture run")
    history = tmp_path_factory.mktemp("history") / "runs.md"
    line = save_bench(record, history)
    return record, history, line


def read(history: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", HistoryWarning)  # what bench writes must read back cleanly
        return read_history(history)


# --------------------------------------------------------------------------------------------
# Options validation
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, available", [
    ("backend", "vulcan", BACKENDS), ("path", "fast", PATHS), ("weights", "q4", WEIGHT_POLICIES),
])
def test_unknown_option_value_lists_what_is_available(field, value, available):
    with pytest.raises(OptionsError) as err:
        Options(**{field: value})
    message = str(err.value)
    assert repr(value) in message
    assert all(name in message for name in available)


def test_unknown_fusion_lists_the_kernels_fusions():
    known = tuple(FUSIONS)
    with pytest.raises(OptionsError) as err:
        Options(fusions={"no_such_fusion"})
    message = str(err.value)
    assert "'no_such_fusion'" in message and "all" in message and "none" in message
    assert all(name in message for name in known)
    with pytest.raises(OptionsError, match="unknown fusion 'typo'"):
        parse_fusions("typo")


def test_tuning_is_an_option_kept_in_one_spelling():
    o = Options(tuning=" wkv_wg=512, matvec_rows=4,wkv_wg=256")  # a later repeat wins
    assert o.tuning == "matvec_rows=4,wkv_wg=256"
    assert o == Options(tuning="wkv_wg=256,matvec_rows=4")  # equal overrides, equal records
    for bad in ("wkv_wg=300", "nonsense=1", "trusted=2", "matvec_rows"):
        with pytest.raises(OptionsError, match="tuning"):
            Options(tuning=bad)


def test_options_round_trip_through_the_record_and_the_command_line():
    from rwkvlab.cli import build_parser
    from rwkvlab.options import from_args, from_record, to_args

    o = Options(backend="gl", path="webgpu", weights="f16", chunk=64, gemm_min_tokens=3,
                fusions=frozenset({"kv"}), tuning="matvec_rows_from=0,trusted=0")
    assert from_record(json.loads(json.dumps(o.as_record()))) == o
    args = build_parser().parse_args(["generate", *to_args(o)])
    assert from_args(args) == o
    assert from_record({"path": "native", "fusions": []}) == Options(path="native", fusions=frozenset())


def test_environment_tuning_is_folded_into_the_resolved_options(monkeypatch):
    from rwkvlab.gpu import resolve_options

    monkeypatch.setenv("RWKVLAB_TUNING", "wkv_wg=128")
    assert resolve_options(Options()).tuning == "wkv_wg=128"  # recorded, so a replay needs no env
    assert resolve_options(Options(tuning="wkv_wg=64")).tuning == "wkv_wg=64"  # explicit wins
    monkeypatch.setenv("RWKVLAB_TUNING", "wkv_wg=3")
    with pytest.raises(OptionsError, match=r"\$RWKVLAB_TUNING"):
        resolve_options(Options())


def test_parse_fusions_words():
    assert parse_fusions("none") == frozenset()
    assert parse_fusions("") == frozenset()
    assert parse_fusions("all") == frozenset(tuple(FUSIONS))
    with pytest.raises(OptionsError, match="mixes 'none'"):
        parse_fusions("none,all")
    with pytest.raises(OptionsError, match="set of names"):
        Options(fusions="all")  # a bare string would become a set of letters


def test_backend_this_machine_lacks_fails_with_what_it_has():
    from rwkvlab.gpu import NoAdapterError, available_backends, resolve_options

    have = available_backends()
    assert "vulkan" in have  # lavapipe
    assert resolve_options(Options()).path == "native"  # auto: lavapipe has f16 and subgroups
    missing = [b for b in BACKENDS if b not in have]
    if sys.platform == "linux":
        assert "metal" in missing  # wgpu has Metal on macOS only
    for backend in missing:
        with pytest.raises(NoAdapterError) as err:
            resolve_options(Options(backend=backend))
        message = str(err.value)
        assert f"backend {backend!r} is not available" in message
        assert "available: " + ", ".join(have) in message
        assert "--backend" in message


def test_cli_metal_on_linux_fails_clearly_and_saves_nothing(tiny, tmp_path, capsys):
    assert sys.platform == "linux", "this test states the Linux behaviour"
    rc = main(["bench", "--model", str(tiny), "--backend", "metal", "--history-dir", str(tmp_path), *SMALL])
    err = capsys.readouterr().err
    assert rc == 2
    assert "backend 'metal' is not available on this machine (Linux)" in err
    assert "macOS" in err and "available: auto" in err
    assert list(tmp_path.iterdir()) == []


def test_native_path_on_an_adapter_without_native_features_fails(tiny, tmp_path):
    # lavapipe's OpenGL adapter has no f16 and no subgroups. Run in a subprocess: it makes a
    # second (GL) device, which this test process should not keep.
    proc = subprocess.run(
        [sys.executable, "-m", "rwkvlab.cli", "bench", "--model", str(tiny), "--backend", "gl", "--path", "native",
         "--history-dir", str(tmp_path), *SMALL],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    assert "path 'native' needs one of shader-f16, subgroup" in proc.stderr
    assert "available paths: webgpu" in proc.stderr
    # the message says which flag to change and what to install
    assert "--path webgpu" in proc.stderr and "mesa-vulkan-drivers" in proc.stderr
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# The protocol's pieces
# --------------------------------------------------------------------------------------------

def test_prompt_is_the_fixed_text_cycled_to_length(tiny):
    tok = Tokenizer.from_model(read_model(tiny))
    base = tok.encode(PROMPT_TEXT)
    for n in (1, len(base) - 1, len(base), 3 * len(base) + 5):
        ids = prompt_tokens(tok, n)
        assert len(ids) == n
        assert ids == (base * 4)[:n]
    assert tok.decode(prompt_tokens(tok, len(base))) == PROMPT_TEXT  # every byte encodable, even in 1024 tokens


def test_tolerance_follows_the_weights_on_the_gpu():
    stored = {"a": "F32", "b": "Q8_0", "c": "Q4_K"}
    # every tensor read as stored (whatever the format): the reference multiplies the same numbers
    assert logit_tolerance(stored, dict(stored)) == FILE_FORMAT_TOLERANCE == 1e-3
    # one matrix rounded to f16 at load
    assert logit_tolerance(stored, {**stored, "b": "F16"}) == F16_AT_LOAD_TOLERANCE == 0.05
    # prefill GEMMs on the matrix units (gemm_sgmat) round their inputs to f16 as they stage them
    assert logit_tolerance(stored, dict(stored), f16_products=True) == F16_AT_LOAD_TOLERANCE


def test_settings_are_checked():
    with pytest.raises(BenchError, match="--repeat must be a whole number >= 1"):
        BenchSettings(repeat=0)
    with pytest.raises(BenchError, match="--prefill"):
        BenchSettings(prefill=0)


def test_models_resolve_to_files(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("RWKVLAB_CACHE", str(tmp_path))
    assert resolve_model(tiny) == tiny
    preset = resolve_model("tiny", "q8_0")  # a synthetic preset is written on first use
    assert preset.parent == tmp_path and preset.is_file() and "tiny-q8_0" in preset.name
    with pytest.raises(ModelNotFoundError, match=r"missing.gguf does not exist; give a GGUF file or a preset \(tiny, 0.1b"):
        resolve_model(tmp_path / "missing.gguf")
    with pytest.raises(ModelNotFoundError, match="is not a file"):
        resolve_model(tmp_path)


def test_reference_too_big_for_the_host_fails_before_the_gpu(tiny, tmp_path, monkeypatch, capsys):
    import rwkvlab.bench as bench_module

    monkeypatch.setenv("RWKVLAB_CACHE", str(tmp_path / "cache"))  # nothing cached: the check applies
    monkeypatch.setattr(bench_module, "_available_memory", lambda: 1 << 20)
    with pytest.raises(BenchError, match="needs about 0.0 GiB of host memory and 0.0 GiB is available; pass --no-reference"):
        bench_module.check_reference_fits(read_model(tiny))
    assert main(["bench", "--model", str(tiny), "--history-dir", str(tmp_path), *SMALL]) == 2
    assert "pass --no-reference" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # not even the cache folder
    monkeypatch.setattr(bench_module, "_available_memory", lambda: None)  # unknown: no check
    bench_module.check_reference_fits(read_model(tiny))


def test_git_commit(tmp_path, monkeypatch):
    monkeypatch.delenv("RWKVLAB_COMMIT", raising=False)
    assert re.fullmatch(r"[0-9a-f]{7,40}(-dirty)?", git_commit(REPO))
    assert git_commit(tmp_path) == "unknown"  # not a git checkout
    monkeypatch.setenv("RWKVLAB_COMMIT", "abc1234")  # a tree copied without its history is told
    assert git_commit(tmp_path) == "abc1234"


def test_git_commit_is_dirty_only_for_engine_files(tmp_path, monkeypatch):
    """A repository laid out like this one: edits to notebooks, the history, docs and tests
    (JupyterLab's autosave) keep the commit clean; edits to the package, a shader or
    pyproject.toml, and new untracked files inside rwkvlab/ or shaders/, make it -dirty."""
    monkeypatch.delenv("RWKVLAB_COMMIT", raising=False)
    files = {"rwkvlab/engine.py": "x = 1\n", "shaders/wkv.wgsl": "fn f() {}\n",
             "pyproject.toml": "[project]\nname = 'x'\n", "notebooks/lab.ipynb": "{}\n",
             "data/benchmarks/gpu.md": "# history\n", "docs/notes.md": "notes\n",
             "tests/test_x.py": "def test(): pass\n", "README.md": "readme\n",
             ".gitignore": "__pycache__/\n"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "seed")
    head = git("rev-parse", "--short", "HEAD")
    package = tmp_path / "rwkvlab"  # where the real function runs git by default
    assert git_commit(package) == git_commit(tmp_path) == head

    for name in ("notebooks/lab.ipynb", "data/benchmarks/gpu.md", "docs/notes.md", "tests/test_x.py",
                 "README.md"):
        (tmp_path / name).write_text("autosaved\n")
    (tmp_path / "notebooks" / "new.ipynb").write_text("{}\n")  # untracked outside the engine
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "engine.cpython-311.pyc").write_bytes(b"\0")  # ignored
    assert git_commit(package) == head

    for name in ("rwkvlab/engine.py", "shaders/wkv.wgsl", "pyproject.toml"):
        (tmp_path / name).write_text("changed\n")
        assert git_commit(package) == git_commit(tmp_path) == f"{head}-dirty", name
        git("checkout", "--", name)
        assert git_commit(package) == head
    for name in ("rwkvlab/engine/__init__.py", "shaders/new.wgsl"):  # untracked, not ignored
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("new\n")
        assert git_commit(package) == f"{head}-dirty", name
        (tmp_path / name).unlink()
        assert git_commit(package) == head
    git("rm", "-q", "shaders/wkv.wgsl")  # a deleted engine file is a change as well
    assert git_commit(package) == f"{head}-dirty"


def test_reference_cache_is_keyed_by_file_and_prompt(fixtures_dir, cache, tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes((fixtures_dir / "tiny-f32.gguf").read_bytes())
    model = read_model(path)
    prompt = [1, 2, 3]
    where = reference_cache_file(path, model, prompt)
    assert where.parent == cache / "reference"
    logits, source = reference_logits(model, prompt, where)
    assert source == "computed" and where.is_file()
    again, source = reference_logits(model, prompt, where)
    assert source == "cached" and np.array_equal(again, logits)
    np.testing.assert_array_equal(logits, Reference(model).prefill(prompt))
    assert reference_cache_file(path, model, [1, 2, 4]) != where
    os.utime(path, ns=(0, 0))  # a rewritten file gets a new mtime: the old logits must not be used
    assert reference_cache_file(path, model, prompt) != where


# --------------------------------------------------------------------------------------------
# One real run: numbers, proof, history
# --------------------------------------------------------------------------------------------

def test_record_holds_the_protocol(bench):
    record, _, _ = bench
    assert len(record.prompt) == 32
    assert len(record.prefill_seconds) == len(record.generation_seconds) == 3
    assert len(record.warmup_prefill_seconds) == len(record.warmup_generation_seconds) == 1
    assert all(s > 0 for s in record.prefill_seconds + record.generation_seconds)
    assert record.prefill_tps == pytest.approx(float(np.median([32 / s for s in record.prefill_seconds])))
    assert record.generation_tps == pytest.approx(float(np.median([16 / s for s in record.generation_seconds])))
    assert record.load_ms > 0 and 0 < record.engine_load_ms <= record.load_ms
    # where the load went: the engine's phases, then the first step, on the same clock
    phases = record.load_phases
    assert {"file", "layout", "upload", "tuning", "plan", "wait", "first_step"} <= set(phases)
    assert all(0 <= t0 <= t1 <= record.load_ms + 0.01 for t0, t1 in phases.values())  # rounded to us
    assert phases["first_step"][1] == pytest.approx(record.load_ms, abs=0.01)
    assert phases["first_step"][0] >= phases["wait"][1] >= phases["upload"][1]
    assert record.pipelines_built is not None and (record.pipelines_built > 0) == ("pipelines" in phases)
    assert record.consistent
    assert record.dispatches_per_token > 0
    assert (record.model, record.layers, record.embedding) == ("tiny-f32.gguf", 2, 256)
    assert record.adapter["backend"] == "vulkan" and record.gpu == record.adapter["name"]


def test_quality_tokens_match_engine_generate_and_the_reference(bench, tiny):
    from rwkvlab.engine import load

    record, _, _ = bench
    assert len(record.quality_tokens) == 32
    assert record.quality_hash == quality_hash(record.quality_tokens)
    engine = load(tiny, Options(), progress=False)
    engine.reset()
    assert engine.generate(record.prompt, 32) == record.quality_tokens
    # The split the bench times (prefill all but the last token, then generate from it) gives
    # the same tokens as one generate call: it measures the real greedy continuation.
    engine.reset()
    engine.prefill(record.prompt[:-1])
    assert engine.generate(record.prompt[-1:], 16) == record.quality_tokens[:16]
    # float64 NumPy greedy tokens: on this prompt no top-2 margin is within the f32 engine's
    # ~1e-5 error, so the 32 tokens must agree exactly.
    assert Reference(read_model(tiny)).generate(record.prompt, 32) == record.quality_tokens


def test_logit_error_is_real_and_small(bench, tiny):
    record, _, _ = bench
    # f32 weights kept f32: fp32 accumulation over K <= 1024 keeps the engine within ~1e-5 of
    # the float64 reference (2e-6 measured on lavapipe); 1e-4 leaves 10x room, 10x under the bar.
    assert record.reference == "computed"
    assert record.logit_tolerance == FILE_FORMAT_TOLERANCE and record.logit_ok
    assert 0 < record.logit_error < 1e-4
    from rwkvlab.engine import load

    engine = load(tiny, Options(), progress=False)
    engine.reset()
    ours = engine.prefill(record.prompt).astype(np.float64)
    ref = Reference(read_model(tiny)).prefill(record.prompt).astype(np.float64)
    assert record.logit_error == pytest.approx(np.max(np.abs(ours - ref)), abs=1e-7)


def test_history_reads_back_every_field(bench):
    record, history, line = bench
    df = read(history)
    assert len(df) == 1
    row = df.iloc[0]
    assert row["line"] == line
    assert (row["title"], row["change"]) == ("Bench test", "module fixture run")
    assert row["timestamp"] == record.timestamp.replace(microsecond=0)
    assert (row["model"], row["version"], row["layers"], row["embedding"]) == ("tiny-f32.gguf", "V7", 2, 256)
    assert row["gpu"] == record.gpu
    assert row["load_ms"] == pytest.approx(record.load_ms, abs=0.005)  # written with 2 decimals
    assert row["prefill_tps"] == pytest.approx(record.prefill_tps, abs=0.005)
    assert row["generation_tps"] == pytest.approx(record.generation_tps, abs=0.005)
    assert row["quality_hash"] == record.quality_hash
    assert row["quality_tokens"] == record.quality_tokens[:16]
    default_fusions = ", ".join(sorted(Options().fusions)) or "none"  # Options' default set
    default = Options()
    # the record holds the resolved path: auto is native on lavapipe (f16 and subgroups)
    assert (row["backend"], row["path"], row["weights"], row["fusions"]) == (
        "vulkan", "native", default.weights, default_fusions)
    assert row["chunk"] == default.chunk and row["dispatches_token"] == record.dispatches_per_token
    assert row["commit"] == record.commit
    # A commit hash that looks like a number (digits, or 1234e56) must stay text.
    digits = history.with_name("digits.md")
    save_bench(replace(record, commit="1234e56"), digits)
    assert read(digits).iloc[0]["commit"] == "1234e56"
    assert row["logit_error"] == pytest.approx(record.logit_error, rel=5e-3)  # 3 significant digits
    assert row["load_phases"] == load_phases_text(record.load_phases)  # text: "file 12, ... ms"
    assert re.fullmatch(r"(\w+\*? \d+, )+first_step \d+ ms", row["load_phases"]), row["load_phases"]
    samples = row["samples"]
    assert samples["prefill_s"] == record.prefill_seconds
    assert samples["generation_s"] == record.generation_seconds
    assert samples["warmup_prefill_s"] == record.warmup_prefill_seconds
    assert samples["warmup_generation_s"] == record.warmup_generation_seconds
    assert samples["load_ms"] == [record.load_ms]
    assert samples["prefill_tps"] == pytest.approx(record.prefill_tps_samples)
    side = json.loads(sidecar_path(history).read_text().splitlines()[-1])
    assert side["options"] == Options(path="native").as_record()  # resolved, as above
    assert side["adapter"] == record.adapter and side["quality_tokens"] == record.quality_tokens
    assert side["load_phases_ms"] == record.load_phases and side["pipelines_built"] == record.pipelines_built


def test_record_round_trips_through_json(bench):
    record, _, _ = bench
    back = BenchRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert back == record


def test_output_verdict_is_the_lab_rule(bench, tmp_path):
    """bench judges a run by rwkvlab.verdicts' rule: against the earliest run with the same
    model content, prompt length and generation length, in any history file of the folder."""
    record, history, _ = bench
    assert record.fingerprint and len(record.fingerprint) == 16
    assert judge(record, tmp_path / "none.md").output == "first run"
    same = judge(record, history)
    # (the module's other tests copy this run into other files of the folder: any may be named)
    assert same.output == "same" and ".md 'Bench test'" in same.output_reason
    changed = replace(record, quality_tokens=list(reversed(record.quality_tokens)))
    verdict = judge(changed, history)
    assert verdict.output == "changed" and not verdict.ok
    assert record.quality_hash in verdict.output_reason and changed.quality_hash in verdict.output_reason
    # The earliest run is the baseline: a changed run saved after it does not become one.
    copy = tmp_path / "copy.md"
    copy.write_bytes(history.read_bytes())
    Path(f"{copy}.jsonl").write_bytes(Path(f"{history}.jsonl").read_bytes())
    save_bench(replace(changed, timestamp=record.timestamp + timedelta(seconds=5)), copy)
    assert judge(record, copy).output == "same"
    assert judge(replace(changed, timestamp=record.timestamp + timedelta(seconds=6)), copy).output == "changed"
    # The model is its content: another file name with the same bytes shares the baseline,
    # other bytes under the same name do not.
    assert judge(replace(changed, model="renamed.gguf"), copy).output == "changed"
    assert judge(replace(changed, fingerprint="0123456789abcdef"), copy).output == "first run"
    # Greedy tokens depend on the prompt: a run with another prompt or generation length has
    # its own baseline (the sidecar records both).
    shorter = replace(changed, prompt=record.prompt[:-1], timestamp=record.timestamp + timedelta(seconds=9))
    assert judge(shorter, copy).output == "first run"
    save_bench(shorter, copy)
    assert judge(replace(shorter, timestamp=shorter.timestamp + timedelta(seconds=1)), copy).output == "same"
    longer = replace(changed, settings=replace(record.settings, generate=record.settings.generate + 1))
    assert judge(longer, copy).output == "first run"
    wrong = replace(record, logit_error=0.5)
    assert judge(wrong, history).logits == "too large" and not judge(wrong, history).ok


def test_fail_on_gates_exit_4_after_saving(bench, tiny, tmp_path, capsys):
    """`--fail-on output,regression` (for CI): a run whose output differs from its baseline's or
    whose speed regressed beyond noise exits 4 once saved, naming why; without gates, 0."""
    record, _, _ = bench
    quick = ["--prefill", str(SETTINGS.prefill), "--generate", str(SETTINGS.generate), "--warmup", "0",
             "--repeat", "1", "--no-progress", "--no-reference"]
    # The baseline this file holds: the same model content and lengths, another output, and a
    # generation rate a hundred times this machine's.
    earlier = replace(record, title="Gate", quality_tokens=list(reversed(record.quality_tokens)),
                      generation_seconds=[s / 100 for s in record.generation_seconds],
                      timestamp=record.timestamp - timedelta(days=1))
    save_bench(earlier, tmp_path / "gate.md")
    args = ["bench", "--model", str(tiny), "--history-dir", str(tmp_path), "--file", "gate", "--title", "Gate", *quick]
    assert main([*args, "--fail-on", "output,regression"]) == 4
    err = capsys.readouterr().err
    assert "--fail-on: output changed" in err and "generation vs title regression" in err
    assert len(read_history(tmp_path / "gate.md")) == 2  # saved all the same
    assert main([*args, "--fail-on", "output"]) == 4
    assert main(args) == 0  # no gate named: the verdicts are printed, the exit is 0
    assert main([*args, "--fail-on", "speed"]) == 2
    assert "--fail-on speed: available: output, regression" in capsys.readouterr().err


def test_a_run_with_a_tuning_override_replays_from_its_record(tiny, cache, tmp_path, capsys, monkeypatch):
    """$RWKVLAB_TUNING is one way to set Options.tuning: the run records the override and every
    kernel shape it ran, and `bench --replay FILE:LINE` reruns it from that record alone."""
    monkeypatch.setenv("RWKVLAB_TUNING", "wkv_wg=128")
    history = tmp_path / "t.md"
    assert main(["bench", "--model", str(tiny), "--history-dir", str(tmp_path), "--file", "t",
                 "--title", "Tuned", "--json", *SMALL]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["options"]["tuning"] == "wkv_wg=128" and first["kernel_tuning"]["wkv_wg"] == 128
    row = read(history).iloc[0]
    assert row["tuning"] == "wkv_wg=128" and row["options"]["tuning"] == "wkv_wg=128"
    assert row["fingerprint"] == first["fingerprint"] and row["model_path"] == str(tiny)

    monkeypatch.delenv("RWKVLAB_TUNING")  # the record alone: nothing else says how it ran
    assert main(["bench", "--replay", f"{history}:{row['line']}", "--history-dir", str(tmp_path),
                 "--file", "t", "--json", "--no-progress"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["options"] == first["options"] and again["kernel_tuning"] == first["kernel_tuning"]
    assert again["settings"] == first["settings"] and again["quality_tokens"] == first["quality_tokens"]
    assert again["title"] == "Tuned" and again["change"].startswith("replay of t.md:")
    assert again["verdict"]["output"] == "same"

    assert main(["bench", "--replay", f"{history}:1", "--history-dir", str(tmp_path), "--no-save"]) == 2
    assert "no run heading on line 1" in capsys.readouterr().err


def test_history_file_defaults_to_the_gpu_name(bench):
    record, _, _ = bench
    assert slug("Apple M2 Max") == "apple-m2-max"
    assert history_file(record.gpu, "h").name == slug(record.gpu) + ".md"
    assert history_file(record.gpu, "h", "mine") == Path("h/mine.md")


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------

def test_cli_bench_json_and_saved_run(tiny, cache, tmp_path, capsys):
    args = ["bench", "--model", str(tiny), "--history-dir", str(tmp_path), "--file", "cli", "--title", "CLI",
            "--change", "json run", "--json", *SMALL]
    assert main(args) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)  # stdout is the JSON record alone; the summary went to stderr
    assert "tokens  first run of its kind: baseline of tiny-f32.gguf" in err and "logits  max |logit error|" in err
    assert result["saved"] == {"file": str(tmp_path / "cli.md"), "line": result["saved"]["line"]}
    assert result["verdict"]["output"] == "first run" and result["logit_ok"] is True
    df = read(tmp_path / "cli.md")
    assert list(df["change"]) == ["json run"]
    assert df.iloc[0]["quality_hash"] == result["quality_hash"]
    # A second run of the same file and options: same output as the previous run.
    # (another change text: two runs in one second with one change would share a heading)
    assert main(args[:-len(SMALL) - 3] + ["--change", "second run", *SMALL]) == 0
    out, _ = capsys.readouterr()
    assert "OK   tokens  hash " in out
    assert len(read(tmp_path / "cli.md")) == 2


def test_cli_no_reference_says_not_checked(tiny, cache, tmp_path, capsys):
    args = ["bench", "--model", str(tiny), "--history-dir", str(tmp_path), "--file", "nr", "--no-reference", *SMALL]
    args.remove("--no-progress")
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "logits not checked" in out
    assert "generate repeat 1/1" in err  # the progress bar, on stderr
    assert "| Logit error | not checked |" in (tmp_path / "nr.md").read_text()  # never a made-up number
    row = read(tmp_path / "nr.md").iloc[0]
    assert row["logit_error"] == NOT_CHECKED or pd.isna(row["logit_error"])  # the reader's "absent" marker
    assert json.loads(sidecar_path(tmp_path / "nr.md").read_text())["logit_error"] is None


@pytest.mark.parametrize("case, extra, message", [
    ("missing model", ["--model", "{tmp}/missing.gguf"], "does not exist"),
    ("not a model", ["--model", "{tmp}/not-gguf.gguf"], "not a gguf file"),
    ("bad option", ["--model", "{tiny}", "--weights", "q4"], "unknown weights 'q4'; available: native, f16"),
    ("engine refuses", ["--model", "{tiny}", "--chunk", "100000"], "binding limit"),
])
def test_failed_bench_leaves_the_history_unchanged(case, extra, message, tiny, cache, tmp_path, capsys):
    history = tmp_path / "runs.md"
    seed = REPO / "data" / "benchmarks" / "m2max-loading.md"
    history.write_bytes(seed.read_bytes())
    sidecar_path(history).write_text('{"timestamp": "2026-01-01T00:00:00", "change": "x"}\n')
    (tmp_path / "not-gguf.gguf").write_text("hello, I am not a model\n")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    extra = [a.format(tmp=tmp_path, tiny=tiny) for a in extra]
    rc = main(["bench", *extra, "--history-dir", str(tmp_path), "--file", "runs", *SMALL])
    err = capsys.readouterr().err
    assert rc == 2, case
    assert err.startswith("rwkvlab bench: ") and message in err.lower()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing changed, nothing added
