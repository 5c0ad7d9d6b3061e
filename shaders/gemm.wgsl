// gemm.wgsl: Y[t] = act(W X[t] + B) for a chunk of T tokens (prefill), W in its file format,
// dequantized as each tile is loaded.
//
// Bindings: exactly those of matvec.wgsl (same segment table, same buffers), so the engine
// builds one bind group per matrix product and picks matvec or gemm per chunk size.
//   0 run  uniform Run (T bounds the token tiles)   1 p uniform MatParams (matseg.wgsl)
//   2 W    read  array<vec4<u32>>  weights, FMT     3 X read array<vec4<f32>> inputs
//   4 B    read  array<f32> biases                  5 Y read_write array<f32> outputs
// Dispatch: kernels.gemm_grid: (sum over segments of ceil(rows / ROWS), ceil(T / TOKENS), 1)
// workgroups of 256 threads = 16 x 16. Each workgroup computes a ROWS x TOKENS output tile
// (tiles never straddle segments: Seg.tile_start counts tiles of ROWS rows, kernels.matmul_params);
// thread (tx, ty) owns rows ty + 16 i (i < ROWS / 16) and tokens tx + 16 j (j < 4).
// Constants: FMT (weights.wgsl; FMT_PER_SEGMENT for mixed stacks), ROWS (32, 64 or 128) and
// TK (16 or 32): kernels.Tuning.gemm_rows / gemm_k. Needs K % TK == 0 (matmul_params checks
// K % 32). Workgroup memory: (ROWS + TOKENS) * (TK + 4) * 4 bytes (15 KB at 128 rows, TK 16;
// 27 KB at TK 32, which kernels.choose_tuning only picks where the device allows it).
//
// The K loop walks TK columns per step. Each step stages a ROWS x TK tile of W (decoded once
// per TOKENS tokens instead of once per token) and a TOKENS x TK tile of X in workgroup memory,
// both stored row by row ([row][k], TK + 4 floats apart): load4 returns 4 consecutive k of one
// row, so the loader writes whole vec4s and the inner loop reads whole vec4s along k. The next
// step's tiles are fetched into registers while this step's are multiplied (their memory
// latency hides behind the FMAs), which costs two barriers per step with one set of tiles.
//
// Inner loop, per 4 columns: 4 vec4 reads of X (tokens tx + 16 j) and RM vec4 reads of W (rows
// ty + 16 i) feed 16 RM FMAs (128 at 128 rows). Bank conflicts (32 banks of 4 bytes):
// the 16 lanes of a warp with different tx read X rows (TK + 4) floats apart, and 20 or 36 is
// 4 times an odd number mod 32, so any 8 consecutive lanes hit 8 different groups of 4 banks;
// the 2 values of ty in a warp read 2 W rows, broadcast to the other lanes.
//
// Accumulation order: every output is one fp32 sum over k = 0, 1, ..., K-1 (an fma per k), so
// the result does not depend on ROWS or TK (tests check bit equality between shapes).

override ROWS: u32 = 128u;            // rows of W per tile: 16 * RM
override TK: u32 = 16u;               // columns per step
override RM: u32 = ROWS / 16u;        // rows per thread: 2, 4 or 8
override KV: u32 = TK / 4u;           // vec4s per tile row and step
override STRIDE: u32 = KV + 1u;       // vec4s between tile rows: one of padding (see above)
override W_VECS: u32 = ROWS * KV;     // vec4s of a W tile
override W_SLOTS: u32 = (W_VECS + 255u) / 256u;  // of them per thread: 1, 2 or 4
const TOKENS: u32 = 64u;              // tokens per tile: 16 threads x 4 (kernels.GEMM_TOKENS)
override X_SLOTS: u32 = TOKENS * KV / 256u;      // vec4s of X per thread: 1 or 2

@group(0) @binding(1) var<uniform> p: MatParams;
@group(0) @binding(2) var<storage, read> W: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> X: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> B: array<f32>;
@group(0) @binding(5) var<storage, read_write> Y: array<f32>;

var<workgroup> w_tile: array<vec4<f32>, ROWS * STRIDE>;
var<workgroup> x_tile: array<vec4<f32>, TOKENS * STRIDE>;

// Vec4 number v of the W tile at column k0: row v / KV of the tile, columns 4 (v % KV) on;
// zero for rows past the segment (their outputs are never written).
fn fetch_w(sg: Seg, fmt: u32, m0: u32, k0: u32, v: u32) -> vec4<f32> {
    let m = m0 + v / KV;
    if (v >= W_VECS || m >= sg.rows) {
        return vec4<f32>(0.0);
    }
    return load4(fmt, sg.w_base + m * sg.row_words, k0 + 4u * (v % KV));
}

// Vec4 number v of the X tile: token t0 + v / KV; zero past run.T (never read: those rows may
// lie past the binding, and their outputs are never written).
fn fetch_x(sg: Seg, t0: u32, k0: u32, v: u32) -> vec4<f32> {
    let t = t0 + v / KV;
    if (t >= run.T) {
        return vec4<f32>(0.0);
    }
    return X[((sg.x_off + t * sg.K + k0) >> 2u) + v % KV];
}

