"""GGUF (llama.cpp's format): one validating walk of the header, by plain reads. No torch.

Unquantized tensors (F32, F16, BF16, F64, I8..I64) become plain entries that
map zero-copy. Quantized tensors (Q4_0, Q4_1, Q8_0, the K-quants...) become
entries with ``encoding`` set to the quantization and ``dtype`` F32: the mapped
layer dequantizes them on access with ``gguf.quants.dequantize``.

GGUF lists dimensions fastest-first (``ne[0]`` is the row length); entries
carry the usual row-major shape, i.e. reversed.

The header is read once, by :func:`validate`: it bounds-checks every length,
count, type and offset against the file (one specific error per fault) and
returns what it read, the tensor infos and the scalar metadata. The ``gguf``
package is used only for its table of GGML types and to dequantize. Its
``GGUFReader`` is not: it holds every metadata element as numpy objects (a
Gemma-3-shaped vocabulary of 262,144 tokens: 10.8 s and 651 MiB, against
0.05 s and 0.13 MiB here; see ``benchmarks/gguf_header.py``).

Bounds of the walk, ``H`` being the header's size in bytes (magic to the end of
the last tensor info):

- memory: at most ``32 * H`` bytes of Python allocations, plus the 64 KiB read
  window. Nothing is held per skipped string or array element (the vocabulary,
  merges and scores are walked, never stored); what is held is the result: an
  entry per tensor info (at least 24 header bytes; about 500 bytes as entry,
  name and shape) and a pair of strings per scalar key. Measured with
  tracemalloc on crafted headers: 200,000 scalar tensors with 3-byte names 15.6
  bytes per header byte (the worst found), 200,000 one-element tensors 12.3,
  200,000 uint8 keys 11.9, 1,999,999 empty strings in one array 0.009 (137 KB
  for 16 MB), 1,000,000 empty nested arrays 0.006; SmolLM2-135M's real header
  (1.7 MiB: 49k tokens, 48k merges) 0.09.
- time: linear in ``H``, one pass, no seeks back. Measured on a 2-core
  machine: tensor infos 0.09-0.14 s/MB (about 3.5 us each, the dearest
  element), scalar keys 0.07 s/MB, strings in arrays 0.015 s/MB, nested
  arrays 0.024 s/MB; SmolLM2's header 0.010 s (GGUFReader: 1.6 s, 150 MiB).

Limits: ``MAX_ARRAY_NESTING`` levels of arrays, ``MAX_STRING_ELEMENTS`` strings
in the whole header, ``MAX_KEY_NBYTES`` bytes per key or tensor name,
``MAX_DIMS`` dimensions. Keys must be UTF-8 (else HeaderEncodingError, as a
safetensors header), tensor names too (else InvalidNameError); Python's strict
codec refuses overlong forms and encoded surrogates (CESU-8). String values are
decoded with U+FFFD for bad bytes, as the ``gguf`` package did. Files are
little-endian: a big-endian file (its version reads as ``2 << 24`` or
``3 << 24``) is refused by name.
"""

from __future__ import annotations

import itertools
import math
import os
import struct
import sys
from typing import Any, NamedTuple

from ..errors import (
    DuplicateTensorError,
    GGUFError,
    HeaderEncodingError,
    InvalidNameError,
    InvalidOffsetsError,
    InvalidShapeError,
    MetadataError,
    SizeOverflowError,
    TensorOverlapError,
    TruncatedFileError,
    UnknownDtypeError,
    UnsupportedQuantizationError,
)
from .catalog import Catalog, FileStamp, TensorEntry, fits_int64
from .source import GGUF_MAGIC, open_regular

SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT
MAX_ARRAY_NESTING = 8
MAX_KEY_NBYTES = 65_535  # a metadata key or tensor name is a dotted name, not data
# Strings are walked one by one (a length, then a skip), holding nothing, so they cost
# time linear in the header and no memory. The cap is far above real vocabularies
# (Gemma 3: 262,144 tokens; Llama 3: 128k tokens and 280k merges) and keeps a hostile
# header's walk well under a second (2M empty strings: 0.2 s).
MAX_STRING_ELEMENTS = 2_000_000
MAX_DIM = (1 << 63) - 1
MAX_NBYTES = (1 << 63) - 1
# Bytes read at a time: the walk holds this window (and one string being decoded), no more.
WINDOW_NBYTES = 1 << 16

# GGML types stored as plain little-endian elements, by safetensors dtype name.
PLAIN_TYPES: dict[str, str] = {
    "F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64",
    "I8": "I8", "I16": "I16", "I32": "I32", "I64": "I64",
}

