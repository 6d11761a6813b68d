"""Sizes as people write them on command lines: '4096', '16K', '64KiB', '256M', '1.5G'. No torch here."""

from __future__ import annotations

import math

from .errors import BadInputError

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """Bytes in ``text``: a number with an optional binary unit (K, M, G, T; ``B``/``iB`` optional).

    Raises:
        BadInputError: not a size, or less than one byte.

    Example:
        >>> parse_size("64KiB"), parse_size("1.5G"), parse_size(4096)
        (65536, 1610612736, 4096)
    """
    if isinstance(text, int):
        if text < 1:
            raise BadInputError(f"size {text} must be at least one byte")
        return text
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = _UNITS.get(t[-1:], 1)
    number = t[:-1] if t[-1:] in _UNITS else t
    try:
        value = float(number) * scale
    except ValueError:
        raise BadInputError(f"{text!r} is not a size like 4096, 16K, 64KiB, 256M or 1.5G") from None
    if not math.isfinite(value) or value < 1:
        raise BadInputError(f"size {text!r} must be a finite number of bytes, at least one")
    return int(value)


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
