"""Q4_0, Q4_K, Q5_K and Q6_K on the GPU: the host side of shaders/quants.wgsl.

The kernels read these formats' blocks exactly as a GGUF file stores them. This module says how
a row is laid out on the GPU (`row_words`, `rows_for_gpu`: rows padded to whole pairs of blocks
where a block is not a whole number of words), which elements each mat-vec piece covers
(`piece_columns`, the contract of shaders/quants_dot.wgsl), and runs the decoders alone through
the test kernels of shaders/dequant.wgsl (`gpu_dequantize`, `gpu_piece_dots`), which
tests/test_quant_kernels.py compares with gguf-py's dequantizer. kernels.py takes the formats'
FMT codes, row pitch and padding from here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rwkvlab import gpu as gpu_runtime

PIECE = 64  # elements per mat-vec piece, in every format of quants_dot.wgsl


class QuantLayoutError(ValueError):
    """A tensor cannot be laid out in a quantized GPU format (the message says why)."""


@dataclass(frozen=True)
class QuantLayout:
    """How one ggml block format sits in the u32 words the kernels read."""

    name: str
    fmt: int  # the FMT override constant of weights.wgsl / quants.wgsl
    block: int  # elements per block
    block_bytes: int
    group: int  # blocks read together: 2 when a block is not a whole number of words

    @property
    def group_elems(self) -> int:
        return self.block * self.group

    @property
    def group_words(self) -> int:
        return self.block_bytes * self.group // 4


LAYOUTS: dict[str, QuantLayout] = {
    "Q4_0": QuantLayout("Q4_0", 4, 32, 18, 2),  # pairs: 36 bytes = 9 words
    "Q4_K": QuantLayout("Q4_K", 5, 256, 144, 1),  # 36 words
    "Q5_K": QuantLayout("Q5_K", 6, 256, 176, 1),  # 44 words
    "Q6_K": QuantLayout("Q6_K", 7, 256, 210, 2),  # pairs: 420 bytes = 105 words
}

# Format name -> FMT constant, for kernels.GPU_FORMATS.
QUANT_FORMATS: dict[str, int] = {name: lay.fmt for name, lay in LAYOUTS.items()}


def layout(fmt: str) -> QuantLayout:
    """The layout of a quantized format, or an error listing the ones the kernels read."""
    try:
        return LAYOUTS[fmt]
    except KeyError:
        raise QuantLayoutError(f"no quantized GPU layout for {fmt!r}; quants.wgsl reads "
                               f"{', '.join(LAYOUTS)}") from None


def check_row_length(fmt: str, K: int, what: str = "a tensor") -> None:
    """Raise unless rows of K elements are whole blocks of `fmt` (ggml guarantees it in files)."""
    lay = layout(fmt)
    if K <= 0 or K % lay.block:
        raise QuantLayoutError(f"{what}: rows of {K} elements are not whole {fmt} blocks of "
                               f"{lay.block}; a GGUF writer should have stored it in another type")


def row_words(fmt: str, K: int) -> int:
    """u32 words per row of K elements on the GPU (whole pairs for Q4_0 and Q6_K)."""
    check_row_length(fmt, K)
    lay = layout(fmt)
    return -(-K // lay.group_elems) * lay.group_words


def rows_for_gpu(raw: np.ndarray, fmt: str, K: int) -> np.ndarray:
    """File rows (uint8 [n, K / block * block_bytes]) as the kernels read them: the blocks
    unchanged, a row with an odd number of Q4_0 / Q6_K blocks followed by one zero block."""
    lay = layout(fmt)
    check_row_length(fmt, K)
    raw = np.asarray(raw).view(np.uint8).reshape(-1, K // lay.block * lay.block_bytes)
    width = row_words(fmt, K) * 4
    if raw.shape[1] == width:
        return raw
    out = np.zeros((raw.shape[0], width), dtype=np.uint8)
    out[:, : raw.shape[1]] = raw
    return out


def piece_count(K: int) -> int:
    """Mat-vec pieces per row of K elements (quant_pieces in quants_dot.wgsl)."""
    return -(-K // PIECE)


def piece_columns(fmt: str, K: int, i: int) -> np.ndarray:
    """The columns of a row that piece i covers in quants_dot.wgsl (for tests and readers):
    [64i, 64i + 64) clipped to K, except Q6_K, whose piece i takes four runs of 16 of its
    block's half: 256b + 128h + 32t + 16r + j (b = i // 4, h = i // 2 % 2, r = i % 2)."""
    layout(fmt)
    if fmt != "Q6_K":
        return np.arange(PIECE * i, min(PIECE * (i + 1), K))
    base = 256 * (i // 4) + 128 * (i // 2 % 2) + 16 * (i % 2)
    return (base + 32 * np.arange(4)[:, None] + np.arange(16)[None, :]).ravel()


# ----------------------------------------------------------------------------------------------
# The decoders alone on the GPU (shaders/dequant.wgsl)

_TEST_LIBS = ("weights.wgsl", "quants.wgsl", "quants_dot.wgsl", "dequant.wgsl")
_PIPELINES: dict[tuple[int, str, int, int], tuple[object, object]] = {}


def _pipeline(gpu, entry: str, fmt: str, nr: int = 1) -> tuple[object, object]:
    """(pipeline, bind group layout) of dequant.wgsl's `entry` for `fmt` (and NR rows per
    quant_dot call) on this device (built once). The layout is explicit: "auto" would drop X
    from the dequant entry, which ignores it."""
    from rwkvlab import kernels as kn

    key = (id(gpu.device), entry, layout(fmt).fmt, nr)
    if key not in _PIPELINES:
        d = gpu.device
        code = "\n".join(f"// ---- {name} ----\n{kn.shader_source(name)}" for name in _TEST_LIBS)
        kinds = ("uniform", "read-only-storage",
                 "read-only-storage", "storage")
        bgl = d.create_bind_group_layout(entries=[
            {"binding": i, "visibility": gpu_runtime.COMPUTE_STAGE, "buffer": {"type": k}}
            for i, k in enumerate(kinds)])
        pipe = d.create_compute_pipeline(
            label=f"{entry}.{fmt}", layout=d.create_pipeline_layout(bind_group_layouts=[bgl]),
            compute={"module": d.create_shader_module(label="dequant.wgsl", code=code),
                     "entry_point": entry, "constants": {"FMT": key[2], "NR": nr}})
        _PIPELINES[key] = (pipe, bgl)
    return _PIPELINES[key]


def _run(gpu, entry: str, fmt: str, raw: np.ndarray, K: int, x: np.ndarray | None,
         out_cols: int, groups_x: int, nr: int = 1) -> np.ndarray:

    d = gpu.device
    rows = rows_for_gpu(raw, fmt, K)
    n = rows.shape[0]
    storage = gpu_runtime.STORAGE
    params = np.array([n, K, row_words(fmt, K), 0], dtype=np.uint32)
    xs = np.zeros(K, np.float32) if x is None else np.ascontiguousarray(x, dtype=np.float32)
    bufs = [
        d.create_buffer_with_data(data=params.tobytes(), usage=gpu_runtime.UNIFORM),
        d.create_buffer_with_data(data=np.ascontiguousarray(rows).tobytes(), usage=storage),
        d.create_buffer_with_data(data=xs.tobytes(), usage=storage),
        d.create_buffer(size=max(16, n * out_cols * 4), usage=storage | gpu_runtime.COPY_SRC),
    ]
    pipe, bgl = _pipeline(gpu, entry, fmt, nr)
    bg = d.create_bind_group(layout=bgl, entries=[
        {"binding": b, "resource": {"buffer": buf}} for b, buf in enumerate(bufs)])
    enc = d.create_command_encoder()
    cp = enc.begin_compute_pass()
    cp.set_pipeline(pipe)
    cp.set_bind_group(0, bg)
    cp.dispatch_workgroups(groups_x, -(-n // nr))
    cp.end()
    d.queue.submit([enc.finish()])
    out = np.frombuffer(d.queue.read_buffer(bufs[3]), dtype=np.float32)[: n * out_cols]
    return out.reshape(n, out_cols).copy()


def gpu_dequantize(gpu, raw: np.ndarray, fmt: str, K: int) -> np.ndarray:
    """Rows of `fmt` blocks (uint8 [n, row bytes], as in the file) decoded by quant_load4:
    float32 [n, K]. One dispatch; n must fit one dispatch dimension (65535 rows)."""
    return _run(gpu, "dequant", fmt, raw, K, None, K, -(-K // 256))


def gpu_piece_dots(gpu, raw: np.ndarray, fmt: str, K: int, x: np.ndarray, nr: int = 1) -> np.ndarray:
    """Every mat-vec piece of every row dotted with x [K] by quant_dot: float32
    [n, piece_count(K)]; piece i covers piece_columns(fmt, K, i). With nr = 2 or 4 each call
    takes nr rows at once (rows r * nr .. r * nr + nr - 1), as the mat-vec does."""
    n_pieces = piece_count(K)
    return _run(gpu, "dot_pieces", fmt, raw, K, x, n_pieces, -(-n_pieces // 64), nr)
