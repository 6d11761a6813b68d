"""Streaming tensors into a planned, laid-out safetensors file, atomically and durably.

The writer never builds a serialized copy in memory: each tensor's bytes go
from its storage, or from a source file (a :class:`FileRange`, read with
``copy_file_range``/``pread``, never mapped), to the file, through at most one
small buffer when rows are padded, transposed, bundled or cast. What goes where is
decided beforehand, without torch, by :func:`sparsemap.formats.planner.plan`
(see :mod:`sparsemap.formats.layout` for how special layouts are recorded and
undone); how the bytes reach the disk (temporary file, rename, bounded dirty
pages) is :mod:`sparsemap.durable`'s. Before the rename the written file is
opened again with :func:`sparsemap.open` (every rule of the format checked) and
must list exactly the planned tensors, dtypes and shapes: a file put in place
is one that reopens as meant.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NoReturn

import torch

from .durable import WritebackSink, atomic_write, check_destination
from .errors import (
    DestinationError,
    FileChangedError,
    LayoutOptionError,
    NotMappedError,
    ReservedNameError,
    SparsemapError,
    WriteVerificationError,
)
from .formats.planner import Layout, Plan, Record, Spec, plan
from .formats.reserved import HF_WEIGHT_FILE, RESHAPED_KINDS, WEIGHTS_NAME
from .mapped import DTYPE_NAMES, TORCH_DTYPES, mapping_of

# Rows padded, transposed or bundled, and plain tensors cast or gathered, are written through a buffer
# about this big: big enough for sequential writes, small enough to add nothing to a model's footprint.
CHUNK_NBYTES = 16 << 20

__all__ = ["CHUNK_NBYTES", "FileRange", "Layout", "Plan", "Spec", "plan", "save", "write"]


# ---------------------------------------------------------------- sources read from a file

@dataclass(frozen=True)
class FileRange:
    """A contiguous source tensor given as where its bytes lie in an open file, not as memory.

    The writer copies it with ``copy_file_range`` (plain records: no user memory at all) or reads it
    with ``pread`` into a bounded buffer (casts, rows), and never maps it: a mapped page of a file that
    has shrunk is SIGBUS when torch touches it, and EFAULT when ``write(2)`` is handed it, whereas a
    read past the end is a short read, reported as :class:`~sparsemap.errors.FileChangedError`
    naming the file, the tensor and both sizes. The descriptor belongs to the caller.

    Attributes:
        name: the tensor's name (for errors).
        path: the file (for errors).
        fd: a descriptor of it, open for reading.
        offset: byte offset of the first element in the file.
        dtype: element dtype.
        shape: the tensor's shape, row-major contiguous.
        file_nbytes: the file's size when it was opened (for errors).
    """

    name: str
    path: str
    fd: int
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    file_nbytes: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def read_into(self, start: int, out: torch.Tensor) -> None:
        """Fill the contiguous tensor ``out`` with the bytes ``start`` bytes into this tensor."""
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())  # (out.nbytes,) bytes
        got = 0
        while got < len(view):
            n = os.preadv(self.fd, [view[got:]], self.offset + start + got)
            if n == 0:
                self.ended(self.offset + start + got, len(view) - got)
            got += n

    def read(self) -> torch.Tensor:
        """The whole tensor, read into new memory."""
        out = torch.empty(self.shape, dtype=self.dtype)
        if out.numel():
            self.read_into(0, out)
        return out

    def ended(self, at: int, missing: int) -> NoReturn:
        """Raise for a read that found the end of the file at byte ``at`` with ``missing`` bytes to go."""
        now = os.fstat(self.fd).st_size
        raise FileChangedError(f"the file shrank from {self.file_nbytes} to {now} bytes while it was read: "
                               f"{missing} bytes from offset {at} are gone (truncated while converting?)",
                               path=self.path, tensor=self.name)


Source = torch.Tensor | FileRange


# ---------------------------------------------------------------- streaming a plan

def write(plan_: Plan, get: Callable[[str], Source], path: str | os.PathLike[str], *,
          on_bytes: Callable[[int], None] | None = None,
          on_tensor: Callable[[str], None] | None = None) -> None:
    """Write a planned file, fetching each source tensor with ``get(name)`` when its turn comes.

    Peak extra memory: one source tensor if it must be made contiguous or
    cast as a whole (plain records), or read whole to be transposed (a
    :class:`FileRange`), else one buffer of :data:`CHUNK_NBYTES`.
    A quantized weight's parts are fetched by their stored names (``get("w@int4")``);
    :func:`sparsemap.quantize.part_getter` packs them from the source.
    The file appears at ``path`` whole or not at all (:func:`~sparsemap.durable.atomic_write`),
    and only once it has reopened as the plan says (:func:`verify`).

    Args:
        plan_: what to write (:func:`~sparsemap.formats.planner.plan`).
        get: the source of a name, a tensor or a :class:`FileRange`; called once per tensor, in file order.
        path: the destination.
        on_bytes: called with each number of bytes written (progress).
        on_tensor: called with each tensor's name once its bytes are written
            (the caller may release its pages, or check its source file).

    Raises:
        WriteVerificationError: the written file did not reopen as planned; it was not put in place.
        DestinationError: ``path`` cannot receive a file (a folder, a FIFO, a missing folder...).
        FileChangedError: a :class:`FileRange` source ended early (its file shrank).

    Example:
        >>> the_plan = plan([Spec(n, tuple(t.shape), DTYPE_NAMES[t.dtype]) for n, t in state.items()],
        ...                 Layout())                                          # doctest: +SKIP
        >>> write(the_plan, state.__getitem__, "model.safetensors")               # doctest: +SKIP
    """
    _check_reshaped_name(plan_, path)
    with atomic_write(path, verify=lambda tmp: verify(plan_, tmp, destination=path)) as fd:
        sink = WritebackSink(fd, on_bytes)
        sink.write(struct.pack("<Q", len(plan_.header)) + plan_.header)
        for record in plan_.records:
            if record.kind == "pad":
                sink.zeros(record.nbytes)
            elif record.kind in ("plain", "quant"):
                _write_plain(sink, get(record.name), record)
                if on_tensor:
                    on_tensor(record.name)
            else:
                _write_rows(sink, record, get)
                if on_tensor:
                    for p in record.parts:
                        on_tensor(p.name)
        assert sink.position == plan_.file_nbytes, (sink.position, plan_.file_nbytes)


def _check_reshaped_name(plan_: Plan, path: str | os.PathLike[str]) -> None:
    """Refuse to give a file whose stored shapes are not the model's a name Hugging Face loaders take for
    the model's weights: transformers would load it, initialise at random what it cannot find under the
    model's names, and report it only in a load report."""
    reshaped = sorted({r.kind for r in plan_.records if r.kind in RESHAPED_KINDS})
    name = os.path.basename(os.fspath(path))
    if reshaped and name.lower() != WEIGHTS_NAME and re.fullmatch(HF_WEIGHT_FILE, name):
        raise DestinationError(
            f"this layout stores tensors in other shapes than the model's ({', '.join(reshaped)}); under "
            f"this name transformers would load it as the model and initialise the tensors it cannot find at "
            f"random: name it {WEIGHTS_NAME} (sparsemap finds it in a folder, other loaders do not)",
            path=path)


