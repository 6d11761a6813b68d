"""GGUF (llama.cpp's format), parsed by the ``gguf`` package.

Unquantized tensors (F32, F16, BF16, F64, I8..I64) become plain entries that
map zero-copy. Quantized tensors (Q4_0, Q4_1, Q8_0, the K-quants...) become
entries with ``encoding`` set to the quantization and ``dtype`` F32: the mapped
layer dequantizes them on access with ``gguf.quants.dequantize``.

GGUF lists dimensions fastest-first (``ne[0]`` is the row length); entries
carry the usual row-major shape, i.e. reversed. No torch here.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import GGUFError, SizeOverflowError, TruncatedFileError, UnsupportedQuantizationError
from .catalog import Catalog, TensorEntry

GGUF_MAGIC = b"GGUF"

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


def open_gguf(path: str) -> Catalog:
    """Index a GGUF file's tensors; read no tensor data."""
    from gguf import GGUFReader, GGUFValueType

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
    return Catalog(source=path, format="gguf", entries=entries, metadata=metadata)


def _scalar(field: Any) -> Any:
    value = field.parts[field.data[0]]
    if field.types[0].name == "STRING":
        return bytes(value).decode("utf-8", errors="replace")
    return value[0].item() if hasattr(value[0], "item") else value[0]