// acc + the products over 4 columns of one W row (a: its 4 values) with 4 tokens, b[c][j] being
// column c of token j: 16 FMAs, column by column (the order of the sum over k is kept).
fn mac(acc: vec4<f32>, a: vec4<f32>, b: mat4x4<f32>) -> vec4<f32> {
    var r = fma(vec4<f32>(a.x), b[0], acc);
    r = fma(vec4<f32>(a.y), b[1], r);
    r = fma(vec4<f32>(a.z), b[2], r);
    return fma(vec4<f32>(a.w), b[3], r);
}

// The 4 outputs of row m for tokens t, t + 16, t + 32, t + 48 (those inside the segment and T).
fn store_row(sg: Seg, m: u32, t: u32, v: vec4<f32>) {
    if (m >= sg.rows) {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        if (t + 16u * j < run.T) {
            epilogue(sg, t + 16u * j, m, v[j]);
        }
    }
}

@compute @workgroup_size(256)
fn gemm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let sg = p.seg[find_seg(wg.x, true)];
    let fmt = seg_fmt(sg);
    let m0 = (wg.x - sg.tile_start) * ROWS;
    let t0 = wg.y * TOKENS;
    let tx = lid & 15u;
    let ty = lid >> 4u;

    // Registers holding the next step's tiles (loader slot s: vec4 lid + 256 s of the tile).
    // Touched once per step, so a dynamic index here costs little even if not unrolled.
    var wv: array<vec4<f32>, 4>;
    var xv: array<vec4<f32>, 2>;
    for (var s = 0u; s < W_SLOTS; s++) {
        wv[s] = fetch_w(sg, fmt, m0, 0u, lid + 256u * s);
    }
    for (var s = 0u; s < X_SLOTS; s++) {
        xv[s] = fetch_x(sg, t0, 0u, lid + 256u * s);
    }

    // acc[i][j]: row ty + 16 i, token tx + 16 j. Indexed only by constants (never by a loop
    // variable), so the compiler keeps all 32 in registers without having to unroll anything.
    var acc: array<vec4<f32>, 8>;
    for (var k0 = 0u; k0 < sg.K; k0 += TK) {
        for (var s = 0u; s < W_SLOTS; s++) {
            let v = lid + 256u * s;
            if (v < W_VECS) {
                w_tile[(v / KV) * STRIDE + v % KV] = wv[s];
            }
        }
        for (var s = 0u; s < X_SLOTS; s++) {
            let v = lid + 256u * s;
            x_tile[(v / KV) * STRIDE + v % KV] = xv[s];
        }
        workgroupBarrier();

        if (k0 + TK < sg.K) {
            for (var s = 0u; s < W_SLOTS; s++) {
                wv[s] = fetch_w(sg, fmt, m0, k0 + TK, lid + 256u * s);
            }
            for (var s = 0u; s < X_SLOTS; s++) {
                xv[s] = fetch_x(sg, t0, k0 + TK, lid + 256u * s);
            }
        }

        for (var kv = 0u; kv < KV; kv++) {
            // b[c][j]: column 4 kv + c of token tx + 16 j
            let b = transpose(mat4x4<f32>(x_tile[tx * STRIDE + kv], x_tile[(tx + 16u) * STRIDE + kv],
                                          x_tile[(tx + 32u) * STRIDE + kv], x_tile[(tx + 48u) * STRIDE + kv]));
            let w = ty * STRIDE + kv;
            let w16 = 16u * STRIDE;  // 16 rows further
            acc[0] = mac(acc[0], w_tile[w], b);
            acc[1] = mac(acc[1], w_tile[w + w16], b);
            if (RM > 2u) {
                acc[2] = mac(acc[2], w_tile[w + 2u * w16], b);
                acc[3] = mac(acc[3], w_tile[w + 3u * w16], b);
            }
            if (RM > 4u) {
                acc[4] = mac(acc[4], w_tile[w + 4u * w16], b);
                acc[5] = mac(acc[5], w_tile[w + 5u * w16], b);
                acc[6] = mac(acc[6], w_tile[w + 6u * w16], b);
                acc[7] = mac(acc[7], w_tile[w + 7u * w16], b);
            }
        }
        workgroupBarrier();
    }

    let m = m0 + ty;
    let t = t0 + tx;
    store_row(sg, m, t, acc[0]);
    store_row(sg, m + 16u, t, acc[1]);
    if (RM > 2u) {
        store_row(sg, m + 32u, t, acc[2]);
        store_row(sg, m + 48u, t, acc[3]);
    }
    if (RM > 4u) {
        store_row(sg, m + 64u, t, acc[4]);
        store_row(sg, m + 80u, t, acc[5]);
        store_row(sg, m + 96u, t, acc[6]);
        store_row(sg, m + 112u, t, acc[7]);
    }
}