# Metadata value types (gguf.GGUFValueType): the fixed-size scalars by id, 8 = string, 9 = array.
_UINT32, _STRING, _ARRAY = 4, 8, 9
_SCALARS: dict[int, struct.Struct] = {
    0: struct.Struct("<B"), 1: struct.Struct("<b"), 2: struct.Struct("<H"), 3: struct.Struct("<h"),
    4: struct.Struct("<I"), 5: struct.Struct("<i"), 6: struct.Struct("<f"), 7: struct.Struct("<?"),
    10: struct.Struct("<Q"), 11: struct.Struct("<q"), 12: struct.Struct("<d"),
}
_VALUE_NAMES = {0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32",
                7: "BOOL", 8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64", 12: "FLOAT64"}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_ARRAY_HEAD = struct.Struct("<IQ")  # element type, element count
_TYPE_OFFSET = struct.Struct("<IQ")  # a tensor's GGML type and data offset
_DIMS = [struct.Struct(f"<{n}Q") for n in range(MAX_DIMS + 1)]  # a tensor's dims, by count


def dequantizable() -> frozenset[str]:
    """Names of the GGML quantizations the installed ``gguf`` package can dequantize."""
    from gguf import quants

    traits = getattr(quants, "_type_traits", {})
    return frozenset(t.name for t in traits) - frozenset(PLAIN_TYPES)


def _ggml_types() -> dict[int, tuple[str, int, int]]:
    """GGML type id -> (name, elements per block, bytes per block), from the ``gguf`` package's table."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return {int(t): (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}


# ---------------------------------------------------------------- what the walk returns

class TensorInfo(NamedTuple):
    """One tensor as the header describes it."""

    name: str
    ggml_type: str  # "F32", "Q4_1", ...
    shape: tuple[int, ...]  # row-major: GGUF's dims reversed
    offset: int  # from the start of the data section (a multiple of the alignment)
    nbytes: int


class GGUFHeader(NamedTuple):
    """What :func:`validate` read: every tensor info in file order, and the scalar metadata."""

    version: int
    alignment: int
    data_offset: int  # absolute offset of the data section: the end of the header, aligned up
    tensors: list[TensorInfo]
    metadata: dict[str, str]  # scalar values as ``str()`` of the Python value; arrays skipped


# ---------------------------------------------------------------- reading

def _pread(fd: int, nbytes: int, offset: int) -> bytes:
    """Up to ``nbytes`` at ``offset``: fewer only at the end of the file (short reads are retried)."""
    out = os.pread(fd, nbytes, offset)
    if len(out) == nbytes or not out:
        return out
    parts = [out]
    got = len(out)
    while got < nbytes:
        more = os.pread(fd, nbytes - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class _Cursor:
    """Little-endian reads of the header through a window of plain reads; never past the file's size.

    ``pos`` only moves forward. A skip past the window reads nothing; the next read refills it.
    Messages are built only when something is wrong: ``what`` names the field, ``of`` (a key, a
    tensor name or index) is appended as ``of 'name'``, so the walk formats no string per field.
    """

    __slots__ = ("base", "buf", "fd", "path", "pos", "size")

    def __init__(self, fd: int, size: int, path: str) -> None:
        self.fd, self.size, self.path = fd, size, path
        self.pos = 0  # file offset of the next byte
        self.buf = b""  # a window of the file, starting at file offset `base`
        self.base = 0

    def truncated(self, nbytes: int, what: str, of: object = None) -> TruncatedFileError:
        return TruncatedFileError(f"{_subject(what, of)} needs {nbytes} bytes at offset {self.pos} but the "
                                  f"file is {self.size} bytes", path=self.path)

    def fill(self, nbytes: int, what: str, of: object = None) -> int:
        """Make the window hold ``[pos, pos + nbytes)``; returns ``pos``'s index in it."""
        if nbytes > self.size - self.pos:
            raise self.truncated(nbytes, what, of)
        i = self.pos - self.base
        if i + nbytes <= len(self.buf):
            return i
        self.buf = b""  # drop the old window before reading the next: one window held at a time
        self.buf = _pread(self.fd, min(max(nbytes, WINDOW_NBYTES), self.size - self.pos), self.pos)
        self.base = self.pos
        if len(self.buf) < nbytes:  # the file shrank while we read it
            raise TruncatedFileError(f"{_subject(what, of)}: read {len(self.buf)} of {nbytes} bytes at "
                                     f"offset {self.pos} (the file shrank?)", path=self.path)
        return 0

    def unpack(self, fmt: struct.Struct, what: str, of: object = None) -> Any:
        i = self.pos - self.base
        if i + fmt.size > len(self.buf):  # (the window never holds bytes past the file's end)
            i = self.fill(fmt.size, what, of)
        self.pos += fmt.size
        return fmt.unpack_from(self.buf, i)

    def take(self, nbytes: int, what: str, of: object = None) -> bytes:
        i = self.fill(nbytes, what, of)
        self.pos += nbytes
        return self.buf[i:i + nbytes]

    def skip(self, nbytes: int, what: str, of: object = None) -> None:
        if nbytes > self.size - self.pos:
            raise self.truncated(nbytes, what, of)
        self.pos += nbytes

    def raw_string(self, what: str, of: object = None, *, limit: int | None = None) -> bytes:
        """A length-prefixed string's bytes (``limit``: refuse a longer one before reading it)."""
        (n,) = self.unpack(_U64, "length of " + what, of)
        if limit is not None and n > limit:
            raise MetadataError(f"{_subject(what, of)} at offset {self.pos - 8} is {n} bytes long (at most "
                                f"{limit})", path=self.path)
        i = self.pos - self.base
        if i + n > len(self.buf):
            i = self.fill(n, f"{_subject(what, of)} ({n} bytes)")
        self.pos += n
        return self.buf[i:i + n]

    def at_least(self, count: int, each: int, what: str, of: object = None) -> None:
        """Refuse a count that cannot fit in what is left of the file (before looping over it)."""
        if count * each > self.size - self.pos:
            raise TruncatedFileError(f"{_subject(what, of)}: count {count} needs at least {count * each} "
                                     f"bytes at offset {self.pos}, the file has {self.size - self.pos} left",
                                     path=self.path)


def _subject(what: str, of: object) -> str:
    return what if of is None else f"{what} {of}" if isinstance(of, int) else f"{what} of {of!r}"


def _skip_strings(cur: _Cursor, count: int, key: str) -> None:
    """Walk ``count`` length-prefixed strings, reading only their lengths and holding nothing.

    The hot loop of the walk (a vocabulary is 50k-262k strings), so the window is kept in locals.
    """
    pos, size, buf, base = cur.pos, cur.size, cur.buf, cur.base
    unpack = _U64.unpack_from
    for k in range(count):
        i = pos - base
        if i + 8 > len(buf):
            cur.pos = pos
            i = cur.fill(8, f"length of string {k}", key)
            buf, base = cur.buf, cur.base
        (n,) = unpack(buf, i)
        pos += 8 + n
        if pos > size:
            cur.pos = pos - n
            raise cur.truncated(n, f"string {k}", key)
    cur.pos = pos


def _skip_array(cur: _Cursor, key: str, depth: int, strings: list[int]) -> None:
    """Walk one array value (after its value type): check its element type and count, hold nothing.

    ``depth``: 1 for a metadata value, 2 for its elements if they are arrays, ...
    ``strings[0]`` tallies string elements across the header (see MAX_STRING_ELEMENTS).
    """
    etype, count = cur.unpack(_ARRAY_HEAD, "array type and length", key)
    if etype in _SCALARS:
        cur.at_least(count, _SCALARS[etype].size, "array element", key)
        cur.skip(count * _SCALARS[etype].size, "array", key)
    elif etype == _STRING:
        cur.at_least(count, 8, "array element", key)  # each: a length at least
        if strings[0] + count > MAX_STRING_ELEMENTS:
            raise MetadataError(f"metadata {key!r} holds {count} strings; the header may hold at most "
                                f"{MAX_STRING_ELEMENTS} in all", path=cur.path)
        strings[0] += count
        _skip_strings(cur, count, key)
    elif etype == _ARRAY:
        if depth >= MAX_ARRAY_NESTING and count:  # the elements would be arrays one level deeper
            raise MetadataError(f"metadata {key!r} nests arrays over {MAX_ARRAY_NESTING} deep",
                                path=cur.path)
        cur.at_least(count, _ARRAY_HEAD.size, "array element", key)  # each: a type and a length
        for _ in range(count):
            _skip_array(cur, key, depth + 1, strings)
    else:
        raise MetadataError(f"metadata {key!r} is an array of unknown value type {etype}", path=cur.path)


# ---------------------------------------------------------------- the walk

def validate(f: Any, size: int, path: str) -> GGUFHeader:
    """Apply every structural rule of GGUF to an open file, reading its header once.

    Checks magic, version (and byte order), the tensor and metadata counts
    against the file size, every string length, key encoding, value type and
    array nesting, each tensor's name, type, dimensions, byte size, its offset
    (aligned, inside the file) and that no two tensors overlap or share a name.

    Args:
        f: the file, open for binary reading (read by ``os.pread`` on its descriptor).
        size: the file's size in bytes.
        path: the file's name, for error messages.

    Returns:
        A :class:`GGUFHeader`: the tensor infos in file order and the scalar metadata.

    Raises:
        One :class:`~sparsemap.errors.FormatError` subclass per rule broken.

    Example:
        >>> with open("model.gguf", "rb") as f:                       # doctest: +SKIP
        ...     header = validate(f, os.fstat(f.fileno()).st_size, "model.gguf")
        >>> header.tensors[0].name, header.metadata["general.architecture"]
        ('token_embd.weight', 'llama')
    """
    cur = _Cursor(f.fileno(), size, path)
    if size < 4 or cur.take(4, "magic") != GGUF_MAGIC:
        magic = cur.buf[:4] if size >= 4 else b""
        raise GGUFError(f"magic is {magic!r}, not {GGUF_MAGIC!r}", path=path)
    (version,) = cur.unpack(_U32, "version")
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in SUPPORTED_VERSIONS:
            raise GGUFError(f"version {version}: a big-endian file (version {swapped} byte-swapped); "
                            "sparsemap reads little-endian GGUF only", path=path)
        raise GGUFError(f"version {version}; sparsemap reads versions "
                        f"{', '.join(map(str, SUPPORTED_VERSIONS))}", path=path)
    (n_tensors,) = cur.unpack(_U64, "tensor count")
    (n_kv,) = cur.unpack(_U64, "metadata count")
    metadata, alignment = _walk_metadata(cur, n_kv)
    tensors = _walk_tensor_infos(cur, n_tensors, alignment)
    data_offset = -(-cur.pos // alignment) * alignment
    # Second pass over what was read (not the file): data inside the file, no overlaps.
    for t in tensors:
        start = data_offset + t.offset
        if start + t.nbytes > size:
            raise TruncatedFileError(f"data [{start}, {start + t.nbytes}) runs past the end of the file "
                                     f"({size} bytes)", path=path, tensor=t.name)
    for a, b in itertools.pairwise(sorted(tensors, key=lambda t: t.offset)):
        if b.offset < a.offset + a.nbytes:
            raise TensorOverlapError(f"data starts at {b.offset}, inside {a.name!r} ([{a.offset}, "
                                     f"{a.offset + a.nbytes}))", path=path, tensor=b.name)
    return GGUFHeader(version, alignment, data_offset, tensors, metadata)


def _walk_metadata(cur: _Cursor, n_kv: int) -> tuple[dict[str, str], int]:
    """The key/value section: scalars rendered as strings (file order), arrays walked and dropped."""
    path = cur.path
    cur.at_least(n_kv, 8 + 4, "metadata")  # each: a key length and a value type at least
    alignment = DEFAULT_ALIGNMENT
    metadata: dict[str, str] = {}
    keys: set[str] = set()
    strings = [0]
    for _ in range(n_kv):
        raw = cur.raw_string("metadata key", limit=MAX_KEY_NBYTES)
        try:
            key = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise HeaderEncodingError(f"metadata key at offset {cur.pos - len(raw)} is not UTF-8 (byte "
                                      f"{e.start}: {raw[e.start:e.start + 4].hex(' ')})", path=path) from None
        if key in keys:
            raise MetadataError(f"metadata key {key!r} appears twice", path=path)
        keys.add(key)
        (vtype,) = cur.unpack(_U32, "value type", key)
        value: str | None
        if vtype in _SCALARS:
            value = str(cur.unpack(_SCALARS[vtype], "value", key)[0])
        elif vtype == _STRING:
            strings[0] += 1
            if strings[0] > MAX_STRING_ELEMENTS:
                raise MetadataError(f"the header holds more than {MAX_STRING_ELEMENTS} strings (at {key!r})",
                                    path=path)
            value = cur.raw_string("value", key).decode("utf-8", errors="replace")
        elif vtype == _ARRAY:
            _skip_array(cur, key, 1, strings)
            value = None
        else:
            raise MetadataError(f"metadata {key!r} has unknown value type {vtype} (known: 0-12)", path=path)
        if key == "general.alignment":
            # llama.cpp reads it as a uint32 (and the gguf package refused any other type).
            if vtype != _UINT32 or value is None or int(value) == 0 or int(value) & (int(value) - 1):
                raise MetadataError(f"general.alignment is {_VALUE_NAMES[vtype]} {value}, not a uint32 "
                                    "power of two", path=path)
            alignment = int(value)
        # The gguf package kept its own fields (version, counts) under "GGUF."; catalogs never showed
        # file keys with that prefix, and still do not.
        if value is not None and not key.startswith("GGUF."):
            metadata[key] = value
    return metadata, alignment


def _walk_tensor_infos(cur: _Cursor, n_tensors: int, alignment: int) -> list[TensorInfo]:
    """The tensor info section: name, dims, type and offset of each tensor, checked one by one."""
    path = cur.path
    types = _ggml_types()
    cur.at_least(n_tensors, 8 + 4 + 4 + 8, "tensor")  # name length, n_dims, type, offset
    tensors: list[TensorInfo] = []
    seen: dict[str, int] = {}
    for i in range(n_tensors):
        raw = cur.raw_string("name of tensor", i, limit=MAX_KEY_NBYTES)
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidNameError(f"name of tensor {i} at offset {cur.pos - len(raw)} is not UTF-8 (byte "
                                   f"{e.start}: {raw[e.start:e.start + 4].hex(' ')})", path=path,
                                   tensor=raw.decode("utf-8", errors="backslashreplace")) from None
        if name in seen:
            raise DuplicateTensorError(f"tensor name appears twice (tensors {seen[name]} and {i})",
                                       path=path, tensor=name)
        seen[name] = i
        (n_dims,) = cur.unpack(_U32, "dimension count", name)
        if n_dims > MAX_DIMS:
            raise InvalidShapeError(f"{n_dims} dimensions (GGML allows at most {MAX_DIMS})",
                                    path=path, tensor=name)
        dims = cur.unpack(_DIMS[n_dims], "dimensions", name)
        ttype, offset = cur.unpack(_TYPE_OFFSET, "type and offset", name)
        if ttype not in types:
            raise UnknownDtypeError(f"unknown GGML type {ttype}", path=path, tensor=name)
        qname, block, type_size = types[ttype]
        numel = math.prod(dims)
        if any(d > MAX_DIM for d in dims) or not fits_int64(dims, type_size):
            raise SizeOverflowError(f"dims {list(dims)} of {qname} need more than 2**63 bytes",
                                    path=path, tensor=name)
        if not dims and block > 1:  # a scalar: one element, never a whole block (llama.cpp agrees)
            raise InvalidShapeError(f"0 dimensions (a scalar) in {qname}, whose blocks hold {block} "
                                    "elements", path=path, tensor=name)
        if dims and dims[0] % block:
            raise InvalidShapeError(f"row length {dims[0]} is not a multiple of the {block}-element block of "
                                    f"{qname}", path=path, tensor=name)
        if offset % alignment:
            raise InvalidOffsetsError(f"offset {offset} is not a multiple of the alignment {alignment}",
                                      path=path, tensor=name)
        tensors.append(TensorInfo(name, qname, dims[::-1], offset, numel // block * type_size))
    return tensors


# ---------------------------------------------------------------- the catalog

def open_gguf(path: str, stamp: FileStamp) -> Catalog:
    """Index a GGUF file's tensors; read no tensor data. ``stamp``: the file's version when opened."""
    with open_regular(path) as f:
        header = validate(f, os.fstat(f.fileno()).st_size, path)
    if sys.byteorder != "little":  # tensors are mapped as they lie: little-endian elements
        raise GGUFError("GGUF files are little-endian and this machine is not", path=path)
    supported = None
    entries: dict[str, TensorEntry] = {}
    for t in header.tensors:
        offset = header.data_offset + t.offset
        if t.ggml_type in PLAIN_TYPES:
            entries[t.name] = TensorEntry(t.name, path, offset, t.nbytes, PLAIN_TYPES[t.ggml_type], t.shape)
            continue
        if supported is None:
            supported = dequantizable()
        if t.ggml_type not in supported:
            raise UnsupportedQuantizationError(f"quantization {t.ggml_type} cannot be dequantized "
                                               f"(supported: {', '.join(sorted(supported))})",
                                               path=path, tensor=t.name)
        entries[t.name] = TensorEntry(t.name, path, offset, t.nbytes, "F32", t.shape, encoding=t.ggml_type)
    return Catalog(source=path, format="gguf", entries=entries, metadata=header.metadata,
                   stamps={path: stamp})
