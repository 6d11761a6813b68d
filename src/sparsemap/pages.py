"""The OS layer: pages, and the calls Python's ``mmap`` module lacks.

Everything sparsemap does to physical memory goes through here: remapping a
range with ``MAP_FIXED`` (anonymous zeros over rows, or the file back),
``madvise``, ``mincore`` (page-cache residency) and ``/proc/self/pagemap``
(residency in this process). Addresses are plain integers; callers own the
mappings. No torch here.

Two residency facts, not one:
* ``present_in_process``: the page is mapped into this process right now
  (``pagemap`` present bit). ``MADV_DONTNEED`` clears it.
* ``in_page_cache``: the file page is in the kernel's page cache (``mincore``),
  shared by every process. It survives ``MADV_DONTNEED``; only
  ``posix_fadvise(POSIX_FADV_DONTNEED)`` (or memory pressure) drops it.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np

PAGE_SIZE: int = mmap.PAGESIZE

# The C library is already loaded into the process: dlopen(NULL) reaches its symbols without
# ctypes.util.find_library, which runs ldconfig (milliseconds at every import).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.madvise.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.restype = ctypes.c_int
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]

MAP_FAILED = ctypes.c_void_p(-1).value
MAP_FIXED = getattr(mmap, "MAP_FIXED", 0x10)
MAP_ANONYMOUS = getattr(mmap, "MAP_ANONYMOUS", 0x20)
MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
MADV_WILLNEED = getattr(mmap, "MADV_WILLNEED", 3)
PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE


def _check(ok: bool, what: str) -> None:
    if not ok:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _check_aligned(addr: int, nbytes: int, what: str) -> None:
    if addr % PAGE_SIZE or nbytes % PAGE_SIZE:
        raise ValueError(f"{what}: address {addr:#x} and length {nbytes} must be multiples of the "
                         f"page size {PAGE_SIZE}")


# ---------------------------------------------------------------- page arithmetic

def pages_inside(start: int, end: int) -> tuple[int, int]:
    """``[first, last)`` page-aligned addresses of the pages wholly inside ``[start, end)``.

    Empty (``first >= last``) when no whole page fits.
    """
    first = -(-start // PAGE_SIZE) * PAGE_SIZE
    last = end // PAGE_SIZE * PAGE_SIZE
    return first, max(first, last)


def pages_covering(start: int, end: int) -> tuple[int, int]:
    """``[first, last)`` page-aligned addresses of every page ``[start, end)`` touches."""
    if end <= start:
        return start // PAGE_SIZE * PAGE_SIZE, start // PAGE_SIZE * PAGE_SIZE
    return start // PAGE_SIZE * PAGE_SIZE, -(-end // PAGE_SIZE) * PAGE_SIZE


# ---------------------------------------------------------------- remapping

def map_anonymous_over(addr: int, nbytes: int) -> None:
    """Replace ``[addr, addr + nbytes)`` with fresh zero pages; the old pages are freed at once.

    ``MAP_FIXED`` unmaps and maps in one step under the kernel's mmap lock, so a
    concurrent reader sees either the old page or a zero page, never a hole.
    """
    _check_aligned(addr, nbytes, "map_anonymous_over")
    if nbytes == 0:
        return
    got = _libc.mmap(addr, nbytes, PROT_RW, mmap.MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0)
    _check(got != MAP_FAILED and got == addr, f"mmap(MAP_ANONYMOUS|MAP_FIXED, {addr:#x}, {nbytes})")


def map_file_over(addr: int, nbytes: int, fd: int, offset: int) -> None:
    """Map ``fd`` at ``offset`` privately (copy-on-write) over ``[addr, addr + nbytes)``."""
    _check_aligned(addr, nbytes, "map_file_over")
    if offset % PAGE_SIZE:
        raise ValueError(f"map_file_over: file offset {offset} is not a multiple of the page size "
                         f"{PAGE_SIZE}")
    if nbytes == 0:
        return
    got = _libc.mmap(addr, nbytes, PROT_RW, mmap.MAP_PRIVATE | MAP_FIXED, fd, offset)
    _check(got != MAP_FAILED and got == addr,
           f"mmap(fd {fd}, offset {offset}, MAP_FIXED, {addr:#x}, {nbytes})")


def madvise(addr: int, nbytes: int, advice: int) -> None:
    _check_aligned(addr, 0, "madvise")
    if nbytes:
        _check(_libc.madvise(addr, nbytes, advice) == 0, f"madvise({addr:#x}, {nbytes}, {advice})")


def release(addr: int, nbytes: int) -> None:
    """``MADV_DONTNEED``: drop these pages from the process; the next touch re-reads the file.

    On a private file mapping this also discards copy-on-write copies: any
    in-place write to those pages is lost.
    """
    madvise(addr, nbytes, MADV_DONTNEED)


def will_need(addr: int, nbytes: int) -> None:
    """``MADV_WILLNEED``: ask the kernel to read these pages ahead."""
    madvise(addr, nbytes, MADV_WILLNEED)


def trim_heap() -> bool:
    """Give the heap's free memory back to the kernel (glibc's ``malloc_trim(0)``); False where the C
    library has none (musl).

    Tensors of a few MiB freed in the middle of the heap stay resident: glibc keeps freed memory for later
    allocations. A model built with real buffers that loading then replaced by views of the file (the
    causal masks of LLMs-from-scratch's GPT: 12 x 4 MiB) leaves 35 MiB of anonymous memory held so.
    """
    trim = getattr(_libc, "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


def drop_cache(fd: int, offset: int, nbytes: int) -> None:
    """``posix_fadvise(POSIX_FADV_DONTNEED)``: drop clean cached pages of this file range."""
    os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)


# ---------------------------------------------------------------- residency

def in_page_cache(addr: int, nbytes: int) -> np.ndarray:
    """Per page of ``[addr, addr + nbytes)`` (page-aligned ``addr``): resident in the page cache.

    For anonymous pages ``mincore`` reports residency in this process.
    """
    _check_aligned(addr, 0, "mincore")
    n_pages = -(-nbytes // PAGE_SIZE)
    vec = np.zeros(n_pages, dtype=np.uint8)
    if n_pages:
        _check(_libc.mincore(addr, nbytes, vec.ctypes.data) == 0, f"mincore({addr:#x}, {nbytes})")
    return (vec & 1).astype(bool)


_PRESENT_BIT = np.uint64(1 << 63)
_FILE_OR_SHARED_BIT = np.uint64(1 << 61)


def pagemap(addr: int, nbytes: int) -> np.ndarray:
    """Raw ``/proc/self/pagemap`` entries (uint64) for each page of ``[addr, addr + nbytes)``.

    Bit 63: present in this process. Bit 61: a file page (or shared anonymous);
    clear for a private copy-on-write copy or anonymous page. Reading one's own
    pagemap needs no privilege (only the frame numbers are hidden).
    """
    _check_aligned(addr, 0, "pagemap")
    n_pages = -(-nbytes // PAGE_SIZE)
    if n_pages == 0:
        return np.zeros(0, dtype=np.uint64)
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        raw = os.pread(fd, n_pages * 8, addr // PAGE_SIZE * 8)
    finally:
        os.close(fd)
    return np.frombuffer(raw, dtype=np.uint64)


def present_in_process(addr: int, nbytes: int) -> np.ndarray:
    """Per page of ``[addr, addr + nbytes)``: mapped into this process now (pagemap present bit)."""
    return (pagemap(addr, nbytes) & _PRESENT_BIT) != 0


def private_in_process(addr: int, nbytes: int) -> np.ndarray:
    """Per page: present and anonymous (a copy-on-write copy or an anonymous page), not a file page."""
    entries = pagemap(addr, nbytes)
    return ((entries & _PRESENT_BIT) != 0) & ((entries & _FILE_OR_SHARED_BIT) == 0)


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[(first, stop), ...]`` index ranges of the True runs in a bool array, in order."""
    if mask.size == 0:
        return []
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))

