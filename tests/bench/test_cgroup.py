"""Memory cgroups for benchmarks: finding our group, setting a limit, reading peaks and kills, cleaning up.

Most tests work on a fake cgroup tree in a temporary folder (plain files stand
for the kernel's), so they run anywhere; one creates a real group where this
machine allows it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sparsemap.bench import cgroup
from sparsemap.errors import CgroupUnavailable


class _ProcFile:
    """Stands for ``Path("/proc/self/cgroup")`` with the given text."""

    def __init__(self, text: str) -> None:
        self.text = text

    def read_text(self) -> str:
        return self.text


def _own_group_with(monkeypatch: pytest.MonkeyPatch, root: Path, text: str) -> tuple[str, Path]:
    monkeypatch.setattr(cgroup, "ROOT", root)
    monkeypatch.setattr(cgroup, "Path", lambda _path: _ProcFile(text))
    return cgroup._own_group()


def test_own_group_prefers_the_v1_memory_hierarchy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "9:systemd:/\n4:cpu,memory:/jobs/a\n0::/user.slice\n"
    assert _own_group_with(monkeypatch, tmp_path, text) == ("v1", tmp_path / "memory" / "jobs/a")


def test_own_group_falls_back_to_the_v2_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    got = _own_group_with(monkeypatch, tmp_path, "1:cpu:/\n0::/user.slice/x\n")
    assert got == ("v2", tmp_path / "user.slice/x")


def test_own_group_finds_v2_under_unified_in_hybrid_mode(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("memory\n")
    assert _own_group_with(monkeypatch, tmp_path, "0::/x\n") == ("v2", tmp_path / "unified" / "x")


def test_no_memory_cgroup_is_cgroup_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CgroupUnavailable, match="no memory cgroup"):
        _own_group_with(monkeypatch, tmp_path, "1:cpu:/\n2:pids:/\n")


def _fake(monkeypatch: pytest.MonkeyPatch, version: str, parent: Path) -> None:
    monkeypatch.setattr(cgroup, "_own_group", lambda: (version, parent))


@pytest.mark.parametrize(("version", "limit_files"), [
    ("v1", {"memory.limit_in_bytes": "1048576\n", "memory.memsw.limit_in_bytes": "1048576\n"}),
    ("v2", {"memory.max": "1048576\n", "memory.swap.max": "0\n"}),  # no swap: the limit must bite
])
def test_a_group_is_created_with_its_limit_and_removed_on_exit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str, limit_files: dict[str, str]) -> None:
    _fake(monkeypatch, version, tmp_path)
    with cgroup.MemoryLimit(1 << 20, name="g") as group:
        assert group.path == tmp_path / "g"
        assert {p.name: p.read_text() for p in group.path.iterdir()} == limit_files
        group.enter_in_child()  # what a child's preexec_fn does
        assert (group.path / "cgroup.procs").read_text() == str(os.getpid())
        for p in group.path.iterdir():  # the kernel's files vanish with the group; plain files do not
            p.unlink()
    assert not group.path.exists()


def test_a_parent_that_cannot_hold_a_group_is_cgroup_unavailable(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    _fake(monkeypatch, "v2", tmp_path / "missing")
    with pytest.raises(CgroupUnavailable, match="cannot create"), cgroup.MemoryLimit(1 << 20, name="g"):
        pass
    ok, why = cgroup.available()
    assert not ok and "cannot create" in why


@pytest.mark.parametrize(("version", "files", "peak", "kills"), [
    ("v1", {"memory.max_usage_in_bytes": "123456\n",
            "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"}, 123456, 2),
    ("v2", {"memory.peak": "654321\n",
            "memory.events": "low 0\nhigh 0\nmax 9\noom 3\noom_kill 1\n"}, 654321, 1),
    ("v2", {}, None, 0),  # an older kernel keeps no peak and no events
])
def test_peak_and_oom_kills_read_the_right_file_for_each_version(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str, files: dict[str, str],
        peak: int | None, kills: int) -> None:
    _fake(monkeypatch, version, tmp_path)
    group = cgroup.MemoryLimit(1 << 20, name="g")
    group.path.mkdir()
    for name, text in files.items():
        (group.path / name).write_text(text)
    assert group.peak_nbytes() == peak
    assert group.oom_kills() == kills


def test_a_real_group_comes_and_goes() -> None:
    ok, why = cgroup.available()
    if not ok:
        pytest.skip(f"no memory cgroup can be created here: {why}")
    with cgroup.MemoryLimit(64 << 20) as group:
        assert group.path.is_dir()
        assert group.oom_kills() == 0
    assert not group.path.exists()
