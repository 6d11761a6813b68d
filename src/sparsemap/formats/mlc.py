"""MLC-LLM / TVM parameter caches: ``ndarray-cache.json`` and its ``params_shard_N.bin`` files. No torch.

The layout TVM's ``tvm.contrib.tvmjs.dump_ndarray_cache`` (``dump_tensor_cache`` in newer TVM, which
names the file ``tensor-cache.json``) writes and MLC-LLM ships::

    {"metadata": {...},
     "records": [{"dataPath": "params_shard_0.bin", "format": "raw-shard", "nbytes": N, "md5sum": "...",
                  "records": [{"name": "...", "shape": [...], "dtype": "float32",
                               "format": "f32-to-bf16" | "raw", "nbytes": n, "byteOffset": o}, ...]},
                 ...]}

Each array is ``nbytes`` bytes at ``byteOffset`` of its shard, row-major, little-endian. A record of
format ``"f32-to-bf16"`` and dtype ``float32`` holds bfloat16 bits (TVM rounds on the way out and
widens on the way in): its entry is BF16, mapped as stored (cast it to float32 with ``dtype=`` if
wanted). Other records hold their dtype's bytes, whatever their format says (TVM writes the dump's
format on every record). TVM's loader reads a whole shard at a time; here each array is an entry of
its own, mapped zero-copy or streamed one at a time to a device (:mod:`sparsemap.stream`).

Checked before anything is mapped: the JSON's size (64 MiB at most) and shape; each shard a plain
file name in the cache's folder (no path, no ``..``: a cache could otherwise read any file), present,
a regular file of exactly its ``nbytes`` (TVM's loader asserts the same); each record's name (unique
across shards), shape, dtype, format, its ``nbytes`` against the shape, its bytes inside its shard and
no two records of a shard overlapping. Gaps between records are allowed (nothing in the format says
records tile a shard). ``md5sum`` is not checked: that would read every byte.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

from ..errors import (
    ByteLengthMismatchError,
    DuplicateTensorError,
    InvalidOffsetsError,
    InvalidShapeError,
    MissingShardError,
    MlcFormatError,
    SizeOverflowError,
    TensorOverlapError,
    TrailingBytesError,
    TruncatedFileError,
    UnknownDtypeError,
)
from .catalog import Catalog, FileStamp, TensorEntry, check_name, fits_int64
from .dtypes import ITEMSIZE
from .source import check_regular_file, open_regular

MAX_JSON_NBYTES = 64 << 20  # a record is ~150 bytes: far more arrays than any model has
SHARD_FORMATS = ("raw-shard",)
RECORD_FORMATS = ("raw", "f32-to-bf16")
# TVM's dtype strings (tvm.runtime.DataType) -> safetensors names. The fp8 types have two spellings.
TVM_DTYPES = {
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
    "int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64",
    "uint8": "U8", "uint16": "U16", "uint32": "U32", "uint64": "U64", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "e4m3_float8": "F8_E4M3", "e5m2_float8": "F8_E5M2",
}


def read_cache(path: str) -> dict[str, Any]:
    """The cache's JSON document, checked to be an object with a ``records`` list.

    Raises:
        MlcFormatError: over the size cap, not UTF-8 JSON, or not an object with ``records``.
    """
    with open_regular(path) as f:
        nbytes = os.fstat(f.fileno()).st_size
        if nbytes > MAX_JSON_NBYTES:
            raise MlcFormatError(f"is {nbytes} bytes, over the {MAX_JSON_NBYTES}-byte cap for a cache's JSON",
                                 path=path)
        raw = f.read()
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise MlcFormatError(f"not UTF-8 JSON: {e}", path=path) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("records"), list):
        raise MlcFormatError(f"must be an object with a \"records\" list of shards (got "
                             f"{type(doc.get('records') if isinstance(doc, dict) else doc).__name__})",
                             path=path)
    if "metadata" in doc and not isinstance(doc["metadata"], dict | type(None)):
        raise MlcFormatError("\"metadata\" must be an object", path=path)
    return doc


def _int(value: object) -> bool:
    return type(value) is int and value >= 0


def validate(doc: dict[str, Any], folder: str, path: str) -> tuple[list[TensorEntry], dict[str, FileStamp]]:
    """Check every shard and record of a cache's JSON against the shard files (their sizes only).

    Args:
        doc: the JSON document, from :func:`read_cache`.
        folder: the folder shards are named in.
        path: the JSON's path, for messages.

    Returns:
        Every array's entry (shard by shard, in record order) and each shard file's stamp.

    Raises:
        One :class:`~sparsemap.errors.FormatError` subclass per fault (see the module docstring).

    Example:
        >>> doc = read_cache("Llama-3.2-1B-q0f32-MLC/ndarray-cache.json")      # doctest: +SKIP
        >>> entries, stamps = validate(doc, "Llama-3.2-1B-q0f32-MLC", "ndarray-cache.json")
    """
    entries: list[TensorEntry] = []
    stamps: dict[str, FileStamp] = {}
    owner: dict[str, str] = {}  # array name -> its shard, to name both copies of a duplicate
    for i, shard in enumerate(doc["records"]):
        if not isinstance(shard, dict):
            raise MlcFormatError(f"shard record {i} is a {type(shard).__name__}, not an object", path=path)
        data_path = shard.get("dataPath")
        if not isinstance(data_path, str):
            raise MlcFormatError(f"shard record {i} has no \"dataPath\" string", path=path)
        check_name(data_path, path, f"dataPath of shard record {i}")
        # A plain file name beside the JSON: "../x", "/etc/passwd" or "sub/../../x" would read any file.
        if data_path != os.path.basename(data_path) or data_path in ("", ".", "..") or "\0" in data_path:
            raise MlcFormatError(f"dataPath {data_path!r} of shard record {i} is not a file name in the "
                                 "cache's folder", path=path)
        shard_path = os.path.join(folder, data_path)
        if shard_path in stamps:
            raise MlcFormatError(f"dataPath {data_path!r} is named by two shard records", path=path)
        if shard.get("format") not in SHARD_FORMATS:
            raise MlcFormatError(f"shard {data_path!r} has format {str(shard.get('format'))[:40]!r}, not "
                                 f"{' or '.join(map(repr, SHARD_FORMATS))}", path=path)
        shard_nbytes = shard.get("nbytes")
        if not _int(shard_nbytes):
            raise MlcFormatError(f"shard {data_path!r} has nbytes {str(shard_nbytes)[:40]}, not a "
                                 "non-negative integer", path=path)
        records = shard.get("records")
        if not isinstance(records, list):
            raise MlcFormatError(f"shard {data_path!r} has no \"records\" list", path=path)
        placed = [_record(r, j, data_path, shard_path, shard_nbytes, path) for j, r in enumerate(records)]
        for e in placed:
            if e.name in owner:
                raise DuplicateTensorError(f"listed twice (shards {owner[e.name]!r} and {data_path!r})",
                                           path=path, tensor=e.name)
            owner[e.name] = data_path
        _check_overlaps(placed, path)
        stamps[shard_path] = _shard_stamp(shard_path, data_path, shard_nbytes, path)
        entries.extend(placed)
    return entries, stamps


def _record(rec: object, j: int, data_path: str, shard_path: str, shard_nbytes: int,
            path: str) -> TensorEntry:
    if not isinstance(rec, dict):
        raise MlcFormatError(f"record {j} of shard {data_path!r} is a {type(rec).__name__}, not an object",
                             path=path)
    name = rec.get("name")
    if not isinstance(name, str):
        raise MlcFormatError(f"record {j} of shard {data_path!r} has no \"name\" string", path=path)
    check_name(name, path)
    shape = rec.get("shape")
    if not isinstance(shape, list) or not all(_int(d) for d in shape):
        raise InvalidShapeError(f"shape {str(shape)[:80]} is not a list of non-negative integers", path=path,
                                tensor=name)
    dtype = rec.get("dtype")
    if dtype not in TVM_DTYPES:
        raise UnknownDtypeError(f"dtype {str(dtype)[:40]!r} is not one sparsemap reads (known: "
                                f"{', '.join(TVM_DTYPES)})", path=path, tensor=name)
    fmt = rec.get("format")
    if fmt not in RECORD_FORMATS:
        raise MlcFormatError(f"format {str(fmt)[:40]!r}, not {' or '.join(map(repr, RECORD_FORMATS))}",
                             path=path, tensor=name)
    stored = "BF16" if fmt == "f32-to-bf16" and dtype == "float32" else TVM_DTYPES[dtype]
    if not fits_int64(shape, ITEMSIZE[stored]):
        raise SizeOverflowError(f"shape {shape} of {stored} needs more than 2**63 bytes", path=path,
                                tensor=name)
    offset, nbytes = rec.get("byteOffset"), rec.get("nbytes")
    if not _int(offset) or not _int(nbytes):
        raise InvalidOffsetsError(f"byteOffset {str(offset)[:40]} and nbytes {str(nbytes)[:40]} must be "
                                  "non-negative integers", path=path, tensor=name)
    numel = 1
    for d in shape:
        numel *= d
    if nbytes != numel * ITEMSIZE[stored]:
        how = f"{dtype} stored as bfloat16 ({fmt})" if stored == "BF16" and dtype == "float32" else stored
        raise ByteLengthMismatchError(f"nbytes {nbytes}, but shape {shape} of {how} needs "
                                      f"{numel * ITEMSIZE[stored]}", path=path, tensor=name)
    if offset + nbytes > shard_nbytes:
        raise InvalidOffsetsError(f"bytes [{offset}, {offset + nbytes}) reach past shard {data_path!r} "
                                  f"({shard_nbytes} bytes)", path=path, tensor=name)
    return TensorEntry(name, shard_path, offset, nbytes, stored, tuple(shape))


def _check_overlaps(entries: list[TensorEntry], path: str) -> None:
    ordered = sorted((e for e in entries if e.nbytes), key=lambda e: e.offset)
    for a, b in itertools.pairwise(ordered):
        if b.offset < a.end:
            raise TensorOverlapError(f"bytes start at {b.offset}, inside {a.name!r} ([{a.offset}, {a.end})) "
                                     f"in shard {os.path.basename(a.file)!r}", path=path, tensor=b.name)


def _shard_stamp(shard_path: str, data_path: str, nbytes: int, path: str) -> FileStamp:
    """The shard's stamp, once it is known to be a regular file of exactly ``nbytes``."""
    if not os.path.lexists(shard_path):
        raise MissingShardError(f"shard {data_path!r} named by the cache is missing", path=path)
    st = check_regular_file(shard_path)  # a FIFO or a device named like a shard is never opened
    if st.st_size < nbytes:
        raise TruncatedFileError(f"is {st.st_size} bytes, but {os.path.basename(path)} says {nbytes}",
                                 path=shard_path)
    if st.st_size > nbytes:
        raise TrailingBytesError(f"is {st.st_size} bytes, but {os.path.basename(path)} says {nbytes}: "
                                 f"{st.st_size - nbytes} bytes no record accounts for", path=shard_path)
    return FileStamp.of_stat(st)


def _metadata(doc: dict[str, Any], path: str) -> dict[str, str]:
    """The cache's ``metadata`` as strings (``mlc.ParamSize`` ...): text as it is, the rest as JSON."""
    meta = doc.get("metadata") or {}
    out = {f"mlc.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    for key, value in out.items():  # JSON's "\ud800" is a str no file (and no terminal) takes
        check_name(key, path, "metadata key")
        check_name(value, path, f"metadata value of {key!r}")
    return out


def open_mlc(path: str) -> Catalog:
    """Index an MLC / TVM parameter cache (its JSON's path); read no tensor data.

    Example:
        >>> cat = sparsemap.open("Llama-3.2-1B-Instruct-q0f16-MLC/")       # doctest: +SKIP
        >>> cat.format, cat["model.embed_tokens.weight"].dtype
        ('mlc', 'F16')
    """
    doc = read_cache(path)
    entries, stamps = validate(doc, os.path.dirname(path), path)
    return Catalog(source=path, format="mlc", entries={e.name: e for e in entries},
                   metadata=_metadata(doc, path), stamps=stamps)
