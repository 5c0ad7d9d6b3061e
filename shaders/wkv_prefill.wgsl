// wkv_prefill.wgsl: the RWKV-7 state update over a prefill chunk, spread over the whole GPU
// (native path: needs subgroup operations; the engine runs it for chunks of T > 1 tokens).
//
// The recurrence of wkv.wgsl, per head h, row i (value index) and token:
//   sa_i = sum_j (-kk_j) S[i][j]
//   S[i][j] = S[i][j] * w_j + v_i * k_j + sa_i * (kk_j * a_j)
//   y_i = sum_j S[i][j] * r_j                      (with the updated S)
// Given the token's vectors the 64 rows of a head are independent: only the GroupNorm of y
// needs the whole head, and groupnorm_out (norm.wgsl) does it after this dispatch. So rows,
// not heads, are spread over workgroups: H x 64 rows (2560 on a 2.9B model) instead of the
// H workgroups of wkv / wkv_fused (40 on 132 SMs), each latency bound on its own chain.
//
// Row c = 64h + i (also channel c) belongs to LANES consecutive lanes of one subgroup; lane q of
// the row keeps its vec4s q, q + LANES, ... (16 / LANES of them) in registers for the whole
// chunk. sa_i and y_i are butterfly sums over the row's lanes (subgroupShuffleXor by
// LANES / 2, ..., 1): no barrier and no workgroup memory on the per-token chain, and every lane
// of the row ends with the same bits (x + y == y + x). LANES <= the subgroup size (kernels.py
// checks it), so a row never straddles subgroups; LANES = 1 is a whole row per lane.
// A workgroup is ROWS = WG / LANES consecutive rows of one head (ROWS divides 64). The head's
// token vectors are staged in workgroup memory BLOCK = WG / 16 tokens at a time, each thread one
// vec4 of each vector: the next block is loaded into registers while this one runs, so the
// global load latency is off the chain and costs 2 barriers per BLOCK tokens; each row's lanes
// then read the staged vec4s (the rows of a workgroup read the same ones: broadcasts).
// The state update and y are wkv's formulas in another summation order (y and the new state
// differ from wkv's in the last bits; both plans, fused and unfused, run this kernel for T > 1,
// so they still agree bit for bit).
//
// Bindings (group 0), those of wkv:
//   0 run  uniform Run            1 p  uniform HeadParams {C}
//   2 R    read array<vec4<f32>> [T, C] receptance   3 DECAY read [T, C] w (in (0.545, 1))
//   4 K    read [T, C] updated key                    5 V read [T, C] value (after residual)
//   6 KK   read [T, C] normalised kk                  7 A read [T, C] in-context rate
//   8 S    read_write array<vec4<f32>> [H, 64, 64] state    9 Y read_write array<f32> [T, C]
// Dispatch: (C / ROWS, 1, 1), WG = ROWS x LANES threads (kernels.wkv_prefill_grid).
// Constants: WG (16..256: ROWS <= 64 rows of 1, 2, 4, 8 or 16 lanes; kernels.Tuning.wkv_rows,
// wkv_lanes), LANES.

const N: u32 = 64u;
const NV4: u32 = 16u;  // vec4s per state row

override WG: u32 = 128u;
override LANES: u32 = 8u;

struct HeadParams {
    C: u32,
}

@group(0) @binding(1) var<uniform> p: HeadParams;
@group(0) @binding(2) var<storage, read> R: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> DECAY: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> K: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> V: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> KK: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read> A: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read_write> S: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read_write> Y: array<f32>;

// One block of the head's token vectors: token u's vec4 m at u * 16 + m (BLOCK = WG / 16
// tokens; 6 x 16 x WG bytes, 24 KiB at WG = 256).
var<workgroup> r_s: array<vec4<f32>, WG>;
var<workgroup> w_s: array<vec4<f32>, WG>;
var<workgroup> k_s: array<vec4<f32>, WG>;
var<workgroup> v_s: array<vec4<f32>, WG>;
var<workgroup> nkk_s: array<vec4<f32>, WG>;  // -kk
var<workgroup> kka_s: array<vec4<f32>, WG>;  // kk * a

struct Staged {
    r: vec4<f32>,
    w: vec4<f32>,
    k: vec4<f32>,
    v: vec4<f32>,
    nkk: vec4<f32>,
    kka: vec4<f32>,
}

// This thread's share of the block starting at token t0: vec4 lid % 16 of token t0 + lid / 16
// of the head whose first vec4 in a token is head4 (zeros past the chunk: never read).
fn fetch(t0: u32, head4: u32, lid: u32) -> Staged {
    let t = t0 + lid / NV4;
    var x = Staged(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0),
                   vec4<f32>(0.0));
    if (t < run.T) {
        let e = t * (p.C / 4u) + head4 + lid % NV4;
        let kk = KK[e];
        x = Staged(R[e], DECAY[e], K[e], V[e], -kk, kk * A[e]);
    }
    return x;
}

fn put(x: Staged, lid: u32) {
    r_s[lid] = x.r;
    w_s[lid] = x.w;
    k_s[lid] = x.k;
    v_s[lid] = x.v;
    nkk_s[lid] = x.nkk;
    kka_s[lid] = x.kka;
}

// The sum of x over the row's LANES lanes, to each of them (the same bits in every lane).
fn row_sum(x: f32) -> f32 {
    var total = x;
    for (var m = LANES >> 1u; m > 0u; m = m >> 1u) {
        total += subgroupShuffleXor(total, m);
    }
    return total;
}

@compute @workgroup_size(WG)
fn wkv_prefill(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c = wg.x * (WG / LANES) + lid / LANES;  // this lane's row (= channel)
    let q = lid % LANES;  // its part of the row
    let i = c % N;  // the row in its head
    let head4 = (c / N) * NV4;
    let nv = NV4 / LANES;  // vec4s per lane
    let block = WG / NV4;  // tokens per staged block
    var s: array<vec4<f32>, 16>;
    for (var j = 0u; j < nv; j++) {
        s[j] = S[c * NV4 + q + j * LANES];
    }
    var next = fetch(0u, head4, lid);
    for (var t0 = 0u; t0 < run.T; t0 += block) {
        workgroupBarrier();  // every row has read the previous block
        put(next, lid);
        workgroupBarrier();
        next = fetch(t0 + block, head4, lid);  // in flight while this block runs
        let n = min(block, run.T - t0);
        for (var u = 0u; u < n; u++) {
            let b = u * NV4 + q;  // the lane's first staged vec4 of token u
            let v = v_s[u * NV4 + i / 4u][i % 4u];
            var sa4 = vec4<f32>(0.0);
            for (var j = 0u; j < nv; j++) {
                sa4 += nkk_s[b + j * LANES] * s[j];
            }
            let sa = row_sum((sa4.x + sa4.y) + (sa4.z + sa4.w));
            var y4 = vec4<f32>(0.0);
            for (var j = 0u; j < nv; j++) {
                let e = b + j * LANES;
                let sj = s[j] * w_s[e] + v * k_s[e] + sa * kka_s[e];
                s[j] = sj;
                y4 += sj * r_s[e];
            }
            let y = row_sum((y4.x + y4.y) + (y4.z + y4.w));
            if (q == 0u) {
                Y[(t0 + u) * p.C + c] = y;
            }
        }
    }
    for (var j = 0u; j < nv; j++) {
        S[c * NV4 + q + j * LANES] = s[j];
    }
}
