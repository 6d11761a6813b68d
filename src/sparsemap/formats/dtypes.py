"""Dtype names and sizes shared by every format, without torch.

Names are safetensors' (``"F32"``, ``"BF16"``, ...), the one vocabulary every
reader here translates into; :mod:`sparsemap.mapped` maps them to torch dtypes.
"""

from __future__ import annotations

# Bytes per element. Every dtype here is whole-byte; sub-byte types (F4, F6)
# are refused as unknown rather than guessed at.
ITEMSIZE: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
    "C128": 16,
}

FLOATING: frozenset[str] = frozenset(
    {"F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2", "F8_E5M2FNUZ", "F8_E8M0", "F16", "BF16", "F32", "F64"}
)


def itemsize(dtype: str) -> int:
    """Bytes per element of ``dtype``; ``KeyError`` if unknown (callers raise the format's error)."""
    return ITEMSIZE[dtype]
