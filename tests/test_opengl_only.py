"""The lab on a machine whose only adapter is Mesa's OpenGL one, with default options.

That is a desktop or container with Mesa's OpenGL installed but no Vulkan driver: wgpu then
finds `llvmpipe (gl, CPU)` alone, without f16 or subgroups. Every test here runs the real
commands in a subprocess whose Vulkan loader is pointed at a driver list that does not exist
(`VK_DRIVER_FILES` and the older `VK_ICD_FILENAMES`), so lavapipe, installed for the rest of the
suite, is invisible to it. The first test proves the hiding works; the others prove the
defaults resolve to what that adapter can run (path `webgpu`) and that the results are right:
the same tokens as the NumPy reference, logits within the engine's tolerances of llama.cpp's and
the reference's, the bench's logit check passing. Explicitly asking for the native path is an
error that names the flag and the driver to install.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES
from test_engine import FILE_FORMATS, LLAMA_TOL, TOKENS, assert_llama_parity

REPO = Path(__file__).resolve().parents[1]
TINY = FIXTURES / "tiny-f32.gguf"
# OpenGL compiles every pipeline anew in each process (no driver cache) and llvmpipe runs them
# on the CPU: a tiny-model command takes 5-20 s here.
TIMEOUT = 600


@pytest.fixture(scope="module")
def gl_env(tmp_path_factory) -> dict[str, str]:
    """The environment of a machine without a Vulkan driver (lavapipe hidden from the loader)."""
    nowhere = str(tmp_path_factory.mktemp("no-vulkan") / "no-driver.json")
    env = dict(os.environ, VK_DRIVER_FILES=nowhere, VK_ICD_FILENAMES=nowhere, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run(env: dict[str, str], *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def cli(env: dict[str, str], *args: str, **kw) -> subprocess.CompletedProcess:
    return run(env, "-m", "rwkvlab.cli", *args, **kw)


def test_only_the_opengl_adapter_is_seen(gl_env):
    """Without this, every other test here could pass on lavapipe and prove nothing."""
    proc = run(gl_env, "-m", "rwkvlab.gpu", "--check")
    adapters = [line for line in proc.stdout.splitlines() if line and not line.startswith("defaults:")]
    assert adapters and all("(gl, " in line for line in adapters), proc.stdout
    assert "path=auto -> webgpu" in proc.stdout
    assert proc.returncode == 3, "--check reports 'only OpenGL' (setup.sh installs a Vulkan driver then)"
    assert "mesa-vulkan-drivers" in proc.stderr


def test_generate_with_defaults_gives_the_reference_tokens(gl_env):
    from rwkvlab.gguf import read_model
    from rwkvlab.reference import Reference

    prompt_text = "The lab runs on OpenGL too."
    proc = cli(gl_env, "generate", "--model", str(TINY), "--prompt", prompt_text, "-n", "12")
    assert proc.returncode == 0, proc.stderr
    assert "(gl, CPU)" in proc.stderr  # the speed line names the adapter it ran on
    model = read_model(TINY)
    ref = Reference(model)
    from rwkvlab.tokenizer import Tokenizer

    tok = Tokenizer.from_model(model)
    want = prompt_text + tok.decode(ref.generate(tok.encode(prompt_text), 12))
    assert proc.stdout.rstrip("\n") == want


def test_explicit_native_path_is_an_error_naming_the_flag_and_the_driver(gl_env):
    proc = cli(gl_env, "generate", "--model", str(TINY), "--path", "native", "-n", "2")
    assert proc.returncode == 2
    message = proc.stderr
    assert "path 'native' needs one of shader-f16, subgroup" in message
    assert "--path webgpu" in message and "mesa-vulkan-drivers" in message
    assert "Traceback" not in message


@pytest.fixture(scope="module")
def gl_bench(gl_env, tmp_path_factory):
    """`rwkvlab bench` with every default but short lengths, saved to a temporary history."""
    history = tmp_path_factory.mktemp("gl-history")
    proc = cli(gl_env, "bench", "--model", str(FIXTURES / "tiny-q8_0.gguf"), "--prefill", "16",
               "--generate", "8", "--warmup", "0", "--repeat", "1", "--no-progress", "--json",
               "--history-dir", str(history), "--title", "OpenGL only", "--change", "defaults")
    return proc, history


def test_bench_with_defaults_runs_webgpu_and_proves_its_output(gl_bench):
    from rwkvlab.bench import HASH_TOKENS, prompt_tokens
    from rwkvlab.gguf import read_model
    from rwkvlab.reference import Reference
    from rwkvlab.tokenizer import Tokenizer

    proc, history = gl_bench
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["options"]["path"] == "webgpu", "the recorded options are the resolved ones"
    assert record["adapter"]["backend"] == "gl"
    assert record["logit_ok"] is True and record["logit_error"] <= record["logit_tolerance"]
    model = read_model(FIXTURES / "tiny-q8_0.gguf")
    prompt = prompt_tokens(Tokenizer.from_model(model), 16)
    assert record["quality_tokens"] == Reference(model).generate(prompt, HASH_TOKENS)
    assert len(list(history.glob("*.md"))) == 1


def test_history_and_report_read_what_bench_wrote(gl_env, gl_bench, tmp_path):
    _, history = gl_bench
    shown = cli(gl_env, "history", str(history), "--format", "csv")
    assert shown.returncode == 0, shown.stderr
    assert "OpenGL only" in shown.stdout and "webgpu" in shown.stdout
    out = tmp_path / "report.html"
    made = cli(gl_env, "report", str(history), "-o", str(out))
    assert made.returncode == 0, made.stderr
    assert "OpenGL only" in out.read_text()


def test_profile_with_defaults(gl_env):
    proc = cli(gl_env, "profile", "--model", str(TINY), "--tokens", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "wkv" in proc.stdout  # a per-kernel table, the recurrence among its rows


# Run in one subprocess (one GL device): every fixture format with the default options (the
# default fusions) and with no fusion, logits after TOKENS, and the options that really ran.
_PARITY = """
import sys, numpy as np, rwkvlab
from rwkvlab.options import Options
out = {}
for fmt in sys.argv[2].split(","):
    for fused in (True, False):
        options = Options() if fused else Options(fusions=frozenset())
        e = rwkvlab.load(f"{sys.argv[1]}/tiny-{fmt}.gguf", options, progress=False)
        out[f"{fmt}/{fused}"] = e.logits([int(t) for t in sys.argv[3].split(",")])
        out[f"{fmt}/{fused}/path"] = np.array(e.options.path)
        out[f"{fmt}/{fused}/backend"] = np.array(e.gpu.info.backend)
