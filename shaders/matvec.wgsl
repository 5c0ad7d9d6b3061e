// matvec.wgsl: Y[t] = act(W X[t] + B) for a few token vectors, W in its file format.
// Used for generation steps and short chunks (T < Options.gemm_min_tokens).
//
// Bindings (group 0; the same layout as gemm.wgsl, so one bind group serves both):
//   0 run  uniform Run          (common.wgsl)
//   1 p    uniform MatParams    M: rows in this binding of W (a row-range piece when the matrix
//                               is split), K: columns, row_words: u32 words per row (weights.wgsl),
//                               row0: first output row of this piece, y_stride: full output width
//   2 W    storage, read        array<vec4<u32>>  weight rows [M, K] in format FMT
//   3 X    storage, read        array<vec4<f32>>  inputs [T, K]
//   4 B    storage, read        array<f32>        bias [y_stride], read only when BIAS
//   5 Y    storage, read_write  array<f32>        outputs [T, y_stride]; ACCUM adds (residual)
// Dispatch: (ceil(M / (WG / RED)), T, 1). RED consecutive threads share a row: each takes every
// RED-th piece of it (consecutive threads read consecutive pieces, so loads coalesce), then
// group_sum. RED = 1 is the register-blocked variant (one row per thread, no barrier) that CPU
// adapters prefer; real GPUs want RED = 32..256.
// Constants: WG, RED (reduce*.wgsl), FMT (weights.wgsl), ACT (common.wgsl), BIAS, ACCUM.

override WG: u32 = 64u;
override ACT: u32 = 0u;
override BIAS: bool = false;
override ACCUM: bool = false;

struct MatParams {
    M: u32,
    K: u32,
    row_words: u32,
    row0: u32,
    y_stride: u32,
}

@group(0) @binding(1) var<uniform> p: MatParams;
@group(0) @binding(2) var<storage, read> W: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> X: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> B: array<f32>;
@group(0) @binding(5) var<storage, read_write> Y: array<f32>;

// Dot product of the piece whose first word is `wi` with X from vec4 index `xi`; the piece's
// first element is column k0 (Q8_0 skips the loader's padding block beyond K).
fn dot_piece(wi: u32, xi: u32, k0: u32, K: u32) -> f32 {
    switch FMT {
        case FMT_F32: {
            return dot(bitcast<vec4<f32>>(W[wi >> 2u]), X[xi]);
        }
        case FMT_F16: {
            let w = W[wi >> 2u];
            return dot(f16x4(w.x, w.y), X[xi]) + dot(f16x4(w.z, w.w), X[xi + 1u]);
        }
        case FMT_BF16: {
            let w = W[wi >> 2u];
            return dot(bf16x4(w.x, w.y), X[xi]) + dot(bf16x4(w.z, w.w), X[xi + 1u]);
        }
        default: {  // Q8_0: a pair of blocks (weights.wgsl)
            var w = w_word(wi);
            let d0 = unpack2x16float(w).x;
            var s0 = 0.0;
            for (var j = 0u; j < 8u; j++) {
                let next = w_word(wi + 1u + j);
                s0 += dot(i8x4((w >> 16u) | (next << 16u)), X[xi + j]);
                w = next;
            }
            // w is now word 8, whose high half is block 1's scale
            var s1 = 0.0;
            if (k0 + 32u < K) {
                for (var j = 0u; j < 8u; j++) {
                    s1 += dot(i8x4(w_word(wi + 9u + j)), X[xi + 8u + j]);
                }
                s1 *= unpack2x16float(w).y;
            }
            return d0 * s0 + s1;
        }
    }
}

@compute @workgroup_size(WG)
fn matvec(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let m = wg.x * (WG / RED) + lid / RED;
    let lane = lid & (RED - 1u);
    let t = wg.y;
    var acc = 0.0;
    if (m < p.M) {
        let pe = piece_elems();
        let pw = piece_words();
        let n = (p.K + pe - 1u) / pe;
        let row = m * p.row_words;
        let x0 = t * (p.K >> 2u);
        for (var i = lane; i < n; i += RED) {
            acc += dot_piece(row + i * pw, x0 + i * (pe >> 2u), i * pe, p.K);
        }
    }
    let s = group_sum(acc, lid);
    if (lane == 0u && m < p.M) {
        var y = s;
        if (BIAS) {
            y += B[p.row0 + m];
        }
        y = activate(y, ACT);
        let o = t * p.y_stride + p.row0 + m;
        if (ACCUM) {
            Y[o] += y;
        } else {
            Y[o] = y;
        }
    }
}
