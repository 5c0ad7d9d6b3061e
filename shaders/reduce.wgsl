// reduce.wgsl: portable sums over groups of threads (a library, prepended by kernels.py on
// the `webgpu` path; reduce_subgroup.wgsl is the `native` twin with the same function).
//
// group_sum(v, lid): the sum of v over the RED consecutive invocations (by local index) that
// form lid's group, returned to every member. RED is a power of two dividing WG (both
// override constants; WG is declared by the including kernel). RED = 1 is "no reduction",
// which is what register-blocked kernels (one row per thread) use on CPU adapters.
// Must be called in uniform control flow: it uses workgroup barriers.

override RED: u32 = 64u;

var<workgroup> red_f: array<f32, WG>;

fn group_sum(v: f32, lid: u32) -> f32 {
    if (RED == 1u) {
        return v;
    }
    red_f[lid] = v;
    workgroupBarrier();
    let lane = lid & (RED - 1u);
    for (var s = RED >> 1u; s > 0u; s = s >> 1u) {
        if (lane < s) {
            red_f[lid] += red_f[lid + s];
        }
        workgroupBarrier();
    }
    let total = red_f[lid - lane];
    // A later call overwrites red_f: everyone must have read the total first.
    workgroupBarrier();
    return total;
}

// sum64: group_sum's exact bits for a group of 64 lanes (RED = 64 in a 64-thread workgroup, as
// kv_prep and groupnorm_out reduce a head), computed in a workgroup of any WG >= 64 behind ONE
// barrier of the caller's, several sums sharing it (wkv_fused: the kk norm and the bonus).
//   sum64_put(slot, v, lid)   lanes lid < 64 give element lid (the others are ignored)
//   workgroupBarrier()        (the caller's)
//   sum64(slot)               the sum, to every lane
// A slot may be put again once every lane has passed one more barrier after its sum64 read.
// Here every lane re-adds the 64 values in group_sum's tree order (pairs 32 apart first, then
// 16, ... 1), reading them as 16 vec4s that every lane of a warp reads at once (broadcast).
const SUM64_SLOTS: u32 = 4u;

var<workgroup> sum64_x: array<array<vec4<f32>, 16>, SUM64_SLOTS>;

fn sum64_put(slot: u32, v: f32, lid: u32) {
    if (lid < 64u) {
        sum64_x[slot][lid >> 2u][lid & 3u] = v;
    }
}

fn sum64(slot: u32) -> f32 {
    // vec4 m holds lanes 4m..4m+3, so group_sum's step "lane l += lane l + s" is "vec4 m +=
    // vec4 m + s/4" down to s = 4; then lanes 0 + 2, 1 + 3, and the two results.
    let x = sum64_x[slot];
    let a0 = x[0] + x[8];
    let a1 = x[1] + x[9];
    let a2 = x[2] + x[10];
    let a3 = x[3] + x[11];
    let a4 = x[4] + x[12];
    let a5 = x[5] + x[13];
    let a6 = x[6] + x[14];
    let a7 = x[7] + x[15];
    let b0 = a0 + a4;
    let b1 = a1 + a5;
    let b2 = a2 + a6;
    let b3 = a3 + a7;
    let c = (b0 + b2) + (b1 + b3);
    return (c.x + c.z) + (c.y + c.w);
}
