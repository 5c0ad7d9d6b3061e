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
