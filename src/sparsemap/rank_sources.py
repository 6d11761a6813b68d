"""Where each rank of a tensor-parallel load takes its tensors from, and how it reads their pages.

:func:`open_for_rank` decides, from headers only (nothing is mapped, and a refusal is the same on every rank):

* :class:`WholeTensors`, for any checkpoint sparsemap opens: each split tensor narrowed to the rank's slice
  (:func:`narrowed`), a view of the mapping: contiguous rows for a split on dim 0, a strided view for one on
  dim 1;
* :class:`RankFiles`, for Meta's release in ``N`` files (``consolidated.00.pth`` ...), which already are the
  ranks' slices, on ``N`` ranks: rank ``i`` maps file ``i`` and no other.

Both give ``(name, tensor)`` through ``parts(wanted)``, ``wanted`` being each name's split dimension for this
rank. :func:`read_ahead` reads a view's pages and no others: the mapping advised ``MADV_RANDOM`` (the kernel's
read-around on a fault would read the neighbouring ranks' slices), the view's page runs (:func:`page_runs`)
asked for with ``MADV_WILLNEED`` in pieces the kernel reads whole. :mod:`sparsemap.parallel` plans the split
and wraps what these serve in ``DTensor`` s.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Iterator, Mapping
from typing import Protocol

import numpy as np
import torch

from . import pages
from .checkpoint import Checkpoint, inverse_order, logical
from .checkpoint import Source as CheckpointSource
from .errors import TensorParallelError
from .formats.catalog import Catalog, TensorEntry
from .formats.meta_llama import Release, read_release
from .formats.source import ModelSource, resolve_source
from .mapped import mapping_or_none

logger = logging.getLogger("sparsemap")

MADV_RANDOM = getattr(mmap, "MADV_RANDOM", 1)
# The kernel reads at most max(read_ahead_kb, the device's largest request) per MADV_WILLNEED
# (force_page_cache_ra clamps it, silently): 128 KiB on a default device. Asked for more in one call, it reads
# the first part only (8 MiB of a 1 GiB slice here, measured), so slices are asked for in pieces this big.
WILLNEED_NBYTES = 128 << 10
# How many joined tensors the log line names.
_JOINED_SHOWN = 3


def narrowed(full: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s part of ``full`` split ``size`` ways along ``dim``: a view (``prepare`` checked that
    ``size`` divides it)."""
    n = full.shape[dim] // size
    return full.narrow(dim, rank * n, n)


