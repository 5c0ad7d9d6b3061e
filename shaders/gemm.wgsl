// gemm.wgsl: Y[t] = act(W X[t] + B) for a chunk of T tokens (prefill), W in its file format,
// dequantized as each tile is loaded.
//
// Bindings: exactly those of matvec.wgsl (same segment table, same buffers), so the engine
// builds one bind group per matrix product and picks matvec or gemm per chunk size.
//   0 run  uniform Run (T bounds the token tiles)   1 p uniform MatParams (matseg.wgsl)
//   2 W    read  array<vec4<u32>>  weights, FMT     3 X read array<vec4<f32>> inputs
//   4 B    read  array<f32> biases                  5 Y read_write array<f32> outputs
// Dispatch: (sum over segments of ceil(rows / 64), ceil(T / 64), 1); 256 threads = 16 x 16,
// each owning a 4 x 4 block of a 64-row x 64-token output tile (tiles never straddle segments).
// K advances 16 columns per step through workgroup memory: each weight is loaded and decoded
// once per 64 tokens instead of once per token. Needs K % 16 == 0 (the engine checks K % 32).
// Constants: FMT (weights.wgsl; FMT_PER_SEGMENT for mixed stacks).

const TILE: u32 = 64u;   // rows of W and tokens per output tile
const TK: u32 = 16u;     // columns per step

@group(0) @binding(1) var<uniform> p: MatParams;
@group(0) @binding(2) var<storage, read> W: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> X: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> B: array<f32>;
@group(0) @binding(5) var<storage, read_write> Y: array<f32>;

// Both tiles are stored k-major, 4 rows (tokens) per vec4: tile[k * 16 + i] holds rows
// 4i..4i+3 at column k, so the inner loop reads one vec4 of rows and one of tokens per k.
var<workgroup> w_tile: array<vec4<f32>, 256>;
var<workgroup> x_tile: array<vec4<f32>, 256>;

@compute @workgroup_size(256)
fn gemm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let sg = p.seg[find_seg(wg.x, true)];
    let m0 = (wg.x - sg.tile_start) * TILE;
    let t0 = wg.y * TILE;
    let tx = lid & 15u;   // owns tokens t0 + 4 tx + j
    let ty = lid >> 4u;   // owns rows m0 + 4 ty + i
    // Loader role: one row (or token) and 4 consecutive columns of the 64 x 16 tile.
    let lr = lid >> 2u;
    let lk = (lid & 3u) * 4u;
    let m_load = m0 + lr;
    let t_load = t0 + lr;
    let x_row = (sg.x_off + t_load * sg.K) >> 2u;
    let fmt = seg_fmt(sg);

    var acc: array<vec4<f32>, 4>;   // acc[i][j]: row 4 ty + i, token 4 tx + j
    for (var k0 = 0u; k0 < sg.K; k0 += TK) {
        var wv = vec4<f32>(0.0);
        if (m_load < sg.rows) {
            wv = load4(fmt, sg.w_base + m_load * sg.row_words, k0 + lk);
        }
        var xv = vec4<f32>(0.0);
        if (t_load < run.T) {
            xv = X[x_row + ((k0 + lk) >> 2u)];
        }
        for (var c = 0u; c < 4u; c++) {
            w_tile[(lk + c) * 16u + (lr >> 2u)][lr & 3u] = wv[c];
            x_tile[(lk + c) * 16u + (lr >> 2u)][lr & 3u] = xv[c];
        }
        workgroupBarrier();
        for (var k = 0u; k < TK; k++) {
            let a = w_tile[k * 16u + ty];
            let b = x_tile[k * 16u + tx];
            acc[0] += a.x * b;
            acc[1] += a.y * b;
            acc[2] += a.z * b;
            acc[3] += a.w * b;
        }
        workgroupBarrier();
    }

    for (var i = 0u; i < 4u; i++) {
        let m = m0 + 4u * ty + i;
        for (var j = 0u; j < 4u; j++) {
            let t = t0 + 4u * tx + j;
            if (m < sg.rows && t < run.T) {
                epilogue(sg, t, m, acc[i][j]);
            }
        }
    }
}
