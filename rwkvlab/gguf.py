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

import codecs
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFReader, ReaderField
from gguf.constants import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize as _gguf_dequantize

ARCH = "rwkv7"
SUPPORTED_TYPES: tuple[str, ...] = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K")
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
# Arrays longer than this are summarised in Model.metadata (the vocab is kept in Model.vocab).
_METADATA_ARRAY_MAX = 16
# LayerNorm's eps only keeps a zero variance from dividing by zero: real models use 1e-12 to
# 1e-5. One near the variance of the activations (~0.1 and up) would change what the norm
# computes, so anything above this is a corrupt field, not a model.
_EPS_MAX = 1e-2


class GGUFError(ValueError):
    """A GGUF file the lab cannot use; the message names the file and what is wrong in it."""


class GGUFWarning(UserWarning):
    """A GGUF file the lab can run but whose output will be wrong (NaN or Inf weights)."""


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
#
# A file is either truncated (it ends before the data its header declares: a download cut
# short) or corrupt (a value no writer produces, or values that contradict each other). Only
# the first may tell the user to download the file again; everything else says which value is
# wrong. The limits below are what ggml's own reader (ggml/src/gguf.cpp) accepts, so a file we
# refuse for them is one llama.cpp refuses too.

_MAX_STRING_BYTES = 1 << 30  # ggml refuses longer strings (GGUF_MAX_STRING_LENGTH)
_MAX_ELEMENTS = 1 << 30  # ggml refuses longer arrays (GGUF_MAX_ARRAY_ELEMENTS); we cap counts too
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NAME_BYTES = 63  # GGML_MAX_NAME is 64 bytes with the terminating NUL
# ggml refuses arrays of arrays outright; gguf-py writes and reads them (nested lists). We read
# what gguf-py writes a few levels deep and refuse deeper nesting: no model metadata uses it,
# and every level costs the parser Python stack frames, so an unbounded depth is a RecursionError
# (a 20,000-deep array was a 3,000-line traceback).
_MAX_ARRAY_DEPTH = 3


class _Truncated(Exception):
    def __init__(self, offset: int, end: int, size: int) -> None:
        super().__init__(offset, end, size)
        self.offset, self.end, self.size = offset, end, size
        self.where = ""  # the header item being read, filled in by the caller that knows it
        # An array of numbers running past the end: a cut file and a corrupt count look alike
        # (numbers carry no structure to tell them apart), so the message names both.
        self.count: int | None = None


class _Corrupt(Exception):
    """A header value that no GGUF writer produces; the message says which and why."""


def _string_past_the_end(buf: np.ndarray, at: int, n: int) -> Exception:
    """The error for a string at byte `at` declaring `n` bytes that run past the end of `buf`.

    A download cut inside a string leaves a file whose last bytes are the start of that string:
    text, valid UTF-8 up to a possibly cut last character, with no NUL bytes. A corrupt length
    instead spans the rest of the file: the length prefixes of later strings (NUL bytes) and
    the tensor data (binary). So the bytes the string would hold tell the two apart; they are
    read in chunks, and the first NUL or invalid byte decides.
    """
    start = at + 8
    decoder = codecs.getincrementaldecoder("utf-8")()
    for i in range(start, len(buf), 1 << 20):
        chunk = buf[i:i + (1 << 20)]
        try:
            if not chunk.all():
                raise UnicodeDecodeError("utf-8", b"", 0, 1, "NUL byte")
            decoder.decode(chunk.tobytes(), final=False)
        except UnicodeDecodeError:
            return _Corrupt(f"a string at byte {at} declares {n} bytes, running past the end of the "
                            f"file at byte {len(buf)}, and the bytes it would hold are not text: "
                            "its length is corrupt")
    return _Truncated(start, start + n, len(buf))


@dataclass(frozen=True)
class _TensorInfo:
    index: int  # position in the header's tensor list
    name: str
    ne: tuple[int, ...]  # GGUF order: fastest dimension first
    type_id: int
    offset: int  # relative to the start of the data section, as stored


def _value_type(raw: int) -> GGUFValueType:
    try:
        return GGUFValueType(int(raw))
    except ValueError:
        valid = len(GGUFValueType) - 1
        raise _Corrupt(f"value type id {int(raw)} is not a GGUF type (0..{valid})") from None


