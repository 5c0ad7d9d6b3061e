// wkv.wgsl: the RWKV-7 state update, sequential over the T tokens of a chunk.
//
// Per head h (state S[h] is 64 x 64 fp32, S[i][j]: i = value index, j = key index), per token:
//   sa_i = sum_j (-kk_j) S[i][j]
//   S[i][j] = S[i][j] * w_j + v_i * k_j + sa_i * (kk_j * a_j)
//   y_i = sum_j S[i][j] * r_j                      (with the updated S)
//
// One workgroup per head, WG = 64 x LANES threads. Lane lid is row i = lid % 64 (also channel
// i of the head) and part q = lid / 64 of it: it keeps columns 64q/LANES .. 64(q+1)/LANES - 1
// of row i, NV4 = 16 / LANES vec4s, in registers for the whole chunk (indexed only by constant-trip loops, so
// the compiler can unroll them into registers; one 64-float row per thread, the old shape, is
// LANES = 1). sa_i and y_i are each a partial sum per lane, added over the row's LANES lanes
// through workgroup memory in a fixed order, so every lane of a row holds the same bits.
// Lanes 0..63 hold rows 0..63 in order, exactly like a 64-thread kernel: that makes the head
// sums of wkv_fused (sum64, reduce*.wgsl) reproduce kv_prep's and groupnorm_out's group_sum
// bits on both paths, which the fused plan's bit-identity with the unfused one needs (exact
// on CPU adapters; a GPU compiler contracts fma per pipeline, ~1e-6 relative on the H100:
// tests/conftest.py assert_same_plan) (on the
// native path those are subgroupAdd over lanes 0..31 and 32..63, whose order only the driver
// knows; putting a row's LANES lanes in one subgroup instead would save the sa barrier but cost
// a relayout barrier per head sum). The token's r, w, k, -kk and kk*a are staged in workgroup
// memory as vec4s; all lanes of a warp read the same ones (broadcast, no bank conflicts).
// Barriers per token: in wkv 1 (staging) + 2 (the sa and y sums; with LANES = 1 those are
// none and one after the token keeps the next staging back); in wkv_fused 1 (staging) + 1
// (kk norm, PREP) + 2 (sa, y; none with LANES = 1) + 2 (GroupNorm mean, then variance).
// (History: one 64-thread workgroup with a 64-float row per thread took 37 us per layer and
// token on an H100, the state in workgroup memory 52 us; docs/perf-notes.md change 5.)
//
// wkv, bindings (group 0):
//   0 run  uniform Run            1 p  uniform HeadParams {C}
//   2 R    read array<f32> [T, C] receptance          3 DECAY read [T, C] w (in (0.545, 1))
//   4 K    read [T, C] updated key                    5 V read [T, C] value (after residual)
//   6 KK   read [T, C] normalised kk                  7 A read [T, C] in-context rate
//   8 S    read_write array<vec4<f32>> [H, 64, 64] state    9 Y read_write [T, C] output
// Dispatch: (H, 1, 1), WG threads.
//
// wkv_fused (the "wkv" fusion): kv_prep + wkv + groupnorm_out in one dispatch. Per head and
// token: the key/value updates of kv_prep (timemix.wgsl), the state update above, then the
// GroupNorm, bonus and gate of groupnorm_out (norm.wgsl), with their formulas, eps and
// reduction bits; kk and the updated k and v never leave the workgroup. Inputs are read at
// offsets into the stacked projection buffers.
//   0 run  uniform Run
//   1 fp   uniform FusedParams {C; r, k, v: token-0 offsets (floats) in DOWN; w, a, vmix, g:
//          in UP; kkw, kaw, rk, lnw, lnb: offsets of k_k, k_a, r_k, ln_x weight, bias in VEC}
//   2 DOWN read array<f32>  r, k, v slots [T, C]      3 UP read  w, a, vmix, g slots [T, C]
//   4 VEC  read array<f32>  the model's 1-D vectors   5 FVF read_write [T, C] v_first
//   6 FS   read_write array<vec4<f32>> [H, 64, 64] state   7 FY read_write [T, C] gated output
//   8 FKK  read [T, C] normalised kk (read when PREP is false)
// Dispatch: (H, 1, 1), WG threads. Constants: FIRST (layer 0 sets v_first), PREP: true when
// the "kv" fusion is on too (the key/value updates happen here); false when the plan ran them
// as their own dispatches (k and v in DOWN are already updated, kk in FKK), so the "wkv"
// fusion alone is the state update + GroupNorm + bonus + gate.
//
// Constants of both: WG = 64 x LANES, LANES = 1, 2, 4, 8 or 16 (kernels.Tuning.wkv_wg); RED
// (reduce*.wgsl: group_sum is not used here, sum64 is). Inputs of token t + 1 are loaded
// while token t runs (its barriers hide their latency in a prefill chunk).

