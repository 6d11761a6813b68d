"""``sparsemap convert``: any checkpoint in, an aligned, laid-out safetensors file out.

Reads anything :func:`sparsemap.open` reads, writes through
:mod:`sparsemap.writer`. GGUF quantized tensors are dequantized, or, with
``Layout(quantize="keep")``, kept quantized in the layouts torch's CPU kernels
read (``"q8_0"``/``"q4_1"`` also quantize float weights; see
:mod:`sparsemap.quantize`).

The source is read, never mapped. A mapping of a file that shrinks under the
copy is SIGBUS where torch touches it and EFAULT where ``write(2)`` is handed
it; the copy has to survive another process truncating or rewriting the
source. So a plain tensor is copied file to file inside the kernel
(``copy_file_range``: no user memory at all, which beats the mapped copy's
page faults) or read with ``pread`` a bounded chunk at a time (casts, padded
or reordered rows); only what needs a whole tensor anyway (a transpose, a GGUF
tensor to dequantize, a weight to quantize) is read whole, one tensor at a time.
A read that finds the file shorter, or a file whose stamp moved (checked before
and after every tensor), is a :class:`~sparsemap.errors.FileChangedError` naming
the file and its sizes, and the destination is left as it was. Memory stays
bounded: one source tensor at a time at most, the source's cached pages are
dropped once written, and output pages are flushed and dropped as they go.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .checkpoint import Checkpoint, Source, dequantize_gguf, inverse_order, logical
from .durable import check_destination
from .errors import FileChangedError, ReservedNameError, TruncatedFileError, UnsupportedQuantizationError
from .formats.catalog import Catalog, FileStamp, TensorEntry
from .formats.planner import Layout, Plan, Spec, plan
from .formats.quantized import LLAMA2C_Q8_0, kept_scheme, supported_types
from .formats.reserved import LAYOUT_KEY, QUANT_KEY
from .formats.source import open_regular_fd
from .mapped import torch_dtype
from .writer import FileRange, write

if TYPE_CHECKING:
    from .quantize import Coded

logger = logging.getLogger("sparsemap")


@dataclass(frozen=True)
class ConvertSummary:
    """What a conversion wrote and how fast."""

    source: str
    destination: str
    tensors: int
    file_nbytes: int
    padding_nbytes: int
    seconds: float

    @property
    def padding_percent(self) -> float:
        return 100 * self.padding_nbytes / self.file_nbytes if self.file_nbytes else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.file_nbytes / 1e6 / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        return (f"wrote {self.destination}: {self.tensors} tensors, {self.file_nbytes / 1e6:,.1f} MB "
                f"(padding {self.padding_percent:.2f}% of the file) in {self.seconds:.2f} s, "
                f"{self.mb_per_s:,.0f} MB/s")


def convert(source: Source | Checkpoint, destination: str | os.PathLike[str], *,
            layout: Layout | None = None,
            on_bytes: Callable[[int], None] | None = None) -> ConvertSummary:
    """Convert a checkpoint to a safetensors file with the given layout.

    Args:
        source: any checkpoint :func:`sparsemap.open` reads, its catalog, or a
            :class:`~sparsemap.Checkpoint`.
        destination: the output file; written atomically, so an interrupted
            conversion leaves it as it was.
        layout: alignment, dtype cast, row padding, transposition, bundles.
        on_bytes: called with each number of bytes written (progress).

    Returns:
        A :class:`ConvertSummary` (tensors, bytes, padding overhead, time, MB/s).

    Raises:
        DestinationError: ``destination`` is a folder, a FIFO, a socket or a device, or its folder is
            missing: checked first, before the source is opened.
        ReservedNameError: a source tensor's name collides with names sparsemap stores (naming its file).
        FileChangedError: the source was truncated, modified or replaced while it was converted.
        WriteVerificationError: the written file did not reopen as planned (it was not put in place).

    Example:
        >>> convert("model.gguf", "model.safetensors", layout=Layout(dtype=torch.bfloat16))  # doctest: +SKIP
    """
    check_destination(destination)
    catalog = Checkpoint.of(source).catalog
    layout = layout or Layout()
    start = time.perf_counter()
    specs = [Spec(e.name, e.shape, e.dtype, (e.file, e.offset, e.nbytes, e.dtype, e.shape, e.strides)
                  if e.encoding is None and e.nbytes else None,
                  encoding=_source_encoding(catalog, e.name))
             for e in catalog.values()]
    int4 = None
    if layout.quantize is not None:
        from .quantize import int4_layout

        int4 = int4_layout()
    try:
        the_plan: Plan = plan(specs, layout, _kept_metadata(catalog), int4_layout=int4)
    except UnsupportedQuantizationError as e:
        raise UnsupportedQuantizationError(e.detail, path=catalog.source, tensor=e.tensor) from None
    except ReservedNameError as e:
        where = catalog[e.tensor].file if e.tensor in catalog else catalog.source
        raise ReservedNameError(e.detail, path=where, tensor=e.tensor) from None
    if layout.quantize == "keep":
        _note_dequantized(catalog, the_plan)

    with SourceFiles(catalog) as files:
        def get(name: str) -> torch.Tensor | FileRange:
            return files.serve(catalog[name])

        def done(name: str) -> None:
            entry = catalog.entries.get(name)
            if entry is None:  # a quantized weight's part: its weight's file is one of those open
                files.check_all()
            else:
                files.check(entry.file)  # a change during the copy would mix two versions into the output
                files.drop_cache(entry)  # written: its cached pages are not needed again

        mode = layout.quantize
        if mode is not None:
            from .quantize import part_getter

            get = part_getter(the_plan, get, lambda name: _coded(files, name, mode))  # type: ignore[arg-type]
        write(the_plan, get, destination, on_bytes=on_bytes, on_tensor=done)
    return ConvertSummary(source=catalog.source, destination=os.fspath(destination), tensors=len(catalog),
                          file_nbytes=the_plan.file_nbytes, padding_nbytes=the_plan.padding_nbytes,
                          seconds=time.perf_counter() - start)


class SourceFiles:
    """A catalog's files opened for reading (never mapped), each held to the version that was parsed.

    Serves each tensor as a :class:`~sparsemap.writer.FileRange` (plain stored elements: copied by the
    writer file to file, or a chunk at a time) or as a tensor read whole with ``pread`` (what the
    writer cannot take as bytes: strided or reordered views, GGUF blocks to dequantize, quantized
    parts). Each file is checked against its catalog stamp when opened and before each tensor, and
    by the caller after each (:meth:`check`). Owns its descriptors; a context manager.

    Example:
        >>> with SourceFiles(sparsemap.open("model.safetensors")) as files:   # doctest: +SKIP
        ...     files.serve(files.catalog["emb"])
    """

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._required = catalog.required_nbytes()
        self._fds: dict[str, int] = {}
        self._stamps: dict[str, FileStamp] = {}  # each file as opened here

    def __enter__(self) -> SourceFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def fd(self, path: str) -> int:
        """A descriptor of ``path``, opened on first use after checking it is the file that was parsed."""
        if path in self._fds:
            return self._fds[path]
        fd = open_regular_fd(path)
        try:
            now = FileStamp.of(fd)
            parsed = self.catalog.stamps.get(path)
            if parsed is not None and now != parsed:
                raise FileChangedError(f"changed since its header was read: {parsed.differences(now)}; "
                                       "open it again", path=path)
            if now.size < self._required.get(path, 0):
                raise TruncatedFileError(f"file is {now.size} bytes but its tensors need "
                                         f"{self._required[path]}", path=path)
        except BaseException:
            os.close(fd)
            raise
        self._fds[path], self._stamps[path] = fd, now
        return fd

    def check(self, path: str) -> None:
        """Raise :class:`FileChangedError` if ``path`` was truncated or written since it was opened here."""
        fd = self._fds.get(path)
        if fd is None:
            return
        changed = self._stamps[path].changes_in(fd)  # a rename over the name leaves this inode whole
        if changed:
            raise FileChangedError(f"changed while it was being converted: {changed}; the "
                                   "output would mix two versions of it", path=path)

    def check_all(self) -> None:
        for path in list(self._fds):
            self.check(path)

    def drop_cache(self, entry: TensorEntry) -> None:
        """Drop the entry's bytes from the page cache (read once, written: not needed again)."""
        if entry.nbytes and entry.file in self._fds:
            os.posix_fadvise(self._fds[entry.file], entry.offset, entry.nbytes, os.POSIX_FADV_DONTNEED)

    def serve(self, entry: TensorEntry) -> torch.Tensor | FileRange:
        """What the writer copies for ``entry``: its bytes in the file where they are plain, else a tensor."""
        plain = entry.encoding is None and entry.strides is None and entry.order is None and not entry.shift
        if not plain or entry.name in self.catalog.quantized or entry.nbytes == 0:
            return self.read(entry)
        self.fd(entry.file)
        self.check(entry.file)
        return self._range(entry, torch_dtype(entry.dtype, path=entry.file, tensor=entry.name), entry.shape)

    def raw(self, entry: TensorEntry) -> torch.Tensor:
        """The entry's bytes as the file stores them, read into new memory: ``(nbytes,)`` uint8."""
        self.fd(entry.file)
        self.check(entry.file)
        return self._range(entry, torch.uint8, (entry.nbytes,)).read()

    def read(self, entry: TensorEntry) -> torch.Tensor:
        """The tensor as :meth:`sparsemap.Checkpoint.tensor` serves it (dequantized, in logical order),
        but read with ``pread`` into new memory instead of viewed in a mapping."""
        dtype = torch_dtype(entry.dtype, path=entry.file, tensor=entry.name)
        if entry.numel == 0:
            return torch.empty(entry.shape, dtype=dtype)
        weight = self.catalog.quantized.get(entry.name)
        if weight is not None and entry.encoding is not None:  # kept quantized in a file of ours
            from .quantize import dequantize

            values = dequantize(weight, [self.read(p) for p in weight.parts])
        elif entry.encoding is not None:  # GGUF blocks
            values = dequantize_gguf(self.raw(entry).numpy(), entry)
        else:
            flat = self.raw(entry).view(dtype)  # new memory: aligned for any dtype
            values = flat.as_strided(entry.shape, entry.strides) if entry.strides is not None \
                else flat.view(entry.shape)
        return logical(entry, values)

    def _range(self, entry: TensorEntry, dtype: torch.dtype, shape: tuple[int, ...]) -> FileRange:
        return FileRange(entry.name, entry.file, self._fds[entry.file], entry.offset, dtype, shape,
                         self._stamps[entry.file].size)