class _HeaderReader(GGUFReader):
    """GGUFReader that parses only the header, fast, and says what is wrong with a bad one.

    gguf-py silently returns short arrays when a header field runs past the end of a cut-off
    file (and then fails somewhere unrelated), trusts every count and length it reads, recurses
    once per level of nested arrays, and builds its tensor list in one go, raising on the first
    odd tensor without saying which. We override its internal helpers: `_get` (detect truncation
    where it happens), `_get_str`, `_build_fields` and `_get_field_parts` (bounded lengths,
    counts and nesting; errors that name the key; arrays read in one pass) and
    `_build_tensor_info` / `_build_tensors` (tensor infos checked as ggml checks them, kept raw
    so each tensor is then checked, and reported, by name). tests/test_gguf.py checks the
    result against gguf-py's own reader, so an upgrade that changes those helpers fails loudly.

    One difference in what it builds: an array of scalars is a single part holding all values,
    so `contents()` of the whole field is right but `contents(i)` is not; nothing here uses it.
    """

    _array_depth = 0
    tensor_infos: list[_TensorInfo]
    tensor_data_start: int

    def _get(self, offset, dtype, count=1, override_order=None):
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > len(self.data):
            raise _Truncated(int(offset), end, len(self.data))
        return super()._get(offset, dtype, count, override_order)

    def _get_str(self, offset):
        slen = self._get(offset, np.uint64)
        n = int(slen[0])
        if n > _MAX_STRING_BYTES:
            raise _Corrupt(f"a string at byte {offset} declares {n} bytes, over the "
                           f"{_MAX_STRING_BYTES} a GGUF string may hold")
        if offset + 8 + n > len(self.data):
            raise _string_past_the_end(self.data.view(np.ndarray), int(offset), n)
        return slen, self._get(offset + 8, np.uint8, n)

    def _build_fields(self, offs, count):
        count = int(count)
        if count > _MAX_ELEMENTS:
            raise _Corrupt(f"the header declares {count} metadata keys, over the {_MAX_ELEMENTS} "
                           "any GGUF file holds; the key count is corrupt")
        for i in range(count):
            orig_offs, key = offs, None
            try:
                klen, kdata = self._get_str(offs)
                try:
                    key = bytes(kdata).decode("utf-8")
                except UnicodeDecodeError:
                    raise _Corrupt(f"the name of metadata key #{i} is not valid UTF-8") from None
                if not key:
                    raise _Corrupt(f"metadata key #{i} has an empty name")
                if key in self.fields:
                    raise _Corrupt(f"metadata key {key!r} appears twice (at bytes "
                                   f"{self.fields[key].offset} and {orig_offs})")
                offs += 8 + int(klen[0])
                raw_type = self._get(offs, np.uint32)
                offs += 4
                size, parts, idxs, types = self._get_field_parts(offs, raw_type[0])
            except _Truncated as e:
                e.where = f"metadata key #{i}" + (f" {key!r}" if key else "")
                raise
            except _Corrupt as e:
                raise _Corrupt(f"metadata key {key!r}: {e}" if key else f"metadata key #{i}: {e}") from None
            head = [klen, kdata, raw_type]
            self._push_field(ReaderField(orig_offs, key, head + parts, [j + 3 for j in idxs], types),
                             skip_sum=True)
            offs += size
        return offs

    def _get_field_parts(self, orig_offs, raw_type):
        gtype = _value_type(raw_type)
        if gtype == GGUFValueType.STRING:
            slen, sdata = self._get_str(orig_offs)
            return 8 + int(slen[0]), [slen, sdata], [1], [gtype]
        scalar = self.gguf_scalar_to_np.get(gtype)
        if scalar is not None:
            value = self._get(orig_offs, scalar)
            return int(value.nbytes), [value], [0], [gtype]
        # An array: item type, count, items. gguf-py makes NumPy views for every element, which
        # takes ~1.5 s for a 65536-token vocab on a slow core: most of a model's load time
        # before any weight moves. Arrays of scalars and of strings are read here in one pass,
        # in the same parts layout (array of strings: one uint8 part per string) so
        # ReaderField.contents() still works.
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        item_type, count = _value_type(raw_itype[0]), int(alen[0])
        if count > _MAX_ELEMENTS:
            raise _Corrupt(f"an array at byte {orig_offs} declares {count} elements, over the "
                           f"{_MAX_ELEMENTS} a GGUF array may hold")
        types, offs = [GGUFValueType.ARRAY, item_type], orig_offs + 12
        scalar = self.gguf_scalar_to_np.get(item_type)
        if scalar is not None:
            end = offs + count * np.dtype(scalar).itemsize
            if end > len(self.data):
                e = _Truncated(offs, end, len(self.data))
                e.count = count
                raise e
            values = self._get(offs, scalar, count)
            return 12 + int(values.nbytes), [raw_itype, alen, values], [2], types
        parts, idxs = [raw_itype, alen], []
        if item_type == GGUFValueType.STRING:
            buf = self.data.view(np.ndarray)  # slicing the memmap subclass itself is ~10x slower
            size, header = len(buf), memoryview(buf)
            order = sys.byteorder if self.byte_order == "I" else ("big" if sys.byteorder == "little" else "little")
            for _ in range(count):
                if offs + 8 > size:
                    raise _Truncated(offs, offs + 8, size)
                start = offs + 8
                n = int.from_bytes(header[offs:start], order)
                if n > _MAX_STRING_BYTES:
                    raise _Corrupt(f"a string at byte {offs} declares {n} bytes, over the "
                                   f"{_MAX_STRING_BYTES} a GGUF string may hold")
                offs = start + n
                if offs > size:
                    raise _string_past_the_end(buf, start - 8, n)
                idxs.append(len(parts))
                parts.append(buf[start:offs])
            return offs - orig_offs, parts, idxs, types
        # An array of arrays, in gguf-py's layout: every sub-array's parts in turn.
        if self._array_depth + 2 > _MAX_ARRAY_DEPTH:
            raise _Corrupt(f"arrays are nested more than {_MAX_ARRAY_DEPTH} deep (at byte "
                           f"{orig_offs}); no model metadata nests them (ggml refuses any nesting)")
        self._array_depth += 1
        try:
            for i in range(count):
                size, sub_parts, sub_idxs, sub_types = self._get_field_parts(offs, raw_itype[0])
                if i == 0:
                    types = [GGUFValueType.ARRAY, *sub_types]
                idxs += (j + len(parts) for j in sub_idxs)
                parts += sub_parts
                offs += size
        finally:
            self._array_depth -= 1
        return offs - orig_offs, parts, idxs, types

    def _build_tensor_info(self, offs, count):
        count = int(count)
        if count > _MAX_ELEMENTS:
            raise _Corrupt(f"the header declares {count} tensors, over the {_MAX_ELEMENTS} any "
                           "GGUF file holds; the tensor count is corrupt")
        infos: list[_TensorInfo] = []
        seen: dict[str, int] = {}
        for i in range(count):
            name = None
            try:
                nlen, ndata = self._get_str(offs)
                if not 0 < int(nlen[0]) <= _MAX_NAME_BYTES:
                    raise _Corrupt(f"its name is {int(nlen[0])} bytes long; ggml allows 1 to "
                                   f"{_MAX_NAME_BYTES}")
                try:
                    name = bytes(ndata).decode("utf-8")
                except UnicodeDecodeError:
                    raise _Corrupt(f"its name {bytes(ndata)!r} is not valid UTF-8") from None
                if name in seen:
                    raise _Corrupt(f"the name is used twice (tensors #{seen[name]} and #{i}); the "
                                   "later one would silently replace the first")
                offs += 8 + int(nlen[0])
                n_dims = int(self._get(offs, np.uint32)[0])
                if n_dims > _MAX_DIMS:
                    raise _Corrupt(f"it has {n_dims} dimensions; GGUF allows at most {_MAX_DIMS}")
                ne = tuple(int(d) for d in self._get(offs + 4, np.uint64, n_dims))
                offs += 4 + 8 * n_dims
                # ggml reads ne as int64 and its element count must fit one too
                if any(d >= 1 << 63 for d in ne) or math.prod(ne) >= 1 << 63:
                    raise _Corrupt(f"its dimensions {list(ne)} overflow a 64-bit element count")
                type_id = int(self._get(offs, np.uint32)[0])
                rel = int(self._get(offs + 4, np.uint64)[0])
                offs += 12
            except _Truncated as e:
                e.where = f"tensor info #{i}" + (f" {name!r}" if name else "")
                raise
            except _Corrupt as e:
                raise _Corrupt(f"tensor #{i}" + (f" {name!r}" if name else "") + f": {e}") from None
            seen[name] = i
            infos.append(_TensorInfo(index=i, name=name, ne=ne, type_id=type_id, offset=rel))
        return offs, infos

    def _build_tensors(self, start_offs, fields) -> None:
        self.tensor_infos = fields
        self.tensor_data_start = int(start_offs)


