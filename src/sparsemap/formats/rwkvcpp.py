"""rwkv.cpp's model files (``.bin``): a small header, then each tensor's description and data. No torch.

Layout, all little-endian:

- header: six uint32: magic ``0x67676d66`` (``"fmgg"`` on disk), version (100
  or 101), vocabulary size, embedding width, layer count, data type;
- then, to the end of the file, for each tensor: three int32 (dimension count,
  key length, data type), the dimensions innermost first (ggml's order; the
  catalog reverses them to row-major), the key in UTF-8, then the data.

Data types 0 (float32) and 1 (float16) are plain elements and map zero-copy;
rwkv.cpp's quantized types are refused, naming them. Tensor data follows its
key with no alignment, so a float32 tensor may start at an offset that is not
a multiple of 4 (served as a copy; see :class:`~sparsemap.Checkpoint`).

The keys are BlinkDL's, but rwkv.cpp's converter rewrites some tensors (for
RWKV-7: the six token-shift coefficients ``att.x_r``...``att.x_g`` concatenated
into ``att.x_rwkvag``, the low-rank matrices transposed). Those are undone as
views by :func:`sparsemap.models.rwkv.pytorch_view`, not here: this module
reads what the file holds.
"""

from __future__ import annotations

import math
import os
import struct

from ..errors import (
    DuplicateTensorError,
    InvalidShapeError,
    RwkvFormatError,
    SizeOverflowError,
    TruncatedFileError,
    UnknownDtypeError,
)
from .catalog import Catalog, FileStamp, TensorEntry
from .source import open_regular

MAGIC = 0x67676D66
MAGIC_BYTES = struct.pack("<I", MAGIC)
VERSIONS = (100, 101)
DTYPES = {0: "F32", 1: "F16"}
QUANTIZED = {2: "Q4_0", 3: "Q4_1", 4: "Q4_1_O", 5: "Q4_2", 6: "Q4_3", 7: "Q5_0", 8: "Q5_1", 9: "Q8_0"}
ITEMSIZE = {"F32": 4, "F16": 2}
MAX_DIMS = 4
MAX_KEY_NBYTES = 1024
HEADER = struct.Struct("<6I")
TENSOR = struct.Struct("<3i")


