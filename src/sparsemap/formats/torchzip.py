"""PyTorch zip checkpoints (``torch.save`` since 1.6: ``.pt``, ``.pth``, ``.bin``).

A zip archive holding ``<root>/data.pkl`` (a pickle of the object saved) and
one uncompressed member ``<root>/data/<key>`` per storage. We read the pickle
with an unpickler whose ``find_class`` knows a short allowlist and returns our
own inert records: no class from the file is ever imported or called, so a
malicious pickle cannot run code. Tensors become :class:`TensorEntry` records
pointing at their storage's bytes inside the zip, which we map like any file.

Legacy (pre-1.6, non-zip) pickles interleave pickled objects with raw data and
cannot be indexed without running the pickle; they are refused. No torch here.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ..errors import (
    CorruptCheckpointError,
    DuplicateTensorError,
    InvalidShapeError,
    LegacyPickleError,
    SparsemapError,
    StorageBoundsError,
    UnknownDtypeError,
    UnsafePickleError,
)
from .catalog import Catalog, FileStamp, TensorEntry, contiguous_strides
from .dtypes import FROM_TORCH_NAME, ITEMSIZE
from .source import LEGACY_HINT, PICKLE_PROTOS, ZIP_MAGIC

# Legacy typed-storage classes name the element type.
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL", "ComplexFloatStorage": "C64",
    "ComplexDoubleStorage": "C128",
}

# ---------------------------------------------------------------- inert records the pickle builds
# pickle's BUILD opcode calls __setstate__, or writes into __dict__: a hostile
# pickle could rewrite a record after validation, or poison the shared
# allowlist objects for every later file in the process. So records have no
# __dict__ (slots) and a __setstate__ that refuses. It is installed after
# @dataclass, which adds a __setstate__ of its own to slotted frozen classes
# (one that ignores `frozen`).


def _inert(cls: Any) -> Any:
    def refuse(self: Any, state: Any) -> None:
        raise UnsafePickleError(f"pickle tries to set the state of a {type(self).__name__.lstrip('_')} "
                                "(BUILD opcode); refused")

    cls.__setstate__ = refuse
    return cls


@_inert
@dataclass(frozen=True, slots=True)
class _StorageType:
    dtype: str  # element dtype of a typed storage; "U8" for UntypedStorage (bytes)


@_inert
@dataclass(frozen=True, slots=True)
class _Storage:
    key: str
    dtype: str  # element type it was saved as; "U8" for an UntypedStorage
    numel: int  # in elements of dtype

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


@_inert
@dataclass(frozen=True, slots=True)
class _TensorRecord:
    storage: _Storage
    dtype: str
    storage_offset: int  # in elements of dtype
    shape: tuple[int, ...]
    strides: tuple[int, ...]


@_inert
@dataclass(frozen=True, slots=True)
class _Call:
    """An allowlisted callable, frozen so BUILD cannot decorate it."""

    fn: Any

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


def _view_args(storage: Any, storage_offset: Any, size: Any, stride: Any) -> tuple[int, tuple[int, ...],
                                                                                    tuple[int, ...]]:
    if not isinstance(storage, _Storage):
        raise UnsafePickleError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    if not (isinstance(size, tuple | list) and isinstance(stride, tuple | list)
            and len(size) == len(stride)
            and all(type(v) is int for v in (*size, *stride))
            and type(storage_offset) is int):
        raise InvalidShapeError(f"tensor view has malformed size {size!r} / stride {stride!r} / "
                                f"offset {storage_offset!r}")
    return storage_offset, tuple(size), tuple(stride)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any) -> _TensorRecord:
    offset, shape, strides = _view_args(storage, storage_offset, size, stride)
    return _TensorRecord(storage, storage.dtype, offset, shape, strides)


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = None,
                       hooks: Any = None, dtype: Any = None, *_: Any) -> _TensorRecord:
    # Untyped (byte) storage; the element type comes as an argument (fp8, uint16...).
    offset, shape, strides = _view_args(storage, storage_offset, size, stride)
    if not isinstance(dtype, _StorageType):
        raise UnsafePickleError(f"tensor dtype is {type(dtype).__name__}, not a torch dtype")
    return _TensorRecord(storage, dtype.dtype, offset, shape, strides)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


# The allowlist: (module, name) -> what the unpickler gets instead. Everything
# here returns plain data; nothing from torch is imported.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _Call(OrderedDict),
    ("torch._utils", "_rebuild_tensor_v2"): _Call(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor"): _Call(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor_v3"): _Call(_rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): _Call(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Call(_rebuild_parameter),
    ("torch.storage", "UntypedStorage"): _StorageType("U8"),
}
for _name, _dtype in STORAGE_DTYPES.items():
    _ALLOWED[("torch", _name)] = _StorageType(_dtype)
# Newer checkpoints may name a torch dtype (``torch.float8_e4m3fn``) instead.
for _name, _dtype in FROM_TORCH_NAME.items():
    _ALLOWED[("torch", _name)] = _StorageType(_dtype)


class _WeightsUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: str) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"pickle references {module}.{name}, which is not on the weights-only allowlist; "
                "refusing to load it (no pickle code is ever run)", path=self.path) from None

    def persistent_load(self, pid: Any) -> _Storage:
        # ('storage', storage_type, key, location, numel in elements of storage_type)
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)
                or type(pid[4]) is not int or pid[4] < 0):
            raise CorruptCheckpointError(f"malformed storage record {_short(pid)}", path=self.path)
        dtype = pid[1].dtype
        if dtype not in ITEMSIZE:
            raise UnknownDtypeError(f"unknown storage dtype {dtype!r}", path=self.path)
        return _Storage(key=pid[2], dtype=dtype, numel=pid[4])


# ---------------------------------------------------------------- the archive

def _member_data_offset(raw: io.BufferedReader, info: zipfile.ZipInfo, path: str) -> int:
    # The central directory's extra field can differ from the local one (torch
    # pads the local extra field to align data), so read the local header.
    if not 0 <= info.header_offset <= os.fstat(raw.fileno()).st_size - 30:
        raise CorruptCheckpointError(f"member {info.filename!r} starts at {info.header_offset}, outside the "
                                     "file", path=path)
    raw.seek(info.header_offset)
    local = raw.read(30)
    if len(local) != 30 or local[:4] != ZIP_MAGIC:
        raise CorruptCheckpointError(f"bad local header for member {info.filename!r} at "
                                     f"{info.header_offset}", path=path)
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


# What the zipfile module raises on a damaged member: bad headers, offsets, CRCs, compression.
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError,
               RuntimeError, zlib.error)


def _read_member(archive: zipfile.ZipFile, name: str, path: str) -> bytes:
    try:
        return archive.read(name)
    except _ZIP_ERRORS as e:
        raise CorruptCheckpointError(f"member {name!r} cannot be read: {type(e).__name__}: {e}",
                                     path=path) from None


def open_torch_zip(path: str, stamp: FileStamp) -> Catalog:
    """Index a torch zip checkpoint's tensors without reading their data or running pickle code.

    ``stamp`` is the file's version when opened (recorded in the catalog).
    """
    with open(path, "rb") as raw:
        magic = raw.read(4)
        if magic.startswith(PICKLE_PROTOS):
            raise LegacyPickleError(f"a legacy (pre-1.6, non-zip) torch pickle; {LEGACY_HINT}", path=path)
        if magic != ZIP_MAGIC:
            raise CorruptCheckpointError("not a zip archive", path=path)
        raw.seek(0, io.SEEK_END)
        file_nbytes = raw.tell()
        try:
            archive = zipfile.ZipFile(raw)
        except _ZIP_ERRORS as e:
            raise CorruptCheckpointError(f"not a readable zip archive: {e}", path=path) from None
        with archive:
            members = {i.filename: i for i in archive.infolist()}
            pickles = [n for n in members if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise CorruptCheckpointError(
                    f"expected one <root>/data.pkl, found {len(pickles)} "
                    "(is this a torch.save checkpoint?)", path=path)
            root = pickles[0][: -len("data.pkl")]
            order = members.get(root + "byteorder")
            byteorder = _read_member(archive, order.filename, path).strip() if order is not None else b""
            if byteorder not in (b"little", b""):
                raise CorruptCheckpointError(
                    f"big-endian checkpoint ({byteorder!r}); only little-endian is supported", path=path)
            pickled = _read_member(archive, pickles[0], path)
            try:
                obj = _WeightsUnpickler(pickled, path).load()
            except SparsemapError as e:
                if e.path is None:  # raised by a rebuild function, which does not know the file
                    raise type(e)(e.detail, path=path, tensor=e.tensor) from None
                raise
            except Exception as e:  # any malformed pickle stream, BUILD refused included
                raise CorruptCheckpointError(f"data.pkl is not a valid pickle: "
                                             f"{type(e).__name__}: {e}", path=path) from None

            records: dict[str, _TensorRecord] = {}
            for name, record in _flatten(obj, ""):
                if name in records:
                    raise DuplicateTensorError("name appears twice after flattening nested dicts",
                                               path=path, tensor=name)
                records[name] = record
            entries: dict[str, TensorEntry] = {}
            storages: dict[str, tuple[int, int]] = {}  # key -> (absolute data offset, nbytes)
            for name, rec in records.items():
                st = rec.storage
                if st.key not in storages:
                    member = members.get(f"{root}data/{st.key}")
                    if member is None:
                        raise CorruptCheckpointError(f"storage {st.key!r} has no member "
                                                     f"{root}data/{st.key}", path=path, tensor=name)
                    if member.compress_type != zipfile.ZIP_STORED:
                        raise CorruptCheckpointError(
                            f"storage member {member.filename!r} is compressed; torch.save never "
                            "compresses storages, so the file was rewritten by another tool",
                            path=path, tensor=name)
                    start = _member_data_offset(raw, member, path)
                    if start + member.file_size > file_nbytes:
                        raise CorruptCheckpointError(
                            f"storage {st.key!r} runs to byte {start + member.file_size}, past the end "
                            f"of the file ({file_nbytes} bytes)", path=path, tensor=name)
                    storages[st.key] = (start, member.file_size)
                entries[name] = _entry(name, rec, storages[st.key], path)
    return Catalog(source=path, format="torch-zip", entries=entries, stamps={path: stamp})


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _flatten(obj: Any, prefix: str) -> Any:
    """Yield ``(dotted name, tensor record)`` from nested dicts; other leaves are skipped.

    Checkpoints are usually a flat state dict; training checkpoints nest it
    (``{"model": {...}, "epoch": 3}``), which becomes ``model.<name>``.
    """
    if isinstance(obj, _TensorRecord):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(key, str):
                yield from _flatten(value, f"{prefix}.{key}" if prefix else key)


def _entry(name: str, rec: _TensorRecord, storage: tuple[int, int], path: str) -> TensorEntry:
    start, member_nbytes = storage
    st = rec.storage
    if rec.dtype not in ITEMSIZE:
        raise UnknownDtypeError(f"unknown dtype {rec.dtype!r}", path=path, tensor=name)
    size = ITEMSIZE[rec.dtype]
    if st.nbytes > member_nbytes:
        raise StorageBoundsError(f"storage {st.key!r} claims {st.numel} elements of {st.dtype} "
                                 f"({st.nbytes} bytes) but its member holds {member_nbytes}",
                                 path=path, tensor=name)
    numel_in_storage = st.nbytes // size
    if any(d < 0 for d in rec.shape) or any(s < 0 for s in rec.strides) or rec.storage_offset < 0:
        raise InvalidShapeError(f"negative size {rec.shape}, stride {rec.strides} or storage offset "
                                f"{rec.storage_offset}", path=path, tensor=name)
    numel = math.prod(rec.shape)
    if numel == 0:
        span = 0
    else:
        # Index of the last element the view can touch; it must lie in the storage.
        last = rec.storage_offset + sum((d - 1) * s for d, s in zip(rec.shape, rec.strides, strict=True))
        if last >= numel_in_storage:
            raise StorageBoundsError(
                f"view (offset {rec.storage_offset}, shape {rec.shape}, stride {rec.strides}) reaches "
                f"element {last} of a storage of {numel_in_storage} {rec.dtype} elements", path=path,
                tensor=name)
        span = (last - rec.storage_offset + 1) * size
    contiguous = contiguous_strides(rec.shape)
    strides = None if numel <= 1 or _same_layout(rec.shape, rec.strides, contiguous) else rec.strides
    return TensorEntry(name=name, file=path, offset=start + rec.storage_offset * size,
                       nbytes=span if strides is not None else numel * size,
                       dtype=rec.dtype, shape=rec.shape, strides=strides)




def _same_layout(shape: tuple[int, ...], a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    # Strides of size-1 dims never matter.
    return all(d == 1 or x == y for d, x, y in zip(shape, a, b, strict=True))
