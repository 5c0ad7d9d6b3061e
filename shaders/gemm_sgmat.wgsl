// gemm_sgmat.wgsl: Y[t] = act(W X[t] + B) for a chunk of T tokens (prefill) on the matrix units
// (tensor cores) through Dawn's subgroup matrices: f16 x f16 products, f32 accumulation. W in its
// file format, dequantized to f16 as each tile is staged; X rounded to f16 as it is staged.
//
// Bindings, params, segment table and epilogue: exactly those of gemm.wgsl and matvec.wgsl
// (matseg.wgsl, weights.wgsl, quants.wgsl), so the engine swaps this kernel in with the same bind
// group (kernels.GEMM_SGMAT, Tuning.gemm_sgmat).
//   0 run  uniform Run (T bounds the token tiles)   1 p uniform MatParams (matseg.wgsl)
//   2 W    read  array<vec4<u32>>  weights, FMT     3 X read array<vec4<f32>> inputs
//   4 B    read  array<f32> biases                  5 Y read_write array<f32> outputs
// Needs: enable f16, subgroups and chromium_experimental_subgroup_matrix (kernels.py adds them).
// Dispatch: kernels.gemm_grid(tiles, T, TOKENS): (sum over segments of ceil(rows / ROWS),
// ceil(T / TOKENS), 1) workgroups of WG = 4 subgroups. Each workgroup computes a TOKENS x ROWS
// output tile (tiles never straddle segments: Seg.tile_start counts tiles of ROWS rows).
//
// Constants. SM, SN, SK: the subgroup-matrix shape, an f16 x f16 -> f32 config the adapter
// reports (left SM x SK, right SK x SN, result SM x SN; kernels.choose_sgmat_config picks it,
// nothing here assumes a vendor). TOKENS, ROWS: the output tile (Tuning.sgmat_tokens / _rows).
// WG: 4 x the subgroup size. Tint needs matrix shapes, and the sizes of the workgroup arrays
// subgroupMatrixLoad reads, as creation-time constants, not overrides: these `const` lines are
// rewritten by kernels.py (KernelSpec.baked) with the pipeline's values, one module per shape.
// FMT stays an override (weights.wgsl). K % TK == 0 (matmul_params checks K % 32).
//
// Layout. Subgroup s (subgroup_id) owns a (TOKENS / 2) x (ROWS / 2) quarter of the tile: tokens
// half s % 2, rows half s / 2, held as AT x AR result matrices of SM x SN (2 x 2 of 16 x 16 at
// 64 x 64). Left operand = X (tokens x K, row-major in x_tile), right = W^T: the W tile holds
// weight rows as rows ([row][k]), which as a K x SN right matrix is column-major (col_major =
// true). Both tiles keep TK + 8 halves per row: the 16 bytes of padding put the 8 rows an
// 8 x 16-byte matrix load touches on 8 different groups of 4 banks (stride 80 bytes).
//
// K loop, per step of TK = 32 columns: the next step's values were fetched into registers (f32)
// while the previous step's products ran; they are scaled (see below), rounded to f16 and stored
// into the tiles; then every subgroup multiplies its part over TK / SK matrix steps. Two
// barriers per step, one set of tiles.
//
// OVERFLOW. f16 tops out at 65504: relu(k)^2 feeding ffn.value, or a quant's scale times its
// quants, can exceed it, and would stage as inf. So each step takes the maximum |x| and |w| of
// what it stages (subgroupMax, then one slot per subgroup in workgroup memory, read by every
// thread after the barrier that ends the previous step). When one of them is >= 2^15
// (LIMIT_EXP), the step stages X times 2^-e and W times 2^e, e the power of two that brings the
// big side under 2^15 (negative when W is the big side): the products X W^T are unchanged, so
// the accumulators need no rescaling at all (the staging is plain data, the same e in every
// thread; no matrix-scalar operation and no extra barrier). Powers of two are exact, so the only
// cost in accuracy is that small values of the scaled-down side, in the same tile step as a
// huge one, are rounded on a coarser grid (values >= 2^(e-14) keep f16's 11 bits). It works while
// max|x| * max|w| < 2^30 per tile step (1e6 activations against weights up to 1e3); beyond that
// one side still overflows to inf and the outputs are inf / NaN (a check fails loudly rather
// than passing wrong numbers). Steps without a big value (every step of a normal model) have
// e = 0. Tiny values are not scaled up: below 2^-14 f16 is subnormal, an absolute error under
// 2^-25 per element, negligible against an output's sum |w x| for the activations a model feeds.
// (The first version scaled the accumulators instead, acc *= 2^-e; acc += X' W'^T; acc *= 2^e
// with subgroupMatrixScalarMultiply behind a workgroupUniformLoad branch; it failed this check
// on an H200, wgpudawn 0.32.0.4. Moving the factor into the other operand needs neither.)
//
// Accuracy (gemm_bench's tolerance): each product uses x and w rounded to f16 (relative error
// <= 2^-11 each), summed in f32, so |error| <= (2^-10 + 2^-22 + K 2^-24) sum_k |w_k x_k| in the
// worst case (1.6e-3 at K = 10240), ~2^-11 sqrt(K)-like in practice.
//
// Measured (H200, Dawn through wgpudawn 0.32.0.4, gemm_bench --sgmat at T = 512, Q8_0 2.9B
// shapes; data/benchmarks/nvidia-h200.md): correct on every config and tile, incl. activations of
// 1e5-1e6 (errors 0.02-0.08 of the tolerance), but no faster than the fp32 gemm: 16x16x16 in
// 64 x 64 tiles 21.7 / 23.1 / 22.1 TFLOP/s (att.out / ffn.key / ffn.value; gemm 22.4 / 24.5 /
// 21.9), 16x8x16 about the same, 16x8x8 and 128-wide tiles slower (10-18). Per 32-column step a
// workgroup stages 4096 values (load, dequantize, max, convert, scalar f16 store) for 32 matrix
// products: the staging, not the matrix units, sets the pace. Where to go: X staged as f16 by
// its producer (a copy, no conversion or maxima in the loop), W pre-dequantized to f16 for
// prefill, wider K steps (fewer barriers per product), double-buffered tiles.
//
// Epilogue: each result matrix is stored to the subgroup's 16 x 16 f32 slot in workgroup memory
// (subgroupMatrixStore), and the subgroup's lanes apply epilogue() (bias, activation, residual
// add) element by element, skipping tokens >= run.T and rows past the segment.

