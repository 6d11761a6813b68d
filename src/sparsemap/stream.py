"""Streaming a checkpoint to a device through a bounded ring of host buffers.

Mapping a file and copying from it costs host memory as large as the model
(the page cache, or pinned copies) and reads the disk in page-sized faults.
Here ``K`` reader threads fill a ring of host buffers (pinned for a GPU,
plain for the CPU) with large ``pread`` calls, and the main thread copies each
filled buffer to the destination tensors, on a CUDA stream that overlaps the
next reads. Host memory stays bounded by the ring (``staging`` bytes) whatever
the model's size; tensors larger than a buffer travel in pieces, small ones
share a buffer. dtype casts happen on the destination after the bytes arrive,
so the host never holds a converted copy. Each file's stamp is checked once its
reads are done: a file written or truncated while it was read raises
:class:`~sparsemap.errors.FileChangedError` instead of returning tensors that
mix two versions of it.

``O_DIRECT`` (reads that bypass the page cache) is used where the filesystem
allows it and a short measurement on the first buffers (a block read each
way) shows it faster; a file already in the page cache is faster read
through it.

                 readers (K threads)                 main thread
    file --pread--> [buf 0][buf 1]...[buf N-1] --copy--> destination tensors
           <---------------- free buffers <--------------   (cast there)
"""

from __future__ import annotations

import ctypes
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .checkpoint import Checkpoint, Source
from .errors import BadInputError, FileChangedError, TruncatedFileError
from .formats.catalog import FileStamp, TensorEntry
from .mapped import TORCH_DTYPES
from .units import parse_size

PAGE = 4096
DEFAULT_STAGING = 256 << 20
MAX_BUFFER = 64 << 20  # larger buffers add latency before the first copy, not speed
MAX_GAP = 64 << 10  # tensors this close in a file share one read (the gap is read and ignored)
DIRECT_TRIAL_CHUNKS = 4  # buffers read each way before choosing O_DIRECT or not


# ---------------------------------------------------------------- the plan: which bytes go where


@dataclass(frozen=True)
class Piece:
    """Buffer bytes ``[src, src + nbytes)`` of a chunk go to bytes ``[dst, dst + nbytes)`` of ``name``."""

    name: str
    src: int
    dst: int
    nbytes: int


@dataclass(frozen=True)
class Chunk:
    """One read: ``nbytes`` of ``file`` from ``offset``, scattered into ``pieces``."""

    file: str
    offset: int
    nbytes: int
    pieces: tuple[Piece, ...]


def streamable(entry: TensorEntry) -> bool:
    """Whether ``entry`` is plain stored bytes (not quantized, not a layout view), so it can be streamed."""
    return entry.encoding is None and entry.strides is None and entry.order is None


def plan_chunks(entries: Iterable[TensorEntry], buffer_nbytes: int, max_gap: int = MAX_GAP) -> list[Chunk]:
    """Cut the entries' bytes into reads of at most ``buffer_nbytes``, in file order.

    Neighbouring tensors (gaps up to ``max_gap``) share a read; a tensor
    larger than a buffer spans several.
    """
    chunks: list[Chunk] = []
    file, start, end, pieces = "", 0, 0, []  # the chunk being built

    def flush() -> None:
        if pieces:
            chunks.append(Chunk(file, start, end - start, tuple(pieces)))

    for e in sorted(entries, key=lambda e: (e.file, e.offset)):
        done = 0
        while done < e.nbytes:
            pos = e.offset + done
            fits = e.file == file and pieces and 0 <= pos - end <= max_gap and pos - start < buffer_nbytes
            if not fits:
                flush()
                file, start, end, pieces = e.file, pos, pos, []
            take = min(e.nbytes - done, buffer_nbytes - (pos - start))
            pieces.append(Piece(e.name, pos - start, done, take))
            done += take
            end = pos + take
    flush()
    return chunks


# ---------------------------------------------------------------- the ring


