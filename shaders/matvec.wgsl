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
override UNROLL: u32 = 1u;  // 1, 2 or 4 pieces per loop iteration (see row_partial)

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
// whose element 0 is xin(x0) (a vec4 index). Pieces of the formats of quants.wgsl are decoded
// by quants_dot.wgsl; the others are one aligned vec4 of the row.
fn dot_piece(fmt: u32, row: u32, i: u32, x0: u32, K: u32) -> f32 {
    if (is_quant_fmt(fmt)) {
        return quant_dot(fmt, row, i, x0, K);
    }
    switch fmt {
        case FMT_F32: {
            return dot(bitcast<vec4<f32>>(W[(row >> 2u) + i]), xin(x0 + i));
        }
        case FMT_F16: {
            let w = W[(row >> 2u) + i];
            let xi = x0 + 2u * i;
            return dot(f16x4(w.x, w.y), xin(xi)) + dot(f16x4(w.z, w.w), xin(xi + 1u));
        }
        case FMT_BF16: {
            let w = W[(row >> 2u) + i];
            let xi = x0 + 2u * i;
            return dot(bf16x4(w.x, w.y), xin(xi)) + dot(bf16x4(w.z, w.w), xin(xi + 1u));
        }
        default: {  // Q8_0: vec4 j of super-block g's quants (weights.wgsl), 16 elements
            let sb = (row >> 2u) + (i >> 4u) * 17u;
            let q = W[sb + 1u + (i & 15u)];
            let d = q8_0_scale(W[sb][(i >> 2u) & 3u], i >> 1u);
            let xi = x0 + 4u * i;
            return d * (dot(i8x4(q.x), xin(xi)) + dot(i8x4(q.y), xin(xi + 1u))
                        + dot(i8x4(q.z), xin(xi + 2u)) + dot(i8x4(q.w), xin(xi + 3u)));
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
// RED-th piece. UNROLL = 2 (4): two (four) pieces per iteration into as many sums, so more loads
// are in flight per thread (what keeps a GPU's memory busy when a row has few pieces per thread);
// CPU adapters run slower with it, so it is a per-device-class constant.
fn row_partial(sg: Seg, m: u32, x0: u32, lane: u32) -> f32 {
    let fmt = seg_fmt(sg);
    let pe = piece_elems(fmt);
    let n = (sg.K + pe - 1u) / pe;
    let row = sg.w_base + m * sg.row_words;
    var acc = 0.0;
    var acc1 = 0.0;
    var acc2 = 0.0;
    var acc3 = 0.0;
    var i = lane;
    if (UNROLL == 4u) {
        for (; i + 3u * RED < n; i += 4u * RED) {
            acc += dot_piece(fmt, row, i, x0, sg.K);
            acc1 += dot_piece(fmt, row, i + RED, x0, sg.K);
            acc2 += dot_piece(fmt, row, i + 2u * RED, x0, sg.K);
            acc3 += dot_piece(fmt, row, i + 3u * RED, x0, sg.K);
        }
    }
    if (UNROLL >= 2u) {
        for (; i + RED < n; i += 2u * RED) {
            acc += dot_piece(fmt, row, i, x0, sg.K);
            acc1 += dot_piece(fmt, row, i + RED, x0, sg.K);
        }
    }
    for (; i < n; i += RED) {
        acc += dot_piece(fmt, row, i, x0, sg.K);
    }
    return (acc + acc1) + (acc2 + acc3);
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
