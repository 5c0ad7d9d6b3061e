"""Subgroup matrices emulated in plain WGSL, so gemm_sgmat.wgsl runs on CI's lavapipe.

No CPU adapter has subgroup matrices, yet everything around the matrix calls (staging, f16
rounding, the overflow scaling, tile and segment bounds, the epilogue) is where a tiled kernel
goes wrong. Here every lane holds a whole matrix (an array of f32 in a struct):
a load reads all of it from workgroup memory, a multiply-accumulate does the full product in
f32 (f16 x f16 products are exact there), a store writes all of it (every lane the same values).
The semantics follow Dawn's subgroup-matrix docs as dawn-notes.md sums them up: left SM x SK,
right SK x SN, result SM x SN; element (r, c) at offset + r * stride + c, or offset + c * stride
+ r when col_major. Only the matrix calls are swapped (textually, the shapes the shader uses);
the rest of the kernel is compiled and run as it ships.
"""
from __future__ import annotations

import re

from rwkvlab import gpu as gpu_runtime
from rwkvlab import kernels as kn

EMULATION = """
// ---- subgroup matrices emulated (tests/sgmat_emulation.py) ----
// Loop bounds are read from the Params uniform (its pad0 is 0): bounds the compiler cannot see
// keep LLVM from unrolling 4096 multiply-adds at every call (minutes of lavapipe compile time).
fn emu_n(n: u32) -> u32 {
    return n + p.pad0;
}
struct EmuLeft { v: array<f32, SM * SK> }    // row-major
struct EmuRight { v: array<f32, SK * SN> }
struct EmuResult { v: array<f32, SM * SN> }

fn emu_load_left(p: ptr<workgroup, array<f16, TOKENS * XS>>, off: u32, col_major: bool, stride: u32) -> EmuLeft {
    var m: EmuLeft;
    for (var r = 0u; r < emu_n(SM); r++) {
        for (var c = 0u; c < emu_n(SK); c++) {
            m.v[r * SK + c] = f32((*p)[select(off + r * stride + c, off + c * stride + r, col_major)]);
        }
    }
    return m;
}

fn emu_load_right(p: ptr<workgroup, array<f16, ROWS * XS>>, off: u32, col_major: bool, stride: u32) -> EmuRight {
    var m: EmuRight;
    for (var r = 0u; r < emu_n(SK); r++) {
        for (var c = 0u; c < emu_n(SN); c++) {
            m.v[r * SN + c] = f32((*p)[select(off + r * stride + c, off + c * stride + r, col_major)]);
        }
    }
    return m;
}

fn emu_mma(l: EmuLeft, r: EmuRight, acc: EmuResult) -> EmuResult {
    var out = acc;
    for (var i = 0u; i < emu_n(SM); i++) {
        for (var j = 0u; j < emu_n(SN); j++) {
            var s = out.v[i * SN + j];
            for (var k = 0u; k < emu_n(SK); k++) {
                s += l.v[i * SK + k] * r.v[k * SN + j];
            }
            out.v[i * SN + j] = s;
        }
    }
    return out;
}

fn emu_store(p: ptr<workgroup, array<f32, SUBGROUPS * SM * SN>>, off: u32, m: EmuResult, col_major: bool, stride: u32) {
    for (var r = 0u; r < emu_n(SM); r++) {
        for (var c = 0u; c < emu_n(SN); c++) {
            (*p)[select(off + r * stride + c, off + c * stride + r, col_major)] = m.v[r * SN + c];
        }
    }
}
"""

# The shader's matrix spellings -> the emulation's (each must occur: the shader changed if not).
REWRITES = (
    ("subgroupMatrixLoad<subgroup_matrix_left<f16, SK, SM>>(", "emu_load_left("),
    ("subgroupMatrixLoad<subgroup_matrix_right<f16, SN, SK>>(", "emu_load_right("),
    ("subgroup_matrix_left<f16, SK, SM>", "EmuLeft"),
    ("subgroup_matrix_result<f32, SN, SM>", "EmuResult"),
    ("subgroupMatrixMultiplyAccumulate(", "emu_mma("),
    ("subgroupMatrixStore(", "emu_store("),
)


def emulate(source: str) -> str:
    """gemm_sgmat's composed source with its subgroup-matrix calls swapped for the emulation."""
    for old, new in REWRITES:
        assert old in source, f"gemm_sgmat.wgsl no longer spells {old!r}: update tests/sgmat_emulation.py"
        source = source.replace(old, new)
    code = re.sub(r"//[^\n]*", "", source)
    assert "subgroupMatrix" not in code and "subgroup_matrix" not in code, "a matrix call left unemulated"
    return source + EMULATION


def install(monkeypatch, configs: list[dict]) -> None:
    """Make kernels build gemm_sgmat with the emulation, on an adapter claiming `configs`."""
    compose, preamble = kn.compose_source, gpu_runtime.shader_preamble

    def composed(spec, subgroups=False):
        source = compose(spec, subgroups)
        return emulate(source) if spec.name == kn.GEMM_SGMAT.name else source

    monkeypatch.setattr(kn, "compose_source", composed)
    monkeypatch.setattr(gpu_runtime, "shader_preamble",
                        lambda gpu, *ext: preamble(gpu, *(e for e in ext if e != "subgroup_matrix")))
    monkeypatch.setattr(kn, "sgmat_adapter_configs", lambda gpu, path, sg: tuple(configs))


def config(m: int, n: int, k: int, a: str = "f16", result: str = "f32") -> dict:
    """One adapter config as wgpudawn's get_adapter_properties writes it."""
    return {"component_type": a, "result_component_type": result, "m": m, "n": n, "k": k,
            "min_subgroup_size": 0, "max_subgroup_size": 0}
