// quants_dot.wgsl: mat-vec pieces of the formats of quants.wgsl (a library, prepended after
// weights.wgsl and quants.wgsl by kernels that define xin(i), the i-th vec4 of the input vectors,
// and the override constant NR, rows per call; embed.wgsl has no X, which is why these are not
// in quants.wgsl).
//
// A piece is what one thread decodes per step of a mat-vec row loop: here always 64 elements,
// and a row has ceil(K / 64) of them (K / 64 for the K-quants, whose K is a multiple of 256).
// Piece i of a row covers
//   Q4_0  the pair of blocks i: elements [64i, 64i + 64); 9 scalar words (the pair is not
//         16-byte aligned). A zero padding block past K is skipped.
//   Q4_K  quarter g = i % 4 of block i / 4, i.e. sub-blocks 2g and 2g + 1: elements
//         [64i, 64i + 64). One vec4 of header (d, dmin, packed scales) and the 2 vec4s of its
//         nibbles; the 4 lanes on a block read its 144 bytes whole, the header once per line.
//   Q5_K  as Q4_K, plus the block's 2 vec4s of fifth bits (shared by its 4 lanes).
//   Q6_K  block b = i / 4, half h = (i / 2) % 2, j = i % 2: the 64 elements
//         256b + 128h + 32t + 16j + e for t < 4, e < 16 (four runs of 16, four sub-blocks).
//         A nibble byte holds elements t and t + 2, a top-bits byte elements t = 0..3, so a
//         piece that owns all of them decodes each byte it loads once: 4 words of each kind.
// Each sub-block's sum is formed first and its scale (and Q4_K/Q5_K min times the sum of x)
// applied once: sum_j (d sc q_j - dmin m) x_j = d sc sum_j q_j x_j - dmin m sum_j x_j.
//
// quant_dot(fmt, rows, i, xr, K): piece i of each of NR rows (their first words are rows[r],
// r < NR) dotted with the input vector whose element 0 is xin(xr) (a vec4 index): component r
// of the result is row r's (components from NR on are 0). NR (1, 2 or 4) is an override
// constant of the including kernel, like xin. The rows' words are loaded first (NR rows'
// loads in flight at once), then x a few vec4s at a time, each used for every row: a mat-vec
// lane reads 4 to 8 times more bytes of x (from L1) than of weights, so NR rows per load of x
// divide that traffic by NR, and only the vec4s of one step are live in registers. Each row
// gets the same operations in the same order whatever NR is.

fn quant_pieces(K: u32) -> u32 {
    return (K + 63u) / 64u;
}

fn q4_0_dot(rows: vec4<u32>, i: u32, xr: u32, K: u32) -> vec4<f32> {
    var wd: array<array<u32, 9>, 4>;  // the pair's 9 words, per row
    for (var r = 0u; r < NR; r++) {
        for (var k = 0u; k < 9u; k++) {
            wd[r][k] = w_word(rows[r] + 9u * i + k);
        }
    }
    let x = xr + 16u * i;
    // block 0: d in the low half of word 0, nibbles from 2 bytes in (glued from word halves)
    var s0: array<vec4<f32>, 4>;
    for (var c = 0u; c < 4u; c++) {
        let xl = xin(x + c);
        let xh = xin(x + 4u + c);
        for (var r = 0u; r < NR; r++) {
            let q = (wd[r][c] >> 16u) | (wd[r][c + 1u] << 16u);
            s0[r] += quant_f32(nibbles(q, 0u), 8.0) * xl + quant_f32(nibbles(q, 4u), 8.0) * xh;
        }
    }
    var out = vec4<f32>(0.0);
    for (var r = 0u; r < NR; r++) {
        out[r] = unpack2x16float(wd[r][0]).x * dot(s0[r], vec4<f32>(1.0));
    }
    // block 1 (absent when the row has an odd block count: x is not read past K):
    // d in the high half of word 4, nibbles in the aligned words 5..8
    if (64u * i + 32u < K) {
        var s1: array<vec4<f32>, 4>;
        for (var c = 0u; c < 4u; c++) {
            let xl = xin(x + 8u + c);
            let xh = xin(x + 12u + c);
            for (var r = 0u; r < NR; r++) {
                let q = wd[r][5u + c];
                s1[r] += quant_f32(nibbles(q, 0u), 8.0) * xl + quant_f32(nibbles(q, 4u), 8.0) * xh;
            }
        }
        for (var r = 0u; r < NR; r++) {
            out[r] += unpack2x16float(wd[r][4]).y * dot(s1[r], vec4<f32>(1.0));
        }
    }
    return out;
}

