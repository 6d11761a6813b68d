"""safetensors: our own strict parser, because we need the byte offsets.

File layout: 8 bytes little-endian ``N``, then ``N`` bytes of UTF-8 JSON (the
header), then the data section. The header maps each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
data section) plus an optional ``"__metadata__"`` string map.

All rules live in :func:`validate`, applied before anything is mapped: one
place to audit. No torch here.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

from ..errors import (
    ByteLengthMismatchError,
    DuplicateTensorError,
    HeaderEncodingError,
    HeaderJSONError,
    HeaderTooLargeError,
    HeaderTooShortError,
    InvalidOffsetsError,
    InvalidShapeError,
    MetadataError,
    SizeOverflowError,
    TensorGapError,
    TensorOverlapError,
    TrailingBytesError,
    TruncatedFileError,
    UnknownDtypeError,
)
from .catalog import Catalog, FileStamp, TensorEntry, check_name, fits_int64
from .dtypes import ITEMSIZE
from .reserved import LAYOUT_KEY, QUANT_KEY
from .source import open_regular

# The reference implementation refuses headers over 100 MB; a header that big
# would already be a denial of service for json.loads.
MAX_HEADER_NBYTES = 100_000_000

# No file holds more than 2**63 bytes (off_t is signed 64-bit); any product of
# dims beyond that is a hostile or corrupt header, refused before it is used.
MAX_NBYTES = (1 << 63) - 1

METADATA_KEY = "__metadata__"


def read_header(path: str) -> tuple[bytes, int]:
    """Return ``(header bytes, file size)``, checking only what reading them needs."""
    with open_regular(path) as f:
        file_nbytes = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise HeaderTooShortError(
                f"file is {file_nbytes} bytes, too short for the 8-byte header length", path=path)
        (header_nbytes,) = struct.unpack("<Q", prefix)
        if header_nbytes > MAX_HEADER_NBYTES:
            raise HeaderTooLargeError(
                f"header length {header_nbytes} exceeds the cap of {MAX_HEADER_NBYTES} bytes", path=path)
        if 8 + header_nbytes > file_nbytes:
            raise HeaderTooLargeError(
                f"header length {header_nbytes} runs past the end of the file "
                f"({file_nbytes} bytes)", path=path)
        header = f.read(header_nbytes)
        if len(header) != header_nbytes:  # the file shrank between fstat and read
            raise TruncatedFileError(
                f"read {len(header)} of {header_nbytes} header bytes", path=path)
    return header, file_nbytes


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys silently; a duplicate tensor
    # name is ambiguous (which bytes are "the" tensor?), so it is an error.
    # Tensor entries are objects, fields are not: that tells the two apart.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            if isinstance(value, dict):
                raise DuplicateTensorError(f"tensor name {key!r} appears twice in the header")
            raise HeaderJSONError(f"key {key!r} appears twice in one object of the header")
        out[key] = value
    return out


def validate(header: bytes, file_nbytes: int, path: str) -> tuple[list[TensorEntry], dict[str, str]]:
    """Apply every rule of the format to a header; return its entries and metadata.

    Args:
        header: the JSON header bytes (without the 8-byte length prefix).
        file_nbytes: the size of the whole file.
        path: the file, for error messages and entries.

    Returns:
        ``(entries sorted by offset, __metadata__)``; entry offsets are absolute.

    Raises:
        One :class:`~sparsemap.errors.FormatError` subclass per rule broken.
    """
    data_start = 8 + len(header)
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderEncodingError(f"header is not UTF-8 (byte {e.start}: {e.reason})", path=path) from None
    try:
        doc = json.loads(text, object_pairs_hook=_reject_duplicates)
    except (DuplicateTensorError, HeaderJSONError) as e:
        raise type(e)(e.detail, path=path) from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise HeaderJSONError(f"header is not JSON: {e}", path=path) from None
    if not isinstance(doc, dict):
        raise HeaderJSONError(f"header is a JSON {type(doc).__name__}, not an object", path=path)

    metadata = doc.pop(METADATA_KEY, None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise MetadataError(f"{METADATA_KEY} must map strings to strings, got {_short(metadata)}", path=path)
    for key, value in metadata.items():
        check_name(key, path, f"{METADATA_KEY} key")
        check_name(value, path, f"{METADATA_KEY} value of {key!r}")

    data_nbytes = file_nbytes - data_start
    entries = [_entry(name, info, data_start, path) for name, info in doc.items()]

    # Offsets must tile the data section exactly: sorted by (begin, end), each
    # tensor starts where the previous one ended, and the last ends at EOF.
    entries.sort(key=lambda e: (e.offset, e.nbytes))
    cursor = data_start
    prev: TensorEntry | None = None
    for e in entries:
        if e.offset > cursor:
            raise TensorGapError(
                f"{e.offset - cursor} bytes at data offset {cursor - data_start} belong to no tensor "
                f"(next tensor starts at {e.offset - data_start})", path=path, tensor=e.name)
        if e.offset < cursor:
            other = prev.name if prev is not None else "?"
            raise TensorOverlapError(
                f"data_offsets start at {e.offset - data_start}, inside {other!r} which ends at "
                f"{cursor - data_start}", path=path, tensor=e.name)
        cursor = e.end
        prev = e
    if cursor > file_nbytes:
        raise TruncatedFileError(
            f"tensors need {cursor - data_start} data bytes but the file has {data_nbytes} "
            f"(file is {file_nbytes} bytes, needs {cursor})", path=path,
            tensor=prev.name if prev else None)
    if cursor < file_nbytes:
        raise TrailingBytesError(
            f"{file_nbytes - cursor} bytes after the last tensor belong to no tensor "
            f"(data section is {data_nbytes} bytes, tensors end at {cursor - data_start})", path=path)
    return entries, metadata


def _entry(name: str, info: Any, data_start: int, path: str) -> TensorEntry:
    check_name(name, path)
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise HeaderJSONError(
            f"entry must be an object with dtype, shape and data_offsets, got {_short(info)}",
            path=path, tensor=name)
    dtype = info["dtype"]
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise UnknownDtypeError(f"unknown dtype {dtype!r} (known: {', '.join(ITEMSIZE)})",
                                path=path, tensor=name)
    shape = info["shape"]
    # bool is an int subclass in Python; a dim of `true` is not a dimension.
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidShapeError(f"shape must be a list of non-negative integers, got {_short(shape)}",
                                path=path, tensor=name)
    offsets = info["data_offsets"]
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)):
        raise InvalidOffsetsError(f"data_offsets must be [begin, end] non-negative integers, got "
                                  f"{_short(offsets)}", path=path, tensor=name)
    begin, end = offsets
    if begin > end:
        raise InvalidOffsetsError(f"data_offsets [{begin}, {end}] end before they begin",
                                  path=path, tensor=name)
    # Python ints do not overflow, but a size past 2**63 cannot be in a file and would overflow the C
    # code torch hands it to, even for an empty tensor (its other dimensions are multiplied too).
    if not fits_int64(shape, ITEMSIZE[dtype]):
        raise SizeOverflowError(f"shape {shape} of {dtype} needs more than 2**63 bytes (zero dimensions "
                                "counted as one)", path=path, tensor=name)
    nbytes = ITEMSIZE[dtype] * math.prod(shape)
    if end - begin != nbytes:
        raise ByteLengthMismatchError(
            f"data_offsets [{begin}, {end}] hold {end - begin} bytes but shape {shape} of {dtype} "
            f"needs {nbytes}", path=path, tensor=name)
    return TensorEntry(name=name, file=path, offset=data_start + begin, nbytes=nbytes,
                       dtype=dtype, shape=tuple(shape))


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def open_safetensors(path: str, stamp: FileStamp) -> Catalog:
    """Read and validate a safetensors file's header; map nothing.

    A file written by sparsemap's layout compiler comes back in its logical
    form: padding dropped, special layouts given as strided views. ``stamp``
    is the file's version when opened (recorded in the catalog).
    """
    header, file_nbytes = read_header(path)
    entries, metadata = validate(header, file_nbytes, path)
    if LAYOUT_KEY in metadata:  # written by the layout compiler; other files never load its reader
        from .layout import apply_layout

        entries = apply_layout(entries, metadata, path)
    quantized = None
    if QUANT_KEY in metadata:  # weights kept quantized in the kernels' layouts
        from .quantized import apply_quantization

        entries, quantized = apply_quantization(entries, metadata, path)
    return Catalog(source=path, format="safetensors", entries={e.name: e for e in entries},
                   metadata=metadata, stamps={path: stamp}, quantized=quantized)
