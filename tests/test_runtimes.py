"""Both WebGPU runtimes run the same engine and agree with llama.cpp and the NumPy reference.

On this machine (CI, no GPU) wgpu-native runs on Debian 12's lavapipe and Dawn on Mesa 25's
lavapipe, which `make setup` unpacks into the virtual environment (rwkvlab.vulkan_drivers):
every fixture format, both kernel paths, the unfused plan and the default fused one, on both.
Tolerances are test_engine's, justified there: llama.cpp 1e-3 (f32 file) / 0.2 (every other
format) with the same argmax where its top-1 margin exceeds 0.05; the reference on the same
weights 1e-3; fused plan = unfused plan bit for bit on CPU adapters (conftest.assert_same_plan).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import assert_same_plan
from rwkvlab.cli import main as cli_main
from rwkvlab.engine import load
from rwkvlab.options import DEFAULT_FUSIONS, RUNTIMES, Options
from test_engine import FILE_FORMATS, LLAMA_TOL, TOKENS, assert_llama_parity

REFERENCE_TOL = 1e-3


@pytest.mark.parametrize("path", ["webgpu", "native"])
@pytest.mark.parametrize("fmt", FILE_FORMATS)
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_fixture_parity_on_each_runtime(fixtures_dir, reference, runtime, fmt, path):
    file = fixtures_dir / f"tiny-{fmt}.gguf"
    plain = load(file, Options(runtime=runtime, path=path, fusions=frozenset()), progress=False)
    assert plain.gpu.runtime == runtime and plain.options.runtime == runtime
    logits = plain.logits(TOKENS)
    assert_llama_parity(logits, np.load(fixtures_dir / f"tiny-{fmt}.logits.npy"), LLAMA_TOL[fmt])
    ref = reference(fmt)
    want = np.stack([ref.step(t) for t in TOKENS])
    assert np.abs(logits - want).max() <= REFERENCE_TOL
    plain.reset()
    steps = np.stack([plain.step(t) for t in TOKENS[:5]])
    plain.reset()
    ids = plain.generate(TOKENS[:4], 6)

    fused = load(file, Options(runtime=runtime, path=path), progress=False)
    assert fused.fusions == DEFAULT_FUSIONS and fused.dispatches_per_token < plain.dispatches_per_token
    assert_same_plan(fused.logits(TOKENS), logits, fused.gpu)
    fused.reset()
    assert_same_plan(np.stack([fused.step(t) for t in TOKENS[:5]]), steps, fused.gpu)
    fused.reset()
    assert fused.generate(TOKENS[:4], 6) == ids


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_pipeline_that_fails_to_build_is_reported_by_name_on_each_runtime(runtime):
    """Pipelines compile beside the caller on both runtimes (wgpu-native: worker threads; Dawn:
    create_compute_pipeline_async); a failed one raises the KernelError naming the kernel."""
    from rwkvlab import kernels as kn
    from rwkvlab.gpu import gpu_for, resolve_options

    options = resolve_options(Options(runtime=runtime))
    gpu = gpu_for(options)
    kernels = kn.kernels_for(gpu, kn.choose_tuning(gpu, options.path))
    start = kernels.mark()
    bad = kernels.kernel(kn.ARGMAX, WG=0)
    with pytest.raises(kn.KernelError, match=r"kernel argmax \(argmax.wgsl\) with constants \{'WG': 0\}"):
        kernels.wait(start)
    assert kernels.kernel(kn.ARGMAX, WG=0) is not bad and kernels.kernel(kn.ARGMAX).pipeline is not None


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_bench_runs_and_checks_output_on_each_runtime(tmp_path, capsys, runtime):
    """`rwkvlab bench --runtime X` measures, checks logits against the float64 reference and
    records the runtime it ran on (in the options and the environment)."""
    code = cli_main(["bench", "--runtime", runtime, "--prefill", "8", "--generate", "4", "--repeat", "1",
                     "--history-dir", str(tmp_path), "--no-progress"])
    out = capsys.readouterr()
    assert code == 0, out.err
    sidecar = next(tmp_path.glob("*.jsonl"))
    record = json.loads(sidecar.read_text().splitlines()[-1])
    assert record["options"]["runtime"] == runtime
    assert record["environment"]["runtime"] == runtime
    # the load's phases, wherever the runtime ran them (Dawn: the upload inside "wait")
    spans = record["load_phases_ms"]
    assert {"file", "upload", "wait", "first_step"} <= set(spans)
    assert spans["first_step"][0] >= spans["wait"][1] >= spans["upload"][1]
    assert runtime != "dawn" or record["compile_cpu_ms"] is None
