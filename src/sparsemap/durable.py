"""Durable file writes: all or nothing on disk, with a bounded amount of unwritten data. No torch.

What a crash leaves behind. :func:`atomic_write` writes under a temporary name
in the destination folder (``.<name>.<pid>.<8 hex>.tmp``), then ``fsync``,
lets the caller verify the temporary (the writer reopens it as the file it
planned), ``rename`` over the destination, ``fsync`` of the folder. Until the rename the
destination is untouched; after the folder's ``fsync`` the new file is the
destination even across a power loss. A writer killed outright (SIGKILL, OOM
kill, power loss) therefore leaves the old file, or none, plus its temporary
file; the next write of the same destination deletes temporaries whose writer
is gone (:func:`remove_stale_temporaries`): a writer is alive while it holds a
lock on its temporary, a lock of its open file (not of its process, so threads
of one process writing one path see each other too). Nothing a folder holds
under a temporary's name (a FIFO, a link, a device) is ever opened for writing.
Writing a new inode also means a process that has the old file mapped keeps
reading the old bytes. A destination that is not a file (a folder, a FIFO, a
socket, a device) or lies in a missing folder is refused before any work
(:func:`check_destination`).

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
import errno
import fcntl
import glob
import os
import re
import secrets
import stat
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import DestinationError

# Output written but not yet on disk is kept under about two windows: dirty
# page cache counts against a cgroup's memory limit like anything else.
WRITEBACK_WINDOW = 32 << 20

# Each os.write gets at most this much, so progress and the writeback check come at least this often.
_WRITE_NBYTES = 64 << 20

# A copy the kernel will not do goes through a buffer this big at most.
_COPY_BUFFER_NBYTES = 8 << 20

# Fresh temporary names tried before giving up: a name is taken only by a hostile or very unlucky
# folder (8 random hex digits), and O_EXCL never opens what is there, so each try is one failed open.
_TEMPORARY_TRIES = 16

# ---------------------------------------------------------------- the destination


def check_destination(path: str | os.PathLike[str]) -> None:
    """Refuse a destination that cannot receive a file by rename; cheap, so callers do it before any work.

    A new file, or a regular file (or a link to one) to replace, is fine. A folder, a FIFO, a socket or
    a device is not: renaming over a FIFO or a device would silently swap it for a file, and a folder
    cannot be replaced at all. Nor is a destination whose folder is missing or not a folder.

    Raises:
        DestinationError: naming the destination, or its folder when that is what is wrong.

    Example:
        >>> check_destination("/tmp")
        Traceback (most recent call last):
        ...
        sparsemap.errors.DestinationError: /tmp: is a folder, not a file: give a file name inside it
    """
    text = os.fspath(path)
    if text.endswith(("/", os.sep)):
        raise DestinationError("names a folder (it ends in a slash), not a file", path=text)
    folder = os.path.dirname(text) or "."
    try:
        folder_mode = os.stat(folder).st_mode
    except FileNotFoundError:
        raise DestinationError("the destination's folder does not exist (create it first)",
                               path=folder) from None
    except NotADirectoryError:
        raise DestinationError("the destination's folder is not a folder (a file is in the way)",
                               path=folder) from None
    if not stat.S_ISDIR(folder_mode):
        raise DestinationError("the destination's folder is not a folder", path=folder)
    try:
        mode = os.stat(text).st_mode  # through a link: a link to a FIFO is a FIFO to whoever writes it
    except FileNotFoundError:
        return  # a new file (or a dangling link, which the rename replaces)
    except OSError as e:
        raise DestinationError(f"cannot be examined: {e.strerror}", path=text) from None
    kind = _kind_of(mode)
    if kind is not None:
        hint = ": give a file name inside it" if kind == "a folder" else ""
        raise DestinationError(f"is {kind}, not a file{hint}", path=text)


def _kind_of(mode: int) -> str | None:
    """What a non-regular file is, in words; ``None`` for a regular file."""
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) else "not a regular file"


# ---------------------------------------------------------------- locks of one open file
#
# A temporary file says "a writer is alive" by a lock its writer holds for as long as it writes.
# POSIX record locks (lockf) belong to the process: a probe from another thread of the same process
# succeeds against a live writer, and closing the probe drops that writer's lock. Open file description
# locks (F_OFD_SETLK, Linux 3.15) belong to one open(): a thread's temporary is protected from the other
# threads too, and they conflict with lockf locks, so writers of older versions still see each other.
# Where the kernel has no OFD locks, flock gives the same ownership (BSD and macOS).

_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", None)
# struct flock: l_type, l_whence (short); l_start, l_len (off_t); l_pid (0 for OFD locks). The trailing
# "0q" pads the struct to its alignment, as the C compiler does.
_FLOCK = struct.Struct("hhqqi0q")


def _try_lock(fd: int, *, exclusive: bool) -> bool:
    """Lock the whole file for this open file description without waiting; ``False`` if another holds it."""
    try:
        if _OFD_SETLK is not None:
            kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
            fcntl.fcntl(fd, _OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, 0, 0, 0))
        else:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


def _same_file(path: Path, fd: int) -> bool:
    """Whether ``path`` (not followed) still names the file open as ``fd``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