_READABLE_VERSIONS = (2, 3)


def _open(path: Path) -> _HeaderReader:
    """Parse the header of `path`, turning every way it can fail into a GGUFError."""
    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    if not path.is_file():
        raise GGUFError(f"{path}: is not a file (expected a .gguf model file)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    magic = GGUF_MAGIC.to_bytes(4, "little")
    if len(head) < 4 or head[:4] != magic:
        raise GGUFError(
            f"{path} is not a GGUF file (bad magic {head[:4]!r}, expected {magic!r}; {size} bytes)"
        )
    if len(head) == 8:
        version = int.from_bytes(head[4:], "little")
        if version & 0xFFFF == 0:
            # gguf-py would switch to big-endian parsing here; every tensor byte the engine
            # reads is little-endian, so such a file could only load as garbage.
            raise GGUFError(f"{path}: GGUF version field reads {version:#x}: a big-endian file or a "
                            "corrupt version; rwkvlab reads little-endian GGUF files only")
        if version not in _READABLE_VERSIONS:
            raise GGUFError(f"{path}: GGUF version {version} is not supported (rwkvlab reads "
                            "versions 2 and 3); the version field is corrupt or the file is too new")
    try:
        return _HeaderReader(path)
    except _Truncated as e:
        where = f" (in {e.where})" if e.where else ""
        if e.count is not None:
            raise GGUFError(f"{path}: the file ends at byte {e.size}{where}, whose array declares "
                            f"{e.count} values, up to byte {e.end}: the file is truncated (download "
                            "it again) or that count is corrupt") from None
        raise GGUFError(
            f"{path} is truncated: its header needs bytes up to offset {e.end}{where} but the "
            f"file ends at {e.size}; download or convert it again"
        ) from None
    except _Corrupt as e:
        raise GGUFError(f"{path}: corrupt GGUF header: {e}") from None
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
    value = _field_value(field)  # long arrays summarised: the message stays one line
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
    eps = _field_value(eps_field) if eps_field is not None else 0.0
    if (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps)
            or not 0 <= eps <= _EPS_MAX):
        raise GGUFError(f"{path}: metadata key '{ARCH}.attention.layer_norm_epsilon' is {eps!r}; "
                        f"LayerNorm's eps must be a finite number from 0 to {_EPS_MAX:g} (real "
                        "models use 1e-5), so the file's metadata is corrupt")
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
    if field.types[:1] != [GGUFValueType.ARRAY] or field.types[-1] != GGUFValueType.STRING:
        kind = "/".join(t.name for t in field.types)
        raise GGUFError(f"{path}: metadata key 'tokenizer.ggml.tokens' should be an array of "
                        f"strings, found {kind}")
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


