"""File mappings: one copy-on-write mapping per file, and the state that belongs to it.

Each file is mapped once, ``MAP_PRIVATE`` with ``PROT_READ | PROT_WRITE``:
copy-on-write, so a stray in-place write makes a private anonymous page and the
file never changes. Tensors are ``torch.frombuffer`` views of the mapping
(served by :class:`sparsemap.Checkpoint`). Pages fault in on first touch and
count as file-backed memory, which the kernel can drop and re-read.

Ownership. A :class:`FileMapping` owns what concerns its pages: the file
descriptor (kept open so rows can be mapped back from the same inode even if
the path is replaced), the row spans of the padded-row views served from it,
and the row state of its tensors: every row controller that has masked rows
(:mod:`sparsemap.sparse_rows`) is held by the mapping, so the state cannot be
lost, and one lock serialises row operations on its pages. All of it lives
exactly as long as the mapping, which lives as long as any view of it or the
checkpoint that made it: ``torch.frombuffer`` keeps a reference to the
``mmap`` object. A mapping is never closed (that would leave the views
dangling, and :meth:`FileMapping.close` refuses); it is unmapped when the
last reference goes.

Finding the mapping of a bare tensor (``sparsemap.rows(model.embed.weight)``)
needs an index from addresses to live mappings: :data:`LIVE_MAPPINGS` holds
weak references only, so it owns nothing and an entry disappears with its
mapping.

This module also derives the torch dtype table from the one in
:mod:`sparsemap.formats.dtypes`.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import weakref
from typing import Any

import torch

from . import pages
from .errors import FileChangedError, NotMappedError, TruncatedFileError, UnknownDtypeError
from .formats.catalog import FileStamp
from .formats.dtypes import TORCH_NAMES
from .formats.source import open_regular_fd

if sys.byteorder != "little":  # pragma: no cover - every format we read is little-endian
    raise ImportError("sparsemap maps little-endian files and needs a little-endian machine")


# ---------------------------------------------------------------- dtypes

# Older torch builds lack some dtypes (fp8, unsigned); those are refused when a
# tensor needs them, not at import.
TORCH_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in TORCH_NAMES.items() if hasattr(torch, attr)}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}


def torch_dtype(name: str, *, path: str | None = None, tensor: str | None = None) -> torch.dtype:
    """The torch dtype for a safetensors dtype name."""
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise UnknownDtypeError(f"dtype {name} has no torch equivalent in torch {torch.__version__}",
                                path=path, tensor=tensor) from None


# ---------------------------------------------------------------- one mapped file

RowKey = tuple[int, int, int]  # (address of row 0, rows, row stride in bytes)


class FileMapping(mmap.mmap):
    """A whole file mapped privately, with its descriptor, its address and the row state it owns.

    Attributes (set by :func:`map_file`):
        path: the file mapped.
        fd: a descriptor of that file, open while the mapping lives.
        address: the mapping's first byte (page-aligned).
        stamp: the file's version when mapped.
        row_spans: for views of padded rows served from this mapping, the bytes
            each row owns (row plus padding), by :data:`RowKey`.
        row_controllers: the live row controllers of this mapping's tensors, by
            view geometry (weak: one nobody holds and that masks nothing goes).
        row_state: the controllers that have masked rows, held strongly: the
            state of which rows read as zeros lives as long as the mapping.
        lock: one re-entrant lock for the row spans, the controllers and every
            row operation on this mapping's pages (operations through two views
            of the same bytes must not interleave).
    """

    path: str
    fd: int
    address: int
    stamp: FileStamp
    row_spans: dict[RowKey, int]
    row_controllers: weakref.WeakValueDictionary[tuple[int, ...], Any]
    row_state: dict[tuple[int, ...], Any]
    lock: threading.RLock

    def close(self) -> None:
        raise RuntimeError(f"{self.path}: a sparsemap file mapping is never closed by hand: tensors are "
                           "views of it and would point at unmapped memory. It is unmapped when the last "
                           "view and its checkpoint are gone")

    def __enter__(self) -> FileMapping:
        raise RuntimeError("a sparsemap file mapping is not a context manager (leaving one would unmap "
                           "memory its tensors still view)")

    @property
    def end(self) -> int:
        """Address one past the mapping's last byte."""
        return self.address + len(self)

    def check_unchanged(self) -> None:
        """Raise :class:`FileChangedError` if the mapped inode was truncated or modified since mapping.

        Called before any operation that makes pages fault in from the file
        again (serving a view, evict, restore, prefetch): past a truncation that
        is SIGBUS, and after an in-place rewrite it would mix new bytes into old
        weights. A file *replaced* by rename is fine: the descriptor still
        reads the old inode.
        """
        changed = self.stamp.changes_in(self.fd)
        if changed:
            raise FileChangedError(f"changed since it was mapped: {changed}; its pages "
                                   "cannot be read again safely (reload it from the file as it is now)",
                                   path=self.path)

    def row_span(self, t: torch.Tensor) -> int | None:
        """Bytes each row of ``t`` owns (row plus padding), if ``t`` is a view of padded rows served here."""
        if t.dim() == 0:
            return None
        with self.lock:
            return self.row_spans.get((t.data_ptr(), t.shape[0], t.stride(0) * t.element_size()))

    def record_row_span(self, t: torch.Tensor, span: int) -> None:
        """Remember that each row of the view ``t`` owns ``span`` bytes (the layout padded its rows)."""
        if t.dim():
            with self.lock:
                self.row_spans[(t.data_ptr(), t.shape[0], t.stride(0) * t.element_size())] = span


