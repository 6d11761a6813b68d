"""GGUF (llama.cpp's format), parsed by the ``gguf`` package.

Unquantized tensors (F32, F16, BF16, F64, I8..I64) become plain entries that
map zero-copy. Quantized tensors (Q4_0, Q4_1, Q8_0, the K-quants...) become
entries with ``encoding`` set to the quantization and ``dtype`` F32: the mapped
layer dequantizes them on access with ``gguf.quants.dequantize``.

GGUF lists dimensions fastest-first (``ne[0]`` is the row length); entries
carry the usual row-major shape, i.e. reversed. No torch here.

The ``gguf`` package reads files it trusts: on a hostile header it raises
whatever numpy raises, or allocates what a count claims. So :func:`validate`
walks the header first, bounds-checking every length, count, type and offset
against the file, with one specific error per fault; the package then reads a
header that is known to be sound.
"""

from __future__ import annotations

import itertools
import math
import os
import struct
from typing import Any

from ..errors import (
    DuplicateTensorError,
    GGUFError,
    HeaderEncodingError,
    InvalidOffsetsError,
    InvalidShapeError,
    MetadataError,
    SizeOverflowError,
    TensorOverlapError,
    TruncatedFileError,
    UnknownDtypeError,
    UnsupportedQuantizationError,
)
from .catalog import Catalog, FileStamp, TensorEntry
from .source import GGUF_MAGIC

SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
# Metadata value types: fixed sizes by type id (gguf.GGUFValueType); 8 = string, 9 = array.
_VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
MAX_ARRAY_NESTING = 8
MAX_KEY_NBYTES = 65_535  # a metadata key is a dotted name, not data
# The gguf package holds every metadata element as a numpy object: about 2 KB each
# for strings, whatever their length. Real vocabularies have a few 100k tokens
# and merges; this bounds what a hostile header can make the reader allocate.
MAX_STRING_ELEMENTS = 2_000_000
MAX_DIM = (1 << 63) - 1

# GGML types stored as plain little-endian elements, by safetensors dtype name.
PLAIN_TYPES: dict[str, str] = {
    "F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64",
    "I8": "I8", "I16": "I16", "I32": "I32", "I64": "I64",
}
MAX_NBYTES = (1 << 63) - 1


def dequantizable() -> frozenset[str]:
    """Names of the GGML quantizations the installed ``gguf`` package can dequantize."""
    from gguf import quants

    traits = getattr(quants, "_type_traits", {})
    return frozenset(t.name for t in traits) - frozenset(PLAIN_TYPES)


class _Cursor:
    """Little-endian reads from the file (plain reads, no mapping) that never run past its size."""

    def __init__(self, f: Any, size: int, path: str) -> None:
        self.f, self.path, self.pos, self.size = f, path, 0, size

    def _check(self, nbytes: int, what: str) -> None:
        if nbytes > self.size - self.pos:
            raise TruncatedFileError(f"{what} needs {nbytes} bytes at offset {self.pos} but the file is "
                                     f"{self.size} bytes", path=self.path)

    def take(self, nbytes: int, what: str) -> bytes:
        self._check(nbytes, what)
        out = self.f.read(nbytes)
        if len(out) != nbytes:  # the file shrank while we read it
            raise TruncatedFileError(f"{what}: read {len(out)} of {nbytes} bytes at offset {self.pos}",
                                     path=self.path)
        self.pos += nbytes
        return out

    def skip(self, nbytes: int, what: str) -> None:
        self._check(nbytes, what)
        self.pos += nbytes
        self.f.seek(self.pos)

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))[0]

    def skip_string(self, what: str) -> None:
        n = self.unpack("Q", f"length of {what}")
        self.skip(n, f"{what} ({n} bytes)")

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.unpack("Q", f"length of {what}")
        if limit is not None and n > limit:
            raise MetadataError(f"{what} at offset {self.pos - 8} is {n} bytes long (at most {limit})",
                                path=self.path)
        raw = self.take(n, f"{what} ({n} bytes)")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise HeaderEncodingError(f"{what} at offset {self.pos - n} is not UTF-8 (byte {e.start})",
                                      path=self.path) from None

    def at_least(self, count: int, each: int, what: str) -> None:
        """Refuse a count that cannot fit in what is left of the file (before looping over it)."""
        if count * each > self.size - self.pos:
            raise TruncatedFileError(f"{what} count {count} needs at least {count * each} bytes at offset "
                                     f"{self.pos}, the file has {self.size - self.pos} left", path=self.path)


