// reduce_subgroup.wgsl: group_sum and group_sum4 with subgroup operations (the `native`
// path's twin of reduce.wgsl; needs the device feature "subgroup"; Naga wants no
// `enable subgroups;` line).
//
// Same contracts as reduce.wgsl: the sum of v over the RED (group_sum) or n (group_sum4, a run
// time power of two <= RED, uniform over the workgroup) consecutive invocations of lid's group,
// to every member. SG is the device's subgroup size, probed at load by kernels.py.
//   group <= SG: butterfly with subgroupShuffleXor inside aligned groups (no barrier, no shared
//                memory; x + y == y + x, so every member ends with the same bits).
//   group >  SG: a sum per subgroup, then the group's partials are summed through workgroup
//                memory (one barrier pair).
// Barriers sit only under conditions on override constants, so the workgroup stays in uniform
// control flow whatever n is.

override RED: u32 = 64u;
override SG: u32 = 32u;

var<workgroup> red_v: array<vec4<f32>, WG>;

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
    red_v[lid / SG].x = partial;
    workgroupBarrier();
    let per_group = RED / SG;
    let first = (lid / RED) * per_group;
    var total = 0.0;
    for (var i = 0u; i < per_group; i++) {
        total += red_v[first + i].x;
    }
    workgroupBarrier();
    return total;
}

fn group_sum4(v: vec4<f32>, lid: u32, n: u32) -> vec4<f32> {
    if (RED == 1u) {
        return v;
    }
    var x = v;
    for (var m = min(n, SG) >> 1u; m > 0u; m = m >> 1u) {
        x += subgroupShuffleXor(x, m);
    }
    if (RED <= SG) {
        return x;
    }
    // Groups wider than a subgroup (possible only when RED > SG): subgroup j's sum at red_v[j].
    if (n > SG) {
        red_v[lid / SG] = x;  // the subgroup's members all hold its sum: any may write it
    }
    workgroupBarrier();
    if (n > SG) {
        let first = lid / n * (n / SG);
        x = red_v[first];
        for (var i = 1u; i < n / SG; i++) {
            x += red_v[first + i];
        }
    }
    workgroupBarrier();
    return x;
}
