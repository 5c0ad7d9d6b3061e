// matvec.wgsl: Y[t] = act(W X[t] + B) for a few token vectors, W in its file format.
// Used for generation steps and short chunks (T < Options.gemm_min_tokens).
//
// Bindings (group 0; the same layout as gemm.wgsl, so one bind group serves both):
//   0 run  uniform Run                          (common.wgsl)
//   1 p    uniform MatParams                    segment table (matseg.wgsl)
//   2 W    storage, read        array<vec4<u32>>  weight rows of every segment, format FMT
//   3 X    storage, read        array<vec4<f32>>  inputs (segment s: [T, K] at x_off)
//   4 B    storage, read        array<f32>        biases (the model's 1-D vectors)
//   5 Y    storage, read_write  array<f32>        outputs (segment s: at y_off, y_stride)
// Dispatch: (sum over segments of ceil(rows / (WG / RED)), T, 1). RED consecutive threads share
// a row: each takes every RED-th piece of it (neighbouring threads read neighbouring pieces, so
// loads coalesce), then group_sum. RED = 1 is the register-blocked variant (a row per thread,
// no barrier) that CPU adapters prefer; real GPUs want RED = 32 (a subgroup per row) or more.
// Constants: WG, RED (reduce*.wgsl), UNROLL, FMT (weights.wgsl; FMT_PER_SEGMENT for mixed stacks).

override WG: u32 = 64u;
override UNROLL: u32 = 1u;  // 1 or 2 pieces per loop iteration (see below)

@group(0) @binding(1) var<uniform> p: MatParams;
@group(0) @binding(2) var<storage, read> W: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> X: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> B: array<f32>;
@group(0) @binding(5) var<storage, read_write> Y: array<f32>;

// Dot product of piece i (weights.wgsl) of the row whose first word is `row` with the input
// whose element 0 is X[x0] (a vec4 index). Pieces of the formats of quants.wgsl are decoded by
// quants_dot.wgsl; the others are piece_words(fmt) consecutive words (Q8_0 skips the loader's
// padding block beyond K).
fn dot_piece(fmt: u32, row: u32, i: u32, x0: u32, K: u32) -> f32 {
    if (is_quant_fmt(fmt)) {
        return quant_dot(fmt, row, i, x0, K);
    }
    let pe = piece_elems(fmt);
    let wi = row + i * piece_words(fmt);
    let xi = x0 + i * (pe >> 2u);
    let k0 = i * pe;
    switch fmt {
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
    let sg = p.seg[find_seg(wg.x, false)];
    let m = (wg.x - sg.wg_start) * (WG / RED) + lid / RED;
    let lane = lid & (RED - 1u);
    let t = wg.y;
    var acc = 0.0;
    if (m < sg.rows) {
        let fmt = seg_fmt(sg);
        let pe = piece_elems(fmt);
        let n = (sg.K + pe - 1u) / pe;
        let row = sg.w_base + m * sg.row_words;
        let x0 = (sg.x_off + t * sg.K) >> 2u;
        // UNROLL = 2: two pieces per iteration into two sums, so twice the loads are in flight
        // per thread (what keeps a GPU's memory busy when a row has few pieces per thread);
        // CPU adapters run slower with it, so it is a per-device-class constant.
        var acc1 = 0.0;
        var i = lane;
        if (UNROLL == 2u) {
            for (; i + RED < n; i += 2u * RED) {
                acc += dot_piece(fmt, row, i, x0, sg.K);
                acc1 += dot_piece(fmt, row, i + RED, x0, sg.K);
            }
        }
        for (; i < n; i += RED) {
            acc += dot_piece(fmt, row, i, x0, sg.K);
        }
        acc += acc1;
    }
    let s = group_sum(acc, lid);
    if (lane == 0u && m < sg.rows) {
        epilogue(sg, t, m, s);
    }
}
