"""sparsemap.durable: a destination is the old file or the whole new one, and dirty pages stay bounded.

A crash is simulated by an exception inside :func:`atomic_write` or by a
temporary file no process holds a lock on (what SIGKILL leaves); the real
SIGKILL runs are in ``tests/hostile/test_crash_safety.py``.
"""

from __future__ import annotations

import errno
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsemap import durable
from sparsemap.durable import WritebackSink, atomic_write, remove_stale_temporaries

# ---------------------------------------------------------------- atomic_write


def test_a_completed_write_replaces_the_file_with_a_new_inode(tmp_path: Path) -> None:
    dest = tmp_path / "model.safetensors"
    dest.write_bytes(b"old")
    old_inode = dest.stat().st_ino
    with open(dest, "rb") as reader:  # a reader of the old file (a mapping would be the same)
        with atomic_write(dest) as fd:
            os.write(fd, b"new bytes")
            assert dest.read_bytes() == b"old"  # nothing visible before the rename
        assert reader.read() == b"old"  # the old inode is intact for whoever holds it
    assert dest.read_bytes() == b"new bytes"
    assert dest.stat().st_ino != old_inode
    assert oct(dest.stat().st_mode & 0o777) == oct(0o644 & ~_umask())
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    dest = tmp_path / "model.safetensors"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_write(dest) as fd:
        os.write(fd, b"half of the new")
        raise RuntimeError("disk on fire")
    assert dest.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_a_failed_first_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), atomic_write(tmp_path / "new.safetensors"):
        raise KeyboardInterrupt  # BaseException too: Ctrl-C must not leave a temporary behind
    assert os.listdir(tmp_path) == []


def test_the_temporary_is_in_the_destination_folder_and_locked(tmp_path: Path) -> None:
    # Same folder: the rename is atomic only within one file system.
    dest = tmp_path / "a.safetensors"
    with atomic_write(dest):
        (tmp,) = tmp_path.iterdir()
        assert tmp.name.startswith(f".a.safetensors.{os.getpid()}.") and tmp.name.endswith(".tmp")
        assert _locked_elsewhere(tmp)


def test_regression_a_sweep_in_the_same_process_spares_a_live_temporary(tmp_path: Path) -> None:
    # lockf locks are the process's: probing our own temporary succeeded, so a second write of the
    # same destination (another thread) deleted the first one's file, and the probe's close dropped its lock.
    dest = tmp_path / "a.safetensors"
    with atomic_write(dest) as fd:
        (tmp,) = tmp_path.iterdir()
        assert remove_stale_temporaries(dest) == []
        with atomic_write(dest) as inner:
            os.write(inner, b"inner")
        assert tmp.exists() and _locked_elsewhere(tmp)
        os.write(fd, b"outer")
    assert dest.read_bytes() == b"outer"
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_a_relative_path_in_the_working_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with atomic_write("here.bin") as fd:
        os.write(fd, b"x")
    assert (tmp_path / "here.bin").read_bytes() == b"x"


# ---------------------------------------------------------------- temporaries of killed writers

