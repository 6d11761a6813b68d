"""GGUF headers built to cost far more than their size, and names that are not UTF-8 (round 2).

Before this round the header was parsed twice, the second time by ``gguf.GGUFReader``, which holds
every metadata element and every tensor as numpy objects. Measured there at a tenth of the sizes
used here: 135 (tiny tensors), 192 (empty strings) and 103 (empty nested arrays) bytes of Python
allocations per header byte, 2.1 to 3.1 s per MB; at these sizes, gigabytes. Now one walk reads the header and
holds nothing per skipped element; each case asserts the walk's stated bound (see the docstring of
:mod:`sparsemap.formats.gguf`): at most ``MEMORY_PER_HEADER_BYTE`` bytes of Python allocations per
header byte, plus a fixed allowance for the read window and the catalog's own objects.

The clean opens are marked slow (tracing a million allocations takes seconds); the refusals are not.
Time is asserted loosely (this machine has 2 cores shared with other work): a bound ten times above
what was measured, enough to catch a walk that went quadratic or per-element expensive again.
"""

from __future__ import annotations

import struct
import time
import tracemalloc
from collections.abc import Iterable
from pathlib import Path

import pytest

import sparsemap
from sparsemap import errors as E
from sparsemap.formats import gguf as gguf_format
from sparsemap.formats.catalog import Catalog

pytest.importorskip("gguf")

MEMORY_PER_HEADER_BYTE = 32  # the bound the module docstring states (worst measured: 15.6)
FIXED_ALLOWANCE = 1 << 20  # the 64 KiB read window, the catalog's frame, the error's message
SECONDS_PER_MB = 2.0  # over ten times the slowest case measured (tensor infos: 0.09-0.14 s/MB)
F32, STRING, ARRAY, UINT8 = 0, 8, 9, 0


# ---------------------------------------------------------------- building headers (fast for millions)

def s(text: str | bytes) -> bytes:
    """A GGUF string: uint64 length, then the bytes."""
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def tensor_info(name: str | bytes, dims: list[int], ttype: int, offset: int) -> bytes:
    return s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ttype, offset)


def gguf_file(path: Path, *, kv: Iterable[bytes] = (), n_kv: int | None = None,
              tensors: Iterable[bytes] = (), n_tensors: int | None = None, data_nbytes: int = 32) -> Path:
    """Write magic, version 3, counts, ``kv`` and ``tensors`` (already encoded), padding to 32, data."""
    kv, tensors = list(kv), list(tensors)
    head = b"".join([b"GGUF", struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                          len(kv) if n_kv is None else n_kv), *kv, *tensors])
    path.write_bytes(head + bytes(-len(head) % 32) + bytes(data_nbytes))
    return path


def one_tensor() -> list[bytes]:
    return [tensor_info("w", [8], F32, 0)]


def string_array(key: str, count: int) -> bytes:
    """``count`` empty strings: 8 bytes each, the cheapest element to write."""
    return s(key) + struct.pack("<IIQ", ARRAY, STRING, count) + bytes(8 * count)


def nested_arrays(key: str, levels: int) -> bytes:
    """An array of one array of ... (``levels`` arrays in all), the innermost an empty uint8 array."""
    return s(key) + struct.pack("<I", ARRAY) + struct.pack("<IQ", ARRAY, 1) * (levels - 1) + \
        struct.pack("<IQ", UINT8, 0)


def wide_arrays(key: str, count: int) -> bytes:
    """One array of ``count`` empty uint8 arrays: 12 bytes each."""
    return s(key) + struct.pack("<IIQ", ARRAY, ARRAY, count) + struct.pack("<IQ", UINT8, 0) * count


def header_nbytes(path: Path) -> int:
    """Bytes from the magic to the end of the last tensor info (the data section starts after)."""
    with open(path, "rb") as f:
        header = gguf_format.validate(f, path.stat().st_size, str(path))
    return header.data_offset


