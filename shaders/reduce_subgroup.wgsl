// reduce_subgroup.wgsl: group_sum with subgroup operations (the `native` path's twin of
// reduce.wgsl; needs the device feature "subgroup"; Naga wants no `enable subgroups;` line).
//
// Same contract as reduce.wgsl: the sum of v over the RED consecutive invocations of lid's
// group, to every member. SG is the device's subgroup size, probed at load by kernels.py.
//   RED <= SG: butterfly with subgroupShuffleXor inside aligned groups of RED lanes (no
//              barrier, no shared memory).
//   RED >  SG: subgroupAdd per subgroup, then the RED / SG partials of a group are summed
//              through workgroup memory (one barrier pair).

override RED: u32 = 64u;
override SG: u32 = 32u;

var<workgroup> red_f: array<f32, WG>;

fn group_sum(v: f32, lid: u32) -> f32 {
    if (RED == 1u) {
        return v;
    }
    if (RED <= SG) {
        var x = v;
        for (var m = RED >> 1u; m > 0u; m = m >> 1u) {
            x += subgroupShuffleXor(x, m);
        }
        return x;
    }
    let partial = subgroupAdd(v);
    red_f[lid / SG] = partial;
    workgroupBarrier();
    let per_group = RED / SG;
    let first = (lid / RED) * per_group;
    var total = 0.0;
    for (var i = 0u; i < per_group; i++) {
        total += red_f[first + i];
    }
    workgroupBarrier();
    return total;
}
