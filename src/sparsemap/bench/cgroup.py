"""A real memory limit for a child process: a cgroup under our own (v1 or v2).

Used by benchmarks and tests to show what a process does when memory is
really short (the kernel reclaims page cache, then kills). The group is a child
of the cgroup this process is in, created on entry and removed on exit.
Page cache is charged to the group that first touches a page, so make a file
cold before a limited run (:func:`.disk.make_cold`), or the limit measures nothing. No torch here.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import CgroupUnavailable

ROOT = Path("/sys/fs/cgroup")


def _own_group() -> tuple[str, Path]:
    """``("v1" | "v2", folder of this process's memory cgroup)``."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError as e:
        raise CgroupUnavailable(f"cannot read /proc/self/cgroup: {e}") from None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return "v1", ROOT / "memory" / path.lstrip("/")
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            base = ROOT / "unified" if (ROOT / "unified" / "cgroup.controllers").exists() else ROOT
            return "v2", base / path.lstrip("/")
    raise CgroupUnavailable("this process is in no memory cgroup (no v1 memory line, no v2 line)")


class MemoryLimit:
    """A child memory cgroup with a limit; processes are moved into it as they start.

    Example:
        >>> with MemoryLimit(512 << 20) as group:                       # doctest: +SKIP
        ...     proc = subprocess.run(cmd, preexec_fn=group.enter_in_child)
        ...     print(group.peak_nbytes(), group.oom_kills())
    """

    def __init__(self, limit_nbytes: int, *, name: str | None = None) -> None:
        self.limit_nbytes = limit_nbytes
        self.version, parent = _own_group()
        self.path = parent / (name or f"sparsemap-{os.getpid()}-{time.monotonic_ns()}")

    # ------------------------------------------------------------ set-up and teardown

    def __enter__(self) -> MemoryLimit:
        try:
            self.path.mkdir()
        except OSError as e:
            raise CgroupUnavailable(f"cannot create {self.path}: {e.strerror}") from None
        try:
            if self.version == "v1":
                self._write("memory.limit_in_bytes", self.limit_nbytes)
                with contextlib.suppress(OSError):  # present only with swap accounting
                    self._write("memory.memsw.limit_in_bytes", self.limit_nbytes)
            else:
                self._write("memory.max", self.limit_nbytes)
                with contextlib.suppress(OSError):
                    self._write("memory.swap.max", 0)
        except OSError as e:
            self._remove()
            raise CgroupUnavailable(f"cannot set the limit in {self.path}: {e.strerror}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _remove(self) -> None:
        # A killed process may take a moment to leave; the folder can only go once empty.
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.02)

    def _write(self, name: str, value: object) -> None:
        (self.path / name).write_text(f"{value}\n")

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    # ------------------------------------------------------------ use

    def add(self, pid: int) -> None:
        """Move a process into the group."""
        self._write("cgroup.procs", pid)

    @property
    def enter_in_child(self) -> Callable[[], None]:
        """A ``preexec_fn`` that moves the child into the group before it runs anything."""
        procs = str(self.path / "cgroup.procs")

        def enter() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        return enter

    def peak_nbytes(self) -> int | None:
        """The group's peak charge (anonymous + page cache), where the kernel keeps one."""
        name = "memory.max_usage_in_bytes" if self.version == "v1" else "memory.peak"
        try:
            return int(self._read(name))
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int:
        """How many processes the kernel killed in this group for lack of memory."""
        try:
            text = self._read("memory.oom_control" if self.version == "v1" else "memory.events")
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0


def available(limit_nbytes: int = 64 << 20) -> tuple[bool, str]:
    """Whether a memory cgroup can be created here, and why not."""
    try:
        with MemoryLimit(limit_nbytes):
            return True, ""
    except CgroupUnavailable as e:
        return False, str(e)
