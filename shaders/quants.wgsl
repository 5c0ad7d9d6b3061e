// quants.wgsl: Q4_0, Q4_K, Q5_K and Q6_K weight rows decoded in the kernel (a library,
// prepended after weights.wgsl: it reads the binding W: array<vec4<u32>> through W[] and
// w_word). The format is an argument, as in weights.wgsl (the pipeline's FMT, or a segment's).
//
// Blocks sit on the GPU exactly as the GGUF file stores them; only rows are padded (the host's
// row pitch is rwkvlab.quant_kernels.row_words). Element order inside a block is gguf-py's:
//
//   FMT 4  Q4_0  32 elements in 18 bytes: f16 d, then 16 bytes of nibbles; byte j holds
//                element j (low nibble) and j + 16 (high). Value d * (q - 8).
//                18 bytes is not word aligned, so blocks go in PAIRS (36 bytes = 9 words =
//                64 elements) (as Q8_0 was before its super-blocks): block 0 has d in the low half of word 0 and its
//                nibbles in bytes 2..17 (straddling words), block 1 has d in the high half of
//                word 4 and its nibbles in the aligned words 5..8. A row is ceil(K/64) pairs;
//                an odd last block is paired with an all-zero one, which readers skip.
//   FMT 5  Q4_K  256 elements in 144 bytes = 36 words (every row 16-byte aligned, so the
//                mat-vec reads whole vec4s): word 0 = f16 d | f16 dmin << 16, words 1..3 the
//                12 bytes of 6-bit scales and mins of 8 sub-blocks of 32 (kq_scale_min), words
//                4..35 the nibbles: 32-byte group g holds sub-block 2g in its low nibbles and
//                sub-block 2g + 1 in its high ones. Value d*sc * q - dmin*m.
//   FMT 6  Q5_K  256 elements in 176 bytes = 44 words (aligned): the Q4_K header, words 4..11
//                the fifth bits (bit s of byte j belongs to element j of sub-block s), words
//                12..43 the nibbles as in Q4_K. Value d*sc * (q | h << 4) - dmin*m.
//   FMT 7  Q6_K  256 elements in 210 bytes: 128 bytes of low nibbles, 64 bytes of 2-bit tops,
//                16 int8 scales (one per 16 elements), f16 d last. Value d*sc * (q - 32).
//                Element 128h + 32t + j (half h < 2, t < 4, j < 32) has its nibble in byte
//                64h + 32(t & 1) + j (the high nibble when t >= 2) and its top bits at bit 2t
//                of byte 128 + 32h + j. Blocks go in PAIRS of 420 bytes = 105 words; block 1
//                starts 2 bytes into word 52, so its words are glued from two halves (word_h).
//
// Exactness: every product here is exact in f32 (an f16 d has 11 significant bits, a scale at
// most 8, a quant at most 6: under f32's 24), so quant_load4 returns the very floats
// gguf.quants.dequantize computes; the only rounding is Q4_K/Q5_K's "- dmin*m", done once as
// in ggml. The dot products apply each sub-block's scale to the sub-block's sum instead, which
// rounds differently (ordinary fp32 summation error).
//
// Integer to float: quants are OR-ed into the mantissa of 2^23 (bits 0x4b000000), which then
// reads as 2^23 + q, and 2^23 (+ the format's offset 8 or 32) is subtracted, exactly. That is
// one logic op and one add per element, where a u32 -> f32 conversion runs at 1/8 of the FMA
// rate on NVIDIA GPUs and would bound a 4-bit mat-vec below memory speed.

const FMT_Q4_0: u32 = 4u;
const FMT_Q4_K: u32 = 5u;
const FMT_Q5_K: u32 = 6u;
const FMT_Q6_K: u32 = 7u;

fn is_quant_fmt(fmt: u32) -> bool {
    return fmt >= FMT_Q4_0 && fmt <= FMT_Q6_K;
}

// Small non-negative integers (< 2^23) as floats, minus `offset` (exact; see above).
fn quant_f32(q: vec4<u32>, offset: f32) -> vec4<f32> {
    return bitcast<vec4<f32>>(q | vec4<u32>(0x4b000000u)) - vec4<f32>(8388608.0 + offset);
}

// The 4-bit fields at bit s (0 or 4) of each byte of w: one element from each of 4 bytes.
fn nibbles(w: u32, s: u32) -> vec4<u32> {
    return (vec4<u32>(w) >> vec4<u32>(s, s + 8u, s + 16u, s + 24u)) & vec4<u32>(0xfu);
}

// The `mask` bits at bit s of each byte of w, moved up to bit 4: the top of a 5- or 6-bit quant.
fn top_bits(w: u32, s: u32, mask: u32) -> vec4<u32> {
    return ((vec4<u32>(w) >> vec4<u32>(s, s + 8u, s + 16u, s + 24u)) & vec4<u32>(mask)) << vec4<u32>(4u);
}

// The word at word i, or (odd) the word that starts 2 bytes into word i.
fn word_h(i: u32, odd: bool) -> u32 {
    let lo = w_word(i);
    return select(lo, (lo >> 16u) | (w_word(i + 1u) << 16u), odd);
}

