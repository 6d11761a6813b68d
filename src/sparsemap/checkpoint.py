"""The torch side of a checkpoint: its files mapped, its tensors served as views.

A :class:`~sparsemap.formats.catalog.Catalog` says where every tensor's bytes
are and imports no torch. A :class:`Checkpoint` is what reads them: it maps
each file on first use (one copy-on-write mapping per file, see
:mod:`sparsemap.mapped`) and serves each tensor as a zero-copy view of it.
Every consumer of tensor data (loading, converting, streaming, sparse rows)
takes a Checkpoint, or anything :meth:`Checkpoint.of` turns into one: a path,
a catalog. That is the one place a source is normalised.

Copies happen only where a view cannot serve: quantized data asked for as
floats (dequantized; :meth:`Checkpoint.quantized` serves a weight kept
quantized as zero-copy views of its parts), data whose offset is not a
multiple of its element size, and rows a usage profile reordered, put back in
logical order (unless ``stored_order=True``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from .formats.catalog import Catalog, TensorEntry
from .formats.dispatch import open_catalog
from .formats.source import ModelSource
from .mapped import FileMapping, map_file, release_pages, torch_dtype

Source = str | os.PathLike[str] | ModelSource | Catalog


class Checkpoint(Mapping[str, torch.Tensor]):
    """A checkpoint's files, mapped on first use, and its tensors as zero-copy views.

    A lazy state dict: ``ckpt[name]`` is ``ckpt.tensor(name)``, so
    ``model.load_state_dict(ckpt, assign=True)`` works as with a dict (the
    entries, offsets and dtypes are in ``ckpt.catalog``). Owns its mappings
    (each mapping owns the row state of its tensors). Views keep their mapping
    alive on their own, so a tensor outlives the checkpoint that served it.
    Thread-safe.

    Args:
        source: a checkpoint path (anything :func:`sparsemap.open` reads), a
            resolved :class:`~sparsemap.formats.source.ModelSource`, or a catalog.

    Example:
        >>> ckpt = sparsemap.Checkpoint("model.safetensors")      # doctest: +SKIP
        >>> w = ckpt.tensor("embed.weight")                        # a view of the mapped file
        >>> ckpt.catalog["embed.weight"].offset
        8192
        >>> model.load_state_dict(ckpt, assign=True)               # every tensor, zero-copy
    """

    def __init__(self, source: Source) -> None:
        self.catalog: Catalog = source if isinstance(source, Catalog) else open_catalog(source)
        self._required = self.catalog.required_nbytes()
        self._maps: dict[str, FileMapping | None] = {}
        self._lock = threading.Lock()

    @classmethod
    def of(cls, source: Source | Checkpoint) -> Checkpoint:
        """``source`` itself if it is a Checkpoint, else a new one over it."""
        return source if isinstance(source, Checkpoint) else cls(source)

    def __repr__(self) -> str:
        return f"Checkpoint({self.catalog!r}, mapped={len(self.mapped_ranges())} of {len(self.files)} files)"

    def close(self) -> None:
        """Let go of this checkpoint's mappings; views already served keep theirs alive (and stay valid).

        A file is unmapped when nothing refers to its mapping any more. Serving
        a tensor after ``close()`` maps the file again (a new mapping), and
        :meth:`owns` and :meth:`release` then know only the mappings made after.
        """
        with self._lock:
            self._maps.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ the catalog's names

    @property
    def source(self) -> str:
        return self.catalog.source

    @property
    def format(self) -> str:
        return self.catalog.format

    @property
    def files(self) -> list[str]:
        return self.catalog.files

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensor(name)

    # A resource owner: equal only to itself (the Mapping default would compare every tensor).
    def __eq__(self, other: object) -> bool:
        return self is other

    def __hash__(self) -> int:
        return id(self)

    def __iter__(self) -> Iterator[str]:
        return iter(self.catalog)

    def __len__(self) -> int:
        return len(self.catalog)

    def __contains__(self, name: object) -> bool:
        return name in self.catalog

    # ------------------------------------------------------------ mappings

    def mapping(self, path: str) -> FileMapping | None:
        """The mapping of ``path`` (made now if it is the first use); ``None`` for an empty file."""
        with self._lock:
            if path not in self._maps:
                self._maps[path] = map_file(path, self._required.get(path, 0), self.catalog.stamps.get(path))
            return self._maps[path]

    def mapped_ranges(self) -> dict[str, tuple[int, int]]:
        """``{file: (address, nbytes)}`` of each mapping made so far."""
        with self._lock:
            return {path: (mm.address, len(mm)) for path, mm in self._maps.items() if mm is not None}

    def owns(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s data lies inside one of this checkpoint's mappings (i.e. it is zero-copy)."""
        ptr = t.data_ptr()
        return t.device.type == "cpu" and any(base <= ptr < base + n
                                              for base, n in self.mapped_ranges().values())

    def release(self, t: torch.Tensor, *, drop_cache: bool = False) -> int:
        """Give back the pages of a view served here (they fault back from the file); bytes released."""
        return release_pages(t, drop_cache=drop_cache) if self.owns(t) else 0

    # ------------------------------------------------------------ tensors

    def tensor(self, name: str, *, stored_order: bool = False, keep_quantized: bool = False) -> torch.Tensor:
        """The tensor ``name``: a zero-copy view of the mapped file where possible.

        Checks first that its file is still the one parsed (a view of a
        truncated file is SIGBUS on first touch): one ``fstat``.

        Args:
            name: the tensor's name in the catalog.
            stored_order: for a tensor whose rows were reordered by a usage
                profile, return the zero-copy view in stored order (the
                entry's ``order`` maps it back) instead of a copy in logical order.
            keep_quantized: for a weight kept quantized (``name in catalog.quantized``),
                return a :class:`~sparsemap.qtensor.QuantizedTensor` over its
                mapped parts (matmuls run the int4/int8 kernels) instead of a
                dequantized float32 copy.

        Raises:
            KeyError: no such tensor.
            FileChangedError: its file was modified, truncated or replaced since it was parsed.
        """
        return self._serve(self.catalog[name], stored_order=stored_order, check=True,
                           keep_quantized=keep_quantized)

    def quantized(self, name: str) -> list[torch.Tensor]:
        """The stored parts of a weight kept quantized (see :mod:`sparsemap.formats.quantized`):
        zero-copy views, in the order ``catalog.quantized[name].parts`` lists them.

        Raises:
            KeyError: ``name`` is not a quantized weight of this checkpoint.
            FileChangedError: its file was modified, truncated or replaced since it was parsed.
        """
        weight = self.catalog.quantized[name]
        return [self._stored(part, check=i == 0) for i, part in enumerate(weight.parts)]

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as the file stores them: a zero-copy uint8 view, (nbytes,).

        What a quantized GGUF tensor is before it is dequantized (its blocks).
        """
        entry = self.catalog[name]
        if entry.nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        mm = self.mapping(entry.file)
        assert mm is not None
        mm.check_unchanged()
        return torch.frombuffer(mm, dtype=torch.uint8, count=entry.nbytes, offset=entry.offset)

    def tensors(self, names: Iterable[str] | None = None, *, stored_order: bool = False,
                reads: bool = False, keep_quantized: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for each of ``names`` (default: all), lazily, checking each file once.

        What loading uses. A view reads no page, so one ``fstat`` per file, when
        its first tensor is served, guards them all. A tensor whose pages are
        read while it is served (dequantized, misaligned, reordered) is checked
        on its own, and so is every tensor when ``reads`` says the caller reads
        each one right away (a cast, a copy to a device): a file truncated in
        the middle then raises :class:`~sparsemap.errors.FileChangedError` at
        the next tensor instead of faulting.
        """
        checked: set[str] = set()
        for name in self.catalog if names is None else names:
            entry = self.catalog[name]
            check = reads or entry.file not in checked or not entry.zero_copy
            if check and entry.numel:  # an empty tensor maps nothing, so it checks nothing
                checked.add(entry.file)
            yield name, self._serve(entry, stored_order=stored_order, check=check,
                                    keep_quantized=keep_quantized)

    def _serve(self, entry: TensorEntry, *, stored_order: bool, check: bool,
               keep_quantized: bool = False) -> torch.Tensor:
        # A weight whose rows are stored in another order (llama2.c's q and k) cannot be handed to the kernel
        # as its parts: it is served dequantized, in logical order.
        if keep_quantized and entry.name in self.catalog.quantized and entry.order is None:
            from .qtensor import QuantizedTensor

            return QuantizedTensor(self.catalog.quantized[entry.name], self.quantized(entry.name))
        return logical(entry, self._stored(entry, check=check), stored_order=stored_order)

    def _stored(self, entry: TensorEntry, *, check: bool) -> torch.Tensor:
        """The entry as stored: a view of the mapping (a copy if quantized or misaligned)."""
        dtype = torch_dtype(entry.dtype, path=entry.file, tensor=entry.name)
        if entry.numel == 0:
            # frombuffer refuses count=0; an empty tensor owns no bytes anyway.
            return torch.empty(entry.shape, dtype=dtype)
        mm = self.mapping(entry.file)
        assert mm is not None  # a non-empty tensor implies a non-empty file
        if check:
            mm.check_unchanged()
        if entry.name in self.catalog.quantized and entry.encoding is not None:
            from .quantize import dequantize

            return dequantize(self.catalog.quantized[entry.name], self.quantized(entry.name))
        if entry.encoding is not None:
            return _dequantize(mm, entry)
        flat = torch.frombuffer(mm, dtype=torch.uint8, count=entry.nbytes, offset=entry.offset)
        if entry.offset % dtype.itemsize != 0:
            flat = flat.clone()  # misaligned for this dtype; torch kernels assume alignment
        view = flat.view(dtype)
        view = (view.as_strided(entry.shape, entry.strides) if entry.strides is not None
                else view.view(entry.shape))
        if entry.row_span is not None:
            mm.record_row_span(view, entry.row_span)
        return view


