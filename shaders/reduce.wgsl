// reduce.wgsl: portable sums over groups of threads (a library, prepended by kernels.py on
// the `webgpu` path; reduce_subgroup.wgsl is the `native` twin with the same functions).
//
// group_sum(v, lid): the sum of v over the RED consecutive invocations (by local index) that
// form lid's group, returned to every member. RED is a power of two dividing WG (both
// override constants; WG is declared by the including kernel). RED = 1 is "no reduction",
// which is what register-blocked kernels (one row per thread) use on CPU adapters.
//
// group_sum4(v, lid, n): the same for a vec4 (each component summed on its own) over groups of
// n consecutive invocations, n a power of two <= RED chosen at run time but the same in the
// whole workgroup (the mat-vec takes it from its segment table: rows of NR outputs, a group
// width per segment). With RED = 1 it returns v.
//
// Both must be called in uniform control flow: they use workgroup barriers.
//
// How: every member writes its value, ONE barrier, then every member sums its group's values
// itself, in index order (so every member gets the very same bits). The reads are broadcasts
// (a group's members read the same address), and the sum is RED / 4 vec4 additions for
// group_sum. A tree (log2(RED) rounds, each a barrier) costs a barrier per round: on an NVIDIA
// GPU a bar.sync plus the dependent shared-memory round trip is ~50 cycles, so 5 rounds at
// RED = 32 (the mat-vec) cost ~250 cycles where the serial sum is 8 broadcast loads. The
// serial sum stays ahead up to RED = 256 (the norm kernels: 64 vec4 loads and adds, ~300
// cycles, against 8 rounds); only 1024-wide groups would be better off with the tree, and
// no kernel uses them by default.
// A trailing barrier keeps the next call from overwriting red_v while a member still reads
// (kernels such as wkv.wgsl rely on these barriers to separate their own phases as well).

override RED: u32 = 64u;

// Scalars at red_v[lid / 4][lid % 4] (group_sum reads 4 per load), vec4s at red_v[lid].
var<workgroup> red_v: array<vec4<f32>, WG>;

// red_v[first] + red_v[first + 1] + ... (count entries), left to right.
fn red_sum(first: u32, count: u32) -> vec4<f32> {
    var total = red_v[first];
    for (var k = 1u; k < count; k++) {
        total += red_v[first + k];
    }
    return total;
}

fn group_sum(v: f32, lid: u32) -> f32 {
    if (RED == 1u) {
        return v;
    }
    red_v[lid >> 2u][lid & 3u] = v;
    workgroupBarrier();
    var total: f32;
    if (RED >= 4u) {
        total = dot(red_sum((lid & ~(RED - 1u)) >> 2u, RED >> 2u), vec4<f32>(1.0));
    } else {  // RED = 2: the pair shares a vec4 with another pair
        let pair = red_v[lid >> 2u];
        total = select(pair.x + pair.y, pair.z + pair.w, (lid & 2u) != 0u);
    }
    workgroupBarrier();
    return total;
}

fn group_sum4(v: vec4<f32>, lid: u32, n: u32) -> vec4<f32> {
    if (RED == 1u) {
        return v;
    }
    red_v[lid] = v;
    workgroupBarrier();
    let total = red_sum(lid & ~(n - 1u), n);
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
// Here every lane re-adds the 64 values exactly as group_sum does for RED = 64 (the 16 vec4s
// left to right, then the four components with dot), reading them as broadcasts.
const SUM64_SLOTS: u32 = 4u;

var<workgroup> sum64_x: array<array<vec4<f32>, 16>, SUM64_SLOTS>;

fn sum64_put(slot: u32, v: f32, lid: u32) {
    if (lid < 64u) {
        sum64_x[slot][lid >> 2u][lid & 3u] = v;
    }
}

fn sum64(slot: u32) -> f32 {
    var total = sum64_x[slot][0];
    for (var k = 1u; k < 16u; k++) {
        total += sum64_x[slot][k];
    }
    return dot(total, vec4<f32>(1.0));
}
