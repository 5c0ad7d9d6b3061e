"""Every switch of the lab in one frozen record.

Widgets, the CLI and sweeps all build an `Options`; a benchmark run records all of its fields,
so any row of the history can be reproduced from what it wrote down.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

BACKENDS = ("auto", "vulkan", "metal", "dx12", "gl")
# The two kernel paths a run can take; ``auto`` (the default) is resolved to one of them against
# the adapter actually chosen (rwkvlab.gpu.resolve_options), and the resolved one is recorded.
KERNEL_PATHS = ("webgpu", "native")
PATHS = ("auto", *KERNEL_PATHS)
WEIGHT_POLICIES = ("native", "f16")
# Words accepted where fusion names go: "all" = every fusion the kernels define, "none" = no fusion.
FUSION_WORDS = ("all", "none")


class OptionsError(ValueError):
    """An option value the lab does not know, with the values it does."""


@dataclass(frozen=True)
class Options:
    """Engine and benchmark switches.

    backend:  wgpu backend to run on; ``auto`` prefers a discrete GPU, then anything.
    path:     ``webgpu`` = portable WGSL only; ``native`` = also subgroups / f16 where the
              adapter has them, and shader modules built by wgpu-native without runtime bounds
              checks (cooperative matrix: not reachable through wgpu-native yet, see gpu.py);
              ``auto`` = native where the chosen adapter has f16 or subgroups, else webgpu
              (resolved by rwkvlab.gpu.resolve_options before anything runs).
    weights:  ``native`` keeps each tensor's file format on the GPU (quant blocks are
              dequantized inside the kernels); ``f16`` dequantizes every matrix to f16 at load.
    chunk:    tokens per prefill chunk (batched matrix products over the chunk; the engine's
              activation buffers hold this many tokens, the logits buffer chunk x vocab floats).
    Defaults: the fastest correct configuration measured on an H100 (README, "Speed on a real
    GPU"): the native path where the adapter has it, chunks of 512 (8x the gemm workgroups of
    64), the default fusions.
    gemm_min_tokens: below this many tokens a chunk uses the mat-vec kernels instead of GEMM.
    fusions:  names of kernel-plan rewrites to apply (see rwkvlab.kernels for the list);
              default: the fastest correct set measured (rwkvlab.kernels.DEFAULT_FUSIONS).
    """

    backend: str = "auto"
    path: str = "auto"
    weights: str = "native"
    chunk: int = 512
    gemm_min_tokens: int = 2
    fusions: frozenset[str] = field(default_factory=lambda: default_fusions())

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
        if isinstance(self.fusions, str):
            raise OptionsError(f"fusions must be a set of names, got the string {self.fusions!r}; "
                               "use parse_fusions() to read a comma-separated list")
        object.__setattr__(self, "fusions", frozenset(self.fusions))
        _check_fusion_names(self.fusions)

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


def known_fusions() -> tuple[str, ...] | None:
    """Fusion names the kernels define (``rwkvlab.kernels.FUSIONS``), or None if that is not there.

    Imported lazily: the history tools build Options without ever touching the engine, and
    until the kernels define their fusions, names are left for the engine to check at load.
    """
    try:
        from rwkvlab.kernels import FUSIONS
    except ImportError:
        return None
    return tuple(sorted(FUSIONS))


def default_fusions() -> frozenset[str]:
    """The default fusion set (``rwkvlab.kernels.DEFAULT_FUSIONS``), or none without the kernels."""
    try:
        from rwkvlab.kernels import DEFAULT_FUSIONS
    except ImportError:
        return frozenset()
    return DEFAULT_FUSIONS


def _check_fusion_names(names: frozenset[str]) -> None:
    if not names:
        return
    known = known_fusions()
    if known is None:
        return
    unknown = sorted(n for n in names if n not in known and n not in FUSION_WORDS)
    if unknown:
        have = ", ".join(known) or "(the kernels define none yet)"
        raise OptionsError(f"unknown fusion {', '.join(map(repr, unknown))}; available: {have} "
                           f"(or {' / '.join(FUSION_WORDS)})")


def parse_fusions(text: str) -> frozenset[str]:
    """Fusion names from the command line: ``"default"``, ``"none"``, ``"all"`` or names joined
    by ``,`` or ``+``.

    ``default`` is the fastest correct set measured (:func:`default_fusions`, what ``Options()``
    uses); ``all`` expands to every name the kernels define (kept as the word ``all`` while they
    define none yet, for the engine to resolve); unknown names raise :class:`OptionsError`.
    """
    words = {w.strip() for w in text.replace("+", ",").split(",") if w.strip()}
    if words == {"default"}:
        return default_fusions()
    if not words or words == {"none"}:
        return frozenset()
    if "none" in words:
        raise OptionsError(f"fusions {text!r} mixes 'none' with fusion names; give one or the other")
    known = known_fusions()
    if "all" in words:
        return frozenset(known) if known is not None else frozenset({"all"})
    _check_fusion_names(frozenset(words))
    return frozenset(words)