def measured_open(path: Path) -> tuple[Catalog, int, float]:
    """(catalog, peak bytes allocated while opening, seconds without tracing)."""
    start = time.perf_counter()
    sparsemap.open(path)
    seconds = time.perf_counter() - start
    tracemalloc.start()
    try:
        catalog = sparsemap.open(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return catalog, peak, seconds


def assert_within_bounds(path: Path, peak: int, seconds: float) -> None:
    nbytes = header_nbytes(path)
    assert peak <= MEMORY_PER_HEADER_BYTE * nbytes + FIXED_ALLOWANCE, \
        f"{peak} bytes allocated for a {nbytes}-byte header ({peak / nbytes:.1f} per byte)"
    assert seconds <= SECONDS_PER_MB * nbytes / 1e6 + 1.0, f"{seconds:.2f} s for a {nbytes}-byte header"


def refused(path: Path, error: type[E.SparsemapError], *needles: str) -> E.SparsemapError:
    with pytest.raises(E.SparsemapError) as info:
        sparsemap.open(path)
    err = info.value
    assert type(err) is error, f"expected {error.__name__}, got {type(err).__name__}: {err}"
    assert err.path == str(path) and str(path) in str(err)
    for needle in needles:
        assert needle in str(err), f"{needle!r} not in {err}"
    return err


# ---------------------------------------------------------------- very many tensors

@pytest.mark.slow  # tracemalloc records each allocation: several seconds
def test_200k_one_element_tensors_open_within_the_memory_bound(tmp_path: Path) -> None:
    # About 38 header bytes a tensor; the GGUFReader made a numpy memmap view and a field of 6 arrays each.
    n = 200_000
    infos = (tensor_info(f"t{i}", [1], F32, 32 * i) for i in range(n))
    path = gguf_file(tmp_path / "tiny.gguf", tensors=infos, data_nbytes=32 * n)
    catalog, peak, seconds = measured_open(path)
    assert len(catalog) == n
    first, last = catalog["t0"], catalog[f"t{n - 1}"]
    assert (first.shape, first.nbytes, first.dtype) == ((1,), 4, "F32")
    assert last.offset - first.offset == 32 * (n - 1)
    assert_within_bounds(path, peak, seconds)


@pytest.mark.slow  # tracemalloc records each allocation: several seconds
def test_200k_empty_tensors_all_at_offset_zero(tmp_path: Path) -> None:
    # 0 dims is a scalar (one element); 0 as a dim is an empty tensor: 0 bytes, no data to check.
    n = 200_000
    path = gguf_file(tmp_path / "empty.gguf", tensors=(tensor_info(f"e{i}", [0], F32, 0) for i in range(n)),
                     data_nbytes=0)
    catalog, peak, seconds = measured_open(path)
    assert len(catalog) == n and catalog["e7"].shape == (0,) and catalog["e7"].nbytes == 0
    assert_within_bounds(path, peak, seconds)


def test_tensor_count_beyond_what_the_file_holds_is_refused_before_the_walk(tmp_path: Path) -> None:
    # Each tensor info is at least 24 bytes: a count the rest of the file cannot hold is refused at once.
    path = gguf_file(tmp_path / "count.gguf", tensors=one_tensor(), n_tensors=10_000_000)
    refused(path, E.TruncatedFileError, "10000000", str(24 * 10_000_000))


def test_tensor_count_that_fits_the_file_but_not_its_infos(tmp_path: Path) -> None:
    # 1,000 real infos, then zeros the count claims are 1,000 more: read as a scalar named "" (0-byte name,
    # 0 dims, F32 at offset 0), then that name again.
    infos = (tensor_info(f"t{i}", [8], F32, 32 * i) for i in range(1000))
    path = gguf_file(tmp_path / "short.gguf", tensors=infos, n_tensors=2000, data_nbytes=32 * 2000 * 2)
    err = refused(path, E.DuplicateTensorError, "tensors 1000 and 1001")
    assert err.tensor == ""


# ---------------------------------------------------------------- very many strings

def test_5_million_empty_strings_are_refused_before_the_walk(tmp_path: Path) -> None:
    # 40 MB of lengths: over MAX_STRING_ELEMENTS, refused from the array's count alone.
    path = gguf_file(tmp_path / "strings.gguf", kv=[string_array("tokenizer.ggml.tokens", 5_000_000)],
                     tensors=one_tensor())
    tracemalloc.start()
    try:
        refused(path, E.MetadataError, "'tokenizer.ggml.tokens'", "5000000",
                str(gguf_format.MAX_STRING_ELEMENTS))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < FIXED_ALLOWANCE, peak


@pytest.mark.slow  # tracemalloc records each allocation: several seconds
def test_strings_just_under_the_cap_open_holding_nothing_per_string(tmp_path: Path) -> None:
    # 2M strings in all (this array and the architecture): the GGUFReader held ~3 GB of numpy objects.
    n = gguf_format.MAX_STRING_ELEMENTS - 1
    arch = s("general.architecture") + struct.pack("<I", STRING) + s("llama")
    path = gguf_file(tmp_path / "vocab.gguf", kv=[arch, string_array("tokenizer.ggml.tokens", n)],
                     tensors=one_tensor())
    catalog, peak, seconds = measured_open(path)
    assert dict(catalog.metadata) == {"general.architecture": "llama"}  # arrays are walked, not kept
    assert peak < FIXED_ALLOWANCE, f"{peak} bytes for {n} strings: something is held per string"
    assert_within_bounds(path, peak, seconds)


def test_one_string_over_the_cap_across_arrays_is_refused(tmp_path: Path) -> None:
    half = gguf_format.MAX_STRING_ELEMENTS // 2
    path = gguf_file(tmp_path / "two.gguf", kv=[string_array("a", half), string_array("b", half + 1)],
                     tensors=one_tensor())
    refused(path, E.MetadataError, "'b'", str(half + 1))


def test_a_string_length_past_the_file_in_the_middle_of_an_array(tmp_path: Path) -> None:
    kv = s("tokens") + struct.pack("<IIQ", ARRAY, STRING, 3) + s("a") + struct.pack("<Q", 2**62) + s("c")
    path = gguf_file(tmp_path / "len.gguf", kv=[kv], tensors=one_tensor())
    refused(path, E.TruncatedFileError, "string 1 of 'tokens'", str(2**62))


# ---------------------------------------------------------------- nested arrays

def test_arrays_nested_to_the_limit_open(tmp_path: Path) -> None:
    path = gguf_file(tmp_path / "deep.gguf", kv=[nested_arrays("deep", gguf_format.MAX_ARRAY_NESTING)],
                     tensors=one_tensor())
    assert "deep" not in sparsemap.open(path).metadata


def test_arrays_nested_past_the_limit_are_refused(tmp_path: Path) -> None:
    path = gguf_file(tmp_path / "deeper.gguf", kv=[nested_arrays("deep", gguf_format.MAX_ARRAY_NESTING + 1)],
                     tensors=one_tensor())
    refused(path, E.MetadataError, "'deep'", f"over {gguf_format.MAX_ARRAY_NESTING} deep")


def test_arrays_nested_a_million_deep_are_refused_without_recursing(tmp_path: Path) -> None:
    # The walk stops at the limit: no RecursionError, no stack per level beyond 8.
    path = gguf_file(tmp_path / "abyss.gguf", kv=[nested_arrays("abyss", 1_000_000)], tensors=one_tensor())
    refused(path, E.MetadataError, "'abyss'")


@pytest.mark.slow  # tracemalloc records each allocation: several seconds
def test_a_million_empty_nested_arrays_open_holding_nothing_per_array(tmp_path: Path) -> None:
    # 12 header bytes each; the GGUFReader kept two numpy arrays (and an index) per element.
    path = gguf_file(tmp_path / "wide.gguf", kv=[wide_arrays("wide", 1_000_000)], tensors=one_tensor())
    catalog, peak, seconds = measured_open(path)
    assert "wide" not in catalog.metadata and list(catalog) == ["w"]
    assert peak < FIXED_ALLOWANCE, f"{peak} bytes for a million arrays: something is held per array"
    assert_within_bounds(path, peak, seconds)


# ---------------------------------------------------------------- names that are not UTF-8

NOT_UTF8 = {
    "invalid start byte": b"\xff",
    "lone continuation byte": b"\x80",
    "overlong '/'": b"\xc0\xaf",
    "overlong NUL (modified UTF-8)": b"\xc0\x80",
    "CESU-8 high surrogate": b"\xed\xa0\x80",
    "CESU-8 surrogate pair": b"\xed\xa0\xbd\xed\xb8\x80",
    "beyond U+10FFFF": b"\xf4\x90\x80\x80",
    "truncated sequence": b"\xe2\x82",
}


@pytest.mark.parametrize("raw", list(NOT_UTF8.values()), ids=list(NOT_UTF8))
def test_python_refuses_these_bytes_as_utf8(raw: bytes) -> None:
    # The walk relies on the strict codec: no surrogate, overlong form or code point past U+10FFFF gets in.
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")


@pytest.mark.parametrize("raw", list(NOT_UTF8.values()), ids=list(NOT_UTF8))
def test_tensor_name_not_utf8_is_an_invalid_name(raw: bytes, tmp_path: Path) -> None:
    name = b"blk.0." + raw + b".weight"
    path = gguf_file(tmp_path / "name.gguf", tensors=[tensor_info(name, [8], F32, 0)])
    err = refused(path, E.InvalidNameError, "name of tensor 0", "not UTF-8", "byte 6")
    assert err.tensor is not None and err.tensor.startswith("blk.0.\\x")  # named, with the bad bytes escaped


@pytest.mark.parametrize("raw", list(NOT_UTF8.values()), ids=list(NOT_UTF8))
def test_metadata_key_not_utf8_is_a_header_encoding_error(raw: bytes, tmp_path: Path) -> None:
    # Keys are the header's own text (as safetensors' JSON header is): HeaderEncodingError, as before.
    key = s(b"general." + raw) + struct.pack("<II", 4, 1)
    path = gguf_file(tmp_path / "key.gguf", kv=[key], tensors=one_tensor())
    refused(path, E.HeaderEncodingError, "metadata key", "not UTF-8", "byte 8")


def test_string_values_not_utf8_are_kept_with_replacement_characters(tmp_path: Path) -> None:
    # Values are data, not names: decoded as the gguf package decoded them (errors="replace").
    key = s("general.name") + struct.pack("<I", STRING) + s(b"a\xed\xa0\x80b")
    path = gguf_file(tmp_path / "value.gguf", kv=[key], tensors=one_tensor())
    assert sparsemap.open(path).metadata["general.name"] == "a\ufffd\ufffd\ufffdb"