def _skip_value(cur: _Cursor, vtype: int, key: str, counts: list[int], depth: int = 0) -> Any:
    """Read one metadata value: integers are returned (general.alignment needs one), the rest skipped.

    ``counts[0]`` tallies string elements across the header (see MAX_STRING_ELEMENTS).
    """
    if vtype in _VALUE_SIZES:
        raw = cur.take(_VALUE_SIZES[vtype], f"value of {key!r}")
        return int.from_bytes(raw, "little") if vtype in (4, 10) else None
    if vtype == _STRING:
        counts[0] += 1
        if counts[0] > MAX_STRING_ELEMENTS:
            raise MetadataError(f"the header holds more than {MAX_STRING_ELEMENTS} strings (at {key!r})",
                                path=cur.path)
        cur.skip_string(f"value of {key!r}")
        return None
    if vtype == _ARRAY:
        if depth >= MAX_ARRAY_NESTING:
            raise MetadataError(f"metadata {key!r} nests arrays over {MAX_ARRAY_NESTING} deep", path=cur.path)
        etype = cur.unpack("I", f"array type of {key!r}")
        count = cur.unpack("Q", f"array length of {key!r}")
        if etype not in _VALUE_SIZES and etype not in (_STRING, _ARRAY):
            raise MetadataError(f"metadata {key!r} is an array of unknown value type {etype}", path=cur.path)
        cur.at_least(count, _VALUE_SIZES.get(etype, 8), f"array {key!r} element")
        if etype in _VALUE_SIZES:
            cur.skip(count * _VALUE_SIZES[etype], f"array {key!r}")
            return None
        if etype == _STRING and counts[0] + count > MAX_STRING_ELEMENTS:
            raise MetadataError(f"metadata {key!r} holds {count} strings; the header may hold at most "
                                f"{MAX_STRING_ELEMENTS} in all", path=cur.path)
        for _ in range(count):
            _skip_value(cur, etype, key, counts, depth + 1)
        return None
    raise MetadataError(f"metadata {key!r} has unknown value type {vtype} (known: 0-12)", path=cur.path)


