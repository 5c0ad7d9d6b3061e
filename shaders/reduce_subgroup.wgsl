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
