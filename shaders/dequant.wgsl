// dequant.wgsl: test kernels for the weight decoders (not part of the engine's plan; run by
// rwkvlab.quant_kernels for tests and checks). Prepended: weights.wgsl, quants.wgsl,
// quants_dot.wgsl.
//
// Bindings (group 0):
//   0 p  uniform DequantParams {rows, K, row_words: u32 words per row (the host's row pitch)}
//   1 W  storage, read        array<vec4<u32>>  weight rows [rows, K] in format FMT
//   2 X  storage, read        array<vec4<f32>>  one input vector [K] (dot_pieces only)
//   3 Y  storage, read_write  array<f32>        outputs
// Entries (one thread per 4 elements / per piece, 64 threads per workgroup):
//   dequant     Y[r, k] = element k of row r, as f32 [rows, K].
//               Dispatch (ceil(K / 256), rows).
//   dot_pieces  Y[r, i] = piece i of row r dotted with X [rows, quant_pieces(K)]; a thread
//               takes piece i of NR rows in one quant_dot call (rows r0 .. r0 + NR - 1, the
//               last row standing in for rows past the end, as the mat-vec does).
//               Dispatch (ceil(quant_pieces(K) / 64), ceil(rows / NR)).
// Constants: FMT (weights.wgsl; 4..7 are the formats of quants.wgsl), NR (quants_dot.wgsl).

struct DequantParams {
    rows: u32,
    K: u32,
    row_words: u32,
}

@group(0) @binding(0) var<uniform> p: DequantParams;
@group(0) @binding(1) var<storage, read> W: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> X: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> Y: array<f32>;

// quants_dot.wgsl reads its input through xin() (matvec.wgsl's LoRA fusion substitutes another
// source there); here the input is plainly X.
fn xin(i: u32) -> vec4<f32> {
    return X[i];
}

@compute @workgroup_size(64)
fn dequant(@builtin(global_invocation_id) gid: vec3<u32>) {
    let k = 4u * gid.x;
    let r = gid.y;
    if (k >= p.K || r >= p.rows) {
        return;
    }
    let v = quant_load4(FMT, r * p.row_words, k);
    let o = r * p.K + k;
    for (var c = 0u; c < 4u; c++) {
        Y[o + c] = v[c];
    }
}

override NR: u32 = 1u;

@compute @workgroup_size(64)
fn dot_pieces(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    let r0 = gid.y * NR;
    let n = quant_pieces(p.K);
    if (i >= n || r0 >= p.rows) {
        return;
    }
    var rows = vec4<u32>(0u);
    for (var r = 0u; r < NR; r++) {
        rows[r] = min(r0 + r, p.rows - 1u) * p.row_words;
    }
    let d = quant_dot(FMT, rows, i, 0u, p.K);
    for (var r = 0u; r < NR && r0 + r < p.rows; r++) {
        Y[(r0 + r) * n + i] = d[r];
    }
}