def verify(plan_: Plan, written: str | os.PathLike[str], *, destination: str | os.PathLike[str]) -> None:
    """Check that the file ``written`` opens with :func:`sparsemap.open` as exactly ``plan_``'s tensors.

    Every rule of the format (and of the layout and quantization documents) is checked by opening it;
    then its size, and each tensor's name, dtype and shape, against the plan. Headers only: no data is read.

    Raises:
        WriteVerificationError: naming ``destination`` (where the file was meant to go), and the
            tensor and numbers that differ.
    """
    from .formats import open_catalog

    try:
        catalog = open_catalog(os.fspath(written))
    except (SparsemapError, OSError) as e:
        reason = e.detail if isinstance(e, SparsemapError) else str(e)
        where = f" (tensor {e.tensor!r})" if isinstance(e, SparsemapError) and e.tensor else ""
        raise WriteVerificationError(f"the file written does not reopen: {type(e).__name__}{where}: "
                                     f"{reason}; it was not put in place", path=destination) from e

    def fail(message: str, tensor: str | None = None) -> None:
        raise WriteVerificationError(f"the file written does not reopen as planned: {message}; it was not "
                                     "put in place", path=destination, tensor=tensor)

    size = catalog.stamps[catalog.source].size if catalog.source in catalog.stamps else None
    if size is not None and size != plan_.file_nbytes:
        fail(f"it is {size} bytes, planned {plan_.file_nbytes}")
    missing = [n for n in plan_.tensors if n not in catalog]
    if missing:
        fail(f"{len(missing)} planned tensors are missing", missing[0])
    extra = [n for n in catalog if n not in plan_.tensors]
    if extra:
        fail(f"{len(extra)} tensors were not planned", extra[0])
    for name, (dtype, shape) in plan_.tensors.items():
        entry = catalog[name]
        if (entry.dtype, entry.shape) != (dtype, shape):
            fail(f"it is {entry.dtype} {list(entry.shape)}, planned {dtype} {list(shape)}", name)


