// matseg.wgsl: the segment table shared by matvec.wgsl and gemm.wgsl (a library, prepended).
//
// One matrix-product dispatch covers up to 8 SEGMENTS: row ranges of weight matrices that sit
// one after another in the same weight buffer W. Each segment names its own input (an offset
// into X), its own output (an offset into Y), its epilogue (activation, bias, residual add).
// The unfused plan has one segment per dispatch (one matrix, or one row piece of a matrix too
// big for one binding); the "proj" fusion puts r, k, v and the LoRA matrices of a block into
// one dispatch (the engine stacks them in one buffer at load).
//
//   Y[y_off + t * y_stride + m] (+)= act(sum_k W[m, k] X[x_off + t * K + k] + B[bias + m])
//
// Workgroups are numbered across segments: segment s owns matvec workgroups from wg_start and
// gemm tiles (64 rows) from tile_start, up to the next segment's start.

const MAX_SEG: u32 = 8u;
const NO_BIAS: u32 = 0xffffffffu;

struct Seg {
    rows: u32,        // rows of W in this segment
    K: u32,           // columns (the input width)
    row_words: u32,   // u32 words per row (weights.wgsl)
    w_base: u32,      // first word of the segment in W (a multiple of 4)
    x_off: u32,       // first float of token 0's input in X (a multiple of 4)
    y_off: u32,       // first float of token 0's output (row 0 of the segment) in Y
    y_stride: u32,    // floats between consecutive tokens in Y
    act: u32,         // ACT_* of common.wgsl
    bias: u32,        // first float of the bias in B, or NO_BIAS
    accum: u32,       // 1: add to Y (residual), 0: overwrite
    wg_start: u32,    // first matvec workgroup of the segment
    tile_start: u32,  // first gemm tile of the segment
    fmt: u32,         // weight format (weights.wgsl), read when FMT = FMT_PER_SEGMENT
    red: u32,         // matvec lanes per row (a power of two <= RED; matvec.wgsl), unused by gemm
    spad1: u32,       // (uniform arrays need a 16-byte multiple per element)
    spad2: u32,
}

struct MatParams {
    n_seg: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
    seg: array<Seg, 8>,
}

// The weight format of segment `sg`: the pipeline's, or the segment's own in mixed stacks.
fn seg_fmt(sg: Seg) -> u32 {
    return select(FMT, sg.fmt, FMT == FMT_PER_SEGMENT);
}

// The segment that workgroup (or tile) number `i` belongs to; starts[] ascend.
fn find_seg(i: u32, tiles: bool) -> u32 {
    var s = 0u;
    for (var j = 1u; j < p.n_seg; j++) {
        let start = select(p.seg[j].wg_start, p.seg[j].tile_start, tiles);
        if (i >= start) {
            s = j;
        }
    }
    return s;
}

fn epilogue(sg: Seg, t: u32, m: u32, acc: f32) {
    var y = acc;
    if (sg.bias != NO_BIAS) {
        y += B[sg.bias + m];
    }
    y = activate(y, sg.act);
    let o = sg.y_off + t * sg.y_stride + m;
    if (sg.accum != 0u) {
        Y[o] += y;
    } else {
        Y[o] = y;
    }
}