class RankSource(Protocol):
    """Where one rank takes its tensors from: what :func:`open_for_rank` gives."""

    @property
    def catalog(self) -> Catalog:
        """The model's tensors, whole (names, shapes, dtypes), to match the model against."""

    @property
    def source(self) -> str:
        """The checkpoint, for messages."""

    def parts(self, wanted: Mapping[str, int | None], *, reads: bool,
              keep_quantized: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for each of ``wanted`` (name -> the dimension this rank's slice is split on,
        ``None``: the whole tensor)."""


class WholeTensors:
    """A checkpoint of whole tensors (any format sparsemap opens): each rank narrows every split tensor to its
    slice, a view of the mapping (contiguous rows for a split on dim 0, strided for one on dim 1).

    A tensor stored with its rows in another order (q and k of a GGUF, a llama2.c file or Meta's release in
    one file: rotary pairs within each head) is sliced first and reordered after, where the rank's stored
    rows are exactly its logical ones (a permutation within heads, and heads split whole): a copy of the
    slice only, read from the rank's pages only. Any other order is put back whole, then sliced.
    """

    def __init__(self, ckpt: Checkpoint, rank: int, size: int) -> None:
        self.ckpt, self.rank, self.size = ckpt, rank, size
        self._advised: set[str] = set()  # the files advised MADV_RANDOM

    @property
    def catalog(self) -> Catalog:
        return self.ckpt.catalog

    @property
    def source(self) -> str:
        return self.ckpt.source

    def parts(self, wanted: Mapping[str, int | None], *, reads: bool,
              keep_quantized: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for each of ``wanted`` (name -> the dimension this rank's slice is split on,
        ``None``: the whole tensor, weights kept quantized as they are)."""
        whole = [name for name, dim in wanted.items() if dim is None]
        yield from self.ckpt.tensors(whole, reads=reads, keep_quantized=keep_quantized)
        # A split weight stored quantized is dequantized whole, then sliced.
        split = [name for name, dim in wanted.items() if dim is not None]
        for name, stored in self.ckpt.tensors(split, reads=reads, stored_order=True):
            dim = wanted[name]
            assert dim is not None
            entry = self.catalog[name]
            if entry.order is not None:
                yield name, self._reordered_slice(entry, stored, dim)
                continue
            local = narrowed(stored, dim, self.rank, self.size)
            yield name, local if self.ckpt.owns(stored) else local.clone()  # the full copy goes now

    def _reordered_slice(self, entry: TensorEntry, stored: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's slice along ``dim`` of ``stored`` (in ``entry.order``) in logical order: a copy."""
        n = stored.shape[dim] // self.size
        lo = self.rank * n
        block = entry.order[lo:lo + n] if entry.order is not None and entry.order_dim == dim else ()
        if sorted(block) == list(range(lo, lo + n)):  # its stored rows are its logical rows, permuted
            read_ahead(stored.narrow(dim, lo, n), self._advised)  # not page by page
            return stored.narrow(dim, lo, n).index_select(dim, inverse_order(tuple(i - lo for i in block)))
        whole = stored.index_select(entry.order_dim, inverse_order(entry.order))  # type: ignore[arg-type]
        return narrowed(whole, dim, self.rank, self.size).clone()  # the whole copy goes now


class RankFiles:
    """A checkpoint whose files already are the ranks' slices: Meta's release in ``N`` files
    (``consolidated.00.pth`` ...) on ``N`` ranks, rank ``i`` mapping file ``i``.

    Each tensor, as the plan and the files split it:

    * along the same dimension (the colwise q, k, v, gate, up and the head by rows; the rowwise o and down by
      columns; the embedding as the release splits it: by rows in Llama 3, which transformers' plan splits
      the same way): file ``i``'s tensor, a view of its mapping. q and k are copies of file ``i``'s part
      with their rows in transformers' rotary order, as a release in one file serves them: the permutation
      stays within each head and every file holds whole heads, so it is rank ``i``'s slice of the permuted
      whole;
    * whole in every file (the norms): file ``i``'s own copy (narrowed, should the plan split it);
    * split by the files otherwise than the plan splits it (replicated, or along the other dimension: Llama
      1 and 2's embedding, split by columns, under transformers' plan, which splits the vocabulary): joined
      from every file's part, a copy of what this rank holds of that tensor (its slice: the same bytes, read
      from every file; or the whole, replicated), logged. Joining is what loading the converted folder would
      give; refusing would leave ``sparsemap convert`` (a copy of everything) as the only way. A plan that
      splits as the files do (``{"model.embed_tokens": "embedding_colwise"}`` for Llama 1 and 2) maps file
      ``i`` only.
    """

    def __init__(self, release: Release, rank: int) -> None:
        self.release, self.rank, self.size = release, rank, len(release.ranks)
        self.files = Checkpoint(release.ranks[rank])  # mapped on first use
        self.catalog = release.whole_catalog()
        self._advised: set[str] = set()  # the files advised MADV_RANDOM

    @property
    def source(self) -> str:
        return self.release.folder

    def parts(self, wanted: Mapping[str, int | None], *, reads: bool,
              keep_quantized: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for each of ``wanted`` (name -> the dimension this rank's slice is split on,
        ``None``: the whole tensor)."""
        split_dims = self.release.split_dims
        own: dict[str, int | None] = {}  # what file i holds: the dimension its tensor is still to be split on
        joined: dict[str, int | None] = {}
        for name, dim in wanted.items():
            files_dim = split_dims[name]
            if files_dim is None:
                own[name] = dim
            elif files_dim == dim:
                own[name] = None
            else:
                joined[name] = dim
        for name, t in self.files.tensors(own, reads=reads, stored_order=True):
            t = self._logical(self.files, name, t)
            dim = own[name]
            yield name, t if dim is None else narrowed(t, dim, self.rank, self.size)
        if not joined:
            return
        others = [self.files if j == self.rank else Checkpoint(c) for j, c in enumerate(self.release.ranks)]
        copied = 0
        try:
            for name, dim in joined.items():
                t = self._joined(name, dim, others)
                copied += t.numel() * t.element_size()
                yield name, t
        finally:
            for j, ckpt in enumerate(others):
                if j != self.rank:
                    ckpt.close()  # nothing served from them is kept: their mappings go
        shown = ", ".join(f"{name} ({_split_words(split_dims[name])} in the files, "
                          f"{_split_words(dim)} by the plan)"
                          for name, dim in list(joined.items())[:_JOINED_SHOWN])
        logger.info("%s: rank %d joined %d tensors from the %d files (%.1f MiB copied), split by the plan "
                    "otherwise than by the files: %s", self.release.folder, self.rank, len(joined), self.size,
                    copied / (1 << 20), shown)

    def _joined(self, name: str, dim: int | None, files: list[Checkpoint]) -> torch.Tensor:
        """Rank ``rank``'s part of tensor ``name`` split along ``dim`` (``None``: whole), gathered from every
        file's part: the files split it along another dimension, so the slice along ``dim`` of each part is a
        piece of it."""
        files_dim = self.release.split_dims[name]
        assert files_dim is not None and files_dim != dim
        shape = list(self.catalog[name].shape)
        if dim is not None:
            shape[dim] //= self.size
        out: torch.Tensor | None = None
        for j, ckpt in enumerate(files):
            part = self._logical(ckpt, name, ckpt.tensor(name, stored_order=True))
            piece = part if dim is None else narrowed(part, dim, self.rank, self.size)
            if out is None:
                out = torch.empty(shape, dtype=piece.dtype)
            read_ahead(piece, self._advised)  # this piece's pages only
            step = piece.shape[files_dim]
            out.narrow(files_dim, j * step, step).copy_(piece)
        assert out is not None
        return out

    def _logical(self, ckpt: Checkpoint, name: str, stored: torch.Tensor) -> torch.Tensor:
        """``stored`` (a view of ``ckpt``'s file) as the model holds it: q and k with their rows in
        transformers' order, a copy whose pages are read ahead first (under ``MADV_RANDOM`` each fault
        would read one page); every other tensor as it is."""
        entry = ckpt.catalog[name]
        if entry.order is None:
            return stored
        read_ahead(stored, self._advised)
        return logical(entry, stored)


def _split_words(dim: int | None) -> str:
    return "whole" if dim is None else f"split on dim {dim}"


def open_for_rank(source: Checkpoint | CheckpointSource, rank: int, size: int) -> WholeTensors | RankFiles:
    """Where rank ``rank`` of ``size`` takes its tensors from: :class:`RankFiles` for a Meta release in
    several files, :class:`WholeTensors` for any other checkpoint. Reads headers only, nothing is mapped.

    Raises:
        TensorParallelError: a Meta release whose number of files is not the world size (the same on every
            rank).
    """
    if isinstance(source, Checkpoint):
        return WholeTensors(source, rank, size)
    if isinstance(source, Catalog):
        return WholeTensors(Checkpoint(source), rank, size)
    src = source if isinstance(source, ModelSource) else resolve_source(source)
    if src.format != "meta-llama":
        return WholeTensors(Checkpoint(src), rank, size)
    release = read_release(src)
    n = len(release.ranks)
    if n == 1:
        return WholeTensors(Checkpoint(release.ranks[0]), rank, size)
    if n != size:
        first, last = (os.path.basename(c.source) for c in (release.ranks[0], release.ranks[-1]))
        raise TensorParallelError(f"a Meta release in {n} model-parallel files ({first} ... {last}) loads on "
                                  f"{n} ranks, rank i mapping file i, not on {size}: run {n} (torchrun "
                                  f"--nproc-per-node {n}), or join the files once with `sparsemap convert "
                                  f"{release.folder} OUT/` and load OUT/ on any number", path=release.folder)
    return RankFiles(release, rank)


def read_ahead(view: torch.Tensor, advised: set[str]) -> None:
    """Advise the mapping ``view`` lies in ``MADV_RANDOM`` (once: ``advised`` holds the paths done) and read
    the pages of ``view`` ahead (``MADV_WILLNEED``), in pieces the kernel reads whole; nothing for a tensor
    that is not a view of a mapping (a copy)."""
    mm = mapping_or_none(view)
    if mm is None:
        return
    if mm.path not in advised:
        pages.madvise(mm.address, len(mm), MADV_RANDOM)
        advised.add(mm.path)
    for start, end in page_runs(view):
        for piece in range(start, end, WILLNEED_NBYTES):
            pages.will_need(piece, min(WILLNEED_NBYTES, end - piece))


# ---------------------------------------------------------------- pages

def page_runs(t: torch.Tensor) -> list[tuple[int, int]]:
    """``[(start, end), ...]``: the page-aligned address ranges holding ``t``'s elements, merged, in
    order.

    One range for a dense view (a colwise slice, a transposed rowwise one); one per stretch of rows that
    share or touch pages for a strided one (a rowwise slice of a row-major weight).
    """
    if t.numel() == 0:
        return []
    page = pages.PAGE_SIZE
    itemsize = t.element_size()
    dims = sorted((stride, n) for n, stride in zip(t.shape, t.stride(), strict=True) if n > 1)
    block = 1  # elements in the dense innermost block
    i = 0
    while i < len(dims) and dims[i][0] == block:
        block *= dims[i][1]
        i += 1
    offsets = np.zeros(1, dtype=np.int64)  # (n_blocks,) element offsets of each block
    for stride, n in dims[i:]:
        offsets = (offsets[:, None] + np.arange(n, dtype=np.int64) * stride).ravel()
    starts = t.data_ptr() + np.sort(offsets) * itemsize
    first = starts // page
    last = (starts + block * itemsize - 1) // page
    reach = np.maximum.accumulate(last)
    new = np.ones(len(first), dtype=bool)
    new[1:] = first[1:] > reach[:-1] + 1  # a gap of a whole page or more starts a new run
    begin = np.flatnonzero(new)
    end = np.append(begin[1:], len(first)) - 1
    return [(int(first[b]) * page, (int(reach[e]) + 1) * page) for b, e in zip(begin, end, strict=True)]


__all__ = ["MADV_RANDOM", "WILLNEED_NBYTES", "RankFiles", "RankSource", "WholeTensors", "narrowed",
           "open_for_rank", "page_runs", "read_ahead"]