def _torch_dtype(record: Record) -> torch.dtype:
    try:
        return TORCH_DTYPES[record.dtype]
    except KeyError:
        raise LayoutOptionError(f"{record.name}: dtype {record.dtype} has no torch equivalent in torch "
                                f"{torch.__version__}") from None


def _write_plain(sink: WritebackSink, src: Source, record: Record) -> None:
    """A tensor stored as itself: its bytes as they are, or cast (or gathered) a chunk at a time."""
    if tuple(src.shape) != record.shape:
        raise LayoutOptionError(f"{record.name}: tensor has shape {list(src.shape)}, "
                                f"planned {list(record.shape)}")
    if math.prod(record.shape) == 0:
        return
    dtype = _torch_dtype(record)
    if isinstance(src, FileRange):
        if src.dtype == dtype:  # file to file inside the kernel: no user memory, no mapping
            copied = sink.copy_range(src.fd, src.offset, src.nbytes)
            if copied < src.nbytes:
                src.ended(src.offset + copied, src.nbytes - copied)
            return
        step = max(1, CHUNK_NBYTES // max(dtype.itemsize, src.dtype.itemsize))
        buf = torch.empty(min(step, math.prod(src.shape)), dtype=src.dtype)  # (step,) reused
        for start in range(0, math.prod(src.shape), step):
            chunk = buf[:min(step, math.prod(src.shape) - start)]
            src.read_into(start * src.dtype.itemsize, chunk)
            sink.write(chunk.to(dtype).view(torch.uint8).numpy().data)
        return
    t = src.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == dtype and t.is_contiguous():
        _write_from(sink, t, record.name)
        return
    # Cast (or gather) in chunks so no whole converted copy is held.
    flat = t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)  # (numel,)
    step = max(1, CHUNK_NBYTES // max(dtype.itemsize, flat.element_size()))
    for start in range(0, flat.numel(), step):
        chunk = flat[start:start + step].to(dtype)
        sink.write(chunk.view(torch.uint8).numpy().data)


def _write_from(sink: WritebackSink, t: torch.Tensor, name: str) -> None:
    """Write a contiguous tensor's bytes from its own memory.

    ``write(2)`` given a mapped page past the end of a file that shrank fails with EFAULT (the
    kernel's copy faults) rather than SIGBUS: said as what it is when ``t`` is a sparsemap mapping.
    """
    try:
        sink.write(t.reshape(-1).view(torch.uint8).numpy().data)
    except OSError as e:
        if e.errno != errno.EFAULT:
            raise
        with contextlib.suppress(NotMappedError):
            mapping_of(t, name).check_unchanged()  # raises FileChangedError, naming the file
        raise


def _write_rows(sink: WritebackSink, record: Record, get: Callable[[str], Source]) -> None:
    """A row record: each part's rows (or columns) copied side by side into padded rows, in stored order."""
    n_rows, stride = record.shape  # (n_rows, row stride in elements)
    if record.nbytes == 0:
        return
    dtype = _torch_dtype(record)
    rows_per_chunk = max(1, CHUNK_NBYTES // (stride * dtype.itemsize))
    sources = [(p, _rows_of(get(p.name), p.transposed, min(rows_per_chunk, n_rows), record.order))
               for p in record.parts]
    # Zeroed once: the padding columns are never written, so they stay zero in every chunk.
    buf = torch.zeros(min(rows_per_chunk, n_rows), stride, dtype=dtype)  # (rows, stride)
    for start in range(0, n_rows, rows_per_chunk):
        k = min(rows_per_chunk, n_rows - start)
        block = buf[:k]  # (k, stride)
        for p, rows_at in sources:
            # (k, p.n_cols); the copy casts if the record's dtype differs
            block[:, p.col_offset:p.col_offset + p.n_cols].copy_(rows_at(start, k))
        sink.write(block.reshape(-1).view(torch.uint8).numpy().data)


def _rows_of(src: Source, transposed: bool, max_rows: int,
             order: tuple[int, ...] | None) -> Callable[[int, int], torch.Tensor]:
    """``rows_at(start, k)``: stored rows ``start..start+k`` of one part, ``(k, n_cols)``.

    Stored row ``j`` is source row ``order[j]`` (or ``j``). A tensor is sliced (or its rows gathered).
    A file's rows are read with ``pread`` into one buffer of at most ``max_rows`` rows, a run of
    consecutive source rows in one read; a file to be transposed is read whole first (a column of a
    row-major file is not one range of bytes).
    """
    if isinstance(src, FileRange) and not transposed:
        file = src
        n_cols = math.prod(file.shape[1:])
        row_nbytes = n_cols * file.dtype.itemsize
        buf = torch.empty(max_rows, n_cols, dtype=file.dtype)  # (max_rows, n_cols), reused

        def read_rows(start: int, k: int) -> torch.Tensor:
            out = buf[:k]
            if order is None:
                file.read_into(start * row_nbytes, out)
                return out
            wanted = order[start:start + k]
            i = 0
            while i < k:
                j = i + 1
                while j < k and wanted[j] == wanted[j - 1] + 1:
                    j += 1
                file.read_into(wanted[i] * row_nbytes, out[i:j])
                i = j
            return out

        return read_rows
    t = (src.read() if isinstance(src, FileRange) else src).detach()
    if t.device.type != "cpu":
        t = t.cpu()
    rows = t.t() if transposed else t.reshape(t.shape[0], math.prod(t.shape[1:]))  # (n_rows, n_cols)
    index = torch.tensor(order, dtype=torch.int64) if order is not None else None

    def slice_rows(start: int, k: int) -> torch.Tensor:
        return rows[start:start + k] if index is None else rows.index_select(0, index[start:start + k])

    return slice_rows


# ---------------------------------------------------------------- the public entry point

Tensors = Mapping[str, torch.Tensor] | torch.nn.Module | torch.Tensor


def _identity(t: torch.Tensor) -> object:
    # Tensors are tied when they are the same bytes seen the same way.
    from .qtensor import QuantizedTensor

    if isinstance(t, QuantizedTensor):  # no storage of its own (data_ptr 0): its parts' bytes
        return ("quantized", *((p.data_ptr(), tuple(p.shape)) for p in t.parts))
    return (t.device.type, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype) if t.numel() else None


def _dtype_name(name: str, t: torch.Tensor) -> str:
    try:
        return DTYPE_NAMES[t.dtype]
    except KeyError:
        raise LayoutOptionError(f"{name}: dtype {t.dtype} has no safetensors name") from None


def save(tensors: Tensors, path: str | os.PathLike[str], *, layout: Layout | None = None,
         metadata: Mapping[str, str] | None = None) -> Plan:
    """Write tensors as a mapped-ready safetensors file, streaming from their storage.

    Args:
        tensors: a state dict, a module (its ``state_dict()``), or one tensor
            (saved as ``"tensor"``).
        path: destination; written atomically (temp file, fsync, rename).
        layout: alignment, casts and row layouts (see :class:`Layout`).
        metadata: extra ``__metadata__`` strings.

    Returns:
        The plan that was written (records, offsets, layout views).

    Raises:
        DestinationError: ``path`` is a folder, a FIFO, a socket or a device, or its folder is missing
            (before anything is planned or written).
        ReservedNameError: a tensor name collides with names sparsemap stores (``w@rows``,
            ``__sparsemap...``, ``__metadata__``).
        WriteVerificationError: the written file did not reopen as planned (it was not put in place).

    Example:
        >>> sparsemap.save(model, "model.safetensors",
        ...                layout=Layout(pad_rows=("*embed_tokens*",)))  # doctest: +SKIP
        >>> model = sparsemap.load(factory, "model.safetensors")  # doctest: +SKIP
        >>> # ^ undoes the layout, zero-copy
    """
    check_destination(path)
    if isinstance(tensors, torch.nn.Module):
        state = dict(tensors.state_dict(keep_vars=False))
    elif isinstance(tensors, torch.Tensor):
        state = {"tensor": tensors}
    else:
        state = dict(tensors)
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise LayoutOptionError(f"{name}: not a tensor ({type(t).__name__})")
        if t.device.type == "meta":
            raise LayoutOptionError(f"{name}: on the meta device, it has no data to save")
    specs = [Spec(n, tuple(t.shape), _dtype_name(n, t), _identity(t)) for n, t in state.items()]
    layout = layout or Layout()
    get: Callable[[str], torch.Tensor] = state.__getitem__
    int4 = None
    if layout.quantize is not None:
        from .quantize import from_float, int4_layout, part_getter

        int4 = int4_layout()
    try:
        the_plan = plan(specs, layout, metadata, int4_layout=int4)
    except ReservedNameError as e:
        raise ReservedNameError(e.detail, path=path, tensor=e.tensor) from None
    if layout.quantize is not None:
        get = part_getter(the_plan, get, lambda name: from_float(state[name], layout.quantize))
    write(the_plan, get, path)
    return the_plan
