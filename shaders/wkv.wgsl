// wkv.wgsl: the RWKV-7 state update, sequential over the T tokens of a chunk.
//
// Per head h (state S[h] is 64 x 64 fp32, S[i][j]: i = value index, j = key index), per token:
//   sa_i = sum_j (-kk_j) S[i][j]
//   S[i][j] = S[i][j] * w_j + v_i * k_j + sa_i * (kk_j * a_j)
//   y_i = sum_j S[i][j] * r_j                      (with the updated S)
// One workgroup per head, 64 threads; thread i keeps row i of S in registers for the whole
// chunk and reads it from / writes it to the state buffer once. (Keeping the head's state in
// workgroup memory instead, loaded and stored coalesced, measured slower on an H100: 52 us
// per layer and token against 37; docs/perf-notes.md.) The token's r, w, k, -kk and
// kk*a are shared through workgroup memory (every thread needs all 64 of each).
//
// Bindings (group 0):
//   0 run  uniform Run            1 p  uniform HeadParams {C}
//   2 R    read array<f32> [T, C] receptance          3 DECAY read [T, C] w (in (0.545, 1))
//   4 K    read [T, C] updated key                    5 V read [T, C] value (after residual)
//   6 KK   read [T, C] normalised kk                  7 A read [T, C] in-context rate
//   8 S    read_write array<f32> [H, 64, 64] state    9 Y read_write [T, C] output
// Dispatch: (H, 1, 1).
//
// wkv_fused (the "wkv" fusion): kv_prep + wkv + groupnorm_out in one dispatch. Per head and
// token: the key/value updates of kv_prep (timemix.wgsl), the state update above, then the
// GroupNorm, bonus and gate of groupnorm_out (norm.wgsl); kk and the updated k and v never
// leave the workgroup. Inputs are read at offsets into the stacked projection buffers.
//   0 run  uniform Run
//   1 fp   uniform FusedParams {C; r, k, v: token-0 offsets (floats) in DOWN; w, a, vmix, g:
//          in UP; kkw, kaw, rk, lnw, lnb: offsets of k_k, k_a, r_k, ln_x weight, bias in VEC}
//   2 DOWN read array<f32>  r, k, v slots [T, C]      3 UP read  w, a, vmix, g slots [T, C]
//   4 VEC  read array<f32>  the model's 1-D vectors   5 FVF read_write [T, C] v_first
//   6 FS   read_write [H, 64, 64] state               7 FY read_write [T, C] gated output
//   8 FKK  read [T, C] normalised kk (read when PREP is false)
// Dispatch: (H, 1, 1), 64 threads (WG = RED = 64). Constants: FIRST (layer 0 sets v_first),
// PREP: true when the "kv" fusion is on too (the key/value updates happen here); false when
// the plan ran them as their own dispatches (k and v in DOWN are already updated, kk in FKK),
// so the "wkv" fusion alone is the state update + GroupNorm + bonus + gate.

const N: u32 = 64u;

override WG: u32 = 64u;
override FIRST: bool = false;
override PREP: bool = true;

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

const GROUP_NORM_EPS: f32 = 64e-5;  // 1e-5 * head_size_divisor^2 (8^2), as in norm.wgsl

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

struct FusedParams {
    C: u32,
    r: u32,
    k: u32,
    v: u32,
    w: u32,
    a: u32,
    vmix: u32,
    g: u32,
    kkw: u32,
    kaw: u32,
    rk: u32,
    lnw: u32,
    lnb: u32,
}

@group(0) @binding(1) var<uniform> fp: FusedParams;
@group(0) @binding(2) var<storage, read> DOWN: array<f32>;
@group(0) @binding(3) var<storage, read> UP: array<f32>;
@group(0) @binding(4) var<storage, read> VEC: array<f32>;
@group(0) @binding(5) var<storage, read_write> FVF: array<f32>;
@group(0) @binding(6) var<storage, read_write> FS: array<f32>;
@group(0) @binding(7) var<storage, read_write> FY: array<f32>;
@group(0) @binding(8) var<storage, read> FKK: array<f32>;

@compute @workgroup_size(64)
fn wkv_fused(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wg.x;
    let c = h * N + lid;
    let row = c * N;
    var s: array<f32, 64>;
    for (var j = 0u; j < N; j++) {
        s[j] = FS[row + j];
    }
    for (var t = 0u; t < run.T; t++) {
        let e = t * fp.C + c;
        let r = DOWN[fp.r + e];
        let k = DOWN[fp.k + e];
        var v = DOWN[fp.v + e];
        let a = UP[fp.a + e];
        var kk = 0.0;
        var kn = k;
        if (PREP) {
            // kv_prep
            let kk0 = k * VEC[fp.kkw + c];
            kk = kk0 / max(sqrt(group_sum(kk0 * kk0, lid)), 1e-12);
            kn = k * (1.0 + (a - 1.0) * VEC[fp.kaw + c]);
            if (FIRST) {
                FVF[e] = v;
            } else {
                v = v + (FVF[e] - v) * UP[fp.vmix + e];
            }
        } else {
            kk = FKK[e];
        }
        // wkv: thread lid is also row lid of the state
        r_s[lid] = r;
        w_s[lid] = UP[fp.w + e];
        k_s[lid] = kn;
        nkk_s[lid] = -kk;
        kka_s[lid] = kk * a;
        workgroupBarrier();
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
        // groupnorm_out; its group_sum barriers also keep the next token from overwriting the
        // shared vectors while a thread still reads them.
        let mean = group_sum(y, lid) / 64.0;
        let d = y - mean;
        let rstd = inverseSqrt(group_sum(d * d, lid) / 64.0 + GROUP_NORM_EPS);
        let bonus = group_sum(r * kn * VEC[fp.rk + c], lid) * v;
        FY[e] = (d * rstd * VEC[fp.lnw + c] + VEC[fp.lnb + c] + bonus) * UP[fp.g + e];
    }
    for (var j = 0u; j < N; j++) {
        FS[row + j] = s[j];
    }
}
