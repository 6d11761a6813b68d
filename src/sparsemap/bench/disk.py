"""Whole files on disk, for benchmarks: page-cache state and the physical read and write speeds.

A benchmark is only fair when it knows where its bytes come from: a cold run
must really go to the disk (``make_cold``, verified with ``mincore``), and a
loading speed means something only next to what the disk itself delivers
(``sequential_read_speed``, ``sequential_write_speed``). The core never needs
these; it works on ranges of mappings it owns (:mod:`sparsemap.pages`). No torch here.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import tempfile
import time

from ..pages import PROT_RW, in_page_cache


def file_cached_fraction(path: str | os.PathLike[str]) -> float:
    """Fraction of ``path``'s pages in the page cache (mincore over a fresh mapping; reads nothing).

    Example:
        >>> file_cached_fraction("model.safetensors")       # doctest: +SKIP
        0.0
    """
    with open(path, "rb") as f:
        nbytes = os.fstat(f.fileno()).st_size
        if nbytes == 0:
            return 0.0
        # Private and writable only so ctypes can take its address; never written.
        mm = mmap.mmap(f.fileno(), nbytes, flags=mmap.MAP_PRIVATE, prot=PROT_RW)
    holder = ctypes.c_char.from_buffer(mm)
    try:
        return float(in_page_cache(ctypes.addressof(holder), nbytes).mean())
    finally:
        del holder  # the exported buffer must go before the mapping can close
        mm.close()


def make_cold(path: str | os.PathLike[str]) -> float:
    """Drop ``path`` from the page cache; returns the fraction still cached after (0.0 when it worked).

    Dirty pages cannot be dropped, so the file is synced first. Pages another
    process has mapped stay.

    Example:
        >>> assert make_cold("model.safetensors") < 0.01, "something else holds the file"  # doctest: +SKIP
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return file_cached_fraction(path)


def sequential_read_speed(path: str | os.PathLike[str], chunk_nbytes: int = 16 << 20) -> float:
    """Bytes per second of one sequential ``pread`` pass over the file (cold or warm as it is).

    Large reads into one reused buffer: the most the disk (or the cache) gives,
    and the yardstick every loading strategy is compared with. The pass also
    warms the file.
    """
    buf = bytearray(chunk_nbytes)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        start, offset = time.perf_counter(), 0
        while n := os.preadv(fd, [view], offset):
            offset += n
        return offset / (time.perf_counter() - start)
    finally:
        os.close(fd)


def sequential_write_speed(folder: str | os.PathLike[str], nbytes: int = 1 << 30,
                           chunk_nbytes: int = 16 << 20) -> float:
    """Bytes per second of writing ``nbytes`` to a new file in ``folder`` and syncing it (then removed).

    The sync is timed too: a conversion is done only once its output is on the disk.
    """
    block = bytes(chunk_nbytes)
    fd, path = tempfile.mkstemp(dir=folder, prefix=".sparsemap-write-speed.")
    try:
        start, written = time.perf_counter(), 0
        while written < nbytes:
            written += os.write(fd, block[: min(chunk_nbytes, nbytes - written)])
        os.fdatasync(fd)
        return written / (time.perf_counter() - start)
    finally:
        os.close(fd)
        os.unlink(path)