const SM: u32 = 16u;        // baked: result rows (tokens) per matrix
const SN: u32 = 16u;        // baked: result columns (weight rows) per matrix
const SK: u32 = 16u;        // baked: K per matrix step
const TOKENS: u32 = 64u;    // baked: tokens per output tile
const ROWS: u32 = 64u;      // baked: weight rows per output tile
const WG: u32 = 128u;       // baked: threads per workgroup, 4 subgroups

const TK: u32 = 32u;                          // columns per staged step (kernels.SGMAT_TK)
const SGT: u32 = 2u;                          // subgroups along tokens
const SGR: u32 = 2u;                          // subgroups along rows
const SUBGROUPS: u32 = SGT * SGR;             // kernels.SGMAT_SUBGROUPS
const AT: u32 = TOKENS / (SGT * SM);          // result matrices per subgroup along tokens
const AR: u32 = ROWS / (SGR * SN);            // ... along rows
const NACC: u32 = AT * AR;
const XS: u32 = TK + 8u;                      // halves between tile rows (16 bytes of padding)
const KV: u32 = TK / 4u;                      // vec4s per tile row and step
const X_VECS: u32 = TOKENS * KV;
const W_VECS: u32 = ROWS * KV;
const X_SLOTS: u32 = (X_VECS + WG - 1u) / WG;  // vec4s of X per thread and step
const W_SLOTS: u32 = (W_VECS + WG - 1u) / WG;
const LIMIT_EXP: i32 = 15;                    // staged |values| stay below 2^15 (f16 max 65504)