class _Buffer:
    """One staging buffer: page-aligned (for O_DIRECT), pinned for a GPU, with the event of its last copy."""

    def __init__(self, nbytes: int, pinned: bool) -> None:
        # One page of slack each side: an O_DIRECT read starts on the page below the data.
        self.storage = torch.empty(nbytes + 3 * PAGE, dtype=torch.uint8, pin_memory=pinned)
        base = self.storage.data_ptr()
        self.start = -base % PAGE  # first page-aligned byte
        self.nbytes = nbytes + 2 * PAGE
        self.address = base + self.start
        self.tensor = self.storage[self.start:self.start + self.nbytes]
        self.copied: torch.cuda.Event | None = None  # set when a device copy from it is in flight

    def view(self, offset: int, nbytes: int) -> memoryview:
        return memoryview((ctypes.c_char * nbytes).from_address(self.address + offset)).cast("B")

    def wait_for_copies(self) -> None:
        if self.copied is not None:
            self.copied.synchronize()
            self.copied = None


def _check_staging(nbytes: int) -> int:
    if nbytes < PAGE:
        raise BadInputError(f"staging of {nbytes} bytes is less than one page ({PAGE}): every read would "
                            "be tiny; use at least 4K (256M is the default)")
    return nbytes


# ---------------------------------------------------------------- reading


def _direct_fd(path: str) -> int | None:
    """An O_DIRECT descriptor of ``path``, or None where the filesystem refuses it (tmpfs, some FUSE)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_RDONLY | flag | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None


@dataclass
class _Files:
    """Open descriptors per file: buffered always, O_DIRECT where allowed; and each file's stamp."""

    buffered: dict[str, int] = field(default_factory=dict)
    direct: dict[str, int | None] = field(default_factory=dict)
    stamps: dict[str, FileStamp] = field(default_factory=dict)  # each file as its reads began

    def open(self, paths: Iterable[str], want_direct: bool, stamps: Mapping[str, FileStamp]) -> None:
        for p in paths:
            self.buffered[p] = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            now = FileStamp.of(self.buffered[p])
            if p in stamps and now != stamps[p]:
                raise FileChangedError(f"changed since its header was read: {stamps[p].differences(now)}; "
                                       "open it again", path=p)
            self.stamps[p] = now
            self.direct[p] = _direct_fd(p) if want_direct else None

    def check(self, path: str, note: str = "") -> None:
        """Raise :class:`FileChangedError` if ``path`` was written or truncated since its reads began.

        Called once every read of the file is done: a stamp that has not moved by then means every
        byte read belongs to one version. A file replaced by rename is no change here: the descriptors
        read the old inode, whole, to the end (as a mapping does).
        """
        changed = self.stamps[path].changes_in(self.buffered[path])
        if changed:
            raise FileChangedError(f"changed while it was being read: {changed}{note}; the "
                                   "tensors read would mix two versions of it (stream it again)", path=path)

    def close(self) -> None:
        for fd in itertools.chain(self.buffered.values(), self.direct.values()):
            if fd is not None:
                os.close(fd)