const N: u32 = 64u;

override WG: u32 = 256u;
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
@group(0) @binding(8) var<storage, read_write> S: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read_write> Y: array<f32>;

// The token's vectors over the head's 64 columns (vec4 m = columns 4m..4m+3).
var<workgroup> r_s: array<vec4<f32>, 16>;
var<workgroup> w_s: array<vec4<f32>, 16>;
var<workgroup> k_s: array<vec4<f32>, 16>;
var<workgroup> nkk_s: array<vec4<f32>, 16>;
var<workgroup> kka_s: array<vec4<f32>, 16>;
// Per-lane partial sums of sa_i and y_i (lane lid at lid: a row's lanes are 64 apart).
var<workgroup> sa_part: array<f32, WG>;
var<workgroup> y_part: array<f32, WG>;

const GROUP_NORM_EPS: f32 = 64e-5;  // 1e-5 * head_size_divisor^2 (8^2), as in norm.wgsl

// vec4s of a state row per lane (NV4 in the header).
fn row_vec4s() -> u32 {
    return (N / 4u) / (WG / N);
}

// Channel i's values of the token, into the staged vectors (lanes of part 0 only).
fn stage(i: u32, r: f32, w: f32, k: f32) {
    r_s[i >> 2u][i & 3u] = r;
    w_s[i >> 2u][i & 3u] = w;
    k_s[i >> 2u][i & 3u] = k;
}

fn stage_kk(i: u32, kk: f32, a: f32) {
    nkk_s[i >> 2u][i & 3u] = -kk;
    kka_s[i >> 2u][i & 3u] = kk * a;
}

// The sum of row i's LANES partials, part 0's first (the same bits in every lane of the row),
// through sa_part (into_sa) or y_part: one barrier, none when LANES = 1.
fn row_sum(part: f32, lid: u32, into_sa: bool) -> f32 {
    if (WG == N) {
        return part;
    }
    let i = lid % N;
    var total = 0.0;
    if (into_sa) {
        sa_part[lid] = part;
        workgroupBarrier();
        total = sa_part[i];
        for (var l = N; l < WG; l += N) {
            total += sa_part[l + i];
        }
    } else {
        y_part[lid] = part;
        workgroupBarrier();
        total = y_part[i];
        for (var l = N; l < WG; l += N) {
            total += y_part[l + i];
        }
    }
    return total;
}

// One token of the state update for this lane's part of row i: reads the staged vectors
// (which must be written and behind a barrier), updates s, returns y_i. Both entry points run
// it, so wkv and wkv_fused compute the state and y with the same bits. With LANES = 1 it has
// no barrier: the caller must put one between this and the next token's staging.
fn state_step(s: ptr<function, array<vec4<f32>, 16>>, v: f32, lid: u32) -> f32 {
    let nv4 = row_vec4s();
    let base = (lid / N) * nv4;
    var sa4 = vec4<f32>(0.0);
    for (var m = 0u; m < nv4; m++) {
        sa4 += nkk_s[base + m] * (*s)[m];
    }
    let sa = row_sum((sa4.x + sa4.y) + (sa4.z + sa4.w), lid, true);
    var y4 = vec4<f32>(0.0);
    for (var m = 0u; m < nv4; m++) {
        let sm = (*s)[m] * w_s[base + m] + v * k_s[base + m] + sa * kka_s[base + m];
        (*s)[m] = sm;
        y4 += sm * r_s[base + m];
    }
    return row_sum((y4.x + y4.y) + (y4.z + y4.w), lid, false);
}

struct WkvIn {
    r: f32,
    w: f32,
    k: f32,
    v: f32,
    kk: f32,
    a: f32,
}

fn wkv_in(e: u32) -> WkvIn {
    return WkvIn(R[e], DECAY[e], K[e], V[e], KK[e], A[e]);
}