@group(0) @binding(1) var<uniform> p: MatParams;
@group(0) @binding(2) var<storage, read> W: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> X: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> B: array<f32>;
@group(0) @binding(5) var<storage, read_write> Y: array<f32>;

var<workgroup> x_tile: array<f16, TOKENS * XS>;
var<workgroup> w_tile: array<f16, ROWS * XS>;
var<workgroup> out_tile: array<f32, SUBGROUPS * SM * SN>;
var<workgroup> sg_max: array<vec2<f32>, SUBGROUPS>;   // (max |x|, max |w|) per subgroup

// Vec4 number v of the W tile at column k0: row v / KV, columns 4 (v % KV) on; zero for rows
// past the segment (their outputs are never written).
fn fetch_w(sg: Seg, fmt: u32, m0: u32, k0: u32, v: u32) -> vec4<f32> {
    let m = m0 + v / KV;
    if (v >= W_VECS || m >= sg.rows) {
        return vec4<f32>(0.0);
    }
    return load4(fmt, sg.w_base + m * sg.row_words, k0 + 4u * (v % KV));
}

// Vec4 number v of the X tile: token t0 + v / KV; zero past run.T (those rows may lie past
// the binding, and their outputs are never written).
fn fetch_x(sg: Seg, t0: u32, k0: u32, v: u32) -> vec4<f32> {
    let t = t0 + v / KV;
    if (v >= X_VECS || t >= run.T) {
        return vec4<f32>(0.0);
    }
    return X[((sg.x_off + t * sg.K + k0) >> 2u) + v % KV];
}

fn max_abs4(v: vec4<f32>) -> f32 {
    let a = abs(v);
    return max(max(a.x, a.y), max(a.z, a.w));
}

// How many powers of two m is over the limit: 0 when m < 2^LIMIT_EXP. floor(log2 m) comes
// from the exponent bits (m >= 0; infinity gives 114).
fn excess(m: f32) -> i32 {
    let e = i32(bitcast<u32>(m) >> 23u) - 127;
    return max(e + 1 - LIMIT_EXP, 0);
}

// 2^e, exactly, for -126 <= e <= 127.
fn pow2(e: i32) -> f32 {
    return bitcast<f32>(u32(127 + e) << 23u);
}

