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
// Work split: a GROUP of `red` consecutive threads computes NR consecutive rows. Each thread
// takes every red-th piece of them (neighbouring threads read neighbouring pieces, so loads
// coalesce), loads the x of a piece once for the NR rows (quants_dot.wgsl says why), and the
// group sums its NR partials with one group_sum4 (reduce*.wgsl). `red` is per segment, the
// table's Seg.red (<= RED; kernels.MatvecShape picks it from the segment's pieces per row, so
// a matrix is summed the same way in every dispatch it is part of); a workgroup holds WG / red
// groups, i.e. WG / red * NR rows of one segment.
// Dispatch: (sum over segments of ceil(rows / (WG / red * NR)), T, 1).
// red = 1 is the register-blocked variant (NR rows per thread, no barrier) that CPU adapters
// prefer; real GPUs want red = 8..32 with a reduction.
// Constants: WG, RED (reduce*.wgsl: the widest group), NR (rows per group, 1, 2 or 4; read by
// quants_dot.wgsl too), UNROLL, FMT (weights.wgsl; FMT_PER_SEGMENT for mixed stacks).
//
// lora (the "lora" fusion, one-token steps and short chunks): each LoRA pair of a block as one
// kernel, Y = act2(W2 act1(W1 X) + B). The segment table holds pairs: segment 2j is the down
// matrix W1 (rank rows, K = C: x_off and act1 used), segment 2j + 1 the up matrix W2 (C rows,
// K = rank: y_off, y_stride, act2, bias used; wg_start counts lora workgroups of LROWS rows).
// Every workgroup of a pair first computes the whole hidden vector h = act1(W1 X[t]) into
// workgroup memory (the down matrix is small: re-reading it per workgroup costs L2 traffic,
// not DRAM), then LROWS rows of W2 h. Both phases run matvec's row loop and reduction with
// the same WG, RED, NR, UNROLL and each segment's own red, and give each row the same place
// in its group of NR, so every output is bit-identical to the two matvec dispatches.
// Dispatch: (sum over pairs of ceil(C / LROWS), T, 1). Constants: LORA (true for this entry
// point: makes xin read h), LROWS (a multiple of NR); the rank is at most LORA_MAX_RANK.

override WG: u32 = 64u;
override UNROLL: u32 = 1u;  // 1, 2 or 4 pieces per loop iteration (see row_partial)
override NR: u32 = 1u;  // rows per group of lanes: 1, 2 or 4 (the components of a vec4)

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

// The dot products of piece i (weights.wgsl) of NR rows (first words rows[r]) with the input
// whose element 0 is xin(x0) (a vec4 index): component r for row r. The x of the piece is read
// once for all rows. Pieces of the formats of quants.wgsl are decoded by quants_dot.wgsl; the
// others are one aligned vec4 of each row.
fn dot_rows(fmt: u32, rows: vec4<u32>, i: u32, x0: u32, K: u32) -> vec4<f32> {
    if (is_quant_fmt(fmt)) {
        return quant_dot(fmt, rows, i, x0, K);
    }
    var out = vec4<f32>(0.0);
    switch fmt {
        case FMT_F32: {
            let x = xin(x0 + i);
            for (var r = 0u; r < NR; r++) {
                out[r] = dot(bitcast<vec4<f32>>(W[(rows[r] >> 2u) + i]), x);
            }
        }
        case FMT_F16: {
            let xa = xin(x0 + 2u * i);
            let xb = xin(x0 + 2u * i + 1u);
            for (var r = 0u; r < NR; r++) {
                let w = W[(rows[r] >> 2u) + i];
                out[r] = dot(f16x4(w.x, w.y), xa) + dot(f16x4(w.z, w.w), xb);
            }
        }
        case FMT_BF16: {
            let xa = xin(x0 + 2u * i);
            let xb = xin(x0 + 2u * i + 1u);
            for (var r = 0u; r < NR; r++) {
                let w = W[(rows[r] >> 2u) + i];
                out[r] = dot(bf16x4(w.x, w.y), xa) + dot(bf16x4(w.z, w.w), xb);
            }
        }
        default: {  // Q8_0: vec4 i % 16 of super-block i / 16's quants (weights.wgsl), 16 elements
            let xi = x0 + 4u * i;
            let xa = xin(xi);
            let xb = xin(xi + 1u);
            let xc = xin(xi + 2u);
            let xd = xin(xi + 3u);
            for (var r = 0u; r < NR; r++) {
                let sb = (rows[r] >> 2u) + (i >> 4u) * 17u;
                let q = W[sb + 1u + (i & 15u)];
                let d = q8_0_scale(W[sb][(i >> 2u) & 3u], i >> 1u);
                out[r] = d * (dot(i8x4(q.x), xa) + dot(i8x4(q.y), xb) + dot(i8x4(q.z), xc) + dot(i8x4(q.w), xd));
            }
        }
    }
    return out;
}