def validate(f: Any, size: int, path: str) -> None:
    """Apply every structural rule of GGUF to an open file, before any parser trusts it.

    Checks magic, version, the tensor and metadata counts against the file
    size, every string length, value type, tensor type and dimension count,
    each tensor's byte size, its offset (aligned, inside the file) and that no
    two tensors overlap or share a name.

    Raises:
        One :class:`~sparsemap.errors.FormatError` subclass per rule broken.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    cur = _Cursor(f, size, path)
    magic = cur.take(4, "magic")
    if magic != GGUF_MAGIC:
        raise GGUFError(f"magic is {magic!r}, not {GGUF_MAGIC!r}", path=path)
    version = cur.unpack("I", "version")
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        hint = " (a big-endian file?)" if swapped in SUPPORTED_VERSIONS else ""
        raise GGUFError(f"version {version}{hint}; sparsemap reads versions "
                        f"{', '.join(map(str, SUPPORTED_VERSIONS))}", path=path)
    n_tensors = cur.unpack("Q", "tensor count")
    n_kv = cur.unpack("Q", "metadata count")
    cur.at_least(n_kv, 8 + 4, "metadata")  # each: a key length and a value type at least
    alignment = 32
    keys: set[str] = set()
    counts = [0]
    for _ in range(n_kv):
        key = cur.string("metadata key", limit=MAX_KEY_NBYTES)
        if key in keys:
            raise MetadataError(f"metadata key {key!r} appears twice", path=path)
        keys.add(key)
        vtype = cur.unpack("I", f"value type of {key!r}")
        value = _skip_value(cur, vtype, key, counts)
        if key == "general.alignment":
            if not isinstance(value, int) or value <= 0 or value & (value - 1):
                raise MetadataError(f"general.alignment is {value!r}, not a power of two", path=path)
            alignment = value
    cur.at_least(n_tensors, 8 + 4 + 4 + 8, "tensor")  # name length, n_dims, type, offset
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"name of tensor {i}", limit=MAX_KEY_NBYTES)
        n_dims = cur.unpack("I", f"dimension count of {name!r}")
        if n_dims > MAX_DIMS:
            raise InvalidShapeError(f"{n_dims} dimensions (GGML allows at most {MAX_DIMS})",
                                    path=path, tensor=name)
        dims = [cur.unpack("Q", f"dimension of {name!r}") for _ in range(n_dims)]
        ttype = cur.unpack("I", f"type of {name!r}")
        offset = cur.unpack("Q", f"offset of {name!r}")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise UnknownDtypeError(f"unknown GGML type {ttype}", path=path, tensor=name) from None
        numel = math.prod(dims)
        if any(d > MAX_DIM for d in dims) or numel * type_size > MAX_NBYTES:
            raise SizeOverflowError(f"dims {dims} of {GGMLQuantizationType(ttype).name} need more than 2**63 "
                                    "bytes", path=path, tensor=name)
        if dims and dims[0] % block:
            raise InvalidShapeError(f"row length {dims[0]} is not a multiple of the {block}-element block of "
                                    f"{GGMLQuantizationType(ttype).name}", path=path, tensor=name)
        if offset % alignment:
            raise InvalidOffsetsError(f"offset {offset} is not a multiple of the alignment {alignment}",
                                      path=path, tensor=name)
        infos.append((name, offset, numel // block * type_size))
    data_start = -(-cur.pos // alignment) * alignment
    seen: dict[str, int] = {}
    for name, offset, nbytes in infos:
        if name in seen:
            raise DuplicateTensorError(f"tensor name appears twice (tensors {seen[name]} and "
                                       f"{len(seen)})", path=path, tensor=name)
        seen[name] = len(seen)
        if data_start + offset + nbytes > cur.size:
            raise TruncatedFileError(f"data [{data_start + offset}, {data_start + offset + nbytes}) runs "
                                     f"past the end of the file ({cur.size} bytes)", path=path, tensor=name)
    ordered = sorted(infos, key=lambda t: t[1])
    for (a, a_off, a_n), (b, b_off, _) in itertools.pairwise(ordered):
        if b_off < a_off + a_n:
            raise TensorOverlapError(f"data starts at {b_off}, inside {a!r} ([{a_off}, {a_off + a_n}))",
                                     path=path, tensor=b)


def open_gguf(path: str, stamp: FileStamp) -> Catalog:
    """Index a GGUF file's tensors; read no tensor data. ``stamp``: the file's version when opened."""
    from gguf import GGUFReader, GGUFValueType

    with open(path, "rb") as f:
        validate(f, os.fstat(f.fileno()).st_size, path)
    try:
        reader = GGUFReader(path, mode="r")
    except Exception as e:  # the gguf package raises ValueError, IndexError, ... on bad input
        raise GGUFError(f"not a readable GGUF file: {type(e).__name__}: {e}", path=path) from None
    if reader.byte_order != "I":
        raise GGUFError("GGUF file is in the opposite byte order to this machine", path=path)
    file_nbytes = int(reader.data.shape[0])
    supported = None
    entries: dict[str, TensorEntry] = {}
    for t in reader.tensors:
        qtype = t.tensor_type.name
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if any(d < 0 for d in shape) or math.prod(shape) != t.n_elements:
            raise GGUFError(f"bad dims {list(t.shape)}", path=path, tensor=t.name)
        nbytes = int(t.n_bytes)
        if nbytes > MAX_NBYTES:
            raise SizeOverflowError(f"{nbytes} bytes", path=path, tensor=t.name)
        if t.data_offset + nbytes > file_nbytes:
            raise TruncatedFileError(f"data [{t.data_offset}, {t.data_offset + nbytes}) runs past the "
                                     f"end of the file ({file_nbytes} bytes)", path=path, tensor=t.name)
        if qtype in PLAIN_TYPES:
            entries[t.name] = TensorEntry(name=t.name, file=path, offset=int(t.data_offset),
                                          nbytes=nbytes, dtype=PLAIN_TYPES[qtype], shape=shape)
            continue
        if supported is None:
            supported = dequantizable()
        if qtype not in supported:
            raise UnsupportedQuantizationError(
                f"quantization {qtype} cannot be dequantized (supported: {', '.join(sorted(supported))})",
                path=path, tensor=t.name)
        entries[t.name] = TensorEntry(name=t.name, file=path, offset=int(t.data_offset),
                                      nbytes=nbytes, dtype="F32", shape=shape, encoding=qtype)

    metadata: dict[str, str] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or not field.types or field.types[0] == GGUFValueType.ARRAY:
            continue
        metadata[key] = str(_scalar(field))
    return Catalog(source=path, format="gguf", entries=entries, metadata=metadata, stamps={path: stamp})


def _scalar(field: Any) -> Any:
    value = field.parts[field.data[0]]
    if field.types[0].name == "STRING":
        return bytes(value).decode("utf-8", errors="replace")
    return value[0].item() if hasattr(value[0], "item") else value[0]