def _tensor_type(path: Path, info: _TensorInfo) -> tuple[str, int]:
    """The tensor's ggml type name and its size in bytes; GGUFError if rwkvlab cannot run it."""
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
    return type_name, math.prod(info.ne) // block * block_bytes  # Python ints: cannot overflow


def _check_layers(path: Path, spec: ModelSpec, names) -> None:
    """rwkv7.block_count must match the `blk.{i}.` tensors present.

    Runs before anything sized by the block count is built: a corrupt count (4294967295) would
    otherwise make expected_shapes, and then the engine, allocate per layer without bound.
    """
    present: dict[int, str] = {}
    for name in names:
        head, _, rest = name.partition(".")
        index = rest.partition(".")[0]
        if head == "blk" and index.isdigit():  # isdigit: ASCII digits only after the UTF-8 decode
            present.setdefault(int(index), name)
    n_present = max(present) + 1 if present else 0
    if spec.n_layer > n_present:
        held = f"layers 0..{n_present - 1} (blk.0 .. blk.{n_present - 1})" if present else "no layers"
        raise GGUFError(f"{path}: metadata key '{ARCH}.block_count' is {spec.n_layer}, but the file "
                        f"holds tensors for {held}; the block count is corrupt or layers are missing")
    if n_present > spec.n_layer:
        raise GGUFError(f"{path}: the file holds tensors for layer {n_present - 1} (e.g. "
                        f"{present[n_present - 1]!r}), but metadata key '{ARCH}.block_count' is "
                        f"{spec.n_layer}; the block count or the tensor names are corrupt")