def _read_chunk(files: _Files, chunk: Chunk, buf: _Buffer, direct: bool) -> int:
    """Read ``chunk`` into ``buf``; returns where its first byte landed in the buffer."""
    fd = files.direct[chunk.file] if direct else None
    if fd is not None:
        lo = chunk.offset - chunk.offset % PAGE  # O_DIRECT: aligned offset, length and memory
        hi = min(-(-(chunk.offset + chunk.nbytes) // PAGE) * PAGE, lo + buf.nbytes)
        want, skip = hi - lo, chunk.offset - lo
    else:
        fd, lo, want, skip = files.buffered[chunk.file], chunk.offset, chunk.nbytes, 0
    got = 0
    while got < want:
        n = os.preadv(fd, [buf.view(got, want - got)], lo + got)
        if n == 0:
            break
        got += n
    if got < skip + chunk.nbytes:
        # A file shorter than when its reads began was truncated under them: a change, not a bad file.
        files.check(chunk.file, f" (truncated while loading? read {max(0, got - skip)} of {chunk.nbytes} "
                                f"bytes at offset {chunk.offset})")
        size = os.fstat(files.buffered[chunk.file]).st_size
        raise TruncatedFileError(f"read {max(0, got - skip)} of {chunk.nbytes} bytes at offset "
                                 f"{chunk.offset}: "
                                 f"the file is {size} bytes (truncated while loading?)", path=chunk.file,
                                 tensor=chunk.pieces[0].name)
    return skip


class _DirectChooser:
    """O_DIRECT or the page cache: forced, or chosen by reading the first buffers both ways.

    The first ``DIRECT_TRIAL_CHUNKS`` chunks are read with O_DIRECT, the next
    as many through the page cache: each a sequential block, so the page
    cache's readahead works as it would for the whole file. Every later chunk
    waits for both blocks, then uses whichever moved more bytes per second of
    its block's wall time. No trial for small loads, or where O_DIRECT is refused.
    """

    def __init__(self, forced: bool | None, possible: bool, n_chunks: int, stop: threading.Event) -> None:
        self.forced, self.possible, self.stop = forced, possible, stop
        trial = forced is None and possible and n_chunks >= 4 * DIRECT_TRIAL_CHUNKS
        self.n_trial = 2 * DIRECT_TRIAL_CHUNKS if trial else 0
        self.left = self.n_trial
        self.blocks: dict[str, list[float]] = {}  # mode -> [bytes, first start, last end]
        self.done = threading.Condition()
        self.choice: bool | None = None

    def use_direct(self, i: int) -> bool:
        if self.forced is not None:
            return self.forced and self.possible
        if i < self.n_trial:
            return i < self.n_trial // 2
        with self.done:
            while self.left and not self.stop.is_set():
                self.done.wait(0.05)
            return self.verdict()

    def record(self, i: int, direct: bool, nbytes: int, start: float, end: float) -> None:
        if i >= self.n_trial:
            return
        with self.done:
            block = self.blocks.setdefault("direct" if direct else "buffered", [0, start, end])
            block[0] += nbytes
            block[1], block[2] = min(block[1], start), max(block[2], end)
            self.left -= 1
            self.done.notify_all()

    def verdict(self) -> bool:
        """What the chunks after the trial use."""
        if self.forced is not None:
            return self.forced and self.possible
        if self.choice is None:
            speeds = self.speeds()
            self.choice = (bool(self.n_trial) and not self.left and len(speeds) == 2
                           and speeds["direct"] > speeds["buffered"])
        return self.choice

    def speeds(self) -> dict[str, float]:
        """MB/s of each trial block."""
        return {k: b / (e - s) / 1e6 for k, (b, s, e) in self.blocks.items() if e > s}


# ---------------------------------------------------------------- the report


@dataclass(frozen=True)
class StreamReport:
    """What one streamed load did."""

    nbytes: int
    seconds: float
    device: str
    readers: int
    buffers: int
    buffer_nbytes: int
    chunks: int
    direct: bool  # O_DIRECT used after the trial
    trial_mb_per_s: dict[str, float]  # the trial's speed each way ("direct", "buffered")

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        trial = ", ".join(f"{k} {v:,.0f} MB/s" for k, v in self.trial_mb_per_s.items()) or "no trial"
        return (f"streamed {self.nbytes / 1e9:.2f} GB to {self.device} in {self.seconds:.2f} s "
                f"({self.gb_per_s:.2f} GB/s) through {self.buffers} x {self.buffer_nbytes / 2**20:.0f} MiB "
                f"buffers, {self.readers} readers, {'O_DIRECT' if self.direct else 'page cache'} reads "
                f"(trial: {trial})")


# ---------------------------------------------------------------- the pipeline


def _ring_shape(staging: int, readers: int) -> tuple[int, int]:
    """(buffers, data bytes each) for a ring of ``staging`` bytes.

    One buffer per reader plus two (one being copied, one spare), each at
    most :data:`MAX_BUFFER`; each buffer also holds three pages of slack for
    O_DIRECT's aligned reads, counted inside ``staging`` when there is room.
    """
    count = max(1, min(readers + 2, staging // (4 * PAGE)))
    each = min(MAX_BUFFER, staging // count)
    count = max(1, staging // each)
    return count, max(each - 3 * PAGE, min(each, PAGE))


def stream_tensors(source: Source | Checkpoint, names: Sequence[str] | None = None, *,
                   device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None, staging: int | str = DEFAULT_STAGING, readers: int = 2,
                   direct: bool | None = None, drop_cache: bool = False,
                   on_bytes: Callable[[int], None] | None = None
                   ) -> tuple[dict[str, torch.Tensor], StreamReport]:
    """Read tensors of ``catalog`` into new tensors on ``device`` through a ring of ``staging`` bytes.

    Args:
        source: a checkpoint path, catalog or :class:`~sparsemap.Checkpoint`
            (streaming reads the files with ``pread``; it maps nothing).
        names: which tensors (default: all). They must be plain stored
            tensors (not quantized, not a layout view); others raise.
        device: ``"cpu"`` (anonymous memory, plain buffers) or ``"cuda:N"``
            (pinned buffers, copies on a side stream).
        dtype: cast floating tensors to this, on the device, after the copy.
        staging: the ring's total size (``"256M"``); at least one page.
        readers: reader threads.
        direct: O_DIRECT reads: ``None`` chooses by a short measurement,
            ``True``/``False`` forces (``True`` falls back where refused).
        drop_cache: drop each range from the page cache once copied.
        on_bytes: called (in the calling thread) with the bytes of each chunk copied, after its
            buffer is handed back: a progress hook, and where a caller measures host memory
            (the streamer itself reads no ``/proc`` file).

    Returns:
        ``(tensors by name, report)``.

    Raises:
        FileChangedError: a file is no longer the one the catalog parsed, or was
            written or truncated while it was read (its stamp is checked once
            its reads are done, so no tensor returned mixes two versions); every
            reader thread has stopped when it is raised. A file replaced by
            rename meanwhile is read whole in the version opened.
        TruncatedFileError: the file ended before the bytes its header promised, unchanged.

    Example:
        >>> tensors, report = stream_tensors("model.safetensors", device="cuda:0", staging="256M",
        ...                                  readers=4)                       # doctest: +SKIP
        >>> print(report)
    """
    started = time.perf_counter()
    catalog = Checkpoint.of(source).catalog
    device = torch.device(device)
    staging_nbytes = _check_staging(parse_size(staging))
    if readers < 1:
        raise BadInputError(f"readers must be at least 1, got {readers}")
    wanted = list(dict.fromkeys(names)) if names is not None else list(catalog)  # each name once
    unknown = [n for n in wanted if n not in catalog]
    if unknown:
        raise BadInputError(f"{len(unknown)} tensors are not in the checkpoint, e.g. {unknown[0]!r}",
                            path=catalog.source)
    entries = [catalog[n] for n in wanted]
    for e in entries:
        if not streamable(e):
            raise BadInputError(f"tensor is stored {'quantized' if e.encoding else 'in a layout view'}; "
                                "stream only plain tensors (load it mapped)", path=e.file, tensor=e.name)
    n_buffers, buffer_nbytes = _ring_shape(staging_nbytes, readers)
    chunks = plan_chunks(entries, buffer_nbytes)
    transfer = _Transfer(entries, device, dtype)
    files = _Files()
    try:
        files.open(sorted({c.file for c in chunks}), want_direct=direct is not False, stamps=catalog.stamps)
        ring = [_Buffer(buffer_nbytes, pinned=device.type == "cuda")
                for _ in range(min(n_buffers, max(1, len(chunks))))]
        with _Readers(chunks, files, ring, readers, direct) as filled:
            transfer.copy_all(filled, files, drop_cache=drop_cache, on_bytes=on_bytes)
        for path in files.buffered:  # every read is done: the version read must be the one there still
            files.check(path)
    finally:
        files.close()
    report = StreamReport(nbytes=sum(e.nbytes for e in entries), seconds=time.perf_counter() - started,
                          device=str(device), readers=readers, buffers=len(ring), buffer_nbytes=buffer_nbytes,
                          chunks=len(chunks), direct=filled.chooser.verdict(),
                          trial_mb_per_s=filled.chooser.speeds())
    return transfer.result, report


class _Transfer:
    """The destination side: one byte tensor per entry on the device, filled piece by piece.

    A tensor is finished (viewed in its dtype, shaped, cast on the device if
    asked) as soon as its last piece has arrived.
    """

    def __init__(self, entries: list[TensorEntry], device: torch.device, dtype: torch.dtype | None) -> None:
        self.device, self.dtype = device, dtype
        self.entries = {e.name: e for e in entries}
        self.out = {e.name: torch.empty(e.nbytes, dtype=torch.uint8, device=device) for e in entries}
        self.remaining = {e.name: e.nbytes for e in entries}
        self.result: dict[str, torch.Tensor] = {}
        self.copy_stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        for e in entries:
            if e.nbytes == 0:
                self._finish(e.name)

    def copy_all(self, filled: _Readers, files: _Files, *, drop_cache: bool,
                 on_bytes: Callable[[int], None] | None) -> None:
        try:
            self._copy_all(filled, files, drop_cache=drop_cache, on_bytes=on_bytes)
        finally:
            if self.copy_stream is not None:  # copies in flight must end before their memory is freed
                self.copy_stream.synchronize()

    def _copy_all(self, filled: _Readers, files: _Files, *, drop_cache: bool,
                  on_bytes: Callable[[int], None] | None) -> None:
        for chunk, buf, skip in filled:
            if self.copy_stream is not None:
                with torch.cuda.stream(self.copy_stream):
                    _scatter(chunk, buf, skip, self.out, non_blocking=True)
                    buf.copied = torch.cuda.Event()
                    buf.copied.record(self.copy_stream)
            else:
                _scatter(chunk, buf, skip, self.out, non_blocking=False)
            if drop_cache:
                os.posix_fadvise(files.buffered[chunk.file], chunk.offset, chunk.nbytes,
                                 os.POSIX_FADV_DONTNEED)
            filled.give_back(buf)
            if on_bytes is not None:
                on_bytes(chunk.nbytes)
            for p in chunk.pieces:
                self.remaining[p.name] -= p.nbytes
                if self.remaining[p.name] == 0:
                    self._finish(p.name)
        if self.copy_stream is not None:
            self.copy_stream.synchronize()

    def _finish(self, name: str) -> None:
        if self.copy_stream is not None:  # later work on the tensor waits for its copies
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        e = self.entries[name]
        t = self.out.pop(name).view(TORCH_DTYPES[e.dtype]).reshape(e.shape)
        if self.dtype is not None and t.is_floating_point() and t.dtype != self.dtype:
            t = t.to(self.dtype)  # on the device: the host never holds a converted copy
        self.result[name] = t


class _Readers:
    """``K`` threads reading chunks into free ring buffers; iterating yields them as they fill.

    Chunks are handed out in file order; a buffer goes back to the readers
    with :meth:`give_back`. A reader's exception stops the others and is
    raised from the iteration. Leaving the ``with`` block stops and joins
    every thread, whatever happened.
    """

    def __init__(self, chunks: list[Chunk], files: _Files, ring: list[_Buffer], readers: int,
                 direct: bool | None) -> None:
        self.chunks, self.files = chunks, files
        self.free: queue.Queue[_Buffer] = queue.Queue()
        for b in ring:
            self.free.put(b)
        self.ready: queue.Queue[tuple[int, _Buffer, int] | BaseException] = queue.Queue()
        self.stop = threading.Event()
        self.next_index = itertools.count()
        self.index_lock = threading.Lock()
        possible = any(fd is not None for fd in files.direct.values())
        self.chooser = _DirectChooser(direct, possible, len(chunks), self.stop)
        self.threads = [threading.Thread(target=self._run, name=f"sparsemap-reader-{k}", daemon=True)
                        for k in range(readers)]

    def __enter__(self) -> _Readers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def __iter__(self) -> Iterator[tuple[Chunk, _Buffer, int]]:
        for _ in range(len(self.chunks)):
            item = self.ready.get()
            if isinstance(item, BaseException):
                raise item
            i, buf, skip = item
            yield self.chunks[i], buf, skip

    def give_back(self, buf: _Buffer) -> None:
        self.free.put(buf)

    def _take_buffer(self) -> _Buffer | None:
        while not self.stop.is_set():
            try:
                return self.free.get(timeout=0.05)
            except queue.Empty:
                continue
        return None

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                with self.index_lock:
                    i = next(self.next_index)
                if i >= len(self.chunks):
                    return
                # Asked before taking a buffer: a reader waiting for the trial's verdict holds none.
                how = self.chooser.use_direct(i)
                buf = self._take_buffer()
                if buf is None:
                    return
                buf.wait_for_copies()
                t0 = time.perf_counter()
                skip = _read_chunk(self.files, self.chunks[i], buf, how)
                self.chooser.record(i, how, self.chunks[i].nbytes, t0, time.perf_counter())
                self.ready.put((i, buf, skip))
        except BaseException as e:  # handed to the caller, which raises it
            self.stop.set()
            self.ready.put(e)


def _scatter(chunk: Chunk, buf: _Buffer, skip: int, out: dict[str, torch.Tensor], *,
             non_blocking: bool) -> None:
    for p in chunk.pieces:
        src = buf.tensor[skip + p.src: skip + p.src + p.nbytes]
        out[p.name][p.dst:p.dst + p.nbytes].copy_(src, non_blocking=non_blocking)
