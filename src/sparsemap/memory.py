"""Memory accounting from ``/proc``: what a process really holds, and per-phase peaks.

Resident memory comes in two kinds that matter differently:

* **anonymous** (heap, copies, converted tensors): only swap can take it back;
  this is what runs a machine out of memory.
* **file-backed** (mapped checkpoint pages): the kernel drops and re-reads it
  under pressure; it costs cache, not capacity.

A :class:`Snapshot` reads both (plus PSS and USS) at one instant. A
:class:`PhaseTracker` records, for each phase of a program, its peak RSS (exact:
the kernel's ``VmHWM``, reset per phase through ``/proc/self/clear_refs``) and
its peak anonymous memory (sampled by a helper process, since the kernel keeps
no such peak). No torch here.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

MiB = 1 << 20


def _read_kib_fields(path: str) -> dict[str, int]:
    """``Key:   123 kB`` lines of a /proc file, as bytes."""
    out: dict[str, int] = {}
    with open(path, "rb") as f:
        for line in f:
            key, _, rest = line.partition(b":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == b"kB":
                out[key.decode()] = int(parts[0]) * 1024
    return out


@dataclass(frozen=True)
class Snapshot:
    """A process's memory at one instant, in bytes."""

    rss: int
    anon: int
    file: int
    shmem: int
    pss: int
    uss: int
    hwm: int  # peak RSS since start or since the last reset

    @classmethod
    def take(cls, pid: int | str = "self") -> Snapshot:
        """Read ``/proc/<pid>/status`` and ``smaps_rollup`` (USS = private clean + dirty)."""
        status = _read_kib_fields(f"/proc/{pid}/status")
        try:
            rollup = _read_kib_fields(f"/proc/{pid}/smaps_rollup")
        except OSError:  # kernels before 4.14
            rollup = {}
        return cls(
            rss=status.get("VmRSS", 0),
            anon=status.get("RssAnon", 0),
            file=status.get("RssFile", 0),
            shmem=status.get("RssShmem", 0),
            pss=rollup.get("Pss", 0),
            uss=rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0),
            hwm=status.get("VmHWM", 0),
        )


def rss_anon(pid: int | str = "self") -> int:
    """Resident anonymous bytes, cheaply (one small read): used by samplers."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak(pid: int | str = "self") -> bool:
    """Reset the kernel's peak-RSS counter (``VmHWM``); False where the kernel refuses."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# The sampler process: polls RssAnon of a pid, keeps the peak, answers on stdin.
# Commands: "p" -> prints the peak, "r" -> resets the peak to the current value.
# It runs with -S (no site) so it starts in a few milliseconds. It ignores SIGINT and ends on EOF.
_SAMPLER_CODE = r"""
import os, select, signal, sys
# Ctrl-C at a terminal reaches the whole process group: the parent handles it, and this helper ends
# when the parent closes its stdin (or exits), not with a KeyboardInterrupt traceback on the terminal.
signal.signal(signal.SIGINT, signal.SIG_IGN)
path = "/proc/%s/status" % sys.argv[1]
interval = float(sys.argv[2])
def read():
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return -1
    return 0
peak = current = read()
fd = sys.stdin.fileno()
while current >= 0:
    ready = select.select([fd], [], [], interval)[0]
    current = read()
    peak = max(peak, current)
    if ready:
        data = os.read(fd, 4096)
        if not data:
            break
        for cmd in data.split():
            if cmd == b"r":
                peak = current
            elif cmd == b"p":
                os.write(1, b"%d\n" % peak)
"""


