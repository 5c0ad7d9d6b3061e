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
//
// lora (the "lora" fusion, one-token steps and short chunks): each LoRA pair of a block as one
// kernel, Y = act2(W2 act1(W1 X) + B). The segment table holds pairs: segment 2j is the down
// matrix W1 (rank rows, K = C: x_off and act1 used), segment 2j + 1 the up matrix W2 (C rows,
// K = rank: y_off, y_stride, act2, bias used; wg_start counts lora workgroups of LROWS rows).
// Every workgroup of a pair first computes the whole hidden vector h = act1(W1 X[t]) into
// workgroup memory (the down matrix is small: re-reading it per workgroup costs L2 traffic,
// not DRAM), then LROWS rows of W2 h. Both phases run matvec's row loop and reduction with
// the same WG, RED, UNROLL, so every output is bit-identical to the two matvec dispatches.
// Dispatch: (sum over pairs of ceil(C / LROWS), T, 1). Constants: LORA (true for this entry
// point: makes xin read h), LROWS; the rank is at most LORA_MAX_RANK.

override WG: u32 = 64u;
override UNROLL: u32 = 1u;  // 1 or 2 pieces per loop iteration (see below)

@group(0) @binding(1) var<uniform> p: MatParams;
@group(0) @binding(2) var<storage, read> W: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> X: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> B: array<f32>;
@group(0) @binding(5) var<storage, read_write> Y: array<f32>;

override LORA: bool = false;
override LROWS: u32 = 256u;
const LORA_MAX_RANK: u32 = 512u;
var<workgroup> lora_h: array<vec4<f32>, 128>;  // LORA_MAX_RANK / 4
var<private> x_from_h: bool = false;

// The i-th vec4 of the input: X, or in the lora kernel's second phase the hidden vector
// (LORA is an override constant, so the matvec pipelines compile the plain load alone).
fn xin(i: u32) -> vec4<f32> {
    if (LORA && x_from_h) {
        return lora_h[i];
    }
    return X[i];
}

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
            return dot(bitcast<vec4<f32>>(W[wi >> 2u]), xin(xi));
        }
        case FMT_F16: {
            let w = W[wi >> 2u];
            return dot(f16x4(w.x, w.y), xin(xi)) + dot(f16x4(w.z, w.w), xin(xi + 1u));
        }
        case FMT_BF16: {
            let w = W[wi >> 2u];
            return dot(bf16x4(w.x, w.y), xin(xi)) + dot(bf16x4(w.z, w.w), xin(xi + 1u));
        }
        default: {  // Q8_0: a pair of blocks (weights.wgsl)
            var w = w_word(wi);
            let d0 = unpack2x16float(w).x;
            var s0 = 0.0;
            for (var j = 0u; j < 8u; j++) {
                let next = w_word(wi + 1u + j);
                s0 += dot(i8x4((w >> 16u) | (next << 16u)), xin(xi + j));
                w = next;
            }
            // w is now word 8, whose high half is block 1's scale
            var s1 = 0.0;
            if (k0 + 32u < K) {
                for (var j = 0u; j < 8u; j++) {
                    s1 += dot(i8x4(w_word(wi + 9u + j)), xin(xi + 8u + j));
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
        acc = row_partial(sg, m, (sg.x_off + t * sg.K) >> 2u, lane);
    }
    let s = group_sum(acc, lid);
    if (lane == 0u && m < sg.rows) {
        epilogue(sg, t, m, s);
    }
}

// This lane's part of row `m` of segment `sg` dotted with the input from vec4 index x0: every
// RED-th piece. UNROLL = 2: two pieces per iteration into two sums, so twice the loads are in
// flight per thread (what keeps a GPU's memory busy when a row has few pieces per thread);
// CPU adapters run slower with it, so it is a per-device-class constant.
fn row_partial(sg: Seg, m: u32, x0: u32, lane: u32) -> f32 {
    let fmt = seg_fmt(sg);
    let pe = piece_elems(fmt);
    let n = (sg.K + pe - 1u) / pe;
    let row = sg.w_base + m * sg.row_words;
    var acc = 0.0;
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
    return acc + acc1;
}

@compute @workgroup_size(WG)
fn lora(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    var j = 0u;
    for (var q = 1u; q < p.n_seg / 2u; q++) {
        if (wg.x >= p.seg[2u * q + 1u].wg_start) {
            j = q;
        }
    }
    let dn = p.seg[2u * j];
    let up = p.seg[2u * j + 1u];
    let t = wg.y;
    let groups = WG / RED;
    let group = lid / RED;
    let lane = lid & (RED - 1u);
    // phase 1: h = act1(W1 X[t]), rows spread over the workgroup's groups of RED lanes
    let x0 = (dn.x_off + t * dn.K) >> 2u;
    for (var r0 = 0u; r0 < dn.rows; r0 += groups) {
        let r = r0 + group;
        var acc = 0.0;
        if (r < dn.rows) {
            acc = row_partial(dn, r, x0, lane);
        }
        let s = group_sum(acc, lid);
        if (lane == 0u && r < dn.rows) {
            lora_h[r >> 2u][r & 3u] = activate(s, dn.act);
        }
    }
    workgroupBarrier();
    // phase 2: LROWS rows of act2(W2 h + bias), h read through xin
    x_from_h = true;
    let m0 = (wg.x - up.wg_start) * LROWS;
    for (var mm = group; mm < LROWS; mm += groups) {
        let m = m0 + mm;
        var acc = 0.0;
        if (m < up.rows) {
            acc = row_partial(up, m, 0u, lane);
        }
        let s = group_sum(acc, lid);
        if (lane == 0u && m < up.rows) {
            epilogue(up, t, m, s);
        }
    }
}
