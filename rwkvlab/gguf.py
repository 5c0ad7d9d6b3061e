"""Reading RWKV-7 GGUF files: the model spec, every tensor as a memory-mapped view, the vocab.

`read_model(path)` is the one entry point. It checks everything the engine relies on (the
architecture, the hyper-parameters, every tensor's presence, shape and type) and raises
`GGUFError` with a message that names the file and the key / tensor / type at fault, so a user
never has to read a NumPy traceback to learn that a download was cut short.

Shapes are NumPy row-major, i.e. GGUF's `ne` reversed, and normalised: 1-D mixes are `(C,)`,
the six token-shift mixes are `(6, C)`, and a matrix is `(M, K)`, used as `y = W @ x` (K -> M),
with quant blocks running along K. See /work/shared/reference/rwkv7-gguf.md for the contract.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize as _gguf_dequantize

ARCH = "rwkv7"
SUPPORTED_TYPES: tuple[str, ...] = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K")
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
# Arrays longer than this are summarised in Model.metadata (the vocab is kept in Model.vocab).
_METADATA_ARRAY_MAX = 16


class GGUFError(ValueError):
    """A GGUF file the lab cannot use; the message names the file and what is wrong in it."""


@dataclass(frozen=True)
class ModelSpec:
    """The hyper-parameters of an RWKV-7 model, as read from its GGUF metadata."""

    n_embd: int  # C
    n_layer: int  # L
    n_ffn: int  # F
    head_size: int  # N (64)
    n_head: int  # H = C // N (rwkv7.attention.head_count is written as 0, so never read)
    rank_decay: int  # Dw
    rank_iclr: int  # Da
    rank_value: int  # Dv
    rank_gate: int  # Dg
    n_vocab: int  # V
    eps: float  # LayerNorm eps (rwkv7.attention.layer_norm_epsilon)
    name: str  # general.name, or the file stem when absent


@dataclass(frozen=True, eq=False)  # eq=False: compared by identity (NumPy arrays have no ==)
class Tensor:
    """One tensor of the file: its bytes stay in the memory map until someone dequantizes them."""

    name: str
    ggml_type: str  # one of SUPPORTED_TYPES
    shape: tuple[int, ...]  # normalised row-major shape (see the module docstring)
    raw: np.ndarray  # the tensor's bytes in the file: uint8, 1-D, a read-only memmap view

    def dequantize(self) -> np.ndarray:
        """The tensor as float32 in `shape` (bit-exact with ggml; F32 is a read-only view)."""
        qtype = GGMLQuantizationType[self.ggml_type]
        if qtype == GGMLQuantizationType.F32:
            return self.raw.view(np.float32).reshape(self.shape)
        if qtype == GGMLQuantizationType.F16:
            return self.raw.view(np.float16).astype(np.float32).reshape(self.shape)
        # gguf-py's block decoders take rows of bytes; each row holds K elements' blocks.
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        row_bytes = self.shape[-1] // block * block_bytes
        rows = self.raw.reshape(-1, row_bytes)
        return _gguf_dequantize(rows, qtype).astype(np.float32, copy=False).reshape(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the tensor in the file, in bytes."""
        return int(self.raw.nbytes)

    @property
    def n_elements(self) -> int:
        """Number of values the tensor holds."""
        return int(np.prod(self.shape))


@dataclass
class Model:
    """A parsed, validated RWKV-7 GGUF file. Tensors are views into the file's memory map."""

    path: Path
    spec: ModelSpec
    tensors: dict[str, Tensor]  # every tensor in the file, by GGUF name
    vocab: list[bytes]  # token id -> its bytes (escapes decoded)
    metadata: dict[str, object]  # every key -> Python value (long arrays summarised)

    def tensor(self, name: str) -> Tensor:
        """The tensor called `name`; GGUFError naming it and the file if the file lacks it."""
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: no tensor named {name!r} in this file") from None


# ----------------------------------------------------------------------------------------------
# Parsing


class _Truncated(Exception):
    def __init__(self, offset: int, end: int, size: int) -> None:
        super().__init__(offset, end, size)
        self.offset, self.end, self.size = offset, end, size


