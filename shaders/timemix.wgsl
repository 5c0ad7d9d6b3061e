// timemix.wgsl: the element-wise pieces of the time mix (the channel mix shares shift_mix).
//
// shift_mix: token shift and lerp. For each channel c, over the T tokens in order:
//   OUT[j][t] = XN[t] + (XN[t-1] - XN[t]) * LERP[j],   XN[-1] = PREV, then PREV = XN[T-1].
// One thread owns 4 channels for all T tokens, so the read of PREV (t = 0) and its update
// (t = T-1) happen in the same thread: no race, no second dispatch.
//   0 run  uniform Run          1 p  uniform ShiftParams {C, slot}
//   2 XN   read array<vec4<f32>> [T, C]     normed input of this block
//   3 PREV read_write array<vec4<f32>> [C]  normed input of the previous token (layer state)
//   4 LERP read array<vec4<f32>> [NMIX, C]  mix weights (r, w, k, v, a, g; or the ffn's k)
//   5 OUT  read_write array<vec4<f32>> [NMIX][slot]  mixed inputs, mix j at j * slot floats
//   Dispatch: (ceil(C / 4 / WG), 1, 1). Constants: WG, NMIX (6 for the time mix, 1 for ffn).
//
// kv_prep: per head and token, after the projections and LoRAs:
//   kk = normalize_head(K * KKW);  K = K * (1 + (A - 1) * KAW)
//   FIRST (layer 0): VF = V;  otherwise V = V + (VF - V) * VMIX
//   0 run  uniform Run          1 hp uniform HeadParams {C}
//   2 K    read_write array<f32> [T, C]   3 V read_write [T, C]   4 KK read_write [T, C] (out)
//   5 A    read [T, C] in-context rate    6 VMIX read [T, C] (unused when FIRST)
//   7 VF   read_write [T, C] v_first      8 KKW read [C] k_k    9 KAW read [C] k_a
//   Dispatch: (H, T, 1), 64 threads (WG = RED = 64). Constants: FIRST, PART.
//   PART 0 does all three updates (the "kv" fusion); without it the plan runs the pieces as
//   three dispatches, in this order: 1 kk (reads the original K), 2 the k update (K in place),
//   3 the value residual (or v_first in layer 0).
//
// activate: AX = act(AX) in place over T tokens of n floats (the unfused plan's separate
// activation, e.g. the channel mix's relu^2 when the "ffn" fusion is off).
//   0 run  uniform Run          1 ap uniform ActParams {n, act}
//   2 AX   read_write array<f32> [T, n]
//   Dispatch: (ceil(n / WG), T, 1): a row of workgroups per token (T * n / WG workgroups in
//   one dimension would pass the 65535 limit at T = 512, n = 10240). Constants: WG.
//
// norm_shift: layernorm (norm.wgsl) + shift_mix for a one-token step, in one workgroup; its
// bindings and dispatch are described where it is defined, at the end of this file.

override WG: u32 = 64u;
override NMIX: u32 = 6u;
override FIRST: bool = false;
override PART: u32 = 0u;

struct ShiftParams {
    C: u32,
    slot: u32,
}

struct HeadParams {
    C: u32,
}

@group(0) @binding(1) var<uniform> p: ShiftParams;
@group(0) @binding(2) var<storage, read> XN: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> PREV: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> LERP: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> OUT: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn shift_mix(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c4 = p.C >> 2u;
    let i = gid.x;
    if (i >= c4) {
        return;
    }
    let slot4 = p.slot >> 2u;
    var prev = PREV[i];
    for (var t = 0u; t < run.T; t++) {
        let cur = XN[t * c4 + i];
        let d = prev - cur;
        for (var j = 0u; j < NMIX; j++) {
            OUT[j * slot4 + t * c4 + i] = cur + d * LERP[j * c4 + i];
        }
        prev = cur;
    }
    PREV[i] = prev;
}

@group(0) @binding(1) var<uniform> hp: HeadParams;
@group(0) @binding(2) var<storage, read_write> K: array<f32>;
@group(0) @binding(3) var<storage, read_write> V: array<f32>;
@group(0) @binding(4) var<storage, read_write> KK: array<f32>;
@group(0) @binding(5) var<storage, read> A: array<f32>;
@group(0) @binding(6) var<storage, read> VMIX: array<f32>;
@group(0) @binding(7) var<storage, read_write> VF: array<f32>;
@group(0) @binding(8) var<storage, read> KKW: array<f32>;
@group(0) @binding(9) var<storage, read> KAW: array<f32>;

