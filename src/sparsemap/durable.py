"""Durable file writes: all or nothing on disk, with a bounded amount of unwritten data. No torch.

What a crash leaves behind. :func:`atomic_write` writes under a temporary name
in the destination folder (``.<name>.<pid>.<8 hex>.tmp``), then ``fsync``,
``rename`` over the destination, ``fsync`` of the folder. Until the rename the
destination is untouched; after the folder's ``fsync`` the new file is the
destination even across a power loss. A writer killed outright (SIGKILL, OOM
kill, power loss) therefore leaves the old file, or none, plus its temporary
file; the next write of the same destination deletes temporaries whose writer
is gone (:func:`remove_stale_temporaries`). Writing a new inode also means a
process that has the old file mapped keeps reading the old bytes.

Why dirty pages are bounded. Bytes written but not yet on disk sit in the page
cache as dirty pages, and the kernel charges them to the writer's memory
cgroup like any other memory: converting a 10 GB model in a 4 GB container
would otherwise be OOM-killed by its own output. :class:`WritebackSink` starts
writeback of what it has written every :data:`WRITEBACK_WINDOW`, waits for it
and drops the written pages from the cache, so at most about two windows are
dirty at any time (``sync_file_range`` on Linux; a full ``fdatasync`` elsewhere).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import glob
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

# Output written but not yet on disk is kept under about two windows: dirty
# page cache counts against a cgroup's memory limit like anything else.
WRITEBACK_WINDOW = 32 << 20

# Each os.write gets at most this much, so progress and the writeback check come at least this often.
_WRITE_NBYTES = 64 << 20

# ---------------------------------------------------------------- all or nothing


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[int]:
    """A file descriptor to write ``path`` with: temp file, fsync, rename, fsync of the folder.

    On any exception the temporary file is removed and ``path`` is untouched.
    A writer killed outright (SIGKILL, power loss) leaves ``path`` untouched
    too, and its temporary file is removed by the next write of ``path``.
    Writing to a new inode also means a process that has the old file mapped
    keeps reading the old bytes.

    Args:
        path: the destination; its folder must exist and be writable.

    Returns:
        A context manager giving a write-only descriptor of the temporary file.

    Example:
        >>> with atomic_write("model.safetensors") as fd:   # doctest: +SKIP
        ...     os.write(fd, data)
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
            os.fsync(dir_fd)  # the rename itself is durable only once the folder is
        finally:
            os.close(dir_fd)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files a killed writer of ``path`` left behind; return those deleted.

    Only names exactly of :func:`atomic_write`'s form for this ``path``
    (``.<name>.<pid>.<8 hex>.tmp``) are considered, so another destination's
    temporaries (``a.safetensors.5`` next to ``a.safetensors``) are never touched.
    A live writer holds a lock on its temporary file for as long as it writes
    (``lockf``), whatever its pid namespace or host; a file whose lock can be
    taken at once has no writer left. Temporaries named with this process's
    own pid are left alone: ``lockf`` locks belong to the process, so probing
    one would succeed against our own live writer (another thread's), and
    closing the probe would release that writer's lock.

    Example:
        >>> remove_stale_temporaries("model.safetensors")   # doctest: +SKIP
        [PosixPath('.model.safetensors.4242.abcdabcd.tmp')]
    """
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[0-9a-f]{{8}}\.tmp")
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        match = pattern.fullmatch(tmp.name)
        if match is None or int(match[1]) == os.getpid() or not _abandoned(tmp):
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


# ---------------------------------------------------------------- bounded writeback

# The C library is already loaded: dlopen(NULL) reaches it without find_library's ldconfig run.
_libc = ctypes.CDLL(None, use_errno=True)
_SYNC_WAIT_BEFORE, _SYNC_WRITE, _SYNC_WAIT_AFTER = 1, 2, 4  # SYNC_FILE_RANGE_* of <fcntl.h>


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


class WritebackSink:
    """Writes a file sequentially, keeping what is written but not yet on disk under two windows.

    Args:
        fd: a descriptor open for writing, positioned at the start of the file.
        on_bytes: called with each number of bytes written (progress).

    Example:
        >>> with atomic_write("out.bin") as fd:   # doctest: +SKIP
        ...     sink = WritebackSink(fd)
        ...     sink.write(header)
        ...     sink.zeros(4096 - len(header))
    """

    def __init__(self, fd: int, on_bytes: Callable[[int], None] | None = None) -> None:
        self.fd = fd
        self.position = 0  # bytes written so far
        self.flushed = 0  # everything before this is on disk and dropped from the cache
        self.on_bytes = on_bytes

    def write(self, data: memoryview | bytes) -> None:
        """Write all of ``data`` (short writes are retried), then write back if two windows are dirty."""
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self.fd, view[:_WRITE_NBYTES])
            view = view[n:]
            self.position += n
            if self.on_bytes is not None:
                self.on_bytes(n)
            if self.position - self.flushed >= 2 * WRITEBACK_WINDOW:
                self._writeback(self.position - WRITEBACK_WINDOW)

    def zeros(self, nbytes: int) -> None:
        """Write ``nbytes`` zero bytes (padding), through one buffer of at most 1 MiB."""
        block = bytes(min(nbytes, 1 << 20))
        while nbytes:
            n = min(nbytes, len(block))
            self.write(block[:n])
            nbytes -= n

    def _writeback(self, upto: int) -> None:
        # Start writeback of everything up to `upto`, wait for it, drop it from the cache.
        _sync_file_range(self.fd, self.flushed, upto - self.flushed,
                         _SYNC_WAIT_BEFORE | _SYNC_WRITE | _SYNC_WAIT_AFTER)
        os.posix_fadvise(self.fd, self.flushed, upto - self.flushed, os.POSIX_FADV_DONTNEED)
        self.flushed = upto