# ---------------------------------------------------------------- all or nothing


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], *,
                 verify: Callable[[str], None] | None = None) -> Iterator[int]:
    """A file descriptor to write ``path`` with: temp file, fsync, verify, rename, fsync of the folder.

    On any exception the temporary file is removed and ``path`` is untouched.
    A writer killed outright (SIGKILL, power loss) leaves ``path`` untouched
    too, and its temporary file is removed by the next write of ``path``.
    Writing to a new inode also means a process that has the old file mapped
    keeps reading the old bytes.

    The temporary is locked from before it can be swept until after it is renamed, so another writer
    of ``path`` (a process, or a thread of this one) never takes it for a dead writer's.

    Args:
        path: the destination; refused unless it is a new name or a regular file
            in an existing folder (:func:`check_destination`).
        verify: called with the temporary's path once it is whole and on disk, before the rename;
            whatever it raises stops the write (the temporary is removed, ``path`` untouched).

    Returns:
        A context manager giving a write-only descriptor of the temporary file.

    Raises:
        DestinationError: ``path`` cannot receive a file, or no temporary name could be made in its folder.

    Example:
        >>> with atomic_write("model.safetensors") as fd:   # doctest: +SKIP
        ...     os.write(fd, data)
    """
    check_destination(path)
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    remove_stale_temporaries(path)
    fd, tmp = _create_temporary(folder, path.name)
    try:
        yield fd
        os.fsync(fd)
        if verify is not None:
            verify(str(tmp))
        try:
            # Still holding the lock: a sweep between here and the rename must not take it for stale.
            os.replace(tmp, path)
        except (IsADirectoryError, NotADirectoryError) as e:  # it became a folder since it was checked
            raise DestinationError(f"cannot be replaced: {e.strerror}", path=str(path)) from None
        os.close(fd)
        fd = -1
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself is durable only once the folder is
        finally:
            os.close(dir_fd)
    except BaseException:
        if fd >= 0:
            if _same_file(tmp, fd):  # never unlink a name someone else's file has taken since
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            os.close(fd)
        raise