@compute @workgroup_size(WG)
fn gemm_sgmat(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32,
              @builtin(subgroup_id) sg_id: u32, @builtin(num_subgroups) n_sg: u32,
              @builtin(subgroup_invocation_id) lane: u32, @builtin(subgroup_size) sg_size: u32) {
    let sg = p.seg[find_seg(wg.x, true)];
    let fmt = seg_fmt(sg);
    let m0 = (wg.x - sg.tile_start) * ROWS;
    let t0 = wg.y * TOKENS;
    // This subgroup's quarter of the tile. A driver that made other than 4 subgroups (a subgroup
    // size other than the probed one) would leave parts uncomputed: the outputs are NaN then,
    // so a check fails loudly instead of passing wrong numbers.
    let me = min(sg_id, SUBGROUPS - 1u);
    let tb = (me % SGT) * (AT * SM);  // first token of the quarter, in the tile
    let rb = (me / SGT) * (AR * SN);  // first row of the quarter
    let layout_ok = n_sg == SUBGROUPS;

    var xv: array<vec4<f32>, X_SLOTS>;
    var wv: array<vec4<f32>, W_SLOTS>;
    var mx = 0.0;
    var mw = 0.0;
    for (var s = 0u; s < X_SLOTS; s++) {
        xv[s] = fetch_x(sg, t0, 0u, lid + WG * s);
        mx = max(mx, max_abs4(xv[s]));
    }
    for (var s = 0u; s < W_SLOTS; s++) {
        wv[s] = fetch_w(sg, fmt, m0, 0u, lid + WG * s);
        mw = max(mw, max_abs4(wv[s]));
    }

    var acc: array<subgroup_matrix_result<f32, SN, SM>, NACC>;
    for (var k0 = 0u; k0 < sg.K; k0 += TK) {
        // The step's maxima: per subgroup, then over the 4 slots once all are written. This
        // barrier also ends every subgroup's products of the previous step (tiles are free).
        let m = subgroupMax(vec2<f32>(mx, mw));
        if (lane == 0u) {
            sg_max[me] = m;
        }
        workgroupBarrier();
        var big = sg_max[0];
        for (var s = 1u; s < SUBGROUPS; s++) {
            big = max(big, sg_max[s]);
        }
        let e = excess(big.x) - excess(big.y);  // X staged times 2^-e, W times 2^e
        let sx = pow2(-e);
        let sw = pow2(e);
        for (var s = 0u; s < X_SLOTS; s++) {
            let v = lid + WG * s;
            if (v < X_VECS) {
                let h = vec4<f16>(xv[s] * sx);
                let o = (v / KV) * XS + 4u * (v % KV);
                x_tile[o] = h.x;
                x_tile[o + 1u] = h.y;
                x_tile[o + 2u] = h.z;
                x_tile[o + 3u] = h.w;
            }
        }
        for (var s = 0u; s < W_SLOTS; s++) {
            let v = lid + WG * s;
            if (v < W_VECS) {
                let h = vec4<f16>(wv[s] * sw);
                let o = (v / KV) * XS + 4u * (v % KV);
                w_tile[o] = h.x;
                w_tile[o + 1u] = h.y;
                w_tile[o + 2u] = h.z;
                w_tile[o + 3u] = h.w;
            }
        }
        workgroupBarrier();

        // The next step's values, fetched while this step's products run.
        if (k0 + TK < sg.K) {
            mx = 0.0;
            mw = 0.0;
            for (var s = 0u; s < X_SLOTS; s++) {
                xv[s] = fetch_x(sg, t0, k0 + TK, lid + WG * s);
                mx = max(mx, max_abs4(xv[s]));
            }
            for (var s = 0u; s < W_SLOTS; s++) {
                wv[s] = fetch_w(sg, fmt, m0, k0 + TK, lid + WG * s);
                mw = max(mw, max_abs4(wv[s]));
            }
        }

        for (var kk = 0u; kk < TK; kk += SK) {
            var left: array<subgroup_matrix_left<f16, SK, SM>, AT>;
            for (var i = 0u; i < AT; i++) {
                left[i] = subgroupMatrixLoad<subgroup_matrix_left<f16, SK, SM>>(
                    &x_tile, (tb + i * SM) * XS + kk, false, XS);
            }
            for (var j = 0u; j < AR; j++) {
                let right = subgroupMatrixLoad<subgroup_matrix_right<f16, SN, SK>>(
                    &w_tile, (rb + j * SN) * XS + kk, true, XS);
                for (var i = 0u; i < AT; i++) {
                    acc[i * AR + j] = subgroupMatrixMultiplyAccumulate(left[i], right, acc[i * AR + j]);
                }
            }
        }
    }

    // Epilogue, one result matrix at a time through the subgroup's slot (row-major [token][row]:
    // consecutive lanes write consecutive rows of Y).
    let slot = me * SM * SN;
    let nan = bitcast<f32>(0x7fc00000u | (n_sg & 0u));  // at run time: a NaN constant does not compile
    for (var i = 0u; i < AT; i++) {
        for (var j = 0u; j < AR; j++) {
            subgroupMatrixStore(&out_tile, slot, acc[i * AR + j], false, SN);
            workgroupBarrier();
            for (var q = lane; q < SM * SN; q += sg_size) {
                let t = t0 + tb + i * SM + q / SN;
                let m = m0 + rb + j * SN + q % SN;
                if (t < run.T && m < sg.rows) {
                    epilogue(sg, t, m, select(nan, out_tile[slot + q], layout_ok));
                }
            }
            workgroupBarrier();
        }
    }
}
