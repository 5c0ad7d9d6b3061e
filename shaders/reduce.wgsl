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