def _check_layout(path: Path, reader: _HeaderReader, infos: list[_TensorInfo],
                  types: list[tuple[str, int]]) -> None:
    """Tensor data must be packed in header order, each tensor aligned, and lie in the file.

    ggml's reader demands exactly this packing (each offset is the previous tensor's end,
    rounded up to general.alignment), and it is what makes a tensor's declared type and shape
    checkable: a type or shape corrupted into one that still fits would otherwise read the
    wrong bytes without any error. Only when everything else agrees and the file ends before
    the data does is the file called truncated.
    """
    align, start, size = int(reader.alignment), reader.tensor_data_start, len(reader.data)

    def what(i: int) -> str:
        info, (type_name, nbytes) = infos[i], types[i]
        return f"{info.name!r} ({type_name}, ne {list(info.ne)}, {nbytes} bytes)"

    expected = 0  # where the next tensor must start, relative to the data section
    for i, info in enumerate(infos):
        if info.offset % align:
            raise GGUFError(f"{path}: tensor {info.name!r} starts at byte {info.offset} of the data "
                            f"section, which is not a multiple of the alignment {align} "
                            "(general.alignment); its offset is corrupt")
        if info.offset < expected:
            raise GGUFError(f"{path}: tensor {info.name!r} starts at byte {info.offset} of the data "
                            f"section, inside tensor {what(i - 1)}, which runs to byte "
                            f"{infos[i - 1].offset + types[i - 1][1]}: the two overlap, so a type, "
                            "shape or offset in the header is corrupt")
        if info.offset > expected:
            before = (f"after tensor {what(i - 1)}: it is declared smaller than the space its "
                      f"data takes (its type or shape is corrupt) or {info.name!r}'s offset is"
                      if i else f"before the first tensor {info.name!r}: its offset is")
            raise GGUFError(f"{path}: {info.offset - expected} bytes of the data section lie unused "
                            f"{before} corrupt (tensor data must be packed in header order)")
        expected = info.offset + types[i][1] + (-types[i][1] % align)
    for i, info in enumerate(infos):
        end = start + info.offset + types[i][1]
        if end > size:
            raise GGUFError(f"{path} is truncated: tensor {info.name!r} needs bytes "
                            f"{start + info.offset}..{end} but the file ends at {size} (the data "
                            f"of {len(infos) - i} of {len(infos)} tensors is cut); download it again")
    if infos and size > start + expected:
        raise GGUFError(f"{path}: {size - start - expected} bytes follow the last tensor "
                        f"{what(len(infos) - 1)}: it is declared smaller than its data (its type or "
                        "shape is corrupt), or other data was appended to the file")


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