fn q4_k_dot(rows: vec4<u32>, i: u32, xr: u32) -> vec4<f32> {
    let g = i & 3u;
    var hd: array<vec4<u32>, 4>;  // per row: the block's header (d, dmin, packed scales)
    var q0: array<vec4<u32>, 4>;  // and the 2 vec4s of the quarter's nibbles
    var q1: array<vec4<u32>, 4>;
    for (var r = 0u; r < NR; r++) {
        let v = (rows[r] >> 2u) + (i >> 2u) * 9u;  // the block's header, as a vec4 index
        hd[r] = W[v];
        q0[r] = W[v + 1u + 2u * g];
        q1[r] = W[v + 2u + 2u * g];
    }
    let x = xr + 16u * i;
    var sa: array<vec4<f32>, 4>;
    var sb: array<vec4<f32>, 4>;
    var xa = vec4<f32>(0.0);
    var xb = vec4<f32>(0.0);
    // word c of q0 holds elements 4c.. of both sub-blocks, word c of q1 elements 16 + 4c..
    for (var c = 0u; c < 4u; c++) {
        let xa0 = xin(x + c);
        let xa1 = xin(x + 4u + c);
        let xb0 = xin(x + 8u + c);
        let xb1 = xin(x + 12u + c);
        for (var r = 0u; r < NR; r++) {
            sa[r] += quant_f32(nibbles(q0[r][c], 0u), 0.0) * xa0 + quant_f32(nibbles(q1[r][c], 0u), 0.0) * xa1;
            sb[r] += quant_f32(nibbles(q0[r][c], 4u), 0.0) * xb0 + quant_f32(nibbles(q1[r][c], 4u), 0.0) * xb1;
        }
        xa += xa0 + xa1;
        xb += xb0 + xb1;
    }
    let one = vec4<f32>(1.0);
    var out = vec4<f32>(0.0);
    for (var r = 0u; r < NR; r++) {
        let a = kq_sub(hd[r], 2u * g);
        let b = kq_sub(hd[r], 2u * g + 1u);
        out[r] = a.x * dot(sa[r], one) - a.y * dot(xa, one) + b.x * dot(sb[r], one) - b.y * dot(xb, one);
    }
    return out;
}

// q5_k_dot is q4_k_dot plus the fifth-bit planes. One function for both (a Q4_K quant is a
// Q5_K quant with fifth bit 0, its planes not loaded) measured slower for Q4_K on the H100
// (65536x2560: 832 against 910 GB/s; 2.9B Q4_K_M generation 227 against 241 tok/s), so the
// two stay separate.
fn q5_k_dot(rows: vec4<u32>, i: u32, xr: u32) -> vec4<f32> {
    let g = i & 3u;
    var hd: array<vec4<u32>, 4>;
    var t0: array<vec4<u32>, 4>;  // fifth bits of elements 0..15 of every sub-block
    var t1: array<vec4<u32>, 4>;  // and of elements 16..31
    var q0: array<vec4<u32>, 4>;
    var q1: array<vec4<u32>, 4>;
    for (var r = 0u; r < NR; r++) {
        let v = (rows[r] >> 2u) + (i >> 2u) * 11u;
        hd[r] = W[v];
        t0[r] = W[v + 1u];
        t1[r] = W[v + 2u];
        q0[r] = W[v + 3u + 2u * g];
        q1[r] = W[v + 4u + 2u * g];
    }
    let x = xr + 16u * i;
    var sa: array<vec4<f32>, 4>;
    var sb: array<vec4<f32>, 4>;
    var xa = vec4<f32>(0.0);
    var xb = vec4<f32>(0.0);
    for (var c = 0u; c < 4u; c++) {
        let xa0 = xin(x + c);
        let xa1 = xin(x + 4u + c);
        let xb0 = xin(x + 8u + c);
        let xb1 = xin(x + 12u + c);
        for (var r = 0u; r < NR; r++) {
            let qa0 = nibbles(q0[r][c], 0u) | top_bits(t0[r][c], 2u * g, 1u);
            let qa1 = nibbles(q1[r][c], 0u) | top_bits(t1[r][c], 2u * g, 1u);
            let qb0 = nibbles(q0[r][c], 4u) | top_bits(t0[r][c], 2u * g + 1u, 1u);
            let qb1 = nibbles(q1[r][c], 4u) | top_bits(t1[r][c], 2u * g + 1u, 1u);
            sa[r] += quant_f32(qa0, 0.0) * xa0 + quant_f32(qa1, 0.0) * xa1;
            sb[r] += quant_f32(qb0, 0.0) * xb0 + quant_f32(qb1, 0.0) * xb1;
        }
        xa += xa0 + xa1;
        xb += xb0 + xb1;
    }
    let one = vec4<f32>(1.0);
    var out = vec4<f32>(0.0);
    for (var r = 0u; r < NR; r++) {
        let a = kq_sub(hd[r], 2u * g);
        let b = kq_sub(hd[r], 2u * g + 1u);
        out[r] = a.x * dot(sa[r], one) - a.y * dot(xa, one) + b.x * dot(sb[r], one) - b.y * dot(xb, one);
    }
    return out;
}