class _HeaderReader(GGUFReader):
    """GGUFReader that parses only the header, fast, and reports reads past the end of the file.

    gguf-py silently returns short arrays when a header field runs past the end of a cut-off
    file (and then fails somewhere unrelated), and builds its tensor list in one go, raising on
    the first odd tensor without saying which. We override three of its internal helpers:
    `_get` (detect truncation where it happens), `_build_tensors` (keep the raw tensor infos so
    each tensor is checked, and reported, by name) and `_get_field_parts` (read metadata arrays
    in one pass). tests/test_gguf.py checks the result against gguf-py's own reader, so an
    upgrade that changes those helpers fails loudly there.

    One difference in what it builds: an array of scalars is a single part holding all values,
    so `contents()` of the whole field is right but `contents(i)` is not; nothing here uses it.
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > len(self.data):
            raise _Truncated(int(offset), end, len(self.data))
        return super()._get(offset, dtype, count, override_order)

    def _build_tensors(self, start_offs, fields) -> None:
        self.tensor_infos = fields
        self.tensor_data_start = int(start_offs)

    def _get_field_parts(self, orig_offs, raw_type):
        # gguf-py makes NumPy views for every element of an array, which takes ~1.5 s for a
        # 65536-token vocab on a slow core: most of a model's load time before any weight moves.
        # Arrays of scalars and of strings are read here in one pass, in the same parts layout
        # (array of strings: one uint8 part per string) so ReaderField.contents() still works.
        if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        item_type, count = GGUFValueType(int(raw_itype[0])), int(alen[0])
        types, offs = [GGUFValueType.ARRAY, item_type], orig_offs + 12
        scalar = self.gguf_scalar_to_np.get(item_type)
        if scalar is not None:
            values = self._get(offs, scalar, count)
            return 12 + int(values.nbytes), [raw_itype, alen, values], [2], types
        if item_type != GGUFValueType.STRING:
            return super()._get_field_parts(orig_offs, raw_type)
        buf = self.data.view(np.ndarray)  # slicing the memmap subclass itself is ~10x slower
        size, header = len(buf), memoryview(buf)
        parts, idxs = [raw_itype, alen], []
        for _ in range(count):
            if offs + 8 > size:
                raise _Truncated(offs, offs + 8, size)
            start = offs + 8
            offs = start + int.from_bytes(header[offs:start], sys.byteorder)
            if offs > size:
                raise _Truncated(start, offs, size)
            idxs.append(len(parts))
            parts.append(buf[start:offs])
        return offs - orig_offs, parts, idxs, types


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    ne: tuple[int, ...]  # GGUF order: fastest dimension first
    type_id: int
    offset: int  # absolute byte offset in the file


def _open(path: Path) -> _HeaderReader:
    """Parse the header of `path`, turning every way it can fail into a GGUFError."""
    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    if not path.is_file():
        raise GGUFError(f"{path}: is not a file (expected a .gguf model file)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
    magic = GGUF_MAGIC.to_bytes(4, "little")
    if len(head) < 4 or head != magic:
        raise GGUFError(
            f"{path} is not a GGUF file (bad magic {head!r}, expected {magic!r}; {size} bytes)"
        )
    try:
        return _HeaderReader(path)
    except _Truncated as e:
        raise GGUFError(
            f"{path} is truncated: its header needs bytes up to offset {e.end} but the file "
            f"ends at {e.size}; download or convert it again"
        ) from None
    except (ValueError, KeyError, IndexError, OverflowError, MemoryError) as e:
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field_value(field) -> object:
    """A metadata field as a plain Python value; long arrays become a short summary string."""
    types = field.types
    if types and types[0] == GGUFValueType.ARRAY:
        sub = types[-1].name if len(types) > 1 else "?"
        # Scalar arrays are one part holding every value (see _HeaderReader); strings one each.
        n = sum(int(field.parts[i].size) for i in field.data) if sub != "STRING" else len(field.data)
        if n > _METADATA_ARRAY_MAX:
            return f"[{n} x {sub}]"
    if types and types[0] == GGUFValueType.STRING:
        return _text(field)
    try:
        return field.contents()
    except UnicodeDecodeError:  # a short array of strings with invalid UTF-8
        return f"[{len(field.data)} x STRING, not valid UTF-8]"


def _tensor_infos(reader: _HeaderReader) -> list[_TensorInfo]:
    infos = []
    for field in reader.tensor_infos:
        _len, _name, _ndims, dims, type_id, offset = field.parts
        infos.append(_TensorInfo(
            name=field.name,
            ne=tuple(int(d) for d in dims),
            type_id=int(type_id[0]),
            offset=reader.tensor_data_start + int(offset[0]),
        ))
    return infos


def _text(field) -> str:
    """A string field's value; invalid UTF-8 is replaced rather than raised (it is only shown)."""
    if field.types and field.types[0] == GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8", errors="replace")
    return repr(field.contents())


