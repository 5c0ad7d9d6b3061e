"""Weight quantization into ggml block formats, in NumPy.

`quantize(data, "Q4_K")` returns the bytes a GGUF file stores for `data` (rows along the last
axis); `dequantize(blocks, "Q4_K", shape)` turns them back into float32.

F32/F16/BF16/Q8_0/Q4_0 go through `gguf.quants`, which is byte-identical to ggml. gguf-py cannot
quantize the K-quants, so Q4_K, Q5_K and Q6_K are implemented here, following the choices of
ggml's reference quantizer (the path llama-quantize takes without an importance matrix):

* Q4_K / Q5_K: a 256-element super-block holds 8 sub-blocks of 32. Each sub-block gets an
  affine fit x ~ scale * q - min with q in [0, 15] (Q4_K) or [0, 31] (Q5_K), chosen by a small
  search over candidate scales that minimises the weighted squared error (weights |x| + rms).
  The 8 scales and 8 mins are then themselves quantized to 6 bits against one f16 `d` and
  one f16 `dmin` per super-block, and the q are recomputed against those rounded values.
* Q6_K: 16 sub-blocks of 16, symmetric q in [-32, 31], per-sub-block scale from a search
  weighted by x^2, scales quantized to int8 against one f16 `d`.

Every step is vectorised over all sub-blocks at once: the candidate search is a Python loop over
~20 candidates, each one NumPy pass over the whole chunk, so a 10240 x 2560 matrix takes
seconds. The searches add and multiply in the order ggml's C code does, so the blocks are not
just equivalent but byte-identical to llama-quantize's (tests/test_quant.py checks every
tensor of the fixtures). Blocks are laid out exactly as `gguf.quants`' decoders read them.
"""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

QK_K = 256  # elements per K-quant super-block
GROUP_MAX_EPS = np.float32(1e-15)  # below this a Q6_K group counts as all zero (as in ggml)

# Elements per quantize() work chunk: keeps the ~10 float32 temporaries of the K-quant search
# in cache-sized pieces (and the peak memory of a 65536 x 2560 head at a few tens of MB).
_CHUNK_ELEMENTS = 1 << 18

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K")


def to_qtype(name: str | GGMLQuantizationType) -> GGMLQuantizationType:
    """The gguf enum for a type name such as "Q4_K" (case-insensitive), checked to be supported."""
    if isinstance(name, GGMLQuantizationType):
        qtype = name
    else:
        try:
            qtype = GGMLQuantizationType[str(name).upper()]
        except KeyError:
            raise ValueError(f"unknown ggml type {name!r}; supported: {', '.join(SUPPORTED_TYPES)}") from None
    if qtype.name not in SUPPORTED_TYPES:
        raise ValueError(f"ggml type {qtype.name} is not supported here; supported: {', '.join(SUPPORTED_TYPES)}")
    return qtype


def row_nbytes(n: int, ggml_type: str | GGMLQuantizationType) -> int:
    """Bytes one row of `n` elements takes in the given type (n must be a multiple of the block)."""
    qtype = to_qtype(ggml_type)
    block, size = GGML_QUANT_SIZES[qtype]
    if n % block:
        raise ValueError(f"a row of {n} elements cannot be stored as {qtype.name}: rows must be a multiple of {block}")
    return n // block * size