def logical(entry: TensorEntry, values: torch.Tensor, *, stored_order: bool = False) -> torch.Tensor:
    """``values`` as stored put back as the model holds them: rows in logical order (a copy, unless
    ``stored_order``), the entry's ``shift`` added (a copy). The one place both readers (mapped
    views here, ``pread`` in the converter) undo what a writer did to a tensor's values."""
    if entry.order is not None and not stored_order:
        values = values.index_select(entry.order_dim, inverse_order(entry.order))
    return values + entry.shift if entry.shift else values


def inverse_order(order: tuple[int, ...]) -> torch.Tensor:
    """Stored slice ``k`` is logical slice ``order[k]``: the stored index of each logical one, (len,)."""
    inverse = torch.empty(len(order), dtype=torch.int64)
    inverse[torch.tensor(order, dtype=torch.int64)] = torch.arange(len(order))
    return inverse


def dequantize_gguf(raw: Any, entry: TensorEntry) -> torch.Tensor:
    """A GGUF tensor's blocks (``raw``: its bytes, a buffer or a uint8 array) as float32 in the entry's
    shape: a copy, decoded by the ``gguf`` package (llama2.c's Q8_0 by :mod:`sparsemap.quantize`)."""
    import numpy as np

    from .formats.quantized import LLAMA2C_Q8_0

    if entry.encoding == LLAMA2C_Q8_0:
        from .quantize import dequantize_flat_q8_0

        return dequantize_flat_q8_0(np.frombuffer(raw, dtype=np.uint8), entry.shape)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    blocks = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw
    qtype = GGMLQuantizationType[entry.encoding]  # type: ignore[misc]
    values = dequantize(blocks.reshape(-1), qtype)  # (numel,) float32
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).view(entry.shape)


def _dequantize(mm: FileMapping, entry: TensorEntry) -> torch.Tensor:
    """A quantized GGUF tensor of a mapping as float32: a copy, made by the ``gguf`` package."""
    import numpy as np

    return dequantize_gguf(np.frombuffer(mm, dtype=np.uint8, count=entry.nbytes, offset=entry.offset), entry)
