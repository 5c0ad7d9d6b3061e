"""Fixtures shared by the whole test suite.

The reference GGUF files and llama.cpp's logits for them live in shared/ beside the repository
(/work/shared here; a clone with shared/ beside it in CI), never inside it.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# RWKVLAB_FIXTURES points elsewhere when the tree is copied without shared/ beside it (the GPU
# machine gets the fixtures carried inside the copy).
FIXTURES = Path(os.environ.get("RWKVLAB_FIXTURES")
                or Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "rwkv7-tiny")

# The four seed history files (86 runs recorded on an Apple M2 Max by the project this grew from).
# Tests and the checked notebook read these, never the whole data/benchmarks/ folder, which grows
# with every run the lab records.
SEED_HISTORY = sorted((Path(__file__).resolve().parents[1] / "data" / "benchmarks").glob("m2max-*.md"))
assert len(SEED_HISTORY) == 4, SEED_HISTORY

# The weight formats of the reference files: tiny-<fmt>.gguf with tiny-<fmt>.logits.npy.
FORMATS = ["f32", "f16", "bf16", "q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K"]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Folder of the rwkv7-tiny reference files (GGUF models, llama.cpp logits, tokenizer cases)."""
    assert FIXTURES.is_dir(), f"fixture folder {FIXTURES} is missing (expected shared/ beside the repo)"
    return FIXTURES


@pytest.fixture(scope="module")
def reference(fixtures_dir):
    """reference(fmt) -> the float64 NumPy Reference of tiny-<fmt>.gguf, reset (shared within a
    module: building one dequantizes the file)."""
    from rwkvlab.gguf import read_model
    from rwkvlab.reference import Reference

    cache: dict = {}

    def get(fmt: str):
        if fmt not in cache:
            cache[fmt] = Reference(read_model(fixtures_dir / f"tiny-{fmt}.gguf"))
        cache[fmt].reset()
        return cache[fmt]

    return get


# Two compute pipelines doing the same arithmetic in the same order give the same bits on the
# CPU adapters CI runs (lavapipe), and the fusion tests demand exactly that there. A GPU's
# shader compiler decides per pipeline where to contract a*b + c into one fma, so on the H100
# a fused kernel differs from the kernels it replaces in the last bits: 3.5e-6 to 5.9e-6 on
# O(1) values (measured, about 1e-6 relative). On GPUs the comparison allows 1e-5 of the
# largest value: a hundred times below the 1e-3 logit tolerance against the reference, and
# five orders below what a wrong index or a missing term does (O(1)).
SAME_PLAN_RTOL_ON_GPU = 1e-5


def assert_same_plan(actual, desired, gpu) -> None:
    """`actual` (a fused / split / reshaped plan's output) equals `desired` (the plain plan's):
    bit for bit on CPU adapters, within SAME_PLAN_RTOL_ON_GPU of the largest value on GPUs."""
    import numpy as np

    if gpu.info.adapter_type == "CPU":
        np.testing.assert_array_equal(actual, desired)
    else:
        atol = SAME_PLAN_RTOL_ON_GPU * max(1.0, float(np.abs(desired).max()))
        np.testing.assert_allclose(actual, desired, rtol=0, atol=atol)


# A worker killed in the middle of its progress bars, as bench's stderr looks then: real tqdm bars
# (a nested one moves the cursor with ESC[A, every redraw starts with \r), a warning printed while
# a bar is open (tqdm never ends the bar's line, so the warning follows an escape code), more
# redraws, a cursor move cut short, and SIGKILL before anything closes. WORKER_LAST_LINE is the
# last thing in it written for a person.
WORKER_LAST_LINE = "WARNING: adapter memory is low (512 MiB free)"
WORKER_KILLED_MID_BAR = f"""
import os, signal, sys
from tqdm import tqdm
outer = tqdm(total=10, desc="bench", unit="step", file=sys.stderr, mininterval=0)
outer.update(2)
inner = tqdm(total=40, desc="NumPy reference", unit="tok", file=sys.stderr, mininterval=0, leave=False)
inner.update(3)
print({WORKER_LAST_LINE!r}, file=sys.stderr, flush=True)
for _ in range(200):
    inner.refresh()
    outer.refresh()
sys.stderr.write("\\r\\x1b[A\\x1b[2K\\r\\x1b[")
sys.stderr.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


# --- micro-benchmark runs in the history (rwkvlab.micro_records) ------------------------------

def wait_for_next_second() -> None:
    """Sleep until the wall clock's second changes. A history run is named by its timestamp
    (whole seconds) and change, so a test repeating a measurement must not do it in the same
    second (real benches take far longer than that)."""
    import time

    now = int(time.time())
    while int(time.time()) == now:
        time.sleep(0.02)


def read_micro_runs(folder: Path, title: str, column: str, unit: str, runs: int):
    """The history a micro-benchmark wrote to ``folder``, read back and judged, with what every
    such run must hold checked: read without a single warning, ``runs`` runs under ``title`` in
    the GPU's file, the figure a positive number in ``column`` with its unit, the engine's
    speeds and the quality hash missing, the NumPy check and commit recorded, the per-pass
    samples, options and environment joined from the sidecar, output "unknown".
    Returns (runs, verdicts)."""
    import warnings

    import numpy as np

    from rwkvlab.bench import slug
    from rwkvlab.gpu import get_gpu
    from rwkvlab.history import HistoryWarning, read_history
    from rwkvlab.verdicts import verdicts

    gpu = get_gpu("auto", native=False).info
    assert sorted(p.name for p in folder.glob("*.md*") if p.suffix != ".lock") == [f"{slug(gpu.name)}.md",
                                                                           f"{slug(gpu.name)}.md.jsonl"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", HistoryWarning)
        df = read_history(folder)
    assert len(df) == runs and set(df["title"]) == {title} and set(df["gpu"]) == {gpu.name}
    assert df[column].dtype == np.float64 and (df[column] > 0).all() and df.attrs["units"][column] == unit
    assert df[["load_ms", "prefill_tps", "generation_tps"]].isna().all().all()
    assert df["quality_hash"].isna().all()
    assert df["check"].str.startswith("max error ").all() and df["commit"].str.len().ge(7).all()
    assert (df["backend"] == gpu.backend).all()
    for _, run in df.iterrows():
        assert set(run["options"]) == {"backend", "path", "tuning"} and run["options"]["path"] == run["path"]
        assert run["environment"]["gpu"] == gpu.name and run["environment"]["commit"] == run["commit"]
        passes = run["samples"][column]
        assert len(passes) == len(run["samples"]["seconds"]) >= 1 and min(passes) <= run[column] * 1.001
        assert max(passes) >= run[column] * 0.999  # the figure is the median of its passes, to 4 digits
    judged = verdicts(df)
    assert (judged["output"] == "unknown").all()
    assert (judged["output_reason"] == "no quality hash recorded").all()
    return df, judged


def read_with_warnings(paths):
    """read_history plus the messages of every warning it gave (all must be HistoryWarnings:
    anything else escaping the reader fails the test)."""
    import warnings

    from rwkvlab.history import HistoryWarning, read_history

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = read_history(paths)
    assert all(issubclass(w.category, HistoryWarning) for w in caught), [str(w.message) for w in caught]
    return df, [str(w.message) for w in caught]
