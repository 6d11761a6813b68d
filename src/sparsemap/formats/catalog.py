"""The catalog: where every tensor of a checkpoint lives, read from headers only.

A :class:`Catalog` is a frozen description: each tensor name maps to a
:class:`TensorEntry` (file, byte offset, byte length, dtype, shape), and each
file to the :class:`FileStamp` it had when its header was parsed. Building one
reads headers, never tensor data, and imports no torch: a catalog can be
inspected, validated and planned over on a machine that cannot hold the model.
The data is served by the torch side, :class:`sparsemap.Checkpoint`, which
owns the mappings.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

from ..errors import InvalidNameError
from .dtypes import ITEMSIZE

if TYPE_CHECKING:
    from .quantized import QuantizedWeight


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Element strides of a row-major contiguous tensor of ``shape``."""
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return tuple(reversed(strides))


class TensorEntry(NamedTuple):
    """Where one tensor's bytes are, and how to read them. Immutable (a named tuple: cheap to define
    at import and to build by the hundred thousand; ``entry._replace(name=...)`` makes a changed copy).

    Attributes:
        name: the tensor's name in the checkpoint.
        file: absolute path of the file that holds its bytes.
        offset: absolute byte offset, in ``file``, of the tensor's first element.
        nbytes: bytes the tensor spans in the file (for a quantized tensor, its
            packed size; for a strided view, first to last element inclusive).
        dtype: element dtype as loaded (safetensors names: ``"F32"``, ``"BF16"``...).
            For a quantized GGUF tensor this is the dtype it dequantizes to.
        shape: logical shape, row-major (outermost first).
        strides: element strides when the tensor is not contiguous row-major
            (possible in torch zip checkpoints); ``None`` means contiguous.
        encoding: storage encoding when the bytes are not plain ``dtype``
            elements (a GGUF quantization such as ``"Q4_1"``); ``None`` if plain.
        order: for a tensor stored with its rows reordered (a usage profile put
            rows used together on the same pages): ``order[k]`` is the logical
            index of the ``k``-th stored slice along ``order_dim``. ``None`` if
            stored in logical order.
        order_dim: the dimension ``order`` permutes (0 for rows; 1 for a
            transposed tensor, whose stored rows are its columns).
        row_span: bytes from one row's start to the next that belong to this
            tensor alone (its row and the padding after it), for rows padded by
            the layout compiler. ``None`` when gaps between rows, if any, may
            hold other tensors' bytes (a bundle's parts, a view of a wider matrix).
        shift: a constant added to every element as served (llama.cpp stores
            Gemma's norm weights as ``1 + w``: ``-1.0`` gives ``w`` back); 0 for none.
    """

    name: str
    file: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    strides: tuple[int, ...] | None = None
    encoding: str | None = None
    order: tuple[int, ...] | None = None
    order_dim: int = 0
    row_span: int | None = None
    shift: float = 0.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def end(self) -> int:
        """Byte offset one past the tensor's last byte."""
        return self.offset + self.nbytes

    @property
    def zero_copy(self) -> bool:
        """Whether a view of the file can serve this tensor without conversion.

        Misaligned data is served, but by copy: torch kernels assume elements
        aligned to their size.
        """
        return (self.encoding is None and self.order is None and not self.shift
                and self.offset % ITEMSIZE[self.dtype] == 0)

    def alignment(self) -> int:
        """Largest power of two (up to 1 MiB) that divides ``offset``."""
        if self.offset == 0:
            return 1 << 20
        return min(self.offset & -self.offset, 1 << 20)


class FileStamp(NamedTuple):
    """What identifies one version of a file: device, inode, size, modification and change times.

    The change time (ctime) cannot be set back by a program the way the
    modification time can (``cp -p``, ``rsync -t``, ``tar -x``), so an in-place
    rewrite that restores the mtime is still seen.
    """

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path_or_fd: str | int) -> FileStamp:
        return cls.of_stat(os.stat(path_or_fd))

    @classmethod
    def of_stat(cls, st: os.stat_result) -> FileStamp:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def changes_in(self, fd: int) -> str:
        """What changed in the file open as ``fd`` since this stamp, in words (``""`` for nothing).

        Replacing the file by rename unlinks this inode, which moves its change time and nothing else:
        an unlinked inode (no name left to write through) only counts as changed if size or mtime moved.
        """
        st = os.fstat(fd)
        now = FileStamp.of_stat(st)
        if st.st_nlink == 0:
            now = now._replace(ctime_ns=self.ctime_ns)
        return "" if now == self else self.differences(now)

    def differences(self, other: FileStamp) -> str:
        """'size 100 -> 40, replaced (inode 5 -> 9)': what changed, for error messages."""
        out = []
        if (self.dev, self.ino) != (other.dev, other.ino):
            out.append(f"replaced (inode {self.ino} -> {other.ino})")
        if self.size != other.size:
            out.append(f"size {self.size} -> {other.size} bytes")
        if (self.mtime_ns, self.ctime_ns) != (other.mtime_ns, other.ctime_ns) and not out:
            out.append("modified in place (same size, new modification or change time)")
        return ", ".join(out)