// Four consecutive words from word i, or (odd) from 2 bytes into word i: five loads either
// way, so that lanes reading the even and the odd block of a pair do not diverge.
fn words4_h(i: u32, odd: bool) -> vec4<u32> {
    let a = vec4<u32>(w_word(i), w_word(i + 1u), w_word(i + 2u), w_word(i + 3u));
    let b = vec4<u32>(a.yzw, w_word(i + 4u));
    return select(a, (a >> vec4<u32>(16u)) | (b << vec4<u32>(16u)), odd);
}

// ---- Q4_K / Q5_K scales --------------------------------------------------------------------

// 6-bit (scale, min) of sub-block j < 8 from the packed bytes s = header words 1..3: sub-blocks
// 0..3 keep them in the low 6 bits of bytes j and 4 + j; sub-blocks 4..7 keep their low 4 bits
// in the two nibbles of byte 8 + j - 4 and their top 2 bits in the top of bytes j - 4 and j.
fn kq_scale_min(s: vec3<u32>, j: u32) -> vec2<u32> {
    let b = 8u * (j & 3u);
    if (j < 4u) {
        return vec2<u32>(extractBits(s.x, b, 6u), extractBits(s.y, b, 6u));
    }
    let lo = vec2<u32>(extractBits(s.z, b, 4u), extractBits(s.z, b + 4u, 4u));
    let hi = vec2<u32>(extractBits(s.x, b + 6u, 2u), extractBits(s.y, b + 6u, 2u));
    return lo | (hi << vec2<u32>(4u));
}

// (d * scale, dmin * min) of sub-block j of the block whose header (words 0..3) is h.
fn kq_sub(h: vec4<u32>, j: u32) -> vec2<f32> {
    let dd = unpack2x16float(h.x);
    let sm = kq_scale_min(h.yzw, j);
    return vec2<f32>(dd.x * f32(sm.x), dd.y * f32(sm.y));
}

// ---- 4 elements at k (embed, gemm tiles) ---------------------------------------------------
// Elements k..k+3 (k % 4 == 0, k < K) of the row whose first word is `row`.

fn q4_0_load4(row: u32, k: u32) -> vec4<f32> {
    let pair = row + (k >> 6u) * 9u;
    let e = k & 63u;
    let s = (e & 16u) >> 2u;  // elements 16..31 of a block are the high nibbles
    let c = (e & 15u) >> 2u;  // word of the block's nibbles
    if (e < 32u) {
        return unpack2x16float(w_word(pair)).x * quant_f32(nibbles(word_h(pair + c, true), s), 8.0);
    }
    return unpack2x16float(w_word(pair + 4u)).y * quant_f32(nibbles(w_word(pair + 5u + c), s), 8.0);
}

fn q4_k_load4(row: u32, k: u32) -> vec4<f32> {
    let blk = row + (k >> 8u) * 36u;
    let e = k & 255u;
    let j = e >> 5u;
    let sm = kq_sub(W[blk >> 2u], j);
    let w = w_word(blk + 4u + (j >> 1u) * 8u + ((e & 31u) >> 2u));
    return sm.x * quant_f32(nibbles(w, (j & 1u) * 4u), 0.0) - sm.y;
}

fn q5_k_load4(row: u32, k: u32) -> vec4<f32> {
    let blk = row + (k >> 8u) * 44u;
    let e = k & 255u;
    let j = e >> 5u;
    let c = (e & 31u) >> 2u;
    let sm = kq_sub(W[blk >> 2u], j);
    let q = nibbles(w_word(blk + 12u + (j >> 1u) * 8u + c), (j & 1u) * 4u) | top_bits(w_word(blk + 4u + c), j, 1u);
    return sm.x * quant_f32(q, 0.0) - sm.y;
}

fn q6_k_load4(row: u32, k: u32) -> vec4<f32> {
    let pair = row + (k >> 9u) * 105u;
    let odd = (k & 256u) != 0u;
    let blk = pair + select(0u, 52u, odd);
    let h = (k >> 7u) & 1u;
    let t = (k >> 5u) & 3u;
    let j = k & 31u;
    let ql = word_h(blk + 16u * h + 8u * (t & 1u) + (j >> 2u), odd);
    let qh = word_h(blk + 32u + 8u * h + (j >> 2u), odd);
    // scale 8h + 2t + j/16 of the block: byte 2(t & 1) + j/16 of scale word 48 + 2h + t/2
    let sw = word_h(blk + 48u + 2u * h + (t >> 1u), odd);
    let sc = extractBits(i32(sw), 8u * (2u * (t & 1u) + (j >> 4u)), 8u);
    let dd = unpack2x16float(w_word(pair + select(52u, 104u, odd)));
    let d = select(dd.x, dd.y, odd);
    let q = nibbles(ql, 4u * (t >> 1u)) | top_bits(qh, 2u * t, 3u);
    return (d * f32(sc)) * quant_f32(q, 32.0);
}

// Elements k..k+3 of a row in one of the formats of this file.
fn quant_load4(fmt: u32, row: u32, k: u32) -> vec4<f32> {
    switch fmt {
        case FMT_Q4_0: { return q4_0_load4(row, k); }
        case FMT_Q4_K: { return q4_k_load4(row, k); }
        case FMT_Q5_K: { return q5_k_load4(row, k); }
        default: { return q6_k_load4(row, k); }
    }
}