@compute @workgroup_size(64)
fn kv_prep(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c = wg.x * 64u + lid;
    let i = wg.y * hp.C + c;
    let k = K[i];
    if (PART == 0u || PART == 1u) {
        let kk = k * KKW[c];
        // L2 normalisation per head, floored like torch's F.normalize (eps 1e-12).
        let norm = sqrt(group_sum(kk * kk, lid));
        KK[i] = kk / max(norm, 1e-12);
    }
    if (PART == 0u || PART == 2u) {
        K[i] = k * (1.0 + (A[i] - 1.0) * KAW[c]);
    }
    if (PART == 0u || PART == 3u) {
        if (FIRST) {
            VF[i] = V[i];
        } else {
            let v = V[i];
            V[i] = v + (VF[i] - v) * VMIX[i];
        }
    }
}

struct ActParams {
    n: u32,
    act: u32,
}

@group(0) @binding(1) var<uniform> ap: ActParams;
@group(0) @binding(2) var<storage, read_write> AX: array<f32>;

@compute @workgroup_size(WG)
fn activate_inplace(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x < ap.n && gid.y < run.T) {
        let e = gid.y * ap.n + gid.x;
        AX[e] = activate(AX[e], ap.act);
    }
}

// norm_shift (the "norm_shift" fusion, one-token steps only): layernorm + shift_mix.
//   XN = LayerNorm(NX[0]; NW, NB);  NOUT[j] = XN + (NPREV - XN) * NLERP[j];  NPREV = XN
// Every workgroup computes the token's mean and variance (the same loops and reduction as
// layernorm, so the same bits; the token is read from L2), then writes NS_VEC4 vec4s of the
// outputs: many workgroups share the writes, which one workgroup did alone before (20 us for
// C = 2560 on an H100). Each channel's NPREV is read and updated by the same thread, so no
// second dispatch is needed (with T > 1 the plan keeps layernorm + shift_mix).
//   0 run  uniform Run          1 np uniform NormShiftParams {C, slot, eps}
//   2 NX   read array<vec4<f32>> [1, C]   block input x
//   3 NW, 4 NB read array<vec4<f32>> [C]  LayerNorm weight, bias
//   5 NPREV read_write [C]  6 NLERP read [NMIX, C]  7 NOUT read_write [NMIX][slot]
//   Dispatch: (ceil(C / 4 / NS_VEC4), 1, 1), WG threads, RED = WG. Constants: WG, RED, NMIX.

struct NormShiftParams {
    C: u32,
    slot: u32,
    eps: f32,
}

@group(0) @binding(1) var<uniform> np: NormShiftParams;
@group(0) @binding(2) var<storage, read> NX: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> NW: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> NB: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> NPREV: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> NLERP: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read_write> NOUT: array<vec4<f32>>;

const NS_VEC4: u32 = 64u;  // output vec4s per norm_shift workgroup (engine.py: NORM_SHIFT_VEC4)

@compute @workgroup_size(WG)
fn norm_shift(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c4 = np.C >> 2u;
    var s = 0.0;
    for (var i = lid; i < c4; i += WG) {
        s += dot(NX[i], vec4<f32>(1.0));
    }
    let mean = group_sum(s, lid) / f32(np.C);
    var ss = 0.0;
    for (var i = lid; i < c4; i += WG) {
        let d = NX[i] - mean;
        ss += dot(d, d);
    }
    let rstd = inverseSqrt(group_sum(ss, lid) / f32(np.C) + np.eps);
    let slot4 = np.slot >> 2u;
    let end = min(c4, (wg.x + 1u) * NS_VEC4);
    for (var i = wg.x * NS_VEC4 + lid; i < end; i += WG) {
        let xn = (NX[i] - mean) * rstd * NW[i] + NB[i];
        let d = NPREV[i] - xn;
        for (var j = 0u; j < NMIX; j++) {
            NOUT[j * slot4 + i] = xn + d * NLERP[j * c4 + i];
        }
        NPREV[i] = xn;
    }
}
