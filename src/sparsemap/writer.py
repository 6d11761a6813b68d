"""Writing tensors as an aligned, laid-out safetensors file, streaming, atomically and durably.

The writer never builds a serialized copy in memory: each tensor's bytes go
from its storage (or a mapped source) to the file, through at most one small
buffer when rows are padded, transposed, bundled or cast. The output is a
valid safetensors file (see :mod:`sparsemap.formats.layout` for how special
layouts are recorded and undone).

Durability: the file is written under a temporary name in the destination
folder, fsynced, renamed over the destination, and the folder fsynced. A crash
leaves either the old file or the complete new one.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import fnmatch
import glob
import json
import math
import os
import re
import secrets
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import BadInputError
from .formats.catalog import contiguous_strides
from .formats.layout import LAYOUT_KEY, LAYOUT_VERSION, PAD_PREFIX, SUFFIXES
from .mapped import DTYPE_NAMES

# Rows padded, transposed or bundled are written through a buffer this big.
CHUNK_NBYTES = 16 << 20
# Output written but not yet on disk is kept under about two windows: dirty
# page cache counts against a cgroup's memory limit like anything else.
WRITEBACK_WINDOW = 32 << 20
MAX_ROW_PAGE = 64 << 10


class LayoutOptionError(BadInputError):
    """The layout asked for cannot be applied to these tensors."""


@dataclass(frozen=True)
class Layout:
    """How tensors are laid out in a written file.

    Attributes:
        align: byte alignment of the data section and of every tensor
            (4 KiB pages by default; 16 KiB or 64 KiB for other page sizes, 2 MiB
            for huge pages).
        dtype: cast floating-point tensors to this dtype while writing.
        pad_rows: glob patterns of tensors whose rows are padded so each row
            starts on a page (rows of a page or more), or a page holds a whole
            number of rows (smaller rows, padded to a power of two).
        transpose: glob patterns of 2-D tensors stored transposed, so a column
            (one FFN neuron of a down projection) becomes a row.
        bundle_ffn: store each FFN neuron's gate, up and down weights as one
            padded record (Llama's ``mlp.{gate,up,down}_proj``, BERT's
            ``intermediate.dense`` and ``output.dense``; down is transposed).
        page: the page rows are padded to; default ``min(align, 64 KiB)``.
        reorder: usage counts per row, by tensor name (``{"emb.weight": [count
            of row 0, count of row 1, ...]}``; for a transposed or bundled
            down projection, one count per neuron). Rows are stored hottest
            first, so rows used together share pages. Loading undoes the order
            with a copy; sparse consumers read the stored order without one.
    """

    align: int = 4096
    dtype: torch.dtype | None = None
    pad_rows: tuple[str, ...] = ()
    transpose: tuple[str, ...] = ()
    bundle_ffn: bool = False
    page: int | None = None
    reorder: Mapping[str, tuple[float, ...]] | None = None

    def __post_init__(self) -> None:
        for what, value in (("align", self.align), ("page", self.page)):
            if value is not None and (value <= 0 or value & (value - 1)):
                raise LayoutOptionError(f"{what} must be a power of two, got {value}")

    @property
    def row_page(self) -> int:
        return self.page or min(self.align, MAX_ROW_PAGE)

    def describe(self) -> dict[str, object]:
        return {"align": self.align, "page": self.row_page,
                "dtype": DTYPE_NAMES.get(self.dtype) if self.dtype else None,
                "pad_rows": list(self.pad_rows), "transpose": list(self.transpose),
                "bundle_ffn": self.bundle_ffn, "reorder": sorted(self.reorder or {})}


# ---------------------------------------------------------------- what goes in the file

@dataclass(frozen=True)
class Spec:
    """What the planner needs to know of a source tensor, without its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    identity: object = None  # equal for tensors that share their bytes (ties)


@dataclass
class _Part:
    """One logical tensor inside a row record: its rows, or its columns if transposed."""

    name: str
    transposed: bool
    col_offset: int  # elements into the record's row
    n_cols: int  # elements it adds to each record row