def _end_process(proc: subprocess.Popen[bytes]) -> None:
    """Close a sampler's pipes and reap it; a helper already gone (killed, interrupted) is no error."""
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):  # BrokenPipeError flushing to a helper that died
                pipe.close()  # EOF on its stdin ends the helper's loop
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class AnonSampler:
    """Samples a process's anonymous RSS and keeps the peak.

    The kernel records no peak for anonymous memory, so we poll
    ``/proc/<pid>/status``. Polling from a thread of the measured process does
    not work: while Python code faults pages in it holds the GIL, and the
    thread starves (one sample in 90 ms, measured). So the polling runs in a
    small separate process; a spike shorter than ``interval_s`` can still be
    missed. ``sample()`` also reads in-process, for callers that know when the
    peak is.

    Example:
        >>> with AnonSampler() as s:
        ...     data = bytearray(100 << 20)
        >>> s.peak >= 100 << 20
        True
    """

    def __init__(self, pid: int | str = "self", interval_s: float = 0.001) -> None:
        self.pid = os.getpid() if pid == "self" else int(pid)
        self.interval_s = interval_s
        self._local_peak = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self._final: int | None = None

    def sample(self) -> int:
        """Read the current value in this process and fold it into the peak."""
        try:
            value = rss_anon(self.pid)
        except OSError:  # the process has exited
            return self._local_peak
        self._local_peak = max(self._local_peak, value)
        return value

    def _ask(self, command: bytes) -> int | None:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            return None
        try:
            proc.stdin.write(command + b" p\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
        except (BrokenPipeError, OSError):
            return None
        return int(line) if line.strip() else None

    @property
    def peak(self) -> int:
        """The highest anonymous RSS seen since start or the last reset, in bytes."""
        if self._final is not None:
            return self._final
        remote = self._ask(b"")
        return max(self._local_peak, remote or 0)

    def reset(self) -> None:
        self._local_peak = 0
        self.sample()
        self._ask(b"r")

    def start(self) -> AnonSampler:
        self.sample()
        self._proc = subprocess.Popen(
            [sys.executable, "-S", "-c", _SAMPLER_CODE, str(self.pid), repr(self.interval_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        # A sampler nobody stopped (an exception, an interrupt, a caller that forgot) is ended at
        # collection or at interpreter exit. weakref.finalize runs its atexit hook while modules are
        # still whole, unlike __del__, which can run after builtins such as open() are torn down.
        self._finalizer = weakref.finalize(self, _end_process, self._proc)
        self._ask(b"")  # wait until it runs, so no early peak is missed
        return self

    def stop(self) -> int:
        """End the helper process; returns the peak. Safe to call twice, or after the helper died."""
        if self._proc is None and self._final is not None:
            return self._final
        self.sample()
        self._final = max(self._local_peak, self._ask(b"") or 0)
        if self._finalizer is not None:
            self._finalizer()  # runs _end_process once; later calls do nothing
        self._proc = None
        return self._final

    def __enter__(self) -> AnonSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Phase:
    """One phase of a program: the state at its end and the peaks during it."""

    name: str
    seconds: float
    after: Snapshot
    peak_rss: int
    peak_anon: int


@dataclass
class PhaseTracker:
    """Records memory phase by phase and prints them as a table.

    The anonymous peaks come from a helper process (:class:`AnonSampler`), started by the first
    phase. The tracker owns it: use the tracker as a context manager, or call :meth:`close`; one
    left open is ended when it is collected or when the interpreter exits.

    Example:
        >>> with PhaseTracker() as tracker:
        ...     with tracker.phase("import torch"):
        ...         import torch
        ...     with tracker.phase("load"):
        ...         model = sparsemap.load(factory, "model.safetensors")   # doctest: +SKIP
        >>> print(tracker.table())
    """

    baseline: Snapshot = field(default_factory=Snapshot.take)
    phases: list[Phase] = field(default_factory=list)
    interval_s: float = 0.001
    # Hears (name, time.monotonic()) as each phase begins: a parent watching this process from outside
    # marks phases on its own samples (CLOCK_MONOTONIC is the same clock in every process), even when
    # the process is killed before it can report.
    on_phase: Callable[[str, float], None] | None = None

    _sampler: AnonSampler | None = field(default=None, repr=False)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._sampler is None:
            self._sampler = AnonSampler(interval_s=self.interval_s).start()
        sampler = self._sampler
        sampler.reset()
        exact_rss = reset_peak()
        if self.on_phase is not None:
            self.on_phase(name, time.monotonic())
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            sampler.sample()
            peak_anon = sampler.peak
            after = Snapshot.take()
            # Without clear_refs, VmHWM is the peak since process start: an upper bound.
            peak_rss = after.hwm if exact_rss else max(after.rss, after.hwm)
            self.phases.append(Phase(name, seconds, after, peak_rss, peak_anon))

    def close(self) -> None:
        """Stop the sampler process; the phases recorded stay. Safe to call more than once."""
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None

    def __enter__(self) -> PhaseTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def table(self, title: str = "memory by phase") -> str:
        """The phases as a fixed-width table (MiB), starting from the baseline."""
        rows = [("phase", "time s", "RSS", "anon", "file", "peak RSS", "peak anon")]
        b = self.baseline
        rows.append(("start", "", _mib(b.rss), _mib(b.anon), _mib(b.file), "", ""))
        for p in self.phases:
            rows.append((p.name, f"{p.seconds:.3f}", _mib(p.after.rss), _mib(p.after.anon),
                         _mib(p.after.file), _mib(p.peak_rss), _mib(p.peak_anon)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"{title} (MiB)"]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                                   for j, (c, w) in enumerate(zip(r, widths, strict=True))))
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": asdict(self.baseline),
                "phases": [{"name": p.name, "seconds": p.seconds, "after": asdict(p.after),
                            "peak_rss": p.peak_rss, "peak_anon": p.peak_anon} for p in self.phases]}


def _mib(nbytes: int) -> str:
    return f"{nbytes / MiB:.1f}"