class _LiveMappings:
    """Address -> live mapping, for finding the mapping of any view. Weak: it owns nothing."""

    def __init__(self) -> None:
        self._by_address: weakref.WeakValueDictionary[int, FileMapping] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def add(self, mm: FileMapping) -> None:
        with self._lock:
            self._by_address[mm.address] = mm

    def containing(self, start: int, end: int) -> FileMapping | None:
        """The mapping that holds all of ``[start, end)``, or ``None``."""
        with self._lock:
            mappings = list(self._by_address.values())
        return next((mm for mm in mappings if not mm.closed and mm.address <= start and end <= mm.end), None)


LIVE_MAPPINGS = _LiveMappings()


def map_file(path: str, required_nbytes: int, stamp: FileStamp | None = None) -> FileMapping | None:
    """Map ``path`` privately (copy-on-write), after checking it is still the file that was parsed.

    The check matters: touching a page past the end of a shrunken file is
    SIGBUS, not an exception, and a file replaced since its header was read
    has other bytes at the header's offsets. Returns ``None`` for an empty file.

    Args:
        path: the file.
        required_nbytes: how many bytes its tensors need.
        stamp: the file's version when its header was parsed (``Catalog.stamps``).
    """
    fd = open_regular_fd(path)
    try:
        now = FileStamp.of(fd)
        if stamp is not None and now != stamp:
            raise FileChangedError(f"changed since its header was read: {stamp.differences(now)}; "
                                   "open it again", path=path)
        file_nbytes = now.size
        if file_nbytes < required_nbytes:
            raise TruncatedFileError(f"file is {file_nbytes} bytes but its tensors need {required_nbytes} "
                                     "(was it truncated or replaced after it was opened?)", path=path)
        if file_nbytes == 0:
            os.close(fd)
            return None
        mm = FileMapping(fd, file_nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    mm.path, mm.fd, mm.stamp = path, fd, now
    mm.row_spans, mm.row_controllers, mm.row_state = {}, weakref.WeakValueDictionary(), {}
    mm.lock = threading.RLock()
    # from_buffer pins the mapping only while the ctypes object lives: a moment.
    mm.address = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    weakref.finalize(mm, os.close, fd)
    LIVE_MAPPINGS.add(mm)
    return mm


def mapping_of(t: torch.Tensor, name: str | None = None) -> FileMapping:
    """The file mapping that ``t``'s data lies in.

    Raises:
        NotMappedError: ``t`` is not a view of a mapped file (a copy, a
            dequantized GGUF tensor, a tensor on another device).
    """
    start = t.data_ptr()
    # The bytes a strided view spans, first element to last (an expanded view spans less than numel says).
    last = sum((d - 1) * abs(s) for d, s in zip(t.shape, t.stride(), strict=True)) if t.numel() else 0
    mm = LIVE_MAPPINGS.containing(start, start + (last + 1) * t.element_size())
    if mm is None or t.device.type != "cpu":
        raise NotMappedError(
            "not a view of a file mapped by sparsemap (a copy, a dequantized or cast tensor, or not on the "
            "CPU); write it as a plain file with `sparsemap convert` and load that", tensor=name)
    return mm


def mapping_or_none(t: torch.Tensor) -> FileMapping | None:
    """The file mapping ``t``'s data lies in, or ``None`` where it is not a view of one (a copy)."""
    try:
        return mapping_of(t)
    except NotMappedError:
        return None


def release_pages(t: torch.Tensor, *, drop_cache: bool = False) -> int:
    """Release the pages wholly inside a mapped tensor's bytes; returns bytes released (0 if not mapped).

    The data stays readable: it faults back from the file. With ``drop_cache``
    the file's cached pages for that range are dropped too. A tensor that is
    not a view of a mapping is left alone: releasing anonymous pages would
    zero them.
    """
    mm = mapping_or_none(t)
    if mm is None:
        return 0
    start = t.data_ptr()
    first, last = pages.pages_inside(start, start + t.numel() * t.element_size())
    if last <= first:
        return 0
    pages.release(first, last - first)
    if drop_cache:
        pages.drop_cache(mm.fd, first - mm.address, last - first)
    return last - first


def __getattr__(name: str) -> Any:
    # Names this module had before the torch side of a checkpoint became sparsemap.Checkpoint.
    moved = {"Mapper": "sparsemap.Checkpoint (it maps a catalog's files and serves tensors)",
             "is_view_of_file": "sparsemap.Checkpoint(...).owns(tensor)"}
    if name in moved:
        raise AttributeError(f"sparsemap.mapped.{name} is gone: use {moved[name]}")
    raise AttributeError(f"module 'sparsemap.mapped' has no attribute {name!r}")