def _metadata_int(path: Path, reader: _HeaderReader, key: str) -> int:
    field = reader.fields.get(key)
    if field is None:
        raise GGUFError(f"{path}: metadata key {key!r} is missing; an RWKV-7 GGUF file needs it "
                        "(convert the model again with llama.cpp's convert_hf_to_gguf.py)")
    value = field.contents()
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise GGUFError(f"{path}: metadata key {key!r} should be a non-negative integer, found {value!r}")
    return value


def _read_spec(path: Path, reader: _HeaderReader, n_vocab: int) -> ModelSpec:
    def key(k: str) -> int:
        return _metadata_int(path, reader, f"{ARCH}.{k}")

    n_embd, head_size = key("embedding_length"), key("wkv.head_size")
    if head_size == 0 or n_embd % head_size:
        raise GGUFError(f"{path}: embedding length {n_embd} is not a multiple of the head size "
                        f"{head_size} ({ARCH}.wkv.head_size); the file's metadata is inconsistent")
    eps_field = reader.fields.get(f"{ARCH}.attention.layer_norm_epsilon")
    # llama.cpp silently uses 0 when the key is absent; match it so the oracle agrees with it.
    eps = eps_field.contents() if eps_field is not None else 0.0
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise GGUFError(f"{path}: metadata key '{ARCH}.attention.layer_norm_epsilon' should be a "
                        f"non-negative number, found {eps!r}")
    eps = float(eps)
    name_field = reader.fields.get("general.name")
    name = _text(name_field) if name_field is not None else path.stem
    return ModelSpec(
        n_embd=n_embd,
        n_layer=key("block_count"),
        n_ffn=key("feed_forward_length"),
        head_size=head_size,
        n_head=n_embd // head_size,
        rank_decay=key("attention.decay_lora_rank"),
        rank_iclr=key("attention.iclr_lora_rank"),
        rank_value=key("attention.value_residual_mix_lora_rank"),
        rank_gate=key("attention.gate_lora_rank"),
        n_vocab=n_vocab,
        eps=eps,
        name=name,
    )


def unescape_token(text: str) -> bytes:
    """Decode one rwkv vocab entry: a Python-escaped byte string (`repr(bytes)[2:-1]`).

    `\\t \\n \\r` are control bytes, `\\xHH` is one byte, and `\\` before any other character
    is that character (so `\\\\` is a backslash and `\\'` a quote). Raises ValueError on a
    dangling backslash or a bad hex escape.
    """
    if "\\" not in text:
        return text.encode("utf-8")
    out = bytearray()
    i, n = 0, len(text)
    controls = {"t": 9, "n": 10, "r": 13}
    while i < n:
        c = text[i]
        if c != "\\":
            out += c.encode("utf-8")
            i += 1
            continue
        if i + 1 >= n:
            raise ValueError(f"dangling backslash at the end of {text!r}")
        e = text[i + 1]
        if e in controls:
            out.append(controls[e])
            i += 2
        elif e == "x":
            hex_digits = text[i + 2 : i + 4]
            try:
                if len(hex_digits) != 2:
                    raise ValueError
                out.append(int(hex_digits, 16))
            except ValueError:
                raise ValueError(f"bad \\x escape {text[i:i + 4]!r} in {text!r}") from None
            i += 4
        else:
            out += e.encode("utf-8")
            i += 2
    return bytes(out)


def _read_vocab(path: Path, reader: _HeaderReader) -> list[bytes]:
    model_field = reader.fields.get("tokenizer.ggml.model")
    if model_field is not None and _text(model_field) != "rwkv":
        raise GGUFError(f"{path}: tokenizer.ggml.model is {_text(model_field)!r}; "
                        "only the 'rwkv' (world) tokenizer is supported")
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None:
        raise GGUFError(f"{path}: metadata key 'tokenizer.ggml.tokens' is missing; the vocab is "
                        "needed to tokenize prompts (convert the model again with llama.cpp)")
    vocab = []
    for token_id, idx in enumerate(field.data):
        raw = bytes(field.parts[idx])
        try:
            vocab.append(unescape_token(raw.decode("utf-8")))
        except (UnicodeDecodeError, ValueError) as e:
            raise GGUFError(f"{path}: vocab entry {token_id} ({raw!r}) is not a valid "
                            f"escaped rwkv token: {e}") from None
    return vocab


