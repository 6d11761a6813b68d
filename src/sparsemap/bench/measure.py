"""Measuring a child process from outside: what one loading strategy costs.

The parent starts the child (optionally inside a memory cgroup) and, while it
runs, samples ``/proc/<pid>/status`` every millisecond for anonymous and
file-backed resident memory (the kernel keeps no peak of either) and for
``VmHWM``, the kernel's peak RSS of the process. (Not ``wait4``'s
``ru_maxrss``: Linux carries the parent's peak over into it across fork and
exec, so a child of a large parent would report the parent's peak.) When the
child exits, ``wait4`` returns its major page faults and blocks read from
disk. Sampling from the parent, which has nothing else to do, avoids the GIL
starvation an in-process sampler suffers. On request the samples are also kept
as a trace (resident memory over time, for a picture). No torch here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .cgroup import MemoryLimit

KiB = 1024


@dataclass(frozen=True)
class Measurement:
    """One child run: exit, time and memory, in bytes and seconds."""

    exit_code: int
    wall_s: float
    peak_rss: int  # VmHWM, the kernel's own peak of this process's RSS (last value read before exit)
    peak_anon: int  # sampled every interval
    peak_file: int  # sampled every interval
    major_faults: int
    read_bytes: int  # blocks read from storage (ru_inblock * 512): cold data only
    samples: int
    cgroup_peak: int | None = None
    oom_killed: bool = False
    stdout: str = ""
    stderr: str = ""
    started: float = 0.0  # time.monotonic() when the child was started: events the child stamps align to it
    # (seconds since started, RssAnon, RssFile), one about every trace_every_s; empty unless asked for
    trace: tuple[tuple[float, int, int], ...] = ()


def _status(pid: int) -> tuple[int, int, int] | None:
    """(RssAnon, RssFile, VmHWM) of a live process, or None once it is gone."""
    anon = file = hwm = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    anon = int(line.split()[1]) * KiB
                elif line.startswith(b"RssFile:"):
                    file = int(line.split()[1]) * KiB
                elif line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1]) * KiB
    except (FileNotFoundError, ProcessLookupError):
        return None
    return anon, file, hwm


def _kill_and_reap(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` and wait for it (a child already gone, or already reaped, is no error)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(proc.pid, 0)
    proc.returncode = -signal.SIGKILL  # reaped here: Popen must not wait for it again


def run_measured(cmd: Sequence[str], *, memory_limit: int | None = None, interval_s: float = 0.001,
                 timeout_s: float | None = None, env: dict[str, str] | None = None,
                 trace_every_s: float | None = None) -> Measurement:
    """Run ``cmd`` to completion and measure it.

    Args:
        cmd: the command (a fresh interpreter, typically).
        memory_limit: run it inside a new memory cgroup of this many bytes
            (:class:`~sparsemap.bench.cgroup.MemoryLimit`); ``oom_killed`` tells if the
            kernel killed it for lack of memory.
        interval_s: sampling interval for the anonymous / file-backed peaks.
        timeout_s: kill the child after this long.
        trace_every_s: keep a sample about this often as ``trace`` (the peaks still use every sample).

    Example:
        >>> m = run_measured([sys.executable, "-c", "b = bytearray(100 << 20)"])   # doctest: +SKIP
        >>> m.peak_anon >= 100 << 20
        True
    """
    group = MemoryLimit(memory_limit) if memory_limit is not None else None
    if group is not None:
        group.__enter__()
    try:
        start = time.perf_counter()
        started = time.monotonic()
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                preexec_fn=group.enter_in_child if group is not None else None)
        peaks = [0, 0, 0, 0]  # anon, file, samples, VmHWM
        trace: list[tuple[float, int, int]] = []
        done = threading.Event()

        def sample() -> None:
            next_trace = 0.0
            while not done.is_set():
                now = _status(proc.pid)
                if now is None:
                    return
                peaks[0], peaks[1] = max(peaks[0], now[0]), max(peaks[1], now[1])
                peaks[3] = max(peaks[3], now[2])
                peaks[2] += 1
                if trace_every_s is not None:
                    at = time.monotonic() - started
                    if at >= next_trace:
                        trace.append((at, now[0], now[1]))
                        next_trace = at + trace_every_s
                time.sleep(interval_s)

        sampler = threading.Thread(target=sample, name="sparsemap-measure", daemon=True)
        sampler.start()
        # Output is read by threads so a chatty child cannot block on a full pipe.
        outputs: dict[str, bytes] = {}
        readers = [threading.Thread(target=lambda k=k, s=s: outputs.__setitem__(k, s.read()), daemon=True)
                   for k, s in (("out", proc.stdout), ("err", proc.stderr))]
        for r in readers:
            r.start()
        deadline = None if timeout_s is None else start + timeout_s
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if deadline is not None and time.perf_counter() > deadline:
                    deadline = None  # once: Popen.kill() could reap the child behind wait4's back
                    os.kill(proc.pid, signal.SIGKILL)
                time.sleep(0.001)
        except BaseException:  # Ctrl-C in the parent: the child must not outlive it, nor keep its cgroup
            _kill_and_reap(proc)
            done.set()
            raise
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
        for r in readers:
            r.join()
        oom = False
        cgroup_peak = None
        if group is not None:
            cgroup_peak = group.peak_nbytes()
            oom = group.oom_kills() > 0
        return Measurement(
            exit_code=proc.returncode, wall_s=wall, peak_rss=peaks[3], peak_anon=peaks[0],
            peak_file=peaks[1], major_faults=usage.ru_majflt, read_bytes=usage.ru_inblock * 512,
            samples=peaks[2], cgroup_peak=cgroup_peak, oom_killed=oom,
            stdout=outputs.get("out", b"").decode(errors="replace"),
            stderr=outputs.get("err", b"").decode(errors="replace"), started=started, trace=tuple(trace))
    finally:
        if group is not None:
            group.__exit__(None, None, None)
