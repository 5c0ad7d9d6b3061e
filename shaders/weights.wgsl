// weights.wgsl: reading weight rows in their file format (a library, prepended by kernels.py
// to matvec.wgsl, gemm.wgsl and embed.wgsl, which declare the binding it reads:
//   W: array<vec4<u32>>   one weight matrix, or a range of its rows, in format FMT).
// quants.wgsl, always prepended right after it, decodes FMT 4..7 (Q4_0, Q4_K, Q5_K, Q6_K).
//
// Every format is read as u32 words, so one binding type serves them all and the portable path
// needs neither shader-f16 nor 8-bit storage. Rows start on a 16-byte boundary in every format
// but those read in pairs of blocks (Q8_0, Q4_0, Q6_K: rows start on a word); the host's row
// pitch is kernels.row_words.
//
//   FMT 0  F32    a row of K elements is K words.
//   FMT 1  F16    K/2 words; element 2i in the low half of word i (unpack2x16float).
//   FMT 2  BF16   K/2 words; a bf16 is the high half of an f32, so shifting it up is exact.
//   FMT 3  Q8_0   blocks of 32 elements: f16 scale d, then 32 int8 q (34 bytes); value d * q.
//                 34 is not a multiple of 4, so only every second block is word aligned: blocks
//                 are read in PAIRS (68 bytes = 17 words = 64 elements). Block 0 of a pair has
//                 its scale in the low half of word 0 and its quants in bytes 2..33 (straddling
//                 words); block 1 has its scale in the high half of word 8 and its quants in the
//                 aligned words 9..16. A row is ceil(K/64) pairs; the loader pads rows with an
//                 odd block count by one all-zero block, and readers skip it (k >= K).
//   FMT 4..7  Q4_0, Q4_K, Q5_K, Q6_K: blocks as in the file (Q4_0 and Q6_K in pairs, like
//                 Q8_0); see quants.wgsl, which load4 hands them to.
//
// A "piece" is what one thread decodes per step of a mat-vec loop: piece_elems(fmt) elements
// held in piece_words(fmt) words (F32 4/4, F16 and BF16 8/4, Q8_0 64/17; the formats of
// quants.wgsl have pieces of 64 elements that are not all contiguous words: quants_dot.wgsl).
//
// The format is the override constant FMT, so each pipeline is specialised to one format; a
// matrix-product dispatch over stacked matrices of different formats uses FMT = FMT_PER_SEGMENT
// and takes each segment's format from its table entry (a branch uniform across a workgroup).

override FMT: u32 = 0u;

const FMT_F32: u32 = 0u;
const FMT_F16: u32 = 1u;
const FMT_BF16: u32 = 2u;
const FMT_Q8_0: u32 = 3u;
const FMT_PER_SEGMENT: u32 = 255u;

fn piece_elems(fmt: u32) -> u32 {
    switch fmt {
        case FMT_F32: { return 4u; }
        case FMT_F16, FMT_BF16: { return 8u; }
        default: { return 64u; }  // Q8_0 and the formats of quants.wgsl
    }
}

fn piece_words(fmt: u32) -> u32 {
    if (fmt == FMT_Q8_0) {
        return 17u;
    }
    return 4u;
}

// Word i of W (scalar access for formats whose pieces are not 16-byte aligned).
fn w_word(i: u32) -> u32 {
    return W[i >> 2u][i & 3u];
}

// Four int8 packed in a word, as floats (extractBits on i32 sign-extends).
fn i8x4(w: u32) -> vec4<f32> {
    let s = i32(w);
    return vec4<f32>(f32(extractBits(s, 0u, 8u)), f32(extractBits(s, 8u, 8u)),
                     f32(extractBits(s, 16u, 8u)), f32(extractBits(s, 24u, 8u)));
}

fn f16x4(w0: u32, w1: u32) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(w0), unpack2x16float(w1));
}

fn bf16x2(w: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u));
}

fn bf16x4(w0: u32, w1: u32) -> vec4<f32> {
    return vec4<f32>(bf16x2(w0), bf16x2(w1));
}

// Elements k..k+3 (k % 4 == 0, k < K) of the row whose first word is `row`.
fn load4(fmt: u32, row: u32, k: u32) -> vec4<f32> {
    switch fmt {
        case FMT_F32: {
            return bitcast<vec4<f32>>(W[(row + k) >> 2u]);
        }
        case FMT_F16: {
            let i = row + (k >> 1u);
            return f16x4(w_word(i), w_word(i + 1u));
        }
        case FMT_BF16: {
            let i = row + (k >> 1u);
            return bf16x4(w_word(i), w_word(i + 1u));
        }
        case FMT_Q8_0: {
            let pair = row + (k >> 6u) * 17u;
            let e = k & 63u;
            if (e < 32u) {
                let d = unpack2x16float(w_word(pair)).x;
                let i = pair + (e >> 2u);
                // quants of block 0 sit 2 bytes into the pair: glue two half words
                let q = (w_word(i) >> 16u) | (w_word(i + 1u) << 16u);
                return d * i8x4(q);
            }
            let d = unpack2x16float(w_word(pair + 8u)).y;
            return d * i8x4(w_word(pair + 9u + ((e - 32u) >> 2u)));
        }
        default: {
            return quant_load4(fmt, row, k);
        }
    }
}
