"""Sizes as people write them on command lines: '4096', '16K', '64KiB', '1.5G', '1GB'. No torch here."""

from __future__ import annotations

import math

from .errors import BadInputError

# Binary for a bare letter and for "iB" (16K is a page multiple, 1.5GiB a memory size); decimal for "B",
# as accelerate's max_memory and transformers' max_shard_size read "1GB" (10**9 bytes).
_BINARY = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DECIMAL = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str | int) -> int:
    """Bytes in ``text``: a number with an optional unit. ``K``, ``M``, ``G``, ``T`` and ``KiB``... are
    binary (2**10...); ``KB``, ``MB``, ``GB``, ``TB`` are decimal (10**3...), as accelerate and
    transformers read them. A count of bytes without a unit must be whole; with one, it is rounded down.

    Raises:
        BadInputError: not a size, a fraction of a byte, or less than one byte.

    Example:
        >>> parse_size("64KiB"), parse_size("1.5G"), parse_size("1GB"), parse_size(4096)
        (65536, 1610612736, 1000000000, 4096)
    """
    if isinstance(text, int):
        if text < 1:
            raise BadInputError(f"size {text} must be at least one byte")
        return text
    t = text.strip().upper()
    units = _BINARY
    if t.endswith("IB"):
        t = t[:-2]
    elif t.endswith("B") and t[-2:-1] in _DECIMAL:
        t, units = t[:-1], _DECIMAL
    elif t.endswith("B"):
        t = t[:-1]  # "4096B": bytes
    scale = units.get(t[-1:], 1)
    number = t[:-1] if t[-1:] in units else t
    try:
        value = float(number) * scale
    except ValueError:
        raise BadInputError(f"{text!r} is not a size like 4096, 16K, 64KiB, 256M, 1.5G or 1GB") from None
    if not math.isfinite(value) or value < 1:
        raise BadInputError(f"size {text!r} must be a finite number of bytes, at least one")
    if scale == 1 and value != int(value):  # "1.9": a fraction of a byte, surely meant with a unit
        raise BadInputError(f"size {text!r} is {value} bytes, not a whole number (give a unit: 1.9G, 1.9GB)")
    return int(value)  # with a unit, whole bytes, rounded down


def format_size(nbytes: int) -> str:
    """``nbytes`` in the largest binary unit it reaches: '4 KiB', '1.5 GiB', '300 B'.

    Example:
        >>> format_size(4096), format_size(3 << 29), format_size(300)
        ('4 KiB', '1.5 GiB', '300 B')
    """
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(nbytes) >= scale:
            value = nbytes / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{nbytes} B"
