"""Sizes on command lines: binary for a bare letter and iB, decimal for B (as accelerate reads them)."""

from __future__ import annotations

import pytest

from sparsemap.errors import BadInputError
from sparsemap.units import format_size, parse_size


@pytest.mark.parametrize(("text", "nbytes"), [
    ("4096", 4096), ("4096B", 4096), ("16K", 16 << 10), ("64KiB", 64 << 10), ("256M", 256 << 20),
    ("1.5G", 3 << 29), ("1GiB", 1 << 30), ("1GB", 10**9), ("300MB", 300 * 10**6), ("2 TB", 2 * 10**12),
    ("1.9G", int(1.9 * (1 << 30))), (" 12k ", 12 << 10),
])
def test_sizes_parse_as_accelerate_reads_them(text: str, nbytes: int) -> None:
    assert parse_size(text) == nbytes


@pytest.mark.parametrize(("text", "needle"), [
    ("1.9", "not a whole number"), ("0", "at least one"),
    ("lots", "not a size"), ("-1G", "at least one"), ("inf", "finite"), ("1.5B", "not a whole number"),
])
def test_sizes_that_are_not_whole_bytes_are_refused(text: str, needle: str) -> None:
    with pytest.raises(BadInputError, match=needle):
        parse_size(text)


def test_formatting_picks_the_largest_binary_unit() -> None:
    assert (format_size(4096), format_size(3 << 29), format_size(300)) == ("4 KiB", "1.5 GiB", "300 B")