# Where a block's float16 scales sit (bytes into the block, ggml's block layouts). A block's
# values are small integers times these scales, so the block decodes to a NaN or Inf exactly
# when a scale is one: checking the scales covers every value of a quantized tensor while
# reading 2 to 4 bytes of every 18 to 210.
_SCALE_OFFSETS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
# (word dtype, exponent mask): a float is NaN or Inf exactly when all its exponent bits are set.
_FLOAT_WORDS = {"F32": (np.uint32, 0x7F800000), "F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80)}
_SCAN_WORDS = 1 << 22  # words tested per step: bounds the temporaries on a multi-GB tensor


def count_nonfinite(t: Tensor) -> int:
    """How many values of `t` are NaN or Inf (for quantized tensors: how many block scales)."""
    if t.ggml_type in _FLOAT_WORDS:
        dtype, mask = _FLOAT_WORDS[t.ggml_type]
        words = t.raw.view(dtype)
        columns = [words]
    else:
        dtype, mask = np.uint16, 0x7C00
        block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[t.ggml_type]][1]
        blocks = t.raw.view(np.uint16).reshape(-1, block_bytes // 2)
        columns = [blocks[:, at // 2] for at in _SCALE_OFFSETS[t.ggml_type]]
    mask = dtype(mask)
    bad = 0
    for col in columns:
        for i in range(0, len(col), _SCAN_WORDS):
            bad += int(np.count_nonzero((col[i:i + _SCAN_WORDS] & mask) == mask))
    return bad


def nonfinite_counts(tensors: dict[str, Tensor]) -> dict[str, int]:
    """Tensor name -> how many NaN / Inf values (or block scales) it holds, for those with any.
    NumPy does the work with the GIL released, so a load runs it beside the upload."""
    return {name: n for name, t in tensors.items() if (n := count_nonfinite(t))}


def warn_nonfinite(path: Path, tensors: dict[str, Tensor], bad: dict[str, int], stacklevel: int = 2) -> None:
    """The GGUFWarning naming the tensors of `bad` (nonfinite_counts), if any."""
    if not bad:
        return
    shown = ", ".join(f"{name!r} ({tensors[name].ggml_type}: {n} "
                      f"{'values' if tensors[name].ggml_type in _FLOAT_WORDS else 'block scales'})"
                      for name, n in list(bad.items())[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    warnings.warn(GGUFWarning(f"{path}: {len(bad)} tensor(s) hold NaN or Inf: {shown}{more}; "
                              "outputs that depend on them will be NaN"), stacklevel=stacklevel + 1)


def read_model(path: str | Path, *, check_values: bool = True) -> Model:
    """Open and validate an RWKV-7 GGUF file; tensors stay memory-mapped (nothing is copied).

    Raises GGUFError, naming the file and the key / tensor / type at fault, for anything the
    engine could not run: not GGUF, truncated, corrupt (counts, lengths, offsets, types or
    metadata that contradict each other or the file), another architecture, a missing metadata
    key or tensor, a misshaped tensor, an unsupported ggml type, a K-quant row not a multiple of
    256. With `check_values`, also warns (GGUFWarning, naming the tensors) when weights hold
    NaN or Inf: that reads every float value and quant scale once (vectorised, a fraction of
    the time an upload of the same bytes takes).
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
    infos = reader.tensor_infos
    _check_layers(path, spec, (info.name for info in infos))
    types = [_tensor_type(path, info) for info in infos]
    shapes = {info.name: _normalised_shape(info.ne) for info in infos}

    for name, shape in expected_shapes(spec).items():
        found = shapes.get(name)
        if found is None:
            raise GGUFError(f"{path}: tensor {name!r} is missing; an RWKV-7 model with "
                            f"{spec.n_layer} layers needs it")
        if found != shape:
            raise GGUFError(f"{path}: tensor {name!r} has shape {found}, expected {shape} "
                            f"(from C={spec.n_embd}, F={spec.n_ffn}, V={spec.n_vocab} vocab tokens, LoRA ranks "
                            f"{spec.rank_decay}/{spec.rank_iclr}/{spec.rank_value}/{spec.rank_gate})")

    _check_layout(path, reader, infos, types)
    tensors = {}
    for info, (type_name, nbytes) in zip(infos, types):
        at = reader.tensor_data_start + info.offset
        tensors[info.name] = Tensor(name=info.name, ggml_type=type_name, shape=shapes[info.name],
                                    raw=reader.data[at:at + nbytes])
    if check_values:
        warn_nonfinite(path, tensors, nonfinite_counts(tensors), stacklevel=2)

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
        # info shows the header; scanning every weight of a multi-GB file would make it take
        # as long as reading the whole file (loading a model still warns).
        model = read_model(args.file, check_values=False)
    except GGUFError as e:
        print(f"rwkvlab info: {e}", file=sys.stderr)
        return 2
    print(format_info(model))
    return 0


# ----------------------------------------------------------------------------------------------
# Identity


_FINGERPRINTS: dict[tuple[str, int, int], str] = {}


def fingerprint(path: str | os.PathLike) -> str:
    """The content fingerprint of a model file: BLAKE2b (8 bytes, hex) of every byte.

    Runs are matched by what the file holds, not by its name: ``q8.gguf`` and ``q8_0.gguf``
    with the same bytes are one model, and a regenerated file under an old name is another.
    Hashing is ~1 s per GB on one core, so results are kept per (path, size, mtime) for the
    process and in ``<cache>/fingerprints.json`` across processes.
    """
    import hashlib
    import json

    from rwkvlab.synth import cache_dir

    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key in _FINGERPRINTS:
        return _FINGERPRINTS[key]
    store = cache_dir() / "fingerprints.json"
    text_key = f"{key[0]}|{key[1]}|{key[2]}"
    try:
        known = json.loads(store.read_text())
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    digest = known.get(text_key)
    if not (isinstance(digest, str) and len(digest) == 16):
        h = hashlib.blake2b(digest_size=8)
        with open(p, "rb") as f:
            while chunk := f.read(16 << 20):
                h.update(chunk)
        digest = h.hexdigest()
        known[text_key] = digest
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
            tmp = store.with_name(f"{store.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, store)  # a reader sees the old or the new file, never half of one
        except OSError:
            pass  # a read-only cache only costs the hashing again
    _FINGERPRINTS[key] = digest
    return digest
