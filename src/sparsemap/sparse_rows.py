"""Sparse rows: give the physical memory of individual rows back, and take it again on demand.

A :class:`RowController` works on one mapped tensor whose first dimension
indexes rows (a 2-D weight, or any row-major N-D tensor; each row contiguous,
rows ``row_stride`` bytes apart). It can

* ``evict(rows)``: release the pages wholly inside those rows. The data stays
  correct: the next touch faults it back from the file.
* ``mask(rows)``: make those rows read as zeros, freeing their pages at once
  (anonymous pages mapped over them); ``restore(rows)`` maps the file back.
* ``prefetch(rows)``: ask the kernel to read them ahead.
* ``residency()``: per-row residency in this process and in the page cache,
  row sparsity next to page sparsity.

Page granularity. Memory comes back a page at a time, so a row that shares a
page with a row kept (or with another tensor) cannot free that page. The rule:
**a kept row is never corrupted**. A masked row's bytes on a shared page are
zeroed by writing (the page becomes a private copy and stays); the report counts
such pages. ``strict=True`` refuses instead. ``sparsemap convert --pad-rows``
writes a layout where every row owns whole pages, so page sparsity equals row
sparsity.

What a row owns: its own bytes, and nothing between it and the next row,
unless the layout compiler padded the rows (then the padding is the row's
too; the checkpoint records this on the mapping, see ``TensorEntry.row_span``).
The gaps of other strided views can hold other tensors' bytes: the parts of
an FFN bundle, the other columns of a wider matrix.

Which pages an operation may remap: only pages made wholly of bytes this
tensor owns. Other pages (at the edges, or holding gaps) are only ever written
byte by byte, so operations on two tensors never undo each other.

State and ownership: the file mapping a tensor is a view of
(:class:`~sparsemap.mapped.FileMapping`) holds every controller that has
masked rows, for the mapping's lifetime, so :func:`rows` always returns the
controller that knows which rows are masked, whether or not the caller kept
it. Two views of the same bytes with different geometries (``t`` and
``t[:32]``, or ``t.view(...)``) get different controllers; while one of them
has masked rows, the others refuse to mask, restore or evict (an eviction
through one would discard the zeros the other wrote). Row operations on one
mapping take its lock, so they never interleave. A controller refers back to
its mapping weakly; once every view and the checkpoint are gone, the file is
unmapped and a controller still held raises
:class:`~sparsemap.errors.NotMappedError` instead of remapping pages that are
no longer ours.

Caveats:
* Mapped weights are copy-on-write. An in-place write by the program into a
  row is lost when that row's pages are evicted or restored.
* The kernel may map a large file's page cache in 2 MiB folios. Evicting or
  masking part of one unmaps the whole folio from this process, so kept
  neighbours' pages also show as not present until touched again; their data
  is unaffected. Likewise ``drop_cache`` drops only cache blocks wholly inside
  the range, and a block can be up to 2 MiB.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from . import pages
from .checkpoint import Checkpoint
from .errors import NotMappedError, RowAlignmentError, RowError
from .mapped import FileMapping, mapping_of
from .pages import PAGE_SIZE

Rows = int | slice | range | Iterable[int] | np.ndarray | torch.Tensor


@dataclass(frozen=True)
class Residency:
    """Where a tensor's rows and pages are, at one instant.

    Page counts are over the pages the tensor touches (edge pages included).
    """

    n_rows: int
    rows_masked: int
    n_pages: int
    pages_freed: int  # replaced by anonymous zero pages: every row on them is masked
    pages_shared: int  # hold masked rows but stay, because a kept row or a neighbour shares them
    pages_present: int  # mapped into this process now (pagemap)
    pages_private: int  # present as private copies or anonymous pages, not file pages
    pages_cached: int  # in the page cache (mincore)
    row_present: np.ndarray  # (n_rows,) fraction of each row's pages present in this process
    row_cached: np.ndarray  # (n_rows,) fraction of each row's pages in the page cache

    @property
    def row_sparsity(self) -> float:
        return self.rows_masked / self.n_rows if self.n_rows else 0.0

    @property
    def page_sparsity(self) -> float:
        return self.pages_freed / self.n_pages if self.n_pages else 0.0

    def __str__(self) -> str:
        return (f"{100 * self.row_sparsity:.1f}% of rows masked ({self.rows_masked:,} of {self.n_rows:,}), "
                f"{100 * self.page_sparsity:.1f}% of pages freed ({self.pages_freed:,} of {self.n_pages:,}); "
                f"{self.pages_shared:,} pages hold masked rows but stay (shared with kept data); "
                f"{self.pages_present:,} pages resident in this process ({self.pages_private:,} private), "
                f"{self.pages_cached:,} in the page cache")


class RowController:
    """Row-level control of the physical memory behind one mapped tensor.

    Get one with :func:`rows`, which returns the same controller for the same
    rows of the same mapping (the mapping keeps it), so two callers never
    disagree about which rows are masked.

    Example:
        >>> emb = model.get_input_embeddings().weight          # doctest: +SKIP
        >>> ctl = sparsemap.rows(emb)
        >>> ctl.mask(range(1000, 50000))    # rows read as zeros; their pages are freed now
        >>> print(ctl.residency())
        >>> ctl.restore(range(1000, 50000)) # the file's values again
    """

    def __init__(self, tensor: torch.Tensor, mapping: FileMapping, *, name: str | None = None,
                 row_span: int | None = None, key: tuple[int, ...] = ()) -> None:
        self.name = name
        self.key = key  # the view geometry the mapping knows this controller by
        if tensor.device.type != "cpu" or tensor.dim() == 0:
            raise RowError("needs a CPU tensor with at least one dimension", tensor=name)
        # Weak: the mapping keeps this controller, and a strong reference back would make a cycle
        # that keeps the file mapped until the garbage collector runs.
        self._mapping = weakref.ref(mapping)
        self.path = mapping.path
        mapping_address = mapping.address
        itemsize = tensor.element_size()
        shape, strides = tuple(tensor.shape), tuple(tensor.stride())
        expected = 1
        for d, s in zip(reversed(shape[1:]), reversed(strides[1:]), strict=True):
            if d != 1 and s != expected:
                raise RowError(f"each row must be contiguous; shape {shape} has strides {strides}",
                               tensor=name)
            expected *= d
        self.n_rows = shape[0]
        self.row_nbytes = expected * itemsize
        self.row_stride = strides[0] * itemsize if self.n_rows > 1 else self.row_nbytes
        if self.n_rows > 1 and self.row_stride < self.row_nbytes:
            raise RowError(f"rows overlap (stride {self.row_stride} bytes < row {self.row_nbytes} bytes)",
                           tensor=name)
        # Bytes each row owns from its start: its data, plus padding when the layout says so.
        self.row_span = row_span if row_span is not None else self.row_nbytes
        if not self.row_nbytes <= self.row_span <= max(self.row_stride, self.row_nbytes):
            raise RowError(f"row span {self.row_span} must lie between the row's {self.row_nbytes} bytes and "
                           f"its stride {self.row_stride}", tensor=name)
        self.address = tensor.data_ptr()  # first byte of row 0
        self.end = self.address + (self.n_rows - 1) * self.row_stride + self.row_span
        self.file_offset = self.address - mapping_address
        self.page_first = self.address // PAGE_SIZE * PAGE_SIZE
        n_pages = -(-(self.end - self.page_first) // PAGE_SIZE)
        self.n_pages = n_pages
        page_start = self.page_first + np.arange(n_pages, dtype=np.int64) * PAGE_SIZE  # (n_pages,)
        last_byte = page_start + PAGE_SIZE - 1 - self.address  # (n_pages,) relative to row 0
        first_byte = page_start - self.address
        stride, span = max(self.row_stride, 1), self.row_span
        # Rows whose owned bytes [a_r, a_r + span) overlap each page: [lo, hi).
        self._page_row_lo = np.clip((first_byte - span) // stride + 1, 0, self.n_rows)
        self._page_row_hi = np.clip(last_byte // stride + 1, 0, self.n_rows)
        # Pages made wholly of owned bytes: the only ones that may be freed or remapped.
        if span >= stride:  # owned bytes tile [address, end)
            self._page_owned = (first_byte >= 0) & (page_start + PAGE_SIZE <= self.end)
        else:  # gaps between rows are not ours: a page must lie inside one row
            row = first_byte // stride
            self._page_owned = ((first_byte >= 0) & (last_byte // stride == row)
                                & (last_byte - row * stride < span) & (row < self.n_rows))
        self._masked = np.zeros(self.n_rows, dtype=bool)
        # The mapping's lock, not one of our own: operations through two views of the same pages
        # must not interleave. (The lock holds no reference to the mapping.)
        self._lock = mapping.lock

    @property
    def mapping(self) -> FileMapping:
        """The mapping the rows live in; :class:`NotMappedError` once it is gone."""
        mm = self._mapping()
        if mm is None:
            raise NotMappedError("the file mapping these rows lived in was released (every view of it and "
                                 "its checkpoint are gone); get the controller of a live tensor with "
                                 "sparsemap.rows()", path=self.path, tensor=self.name)
        return mm

    # ------------------------------------------------------------ other views of the same bytes

    def _owned_intervals(self) -> tuple[np.ndarray, np.ndarray]:
        """(starts, ends) of the bytes this view's rows own, sorted and disjoint."""
        if self.row_span >= self.row_stride or self.n_rows == 1:
            return np.array([self.address]), np.array([self.end])
        starts = self.address + np.arange(self.n_rows, dtype=np.int64) * self.row_stride  # (n_rows,)
        return starts, starts + self.row_span

    def shares_bytes_with(self, other: RowController) -> bool:
        """Whether some byte is owned by rows of both views (the parts of a bundle share none)."""
        if self.end <= other.address or other.end <= self.address:
            return False
        a_start, a_end = self._owned_intervals()
        b_start, b_end = other._owned_intervals()
        first = np.searchsorted(a_end, b_start, side="right")  # first interval of ours ending after each
        inside = first < a_start.size
        return bool(np.any(a_start[first[inside]] < b_end[inside]))

    def _refuse_if_another_view_masks(self, mm: FileMapping, op: str) -> None:
        for other in list(mm.row_state.values()):
            if other is not self and other.shares_bytes_with(self):
                masked = np.flatnonzero(other._masked)
                raise RowError(
                    f"cannot {op} rows through this view ({self.n_rows} rows, {self.row_stride} bytes apart, "
                    f"at byte {self.file_offset} of the file): {masked.size} rows of another view of the "
                    f"same bytes ({other.n_rows} rows, {other.row_stride} bytes apart, at byte "
                    f"{other.file_offset}; rows {int(masked[0])}..{int(masked[-1])}) are masked. Mask, "
                    "restore and evict them through that view, or restore them first",
                    path=self.path, tensor=self.name)

    def _keep_state(self, mm: FileMapping) -> None:
        """Have the mapping hold this controller while it has masked rows (and let go once none are)."""
        if self._masked.any():
            mm.row_state[self.key] = self
        else:
            mm.row_state.pop(self.key, None)

    # ------------------------------------------------------------ row and page sets

    def _rows(self, rows: Rows) -> np.ndarray:
        if isinstance(rows, slice):
            idx = np.arange(self.n_rows)[rows]
        elif isinstance(rows, torch.Tensor):
            idx = rows.detach().cpu().numpy()
        else:
            idx = np.asarray(list(rows) if not isinstance(rows, (np.ndarray, range, int)) else rows)
        idx = np.atleast_1d(idx)
        if idx.dtype == bool:
            if idx.shape != (self.n_rows,):
                raise RowError(f"a boolean row mask needs {self.n_rows} entries, got {idx.shape[0]}",
                               tensor=self.name)
            return np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False)
        bad = idx[(idx < -self.n_rows) | (idx >= self.n_rows)]
        if bad.size:
            raise RowError(f"row {int(bad[0])} is out of range for {self.n_rows} rows", tensor=self.name)
        return np.unique(idx % self.n_rows)

    def _slot_pages(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """First and last page index (into this tensor's pages) of the bytes each row owns."""
        start = self.address + rows * self.row_stride
        return ((start - self.page_first) // PAGE_SIZE,
                (start + self.row_span - 1 - self.page_first) // PAGE_SIZE)

    def _pages_touched(self, rows: np.ndarray) -> np.ndarray:
        """(n_pages,) bool: pages that any of ``rows``' slots touch."""
        delta = np.zeros(self.n_pages + 1, dtype=np.int64)
        if rows.size:
            first, last = self._slot_pages(rows)
            np.add.at(delta, first, 1)
            np.add.at(delta, last + 1, -1)
        return np.cumsum(delta[:-1]) > 0

    def _rows_in_pages(self, selected: np.ndarray) -> np.ndarray:
        """(n_pages,) count of ``selected`` rows (a bool per row) whose slots touch each page."""
        cum = np.concatenate(([0], np.cumsum(selected, dtype=np.int64)))
        return cum[self._page_row_hi] - cum[self._page_row_lo]

    def _freeable(self) -> np.ndarray:
        """(n_pages,) pages made wholly of bytes owned by masked rows."""
        n_on_page = self._page_row_hi - self._page_row_lo
        return self._page_owned & (self._rows_in_pages(self._masked) == n_on_page)

    def _page_addr(self, page: int) -> int:
        return self.page_first + page * PAGE_SIZE

    def _segments_outside(self, rows: np.ndarray, pages_mask: np.ndarray) -> list[tuple[int, int]]:
        """Byte ranges ``(address, nbytes)`` of ``rows`` that lie on pages NOT in ``pages_mask``.

        A row's interior pages lie wholly inside it, so only its first and last
        pages can be shared: at most two segments per row.
        """
        out = []
        first, last = self._slot_pages(rows)
        # Only rows with a page outside the set need work; in a padded layout, none.
        cum_out = np.concatenate(([0], np.cumsum(~pages_mask, dtype=np.int64)))
        has_out = (cum_out[last + 1] - cum_out[first]) > 0
        rows, first, last = rows[has_out], first[has_out], last[has_out]
        for r, f, last_page in zip(rows.tolist(), first.tolist(), last.tolist(), strict=True):
            s = self.address + r * self.row_stride
            e = s + self.row_nbytes
            if f == last_page:
                if not pages_mask[f]:
                    out.append((s, e - s))
                continue
            if not pages_mask[f]:
                head_end = self._page_addr(f) + PAGE_SIZE
                out.append((s, min(e, head_end) - s))
            if not pages_mask[last_page]:
                tail_start = max(s, self._page_addr(last_page))
                if e > tail_start:
                    out.append((tail_start, e - tail_start))
            # interior pages f+1 .. last-1 lie inside this row's slot: handled page-wise by callers
            for p in range(f + 1, last_page):
                if not pages_mask[p]:
                    a = self._page_addr(p)
                    out.append((max(s, a), min(e, a + PAGE_SIZE) - max(s, a)))
        return [(a, n) for a, n in out if n > 0]

    def _strict_check(self, rows: np.ndarray, op: str) -> None:
        touched = self._pages_touched(rows)
        selected = np.zeros(self.n_rows, dtype=bool)
        selected[rows] = True
        sole = self._page_owned & (self._rows_in_pages(selected | self._masked)
                                    == self._page_row_hi - self._page_row_lo)
        stuck = int((touched & ~sole).sum())
        if stuck:
            raise RowAlignmentError(
                f"cannot {op} {rows.size} rows without keeping {stuck} shared pages: rows are "
                f"{self.row_nbytes} bytes, {self.row_stride} apart, starting at byte {self.file_offset} of "
                f"the file ({self.file_offset % PAGE_SIZE} past a {PAGE_SIZE}-byte page). "
                f"Write a layout where each row owns whole pages with "
                f"`sparsemap convert SRC DST --pad-rows '{self.name or 'NAME'}'`",
                path=self.path, tensor=self.name)

    # ------------------------------------------------------------ operations

    def mask(self, rows: Rows, *, strict: bool = False) -> int:
        """Make ``rows`` read as zeros; free the pages that hold nothing else, at once.

        Args:
            rows: row indices (ints, a slice, a range, a bool mask over rows).
            strict: raise :class:`RowAlignmentError` rather than keep shared pages.

        Returns:
            Pages freed by this call.
        """
        idx = self._rows(rows)
        with self._lock:
            mm = self.mapping  # held for the operation: the pages below are its own
            mm.check_unchanged()  # zeroing edge pages faults them in from the file first
            self._refuse_if_another_view_masks(mm, "mask")
            if strict:
                self._strict_check(idx, "mask")
            new = idx[~self._masked[idx]]
            if new.size == 0:
                return 0
            before = self._freeable()
            self._masked[new] = True
            self._keep_state(mm)
            after = self._freeable()
            newly_freed = after & ~before
            for first, stop in pages.runs(newly_freed):
                pages.map_anonymous_over(self._page_addr(first), (stop - first) * PAGE_SIZE)
            # Masked bytes on pages that stay are zeroed by writing (copy-on-write).
            for addr, nbytes in self._segments_outside(new, after):
                ctypes.memset(addr, 0, nbytes)
            return int(newly_freed.sum())

    def restore(self, rows: Rows) -> int:
        """Give masked ``rows`` their file values again; returns pages mapped back from the file."""
        idx = self._rows(rows)
        with self._lock:
            mm = self.mapping  # held for the operation: the pages below are its own
            mm.check_unchanged()  # pages come back from the file: it must be the one mapped
            back = idx[self._masked[idx]]
            if back.size == 0:
                return 0
            self._masked[back] = False
            self._keep_state(mm)
            touched = self._pages_touched(back)
            clean = touched & self._page_owned & (self._rows_in_pages(self._masked) == 0)
            for first, stop in pages.runs(clean):
                addr = self._page_addr(first)
                pages.map_file_over(addr, (stop - first) * PAGE_SIZE, mm.fd, addr - mm.address)
            # Pages that still hold masked rows (or neighbours) get the restored bytes copied in.
            for addr, nbytes in self._segments_outside(back, clean):
                buf = (ctypes.c_char * nbytes).from_address(addr)
                got = os.preadv(mm.fd, [memoryview(buf).cast("B")], addr - mm.address)
                if got != nbytes:
                    raise OSError(f"{mm.path}: short read restoring {nbytes} bytes at "
                                  f"{addr - mm.address} (got {got}; was the file truncated?)")
            return int(clean.sum())

    def evict(self, rows: Rows, *, drop_cache: bool = False, strict: bool = False) -> int:
        """Release the pages wholly inside ``rows``; their data faults back from the file on next touch.

        Args:
            rows: row indices.
            drop_cache: also drop those pages from the page cache (``POSIX_FADV_DONTNEED``),
                so the next touch reads the disk.
            strict: raise :class:`RowAlignmentError` rather than skip shared pages.

        Returns:
            Pages released.
        """
        idx = self._rows(rows)
        with self._lock:
            mm = self.mapping
            mm.check_unchanged()  # released pages fault back from the file
            self._refuse_if_another_view_masks(mm, "evict")
            if strict:
                self._strict_check(idx, "evict")
            selected = np.zeros(self.n_rows, dtype=bool)
            selected[idx] = True
            on_page = self._page_row_hi - self._page_row_lo
            wholly = self._page_owned & (self._rows_in_pages(selected) == on_page)
            # A page with masked and unmasked rows is a private copy holding zeros:
            # releasing it would bring the masked rows' file values back.
            n_masked = self._rows_in_pages(self._masked)
            releasable = wholly & ((n_masked == 0) | (n_masked == on_page))
            for first, stop in pages.runs(releasable):
                addr = self._page_addr(first)
                nbytes = (stop - first) * PAGE_SIZE
                pages.release(addr, nbytes)
                if drop_cache:
                    pages.drop_cache(mm.fd, addr - mm.address, nbytes)
            return int(releasable.sum())

    def prefetch(self, rows: Rows) -> None:
        """Ask the kernel to read ``rows`` ahead (``MADV_WILLNEED``); returns at once."""
        idx = self._rows(rows)
        with self._lock:
            mm = self.mapping  # held for the operation (raises if it is gone)
            mm.check_unchanged()
            wanted = self._pages_touched(idx) & ~self._freeable()
            for first, stop in pages.runs(wanted):
                pages.will_need(self._page_addr(first), (stop - first) * PAGE_SIZE)

    @property
    def masked(self) -> np.ndarray:
        """(n_rows,) bool: which rows are masked (a copy)."""
        with self._lock:
            return self._masked.copy()

    def residency(self) -> Residency:
        """Row and page residency now: in this process (pagemap) and in the page cache (mincore)."""
        with self._lock:
            mm = self.mapping  # held while its pages are read (raises if it is gone)
            nbytes = self.n_pages * PAGE_SIZE
            assert mm.address <= self.address < mm.end
            entries = pages.pagemap(self.page_first, nbytes)
            present = (entries & np.uint64(1 << 63)) != 0
            private = present & ((entries & np.uint64(1 << 61)) == 0)
            cached = pages.in_page_cache(self.page_first, nbytes)
            freed = self._freeable()
            holds_masked = self._rows_in_pages(self._masked) > 0
            all_rows = np.arange(self.n_rows)
            first, last = self._slot_pages(all_rows)
            return Residency(
                n_rows=self.n_rows, rows_masked=int(self._masked.sum()), n_pages=self.n_pages,
                pages_freed=int(freed.sum()), pages_shared=int((holds_masked & ~freed).sum()),
                pages_present=int(present.sum()), pages_private=int(private.sum()),
                pages_cached=int(cached.sum()),
                row_present=_fraction(present, first, last), row_cached=_fraction(cached, first, last))


def _fraction(per_page: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
    cum = np.concatenate(([0], np.cumsum(per_page, dtype=np.int64)))
    return (cum[last + 1] - cum[first]) / (last - first + 1)


def rows(tensor: torch.Tensor | Checkpoint, name: str | None = None) -> RowController:
    """The row controller of a mapped tensor: the same one for the same rows of the same mapping.

    The file mapping keeps a controller that has masked rows for as long as
    the mapping lives: calling ``rows(t)`` again, without keeping the first
    controller, finds the same state. Another view of the same bytes with
    another geometry (``t[:32]``) gets its own controller, which refuses to
    mask, restore or evict while this one has masked rows.

    A view of rows padded by the layout compiler (``convert --pad-rows``) owns
    its padding, so whole padded slots are freed; any other strided view owns
    only its rows' bytes.

    Args:
        tensor: a view of a file sparsemap mapped (a parameter of a loaded
            model, a tensor a :class:`~sparsemap.Checkpoint` served), or a
            checkpoint, with ``name`` naming its tensor. A tensor stored with
            reordered rows is controlled in stored order.
        name: the tensor's name, for messages (required with a checkpoint).

    Raises:
        NotMappedError: the tensor is not a view of a file sparsemap mapped.
        RowError: its rows are not contiguous, or overlap.

    Example:
        >>> sparsemap.rows(model.embed.weight).mask(range(1000, 50000))    # doctest: +SKIP
        >>> sparsemap.rows(model.embed.weight).restore(range(1000, 50000))  # the same controller
    """
    if isinstance(tensor, Checkpoint):
        if name is None:
            raise RowError("name the checkpoint's tensor: rows(checkpoint, 'embed.weight')",
                           path=tensor.source)
        tensor = tensor.tensor(name, stored_order=True)
    mm = mapping_of(tensor, name)
    span = mm.row_span(tensor)
    key = (tensor.data_ptr(), tensor.shape[0] if tensor.dim() else 0, tensor.stride(0) if tensor.dim() else 0,
           tensor.numel(), tensor.element_size(), span or 0)
    with mm.lock:
        ctl = mm.row_state.get(key) or mm.row_controllers.get(key)
        if ctl is None:
            ctl = RowController(tensor, mm, name=name, row_span=span, key=key)
            mm.row_controllers[key] = ctl
        return ctl  # type: ignore[no-any-return]