def _create_temporary(folder: Path, name: str) -> tuple[int, Path]:
    """A new, locked temporary file ``.<name>.<pid>.<8 hex>.tmp`` in ``folder``: ``(descriptor, path)``.

    ``O_CREAT | O_EXCL`` fails on any name already there (a FIFO, a link, a file) without opening it,
    so nothing planted in the folder can block or redirect the writer: a taken name means another try.
    Between the creation and the lock a sweep by another writer can take the new file for a dead
    writer's; the sweep unlinks only while it holds the lock itself, so once ours is taken, a name
    that still points at our file is ours for good (otherwise: another try).
    """
    for _ in range(_TEMPORARY_TRIES):
        tmp = folder / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        except FileExistsError:
            continue
        except (PermissionError, FileNotFoundError, NotADirectoryError) as e:
            raise DestinationError(f"cannot create a file in this folder: {e.strerror}", path=str(folder)) \
                from None
        try:
            if _try_lock(fd, exclusive=True) and _same_file(tmp, fd):
                return fd, tmp
        except BaseException:  # a file system without locks: nothing of ours may stay behind
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            os.close(fd)
            raise
        os.close(fd)  # a sweep is removing it (or has): leave the name to it
    raise DestinationError(f"no free temporary name for {name!r} after {_TEMPORARY_TRIES} tries "
                           f"(.{name}.{os.getpid()}.<8 hex>.tmp are all taken)", path=str(folder))


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files a killed writer of ``path`` left behind; return those deleted.

    Only names exactly of :func:`atomic_write`'s form for this ``path``
    (``.<name>.<pid>.<8 hex>.tmp``) are considered, so another destination's
    temporaries (``a.safetensors.5`` next to ``a.safetensors``) are never touched;
    and only regular files: a FIFO, a device, a socket or a link under such a
    name is not ours, and opening it could block or reach elsewhere.
    A live writer holds a lock on its temporary file for as long as it writes,
    whatever its pid namespace or host, and the lock belongs to its open file,
    so a writer in another thread of this process is seen too: a file whose
    lock can be taken at once has no writer left, whatever pid its name carries
    (a restarted container's writer has the pid of the one that was killed).

    Example:
        >>> remove_stale_temporaries("model.safetensors")   # doctest: +SKIP
        [PosixPath('.model.safetensors.4242.abcdabcd.tmp')]
    """
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[0-9a-f]{{8}}\.tmp")
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if pattern.fullmatch(tmp.name) is not None and _remove_if_abandoned(tmp):
            removed.append(tmp)
    return removed


def _remove_if_abandoned(tmp: Path) -> bool:
    """Unlink ``tmp`` if it is a regular file no writer holds locked; whether it was unlinked.

    The unlink happens while the probe holds the lock, and only if the name still points at the file
    probed, so a writer that created the name meanwhile either fails to lock it (and takes another name)
    or finds the name gone.
    """
    try:
        if not stat.S_ISREG(os.lstat(tmp).st_mode):
            return False
        # Read-only (a read lock conflicts with the writer's), non-blocking and not following links: even
        # if the name was swapped for a FIFO since the lstat, the open cannot wait.
        fd = os.open(tmp, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode) or not _try_lock(fd, exclusive=False):
            return False
        if not _same_file(tmp, fd):
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
            return True
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
        self._in_kernel = hasattr(os, "copy_file_range")  # until the kernel refuses once
        self._buffer: bytearray | None = None  # for copies the kernel will not do

    def write(self, data: memoryview | bytes) -> None:
        """Write all of ``data`` (short writes are retried), then write back if two windows are dirty."""
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self.fd, view[:_WRITE_NBYTES])
            view = view[n:]
            self._advance(n)

    def copy_range(self, src_fd: int, offset: int, nbytes: int) -> int:
        """Append ``nbytes`` of another file, from ``offset``, without mapping it; returns the bytes copied.

        Fewer than ``nbytes`` only if the source ends early (it shrank): the caller says what that means.
        The copy happens inside the kernel (``copy_file_range``: no user memory, no page of the source
        mapped, so a source truncated meanwhile is a short copy, not SIGBUS); where the kernel or the
        file systems refuse that, with ``pread`` through a buffer of at most 8 MiB.
        """
        done = 0
        while done < nbytes:
            n = self._copy_some(src_fd, offset + done, min(nbytes - done, _WRITE_NBYTES))
            if n == 0:
                break
            done += n
        return done

    def _copy_some(self, src_fd: int, offset: int, nbytes: int) -> int:
        if self._in_kernel:
            try:
                n = os.copy_file_range(src_fd, self.fd, nbytes, offset)
            except OSError as e:
                # Across file systems (EXDEV), or file systems that cannot (EINVAL, EOPNOTSUPP): read it.
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
                self._in_kernel = False
            else:
                # Some file systems copy nothing and say 0 before the end: only a real end ends the copy.
                if n or os.fstat(src_fd).st_size <= offset:
                    self._advance(n)
                    return n
                self._in_kernel = False
        nbytes = min(nbytes, _COPY_BUFFER_NBYTES)
        if self._buffer is None or len(self._buffer) < nbytes:
            self._buffer = bytearray(nbytes)
        view = memoryview(self._buffer)[:nbytes]
        n = os.preadv(src_fd, [view], offset)
        self.write(view[:n])
        return n

    def _advance(self, n: int) -> None:
        # n more bytes are in the file: report them, and write back if two windows are dirty.
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
