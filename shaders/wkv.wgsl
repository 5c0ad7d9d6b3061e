// wkv.wgsl: the RWKV-7 state update, sequential over the T tokens of a chunk.
//
// Per head h (state S[h] is 64 x 64 fp32, S[i][j]: i = value index, j = key index), per token:
//   sa_i = sum_j (-kk_j) S[i][j]
//   S[i][j] = S[i][j] * w_j + v_i * k_j + sa_i * (kk_j * a_j)
//   y_i = sum_j S[i][j] * r_j                      (with the updated S)
// One workgroup per head, 64 threads; thread i keeps row i of S in registers for the whole
// chunk and reads it from / writes it to the state buffer once. The token's r, w, k, -kk and
// kk*a are shared through workgroup memory (every thread needs all 64 of each).
//
// Bindings (group 0):
//   0 run  uniform Run            1 p  uniform HeadParams {C}
//   2 R    read array<f32> [T, C] receptance          3 DECAY read [T, C] w (in (0.545, 1))
//   4 K    read [T, C] updated key                    5 V read [T, C] value (after residual)
//   6 KK   read [T, C] normalised kk                  7 A read [T, C] in-context rate
//   8 S    read_write array<f32> [H, 64, 64] state    9 Y read_write [T, C] output
// Dispatch: (H, 1, 1).

const N: u32 = 64u;

struct HeadParams {
    C: u32,
}

@group(0) @binding(1) var<uniform> p: HeadParams;
@group(0) @binding(2) var<storage, read> R: array<f32>;
@group(0) @binding(3) var<storage, read> DECAY: array<f32>;
@group(0) @binding(4) var<storage, read> K: array<f32>;
@group(0) @binding(5) var<storage, read> V: array<f32>;
@group(0) @binding(6) var<storage, read> KK: array<f32>;
@group(0) @binding(7) var<storage, read> A: array<f32>;
@group(0) @binding(8) var<storage, read_write> S: array<f32>;
@group(0) @binding(9) var<storage, read_write> Y: array<f32>;

var<workgroup> r_s: array<f32, 64>;
var<workgroup> w_s: array<f32, 64>;
var<workgroup> k_s: array<f32, 64>;
var<workgroup> nkk_s: array<f32, 64>;
var<workgroup> kka_s: array<f32, 64>;

@compute @workgroup_size(64)
fn wkv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wg.x;
    let row = (h * N + lid) * N;
    var s: array<f32, 64>;
    for (var j = 0u; j < N; j++) {
        s[j] = S[row + j];
    }
    for (var t = 0u; t < run.T; t++) {
        let e = t * p.C + h * N + lid;
        r_s[lid] = R[e];
        w_s[lid] = DECAY[e];
        k_s[lid] = K[e];
        let kk = KK[e];
        nkk_s[lid] = -kk;
        kka_s[lid] = kk * A[e];
        workgroupBarrier();
        let v = V[e];
        var sa = 0.0;
        for (var j = 0u; j < N; j++) {
            sa += nkk_s[j] * s[j];
        }
        var y = 0.0;
        for (var j = 0u; j < N; j++) {
            let sj = s[j] * w_s[j] + v * k_s[j] + sa * kka_s[j];
            s[j] = sj;
            y += sj * r_s[j];
        }
        Y[e] = y;
        // The next token overwrites the shared vectors.
        workgroupBarrier();
    }
    for (var j = 0u; j < N; j++) {
        S[row + j] = s[j];
    }
}