// Lanes per row of a segment: its table entry, capped by RED (which makes red a constant 1 in
// the RED = 1 pipelines of CPU adapters, folding the reduction away).
fn seg_red(sg: Seg) -> u32 {
    return min(sg.red, RED);
}

@compute @workgroup_size(WG)
fn matvec(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let sg = p.seg[find_seg(wg.x, false)];
    let red = seg_red(sg);
    let lane = lid & (red - 1u);
    let m = ((wg.x - sg.wg_start) * (WG / red) + lid / red) * NR;  // the group's first row
    let t = wg.y;
    var acc = vec4<f32>(0.0);
    if (m < sg.rows) {
        acc = row_partial(sg, m, (sg.x_off + t * sg.K) >> 2u, lane, red);
    }
    let s = group_sum4(acc, lid, red);
    // lane r writes row m + r (neighbouring addresses; with red < NR lane 0 writes them all)
    for (var r = lane; r < NR; r += red) {
        if (m + r < sg.rows) {
            epilogue(sg, t, m + r, s[r]);
        }
    }
}

// This lane's part of rows m .. m + NR - 1 of segment `sg` dotted with the input from vec4
// index x0: every red-th piece, as a vec4 (component r: row m + r). Rows past the segment's end
// repeat its last row (computed, never written), so every lane runs the same loop.
// UNROLL = 2 (4): two (four) pieces per iteration into as many sums, so more loads are in
// flight per thread (what keeps a GPU's memory busy when a row has few pieces per thread);
// CPU adapters run slower with it, so it is a per-device-class constant.
fn row_partial(sg: Seg, m: u32, x0: u32, lane: u32, red: u32) -> vec4<f32> {
    let fmt = seg_fmt(sg);
    let pe = piece_elems(fmt);
    let n = (sg.K + pe - 1u) / pe;
    var rows = vec4<u32>(0u);
    for (var r = 0u; r < NR; r++) {
        rows[r] = sg.w_base + min(m + r, sg.rows - 1u) * sg.row_words;
    }
    var acc = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    var i = lane;
    if (UNROLL == 4u) {
        for (; i + 3u * red < n; i += 4u * red) {
            acc += dot_rows(fmt, rows, i, x0, sg.K);
            acc1 += dot_rows(fmt, rows, i + red, x0, sg.K);
            acc2 += dot_rows(fmt, rows, i + 2u * red, x0, sg.K);
            acc3 += dot_rows(fmt, rows, i + 3u * red, x0, sg.K);
        }
    }
    if (UNROLL >= 2u) {
        for (; i + red < n; i += 2u * red) {
            acc += dot_rows(fmt, rows, i, x0, sg.K);
            acc1 += dot_rows(fmt, rows, i + red, x0, sg.K);
        }
    }
    for (; i < n; i += red) {
        acc += dot_rows(fmt, rows, i, x0, sg.K);
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
    // phase 1: h = act1(W1 X[t]), groups of NR rows spread over the workgroup's groups of lanes
    var red = seg_red(dn);
    var lane = lid & (red - 1u);
    var first = lid / red * NR;  // the group's first row in each pass
    let x0 = (dn.x_off + t * dn.K) >> 2u;
    for (var r0 = 0u; r0 < dn.rows; r0 += WG / red * NR) {
        let r = r0 + first;
        var acc = vec4<f32>(0.0);
        if (r < dn.rows) {
            acc = row_partial(dn, r, x0, lane, red);
        }
        let s = group_sum4(acc, lid, red);
        for (var k = lane; k < NR; k += red) {
            if (r + k < dn.rows) {
                lora_h[(r + k) >> 2u][(r + k) & 3u] = activate(s[k], dn.act);
            }
        }
    }
    workgroupBarrier();
    // phase 2: LROWS rows of act2(W2 h + bias), h read through xin; the pass count is the
    // same for every thread (group_sum4 has barriers)
    x_from_h = true;
    red = seg_red(up);
    lane = lid & (red - 1u);
    first = lid / red * NR;
    let m0 = (wg.x - up.wg_start) * LROWS;
    for (var base = 0u; base < LROWS; base += WG / red * NR) {
        let mm = base + first;
        let m = m0 + mm;
        var acc = vec4<f32>(0.0);
        if (mm < LROWS && m < up.rows) {
            acc = row_partial(up, m, 0u, lane, red);
        }
        let s = group_sum4(acc, lid, red);
        for (var k = lane; k < NR; k += red) {
            if (mm + k < LROWS && m + k < up.rows) {
                epilogue(up, t, m + k, s[k]);
            }
        }
    }
}
