"""Every switch of the lab in one frozen record.

Widgets, the CLI and sweeps all build an `Options`; a benchmark run records all of its fields,
so any row of the history can be reproduced from what it wrote down.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

BACKENDS = ("auto", "vulkan", "metal", "dx12", "gl")
PATHS = ("webgpu", "native")
WEIGHT_POLICIES = ("native", "f16")


class OptionsError(ValueError):
    """An option value the lab does not know, with the values it does."""


@dataclass(frozen=True)
class Options:
    """Engine and benchmark switches.

    backend:  wgpu backend to run on; ``auto`` prefers a discrete GPU, then anything.
    path:     ``webgpu`` = portable WGSL only; ``native`` = also subgroups / f16 /
              cooperative matrix where the adapter has them.
    weights:  ``native`` keeps each tensor's file format on the GPU (quant blocks are
              dequantized inside the kernels); ``f16`` dequantizes every matrix to f16 at load.
    chunk:    tokens per prefill chunk (batched matrix products over the chunk).
    gemm_min_tokens: below this many tokens a chunk uses the mat-vec kernels instead of GEMM.
    fusions:  names of kernel-plan rewrites to apply (see rwkvlab.kernels for the list).
    """

    backend: str = "auto"
    path: str = "webgpu"
    weights: str = "native"
    chunk: int = 64
    gemm_min_tokens: int = 2
    fusions: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("path", self.path, PATHS)
        _check_choice("weights", self.weights, WEIGHT_POLICIES)
        if not isinstance(self.chunk, int) or self.chunk < 1:
            raise OptionsError(f"chunk must be a positive integer, got {self.chunk!r}")
        if not isinstance(self.gemm_min_tokens, int) or self.gemm_min_tokens < 1:
            raise OptionsError(
                f"gemm_min_tokens must be a positive integer, got {self.gemm_min_tokens!r}"
            )
        object.__setattr__(self, "fusions", frozenset(self.fusions))

    def with_(self, **changes) -> "Options":
        """A copy with some fields changed (validated like a new object)."""
        return replace(self, **changes)

    def as_record(self) -> dict:
        """Plain, JSON-friendly fields for a benchmark record."""
        d = asdict(self)
        d["fusions"] = sorted(self.fusions)
        return d


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise OptionsError(f"unknown {name} {value!r}; available: {', '.join(allowed)}")