def _normalised_shape(ne: tuple[int, ...]) -> tuple[int, ...]:
    # Mixes are declared with unit axes ([C,1,1,6], [C,1,1]); dropping them gives (6, C) and
    # (C,). No real RWKV-7 matrix has a dimension of 1, so this never folds a matrix.
    shape = tuple(d for d in reversed(ne) if d != 1)
    return shape or (1,)


def _make_tensor(path: Path, reader: _HeaderReader, info: _TensorInfo) -> Tensor:
    try:
        qtype = GGMLQuantizationType(info.type_id)
        type_name = qtype.name
    except ValueError:
        qtype, type_name = None, f"id {info.type_id} (unknown to gguf-py)"
    if qtype is None or type_name not in SUPPORTED_TYPES:
        raise GGUFError(f"{path}: tensor {info.name!r} has ggml type {type_name}, which rwkvlab "
                        f"does not support; supported: {', '.join(SUPPORTED_TYPES)} (re-quantize "
                        "the model with llama-quantize to one of those)")
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    k = info.ne[0] if info.ne else 1
    if k % block:
        need = "K-quants need" if type_name in K_QUANTS else f"{type_name} needs"
        raise GGUFError(f"{path}: tensor {info.name!r} is {type_name} with rows of {k} elements "
                        f"(ne[0]); {need} rows that are a multiple of {block} (use Q8_0, Q4_0 or "
                        "a float type for this tensor)")
    n_elements = math.prod(info.ne)  # Python ints: a corrupt ne cannot overflow
    nbytes = n_elements // block * block_bytes
    end = info.offset + nbytes
    if end > len(reader.data):
        raise GGUFError(f"{path} is truncated: tensor {info.name!r} needs bytes {info.offset}.."
                        f"{end} but the file ends at {len(reader.data)}; download it again")
    raw = reader.data[info.offset:end]
    return Tensor(name=info.name, ggml_type=type_name, shape=_normalised_shape(info.ne), raw=raw)


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Normalised shape of every tensor the engine reads, by GGUF name.

    Layer 0's `time_mix_v0/v1/v2` are absent on purpose: the converter writes dummy copies of
    the a-LoRA there (Da-shaped), and the forward never reads them (layer 0 sets v_first).
    """
    C, F, V = spec.n_embd, spec.n_ffn, spec.n_vocab
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (V, C),
        "token_embd_norm.weight": (C,),
        "token_embd_norm.bias": (C,),
        "output_norm.weight": (C,),
        "output_norm.bias": (C,),
        "output.weight": (V, C),
    }
    lora = {"w": spec.rank_decay, "a": spec.rank_iclr, "v": spec.rank_value}
    for i in range(spec.n_layer):
        b = f"blk.{i}."
        for norm in ("attn_norm", "attn_norm_2", "time_mix_ln"):
            shapes[b + norm + ".weight"] = (C,)
            shapes[b + norm + ".bias"] = (C,)
        shapes[b + "time_mix_lerp_fused.weight"] = (6, C)
        for x, rank in lora.items():
            if x == "v" and i == 0:
                continue
            shapes[b + f"time_mix_{x}0.weight"] = (C,)
            shapes[b + f"time_mix_{x}1.weight"] = (rank, C)  # C -> rank
            shapes[b + f"time_mix_{x}2.weight"] = (C, rank)  # rank -> C
        shapes[b + "time_mix_g1.weight"] = (spec.rank_gate, C)
        shapes[b + "time_mix_g2.weight"] = (C, spec.rank_gate)
        for vec in ("k_k", "k_a", "r_k"):
            shapes[b + f"time_mix_{vec}.weight"] = (C,)
        for mat in ("receptance", "key", "value", "output"):
            shapes[b + f"time_mix_{mat}.weight"] = (C, C)
        shapes[b + "channel_mix_lerp_k.weight"] = (C,)
        shapes[b + "channel_mix_key.weight"] = (F, C)
        shapes[b + "channel_mix_value.weight"] = (C, F)
    return shapes


def read_model(path: str | Path) -> Model:
    """Open and validate an RWKV-7 GGUF file; tensors stay memory-mapped (nothing is copied).

    Raises GGUFError, naming the file and the key / tensor / type at fault, for anything the
    engine could not run: not GGUF, truncated, another architecture, a missing metadata key or
    tensor, a misshaped tensor, an unsupported ggml type, a K-quant row not a multiple of 256.
    """
    path = Path(path)
    reader = _open(path)

    arch_field = reader.fields.get("general.architecture")
    arch = _text(arch_field) if arch_field is not None else None
    if arch != ARCH:
        found = "no general.architecture key" if arch is None else f"architecture {arch!r}"
        hint = " (arwkv7 is a different hybrid: RMSNorm + SwiGLU)" if arch == "arwkv7" else ""
        raise GGUFError(f"{path}: found {found}{hint}; only {ARCH!r} (RWKV-7) models are supported")

    vocab = _read_vocab(path, reader)
    spec = _read_spec(path, reader, n_vocab=len(vocab))
    tensors = {info.name: _make_tensor(path, reader, info) for info in _tensor_infos(reader)}

    for name, shape in expected_shapes(spec).items():
        t = tensors.get(name)
        if t is None:
            raise GGUFError(f"{path}: tensor {name!r} is missing; an RWKV-7 model with "
                            f"{spec.n_layer} layers needs it")
        if t.shape != shape:
            raise GGUFError(f"{path}: tensor {name!r} has shape {t.shape}, expected {shape} "
                            f"(from C={spec.n_embd}, F={spec.n_ffn}, V={spec.n_vocab} vocab tokens, LoRA ranks "
                            f"{spec.rank_decay}/{spec.rank_iclr}/{spec.rank_value}/{spec.rank_gate})")

    metadata = {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return Model(path=path, spec=spec, tensors=tensors, vocab=vocab, metadata=metadata)


# ----------------------------------------------------------------------------------------------
# `rwkvlab info`


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_info(model: Model) -> str:
    """The text `rwkvlab info` prints: spec, one row per tensor, totals per ggml type."""
    s = model.spec
    lines = [
        f"file     {model.path}",
        f"name     {s.name}",
        f"arch     {ARCH}",
        f"C={s.n_embd}  L={s.n_layer}  F={s.n_ffn}  N={s.head_size}  H={s.n_head}  V={s.n_vocab}",
        f"LoRA ranks  decay={s.rank_decay}  iclr={s.rank_iclr}  value={s.rank_value}  gate={s.rank_gate}",
        f"eps={s.eps:g}",
        "",
    ]
    width = max(len(n) for n in model.tensors)
    lines.append(f"{'tensor':<{width}}  {'type':<5}  {'shape':<14}  {'size':>10}")
    totals: dict[str, list[int]] = {}
    for t in model.tensors.values():
        shape = "x".join(str(d) for d in t.shape)
        lines.append(f"{t.name:<{width}}  {t.ggml_type:<5}  {shape:<14}  {_human_bytes(t.nbytes):>10}")
        count_bytes = totals.setdefault(t.ggml_type, [0, 0, 0])
        count_bytes[0] += 1
        count_bytes[1] += t.nbytes
        count_bytes[2] += t.n_elements
    lines.append("")
    lines.append(f"{'type':<5}  {'tensors':>7}  {'elements':>12}  {'size':>10}")
    for type_name in sorted(totals, key=lambda k: -totals[k][1]):
        n, nbytes, nel = totals[type_name]
        lines.append(f"{type_name:<5}  {n:>7}  {nel:>12}  {_human_bytes(nbytes):>10}")
    n_all = sum(v[0] for v in totals.values())
    bytes_all = sum(v[1] for v in totals.values())
    el_all = sum(v[2] for v in totals.values())
    lines.append(f"{'total':<5}  {n_all:>7}  {el_all:>12}  {_human_bytes(bytes_all):>10}")
    return "\n".join(lines)


def cli_info(args) -> int:
    """`rwkvlab info FILE`: print the spec and tensor table; a bad file -> stderr, exit code 2."""
    try:
        model = read_model(args.file)
    except GGUFError as e:
        print(f"rwkvlab info: {e}", file=sys.stderr)
        return 2
    print(format_info(model))
    return 0
