"""Mapped files and zero-copy torch views of catalog entries.

Each file is mapped once, ``MAP_PRIVATE`` with ``PROT_READ | PROT_WRITE``:
copy-on-write, so a stray in-place write makes a private anonymous page and the
file never changes. Every tensor of that file is a ``torch.frombuffer`` view of
the one mapping. Pages fault in on first touch and count as file-backed memory,
which the kernel can drop and re-read; nothing is copied.

Lifetime: ``torch.frombuffer`` keeps a reference to the ``mmap`` object but does
not pin its buffer, so ``mmap.close()`` would leave dangling views. We never
close a mapping; it is unmapped when the last view (and the :class:`Mapper`)
lets go of it. Each mapping keeps a descriptor of its file open for as long as
it lives, so row operations can map pages of the same inode back even if the
path has since been replaced.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import weakref
from typing import TYPE_CHECKING

import torch

from .errors import FileChangedError, NotMappedError, TruncatedFileError, UnknownDtypeError
from .formats.catalog import FileStamp, TensorEntry

if TYPE_CHECKING:  # pragma: no cover
    from .formats.catalog import Catalog

if sys.byteorder != "little":  # pragma: no cover - every format we read is little-endian
    raise ImportError("sparsemap maps little-endian files and needs a little-endian machine")


def _torch_dtypes() -> dict[str, torch.dtype]:
    names = {
        "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
        "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32",
        "I64": "int64", "U64": "uint64", "F64": "float64", "C64": "complex64", "C128": "complex128",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu",
    }
    # Older torch builds lack some of these (fp8, unsigned); those dtypes are
    # then refused when a tensor needs them, not at import.
    return {k: getattr(torch, v) for k, v in names.items() if hasattr(torch, v)}


TORCH_DTYPES: dict[str, torch.dtype] = _torch_dtypes()
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}


def torch_dtype(name: str, *, path: str | None = None, tensor: str | None = None) -> torch.dtype:
    """The torch dtype for a safetensors dtype name."""
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise UnknownDtypeError(f"dtype {name} has no torch equivalent in torch {torch.__version__}",
                                path=path, tensor=tensor) from None


class FileMapping(mmap.mmap):
    """A whole file mapped privately, with the descriptor and address row operations need.

    Attributes (set by :func:`map_file`):
        path: the file mapped.
        fd: a descriptor of that file, open while the mapping lives.
        address: the mapping's first byte (page-aligned).
        stamp: the file's version when mapped.
    """

    path: str
    fd: int
    address: int
    stamp: FileStamp

    def check_unchanged(self) -> None:
        """Raise :class:`FileChangedError` if the mapped inode was truncated or modified since mapping.

        Called before any operation that makes pages fault in from the file
        again (evict, restore, prefetch): past a truncation that is SIGBUS, and
        after an in-place rewrite it would mix new bytes into old weights. A
        file *replaced* by rename is fine: the descriptor still reads the old inode.
        """
        st = os.fstat(self.fd)
        now = FileStamp.of_stat(st)
        # Replacing the file by rename unlinks this inode, which moves its change time and nothing
        # else: an unlinked inode (no name left to write through) only counts if size or mtime moved.
        if st.st_nlink == 0:
            now = now._replace(ctime_ns=self.stamp.ctime_ns)
        if now != self.stamp:
            raise FileChangedError(f"changed since it was mapped: {self.stamp.differences(now)}; its pages "
                                   "cannot be read again safely (reload it from the file as it is now)",
                                   path=self.path)


# (address, rows, row stride in bytes) -> bytes each row owns, for views of padded rows.
_ROW_SPANS: dict[tuple[int, int, int], int] = {}


def row_span_of(t: torch.Tensor) -> int | None:
    """Bytes each row of ``t`` owns (row plus padding), if ``t`` is a view of padded rows we served."""
    if t.dim() == 0:
        return None
    return _ROW_SPANS.get((t.data_ptr(), t.shape[0], t.stride(0) * t.element_size()))


# address -> mapping, for finding the mapping (and so the file offset) of any view.
_REGISTRY: weakref.WeakValueDictionary[int, FileMapping] = weakref.WeakValueDictionary()
_REGISTRY_LOCK = threading.Lock()


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
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
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
    # from_buffer pins the mapping only while the ctypes object lives: a moment.
    mm.address = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    weakref.finalize(mm, os.close, fd)
    with _REGISTRY_LOCK:
        _REGISTRY[mm.address] = mm
    return mm


def mapping_of(t: torch.Tensor, name: str | None = None) -> FileMapping:
    """The file mapping that ``t``'s data lies in.

    Raises:
        NotMappedError: ``t`` is not a view of a mapped file (a copy, a
            dequantized GGUF tensor, a tensor on another device).
    """
    ptr = t.data_ptr()
    end = ptr + max(t.numel(), 1) * t.element_size()
    with _REGISTRY_LOCK:
        mappings = list(_REGISTRY.values())
    for mm in mappings:
        if mm.address <= ptr and end <= mm.address + len(mm):
            return mm
    raise NotMappedError(
        "not a view of a file mapped by sparsemap (a copy, a dequantized or cast tensor, or not on the "
        "CPU); write it as a plain file with `sparsemap convert` and load that", tensor=name)


class Mapper:
    """Maps a catalog's files on first use and serves tensors as views of them.

    One mapping per file, shared by all its tensors; thread-safe.
    """

    def __init__(self, catalog: Catalog) -> None:
        # No reference back to the catalog: a cycle would keep every mapping
        # alive until the garbage collector runs, pinning pages in the cache.
        self._required = catalog.required_nbytes()
        self._stamps = dict(catalog.stamps)
        self._maps: dict[str, FileMapping | None] = {}
        self._lock = threading.Lock()

    def mapping(self, path: str) -> FileMapping | None:
        with self._lock:
            if path not in self._maps:
                self._maps[path] = map_file(path, self._required.get(path, 0), self._stamps.get(path))
            return self._maps[path]

    def tensor(self, entry: TensorEntry, *, stored_order: bool = False) -> torch.Tensor:
        """The entry's tensor: a view of the mapping, or a copy where a view cannot serve.

        Copies happen only for quantized GGUF data (dequantized), for data
        whose offset is not a multiple of its element size, and for reordered
        rows put back in logical order (unless ``stored_order``).
        """
        view = self._stored(entry)
        if entry.row_span is not None and view.dim():
            _ROW_SPANS[(view.data_ptr(), view.shape[0], view.stride(0) * view.element_size())] = entry.row_span
        if entry.order is None or stored_order:
            return view
        # stored slice k is logical slice order[k]: logical i is stored inverse[i]
        inverse = torch.empty(len(entry.order), dtype=torch.int64)
        inverse[torch.tensor(entry.order, dtype=torch.int64)] = torch.arange(len(entry.order))
        return view.index_select(entry.order_dim, inverse)

    def _stored(self, entry: TensorEntry) -> torch.Tensor:
        dtype = torch_dtype(entry.dtype, path=entry.file, tensor=entry.name)
        if entry.numel == 0:
            # frombuffer refuses count=0; an empty tensor owns no bytes anyway.
            return torch.empty(entry.shape, dtype=dtype)
        mm = self.mapping(entry.file)
        assert mm is not None  # a non-empty tensor implies a non-empty file
        mm.check_unchanged()  # one fstat: a view of a truncated file is SIGBUS on first touch
        if entry.encoding is not None:
            return _dequantize(mm, entry)
        flat = torch.frombuffer(mm, dtype=torch.uint8, count=entry.nbytes, offset=entry.offset)
        if entry.offset % dtype.itemsize != 0:
            flat = flat.clone()  # misaligned for this dtype; torch kernels assume alignment
        view = flat.view(dtype)
        if entry.strides is not None:
            return view.as_strided(entry.shape, entry.strides)
        return view.view(entry.shape)

    def mapped_ranges(self) -> dict[str, tuple[int, int]]:
        """``{file: (address, nbytes)}`` of each mapping made so far."""
        return {path: (mm.address, len(mm)) for path, mm in self._maps.items() if mm is not None}


def release_pages(t: torch.Tensor, *, drop_cache: bool = False) -> int:
    """Release the pages wholly inside a mapped tensor's bytes; returns bytes released (0 if not mapped).

    The data stays readable: it faults back from the file. With ``drop_cache``
    the file's cached pages for that range are dropped too.
    """
    from . import pages

    try:
        mm = mapping_of(t)
    except NotMappedError:
        return 0
    start = t.data_ptr()
    first, last = pages.pages_inside(start, start + t.numel() * t.element_size())
    if last <= first:
        return 0
    pages.release(first, last - first)
    if drop_cache:
        pages.drop_cache(mm.fd, first - mm.address, last - first)
    return last - first


def _dequantize(mm: mmap.mmap, entry: TensorEntry) -> torch.Tensor:
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = np.frombuffer(mm, dtype=np.uint8, count=entry.nbytes, offset=entry.offset)
    qtype = GGMLQuantizationType[entry.encoding]  # type: ignore[misc]
    values = dequantize(raw.reshape(-1), qtype)  # (numel,) float32
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).view(entry.shape)


def is_view_of_file(t: torch.Tensor, mapper: Mapper) -> bool:
    """Whether ``t``'s data lies inside one of ``mapper``'s mappings (i.e. it is zero-copy)."""
    ptr = t.data_ptr()
    return any(base <= ptr < base + n for base, n in mapper.mapped_ranges().values())