def _source_encoding(catalog: Catalog, name: str) -> str | None:
    """The quantization a tensor comes in, as the planner judges it: one a kernel layout holds (a GGUF
    type of :data:`~sparsemap.formats.quantized.FROM_GGUF`, also for a weight of ours decoded from one, or
    llama2.c's Q8_0 in groups of a size the int8 layout takes), else ``None``: float, or quantized in a
    form no kernel layout holds (IQ blocks, llama2.c groups that straddle rows), which is dequantized, or
    quantized again by the mode."""
    weight = catalog.quantized.get(name)
    encoding = weight.source if weight is not None else catalog[name].encoding
    return encoding if encoding is not None and kept_scheme(encoding) is not None else None


def _note_dequantized(catalog: Catalog, the_plan: Plan) -> None:
    """Under ``keep``, say which quantized source tensors the plan stores dequantized, and why (one line
    per reason): quantizations no kernel layout holds (IQ blocks; llama2.c's Q8_0 whose groups straddle
    rows or are not a multiple of 16 values), weights of ours quantized from float. (A GGUF vector or
    stack of experts in a type that has a layout is stored dequantized too, unsaid: no kernel takes it.)"""
    kept = {r.quantized[0] for r in the_plan.records if r.quantized is not None}
    reasons: dict[str, list[str]] = {}
    for name, entry in catalog.items():
        weight = catalog.quantized.get(name)
        source = weight.source if weight is not None else entry.encoding
        if name in kept or source is None or (weight is None and kept_scheme(source) is not None):
            continue  # kept, float, or in a type with a layout but no kernel for its shape
        if source == LLAMA2C_Q8_0:  # straddling groups: a llama2.c tensor as it lies
            k = entry.shape[-1]
            group = entry.numel // ((entry.nbytes - entry.numel) // 4)  # values numel, then the scales
            why = (f"llama2.c's Q8_0 groups straddle their rows ({k} values a row, groups of {group}), "
                   "which no kernel layout holds")
        elif source.startswith(LLAMA2C_Q8_0):
            group = weight.group if weight is not None else int(source.partition("/")[2])
            why = f"llama2.c's Q8_0 in groups of {group}; the int8 layout takes groups of a multiple of 16"
        elif weight is None:
            why = f"{source} blocks have no kernel layout (kept: {supported_types()})"
        else:
            why = f"quantized from {weight.source}, not from a GGUF or llama2.c file ('keep' keeps those)"
        reasons.setdefault(why, []).append(name)
    for why, names in reasons.items():
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        logger.warning("%s: --quantize keep: %d tensor(s) stored dequantized to float32 (%s%s): %s",
                       catalog.source, len(names), ", ".join(names[:3]), more, why)


