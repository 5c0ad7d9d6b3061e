// norm.wgsl: LayerNorm over a token's C channels, and the GroupNorm that closes the time mix.
//
// layernorm: Y[t] = (X[s] - mean) / sqrt(var + eps) * NW + NB, s = t, or s = T - 1 when
// last_only (the head of a prefill chunk only needs the last token).
//   0 run  uniform Run            1 p  uniform NormParams {C, last_only, eps}
//   2 X    read  array<vec4<f32>> [T, C]     3 NW read array<vec4<f32>> [C] weight
//   4 NB   read  array<vec4<f32>> [C] bias   5 Y  read_write array<vec4<f32>> [T, C]
//   Dispatch: (T, 1, 1), or (1, 1, 1) when last_only; WG threads per token, RED = WG.
//
// groupnorm_out: the per-head tail of the time mix, in place on Y (head h = channels 64h..):
//   Y = (GroupNorm_h(Y) * LNW + LNB + (sum_h R * K * RK) * V) * G      (eps fixed at 64e-5)
//   0 run  uniform Run            1 p  uniform HeadParams {C}
//   2 Y    read_write array<f32> [T, C]  wkv output in, gated output out
//   3 R, 4 K, 5 V, 6 G  read array<f32> [T, C]   receptance, updated key, value, gate
//   7 LNW, 8 LNB, 9 RK  read array<f32> [C]      ln_x weight and bias, r_k
//   Dispatch: (H, T, 1), 64 threads (one per channel of the head), WG = RED = 64.
// Constants: WG, RED (reduce*.wgsl).

override WG: u32 = 256u;

struct NormParams {
    C: u32,
    last_only: u32,
    eps: f32,
}

struct HeadParams {
    C: u32,
}

const GROUP_NORM_EPS: f32 = 64e-5;  // 1e-5 * head_size_divisor^2 (8^2), not stored in files

@group(0) @binding(1) var<uniform> p: NormParams;
@group(0) @binding(2) var<storage, read> X: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> NW: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> NB: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> Y: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn layernorm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c4 = p.C >> 2u;
    let src = select(wg.x, run.T - 1u, p.last_only != 0u) * c4;
    let dst = wg.x * c4;
    var s = 0.0;
    for (var i = lid; i < c4; i += WG) {
        s += dot(X[src + i], vec4<f32>(1.0));
    }
    let mean = group_sum(s, lid) / f32(p.C);
    // Two passes (mean, then squared deviations): no cancellation when |mean| >> std.
    var ss = 0.0;
    for (var i = lid; i < c4; i += WG) {
        let d = X[src + i] - mean;
        ss += dot(d, d);
    }
    let rstd = inverseSqrt(group_sum(ss, lid) / f32(p.C) + p.eps);
    for (var i = lid; i < c4; i += WG) {
        Y[dst + i] = (X[src + i] - mean) * rstd * NW[i] + NB[i];
    }
}

@group(0) @binding(1) var<uniform> hp: HeadParams;
@group(0) @binding(2) var<storage, read_write> GY: array<f32>;
@group(0) @binding(3) var<storage, read> R: array<f32>;
@group(0) @binding(4) var<storage, read> K: array<f32>;
@group(0) @binding(5) var<storage, read> V: array<f32>;
@group(0) @binding(6) var<storage, read> G: array<f32>;
@group(0) @binding(7) var<storage, read> LNW: array<f32>;
@group(0) @binding(8) var<storage, read> LNB: array<f32>;
@group(0) @binding(9) var<storage, read> RK: array<f32>;

@compute @workgroup_size(64)
fn groupnorm_out(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c = wg.x * 64u + lid;
    let i = wg.y * hp.C + c;
    let y = GY[i];
    let mean = group_sum(y, lid) / 64.0;
    let d = y - mean;
    let rstd = inverseSqrt(group_sum(d * d, lid) / 64.0 + GROUP_NORM_EPS);
    // The bonus: each head adds its value scaled by its own r.k (weighted by r_k).
    let bonus = group_sum(R[i] * K[i] * RK[c], lid) * V[i];
    GY[i] = (d * rstd * LNW[c] + LNB[c] + bonus) * G[i];
}
