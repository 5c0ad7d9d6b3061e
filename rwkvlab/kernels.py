"""Kernel specs, pipelines and dispatches: the one place Python and WGSL agree.

Each kernel is a `KernelSpec`: the shader file of its family (shaders/*.wgsl, shipped as the
package `rwkvlab.shaders`), its entry point, the libraries prepended to it, its bindings in
binding order and the fields of its Params uniform in struct order. tests/test_kernels.py
parses the WGSL and checks every spec against it, and runs every kernel against NumPy.

`Kernels` compiles shader modules and pipelines once per device (override constants pick the
variant: weight format, workgroup size, threads per row...), builds the explicit
bind group layouts (kernels with equal binding lists share one, so matvec and gemm take the
same bind group), and makes bind groups with their Params uniform. The engine turns a model
into a list of `Dispatch`es (its kernel plan) once at load and replays it every token.

`Tuning` holds the per-device-class choices (CPU adapters like lavapipe want one row per
thread and no barriers; real GPUs want many threads per row and a reduction); `MatvecShape`
turns it into each mat-vec segment's threads per row.

`run_kernel` is a small harness that runs one kernel on NumPy arrays (used by the tests).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from types import MappingProxyType

import numpy as np

from rwkvlab import gpu as gpu_runtime
from rwkvlab import quant_kernels as qk
from rwkvlab.options import TUNING_FLAGS, normalize_tuning

SHADER_PACKAGE = "rwkvlab.shaders"

# Weight formats the kernels read directly (FMT override constant, see shaders/weights.wgsl;
# Q4_0, Q4_K, Q5_K and Q6_K are decoded by shaders/quants.wgsl, laid out by quant_kernels).
GPU_FORMATS: dict[str, int] = {"F32": 0, "F16": 1, "BF16": 2, "Q8_0": 3, **qk.QUANT_FORMATS}
FMT_PER_SEGMENT = 255  # FMT of a matrix-product pipeline whose segments differ in format

# Epilogues of matvec / gemm (Seg.act of shaders/matseg.wgsl, codes of shaders/common.wgsl).
ACTIVATIONS: dict[str, int] = {"none": 0, "tanh": 1, "sigmoid": 2, "relu_sq": 3, "decay": 4}

HEAD_SIZE = 64  # wkv.wgsl: a head's state is 64 x 64, one row per 64-lane part of the workgroup


class KernelError(RuntimeError):
    """A kernel could not be built or run; the message names the kernel and the cause."""


@dataclass(frozen=True)
class Binding:
    """One binding of group 0: `kind` is "uniform", "read" (read-only storage) or "rw"."""

    name: str
    kind: str


@dataclass(frozen=True)
class Param:
    """One field of a kernel's Params uniform struct: "u32", "f32" (4 bytes each) or
    "array<Name, n>" of a struct listed in STRUCTS (entries 16-byte aligned)."""

    name: str
    type: str = "u32"


@dataclass(frozen=True)
class KernelSpec:
    """What Python must know about a kernel to build it, bind it and dispatch it."""

    name: str
    file: str  # family file in shaders/
    entry: str
    bindings: tuple[Binding, ...]  # binding i of group 0 is bindings[i]; 0 is always "run"
    params: tuple[Param, ...]  # fields of the uniform at binding 1, in struct order
    libs: tuple[str, ...] = ("common.wgsl",)  # prepended, in this order
    constants: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    # WGSL extensions the source uses beyond the path's own (gpu.shader_preamble names:
    # "f16", "subgroups", "subgroup_matrix"); a device without them cannot build the kernel.
    extensions: tuple[str, ...] = ()
    # Constants written into the source (`const NAME: u32 = <value>u;` lines rewritten, one
    # module per set of values) instead of passed as pipeline overrides: Tint wants
    # subgroup-matrix shapes and the workgroup arrays subgroupMatrixLoad reads sized by
    # creation-time constants (llama.cpp's ggml-webgpu works around the same).
    baked: frozenset[str] = frozenset()

    def binding_index(self, name: str) -> int:
        for i, b in enumerate(self.bindings):
            if b.name == name:
                return i
        raise KernelError(f"kernel {self.name} has no binding {name!r}; it has "
                          f"{', '.join(b.name for b in self.bindings)}")


def _params(text: str) -> tuple[Param, ...]:
    return tuple(Param(*p.split(":", 1)) for p in text.split())


def _spec(name, file, entry, bindings, params, libs=("common.wgsl",), **constants) -> KernelSpec:
    binds = (Binding("run", "uniform"), Binding("p", "uniform")) + tuple(
        Binding(*b.split(":")) for b in bindings.split())
    return KernelSpec(name, file, entry, binds, _params(params), tuple(libs), MappingProxyType(constants))


# Structs used inside Params uniforms (shaders/matseg.wgsl).
STRUCTS: dict[str, tuple[Param, ...]] = {
    "Seg": _params("rows K row_words w_base x_off y_off y_stride act bias accum wg_start tile_start fmt "
                   "red spad1 spad2"),
}
MAX_SEGMENTS = 8
NO_BIAS = 0xFFFFFFFF

_MAT_BINDINGS = "W:read X:read B:read Y:rw"
_MAT_PARAMS = "n_seg pad0 pad1 pad2 seg:array<Seg,8>"  # no spaces: _params splits on them
_MAT_LIBS = ("common.wgsl", "weights.wgsl", "quants.wgsl", "matseg.wgsl")
_HEAD_PARAMS = "C"

MATVEC = _spec("matvec", "matvec.wgsl", "matvec", _MAT_BINDINGS, _MAT_PARAMS,
               _MAT_LIBS + ("quants_dot.wgsl", "reduce.wgsl"), WG=64, RED=1, UNROLL=1, NR=1, FMT=0,
               LORA=False, LROWS=256)
LORA = _spec("lora", "matvec.wgsl", "lora", _MAT_BINDINGS, _MAT_PARAMS,
             _MAT_LIBS + ("quants_dot.wgsl", "reduce.wgsl"), WG=64, RED=1, UNROLL=1, NR=1, FMT=0,
             LORA=True, LROWS=256)
LORA_MAX_RANK = 512  # shaders/matvec.wgsl: the hidden vector lives in workgroup memory
GEMM = _spec("gemm", "gemm.wgsl", "gemm", _MAT_BINDINGS, _MAT_PARAMS, _MAT_LIBS, FMT=0, ROWS=128, TK=16)
# The gemm tile (shaders/gemm.wgsl): 256 threads, each 4 tokens x ROWS/16 rows. Tokens per tile
# are fixed (the shader's const TOKENS); rows per tile (ROWS) and columns per K step (TK) are
# Tuning.gemm_rows / gemm_k. Params (matmul_params), pipeline and dispatch (gemm_grid) all take
# the tile rows from the pipeline's constants (gemm_tile_rows), so they cannot disagree.
GEMM_TOKENS = 64
GEMM_ROWS = (32, 64, 128)
GEMM_K = (16, 32)
# The prefill GEMM on matrix units (shaders/gemm_sgmat.wgsl): gemm's bindings, params and
# epilogue, f16 tiles and f32 accumulation through subgroup matrices. SM, SN, SK: an f16 x f16 ->
# f32 config the adapter reports (choose_sgmat_config), TOKENS x ROWS: the output tile
# (Tuning.sgmat_tokens / sgmat_rows, SGMAT_TILES), WG: SGMAT_SUBGROUPS subgroups. All are baked
# into the source; FMT stays an override.
GEMM_SGMAT = replace(
    _spec("gemm_sgmat", "gemm_sgmat.wgsl", "gemm_sgmat", _MAT_BINDINGS, _MAT_PARAMS, _MAT_LIBS,
          FMT=0, SM=16, SN=16, SK=16, TOKENS=64, ROWS=64, WG=128),
    extensions=("f16", "subgroups", "subgroup_matrix"),
    baked=frozenset({"SM", "SN", "SK", "TOKENS", "ROWS", "WG"}))
SGMAT_TK = 32  # columns per staged K step (the shader's TK): configs need K dividing it
SGMAT_SUBGROUPS = (2, 2)  # subgroups per workgroup along tokens and rows (the shader's SGT, SGR)
SGMAT_MAX_MATRICES = 16  # result matrices per subgroup (AT x AR) kept in registers
# (tokens, rows) tiles gemm_bench measures; Tuning takes any that the config divides.
SGMAT_TILES = ((64, 64), (128, 64), (64, 128), (32, 64))
# Whether prefill GEMMs take gemm_sgmat by default where an adapter has a config. Not yet: on an
# H200 (Dawn, wgpudawn 0.32.0.4, gemm_bench at T = 512, 2.9B Q8_0 shapes, data/benchmarks/
# nvidia-h200.md "gemm_sgmat tiles (issue 13)") its best tile (16x16x16, 64 x 64) ran at
# 21.7 / 23.1 / 22.1 TFLOP/s on att.out / ffn.key / ffn.value where the fp32 gemm runs 22.4 /
# 24.5 / 21.9: no faster, and its inputs are rounded to f16. "gemm_sgmat=1" runs it (the config
# is chosen from the adapter's list either way, and recorded).
SGMAT_BY_DEFAULT = False
EMBED = _spec("embed", "embed.wgsl", "embed", "W:read TOK:read NW:read NB:read Y:rw",
              "C row0 rows row_words w_base eps:f32",
              ("common.wgsl", "weights.wgsl", "quants.wgsl", "reduce.wgsl"),
              WG=64, RED=64, FMT=0)
LAYERNORM = _spec("layernorm", "norm.wgsl", "layernorm", "X:read NW:read NB:read Y:rw",
                  "C last_only eps:f32", ("common.wgsl", "reduce.wgsl"), WG=64, RED=64)
GROUPNORM_OUT = _spec("groupnorm_out", "norm.wgsl", "groupnorm_out",
                      "GY:rw R:read K:read V:read G:read LNW:read LNB:read RK:read", _HEAD_PARAMS,
                      ("common.wgsl", "reduce.wgsl"), WG=64, RED=64)
SHIFT_MIX = _spec("shift_mix", "timemix.wgsl", "shift_mix", "XN:read PREV:rw LERP:read OUT:rw",
                  "C slot", ("common.wgsl", "reduce.wgsl"), WG=64, NMIX=6)
KV_PREP = _spec("kv_prep", "timemix.wgsl", "kv_prep",
                "K:rw V:rw KK:rw A:read VMIX:read VF:rw KKW:read KAW:read", _HEAD_PARAMS,
                ("common.wgsl", "reduce.wgsl"), WG=64, RED=64, FIRST=False, PART=0)
ACTIVATE = _spec("activate", "timemix.wgsl", "activate_inplace", "AX:rw", "n act",
                 ("common.wgsl", "reduce.wgsl"), WG=64)
NORM_SHIFT = _spec("norm_shift", "timemix.wgsl", "norm_shift",
                   "NX:read NW:read NB:read NPREV:rw NLERP:read NOUT:rw", "C slot eps:f32",
                   ("common.wgsl", "reduce.wgsl"), WG=64, RED=64, NMIX=6)
WKV = _spec("wkv", "wkv.wgsl", "wkv", "R:read DECAY:read K:read V:read KK:read A:read S:rw Y:rw",
            _HEAD_PARAMS, ("common.wgsl", "reduce.wgsl"), WG=256, RED=64)
WKV_FUSED = _spec("wkv_fused", "wkv.wgsl", "wkv_fused",
                  "DOWN:read UP:read VEC:read FVF:rw FS:rw FY:rw FKK:read",
                  "C r k v w a vmix g kkw kaw rk lnw lnb", ("common.wgsl", "reduce.wgsl"),
                  WG=256, RED=64, FIRST=False, PREP=True)
# The state update of a prefill chunk on the native path (shaders/wkv_prefill.wgsl): wkv's
# bindings, a state row per LANES lanes of a subgroup, WG / LANES rows per workgroup
# (Tuning.wkv_lanes, wkv_rows; wkv_prefill_grid). It needs subgroup operations (NEEDS_SUBGROUPS).
WKV_PREFILL = _spec("wkv_prefill", "wkv_prefill.wgsl", "wkv_prefill",
                    "R:read DECAY:read K:read V:read KK:read A:read S:rw Y:rw", _HEAD_PARAMS, WG=128, LANES=8)
ARGMAX = _spec("argmax", "argmax.wgsl", "argmax", "L:read TOK:rw GEN:rw", "V cap", WG=256)

SPECS: dict[str, KernelSpec] = {s.name: s for s in (
    MATVEC, LORA, GEMM, GEMM_SGMAT, EMBED, LAYERNORM, GROUPNORM_OUT, SHIFT_MIX, NORM_SHIFT, KV_PREP, ACTIVATE,
    WKV, WKV_FUSED, WKV_PREFILL, ARGMAX)}
# Kernels whose source uses subgroup operations: only a device with the "subgroup" feature (the
# native path, Tuning.subgroups) builds them.
NEEDS_SUBGROUPS = frozenset({"wkv_prefill", "gemm_sgmat"})
# Kernels that need subgroup matrices with an f16 x f16 -> f32 config (Tuning.gemm_sgmat).
NEEDS_SUBGROUP_MATRIX = frozenset({"gemm_sgmat"})
WKV_PREFILL_LANES = (1, 2, 4, 8, 16)  # lanes per state row: 64 / LANES columns, whole vec4s

# Constants a kernel's workgroup shape is fixed to, whatever the tuning says (the head kernels
# run one thread per channel of a 64-wide head; wkv and wkv_fused take WG from the tuning).
_HEAD_WG = {"WG": 64, "RED": 64}
_FIXED = {"groupnorm_out": _HEAD_WG, "kv_prep": _HEAD_WG}


def _shader_dir():
    """Where shaders/ is: the checkout's folder beside this package when there is one (a bare
    copy on a remote GPU machine, or a second git worktree whose code must not read the
    editable install's shaders), else the installed package's."""
    checkout = Path(__file__).resolve().parent.parent / "shaders"
    if (checkout / "common.wgsl").is_file():
        return checkout
    return resources.files(SHADER_PACKAGE)


def shader_source(name: str) -> str:
    """The text of one file of shaders/ (works from a checkout and from an installed wheel)."""
    try:
        return _shader_dir().joinpath(name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KernelError(f"shader file {name!r} is missing from the package {SHADER_PACKAGE} "
                          "(reinstall rwkvlab: pip install -e .)") from None


def compose_source(spec: KernelSpec, subgroups: bool = False) -> str:
    """The WGSL a kernel is compiled from: its libraries, then its family file.

    On the native path with subgroups, reduce.wgsl is swapped for its subgroup twin.
    """
    parts = []
    for name in spec.libs + (spec.file,):
        if subgroups and name == "reduce.wgsl":
            name = "reduce_subgroup.wgsl"
        parts.append(f"// ---- {name} ----\n{shader_source(name)}")
    return "\n".join(parts)


def bake_constants(source: str, values: dict) -> str:
    """`source` with each `const NAME: u32 = <n>u;` line of `values` rewritten to its value
    (KernelSpec.baked); every name must be declared exactly once."""
    for name, value in sorted(values.items()):
        pattern = re.compile(rf"^const {name}: u32 = \d+u;", re.M)
        source, n = pattern.subn(f"const {name}: u32 = {int(value)}u;", source)
        if n != 1:
            raise KernelError(f"cannot bake constant {name}: the shader must declare "
                              f"`const {name}: u32 = <n>u;` once (found {n})")
    return source


def _pack_value(spec_name: str, p: Param, v) -> int:
    if p.type == "f32":
        return int(np.float32(v).view(np.uint32))
    if not 0 <= int(v) < 2**32:
        raise KernelError(f"kernel {spec_name}: param {p.name}={v} does not fit a u32")
    return int(v)


def pack_params(spec: KernelSpec, values: dict) -> bytes:
    """The bytes of a kernel's Params uniform (fields in struct order, padded to 16 bytes).

    A field of type array<S, n> takes a list of at most n dicts with the fields of STRUCTS[S];
    missing entries are zero.
    """
    names = [p.name for p in spec.params]
    if set(values) != set(names):
        raise KernelError(f"kernel {spec.name}: params {sorted(values)} given, expected {names}")
    words: list[int] = []
    for p in spec.params:
        m = re.fullmatch(r"array<(\w+),\s*(\d+)>", p.type)
        if m is None:
            words.append(_pack_value(spec.name, p, values[p.name]))
            continue
        fields, n = STRUCTS[m.group(1)], int(m.group(2))
        entries = list(values[p.name])
        if len(entries) > n:
            raise KernelError(f"kernel {spec.name}: {len(entries)} entries for {p.name}, at most {n}")
        words += [0] * (-len(words) % 4)  # arrays of structs start 16-byte aligned
        stride = -(-len(fields) // 4) * 4
        for i in range(n):
            entry = entries[i] if i < len(entries) else {f.name: 0 for f in fields}
            if set(entry) != {f.name for f in fields}:
                raise KernelError(f"kernel {spec.name}: {p.name}[{i}] has fields {sorted(entry)}, "
                                  f"expected {[f.name for f in fields]}")
            row = [_pack_value(spec.name, f, entry[f.name]) for f in fields]
            words += row + [0] * (stride - len(row))
    words += [0] * (-len(words) % 4 or (4 if not words else 0))
    return np.array(words, dtype=np.uint32).tobytes()


@dataclass(frozen=True)
class MatSegment:
    """One segment of a matrix-product dispatch (shaders/matseg.wgsl): `rows` rows of a
    matrix stored at word `w_base` of the weight binding, reading X from float `x_off`
    ([T, K]), writing Y from float `y_off` with `y_stride` floats per token."""

    rows: int
    K: int
    row_words: int
    w_base: int
    x_off: int
    y_off: int
    y_stride: int
    act: str = "none"
    bias: int | None = None  # first float of the bias in the B binding
    accum: bool = False
    fmt: str = "F32"  # read by FMT_PER_SEGMENT pipelines; others use their FMT constant
    matrix_rows: int = 0  # rows of the whole matrix this segment is part of (0: `rows`)


def matmul_fmt(segments: list[MatSegment]) -> int:
    """The FMT constant for a dispatch over these segments (FMT_PER_SEGMENT if they differ)."""
    fmts = {s.fmt for s in segments}
    return GPU_FORMATS[fmts.pop()] if len(fmts) == 1 else FMT_PER_SEGMENT


def gemm_workgroup_bytes(rows: int, k: int) -> int:
    """Workgroup memory of a gemm pipeline: W and X tiles of `k` columns, rows padded by 4."""
    return (rows + GEMM_TOKENS) * (k + 4) * 4


def gemm_tile_rows(gemm: "Kernel") -> int:
    """Rows per output tile of a built gemm pipeline (its ROWS constant)."""
    return dict(gemm.constants)["ROWS"]


def gemm_tile_tokens(gemm: "Kernel") -> int:
    """Tokens per output tile of a built gemm or gemm_sgmat pipeline."""
    return dict(gemm.constants).get("TOKENS", GEMM_TOKENS)


def gemm_grid(tiles: int, T: int, tokens: int = GEMM_TOKENS) -> tuple[int, int, int]:
    """Workgroups of a gemm (or gemm_sgmat) dispatch: `tiles` row tiles (matmul_params) x token
    tiles of T (`tokens` per tile: gemm_tile_tokens of the pipeline)."""
    return (tiles, -(-T // tokens), 1)


# --- the subgroup-matrix GEMM: which adapter config, which tile --------------------------------


def sgmat_configs(configs, subgroup_size: int = 0) -> list[tuple[int, int, int]]:
    """(M, N, K) of the subgroup-matrix configs gemm_sgmat can run, from GPU.subgroup_matrix_configs
    (Dawn's adapter properties: dicts with m, n, k, component_type, result_component_type and
    min/max_subgroup_size; upper-case M, N, K accepted too): f16 operands, f32 results, K dividing
    the staged step SGMAT_TK, and (where the config says) `subgroup_size` in its range."""
    found = set()
    for c in configs or ():
        def get(key, default=None):
            return c.get(key, c.get(key.upper(), default))
        if str(get("component_type", "")).lower() != "f16" or str(get("result_component_type", "")).lower() != "f32":
            continue
        m, n, k = (int(get(key, 0)) for key in ("m", "n", "k"))
        if min(m, n, k) <= 0 or SGMAT_TK % k:
            continue
        lo, hi = get("min_subgroup_size", 0) or 0, get("max_subgroup_size", 0) or 0
        if subgroup_size and ((lo and subgroup_size < lo) or (hi and subgroup_size > hi)):
            continue
        found.add((m, n, k))
    return sorted(found)


def sgmat_configs_text(usable: list[tuple[int, int, int]]) -> str:
    """Configs from sgmat_configs as people read them in errors: "16x16x16, 16x8x16" or "none"."""
    return ", ".join("x".join(map(str, c)) for c in usable) or "none"


def choose_sgmat_config(configs, subgroup_size: int = 0, m: int = 0, n: int = 0,
                        k: int = 0) -> tuple[int, int, int] | None:
    """The config gemm_sgmat uses (None: none fits): among sgmat_configs, those matching the
    non-zero m, n, k asked for, the one doing the most multiply-adds per matrix instruction
    (M N K), then the widest result (M N): fewer loads and instructions per output."""
    usable = [c for c in sgmat_configs(configs, subgroup_size)
              if all(want in (0, got) for want, got in zip((m, n, k), c))]
    return max(usable, key=lambda c: (c[0] * c[1] * c[2], c[0] * c[1], c[1]), default=None)


def sgmat_workgroup_bytes(tokens: int, rows: int, m: int, n: int) -> int:
    """Workgroup memory of a gemm_sgmat pipeline: f16 X and W tiles of SGMAT_TK + 8 halves per
    row, one f32 result matrix per subgroup, the per-subgroup maxima and the step's shift."""
    sgs = SGMAT_SUBGROUPS[0] * SGMAT_SUBGROUPS[1]
    return 2 * (tokens + rows) * (SGMAT_TK + 8) + 4 * sgs * m * n + 8 * sgs + 4


