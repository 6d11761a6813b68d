"""The measurement itself, on workloads whose cost is known (issue 5's acceptance for bench)."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import pytest

from sparsemap.bench import cgroup, disk
from sparsemap.bench.measure import run_measured

MiB = 1 << 20
# A bare interpreter (-S: no site) holds a few MiB of its own.
PYTHON = [sys.executable, "-S", "-c"]


def test_anonymous_allocation_shows_as_anonymous_peak():
    code = ("import time\nb = bytearray(300 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n"
            "time.sleep(0.3)\n")
    m = run_measured([*PYTHON, code])
    assert m.exit_code == 0, m.stderr
    assert abs(m.peak_anon - 300 * MiB) <= 0.05 * 300 * MiB, m.peak_anon / MiB
    assert m.peak_file < 30 * MiB
    assert 300 * MiB <= m.peak_rss <= 340 * MiB, m.peak_rss / MiB  # the child's own peak, not the parent's
    assert m.samples > 10


def test_touched_file_mapping_shows_as_file_backed(tmp_path: Path):
    path = tmp_path / "data.bin"
    with open(path, "wb") as f:
        f.writelines(os.urandom(MiB) for _ in range(300))
    code = (f"import mmap, time\nf = open({str(path)!r}, 'rb')\n"
            "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
            "s = sum(m[i] for i in range(0, len(m), 4096))\ntime.sleep(0.3)\n")
    m = run_measured([*PYTHON, code])
    assert m.exit_code == 0, m.stderr
    assert m.peak_file >= 0.95 * 300 * MiB, m.peak_file / MiB
    assert m.peak_anon < 30 * MiB, m.peak_anon / MiB
    assert 300 * MiB <= m.peak_rss <= 340 * MiB, m.peak_rss / MiB


def test_cold_cache_preparation_leaves_the_file_non_resident(tmp_path: Path):
    path = tmp_path / "cold.bin"
    with open(path, "wb") as f:
        f.writelines(os.urandom(MiB) for _ in range(64))
    disk.sequential_read_speed(path)  # warm it
    assert disk.file_cached_fraction(path) > 0.9
    assert disk.make_cold(path) < 0.01
    # A reader now really goes to the disk: the child's rusage counts the blocks read.
    code = f"f = open({str(path)!r}, 'rb', buffering=0)\nwhile f.read(1 << 20): pass\n"
    m = run_measured([*PYTHON, code])
    assert m.exit_code == 0, m.stderr
    assert m.read_bytes >= 0.9 * 64 * MiB, m.read_bytes / MiB


def test_memory_limit_kills_and_reports_it():
    ok, why = cgroup.available()
    if not ok:
        pytest.skip(f"no memory cgroup can be created here: {why}")
    code = "b = bytearray(400 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n"
    m = run_measured([*PYTHON, code], memory_limit=200 * MiB)
    assert m.oom_killed and m.exit_code == -9
    fits = run_measured([*PYTHON, code.replace("400", "100")], memory_limit=200 * MiB)
    assert fits.exit_code == 0 and not fits.oom_killed
    assert fits.cgroup_peak is not None and 100 * MiB <= fits.cgroup_peak <= 200 * MiB


def test_page_cache_of_a_cold_file_is_charged_to_the_limited_group(tmp_path: Path):
    """Why limited runs start cold: a file the child reads first is counted against its limit."""
    ok, why = cgroup.available()
    if not ok:
        pytest.skip(f"no memory cgroup can be created here: {why}")
    path = tmp_path / "charged.bin"
    with open(path, "wb") as f:
        f.writelines(os.urandom(MiB) for _ in range(200))
    disk.make_cold(path)
    code = f"f = open({str(path)!r}, 'rb', buffering=0)\nwhile f.read(1 << 20): pass\n"
    m = run_measured([*PYTHON, code], memory_limit=1 << 30)
    assert m.exit_code == 0, m.stderr
    assert m.peak_anon < 30 * MiB  # the child itself holds little ...
    # ... but the cache it read is charged
    assert m.cgroup_peak is not None and m.cgroup_peak >= 0.9 * 200 * MiB


def test_a_trace_keeps_memory_over_time_on_the_clock_the_child_stamps():
    code = ("import time\nprint(time.monotonic())\ntime.sleep(0.2)\nb = bytearray(100 << 20)\n"
            "for i in range(0, len(b), 4096): b[i] = 1\ntime.sleep(0.3)\n")
    m = run_measured([*PYTHON, code], trace_every_s=0.05)
    assert m.exit_code == 0, m.stderr
    times = [t for t, _, _ in m.trace]
    assert times == sorted(times) and 5 <= len(times) <= 20, times
    assert all(b - a >= 0.05 for a, b in itertools.pairwise(times))
    assert max(anon for _, anon, _ in m.trace) >= 95 * MiB > m.trace[0][1]  # the allocation shows, later
    assert 0 <= float(m.stdout) - m.started < 1.0  # the child's monotonic clock is the parent's
    assert run_measured([*PYTHON, "pass"]).trace == ()  # kept only when asked for
