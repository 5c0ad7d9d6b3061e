"""Every switch of the lab in one frozen record, and its converters.

Widgets, the CLI, sweeps and the benchmark worker all build an `Options`; a benchmark run
records all of its fields (resolved against the adapter by ``rwkvlab.gpu.resolve_options``),
so any row of the history can be replayed from what it wrote down. This module imports nothing
that touches a GPU: the history tools build Options without ever loading wgpu.

The converters exist once each: :func:`add_arguments` / :func:`from_args` (a command line to
Options), :func:`to_args` (Options to the command line that rebuilds them), :meth:`Options.text`
(one line for people), :meth:`Options.as_record` / :func:`from_record` (JSON).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

BACKENDS = ("auto", "vulkan", "metal", "dx12", "gl")
# The WebGPU implementations the engine runs on (rwkvlab.gpu is the one module that imports
# them): wgpu-native through the `wgpu` package, Google's Dawn through `wgpudawn`.
RUNTIMES = ("wgpu-native", "dawn")
RUNTIME_NOTES = {"wgpu-native": "wgpu-native (Rust, Naga) through the wgpu package",
                 "dawn": "Google's Dawn (Chrome's WebGPU, Tint) through wgpudawn; subgroup matrices reach tensor cores"}
# The two kernel paths a run can take; ``auto`` (the default) is resolved to one of them against
# the adapter actually chosen (rwkvlab.gpu.resolve_options), and the resolved one is recorded.
KERNEL_PATHS = ("webgpu", "native")
PATHS = ("auto", *KERNEL_PATHS)
WEIGHT_POLICIES = ("native", "f16")
# Words accepted where fusion names go: "all" = every fusion, "none" = no fusion.
FUSION_WORDS = ("all", "none")

# Names of kernel-plan rewrites (Options.fusions) -> what each replaces. Every fused plan is
# tested against the unfused one, which stays the reference; rwkvlab.kernels builds them.
FUSIONS: dict[str, str] = {
    "proj": "per block, the r, k, v and LoRA-down products (7 dispatches) become one dispatch, "
            "and the LoRA-up products (4) another: the matrices are stacked in one buffer at "
            "load either way (formats may mix), the fusion only changes the plan",
    "lora": "each LoRA pair (down, activation, up, bias + activation: 2 dispatches) becomes one "
            "lora kernel for one-token steps (with proj: one dispatch for all of a block's pairs)",
    "kv": "the key/value pack (kk normalise, k update, value residual: 3 dispatches per block) "
          "becomes one kv_prep dispatch (with wkv: part of wkv_fused)",
    "wkv": "wkv + groupnorm_out (WKV state update, then GroupNorm, bonus and gate: 2 dispatches "
           "per block) become wkv_fused, one workgroup per head for every token of the chunk "
           "(with kv it also does the key/value pack); prefill chunks on the native path run "
           "wkv_prefill + groupnorm_out in every plan instead",
    "norm_shift": "layernorm + shift_mix (2 dispatches, twice per block) become norm_shift for "
                  "one-token steps: one kernel normalises the token and writes the mixes",
    "ffn": "channel mix: the key product applies relu^2 in its epilogue and the value product "
           "reads it directly (2 dispatches instead of key, activate, value)",
}
# The default (the fastest correct plan measured on an H100, docs/perf-notes.md): every fusion
# but lora, whose kernel recomputes a LoRA's down product in every workgroup (cheap on tiny
# models, 33 ms per token on a 2.9B one).
DEFAULT_FUSIONS = frozenset(FUSIONS) - {"lora"}

# Kernel tuning overrides (Options.tuning), on top of the shapes rwkvlab.kernels.choose_tuning
# picks for the device class. Sizes are powers of two, counts any integer >= 0; kernels checks
# how they combine (e.g. matvec_red <= matvec_wg) when it builds the device's tuning.
TUNING_SIZES = ("argmax_wg", "gemm_k", "gemm_rows", "matvec_red", "matvec_rows", "matvec_unroll",
                "matvec_small_wg", "matvec_wg", "norm_wg", "sgmat_k", "sgmat_m", "sgmat_n", "sgmat_rows", "sgmat_tokens",
                "shift_wg", "wkv_lanes", "wkv_rows", "wkv_wg")
TUNING_COUNTS = ("matvec_pieces", "matvec_rows_from", "matvec_wide_pieces", "matvec_wide_from",
                 "matvec_short_pieces", "matvec_short_k", "matvec_quant_short_k", "matvec_small_weights")
# 0 or 1: trusted (shader modules without runtime checks), gemm_sgmat (prefill GEMMs on the
# matrix units through subgroup matrices, where the adapter has them; off by default for now,
# rwkvlab.kernels.SGMAT_BY_DEFAULT)
TUNING_FLAGS = ("gemm_sgmat", "trusted")
# One way to set Options.tuning without touching code: it fills an empty tuning when options
# are resolved (rwkvlab.gpu.resolve_options), so a run under it records the overrides it ran.
TUNING_ENV = "RWKVLAB_TUNING"


class OptionsError(ValueError):
    """An option value the lab does not know, with the values it does."""


@dataclass(frozen=True)
class Options:
    """Engine and benchmark switches.

    runtime:  the WebGPU implementation: ``wgpu-native`` (the `wgpu` package) or ``dawn``
              (Google's Dawn through `wgpudawn`, whose subgroup matrices reach tensor cores).
    backend:  wgpu backend to run on; ``auto`` = Vulkan / Metal / DX12 before OpenGL, then real
              GPUs before software ones (rwkvlab.gpu).
    path:     ``webgpu`` = portable WGSL only; ``native`` = also subgroups / f16 where the
              adapter has them, and shader modules built by wgpu-native without runtime bounds
              checks (cooperative matrix: not reachable through wgpu-native yet, see gpu.py);
              ``auto`` = native where the chosen adapter has f16 or subgroups, else webgpu
              (resolved by rwkvlab.gpu.resolve_options before anything runs).
    weights:  ``native`` keeps each tensor's file format on the GPU (quant blocks are
              dequantized inside the kernels); ``f16`` dequantizes every matrix to f16 at load.
    chunk:    tokens per prefill chunk (batched matrix products over the chunk; the engine's
              activation buffers hold this many tokens, the logits buffer chunk x vocab floats).
    gemm_min_tokens: below this many tokens a chunk uses the mat-vec kernels instead of GEMM.
    fusions:  names of kernel-plan rewrites to apply (:data:`FUSIONS`); default: the fastest
              correct set measured (:data:`DEFAULT_FUSIONS`).
    tuning:   kernel-shape overrides, ``"name=value,..."`` (:data:`TUNING_SIZES`,
              :data:`TUNING_COUNTS`, :data:`TUNING_FLAGS` ``=0|1``), on top of the device
              class's own shapes (``gemm_sgmat=1``: prefill GEMMs on the matrix units);
              ``""`` = the device's own (or ``$RWKVLAB_TUNING``, folded in at resolution).
              Kept sorted by name, so equal overrides are equal text.
    Defaults: the fastest correct configuration measured on an H100 (README, "Speed on a real
    GPU"): the native path where the adapter has it, chunks of 512 (8x the gemm workgroups of
    64), the default fusions, the device's own tuning.
    """

    runtime: str = "wgpu-native"
    backend: str = "auto"
    path: str = "auto"
    weights: str = "native"
    chunk: int = 512
    gemm_min_tokens: int = 2
    fusions: frozenset[str] = DEFAULT_FUSIONS
    tuning: str = ""

    def __post_init__(self) -> None:
        _check_choice("runtime", self.runtime, RUNTIMES)
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("path", self.path, PATHS)
        _check_choice("weights", self.weights, WEIGHT_POLICIES)
        for name in ("chunk", "gemm_min_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise OptionsError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.fusions, str):
            raise OptionsError(f"fusions must be a set of names, got the string {self.fusions!r}; "
                               "use parse_fusions() to read a comma-separated list")
        names = frozenset(self.fusions)
        if "all" in names:
            names = (names - {"all"}) | frozenset(FUSIONS)
        _check_fusion_names(names - {"none"})
        object.__setattr__(self, "fusions", names - {"none"})
        if not isinstance(self.tuning, str):
            raise OptionsError(f"tuning must be text like 'matvec_rows=4,wkv_wg=512', got {self.tuning!r}")
        object.__setattr__(self, "tuning", normalize_tuning(self.tuning))

    def with_(self, **changes) -> "Options":
        """A copy with some fields changed (validated like a new object)."""
        return replace(self, **changes)

    def as_record(self) -> dict:
        """Plain, JSON-friendly fields for a benchmark record (:func:`from_record` reads them)."""
        d = asdict(self)
        d["fusions"] = sorted(self.fusions)
        return d

    def text(self) -> str:
        """One line naming every field, for people (a run's default ``change``, tables, status)."""
        return (f"path={self.path} weights={self.weights} fusions={fusions_text(self.fusions)} "
                f"chunk={self.chunk} gemm_min_tokens={self.gemm_min_tokens} backend={self.backend}"
                + (f" tuning={self.tuning}" if self.tuning else "")
                + (f" runtime={self.runtime}" if self.runtime != RUNTIMES[0] else ""))


def from_record(record: dict[str, Any]) -> Options:
    """Options from :meth:`Options.as_record` (fields it lacks keep their defaults: older
    records have no tuning, which means the device's own)."""
    known = {f.name for f in fields(Options)}
    values = {k: v for k, v in record.items() if k in known}
    if "fusions" in values:
        values["fusions"] = frozenset(values["fusions"])
    return Options(**values)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise OptionsError(f"unknown {name} {value!r}; available: {', '.join(allowed)}")


def _check_fusion_names(names: frozenset[str]) -> None:
    unknown = sorted(n for n in names if n not in FUSIONS)
    if unknown:
        raise OptionsError(f"unknown fusion {', '.join(map(repr, unknown))}; available: {', '.join(FUSIONS)} "
                           f"(or {' / '.join(FUSION_WORDS)})")


def fusions_text(names: frozenset[str] | set[str]) -> str:
    """Fusion names for people and the history: sorted, ``+``-joined, or ``none``."""
    return "+".join(sorted(names)) or "none"


def parse_fusions(text: str) -> frozenset[str]:
    """Fusion names from the command line: ``"default"``, ``"none"``, ``"all"`` or names joined
    by ``,`` or ``+``; unknown names raise :class:`OptionsError`."""
    words = {w.strip() for w in text.replace("+", ",").split(",") if w.strip()}
    if words == {"default"}:
        return DEFAULT_FUSIONS
    if not words or words == {"none"}:
        return frozenset()
    if "none" in words:
        raise OptionsError(f"fusions {text!r} mixes 'none' with fusion names; give one or the other")
    if "all" in words:
        return frozenset(FUSIONS)
    _check_fusion_names(frozenset(words))
    return frozenset(words)


def normalize_tuning(text: str) -> str:
    """``"name=value,..."`` checked name by name and sorted (a later repeat of a name wins)."""
    values: dict[str, str] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, eq, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if name in TUNING_FLAGS:
            ok = value in ("0", "1")
        elif name in TUNING_SIZES:
            ok = value.isdigit() and int(value) >= 1 and not int(value) & (int(value) - 1)
        elif name in TUNING_COUNTS:
            ok = value.isdigit()
        else:
            ok = False
        if not eq or not ok:
            raise OptionsError(
                f"tuning {item!r} is not <field>=<power of two> with field one of {', '.join(TUNING_SIZES)}, "
                f"nor {' or '.join(TUNING_COUNTS)}=<count>, nor {'|'.join(TUNING_FLAGS)}=0|1")
        values[name] = str(int(value))
    return ",".join(f"{k}={values[k]}" for k in sorted(values))


def tuning_from_environment(options: Options) -> Options:
    """``options`` with ``$RWKVLAB_TUNING`` filled in where its tuning is empty."""
    text = os.environ.get(TUNING_ENV, "")
    if options.tuning or not text.strip():
        return options
    try:
        return options.with_(tuning=text)
    except OptionsError as e:
        raise OptionsError(f"${TUNING_ENV}: {e}") from None


# ----------------------------------------------------------------------------------------------
# The command line: one set of flags for every command that runs the engine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of every Options field, with Options' defaults (generate, bench, profile, sweep).

    Values are checked by Options, not argparse, so a typo gets the same one-line error (with
    what is available) as any other bad value.
    """
    d = Options()
    parser.add_argument("--runtime", default=d.runtime, metavar="{" + ",".join(RUNTIMES) + "}",
                        help="WebGPU implementation: wgpu-native (the wgpu package) or dawn (Google's Dawn "
                        f"through wgpudawn; tensor cores through subgroup matrices) (default: {d.runtime}; "
                        "`python -m rwkvlab.gpu --runtime dawn` lists what it finds)")
    parser.add_argument("--backend", default=d.backend, metavar="{" + ",".join(BACKENDS) + "}",
                        help="wgpu backend; auto = Vulkan/Metal/DX12 before OpenGL, real GPUs before software "
                        f"ones (default: {d.backend}; `python -m rwkvlab.gpu` lists this machine's adapters)")
    parser.add_argument("--path", default=d.path, metavar="{" + ",".join(PATHS) + "}",
                        help="kernel path: webgpu (portable WebGPU), native (also f16 / subgroups / unchecked "
                        "shader modules), auto (native where the adapter has f16 or subgroups, else webgpu; "
                        f"the run records which) (default: {d.path})")
    parser.add_argument("--weights", default=d.weights, metavar="{" + ",".join(WEIGHT_POLICIES) + "}",
                        help=f"native (file format on GPU) or f16 (dequantize at load) (default: {d.weights})")
    parser.add_argument("--fusions", default="default",
                        help="kernel-plan rewrites: 'default' (the fastest correct set: "
                        f"{fusions_text(DEFAULT_FUSIONS)}), 'all', 'none', or names joined by ',' or '+' "
                        f"from: {', '.join(FUSIONS)} (default: default)")
    parser.add_argument("--chunk", type=int, default=d.chunk,
                        help=f"tokens per prefill chunk (default: {d.chunk})")
    parser.add_argument("--gemm-min-tokens", type=int, default=d.gemm_min_tokens,
                        help=f"fewest tokens a chunk needs for GEMM instead of mat-vec (default: {d.gemm_min_tokens})")
    parser.add_argument("--tuning", default=d.tuning,
                        help="kernel-shape overrides, e.g. 'matvec_rows=4,wkv_wg=512' (fields: "
                        f"{', '.join(TUNING_SIZES + TUNING_COUNTS)}, {', '.join(TUNING_FLAGS)}=0|1); "
                        "empty = the device's own, "
                        f"or ${TUNING_ENV} where set; the run records what it used")


def from_args(args: argparse.Namespace) -> Options:
    """The Options a command line built by :func:`add_arguments` names."""
    return Options(runtime=args.runtime, backend=args.backend, path=args.path, weights=args.weights,
                   fusions=parse_fusions(args.fusions), chunk=args.chunk,
                   gemm_min_tokens=args.gemm_min_tokens, tuning=args.tuning)


def to_args(options: Options) -> list[str]:
    """The flags that make :func:`from_args` rebuild ``options`` exactly (workers, sweeps)."""
    return ["--runtime", options.runtime, "--backend", options.backend, "--path", options.path, "--weights", options.weights,
            "--fusions", ",".join(sorted(options.fusions)) or "none", "--chunk", str(options.chunk),
            "--gemm-min-tokens", str(options.gemm_min_tokens), "--tuning", options.tuning]