def sgmat_tile_problem(config: tuple[int, int, int], tokens: int, rows: int, wg_bytes: int) -> str:
    """Why a (tokens x rows) gemm_sgmat tile cannot run with `config` ("" when it can)."""
    m, n, _ = config
    st, sr = SGMAT_SUBGROUPS
    if tokens % (st * m) or rows % (sr * n):
        return (f"a {tokens} x {rows} tile does not split into {st} x {sr} subgroups of {m} x {n} "
                "result matrices")
    if (tokens // (st * m)) * (rows // (sr * n)) > SGMAT_MAX_MATRICES:
        return (f"a {tokens} x {rows} tile gives each subgroup more than {SGMAT_MAX_MATRICES} "
                f"{m} x {n} result matrices")
    need = sgmat_workgroup_bytes(tokens, rows, m, n)
    if need > wg_bytes:
        return f"a {tokens} x {rows} tile needs {need} bytes of workgroup memory, this device has {wg_bytes}"
    return ""


def wkv_prefill_grid(kernel: "Kernel", C: int) -> tuple[int, int, int]:
    """Workgroups of a wkv_prefill dispatch over C channels: one per WG / LANES state rows
    (a power of two <= 64, so it divides C = 64 H), from the built pipeline's constants."""
    c = dict(kernel.constants)
    return (C // (c["WG"] // c["LANES"]), 1, 1)


# Elements per mat-vec piece of each format (piece_elems of shaders/weights.wgsl): what one
# thread reads per step of a row, which MatvecShape counts to give threads enough of them.
PIECE_ELEMS: dict[str, int] = {"F32": 4, "F16": 8, "BF16": 8, "Q8_0": 16, **{f: qk.PIECE for f in qk.LAYOUTS}}


@dataclass(frozen=True)
class MatvecShape:
    """How a matvec (or lora) pipeline splits rows among threads (shaders/matvec.wgsl): groups
    of `red` lanes per row, `rows` rows per group, `wg` threads per workgroup. The lanes per
    row are chosen per SEGMENT (red_for, stored in its table entry), from the segment alone, so
    a matrix is summed in the same order in every dispatch it is stacked into (fused plans stay
    bit-identical to unfused ones, and a matrix split over buffers to a whole one)."""

    wg: int  # threads per workgroup (WG)
    red: int  # most lanes per row (RED, the pipeline's widest group)
    rows: int = 1  # rows per group of lanes (NR)
    pieces: int = 0  # fewest pieces per lane wanted (Tuning.matvec_pieces); 0: every segment takes `red`
    wide_pieces: int = 0  # the same for matrices of at least `wide_from` rows (0: `pieces`)
    wide_from: int = 0
    short_pieces: int = 0  # the same for rows shorter than `short_k` elements (0: `pieces`)
    short_k: int = 0

    @classmethod
    def of(cls, kernel: "Kernel", tuning: "Tuning | None" = None) -> "MatvecShape":
        """The shape of a built matvec / lora pipeline (its WG, RED and NR constants) with the
        tuning's pieces per lane (none without a tuning)."""
        c = dict(kernel.constants)
        t = tuning
        if t is None:
            return cls(wg=c["WG"], red=c["RED"], rows=c["NR"])
        return cls(wg=c["WG"], red=c["RED"], rows=c["NR"], pieces=t.matvec_pieces,
                   wide_pieces=t.matvec_wide_pieces, wide_from=t.matvec_wide_from,
                   short_pieces=t.matvec_short_pieces, short_k=t.matvec_short_k)

    def pieces_for(self, seg: MatSegment) -> int:
        """Fewest pieces per lane for a segment: `wide_pieces` where its whole matrix has at
        least `wide_from` rows (the head: 65536 rows keep every SM busy with fewer, longer
        lanes), else `pieces`. Chosen from the matrix, not the segment, so a matrix split over
        buffers sums like a whole one. `short_pieces` where its rows are shorter than `short_k`
        (the LoRA up-projections, K = 32..320: a lane of 4 pieces leaves such a row 1-8 lanes
        and a few dozen workgroups for 10240 rows)."""
        if self.wide_pieces and self.wide_from and (seg.matrix_rows or seg.rows) >= self.wide_from:
            return self.wide_pieces
        if self.short_pieces and seg.K < self.short_k:
            return self.short_pieces
        return self.pieces

    def red_for(self, seg: MatSegment) -> int:
        """Lanes per row for a segment: `red`, halved while a lane would get fewer than
        pieces_for(seg) pieces of a row (a K-quant row of K = 2560 has 40: 8 lanes get 5 each,
        where 32 lanes would leave most with one piece and a reduction to pay for it)."""
        red = self.red
        pieces = self.pieces_for(seg)
        if pieces:
            n = -(-seg.K // PIECE_ELEMS[seg.fmt])
            while red > 1 and n < red * pieces:
                red //= 2
        return red

    def rows_per_wg(self, red: int) -> int:
        return self.wg // red * self.rows


def matmul_params(segments: list[MatSegment], shape: MatvecShape,
                  tile_rows: int = GEMM.constants["ROWS"]) -> tuple[dict, int, int]:
    """(Params values, matvec workgroups, gemm tiles) for up to MAX_SEGMENTS segments; `shape`
    is the matvec pipeline's, gemm tiles have `tile_rows` rows (pass gemm_tile_rows of the
    pipeline that will run them)."""
    if not 1 <= len(segments) <= MAX_SEGMENTS:
        raise KernelError(f"a matrix-product dispatch takes 1..{MAX_SEGMENTS} segments, not {len(segments)}")
    table, wgs, tiles = [], 0, 0
    for s in segments:
        if s.K % 32 or s.x_off % 4 or s.w_base % 4:
            raise KernelError(f"segment {s}: K must be a multiple of 32 and x_off, w_base of 4")
        red = shape.red_for(s)
        table.append(dict(rows=s.rows, K=s.K, row_words=s.row_words, w_base=s.w_base, x_off=s.x_off,
                          y_off=s.y_off, y_stride=s.y_stride, act=ACTIVATIONS[s.act],
                          bias=NO_BIAS if s.bias is None else s.bias, accum=int(s.accum),
                          wg_start=wgs, tile_start=tiles, fmt=GPU_FORMATS[s.fmt],
                          red=red, spad1=0, spad2=0))
        wgs += -(-s.rows // shape.rows_per_wg(red))
        tiles += -(-s.rows // tile_rows)
    return dict(n_seg=len(segments), pad0=0, pad1=0, pad2=0, seg=table), wgs, tiles


def lora_params(pairs: list[tuple[MatSegment, MatSegment]], lrows: int,
                shape: MatvecShape) -> tuple[dict, int]:
    """(Params values, workgroups) of one lora dispatch over up to MAX_SEGMENTS // 2 LoRA pairs
    (down, up): the table alternates down and up segments, each with the lanes per row a
    matvec dispatch of it would take (`shape`, the lora pipeline's); up segments count
    workgroups of `lrows` output rows (shaders/matvec.wgsl, entry lora)."""
    if not 1 <= len(pairs) <= MAX_SEGMENTS // 2:
        raise KernelError(f"a lora dispatch takes 1..{MAX_SEGMENTS // 2} pairs, not {len(pairs)}")
    if lrows % shape.rows:
        raise KernelError(f"LROWS = {lrows} is not a multiple of the {shape.rows} rows per group")
    segs = [s for pair in pairs for s in pair]
    params, _, _ = matmul_params(segs, shape)
    wgs = 0
    for j, (down, up) in enumerate(pairs):
        if down.rows != up.K or down.rows > LORA_MAX_RANK:
            raise KernelError(f"LoRA pair {j}: the down matrix has {down.rows} rows, the up matrix "
                              f"{up.K} columns; they must be equal and at most {LORA_MAX_RANK}")
        params["seg"][2 * j + 1]["wg_start"] = wgs
        wgs += -(-up.rows // lrows)
    return params, wgs


@dataclass(frozen=True)
class Tuning:
    """Per-device-class kernel shapes (recorded with benchmarks; chosen by `choose_tuning`)."""

    matvec_wg: int  # threads per mat-vec workgroup
    matvec_red: int  # most threads sharing one output row (1 = a row per thread, no reduction)
    matvec_unroll: int  # pieces per loop iteration per thread (2, 4: more loads in flight)
    norm_wg: int  # threads per token in layernorm / embed
    shift_wg: int
    argmax_wg: int
    subgroups: bool  # reductions with subgroup operations (native path)
    subgroup_size: int  # probed; 0 when subgroups are off
    # Shader modules built without Naga's runtime checks (native path, see Kernels._module).
    trusted: bool = False
    gemm_rows: int = 128  # rows of W per gemm output tile (GEMM_ROWS; tokens: GEMM_TOKENS)
    gemm_k: int = 16  # columns per gemm K step (GEMM_K; choose_tuning picks 32 where the
    #                   device has the 27 KB of workgroup memory it needs)
    # threads per wkv / wkv_fused workgroup (one per head): 64 x lanes per state row, each lane
    # keeping 64 / lanes floats of its row in registers (shaders/wkv.wgsl)
    wkv_wg: int = 256
    matvec_rows: int = 1  # rows per group of threads, sharing each load of x (1, 2 or 4)
    matvec_pieces: int = 0  # fewest pieces of a row per thread: each segment halves matvec_red
    #                         until its threads get that many (MatvecShape.red_for); 0 = off
    matvec_rows_from: int = 0  # mat-vec dispatches with fewer rows than this (and all lanes on
    #                            each row) use one row per group: more workgroups; 0 = none do
    matvec_small_wg: int = 0  # threads per workgroup of those one-row dispatches (0 = matvec_wg)
    matvec_small_weights: int = 0  # ... of those with at most this many weights (0 = all of them)
    matvec_quant_short_k: int = 0  # Q4_0 / K-quant rows at most this long may take them too (0 = none)
    matvec_wide_pieces: int = 0  # matvec_pieces for matrices of at least matvec_wide_from rows
    matvec_wide_from: int = 32768  # (the head); 0 pieces = matvec_pieces for them too
    matvec_short_pieces: int = 0  # matvec_pieces for rows shorter than matvec_short_k elements
    matvec_short_k: int = 1024  # (the LoRA ups); 0 pieces = matvec_pieces for them too
    # wkv_prefill (prefill chunks on the native path): lanes of a subgroup per state row (1..16,
    # at most the subgroup size) and state rows per workgroup (<= 64, 16 <= rows x lanes <= 256)
    wkv_lanes: int = 4
    wkv_rows: int = 32
    # Prefill GEMMs on the matrix units (gemm_sgmat) instead of gemm (the native path with an f16 x
    # f16 -> f32 subgroup-matrix config; default SGMAT_BY_DEFAULT); sgmat_m/n/k is the adapter's
    # config it would use (0: none), the tile sgmat_tokens x sgmat_rows (SGMAT_TILES).
    gemm_sgmat: bool = False
    sgmat_m: int = 0
    sgmat_n: int = 0
    sgmat_k: int = 0
    sgmat_tokens: int = 64
    sgmat_rows: int = 64

    def as_record(self) -> dict:
        return dict(self.__dict__)


def choose_tuning(gpu, path: str, overrides: str = "") -> Tuning:
    """Kernel shapes for this adapter: CPU adapters (lavapipe, llvmpipe, SwiftShader) run
    register-blocked mat-vec (a row per thread: barriers are expensive there); GPUs give each
    row up to 32 threads (one subgroup on NVIDIA) with a reduction.

    The gemm tile is the same on every adapter (lavapipe runs the shape the GPUs run): 64 rows
    x 64 tokens, 4 x 4 outputs per thread, K steps of 16 (15 KB of workgroup memory: fits
    WebGPU's minimum limit). The H100 measured it fastest at T = 512 (see the comment below);
    128-row tiles (8 x 4 per thread) and K steps of 32 stay selectable through $RWKVLAB_TUNING.

    WKV: CPU adapters keep a whole state row per thread (wkv_wg 64: a workgroup runs on one
    core, more lanes only add barriers). GPUs split each row over 4 lanes (wkv_wg 256): only
    H workgroups exist (40 on a 2.9B model, 132 SMs on an H100), so each is latency bound; 8
    warps per SM instead of 2 give every scheduler two warps to switch between, and a lane's
    16 floats are 4 vec4 FMA chains of length 4 per sum instead of 16.
    A prefill chunk on the native path runs wkv_prefill instead: state rows, not heads, spread
    over workgroups (H x 64 rows). CPU adapters keep a whole row per lane and a head per
    workgroup (wkv_lanes 1, wkv_rows 64); GPUs give a row 4 lanes of a subgroup (four vec4s
    each, 2 shuffle steps per sum) and a workgroup 32 rows (80 workgroups of 128 threads on a
    2.9B model). Measured on an H200 (python -m rwkvlab.wkv_bench, H = 40, T = 512): 0.31 us
    per token and layer for wkv_prefill alone at 4 x 32, 0.32 at 8 x 32, 0.34-0.35 at 4 x 16,
    8 x 16 and 16 x 8, 0.44 at 1 x 64 (wkv_fused: 1.60); 32 rows (the head's vectors staged
    once for twice the rows) led at T = 64 too. wkv_lanes is lowered to the subgroup size where
    that is smaller (8 on lavapipe).

    Prefill GEMMs can run on the matrix units (gemm_sgmat: f16 tiles, f32 accumulation) wherever
    the native path has an f16 x f16 -> f32 subgroup-matrix config (Dawn's adapter properties; the
    config with the most multiply-adds per instruction, choose_sgmat_config), in 64 x 64 tiles:
    "gemm_sgmat=1" (not the default yet: SGMAT_BY_DEFAULT says why), "sgmat_n=8" or
    "sgmat_tokens=128" pick another config or tile.

    `overrides` (Options.tuning, which $RWKVLAB_TUNING can fill) changes fields for
    experiments, e.g. "matvec_wg=256,matvec_red=64,matvec_unroll=1,matvec_rows=4,
    matvec_pieces=8,wkv_wg=512" (sizes are powers of two; matvec_red <= matvec_wg; matvec_unroll
    and matvec_rows 1, 2 or 4; matvec_pieces any count, 0 = every segment takes matvec_red;
    gemm_rows 32, 64 or 128; gemm_k 16 or 32; 64 <= wkv_wg <= 1024), or "trusted=0" (the native
    path with Naga's runtime checks back on); engines record their tuning (Engine.tuning).
    """
    subgroups = path == "native" and gpu.has("subgroup")
    sg = probe_subgroup_size(gpu) if subgroups else 0
    wg_bytes = int(gpu.limits.get("max-compute-workgroup-storage-size", 16384))
    # Measured on an H100 (python -m rwkvlab.gemm_bench, docs/perf-notes.md): at T = 512,
    # 64-row tiles with K steps of 16 ran the 2.9B products at 20.7-21.1 TFLOP/s; 128 rows or
    # K steps of 32 (more registers and workgroup memory, fewer workgroups per SM) ran slower.
    gemm = dict(gemm_rows=64, gemm_k=16)
    if gpu.info.adapter_type == "CPU":
        tuning = Tuning(matvec_wg=64, matvec_red=1, matvec_unroll=1, norm_wg=64, shift_wg=64,
                        argmax_wg=64, subgroups=subgroups, subgroup_size=sg, wkv_wg=64, wkv_lanes=1,
                        wkv_rows=64, **gemm)
    else:
        # Mat-vec on an NVIDIA-class GPU (docs/perf-notes.md: the kernel streamed Q8_0 at 1 TB/s
        # and the 4-bit formats at 0.4-0.5 TB/s, far from the ~3 TB/s of HBM). A lane's x loads
        # from L1 are 4x (Q8_0) to 8x (4-bit) its weight bytes, and 32 lanes reading pieces
        # 64-256 bytes apart touch 16-32 cache lines per load instruction: by that count the
        # L1 (128 B/clk per SM) saturates before DRAM does. So each group of lanes computes 2
        # rows per x load (matvec_rows), and a segment whose rows are short gives a row fewer
        # lanes (at least 4 pieces each, matvec_pieces: a K = 2560 K-quant row gets 8 lanes
        # instead of 32, and the 4 groups of a warp then read the same x addresses). Up to 32
        # lanes per row (one warp: the reduction is shuffles on the native path) for long rows,
        # and 128 threads per workgroup: with 2 rows per group that is 8 to 32 rows per
        # workgroup, so a 2560-row matrix still makes 80 or more workgroups for 132 SMs and the
        # 10240-row ones several per SM. matvec_rows=4 halves x traffic again but halves the
        # workgroups; the lead sweeps both (rwkvlab.kernel_bench --tunings). The head alone at 8
        # pieces per lane (matvec_wide_pieces=8) streamed 2-3x faster in kernel_bench on an H200
        # (F16 1396 -> 4158 GB/s), but in the engine it changed nothing beyond noise (2.9B Q8_0
        # 328.3 vs 327.4 tok/s, F16 307.9 vs 307.4, 0.1b 1336 vs 1359; history, d4ba46f), so it
        # stays off: the head is ~6% of a 2.9B step's bytes. One-row dispatches of at most 4 M
        # weights run in 64-thread workgroups (twice the workgroups): on an H200 (history,
        # issue 14) 64 threads for every one-row dispatch ran the 0.1b model (products of at
        # most 2.4 M weights) 9.6% faster and the 2.9B Q8_0 one (6.6 M and up) 2% slower, so
        # the 2.9B and larger products keep 128. matvec_short_pieces=1 (the LoRA ups, K < 1024,
        # at 1 piece per lane) measured +1.4% on 2.9B Q8_0 but moves the logits (other sums):
        # it stays a knob.
        tuning = Tuning(matvec_wg=128, matvec_red=32, matvec_unroll=2, norm_wg=256, shift_wg=64,
                        argmax_wg=256, subgroups=subgroups, subgroup_size=sg, wkv_wg=256,
                        matvec_rows=2, matvec_pieces=4, matvec_rows_from=4096,
                        matvec_small_wg=64, matvec_small_weights=1 << 22, **gemm)
    tuning = replace(tuning, trusted=path == "native")
    # Matrix units (subgroup matrices, Dawn): the shape comes from the adapter's own list
    # (choose_sgmat_config) where the native path offers an f16 x f16 -> f32 config; used by
    # default when SGMAT_BY_DEFAULT, else with "gemm_sgmat=1".
    configs = sgmat_adapter_configs(gpu, path, sg)
    config = choose_sgmat_config(configs, sg)
    if config is not None:
        tuning = replace(tuning, gemm_sgmat=SGMAT_BY_DEFAULT, sgmat_m=config[0], sgmat_n=config[1],
                         sgmat_k=config[2])
    tuning = _tuning_overrides(tuning, overrides)
    tuning = _sgmat_tuning(tuning, configs, overrides, wg_bytes)
    if subgroups and tuning.wkv_lanes > sg:  # a row's lanes must share a subgroup
        lanes = sg
        tuning = replace(tuning, wkv_lanes=lanes, wkv_rows=min(64, max(tuning.wkv_rows, 16 // lanes)))
    need = gemm_workgroup_bytes(tuning.gemm_rows, tuning.gemm_k)
    if need > wg_bytes:
        raise KernelError(f"tuning: gemm_rows={tuning.gemm_rows}, gemm_k={tuning.gemm_k} "
                          f"needs {need} bytes of workgroup memory, this device has {wg_bytes}")
    return tuning


def sgmat_adapter_configs(gpu, path: str, subgroup_size: int) -> tuple:
    """The adapter's subgroup-matrix configs where gemm_sgmat can use them: the native path of a
    device made with subgroup matrices, f16 and subgroups (else none)."""
    if path != "native" or not subgroup_size or not (gpu.has("subgroup-matrix") and gpu.has("shader-f16")):
        return ()
    return tuple(getattr(gpu, "subgroup_matrix_configs", ()) or ())


def usable_sgmat_configs(gpu, path: str, subgroup_size: int) -> list[tuple[int, int, int]]:
    """(M, N, K) of the configs gemm_sgmat can run on this device and path (sgmat_configs of
    sgmat_adapter_configs)."""
    return sgmat_configs(sgmat_adapter_configs(gpu, path, subgroup_size), subgroup_size)


def _sgmat_tuning(tuning: Tuning, configs, overrides: str, wg_bytes: int) -> Tuning:
    """Check the gemm_sgmat fields after overrides: the config named (sgmat_m/n/k given in the
    overrides are constraints, the rest is chosen again) must be one the adapter reports and the
    tile must fit it; gemm_sgmat=1 where there is none is refused, naming what exists."""
    if not tuning.gemm_sgmat:
        return tuning
    named = {item.partition("=")[0] for item in normalize_tuning(overrides).split(",") if item}
    asked = {f: getattr(tuning, f"sgmat_{f}") for f in "mnk" if f"sgmat_{f}" in named}
    config = choose_sgmat_config(configs, tuning.subgroup_size, **asked)
    if config is None:
        have = sgmat_configs_text(sgmat_configs(configs, tuning.subgroup_size))
        raise KernelError(f"tuning: gemm_sgmat=1 needs an f16 x f16 -> f32 subgroup-matrix config (the "
                          f"native path of the dawn runtime, on an adapter that reports one)"
                          + (f" with {', '.join(f'sgmat_{f}={v}' for f, v in asked.items())}" if asked else "")
                          + f"; this device's usable configs (M x N x K): {have}; use gemm_sgmat=0")
    tuning = replace(tuning, sgmat_m=config[0], sgmat_n=config[1], sgmat_k=config[2])
    problem = sgmat_tile_problem(config, tuning.sgmat_tokens, tuning.sgmat_rows, wg_bytes)
    if problem:
        raise KernelError(f"tuning: sgmat_tokens={tuning.sgmat_tokens}, sgmat_rows={tuning.sgmat_rows} with "
                          f"the {'x'.join(map(str, config))} config: {problem}")
    return tuning


def _tuning_overrides(tuning: Tuning, text: str) -> Tuning:
    """`tuning` with the fields `text` (Options.tuning syntax) names; checks how they combine."""
    from rwkvlab.options import OptionsError

    try:
        text = normalize_tuning(text)
    except OptionsError as e:
        raise KernelError(str(e)) from None
    changes: dict[str, int | bool] = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        changes[name] = value == "1" if name in TUNING_FLAGS else int(value)
    tuning = replace(tuning, **changes)
    if (tuning.matvec_red > tuning.matvec_wg or (tuning.matvec_small_wg and tuning.matvec_red > tuning.matvec_small_wg)
            or tuning.matvec_unroll > 4 or tuning.matvec_rows > 4
            or tuning.wkv_wg < 64
            or max(tuning.matvec_wg, tuning.matvec_small_wg, tuning.norm_wg, tuning.argmax_wg, tuning.wkv_wg) > 1024
            or tuning.gemm_rows not in GEMM_ROWS or tuning.gemm_k not in GEMM_K
            or tuning.wkv_lanes not in WKV_PREFILL_LANES or tuning.wkv_rows > 64
            or not 16 <= tuning.wkv_rows * tuning.wkv_lanes <= 256):
        raise KernelError(f"tuning: matvec_red must be <= matvec_wg and matvec_small_wg, matvec_unroll and "
                          f"matvec_rows 1, 2 or 4, wkv_wg >= 64 and workgroups <= 1024 threads, "
                          f"gemm_rows one of {GEMM_ROWS}, gemm_k one of {GEMM_K}, wkv_lanes <= 16, "
                          f"wkv_rows <= 64 and 16 <= wkv_rows x wkv_lanes <= 256, got {tuning}")
    return tuning


@dataclass(frozen=True)
class Kernel:
    """A pipeline: a spec plus the override constants it is built with. The pipeline compiles
    beside the caller (rwkvlab.gpu.compute_pipeline); `pipeline` waits for it, and raises a
    KernelError naming the kernel when it did not build."""

    spec: KernelSpec
    constants: tuple[tuple[str, object], ...]
    build: object = field(repr=False, compare=False)  # rwkvlab.gpu.Pending

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pipeline(self):
        try:
            return self.build.result()
        except Exception as e:  # wgpu raises GPUValidationError with Naga's report
            raise _build_error(self.spec, dict(self.constants), e) from None


def _build_error(spec: KernelSpec, consts: dict, e: Exception) -> KernelError:
    return KernelError(f"kernel {spec.name} ({spec.file}) with constants {consts} failed to build: {e}")


@dataclass(frozen=True)
class Dispatch:
    """One step of a kernel plan: run `kernel` with `bind_group` over `workgroups`."""

    kernel: Kernel
    bind_group: object
    workgroups: tuple[int, int, int]
    label: str


_PROBE = """
@group(0) @binding(0) var<storage, read_write> out: array<u32>;
@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(subgroup_size) sg: u32) {
    if (lid == 0u) { out[0] = sg; }
}
"""


_SUBGROUP_SIZES: dict[int, int] = {}


def probe_subgroup_size(gpu) -> int:
    """The device's subgroup size, measured once per device (adapter.info does not report it)."""
    d = gpu.device
    if id(d) in _SUBGROUP_SIZES:
        return _SUBGROUP_SIZES[id(d)]
    module = d.create_shader_module(code=gpu_runtime.shader_preamble(gpu, "subgroups") + _PROBE)
    pipe = d.create_compute_pipeline(layout="auto", compute={"module": module, "entry_point": "main"})
    buf = d.create_buffer(size=16, usage=gpu_runtime.STORAGE | gpu_runtime.COPY_SRC)
    bg = d.create_bind_group(layout=pipe.get_bind_group_layout(0),
                             entries=[{"binding": 0, "resource": {"buffer": buf}}])
    enc = d.create_command_encoder()
    cp = enc.begin_compute_pass()
    cp.set_pipeline(pipe)
    cp.set_bind_group(0, bg)
    cp.dispatch_workgroups(1)
    cp.end()
    d.queue.submit([enc.finish()])
    size = int(np.frombuffer(d.queue.read_buffer(buf), dtype=np.uint32)[0])
    _SUBGROUP_SIZES[id(d)] = size
    return size


class Kernels:
    """Modules, layouts and pipelines of one device, each built once and cached."""

    def __init__(self, gpu, tuning: Tuning) -> None:
        self.gpu = gpu
        self.device = gpu.device
        self.tuning = tuning
        self._modules: dict[str, object] = {}
        self._layouts: dict[tuple, tuple[object, object]] = {}
        self._pipelines: dict[tuple, Kernel] = {}
        self._started: list[Kernel] = []  # every pipeline build, in the order asked for (wait)

    def _module(self, spec: KernelSpec, baked: dict | None = None):
        baked = baked or {}
        key = f"{spec.file}:{'+'.join(spec.libs)}:{sorted(baked.items())}"
        if key not in self._modules:
            code = compose_source(spec, self.tuning.subgroups)
            if baked:
                code = bake_constants(code, baked)
            extensions = tuple(dict.fromkeys(spec.extensions + (("subgroups",) if self.tuning.subgroups else ())))
            if extensions:
                code = gpu_runtime.shader_preamble(self.gpu, *extensions) + code
            try:
                self._modules[key] = gpu_runtime.shader_module(self.gpu, spec.file, code, self.tuning.trusted)
            except Exception as e:  # wgpu raises GPUValidationError with Naga's report
                raise KernelError(f"shaders/{spec.file} (kernel {spec.name}) does not compile: {e}") from None
        return self._modules[key]

    def layouts(self, spec: KernelSpec) -> tuple[object, object]:
        """(bind group layout, pipeline layout) for the spec's binding list (shared by equals)."""
        key = tuple(b.kind for b in spec.bindings)
        if key not in self._layouts:
            entries = [{"binding": i, "visibility": gpu_runtime.COMPUTE_STAGE,
                        "buffer": {"type": gpu_runtime.BINDING_TYPES[k]}}
                       for i, k in enumerate(key)]
            bgl = self.device.create_bind_group_layout(entries=entries)
            self._layouts[key] = (bgl, self.device.create_pipeline_layout(bind_group_layouts=[bgl]))
        return self._layouts[key]

    def constants_for(self, spec: KernelSpec, **overrides) -> dict:
        """The spec's default constants, then the tuning's, then `overrides`, then fixed ones."""
        t = self.tuning
        consts = dict(spec.constants)
        tuned = {
            "matvec": {"WG": t.matvec_wg, "RED": t.matvec_red, "UNROLL": t.matvec_unroll,
                       "NR": t.matvec_rows},
            # lora must reduce exactly like matvec: its outputs are bit-identical to matvec's
            "lora": {"WG": t.matvec_wg, "RED": t.matvec_red, "UNROLL": t.matvec_unroll,
                     "NR": t.matvec_rows},
            "embed": {"WG": t.norm_wg, "RED": t.norm_wg},
            "layernorm": {"WG": t.norm_wg, "RED": t.norm_wg},
            "norm_shift": {"WG": t.norm_wg, "RED": t.norm_wg},
            "shift_mix": {"WG": t.shift_wg},
            "argmax": {"WG": t.argmax_wg},
            "gemm": {"ROWS": t.gemm_rows, "TK": t.gemm_k},
            "gemm_sgmat": {"SM": t.sgmat_m, "SN": t.sgmat_n, "SK": t.sgmat_k, "TOKENS": t.sgmat_tokens,
                           "ROWS": t.sgmat_rows,
                           "WG": SGMAT_SUBGROUPS[0] * SGMAT_SUBGROUPS[1] * t.subgroup_size},
            "wkv": {"WG": t.wkv_wg},
            "wkv_fused": {"WG": t.wkv_wg},
            "wkv_prefill": {"WG": t.wkv_rows * t.wkv_lanes, "LANES": t.wkv_lanes},
        }.get(spec.name, {})
        consts.update(tuned)
        consts.update(overrides)
        consts.update(_FIXED.get(spec.name, {}))
        unknown = set(consts) - set(spec.constants)
        if unknown:
            raise KernelError(f"kernel {spec.name} has no override constant(s) {sorted(unknown)}; "
                              f"it has {sorted(spec.constants)}")
        if "RED" in consts and consts["RED"] > consts.get("WG", consts["RED"]):
            consts["RED"] = consts["WG"]
        if t.subgroups and "RED" in spec.constants:
            consts["SG"] = t.subgroup_size
        if spec.name in NEEDS_SUBGROUPS and not t.subgroups:
            raise KernelError(f"kernel {spec.name} uses subgroup operations: it runs on the native "
                              "path of an adapter with subgroups only")
        if spec.name in NEEDS_SUBGROUP_MATRIX:
            usable = usable_sgmat_configs(self.gpu, "native", t.subgroup_size)
            config = (consts["SM"], consts["SN"], consts["SK"])
            if config not in usable:
                have = sgmat_configs_text(usable)
                raise KernelError(f"kernel {spec.name} uses subgroup matrices: it needs an f16 x f16 -> f32 "
                                  f"config of the adapter (the dawn runtime's native path); asked for "
                                  f"{'x'.join(map(str, config))}, this device has: {have}")
            wg_bytes = int(self.gpu.limits.get("max-compute-workgroup-storage-size", 16384))
            problem = sgmat_tile_problem(config, consts["TOKENS"], consts["ROWS"], wg_bytes)
            if problem:
                raise KernelError(f"kernel {spec.name}: {problem}")
        if spec.name == WKV_PREFILL.name:
            wg, lanes = consts["WG"], consts["LANES"]
            if not (lanes in WKV_PREFILL_LANES and lanes <= t.subgroup_size and 16 <= wg <= 256
                    and wg % lanes == 0 and 64 % (wg // lanes) == 0):
                raise KernelError(f"kernel {spec.name}: WG={wg}, LANES={lanes}: a row's lanes (one of "
                                  f"{WKV_PREFILL_LANES}) must fit a subgroup ({t.subgroup_size} here), "
                                  "16 <= WG <= 256 and WG / LANES rows must divide 64")
            need, have = 96 * wg, int(self.gpu.limits.get("max-compute-workgroup-storage-size", 16384))
            if need > have:  # six staged vectors, a vec4 per thread each
                raise KernelError(f"kernel {spec.name}: WG={wg} stages {need} bytes of workgroup memory, "
                                  f"this device has {have}; use wkv_rows x wkv_lanes <= {have // 96}")
        return consts

    def kernel(self, spec: KernelSpec, **overrides) -> Kernel:
        """The pipeline of `spec` with its constants, cached. Its shader module is built here
        (errors in the WGSL raise here); the pipeline starts compiling beside the caller (one
        that failed is tried again), and Kernel.pipeline or `wait` waits for it."""
        consts = self.constants_for(spec, **overrides)
        key = (spec.name, tuple(sorted(consts.items())))
        cached = self._pipelines.get(key)
        if cached is None or cached.build.failed:
            _, pipeline_layout = self.layouts(spec)
            # wgpu takes override constants as numbers (bools as 0/1); baked ones are in the module.
            wgpu_consts = {k: (int(v) if isinstance(v, bool) else v) for k, v in consts.items()
                           if k not in spec.baked}
            module = self._module(spec, {k: v for k, v in consts.items() if k in spec.baked})
            try:
                build = gpu_runtime.compute_pipeline(self.gpu, label=f"{spec.name}{dict(consts)}",
                                                     layout=pipeline_layout, module=module,
                                                     entry_point=spec.entry, constants=wgpu_consts)
            except Exception as e:
                raise _build_error(spec, consts, e) from None
            self._pipelines[key] = cached = Kernel(spec, key[1], build)
            self._started.append(cached)
        return cached

    def mark(self) -> int:
        """A point in the list of builds started, for `wait`."""
        return len(self._started)

    def wait(self, since: int = 0) -> list[Kernel]:
        """Wait for the pipelines started since `mark()` returned `since`; the kernels, in the
        order they were asked for. Raises the KernelError of the first that failed."""
        started = self._started[since:]
        for kernel in started:
            kernel.pipeline
        return started

    def bind(self, spec: KernelSpec, run, params: dict, resources_: dict, label: str = ""):
        """A bind group for `spec`: `run` is the per-submit uniform buffer, `params` the values
        of its Params uniform (stored in a new small uniform buffer), and `resources_` maps every
        other binding name to a buffer or a (buffer, offset, size) range."""
        bgl, _ = self.layouts(spec)
        params_buf = self.device.create_buffer_with_data(
            label=f"{label}.params", data=pack_params(spec, params), usage=gpu_runtime.UNIFORM)
        names = [b.name for b in spec.bindings[2:]]
        if set(resources_) != set(names):
            raise KernelError(f"kernel {spec.name} ({label}): buffers {sorted(resources_)} "
                              f"given, expected {names}")
        entries = [{"binding": 0, "resource": {"buffer": run}},
                   {"binding": 1, "resource": {"buffer": params_buf}}]
        for i, name in enumerate(names, start=2):
            r = resources_[name]
            if isinstance(r, tuple):
                buf, offset, size = r
                entries.append({"binding": i, "resource": {"buffer": buf, "offset": offset, "size": size}})
            else:
                entries.append({"binding": i, "resource": {"buffer": r}})
        return self.device.create_bind_group(label=label, layout=bgl, entries=entries)


class Plan:
    """An immutable list of dispatches (what one chunk or one step runs), prepared once for the
    runtime's fastest encoding (rwkvlab.gpu.prepare_dispatches)."""

    def __init__(self, dispatches: Iterable[Dispatch]) -> None:
        self.dispatches = tuple(dispatches)
        self._prepared = None

    def __len__(self) -> int:
        return len(self.dispatches)

    def __iter__(self):
        return iter(self.dispatches)

    def __getitem__(self, i):
        return self.dispatches[i]

    def prepared(self):
        if self._prepared is None:
            self._prepared = gpu_runtime.prepare_dispatches(
                (d.kernel.pipeline, d.bind_group, d.workgroups) for d in self.dispatches)
        return self._prepared


def encode(compute_pass, plan: Plan | list[Dispatch]) -> None:
    """Record a plan (or a plain list of dispatches) into an open compute pass."""
    if not isinstance(plan, Plan):
        plan = Plan(plan)
    gpu_runtime.encode_prepared(compute_pass, plan.prepared())


_KERNELS: dict[tuple[int, Tuning], Kernels] = {}


def kernels_for(gpu, tuning: Tuning) -> Kernels:
    """The process's Kernels for this device and tuning (pipelines are shared by engines)."""
    key = (id(gpu.device), tuning)
    if key not in _KERNELS:
        _KERNELS[key] = Kernels(gpu, tuning)
    return _KERNELS[key]


# ----------------------------------------------------------------------------------------------
# Harness: one kernel on NumPy arrays


def run_kernel(kernels: Kernels, spec: KernelSpec, params: dict, arrays: dict[str, np.ndarray],
               workgroups: tuple[int, int, int], T: int = 1, constants: dict | None = None,
               read: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Run one dispatch of `spec` and return the named buffers afterwards.

    `arrays` gives the initial contents of every storage binding (any dtype; bytes are
    uploaded as they are, padded to 16). The result arrays have the dtype and shape of the
    inputs they came from. Meant for tests; builds everything fresh each call.
    """
    d = kernels.device
    usage = gpu_runtime.STORAGE | gpu_runtime.COPY_SRC | gpu_runtime.COPY_DST
    bufs = {}
    for name, arr in arrays.items():
        data = np.ascontiguousarray(arr).tobytes()
        data += b"\0" * ((-len(data)) % 16 if data else 16)
        bufs[name] = d.create_buffer_with_data(label=name, data=data, usage=usage)
    run = d.create_buffer_with_data(data=np.array([T, 0, 0, 0], np.uint32).tobytes(),
                                    usage=gpu_runtime.UNIFORM)
    kernel = kernels.kernel(spec, **(constants or {}))
    bg = kernels.bind(spec, run, params, bufs, label=f"test.{spec.name}")
    enc = d.create_command_encoder()
    cp = enc.begin_compute_pass()
    encode(cp, [Dispatch(kernel, bg, tuple(workgroups), spec.name)])
    cp.end()
    d.queue.submit([enc.finish()])
    out = {}
    for name in read:
        arr = np.asarray(arrays[name])
        raw = d.queue.read_buffer(bufs[name])[: arr.nbytes]
        out[name] = np.frombuffer(raw, dtype=arr.dtype).reshape(arr.shape).copy()
    return out


# ----------------------------------------------------------------------------------------------
# Weight layout on the GPU (what shaders/weights.wgsl reads)


def row_words(fmt: str, K: int) -> int:
    """u32 words per weight row of K elements in GPU format `fmt` (Q8_0: whole super-blocks of
    256 elements; Q4_0 and Q6_K: whole pairs of blocks)."""
    if fmt == "F32":
        return K
    if fmt in ("F16", "BF16"):
        return K // 2
    if fmt == "Q8_0":
        return Q8_0_SUPER_WORDS * (-(-K // 256))
    if fmt in qk.LAYOUTS:
        return qk.row_words(fmt, K)
    raise KernelError(f"no GPU layout for weight format {fmt}; the kernels read "
                      f"{', '.join(GPU_FORMATS)}")


Q8_0_SUPER_WORDS = 68  # 8 blocks: 4 words of f16 scales, then 64 words of int8 quants


def q8_0_rows_for_gpu(raw_rows: np.ndarray, K: int) -> np.ndarray:
    """Q8_0 rows (uint8 [n, K/32*34], the file's blocks) regrouped as the kernels read them
    (shaders/weights.wgsl): super-blocks of 8 blocks, their 8 scales (16 bytes) first, then
    their 256 quants; a short last super-block is zero-padded (its scales 0)."""
    n, nb = raw_rows.shape[0], K // 32
    groups = -(-nb // 8)
    if nb % 8:
        padded = np.zeros((n, groups * 8 * 34), np.uint8)
        padded[:, : nb * 34] = raw_rows.reshape(n, nb * 34)
        raw_rows = padded
    # As 16-bit words a block is 17 of them (scale, then 16 pairs of quants): two strided
    # copies straight into the output run at several GB/s, which the load time needs.
    blocks = np.ascontiguousarray(raw_rows).view(np.uint16).reshape(n, groups, 8, 17)
    out = np.empty((n, groups, Q8_0_SUPER_WORDS * 2), np.uint16)
    np.copyto(out[:, :, :8], blocks[..., 0])
    np.copyto(out[:, :, 8:].reshape(n, groups, 8, 16), blocks[..., 1:])
    return out.view(np.uint8).reshape(n, groups * Q8_0_SUPER_WORDS * 4)


def rows_for_gpu(raw_rows: np.ndarray, fmt: str, K: int) -> np.ndarray:
    """Rows of a file tensor (uint8 [n, file row bytes]) stored in GPU format `fmt` as the
    kernels read them: the file's bytes (Q8_0 regrouped into super-blocks), rows padded to
    whole pairs of blocks where needed."""
    if fmt == "Q8_0":
        return q8_0_rows_for_gpu(raw_rows, K)
    if fmt in qk.LAYOUTS:
        return qk.rows_for_gpu(raw_rows, fmt, K)
    return raw_rows


_STRUCT_RE = re.compile(r"struct\s+(\w+)\s*\{([^}]*)\}", re.S)
_BINDING_RE = re.compile(
    r"@group\(0\)\s*@binding\((\d+)\)\s*var<(uniform|storage)(?:,\s*(read|read_write))?>\s*(\w+)\s*:\s*([^;]+);")


def wgsl_interface(spec: KernelSpec) -> tuple[dict[int, list[tuple[str, str]]], dict[str, list[tuple[str, str]]]]:
    """Parse a kernel's composed WGSL: {binding: [(kind, variable), ...]} and
    {struct: [(field, type without spaces), ...]}, for tests that check specs against shaders.

    A family file with several kernels may declare several variables at one binding (each
    kernel uses its own), hence a list per binding.
    """
    src = re.sub(r"//[^\n]*", "", compose_source(spec))
    bindings: dict[int, list[tuple[str, str]]] = {}
    for num, space, access, name, _type in _BINDING_RE.findall(src):
        kind = "uniform" if space == "uniform" else ("rw" if access == "read_write" else "read")
        bindings.setdefault(int(num), []).append((kind, name))
    structs = {}
    for name, body in _STRUCT_RE.findall(src):
        fields = [f.split(":", 1) for f in re.split(r",(?![^<]*>)", body) if f.strip()]
        structs[name] = [(n.strip(), re.sub(r"\s+", "", t)) for n, t in fields]
    return bindings, structs
