// quants_dot.wgsl: mat-vec pieces of the formats of quants.wgsl (a library, prepended after
// weights.wgsl and quants.wgsl by kernels that define xin(i), the i-th vec4 of the input vectors;
// embed.wgsl has no X, which is why these are not in quants.wgsl).
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
//   Q6_K  block b = i / 4, half h = (i / 2) % 2, r = i % 2: the 64 elements
//         256b + 128h + 32t + 16r + j for t < 4, j < 16 (four runs of 16, four sub-blocks).
//         A nibble byte holds elements t and t + 2, a top-bits byte elements t = 0..3, so a
//         piece that owns all of them decodes each byte it loads once: 4 words of each kind.
// Each sub-block's sum is formed first and its scale (and Q4_K/Q5_K min times the sum of x)
// applied once: sum_j (d sc q_j - dmin m) x_j = d sc sum_j q_j x_j - dmin m sum_j x_j.
//
// quant_dot(fmt, row, i, xr, K): piece i of the row whose first word is `row`, dotted with
// the input vector whose element 0 is xin(xr) (a vec4 index).

fn quant_pieces(K: u32) -> u32 {
    return (K + 63u) / 64u;
}

fn q4_0_dot(row: u32, i: u32, xr: u32, K: u32) -> f32 {
    let pair = row + 9u * i;
    let x = xr + 16u * i;
    // block 0: d in the low half of word 0, nibbles from 2 bytes in (glued from word halves)
    var w = w_word(pair);
    let d0 = unpack2x16float(w).x;
    var s = vec4<f32>(0.0);
    for (var c = 0u; c < 4u; c++) {
        let next = w_word(pair + 1u + c);
        let q = (w >> 16u) | (next << 16u);
        s += quant_f32(nibbles(q, 0u), 8.0) * xin(x + c) + quant_f32(nibbles(q, 4u), 8.0) * xin(x + 4u + c);
        w = next;
    }
    var total = d0 * dot(s, vec4<f32>(1.0));
    // block 1 (absent when the row has an odd block count): d in the high half of word 4
    if (64u * i + 32u < K) {
        s = vec4<f32>(0.0);
        for (var c = 0u; c < 4u; c++) {
            let q = w_word(pair + 5u + c);
            s += quant_f32(nibbles(q, 0u), 8.0) * xin(x + 8u + c) + quant_f32(nibbles(q, 4u), 8.0) * xin(x + 12u + c);
        }
        total += unpack2x16float(w).y * dot(s, vec4<f32>(1.0));
    }
    return total;
}

fn q4_k_dot(row: u32, i: u32, xr: u32) -> f32 {
    let v = (row >> 2u) + (i >> 2u) * 9u;  // the block's header, as a vec4 index
    let g = i & 3u;
    let h = W[v];
    let a = kq_sub(h, 2u * g);
    let b = kq_sub(h, 2u * g + 1u);
    let q0 = W[v + 1u + 2u * g];
    let q1 = W[v + 2u + 2u * g];
    let x = xr + 16u * i;
    var sa = vec4<f32>(0.0);
    var sb = vec4<f32>(0.0);
    var xa = vec4<f32>(0.0);
    var xb = vec4<f32>(0.0);
    // word c of q0 holds elements 4c.. of both sub-blocks, word c of q1 elements 16 + 4c..
    for (var c = 0u; c < 4u; c++) {
        let xa0 = xin(x + c);
        let xa1 = xin(x + 4u + c);
        let xb0 = xin(x + 8u + c);
        let xb1 = xin(x + 12u + c);
        sa += quant_f32(nibbles(q0[c], 0u), 0.0) * xa0 + quant_f32(nibbles(q1[c], 0u), 0.0) * xa1;
        sb += quant_f32(nibbles(q0[c], 4u), 0.0) * xb0 + quant_f32(nibbles(q1[c], 4u), 0.0) * xb1;
        xa += xa0 + xa1;
        xb += xb0 + xb1;
    }
    let one = vec4<f32>(1.0);
    return a.x * dot(sa, one) - a.y * dot(xa, one) + b.x * dot(sb, one) - b.y * dot(xb, one);
}

