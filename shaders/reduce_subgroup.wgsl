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

// sum64: group_sum's exact bits for a group of 64 lanes (RED = 64 in a 64-thread workgroup, as
// kv_prep and groupnorm_out reduce a head), computed in a workgroup of any WG >= 64 behind ONE
// barrier of the caller's, several sums sharing it (same contract as reduce.wgsl's sum64):
//   sum64_put(slot, v, lid)   lanes lid < 64 give element lid (the others' values are ignored;
//                             every lane must call it: subgroup operations)
//   workgroupBarrier()        (the caller's)
//   sum64(slot)               the sum, to every lane
// Lanes 0..63 form the same subgroups as in a 64-thread workgroup, so the same subgroup
// operations on the same values give group_sum's bits: the 64 / SG subgroup totals (lane 0 of
// each writes its own) are added in group_sum's order, from 0.0; with SG >= 64 the butterfly.
const SUM64_SLOTS: u32 = 4u;

var<workgroup> sum64_p: array<array<f32, 64>, SUM64_SLOTS>;

fn sum64_put(slot: u32, v: f32, lid: u32) {
    if (64u <= SG) {
        var x = v;
        for (var m = 32u; m > 0u; m = m >> 1u) {
            x += subgroupShuffleXor(x, m);
        }
        if (lid == 0u) {
            sum64_p[slot][0] = x;
        }
        return;
    }
    let partial = subgroupAdd(v);
    if (lid < 64u && (lid & (SG - 1u)) == 0u) {
        sum64_p[slot][lid / SG] = partial;
    }
}

fn sum64(slot: u32) -> f32 {
    if (64u <= SG) {
        return sum64_p[slot][0];
    }
    var total = 0.0;
    for (var i = 0u; i < 64u / SG; i++) {
        total += sum64_p[slot][i];
    }
    return total;
}