def validate(f: object, size: int, path: str) -> tuple[dict[str, int], list[TensorEntry]]:
    """Walk the file, bounds-checking every count, length and size against it.

    Returns:
        The header's fields and every tensor's entry, in file order.

    Raises:
        One :class:`~sparsemap.errors.FormatError` subclass per fault, naming the file, the tensor
        and the numbers.
    """
    read = f.read  # type: ignore[attr-defined]
    raw = read(HEADER.size)
    if len(raw) < HEADER.size:
        raise TruncatedFileError(f"header needs {HEADER.size} bytes, the file has {size}", path=path)
    magic, version, n_vocab, n_embed, n_layer, dtype = HEADER.unpack(raw)
    if magic != MAGIC:
        raise RwkvFormatError(f"magic is {magic:#x}, not {MAGIC:#x}", path=path)
    if version not in VERSIONS:
        raise RwkvFormatError(f"version {version}; sparsemap reads rwkv.cpp versions "
                              f"{', '.join(map(str, VERSIONS))}", path=path)
    header = {"version": version, "n_vocab": n_vocab, "n_embed": n_embed, "n_layer": n_layer, "dtype": dtype}
    pos = HEADER.size
    entries: list[TensorEntry] = []
    seen: set[str] = set()
    while pos < size:
        what = f"tensor {len(entries)}"
        if size - pos < TENSOR.size:
            raise TruncatedFileError(f"{what}'s description needs {TENSOR.size} bytes at offset {pos}, "
                                     f"{size - pos} left", path=path)
        n_dims, key_len, type_id = TENSOR.unpack(read(TENSOR.size))
        pos += TENSOR.size
        if not 0 < n_dims <= MAX_DIMS:
            raise InvalidShapeError(f"{what} at offset {pos - TENSOR.size} has {n_dims} dimensions "
                                    f"(1 to {MAX_DIMS})", path=path)
        if not 0 < key_len <= MAX_KEY_NBYTES:
            raise RwkvFormatError(f"{what}'s key is {key_len} bytes long (1 to {MAX_KEY_NBYTES})", path=path)
        if size - pos < 4 * n_dims + key_len:
            raise TruncatedFileError(f"{what}'s dimensions and key need {4 * n_dims + key_len} bytes at "
                                     f"offset {pos}, {size - pos} left", path=path)
        dims = struct.unpack(f"<{n_dims}i", read(4 * n_dims))
        try:
            name = read(key_len).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RwkvFormatError(f"{what}'s key is not UTF-8 (byte {e.start})", path=path) from None
        pos += 4 * n_dims + key_len
        if type_id not in DTYPES:
            known = QUANTIZED.get(type_id)
            message = (f"rwkv.cpp quantization {known} is not read by sparsemap (float32 and float16 are)"
                       if known else f"unknown data type {type_id}")
            raise UnknownDtypeError(message, path=path, tensor=name)
        if any(d <= 0 for d in dims):
            raise InvalidShapeError(f"dimensions {list(dims)} must be positive", path=path, tensor=name)
        dtype_name = DTYPES[type_id]
        nbytes = math.prod(dims) * ITEMSIZE[dtype_name]
        if nbytes > size - pos:
            if nbytes >= 1 << 63:
                raise SizeOverflowError(f"dimensions {list(dims)} need {nbytes} bytes", path=path,
                                        tensor=name)
            raise TruncatedFileError(f"data [{pos}, {pos + nbytes}) runs past the end of the file "
                                     f"({size} bytes)", path=path, tensor=name)
        if name in seen:
            raise DuplicateTensorError("the key appears twice", path=path, tensor=name)
        seen.add(name)
        entries.append(TensorEntry(name=name, file=path, offset=pos, nbytes=nbytes, dtype=dtype_name,
                                   shape=tuple(reversed(dims))))
        pos += nbytes
        f.seek(pos)  # type: ignore[attr-defined]
    _check_complete(header, {e.name: e for e in entries}, path)
    return header, entries


def _check_complete(header: dict[str, int], entries: dict[str, TensorEntry], path: str) -> None:
    """The format has no tensor count: a file cut between two tensors would read as a smaller model.
    The header's sizes say what a whole model holds; the converter writes the head last."""
    v, c, layers = header["n_vocab"], header["n_embed"], header["n_layer"]
    for name in ("emb.weight", "head.weight"):
        e = entries.get(name)
        if e is None:
            raise TruncatedFileError(f"no {name!r}: the file ends after {len(entries)} tensors (cut short?)",
                                     path=path)
        if e.shape != (v, c):
            raise RwkvFormatError(f"shape {list(e.shape)}, but the header says vocabulary {v} and width {c}",
                                  path=path, tensor=name)
    indices = {int(n.split(".")[1]) for n in entries if n.startswith("blocks.") and n.split(".")[1].isdigit()}
    # Compared without building range(layers): the header's count is the file's word, not a size to trust.
    if len(indices) != layers or (indices and (min(indices) != 0 or max(indices) != layers - 1)):
        raise RwkvFormatError(f"the header says {layers} layers, the file holds blocks "
                              f"{sorted(indices)[:8]}{' ...' if len(indices) > 8 else ''}", path=path)


def open_rwkvcpp(path: str, stamp: FileStamp) -> Catalog:
    """Index an rwkv.cpp model file's tensors; read no tensor data."""
    with open_regular(path) as f:
        header, entries = validate(f, os.fstat(f.fileno()).st_size, path)
    metadata = {f"rwkv_cpp.{k}": str(v) for k, v in header.items()}
    return Catalog(source=path, format="rwkv-cpp", entries={e.name: e for e in entries}, metadata=metadata,
                   stamps={path: stamp})
