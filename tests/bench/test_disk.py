"""Whole-file disk helpers: cold and warm page cache, and the read and write loops that measure the disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sparsemap.bench import disk
from sparsemap.pages import PAGE_SIZE

MiB = 1 << 20


def _file(path: Path, nbytes: int) -> Path:
    with open(path, "wb") as f:
        f.write(os.urandom(nbytes))
    return path


def test_an_empty_file_is_not_cached_and_is_not_mapped(tmp_path: Path) -> None:
    # mmap refuses a zero-length mapping: the helper must answer before trying.
    assert disk.file_cached_fraction(_file(tmp_path / "empty.bin", 0)) == 0.0


def test_a_file_read_once_is_warm_and_make_cold_drops_it(tmp_path: Path) -> None:
    path = _file(tmp_path / "f.bin", 16 * MiB)
    assert disk.sequential_read_speed(path) > 0
    assert disk.file_cached_fraction(path) > 0.9
    assert disk.make_cold(path) < 0.01
    assert disk.file_cached_fraction(path) < 0.01  # it reports, it does not read the file back in


def test_make_cold_syncs_a_freshly_written_file_first(tmp_path: Path) -> None:
    """Dirty pages cannot be dropped: without the fsync a just-written file would stay cached."""
    path = tmp_path / "dirty.bin"
    with open(path, "wb") as f:
        f.write(os.urandom(8 * MiB))  # not synced: dirty in the page cache
    assert disk.make_cold(path) < 0.01


def test_sequential_read_counts_every_byte_through_short_reads(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``preadv`` may return fewer bytes than asked; the loop must carry on from where it stopped."""
    nbytes = 3 * PAGE_SIZE + 5
    path = _file(tmp_path / "short.bin", nbytes)
    real, offsets = os.preadv, []

    def three_bytes_at_a_time(fd: int, buffers: list[memoryview], offset: int) -> int:
        offsets.append(offset)
        return real(fd, [buffers[0][:3]], offset)

    monkeypatch.setattr(os, "preadv", three_bytes_at_a_time)
    disk.sequential_read_speed(path, chunk_nbytes=1 * MiB)
    assert offsets == list(range(0, nbytes + 1, 3)) + ([] if nbytes % 3 == 0 else [nbytes])


def test_sequential_write_writes_exactly_nbytes_through_short_writes_and_cleans_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write, sizes = os.write, []

    def five_bytes_at_a_time(fd: int, data: bytes) -> int:
        return real_write(fd, data[:5])

    def record_size(fd: int) -> None:
        sizes.append(os.fstat(fd).st_size)

    monkeypatch.setattr(os, "write", five_bytes_at_a_time)
    monkeypatch.setattr(os, "fdatasync", record_size)
    assert disk.sequential_write_speed(tmp_path, nbytes=1001, chunk_nbytes=64) > 0
    assert sizes == [1001]  # synced once, at the exact size asked for
    assert list(tmp_path.iterdir()) == []  # the scratch file is gone


def test_sequential_write_removes_its_file_when_the_disk_fails(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space"):
        disk.sequential_write_speed(tmp_path, nbytes=100)
    assert list(tmp_path.iterdir()) == []