@compute @workgroup_size(WG)
fn wkv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = lid % N;
    let c = wg.x * N + i;
    let nv4 = row_vec4s();
    let first = c * (N / 4u) + (lid / N) * nv4;  // this lane's first vec4 of the state
    var s: array<vec4<f32>, 16>;
    for (var m = 0u; m < nv4; m++) {
        s[m] = S[first + m];
    }
    var next = wkv_in(c);
    for (var t = 0u; t < run.T; t++) {
        let x = next;
        if (t + 1u < run.T) {
            next = wkv_in((t + 1u) * p.C + c);
        }
        if (lid < N) {
            stage(i, x.r, x.w, x.k);
            stage_kk(i, x.kk, x.a);
        }
        workgroupBarrier();
        let y = state_step(&s, x.v, lid);
        if (lid < N) {
            Y[t * p.C + c] = y;
        }
        if (WG == N) {
            // state_step had no barrier: every row must have read the staged vectors first.
            workgroupBarrier();
        }
    }
    for (var m = 0u; m < nv4; m++) {
        S[first + m] = s[m];
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
@group(0) @binding(6) var<storage, read_write> FS: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read_write> FY: array<f32>;
@group(0) @binding(8) var<storage, read> FKK: array<f32>;

// sum64 slots (reduce*.wgsl) of wkv_fused's four head sums.
const SUM_KK: u32 = 0u;     // kk0^2: kv_prep's L2 norm
const SUM_BONUS: u32 = 1u;  // r * k * r_k: groupnorm_out's bonus
const SUM_MEAN: u32 = 2u;   // y
const SUM_VAR: u32 = 3u;    // (y - mean)^2

struct FusedIn {
    r: f32,
    k: f32,
    v: f32,
    a: f32,
    w: f32,
    g: f32,
    vmix: f32,  // 0 unless PREP and not FIRST
    vf: f32,    // v_first, 0 unless PREP and not FIRST
    kk: f32,    // normalised kk from FKK, 0 when PREP
}

fn fused_in(e: u32) -> FusedIn {
    var x = FusedIn(DOWN[fp.r + e], DOWN[fp.k + e], DOWN[fp.v + e], UP[fp.a + e], UP[fp.w + e],
                    UP[fp.g + e], 0.0, 0.0, 0.0);
    if (PREP && !FIRST) {
        x.vmix = UP[fp.vmix + e];
        x.vf = FVF[e];
    }
    if (!PREP) {
        x.kk = FKK[e];
    }
    return x;
}

@compute @workgroup_size(WG)
fn wkv_fused(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = lid % N;
    let c = wg.x * N + i;
    let nv4 = row_vec4s();
    let first = c * (N / 4u) + (lid / N) * nv4;
    let kkw = VEC[fp.kkw + c];
    let kaw = VEC[fp.kaw + c];
    let rk = VEC[fp.rk + c];
    let lnw = VEC[fp.lnw + c];
    let lnb = VEC[fp.lnb + c];
    var s: array<vec4<f32>, 16>;
    for (var m = 0u; m < nv4; m++) {
        s[m] = FS[first + m];
    }
    var next = fused_in(c);
    for (var t = 0u; t < run.T; t++) {
        let e = t * fp.C + c;
        let x = next;
        if (t + 1u < run.T) {
            next = fused_in(e + fp.C);
        }
        // kv_prep's updates of k and v (with PREP false the plan has done them already)
        var kn = x.k;
        var v = x.v;
        if (PREP) {
            kn = x.k * (1.0 + (x.a - 1.0) * kaw);
            if (!FIRST) {
                v = v + (x.vf - v) * x.vmix;
            }
        }
        if (lid < N) {
            stage(i, x.r, x.w, kn);
            if (PREP && FIRST) {
                FVF[e] = v;
            }
        }
        // The head sums: every lane puts (subgroup operations), only the channel lanes 0..63
        // read (nothing else needs them; on the webgpu path a read is 16 vec4 loads and adds).
        sum64_put(SUM_BONUS, x.r * kn * rk, lid);
        var kk = x.kk;
        if (PREP) {
            // kv_prep's L2 normalisation per head, floored like torch's F.normalize
            let kk0 = x.k * kkw;
            sum64_put(SUM_KK, kk0 * kk0, lid);
            workgroupBarrier();
            if (lid < N) {
                kk = kk0 / max(sqrt(sum64(SUM_KK)), 1e-12);
            }
        }
        if (lid < N) {
            stage_kk(i, kk, x.a);
        }
        workgroupBarrier();
        var bonus = 0.0;
        if (lid < N) {
            bonus = sum64(SUM_BONUS) * v;  // read now: the next token puts it before any barrier
        }
        let y = state_step(&s, v, lid);
        // groupnorm_out. Its two barriers also keep the next token's staging from overwriting
        // vectors a lane still reads (state_step has none when LANES = 1).
        sum64_put(SUM_MEAN, y, lid);
        workgroupBarrier();
        var d = 0.0;
        if (lid < N) {
            d = y - sum64(SUM_MEAN) / 64.0;
        }
        sum64_put(SUM_VAR, d * d, lid);
        workgroupBarrier();
        if (lid < N) {
            let rstd = inverseSqrt(sum64(SUM_VAR) / 64.0 + GROUP_NORM_EPS);
            FY[e] = (d * rstd * lnw + lnb + bonus) * x.g;
        }
    }
    for (var m = 0u; m < nv4; m++) {
        FS[first + m] = s[m];
    }
}
