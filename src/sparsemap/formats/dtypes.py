"""The one dtype table: names, sizes and torch names of every element type, without torch.

Names are safetensors' (``"F32"``, ``"BF16"``, ...), the one vocabulary every
reader here translates into. The torch side derives its ``torch.dtype`` table
from :data:`TORCH_NAMES` (see :mod:`sparsemap.mapped`), and the torch zip
reader derives from it the names a pickle may give a dtype.
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

# The attribute of the ``torch`` module that is each dtype (``torch.float32``).
# Older torch builds lack some (fp8, unsigned); the torch side skips those.
TORCH_NAMES: dict[str, str] = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32",
    "I64": "int64", "U64": "uint64", "F64": "float64", "C64": "complex64", "C128": "complex128",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu",
}

# safetensors name of each torch dtype name: the inverse of TORCH_NAMES.
FROM_TORCH_NAME: dict[str, str] = {torch_name: name for name, torch_name in TORCH_NAMES.items()}

FLOATING: frozenset[str] = frozenset(
    {"F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2", "F8_E5M2FNUZ", "F8_E8M0", "F16", "BF16", "F32", "F64"}
)


def itemsize(dtype: str) -> int:
    """Bytes per element of ``dtype``; ``KeyError`` if unknown (callers raise the format's error)."""
    return ITEMSIZE[dtype]


def name_of(dtype: object) -> str:
    """The safetensors name of a dtype given as a torch dtype or a name (``torch.bfloat16``,
    ``"bfloat16"``, ``"BF16"``), without importing torch; ``KeyError`` if it has none."""
    text = str(dtype)
    if text in ITEMSIZE:
        return text
    return FROM_TORCH_NAME[text.removeprefix("torch.")]
