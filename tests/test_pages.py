"""sparsemap.pages: page arithmetic, MAP_FIXED remaps, and the two residency facts (pagemap vs mincore)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from sparsemap import pages
from sparsemap.mapped import FileMapping, map_file
from sparsemap.pages import PAGE_SIZE as P

N_PAGES = 8


# ---------------------------------------------------------------- page arithmetic

@pytest.mark.parametrize(("start", "end", "want"), [
    (0, P, (0, P)),                        # exactly one page
    (0, 3 * P, (0, 3 * P)),
    (1, 2 * P, (P, 2 * P)),                # first page only partly inside
    (1, 3 * P - 1, (P, 2 * P)),            # both edge pages partly inside
    (P, 2 * P - 1, (P, P)),                # one byte short of a page: empty
    (100, 200, (P, P)),                    # inside one page: empty, first never past last
    (5 * P + 7, 5 * P + 7, (6 * P, 6 * P)),  # empty range
    (3 * P, 3 * P, (3 * P, 3 * P)),
])
def test_pages_inside(start: int, end: int, want: tuple[int, int]) -> None:
    first, last = pages.pages_inside(start, end)
    assert (first, last) == want
    assert first % P == 0 and last % P == 0 and first <= last


@pytest.mark.parametrize(("start", "end", "want"), [
    (0, P, (0, P)),
    (1, 2 * P - 1, (0, 2 * P)),
    (P, P + 1, (P, 2 * P)),                # one byte touches its whole page
    (P - 1, P + 1, (0, 2 * P)),            # two bytes across a boundary touch two pages
    (100, 200, (0, P)),
    (100, 100, (0, 0)),                    # empty: no pages
    (5 * P + 7, 5 * P + 7, (5 * P, 5 * P)),
    (5 * P + 7, 4 * P, (5 * P, 5 * P)),    # reversed: empty
])
def test_pages_covering(start: int, end: int, want: tuple[int, int]) -> None:
    assert pages.pages_covering(start, end) == want


@pytest.mark.parametrize(("mask", "want"), [
    ([], []),
    ([False, False], []),
    ([True], [(0, 1)]),
    ([True, True, True], [(0, 3)]),
    ([True, True, False, True, False, False, True], [(0, 2), (3, 4), (6, 7)]),
    ([False, True, True, False], [(1, 3)]),
])
def test_runs(mask: list[bool], want: list[tuple[int, int]]) -> None:
    got = pages.runs(np.array(mask, dtype=bool))
    assert got == want
    assert all(isinstance(a, int) and isinstance(b, int) for a, b in got)


# ---------------------------------------------------------------- remapping a real file mapping

@pytest.fixture
def mapped(tmp_path: Path) -> tuple[FileMapping, bytes]:
    """A file of N_PAGES pages, each filled with its page number + 1 (no zero bytes), mapped privately."""
    data = b"".join(bytes([i + 1]) * P for i in range(N_PAGES))
    path = tmp_path / "pages.bin"
    path.write_bytes(data)
    mm = map_file(str(path), len(data))
    assert mm is not None and mm.address % P == 0
    return mm, data


def _touch(mm: FileMapping) -> None:
    for i in range(N_PAGES):
        assert mm[i * P] == i + 1


def test_map_anonymous_over_part_of_a_mapping_reads_zeros(mapped: tuple[FileMapping, bytes]) -> None:
    mm, data = mapped
    _touch(mm)
    assert pages.present_in_process(mm.address, len(mm)).all()
    pages.map_anonymous_over(mm.address + 2 * P, 3 * P)  # pages 2, 3, 4
    present = pages.present_in_process(mm.address, len(mm))
    # Fresh anonymous pages nobody has touched are not in the process at all.
    assert present.tolist() == [True, True, False, False, False, True, True, True]
    assert mm[2 * P:5 * P] == bytes(3 * P)
    assert mm[:2 * P] == data[:2 * P] and mm[5 * P:] == data[5 * P:]


def test_map_file_over_brings_the_file_back(mapped: tuple[FileMapping, bytes]) -> None:
    mm, data = mapped
    pages.map_anonymous_over(mm.address + P, 4 * P)
    assert mm[P:5 * P] == bytes(4 * P)
    pages.map_file_over(mm.address + P, 2 * P, mm.fd, P)  # pages 1, 2 from the file; 3, 4 stay zero
    assert mm[P:3 * P] == data[P:3 * P]
    assert mm[3 * P:5 * P] == bytes(2 * P)
    pages.map_file_over(mm.address + 3 * P, 2 * P, mm.fd, 3 * P)
    assert mm[:] == data


def test_map_file_over_drops_private_writes(mapped: tuple[FileMapping, bytes]) -> None:
    mm, data = mapped
    mm[P:P + 4] = b"XXXX"  # copy-on-write: a private page; the file is unchanged
    assert pages.private_in_process(mm.address, len(mm)).tolist()[:2] == [False, True]
    pages.map_file_over(mm.address + P, P, mm.fd, P)
    assert mm[P:2 * P] == data[P:2 * P]
    assert not pages.private_in_process(mm.address, len(mm)).any()
    assert Path(mm.path).read_bytes() == data


def test_release_clears_the_present_bit_but_not_the_page_cache(mapped: tuple[FileMapping, bytes]) -> None:
    mm, data = mapped
    _touch(mm)
    assert pages.present_in_process(mm.address, len(mm)).all()
    assert pages.in_page_cache(mm.address, len(mm)).all()
    pages.release(mm.address + P, 2 * P)
    present = pages.present_in_process(mm.address, len(mm))
    assert present.tolist() == [True, False, False, True, True, True, True, True]
    # The file pages are still cached: mincore is a separate, system-wide fact.
    assert pages.in_page_cache(mm.address, len(mm)).all()
    assert mm[:] == data  # the next touch faults them back from the file


def test_release_discards_private_copies(mapped: tuple[FileMapping, bytes]) -> None:
    mm, data = mapped
    mm[0:3] = b"abc"
    pages.release(mm.address, P)
    assert mm[:P] == data[:P]


def test_residency_arrays_have_one_entry_per_page(mapped: tuple[FileMapping, bytes]) -> None:
    mm, _ = mapped
    assert pages.in_page_cache(mm.address, P + 1).shape == (2,)
    assert pages.pagemap(mm.address, 3 * P).shape == (3,)
    assert pages.present_in_process(mm.address, 0).shape == (0,)
    assert pages.in_page_cache(mm.address, 0).shape == (0,)


@pytest.mark.parametrize("call", [
    lambda a, fd: pages.map_anonymous_over(a + 1, P),
    lambda a, fd: pages.map_anonymous_over(a, P + 1),
    lambda a, fd: pages.map_file_over(a + 8, P, fd, 0),
    lambda a, fd: pages.map_file_over(a, P // 2, fd, 0),
    lambda a, fd: pages.map_file_over(a, P, fd, 100),       # misaligned file offset
    lambda a, fd: pages.release(a + 1, P),
    lambda a, fd: pages.will_need(a + 1, P),
    lambda a, fd: pages.in_page_cache(a + 1, P),
    lambda a, fd: pages.pagemap(a + 1, P),
], ids=["anon-addr", "anon-len", "file-addr", "file-len", "file-offset", "release", "will_need",
        "mincore", "pagemap"])
def test_misaligned_addresses_raise_value_error(mapped: tuple[FileMapping, bytes], call) -> None:
    mm, data = mapped
    with pytest.raises(ValueError, match="page size"):
        call(mm.address, mm.fd)
    assert mm[:] == data  # nothing was remapped


def test_zero_length_remaps_are_no_ops(mapped: tuple[FileMapping, bytes]) -> None:
    mm, data = mapped
    pages.map_anonymous_over(mm.address, 0)
    pages.map_file_over(mm.address, 0, mm.fd, 0)
    pages.release(mm.address, 0)
    assert mm[:] == data


def test_remap_errors_are_os_errors_with_the_call(mapped: tuple[FileMapping, bytes]) -> None:
    mm, _ = mapped
    with pytest.raises(OSError, match="mmap"):
        pages.map_file_over(mm.address, P, -1, 0)  # a bad descriptor: EBADF


def test_addresses_from_ctypes_match_the_mapping(mapped: tuple[FileMapping, bytes]) -> None:
    # The address the module works with is the mapping's first byte.
    mm, data = mapped
    assert ctypes.string_at(mm.address + 3 * P, 4) == data[3 * P:3 * P + 4]