def quantize(data: np.ndarray, ggml_type: str | GGMLQuantizationType) -> np.ndarray:
    """Quantize `data` (rows along the last axis) into uint8 blocks in GGUF file layout.

    Returns an array of shape `(*data.shape[:-1], row_nbytes(data.shape[-1], type))`.
    """
    qtype = to_qtype(ggml_type)
    data = np.asarray(data)
    if data.ndim == 0:
        raise ValueError("quantize needs at least a 1-D array")
    n = data.shape[-1]
    out_shape = (*data.shape[:-1], row_nbytes(n, qtype))
    if qtype == GGMLQuantizationType.F32:
        return np.ascontiguousarray(data, dtype=np.float32).view(np.uint8).reshape(out_shape)
    if qtype == GGMLQuantizationType.F16:
        return np.ascontiguousarray(data, dtype=np.float16).view(np.uint8).reshape(out_shape)
    if qtype.name not in _K_QUANTIZERS:
        return gguf_quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype).reshape(out_shape)

    quantize_blocks, type_size = _K_QUANTIZERS[qtype.name], GGML_QUANT_SIZES[qtype][1]
    flat = np.ascontiguousarray(data, dtype=np.float32).reshape(-1, QK_K)
    out = np.empty((flat.shape[0], type_size), dtype=np.uint8)
    step = max(1, _CHUNK_ELEMENTS // QK_K)
    for start in range(0, flat.shape[0], step):
        out[start:start + step] = quantize_blocks(flat[start:start + step])
    return out.reshape(out_shape)


def dequantize(blocks: np.ndarray, ggml_type: str | GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """Decode uint8 blocks of the given type back to a float32 array of `shape` (ggml-exact)."""
    qtype = to_qtype(ggml_type)
    raw = np.ascontiguousarray(blocks).view(np.uint8)
    expected = int(np.prod(shape[:-1], dtype=np.int64)) * row_nbytes(shape[-1], qtype)
    if raw.size != expected:
        raise ValueError(f"{qtype.name} data of {raw.size} bytes does not hold shape {tuple(shape)} ({expected} bytes expected)")
    rows = raw.reshape(-1, row_nbytes(shape[-1], qtype))
    return np.asarray(gguf_quants.dequantize(rows, qtype), dtype=np.float32).reshape(shape)


# ---------------------------------------------------------------------------------------------
# shared pieces


def _sum_in_order(a: np.ndarray) -> np.ndarray:
    """Column sums of a (k, m) float32 array, added top to bottom like ggml's C loops.

    np.sum adds pairwise, which rounds differently; the candidate searches compare errors that
    are often within an ulp of each other, so matching the order is what makes these blocks
    byte-identical to llama-quantize's (checked against the fixtures in tests/test_quant.py).
    The products fed in must also be formed in ggml's order (e.g. (w*l)*x, not w*(l*x)).
    Groups are columns so each of the k - 1 additions runs over contiguous memory.
    """
    acc = a[0].copy()
    for row in a[1:]:
        acc += row
    return acc


def _f16_round(x: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest f16 and back: what a stored f16 scale will decode to."""
    return x.astype(np.float16).astype(np.float32)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """(n,) float32 -> (n, 2) little-endian f16 bytes."""
    return x.astype("<f2").view(np.uint8).reshape(-1, 2)


def _fit_affine(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit x ~ scale * q + offset, q in [0, nmax] integers, offset <= 0, per column of x (k, m).

    Tries the plain min/max grid and `nstep + 1` slightly stretched ones; for each it solves the
    weighted least-squares scale and offset for the rounded q, and keeps the candidate with the
    smallest weighted squared error. Returns (scale, -offset, q) with -offset >= 0.
    """
    lo = np.minimum(x.min(axis=0), np.float32(0))  # an all-positive group still starts at 0
    hi = x.max(axis=0)
    flat = hi == lo  # all equal (or all zero): nothing to fit, q = 0, the offset carries it
    sum_w = _sum_in_order(w)
    sum_wx = _sum_in_order(w * x)
    fnmax = np.float32(nmax)

    iscale = fnmax / np.where(flat, np.float32(1), hi - lo)
    scale = np.float32(1) / iscale
    q = np.clip(np.rint(iscale * (x - lo)), 0, nmax)
    offset = lo
    err = _sum_in_order(w * np.square(scale * q + lo - x))

    for step in range(nstep + 1):
        # The grid starts at the best offset found so far (as ggml's search does), so each
        # candidate depends on the previous winners.
        span = np.where(flat, np.float32(1), hi - offset)
        stretch = np.float32(rmin) + np.float32(rdelta) * np.float32(step) + fnmax
        iscale = stretch / span
        cand = np.clip(np.rint(iscale * (x - offset)), 0, nmax)
        wq = w * cand
        sum_l = _sum_in_order(wq)
        sum_l2 = _sum_in_order(wq * cand)
        sum_xl = _sum_in_order(wq * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe_det = np.where(ok, det, np.float32(1))
        c_scale = (sum_w * sum_xl - sum_wx * sum_l) / safe_det
        c_offset = (sum_l2 * sum_wx - sum_l * sum_xl) / safe_det
        # A positive offset cannot be stored (mins are subtracted): refit with offset 0.
        pos = c_offset > 0
        c_scale = np.where(pos, sum_xl / np.where(sum_l2 > 0, sum_l2, np.float32(1)), c_scale)
        c_offset = np.where(pos, np.float32(0), c_offset)
        c_err = _sum_in_order(w * np.square(c_scale * cand + c_offset - x))
        better = ok & ~flat & (c_err < err)
        err = np.where(better, c_err, err)
        scale = np.where(better, c_scale, scale)
        offset = np.where(better, c_offset, offset)
        q = np.where(better, cand, q)

    scale = np.where(flat, np.float32(0), scale)
    q = np.where(flat, np.float32(0), q)
    return scale.astype(np.float32), (-offset).astype(np.float32), q


def _columns(blocks: np.ndarray, group: int) -> np.ndarray:
    """(n, 256) super-blocks -> (group, n * 256 / group): one column per sub-block of `group`."""
    return np.ascontiguousarray(blocks.reshape(-1, group).T)


def _quantize_6bit(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, map non-negative values to integers 0..63 against the row maximum.

    Returns (levels as uint8, step = max / 63 as float32); a row of zeros gets step 0.
    """
    vmax = np.maximum(values.max(axis=1), np.float32(0))
    positive = vmax > 0
    inv = np.where(positive, np.float32(63) / np.where(positive, vmax, np.float32(1)), np.float32(0))
    levels = np.clip(np.rint(inv[:, None] * values), 0, 63).astype(np.uint8)
    return levels, (vmax / np.float32(63)).astype(np.float32)


def _pack_scales_mins(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Pack 8 six-bit scales and 8 six-bit mins per super-block into the 12-byte K-quant layout.

    Bytes 0-3: scale j (low 6 bits) with bits 4-5 of scale j+4 on top; bytes 4-7: the same for
    the mins; bytes 8-11: the low nibbles of scale j+4 and min j+4.
    """
    lo_s, hi_s = ls[:, :4], ls[:, 4:]
    lo_m, hi_m = lm[:, :4], lm[:, 4:]
    first = lo_s | ((hi_s >> 4) << 6)
    second = lo_m | ((hi_m >> 4) << 6)
    third = (hi_s & 0x0F) | ((hi_m & 0x0F) << 4)
    return np.concatenate([first, second, third], axis=1).astype(np.uint8)


def _affine_superblocks(blocks: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Common Q4_K/Q5_K work: fit the sub-blocks, round scales/mins to 6 bits + f16, requantize.

    Returns (header bytes (n, 16): d, dmin, 12 scale bytes; q (n, 256) integers in [0, nmax]).
    """
    n = blocks.shape[0]
    cols = _columns(blocks, 32)
    rms = np.sqrt(_sum_in_order(np.square(cols)) / np.float32(32))
    weights = rms + np.abs(cols)
    scale, mins, q_fit = _fit_affine(cols, weights, nmax, rmin, rdelta, nstep)

    ls, d = _quantize_6bit(scale.reshape(n, 8))
    lm, dmin = _quantize_6bit(mins.reshape(n, 8))

    # Requantize against the scales as they will be decoded.
    step = (_f16_round(d)[:, None] * ls).reshape(-1)
    offset = (_f16_round(dmin)[:, None] * lm).reshape(-1)
    usable = step != 0
    q = np.clip(np.rint((cols + offset) / np.where(usable, step, np.float32(1))), 0, nmax)
    # A sub-block whose scale rounded to zero decodes to -offset whatever q holds; keep the fit's q.
    q = np.where(usable, q, q_fit).astype(np.uint8).T.reshape(n, QK_K)

    header = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_mins(ls, lm)], axis=1)
    return header, q


# ---------------------------------------------------------------------------------------------
# the three K-quant formats


def _quantize_q4_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> (n, 144) Q4_K blocks: d, dmin, scales[12], qs[128]."""
    header, q = _affine_superblocks(blocks, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20)
    # qs byte 32*g + l holds element 64*g + l (low nibble) and 64*g + 32 + l (high nibble).
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(-1, 128)
    return np.concatenate([header, qs], axis=1)


def _quantize_q5_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> (n, 176) Q5_K blocks: d, dmin, scales[12], qh[32], qs[128]."""
    header, q = _affine_superblocks(blocks, nmax=31, rmin=-0.5, rdelta=0.1, nstep=15)
    low = (q & 0x0F).reshape(-1, 4, 2, 32)
    qs = (low[:, :, 0, :] | (low[:, :, 1, :] << 4)).reshape(-1, 128)
    # Bit s of qh[l] is the fifth bit of element 32*s + l.
    high = (q >> 4).reshape(-1, 8, 32)
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for s in range(8):
        qh |= high[:, s, :] << s
    return np.concatenate([header, qh, qs], axis=1)


def _fit_symmetric(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Fit x ~ scale * q, q in [-nmax, nmax - 1], weighted by x^2, per column of x (k, m).

    The grid is anchored on the largest-magnitude element (mapped to -nmax, so the extra negative
    level goes to it); 18 nearby grids are tried and the least-squares scale of the best kept.
    Returns (scale, q) with q already offset by +nmax into [0, 2*nmax - 1].
    """
    idx = np.abs(x).argmax(axis=0)
    peak = np.take_along_axis(x, idx[None, :], axis=0)[0]
    zero = np.abs(peak) < GROUP_MAX_EPS
    safe_peak = np.where(zero, np.float32(1), peak)
    w = x * x
    wx = w * x
    fnmax = np.float32(nmax)

    def grid(iscale):
        cand = np.clip(np.rint(iscale * x), -nmax, nmax - 1)
        return cand, _sum_in_order(wx * cand), _sum_in_order((w * cand) * cand)

    q, sum_lx, sum_l2 = grid(-fnmax / safe_peak)
    scale = np.where(sum_l2 > 0, sum_lx / np.where(sum_l2 > 0, sum_l2, np.float32(1)), np.float32(0))
    best = scale * sum_lx
    for step in range(-9, 10):
        if step == 0:
            continue
        cand, c_lx, c_l2 = grid(-(fnmax + np.float32(0.1) * np.float32(step)) / safe_peak)
        # Larger sum_lx^2 / sum_l2 means smaller weighted error sum w (x - s q)^2 at the optimal s.
        better = (c_l2 > 0) & (c_lx * c_lx > best * c_l2)
        c_scale = c_lx / np.where(c_l2 > 0, c_l2, np.float32(1))
        scale = np.where(better, c_scale, scale)
        best = np.where(better, c_scale * c_lx, best)
        q = np.where(better, cand, q)

    scale = np.where(zero, np.float32(0), scale).astype(np.float32)
    q = np.where(zero, np.float32(0), q + fnmax)
    return scale, q


def _quantize_q6_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> (n, 210) Q6_K blocks: ql[128], qh[64], scales[16] int8, d."""
    n = blocks.shape[0]
    cols = _columns(blocks, 16)
    scale, q_fit = _fit_symmetric(cols, 32)
    scale = scale.reshape(n, 16)

    # The block scale is anchored on the largest-magnitude sub-block scale, mapped to -128.
    idx = np.abs(scale).argmax(axis=1)
    peak = np.take_along_axis(scale, idx[:, None], axis=1)[:, 0]
    empty = np.abs(peak) < GROUP_MAX_EPS
    iscale = np.float32(-128) / np.where(empty, np.float32(1), peak)
    d = np.where(empty, np.float32(0), np.float32(1) / iscale).astype(np.float32)
    sc = np.clip(np.rint(iscale[:, None] * scale), -128, 127)
    sc = np.where(empty[:, None], np.float32(0), sc)

    step = (_f16_round(d)[:, None] * sc).reshape(-1)
    usable = step != 0
    q = np.clip(np.rint(cols / np.where(usable, step, np.float32(1))), -32, 31) + np.float32(32)
    q = np.where(usable, q, q_fit).astype(np.uint8).T.reshape(n, QK_K)
    q = np.where(empty[:, None], np.uint8(0), q)  # an all-zero super-block is stored as all zero bytes

    # Element 128*a + 32*k + l: low nibble in ql[64*a + 32*(k % 2) + l] (k < 2: low half of the
    # byte, else high half), top two bits in qh[32*a + l] at bit 2*k.
    q = q.reshape(n, 2, 4, 32)
    low, high = q & 0x0F, q >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return np.concatenate([
        ql.reshape(n, 128), qh.reshape(n, 64), sc.astype(np.int8).view(np.uint8), _f16_bytes(d),
    ], axis=1)


_K_QUANTIZERS = {
    "Q4_K": _quantize_q4_k_blocks,
    "Q5_K": _quantize_q5_k_blocks,
    "Q6_K": _quantize_q6_k_blocks,
}