class Catalog(Mapping[str, TensorEntry]):
    """Every tensor of a checkpoint, by name; see :func:`sparsemap.open`. Frozen, torch-free.

    Attributes:
        source: the path opened (a file, or a shard index).
        format: ``"safetensors"``, ``"torch-zip"``, ``"gguf"``, ``"sharded-<formats>"``, ...
        entries: tensor name -> where its bytes are.
        metadata: the file's string metadata (safetensors ``__metadata__``, GGUF scalars).
        stamps: each file as it was when its header was parsed; the torch side
            refuses a file that no longer matches (:class:`~sparsemap.errors.FileChangedError`).
        quantized: weight name -> its stored parts, for weights kept quantized in
            the kernels' layouts (see :mod:`sparsemap.formats.quantized`); each is also
            an entry, with ``encoding`` ``"int4"`` or ``"int8"``.

    Example:
        >>> cat = sparsemap.open("model.safetensors")        # doctest: +SKIP
        >>> cat["embed.weight"].shape, cat["embed.weight"].offset
        ((50304, 768), 8192)
        >>> sparsemap.Checkpoint(cat).tensor("embed.weight")  # a zero-copy view (torch)
    """

    # A plain slotted class rather than a frozen dataclass: this module is imported by every load,
    # and generating a dataclass's methods costs half a millisecond of import time.
    __slots__ = ("entries", "format", "metadata", "quantized", "source", "stamps")
    source: str
    format: str
    entries: Mapping[str, TensorEntry]
    metadata: Mapping[str, str]
    stamps: Mapping[str, FileStamp]
    quantized: Mapping[str, QuantizedWeight]

    def __init__(self, source: str, format: str, entries: Mapping[str, TensorEntry],
                 metadata: Mapping[str, str] | None = None,
                 stamps: Mapping[str, FileStamp] | None = None,
                 quantized: Mapping[str, QuantizedWeight] | None = None) -> None:
        # Read-only copies: a caller's dict changed later (stamps cleared, an entry added) must not
        # change what the catalog says, and nothing may turn the file checks off.
        init = object.__setattr__  # the only place attributes are set
        init(self, "source", source)
        init(self, "format", format)
        init(self, "entries", MappingProxyType(dict(entries)))
        init(self, "metadata", MappingProxyType(dict(metadata or {})))
        init(self, "stamps", MappingProxyType(dict(stamps or {})))
        init(self, "quantized", MappingProxyType(dict(quantized or {})))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"a Catalog is frozen: cannot set {name!r} (build a new one)")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"a Catalog is frozen: cannot delete {name!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Catalog):
            return NotImplemented
        return (self.source, self.format, self.entries, self.metadata, self.stamps, self.quantized) == \
            (other.source, other.format, other.entries, other.metadata, other.stamps, other.quantized)

    def __hash__(self) -> int:
        return hash((self.source, self.format, len(self.entries), frozenset(self.stamps.items())))

    def __getattr__(self, name: str) -> Any:
        if name in ("tensor", "mapper"):  # the catalog served tensors before it became torch-free
            raise AttributeError(f"Catalog.{name} is gone: a catalog describes, a sparsemap.Checkpoint maps "
                                 "(sparsemap.Checkpoint(catalog).tensor(name))")
        raise AttributeError(f"'Catalog' object has no attribute {name!r}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled by value through __init__ (the default would set slots through __setattr__).
        return (Catalog, (self.source, self.format, dict(self.entries), dict(self.metadata),
                          dict(self.stamps), dict(self.quantized)))

    def __repr__(self) -> str:
        return (f"Catalog({self.source!r}, format={self.format!r}, tensors={len(self.entries)}, "
                f"nbytes={self.nbytes})")

    def __getitem__(self, name: str) -> TensorEntry:
        return self.entries[name]

    def __contains__(self, name: object) -> bool:  # the ABC's version goes through __getitem__ and a try
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def files(self) -> list[str]:
        """The files tensors live in, in order of first appearance."""
        return list(dict.fromkeys(e.file for e in self.entries.values()))

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data as loaded, counting tied tensors (same bytes, same view) once.

        For quantized tensors this is the packed size in the file (scales included).
        """
        seen = {(e.file, e.offset, e.shape, e.strides, e.dtype): e for e in self.entries.values()}
        total = sum(e.nbytes if e.strides is None else e.numel * ITEMSIZE[e.dtype] for e in seen.values())
        weights = {(w.q.file, w.q.offset): w for w in self.quantized.values()}  # tied weights: once
        return total + sum(w.nbytes - w.q.nbytes for w in weights.values())

    def required_nbytes(self) -> dict[str, int]:
        """For each file, the size it must have at least: the end of its last tensor."""
        need: dict[str, int] = {}
        parts = (p for w in self.quantized.values() for p in w.parts)
        for e in (*self.entries.values(), *parts):
            need[e.file] = max(need.get(e.file, 0), e.end)
        return need

    def _stored_spans(self) -> dict[str, list[tuple[str, int, int]]]:
        """Per dtype label, the (file, start, end) byte ranges its tensors occupy in the files."""
        spans: dict[str, list[tuple[str, int, int]]] = {}
        for e in self.entries.values():
            key = e.dtype if e.encoding is None else f"{e.encoding}->{e.dtype}"
            w = self.quantized.get(e.name)
            for part in (e,) if w is None else w.parts:
                spans.setdefault(key, []).append((part.file, part.offset, part.end))
        return spans

    @property
    def stored_nbytes(self) -> int:
        """Bytes of the files that hold tensor data, each byte once: tied names, views that share a
        storage (``x`` and ``x.t()`` saved together) and overlapping quantized parts count once; the
        padding a converted file keeps between a view's rows counts, as the file stores it."""
        return _union_nbytes([span for spans in self._stored_spans().values() for span in spans])

    def summary(self) -> dict[str, Any]:
        """Totals for reports: tensors, bytes (stored in the files, each byte once; and as loaded), dtypes,
        files."""
        by_dtype = {key: _union_nbytes(spans) for key, spans in self._stored_spans().items()}
        return {
            "source": self.source,
            "format": self.format,
            "tensors": len(self.entries),
            "nbytes": self.nbytes,
            "stored_nbytes": self.stored_nbytes,
            "files": self.files,
            "bytes_by_dtype": by_dtype,
        }


# No tensor can span more bytes than a signed 64-bit size: torch multiplies shapes in int64.
MAX_NBYTES = (1 << 63) - 1


def fits_int64(shape: tuple[int, ...] | list[int], itemsize: int) -> bool:
    """Whether ``shape`` of ``itemsize``-byte elements stays within :data:`MAX_NBYTES`, its zero dimensions
    counted as one: an empty tensor still has its other dimensions multiplied by torch (``(0, 2**62,
    2**62)`` is "Stride calculation overflowed"), so those must fit too."""
    total = itemsize
    for d in shape:
        total *= max(d, 1)
        if total > MAX_NBYTES:
            return False
    return True


def repeated_stride(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, int] | None:
    """``(stride, extent)`` of the first dimension whose stride lies inside the span of the smaller ones
    (the view reads some element at two indexes), or ``None`` when no two elements share bytes.

    A sufficient rule, met by every slice, transpose and permutation of a contiguous tensor and by
    every layout the writer makes: ordered by stride, each dimension's stride reaches past everything
    the smaller ones span. Empty views repeat nothing.

    Example:
        >>> repeated_stride((4, 6), (8, 1)), repeated_stride((10**9,), (0,))
        (None, (0, 1))
    """
    if 0 in shape:
        return None
    extent = 1
    for d, s in sorted(((d, s) for d, s in zip(shape, strides, strict=True) if d > 1), key=lambda t: t[1]):
        if s < extent:
            return s, extent
        extent += s * (d - 1)
    return None


def check_name(name: str, path: str, what: str = "tensor name") -> None:
    """Refuse a name that is not valid UTF-8: a str holding a lone surrogate (JSON's ``"\\ud800"``, a
    pickle's surrogatepass strings) cannot be written back to any file, and no other reader accepts it
    (the safetensors library refuses it).

    Raises:
        InvalidNameError: naming the path and the name, escaped.
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidNameError(f"{what} {ascii(name)[:120]} is not valid UTF-8 (a lone surrogate at "
                               f"character {e.start})", path=path) from None


def _union_nbytes(spans: list[tuple[str, int, int]]) -> int:
    """Bytes covered by (file, start, end) ranges, each byte once."""
    total, last_file, reach = 0, None, 0
    for file, start, end in sorted(spans):
        if file != last_file:
            last_file, reach = file, 0
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total