@dataclass
class Record:
    """One stored tensor of the output."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    kind: str  # "plain", "rows", "transpose", "bundle", "pad"
    parts: list[_Part] = field(default_factory=list)
    offset: int = 0  # relative to the data section
    order: list[int] | None = None  # stored row k holds logical row order[k]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class Plan:
    records: list[Record]
    views: dict[str, dict[str, object]]
    header: bytes
    data_start: int

    @property
    def file_nbytes(self) -> int:
        last = self.records[-1] if self.records else None
        return self.data_start + (last.offset + last.nbytes if last else 0)

    @property
    def padding_nbytes(self) -> int:
        pad = sum(r.nbytes for r in self.records if r.kind == "pad")
        unpadded = {r.name: sum(p.n_cols for p in r.parts) for r in self.records if r.parts}
        for r in self.records:
            if r.parts:
                pad += (r.shape[1] - unpadded[r.name]) * r.shape[0] * r.dtype.itemsize
        return pad + (self.data_start - 8 - len(self.header.rstrip(b" ")))


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _row_stride(row_nbytes: int, itemsize: int, page: int) -> int:
    """Row stride in elements: a multiple of the page, or a power of two dividing it (0 for empty rows)."""
    if row_nbytes == 0:
        return 0
    if row_nbytes >= page:
        stride = -(-row_nbytes // page) * page
    else:
        stride = max(1 << (row_nbytes - 1).bit_length(), itemsize)
    return stride // itemsize


FFN_FAMILIES = (
    # (gate, up, down): each a suffix after the layer prefix; down is stored transposed.
    ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"),
    (None, "intermediate.dense.weight", "output.dense.weight"),
    ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"),
)


def _ffn_bundles(specs: dict[str, Spec]) -> list[list[tuple[str, bool]]]:
    """Groups of (name, transposed) forming FFN neuron bundles."""
    bundles = []
    for gate, up, down in FFN_FAMILIES:
        for name in specs:
            if not name.endswith(up):
                continue
            prefix = name[: -len(up)]
            members = [(prefix + gate, False)] if gate else []
            members += [(prefix + up, False), (prefix + down, True)]
            if all(m in specs for m, _ in members):
                bundles.append(members)
    return bundles


def plan(specs: list[Spec], layout: Layout, metadata: Mapping[str, str] | None = None) -> Plan:
    """Decide every stored tensor, its offset and the layout views; touch no data."""
    by_name = {s.name: s for s in specs}
    out_dtype = {s.name: (layout.dtype if layout.dtype is not None and s.dtype.is_floating_point else s.dtype)
                 for s in specs}
    records: list[Record] = []
    views: dict[str, dict[str, object]] = {}
    placed: set[str] = set()
    first_by_identity: dict[object, str] = {}  # tied tensors: the name written first

    def view(name: str, stored: str, kind: str, offset: int, shape: tuple[int, ...],
             strides: tuple[int, ...]) -> None:
        views[name] = {"stored": stored, "kind": kind, "offset": offset, "shape": list(shape),
                       "strides": list(strides)}

    def row_record(stored: str, kind: str, members: list[tuple[str, bool]], pad: bool) -> None:
        dtypes = {out_dtype[m] for m, _ in members}
        if len(dtypes) != 1:
            raise LayoutOptionError(f"{stored}: cannot bundle tensors of different dtypes {sorted(map(str, dtypes))}")
        dtype = dtypes.pop()
        parts, n_rows, col = [], None, 0
        for m, transposed in members:
            shape = by_name[m].shape
            if transposed and len(shape) != 2:
                raise LayoutOptionError(f"{m}: only 2-D tensors can be transposed, shape is {list(shape)}")
            rows_here = shape[1] if transposed else shape[0]
            cols = shape[0] if transposed else math.prod(shape[1:])
            if n_rows is not None and rows_here != n_rows:
                raise LayoutOptionError(f"{stored}: {m} has {rows_here} rows, the others {n_rows}")
            n_rows = rows_here
            parts.append(_Part(m, transposed, col, cols))
            col += cols
        assert n_rows is not None
        stride = _row_stride(col * dtype.itemsize, dtype.itemsize, layout.row_page) if pad else col
        order = _row_order([m for m, _ in members], n_rows, layout.reorder or {})
        records.append(Record(stored, dtype, (n_rows, stride), kind, parts, order=order))
        for p in parts:
            shape = by_name[p.name].shape
            if p.transposed:
                view(p.name, stored, kind, p.col_offset, shape, (1, stride))
            else:
                rest = contiguous_strides(shape[1:])
                view(p.name, stored, kind, p.col_offset, shape, (stride, *rest))
            if order is not None:
                views[p.name]["order"] = order
                views[p.name]["order_dim"] = 1 if p.transposed else 0
            placed.add(p.name)

    if layout.bundle_ffn:
        for members in _ffn_bundles(by_name):
            names = [m for m, _ in members]
            if any(n in placed for n in names):
                continue
            stored = _common_prefix(names) + SUFFIXES["bundle"]
            row_record(stored, "bundle", members, pad=True)

    for s in specs:
        if s.name in placed:
            continue
        if s.identity is not None and s.identity in first_by_identity:
            first = first_by_identity[s.identity]
            if first in views:  # the first has a special layout: share its recipe
                views[s.name] = dict(views[first])
            else:
                view(s.name, first, "alias", 0, s.shape, contiguous_strides(s.shape))
            placed.add(s.name)
            continue
        pad = _matches(s.name, layout.pad_rows) and len(s.shape) >= 1
        reordered = s.name in (layout.reorder or {}) and len(s.shape) >= 1
        if _matches(s.name, layout.transpose):
            row_record(s.name + SUFFIXES["transpose"], "transpose", [(s.name, True)], pad=pad)
        elif (pad and len(s.shape) >= 2) or reordered:
            row_record(s.name + SUFFIXES["rows"], "rows", [(s.name, False)], pad=pad and len(s.shape) >= 2)
        else:
            records.append(Record(s.name, out_dtype[s.name], s.shape, "plain"))
            placed.add(s.name)
        if s.identity is not None:
            first_by_identity[s.identity] = s.name

    # Place records: each starts on an `align` boundary; gaps become padding tensors.
    laid: list[Record] = []
    cursor = 0
    for r in records:
        start = -(-cursor // layout.align) * layout.align if r.nbytes else cursor
        if start > cursor:
            laid.append(Record(f"{PAD_PREFIX}{len(laid)}", torch.uint8, (start - cursor,), "pad", offset=cursor))
        r.offset = start
        laid.append(r)
        cursor = start + r.nbytes
    meta = dict(metadata or {})
    meta.setdefault("format", "pt")
    if views or any(r.kind == "pad" for r in laid) or layout.align > 1:
        meta[LAYOUT_KEY] = json.dumps({"version": LAYOUT_VERSION, **layout.describe(), "views": views},
                                      separators=(",", ":"))
    header_doc: dict[str, object] = {"__metadata__": meta}
    for r in laid:
        header_doc[r.name] = {"dtype": _dtype_name(r.dtype, r.name), "shape": list(r.shape),
                              "data_offsets": [r.offset, r.offset + r.nbytes]}
    header = json.dumps(header_doc, separators=(",", ":")).encode()
    # Pad the header with spaces (allowed by the format) so the data starts aligned.
    data_start = -(-(8 + len(header)) // layout.align) * layout.align
    header += b" " * (data_start - 8 - len(header))
    return Plan(laid, views, header, data_start)


def _row_order(members: list[str], n_rows: int, profile: Mapping[str, tuple[float, ...]]) -> list[int] | None:
    """Stored-row order from the first member with a profile: hottest first, ties in row order."""
    for m in members:
        counts = profile.get(m)
        if counts is None:
            continue
        if len(counts) != n_rows:
            raise LayoutOptionError(f"{m}: usage profile has {len(counts)} counts for {n_rows} rows")
        return sorted(range(n_rows), key=lambda i: -counts[i])
    return None


def _dtype_name(dtype: torch.dtype, name: str) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise LayoutOptionError(f"{name}: dtype {dtype} has no safetensors name") from None




def _common_prefix(names: list[str]) -> str:
    prefix = os.path.commonprefix(names)
    return prefix.rstrip("._") or names[0]


# ---------------------------------------------------------------- writing

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_SYNC_WAIT_BEFORE, _SYNC_WRITE, _SYNC_WAIT_AFTER = 1, 2, 4


def _sync_file_range(fd: int, offset: int, nbytes: int, flags: int) -> None:
    fn = getattr(_libc, "sync_file_range", None)
    if fn is None:  # not Linux: fall back to a full data sync
        if flags & _SYNC_WAIT_AFTER:
            os.fdatasync(fd)
        return
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    if fn(fd, offset, nbytes, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"sync_file_range: {os.strerror(err)}")


class _Sink:
    """Writes sequentially, keeping what is written but not yet on disk under two windows."""

    def __init__(self, fd: int, on_bytes: Callable[[int], None] | None) -> None:
        self.fd = fd
        self.position = 0
        self.flushed = 0  # everything before this is on disk and dropped from the cache
        self.on_bytes = on_bytes

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self.fd, view[: 64 << 20])
            view = view[n:]
            self.position += n
            if self.on_bytes is not None:
                self.on_bytes(n)
            if self.position - self.flushed >= 2 * WRITEBACK_WINDOW:
                self._writeback(self.position - WRITEBACK_WINDOW)

    def _writeback(self, upto: int) -> None:
        # Start writeback of everything up to `upto`, wait for it, drop it from the cache.
        _sync_file_range(self.fd, self.flushed, upto - self.flushed,
                         _SYNC_WAIT_BEFORE | _SYNC_WRITE | _SYNC_WAIT_AFTER)
        os.posix_fadvise(self.fd, self.flushed, upto - self.flushed, os.POSIX_FADV_DONTNEED)
        self.flushed = upto

    def zeros(self, nbytes: int) -> None:
        block = bytes(min(nbytes, 1 << 20))
        while nbytes:
            n = min(nbytes, len(block))
            self.write(block[:n])
            nbytes -= n


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete temporary files a killed writer of ``path`` left behind (their writer pid is gone).

    Only names exactly of :func:`atomic_write`'s form for this ``path``
    (``.<name>.<pid>.<8 hex>.tmp``) are considered, so another destination's
    temporaries (``a.safetensors.5`` next to ``a.safetensors``) are never touched.
    A live writer holds a lock on its temporary file for as long as it writes
    (``lockf``), whatever its pid namespace or host; a file whose lock can be
    taken at once has no writer left.
    """
    pattern = re.compile(rf"\.{re.escape(path.name)}\.\d+\.[0-9a-f]{{8}}\.tmp")
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if pattern.fullmatch(tmp.name) is None or not _abandoned(tmp):
            continue
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def _abandoned(tmp: Path) -> bool:
    """True when no process holds ``tmp``'s write lock (its writer is gone)."""
    try:
        fd = os.open(tmp, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases the lock we may have taken


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[int]:
    """A file descriptor to write ``path`` with: temp file, fsync, rename, fsync of the folder.

    On any exception the temporary file is removed and ``path`` is untouched.
    A writer killed outright (SIGKILL, power loss) leaves ``path`` untouched
    too, and its temporary file is removed by the next write of ``path``.
    Writing to a new inode also means a process that has the old file mapped
    keeps reading the old bytes.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    remove_stale_temporaries(path)
    tmp = folder / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    fcntl.lockf(fd, fcntl.LOCK_EX)  # "a writer is alive": released when the descriptor closes or we die
    try:
        yield fd
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write(plan_: Plan, get: Callable[[str], torch.Tensor], path: str | os.PathLike[str], *,
          on_bytes: Callable[[int], None] | None = None,
          on_tensor: Callable[[str], None] | None = None) -> None:
    """Write a planned file, fetching each source tensor with ``get(name)`` when its turn comes.

    Peak extra memory: one source tensor if it must be made contiguous or
    cast as a whole (plain records), else one buffer of :data:`CHUNK_NBYTES`.
    """
    with atomic_write(path) as fd:
        sink = _Sink(fd, on_bytes)
        sink.write(struct.pack("<Q", len(plan_.header)) + plan_.header)
        for record in plan_.records:
            if record.kind == "pad":
                sink.zeros(record.nbytes)
            elif record.kind == "plain":
                _write_plain(sink, get(record.name), record)
                if on_tensor:
                    on_tensor(record.name)
            else:
                _write_rows(sink, record, get)
                if on_tensor:
                    for p in record.parts:
                        on_tensor(p.name)
        assert sink.position == plan_.file_nbytes, (sink.position, plan_.file_nbytes)


def _write_plain(sink: _Sink, t: torch.Tensor, record: Record) -> None:
    if tuple(t.shape) != record.shape:
        raise LayoutOptionError(f"{record.name}: tensor has shape {list(t.shape)}, planned {list(record.shape)}")
    if t.numel() == 0:
        return
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == record.dtype and t.is_contiguous():
        sink.write(t.reshape(-1).view(torch.uint8).numpy().data)
        return
    # Cast (or gather) in chunks of rows so no whole converted copy is held.
    flat = t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)
    step = max(1, CHUNK_NBYTES // max(record.dtype.itemsize, flat.element_size()))
    for start in range(0, flat.numel(), step):
        chunk = flat[start:start + step].to(record.dtype)
        sink.write(chunk.view(torch.uint8).numpy().data)


def _write_rows(sink: _Sink, record: Record, get: Callable[[str], torch.Tensor]) -> None:
    n_rows, stride = record.shape
    if record.nbytes == 0:
        return
    sources = []
    for p in record.parts:
        t = get(p.name).detach()
        if t.device.type != "cpu":
            t = t.cpu()
        rows = t.t() if p.transposed else t.reshape(t.shape[0], math.prod(t.shape[1:]))  # (n_rows, n_cols)
        sources.append((p, rows))
    rows_per_chunk = max(1, CHUNK_NBYTES // (stride * record.dtype.itemsize))
    buf = torch.zeros(min(rows_per_chunk, n_rows), stride, dtype=record.dtype)  # (rows, stride)
    order = torch.tensor(record.order, dtype=torch.int64) if record.order is not None else None
    for start in range(0, n_rows, rows_per_chunk):
        k = min(rows_per_chunk, n_rows - start)
        block = buf[:k]
        for p, src in sources:
            rows = src[start:start + k] if order is None else src.index_select(0, order[start:start + k])
            block[:, p.col_offset:p.col_offset + p.n_cols].copy_(rows)
        sink.write(block.reshape(-1).view(torch.uint8).numpy().data)


# ---------------------------------------------------------------- the public entry point

Tensors = Mapping[str, torch.Tensor] | torch.nn.Module | torch.Tensor


def _identity(t: torch.Tensor) -> object:
    # Tensors are tied when they are the same bytes seen the same way.
    return (t.device.type, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype) if t.numel() else None


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

    Example:
        >>> sparsemap.save(model, "model.safetensors", layout=Layout(pad_rows=("*embed_tokens*",)))  # doctest: +SKIP
        >>> model = sparsemap.load(factory, "model.safetensors")      # undoes the layout, zero-copy
    """
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
    specs = [Spec(n, tuple(t.shape), t.dtype, _identity(t)) for n, t in state.items()]
    the_plan = plan(specs, layout or Layout(), metadata)
    write(the_plan, state.__getitem__, path)
    return the_plan
