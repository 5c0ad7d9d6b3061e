// argmax.wgsl: greedy sampling on the GPU. Picks the largest logit (lowest id among ties, as
// np.argmax does; NaN never wins), writes it where the next step's embed reads its token, and
// appends it to the list of generated ids, which the host reads once at the end.
//
// Bindings (group 0):
//   0 run  uniform Run            1 p  uniform ArgmaxParams {V, cap}
//   2 L    read array<vec4<f32>> [ceil(V/4)]  logits of the last token (the buffer is padded)
//   3 TOK  read_write array<u32>        TOK[0] = the chosen id (next step's input)
//   4 GEN  read_write array<u32>        GEN[0] = count so far, GEN[1 + i] = i-th id (i < cap)
// Dispatch: (1, 1, 1), WG threads: a strided scan with vec4 loads (a 65536-entry vocab is 64
// independent loads per thread of 256), then a tree over workgroup memory. The comparison is
// a total order (larger value, then lower id), so the scan order does not change the result.
// (Keeping four loads in flight through a private array ran 20x slower on lavapipe inside
// the step plan; the plain loop leaves unrolling to the driver.)
// Constants: WG (a power of two).

override WG: u32 = 256u;

struct ArgmaxParams {
    V: u32,
    cap: u32,
}

@group(0) @binding(1) var<uniform> p: ArgmaxParams;
@group(0) @binding(2) var<storage, read> L: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> TOK: array<u32>;
@group(0) @binding(4) var<storage, read_write> GEN: array<u32>;

var<workgroup> best_v: array<f32, WG>;
var<workgroup> best_i: array<u32, WG>;

const NO_ID: u32 = 0xffffffffu;

// Does candidate (v, i) beat (bv, bi)? Larger value, or the same value and a lower id.
fn beats(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    return v > bv || (v == bv && i < bi);
}

@compute @workgroup_size(WG)
fn argmax(@builtin(local_invocation_index) lid: u32) {
    var bv = -3.4028234663852886e38;  // the lowest f32 (Tint refuses a literal that rounds past it)
    var bi = NO_ID;
    let n4 = (p.V + 3u) >> 2u;
    for (var i4 = lid; i4 < n4; i4 += WG) {
        let q = L[i4];
        for (var c = 0u; c < 4u; c++) {
            let i = 4u * i4 + c;
            if (i < p.V && beats(q[c], i, bv, bi)) {
                bv = q[c];
                bi = i;
            }
        }
    }
    best_v[lid] = bv;
    best_i[lid] = bi;
    workgroupBarrier();
    for (var s = WG >> 1u; s > 0u; s = s >> 1u) {
        if (lid < s && beats(best_v[lid + s], best_i[lid + s], best_v[lid], best_i[lid])) {
            best_v[lid] = best_v[lid + s];
            best_i[lid] = best_i[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        // All logits -inf or NaN: fall back to id 0 rather than an id outside the vocab.
        let id = select(best_i[0], 0u, best_i[0] == NO_ID);
        TOK[0] = id;
        let n = GEN[0];
        if (n < p.cap) {
            GEN[1u + n] = id;
        }
        GEN[0] = n + 1u;
    }
}