fn q6_k_dot(rows: vec4<u32>, i: u32, xr: u32) -> vec4<f32> {
    let odd = (i & 4u) != 0u;
    let h = (i >> 1u) & 1u;
    let j = i & 1u;
    // per row: the scale of sub-block 8h + 2t + j is byte j or j + 2 of scale word 48 + 2h
    // (t < 2: s01) or 49 + 2h (s23); d is the block's f16 scale
    var lo: array<vec4<u32>, 4>;   // nibbles of t = 0 (low), t = 2 (high)
    var hi: array<vec4<u32>, 4>;   // of t = 1 and t = 3
    var top: array<vec4<u32>, 4>;  // top bits of t at bit 2t
    var s01: array<i32, 4>;
    var s23: array<i32, 4>;
    var d: array<f32, 4>;
    for (var r = 0u; r < NR; r++) {
        let pair = rows[r] + (i >> 3u) * 105u;
        let blk = pair + select(0u, 52u, odd);
        lo[r] = words4_h(blk + 16u * h + 4u * j, odd);
        hi[r] = words4_h(blk + 16u * h + 8u + 4u * j, odd);
        top[r] = words4_h(blk + 32u + 8u * h + 4u * j, odd);
        s01[r] = i32(word_h(blk + 48u + 2u * h, odd));
        s23[r] = i32(word_h(blk + 49u + 2u * h, odd));
        let dd = unpack2x16float(w_word(pair + select(52u, 104u, odd)));
        d[r] = select(dd.x, dd.y, odd);
    }
    let x = xr + (i >> 2u) * 64u + 32u * h + 4u * j;
    var s0: array<vec4<f32>, 4>;
    var s1: array<vec4<f32>, 4>;
    var s2: array<vec4<f32>, 4>;
    var s3: array<vec4<f32>, 4>;
    for (var c = 0u; c < 4u; c++) {
        let x0 = xin(x + c);
        let x1 = xin(x + 8u + c);
        let x2 = xin(x + 16u + c);
        let x3 = xin(x + 24u + c);
        for (var r = 0u; r < NR; r++) {
            s0[r] += quant_f32(nibbles(lo[r][c], 0u) | top_bits(top[r][c], 0u, 3u), 32.0) * x0;
            s1[r] += quant_f32(nibbles(hi[r][c], 0u) | top_bits(top[r][c], 2u, 3u), 32.0) * x1;
            s2[r] += quant_f32(nibbles(lo[r][c], 4u) | top_bits(top[r][c], 4u, 3u), 32.0) * x2;
            s3[r] += quant_f32(nibbles(hi[r][c], 4u) | top_bits(top[r][c], 6u, 3u), 32.0) * x3;
        }
    }
    let b = 8u * j;
    let one = vec4<f32>(1.0);
    var out = vec4<f32>(0.0);
    for (var r = 0u; r < NR; r++) {
        let sc = vec4<f32>(f32(extractBits(s01[r], b, 8u)), f32(extractBits(s01[r], b + 16u, 8u)),
                           f32(extractBits(s23[r], b, 8u)), f32(extractBits(s23[r], b + 16u, 8u)));
        let sums = vec4<f32>(dot(s0[r], one), dot(s1[r], one), dot(s2[r], one), dot(s3[r], one));
        out[r] = d[r] * dot(sc, sums);
    }
    return out;
}

fn quant_dot(fmt: u32, rows: vec4<u32>, i: u32, xr: u32, K: u32) -> vec4<f32> {
    switch fmt {
        case FMT_Q4_0: { return q4_0_dot(rows, i, xr, K); }
        case FMT_Q4_K: { return q4_k_dot(rows, i, xr); }
        case FMT_Q5_K: { return q5_k_dot(rows, i, xr); }
        default: { return q6_k_dot(rows, i, xr); }
    }
}