np.savez(sys.argv[4], **out)
"""


def test_engine_parity_with_defaults_on_every_format(gl_env, tmp_path):
    """The fixture parity of tests/test_engine.py (same tolerances, stated there), on OpenGL,
    with the default options and with the unfused plan they must equal."""
    from rwkvlab.gguf import read_model
    from rwkvlab.reference import Reference

    out = tmp_path / "logits.npz"
    proc = run(gl_env, "-c", _PARITY, str(FIXTURES), ",".join(FILE_FORMATS), ",".join(map(str, TOKENS)), str(out))
    assert proc.returncode == 0, proc.stderr
    got = np.load(out)
    for fmt in FILE_FORMATS:
        fused, plain = got[f"{fmt}/True"], got[f"{fmt}/False"]
        assert str(got[f"{fmt}/True/path"]) == "webgpu" and str(got[f"{fmt}/True/backend"]) == "gl"
        want = np.load(FIXTURES / f"tiny-{fmt}.logits.npy")
        assert_llama_parity(fused, want, LLAMA_TOL[fmt])
        # fp32 vs float64 on the same dequantized weights (tolerance as in test_engine)
        assert np.abs(fused - Reference(read_model(FIXTURES / f"tiny-{fmt}.gguf")).logits(TOKENS)).max() <= 1e-3
        # a CPU adapter: the fused plan does the unfused plan's arithmetic in the same order
        np.testing.assert_array_equal(fused, plain)


def test_notebooks_quickstart_and_fusion_lab(gl_env):
    """The two notebooks a newcomer opens first, under nbval: their facts (tokens equal to the
    reference's, hashes, logit checks) must match the outputs committed from lavapipe."""
    proc = run(gl_env, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval", "--nbval-current-env",
               "--nbval-sanitize-with", "notebooks/sanitize.cfg",
               "notebooks/00_quickstart.ipynb", "notebooks/02_fusion_lab.ipynb")
    assert proc.returncode == 0, proc.stdout[-6000:]