def test_stale_temporaries_of_dead_writers_are_removed_and_no_others(tmp_path: Path) -> None:
    stale = tmp_path / ".a.safetensors.4242.abcdabcd.tmp"  # its writer died: nobody holds its lock
    other_destination = tmp_path / ".a.safetensors.5.4242.abcdabcd.tmp"  # a temporary of "a.safetensors.5"
    live = tmp_path / ".a.safetensors.33.abcdabcd.tmp"  # a writer elsewhere (another pid namespace) holds it
    for p in (stale, other_destination, live):
        p.write_bytes(b"partial")
    code = (f"import fcntl, os, sys, time\nfd = os.open({str(live)!r}, os.O_WRONLY)\n"
            "fcntl.lockf(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with atomic_write(tmp_path / "a.safetensors") as fd:
            os.write(fd, b"complete")
    finally:
        holder.kill()
        holder.wait()
    assert not stale.exists()
    assert other_destination.exists() and live.exists()
    assert (tmp_path / "a.safetensors").read_bytes() == b"complete"


@pytest.mark.parametrize("name", [".a.safetensors.12.abcdabcd.tmp.bak", ".a.safetensors.x.abcdabcd.tmp",
                                  ".a.safetensors.12.ABCDABCD.tmp", ".a.safetensors.12.abcdabc.tmp",
                                  "a.safetensors.12.abcdabcd.tmp"])
def test_only_the_exact_temporary_name_form_is_swept(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"not ours")
    assert remove_stale_temporaries(tmp_path / "a.safetensors") == []
    assert (tmp_path / name).exists()


def test_glob_characters_in_the_destination_name_are_literal(tmp_path: Path) -> None:
    mine = tmp_path / ".[ab].safetensors.1.abcdabcd.tmp"
    theirs = tmp_path / ".a.safetensors.1.abcdabcd.tmp"  # would match the glob "[ab]" unescaped
    for p in (mine, theirs):
        p.write_bytes(b"partial")
    assert remove_stale_temporaries(tmp_path / "[ab].safetensors") == [mine]
    assert theirs.exists()


# ---------------------------------------------------------------- the writeback sink

def test_short_writes_are_retried_and_every_byte_reported(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:3])))  # 3 bytes per call
    reported: list[int] = []
    path = tmp_path / "short.bin"
    data = bytes(range(256)) * 3
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        sink = WritebackSink(fd, reported.append)
        sink.write(memoryview(data))
        sink.zeros(10)
    finally:
        os.close(fd)
    assert path.read_bytes() == data + bytes(10)
    assert sink.position == len(data) + 10 == sum(reported)
    assert set(reported) == {3, 1}  # 778 bytes: 259 calls of 3 and one of 1


def test_dirty_bytes_stay_under_two_windows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    window = 4096
    monkeypatch.setattr(durable, "WRITEBACK_WINDOW", window)
    synced: list[tuple[int, int]] = []
    real_sync = durable._sync_file_range

    def sync(fd: int, offset: int, nbytes: int, flags: int) -> None:
        synced.append((offset, nbytes))
        real_sync(fd, offset, nbytes, flags)

    monkeypatch.setattr(durable, "_sync_file_range", sync)
    path = tmp_path / "big.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        sink = WritebackSink(fd)
        for i in range(40):
            sink.write(bytes([i]) * 1000)
            assert sink.position - sink.flushed < 2 * window
    finally:
        os.close(fd)
    # Each writeback covers everything since the last one, up to one window behind the writer.
    assert synced and synced[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(synced))
    assert path.read_bytes() == b"".join(bytes([i]) * 1000 for i in range(40))


@pytest.mark.parametrize("in_kernel", [True, False], ids=["copy_file_range", "pread"])
def test_copy_range_appends_another_files_bytes_and_stops_at_its_end(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   in_kernel: bool) -> None:
    if not in_kernel:
        monkeypatch.setattr(durable, "_COPY_BUFFER_NBYTES", 1000)  # several reads through the buffer

        def refuse(*_: object) -> int:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(range(256)) * 40)  # 10240 bytes
    reported: list[int] = []
    with open(source, "rb") as f, atomic_write(tmp_path / "out.bin") as fd:
        sink = WritebackSink(fd, reported.append)
        sink.write(b"head")
        assert sink.copy_range(f.fileno(), 100, 5000) == 5000
        assert sink.copy_range(f.fileno(), 10000, 1000) == 240  # the source ends first: a short copy
    assert (tmp_path / "out.bin").read_bytes() == b"head" + source.read_bytes()[100:5100] + \
        source.read_bytes()[10000:]
    assert sink.position == sum(reported) == 4 + 5000 + 240


def test_zeros_of_nothing_writes_nothing(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "z.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        sink = WritebackSink(fd)
        sink.zeros(0)
        sink.zeros((1 << 20) + 5)  # more than one buffer
    finally:
        os.close(fd)
    assert (tmp_path / "z.bin").read_bytes() == bytes((1 << 20) + 5)


def test_durable_imports_no_torch() -> None:
    code = ("import sys, sparsemap.durable\n"
            "assert not [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr


def _locked_elsewhere(path: Path) -> bool:
    """Whether another process finds ``path``'s write lock taken (our own process always could take it)."""
    code = ("import fcntl, os, sys\n"
            f"fd = os.open({str(path)!r}, os.O_WRONLY)\n"
            "try:\n    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(3)\n")
    return subprocess.run([sys.executable, "-c", code], check=False, timeout=60).returncode == 3


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
