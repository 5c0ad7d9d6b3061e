// weights.wgsl: reading weight rows in their file format (a library, prepended by kernels.py
// to matvec.wgsl, gemm.wgsl and embed.wgsl, which declare the binding it reads:
//   W: array<vec4<u32>>   one weight matrix, or a range of its rows, in format FMT).
// quants.wgsl, always prepended right after it, decodes FMT 4..7 (Q4_0, Q4_K, Q5_K, Q6_K).
//
// Every format is read as u32 words, so one binding type serves them all and the portable path
// needs neither shader-f16 nor 8-bit storage. Rows start on a 16-byte boundary in every format
// but those read in pairs of blocks (Q4_0, Q6_K: rows start on a word); the host's row pitch is
// kernels.row_words, its layout kernels.rows_for_gpu.
//
//   FMT 0  F32    a row of K elements is K words.
//   FMT 1  F16    K/2 words; element 2i in the low half of word i (unpack2x16float).
//   FMT 2  BF16   K/2 words; a bf16 is the high half of an f32, so shifting it up is exact.
//   FMT 3  Q8_0   blocks of 32 elements: f16 scale d, then 32 int8 q (34 bytes in the file);
//                 value d * q. 34 bytes do not align, so the loader regroups each row into
//                 SUPER-BLOCKS of 8 blocks (256 elements, 272 bytes = 17 vec4): vec4 0 holds
//                 the 8 scales (block b's in half b % 2 of word b / 2), vec4s 1..16 the 256
//                 quants in order. A row is ceil(K / 256) super-blocks (a short last one is
//                 zero-padded; readers stop at K). Every 16 quants are one aligned vec4, so a
//                 mat-vec lane reads 16 bytes per load and neighbouring lanes read neighbouring
//                 vec4s (coalesced), which the file's 34-byte blocks never allow.
//   FMT 4..7  Q4_0, Q4_K, Q5_K, Q6_K: blocks as in the file (Q4_0 and Q6_K in pairs, like
//                 Q8_0); see quants.wgsl, which load4 hands them to.
//
// A "piece" is what one thread decodes per step of a mat-vec loop: piece_elems(fmt) elements
// (F32 4, F16 and BF16 8: one vec4; Q8_0 16: one vec4 of quants and its scale; the formats of
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
        case FMT_Q8_0: { return 16u; }
        default: { return 64u; }  // the formats of quants.wgsl
    }
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

// Block b's scale from the scale word holding blocks b & ~1 and b | 1.
fn q8_0_scale(w: u32, b: u32) -> f32 {
    let d = unpack2x16float(w);
    return select(d.x, d.y, (b & 1u) == 1u);
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
            let sb = row + (k >> 8u) * 68u;  // super-block: 4 words of scales, 64 of quants
            let e = k & 255u;
            let d = q8_0_scale(w_word(sb + (e >> 6u)), e >> 5u);
            return d * i8x4(w_word(sb + 4u + (e >> 2u)));
        }
        default: {
            return quant_load4(fmt, row, k);
        }
    }
}
