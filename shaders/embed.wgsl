// embed.wgsl: Y[t] = LayerNorm(row TOK[t] of the embedding, dequantized; token_embd_norm).
//
// The token ids come from a GPU buffer: written by the host for a prefill, written by
// argmax.wgsl during generation (so a generated token never travels to the CPU and back).
// When the embedding is split into row ranges (bindings over 128 MiB on some devices), one
// dispatch runs per piece and only the piece that holds the row writes Y[t].
//
// Bindings (group 0):
//   0 run  uniform Run            1 p  uniform EmbedParams {C, row0, rows, row_words, w_base, eps}
//   2 W    read array<vec4<u32>>  embedding rows [row0, row0 + rows) from word w_base, format FMT
//   3 TOK  read array<u32> [T]    token ids
//   4 NW   read array<vec4<f32>> [C]   5 NB read array<vec4<f32>> [C]   LayerNorm weight, bias
//   6 Y    read_write array<vec4<f32>> [T, C]
// Dispatch: (T, 1, 1) per piece, WG threads per token, RED = WG.
// Constants: WG, RED (reduce*.wgsl), FMT (weights.wgsl).

override WG: u32 = 256u;

struct EmbedParams {
    C: u32,
    row0: u32,
    rows: u32,
    row_words: u32,
    w_base: u32,
    eps: f32,
}

@group(0) @binding(1) var<uniform> p: EmbedParams;
@group(0) @binding(2) var<storage, read> W: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> TOK: array<u32>;
@group(0) @binding(4) var<storage, read> NW: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> NB: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> Y: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn embed(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wg.x;
    let tok = TOK[t];
    // Not an early return: group_sum's barriers need every thread of the workgroup.
    let own = tok >= p.row0 && tok - p.row0 < p.rows;
    let row = p.w_base + (tok - p.row0) * p.row_words;
    let c4 = p.C >> 2u;
    let base = t * c4;
    var s = 0.0;
    if (own) {
        for (var i = lid; i < c4; i += WG) {
            let v = load4(FMT, row, 4u * i);
            Y[base + i] = v;
            s += dot(v, vec4<f32>(1.0));
        }
    }
    let mean = group_sum(s, lid) / f32(p.C);
    var ss = 0.0;
    if (own) {
        for (var i = lid; i < c4; i += WG) {
            let d = Y[base + i] - mean;
            ss += dot(d, d);
        }
    }
    let rstd = inverseSqrt(group_sum(ss, lid) / f32(p.C) + p.eps);
    if (own) {
        for (var i = lid; i < c4; i += WG) {
            Y[base + i] = (Y[base + i] - mean) * rstd * NW[i] + NB[i];
        }
    }
}