fn q5_k_dot(row: u32, i: u32, xr: u32) -> f32 {
    let v = (row >> 2u) + (i >> 2u) * 11u;
    let g = i & 3u;
    let h = W[v];
    let a = kq_sub(h, 2u * g);
    let b = kq_sub(h, 2u * g + 1u);
    let t0 = W[v + 1u];  // fifth bits of elements 0..15 of every sub-block
    let t1 = W[v + 2u];  // and of elements 16..31
    let q0 = W[v + 3u + 2u * g];
    let q1 = W[v + 4u + 2u * g];
    let x = xr + 16u * i;
    var sa = vec4<f32>(0.0);
    var sb = vec4<f32>(0.0);
    var xa = vec4<f32>(0.0);
    var xb = vec4<f32>(0.0);
    for (var c = 0u; c < 4u; c++) {
        let xa0 = xin(x + c);
        let xa1 = xin(x + 4u + c);
        let xb0 = xin(x + 8u + c);
        let xb1 = xin(x + 12u + c);
        let qa0 = nibbles(q0[c], 0u) | top_bits(t0[c], 2u * g, 1u);
        let qa1 = nibbles(q1[c], 0u) | top_bits(t1[c], 2u * g, 1u);
        let qb0 = nibbles(q0[c], 4u) | top_bits(t0[c], 2u * g + 1u, 1u);
        let qb1 = nibbles(q1[c], 4u) | top_bits(t1[c], 2u * g + 1u, 1u);
        sa += quant_f32(qa0, 0.0) * xa0 + quant_f32(qa1, 0.0) * xa1;
        sb += quant_f32(qb0, 0.0) * xb0 + quant_f32(qb1, 0.0) * xb1;
        xa += xa0 + xa1;
        xb += xb0 + xb1;
    }
    let one = vec4<f32>(1.0);
    return a.x * dot(sa, one) - a.y * dot(xa, one) + b.x * dot(sb, one) - b.y * dot(xb, one);
}

fn q6_k_dot(row: u32, i: u32, xr: u32) -> f32 {
    let pair = row + (i >> 3u) * 105u;
    let odd = (i & 4u) != 0u;
    let blk = pair + select(0u, 52u, odd);
    let h = (i >> 1u) & 1u;
    let r = i & 1u;
    let lo = words4_h(blk + 16u * h + 4u * r, odd);       // nibbles of t = 0 (low), t = 2 (high)
    let hi = words4_h(blk + 16u * h + 8u + 4u * r, odd);  // of t = 1 and t = 3
    let top = words4_h(blk + 32u + 8u * h + 4u * r, odd); // top bits of t at bit 2t
    // scale of sub-block 8h + 2t + r: byte r or r + 2 of scale word 48 + 2h (t < 2) or 49 + 2h
    let s01 = i32(word_h(blk + 48u + 2u * h, odd));
    let s23 = i32(word_h(blk + 49u + 2u * h, odd));
    let dd = unpack2x16float(w_word(pair + select(52u, 104u, odd)));
    let x = xr + (i >> 2u) * 64u + 32u * h + 4u * r;
    var s0 = vec4<f32>(0.0);
    var s1 = vec4<f32>(0.0);
    var s2 = vec4<f32>(0.0);
    var s3 = vec4<f32>(0.0);
    for (var c = 0u; c < 4u; c++) {
        s0 += quant_f32(nibbles(lo[c], 0u) | top_bits(top[c], 0u, 3u), 32.0) * xin(x + c);
        s1 += quant_f32(nibbles(hi[c], 0u) | top_bits(top[c], 2u, 3u), 32.0) * xin(x + 8u + c);
        s2 += quant_f32(nibbles(lo[c], 4u) | top_bits(top[c], 4u, 3u), 32.0) * xin(x + 16u + c);
        s3 += quant_f32(nibbles(hi[c], 4u) | top_bits(top[c], 6u, 3u), 32.0) * xin(x + 24u + c);
    }
    let b = 8u * r;
    let sc = vec4<f32>(f32(extractBits(s01, b, 8u)), f32(extractBits(s01, b + 16u, 8u)),
                       f32(extractBits(s23, b, 8u)), f32(extractBits(s23, b + 16u, 8u)));
    let one = vec4<f32>(1.0);
    let sums = vec4<f32>(dot(s0, one), dot(s1, one), dot(s2, one), dot(s3, one));
    return select(dd.x, dd.y, odd) * dot(sc, sums);
}

fn quant_dot(fmt: u32, row: u32, i: u32, xr: u32, K: u32) -> f32 {
    switch fmt {
        case FMT_Q4_0: { return q4_0_dot(row, i, xr, K); }
        case FMT_Q4_K: { return q4_k_dot(row, i, xr); }
        case FMT_Q5_K: { return q5_k_dot(row, i, xr); }
        default: { return q6_k_dot(row, i, xr); }
    }
}