def _coded(files: SourceFiles, name: str, mode: str) -> Coded:
    """A weight to be stored quantized: a GGUF tensor decoded from its blocks (rows put in logical
    order), a weight already kept quantized decoded from its parts, or a float tensor quantized."""
    from .quantize import decode, from_float, from_gguf

    catalog = files.catalog
    entry = catalog[name]
    if name in catalog.quantized:  # a file of ours: its GGUF-born weights as they are, others again
        weight = catalog.quantized[name]
        coded = decode(weight, [files.read(p) for p in weight.parts])
        if entry.order is not None:  # rows stored in another order (llama2.c's q and k)
            coded = coded.rows(inverse_order(entry.order))
        return coded if kept_scheme(weight.source) is not None else from_float(coded.values(), mode)
    if entry.encoding is None or kept_scheme(entry.encoding) is None:  # float, or read as float (dequantized)
        return from_float(files.read(entry), mode)
    coded = from_gguf(files.raw(entry), entry.encoding, (entry.shape[0], entry.shape[1]), name=name)
    return coded if entry.order is None else coded.rows(inverse_order(entry.order))


def _kept_metadata(catalog: Catalog) -> dict[str, str]:
    """Source metadata worth carrying over: safetensors' own strings (not GGUF's key-values)."""
    if catalog.format != "safetensors":
        return {"sparsemap.source_format": catalog.format}
    return {k: v for k, v in catalog.metadata.items() if k not in (LAYOUT_KEY, QUANT_KEY)}
