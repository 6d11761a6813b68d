"""Writes that lie (issue 14, item 4): names that collide, files that do not reopen, destinations that
are not files, temporaries that are not files, two threads writing one path.

What a write must guarantee: refused inputs are refused before a byte is written; a file put in place
reopens as the tensors that were planned (exit 0 means a valid file); a destination that is a folder,
a FIFO, a socket or a device, or lies in a missing folder, is refused before any work; nothing a
hostile folder holds (a FIFO under a temporary's name) makes a writer hang; and writers of one path,
threads of one process included, never delete each other's temporary files. Whatever could hang runs
in a child process with a timeout.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import sparsemap
from sparsemap import converter, durable, writer
from sparsemap.cli import main
from sparsemap.durable import atomic_write, remove_stale_temporaries
from sparsemap.errors import DestinationError, ReservedNameError, WriteVerificationError
from sparsemap.formats.reserved import PAD_PREFIX
from sparsemap.writer import Layout

# ---------------------------------------------------------------- reserved and colliding names

W = torch.arange(12.0).reshape(3, 4)

RESERVED = [
    # (tensors, layout, the tensor the error names)
    ({"w": W, "w@rows": W}, Layout(pad_rows="w"), "w@rows"),  # w's stored form, given as a source name
    ({"w": W, "w@T": W.t().contiguous()}, Layout(transpose="w"), "w@T"),
    ({f"{PAD_PREFIX}0": torch.zeros(4, dtype=torch.uint8), "w": W}, Layout(), f"{PAD_PREFIX}0"),
    ({"__sparsemap.extra": W}, Layout(), "__sparsemap.extra"),  # the whole __sparsemap namespace
    ({"__sparsemap": W}, Layout(), "__sparsemap"),
    ({"__metadata__": W}, Layout(), "__metadata__"),  # the header's own key: the file would not reopen
    ({"x.mlp@bundle": W}, Layout(), "x.mlp@bundle"),
    ({"q@int4": W}, Layout(), "q@int4"),
    ({"q@int8.scale": W}, Layout(), "q@int8.scale"),
]


def ffn(prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}intermediate.dense.weight": torch.ones(4, 2),
            f"{prefix}output.dense.weight": torch.ones(2, 4)}


@pytest.mark.parametrize(("tensors", "layout", "name"), RESERVED,
                         ids=["rows", "T", "pad", "namespace", "namespace-bare", "metadata-key", "bundle",
                              "int4", "int8"])
def test_save_refuses_reserved_names_before_writing(tmp_path: Path, tensors: dict[str, torch.Tensor],
                                                   layout: Layout, name: str) -> None:
    dest = tmp_path / "out.safetensors"
    with pytest.raises(ReservedNameError) as info:
        sparsemap.save(tensors, dest, layout=layout)
    assert info.value.tensor == name and info.value.path == str(dest)
    assert repr(name) in str(info.value) and str(dest) in str(info.value)
    assert os.listdir(tmp_path) == []  # nothing written, no temporary


def test_two_names_planned_to_one_stored_name_are_refused(tmp_path: Path) -> None:
    # "a." and "a_" both strip to the bundle "a@bundle".
    dest = tmp_path / "out.safetensors"
    with pytest.raises(ReservedNameError) as info:
        sparsemap.save({**ffn("a."), **ffn("a_")}, dest, layout=Layout(bundle_ffn=True))
    assert info.value.tensor == "a@bundle" and "two" in str(info.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("tensors", "layout", "name"), RESERVED[:3] + RESERVED[6:],
                         ids=["rows", "T", "pad", "bundle", "int4", "int8"])
def test_convert_refuses_reserved_source_names(tmp_path: Path, tensors: dict[str, torch.Tensor],
                                               layout: Layout, name: str) -> None:
    src, dst = tmp_path / "src.safetensors", tmp_path / "out.safetensors"
    save_file({n: t.clone() for n, t in tensors.items()}, str(src))  # no shared storage
    with pytest.raises(ReservedNameError) as info:
        sparsemap.convert(src, dst, layout=layout)
    assert info.value.tensor == name and info.value.path == str(src)
    assert sorted(os.listdir(tmp_path)) == ["src.safetensors"]


def test_convert_refuses_the_metadata_key_from_a_torch_checkpoint(tmp_path: Path) -> None:
    # A torch pickle may name a tensor "__metadata__"; written as is, the header would not reopen.
    src, dst = tmp_path / "src.pt", tmp_path / "out.safetensors"
    torch.save({"__metadata__": torch.ones(2), "w": torch.ones(3)}, src)
    with pytest.raises(ReservedNameError) as info:
        sparsemap.convert(src, dst)
    assert info.value.tensor == "__metadata__" and info.value.path == str(src)
    result = CliRunner().invoke(main, ["convert", str(src), str(dst)])
    assert result.exit_code == 2 and "'__metadata__'" in result.output, result.output
    assert sorted(os.listdir(tmp_path)) == ["src.pt"]


# ---------------------------------------------------------------- reopen and validate before the rename

def corrupt_plan(monkeypatch: pytest.MonkeyPatch, old: bytes, new: bytes) -> None:
    """Make the planner's header lie (same length, so the data still lines up) as a planner bug would."""
    assert len(old) == len(new)
    real_plan = writer.plan

    def lying_plan(*args: object, **kwargs: object) -> writer.Plan:
        the_plan = real_plan(*args, **kwargs)  # type: ignore[arg-type]
        assert old in the_plan.header
        return replace(the_plan, header=the_plan.header.replace(old, new))

    monkeypatch.setattr(writer, "plan", lying_plan)
    monkeypatch.setattr(converter, "plan", lying_plan)


@pytest.mark.parametrize(("old", "new", "needles"), [
    (b'"dtype":"F32"', b'"dtype":"F99"', ["does not reopen", "UnknownDtypeError", "F99", "not put in place"]),
    (b'"shape":[3,4]', b'"shape":[4,3]', ["does not reopen as planned", "'w'", "[4, 3]", "[3, 4]"]),
    (b'"dtype":"F32"', b'"dtype":"I32"', ["'w'", "I32", "F32"]),
    (b'"w":{', b'"v":{', ["'w'", "missing"]),
], ids=["unreadable", "shape", "dtype", "name"])
def test_a_written_file_that_does_not_reopen_as_planned_is_not_put_in_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old: bytes, new: bytes, needles: list[str]) -> None:
    dest = tmp_path / "out.safetensors"
    dest.write_bytes(b"precious")
    corrupt_plan(monkeypatch, old, new)
    with pytest.raises(WriteVerificationError) as info:
        sparsemap.save({"w": W}, dest)
    message = str(info.value)
    assert info.value.path == str(dest) and str(dest) in message
    for needle in needles:
        assert needle in message, (needle, message)
    assert dest.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_convert_exits_1_when_its_file_does_not_reopen(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = tmp_path / "src.safetensors", tmp_path / "out.safetensors"
    save_file({"w": W}, str(src))
    corrupt_plan(monkeypatch, b'"shape":[3,4]', b'"shape":[6,2]')
    result = CliRunner().invoke(main, ["convert", str(src), str(dst)])
    assert result.exit_code == 1 and "does not reopen as planned" in result.output, result.output
    assert sorted(os.listdir(tmp_path)) == ["src.safetensors"]


# ---------------------------------------------------------------- destinations that cannot take a file

def make_fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def make_socket(path: Path) -> Path:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # the socket file stays
    return path


def make_device_link(path: Path) -> Path:
    path.symlink_to("/dev/null")  # a device without mknod rights; the writer follows the link
    return path


def make_folder(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize(("make", "kind"), [(make_folder, "folder"), (make_fifo, "FIFO"),
                                            (make_socket, "socket"), (make_device_link, "device")],
                         ids=["folder", "fifo", "socket", "device"])
def test_a_destination_that_is_not_a_file_is_refused_before_any_work(
        tmp_path: Path, make: Callable[[Path], Path], kind: str) -> None:
    dest = make(tmp_path / "out.safetensors")
    before = os.lstat(dest)
    missing_source = tmp_path / "never-read.safetensors"  # the destination is refused first
    for call in (lambda: sparsemap.convert(missing_source, dest), lambda: sparsemap.save({"w": W}, dest)):
        with pytest.raises(DestinationError) as info:
            call()
        assert info.value.path == str(dest) and kind in str(info.value), str(info.value)
    result = CliRunner().invoke(main, ["convert", str(missing_source), str(dest)])
    assert result.exit_code == 2 and kind in result.output, result.output
    after = os.lstat(dest)
    assert (stat.S_IFMT(after.st_mode), after.st_ino) == (stat.S_IFMT(before.st_mode), before.st_ino)
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]  # no temporary either


def test_a_real_device_node_is_refused(tmp_path: Path) -> None:
    dest = tmp_path / "null"
    try:
        os.mknod(dest, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except (PermissionError, OSError):
        pytest.skip("no right to make a device node here")
    with pytest.raises(DestinationError, match="device"):
        sparsemap.save({"w": W}, dest)
    assert stat.S_ISCHR(os.lstat(dest).st_mode)


@pytest.mark.parametrize("where", ["missing/out.safetensors", "a-file/out.safetensors"])
def test_a_destination_in_a_missing_folder_names_the_folder(tmp_path: Path, where: str) -> None:
    (tmp_path / "a-file").write_bytes(b"not a folder")
    dest = tmp_path / where
    missing_source = tmp_path / "never-read.safetensors"
    for call in (lambda: sparsemap.convert(missing_source, dest), lambda: sparsemap.save({"w": W}, dest)):
        with pytest.raises(DestinationError) as info:
            call()
        assert info.value.path == str(dest.parent), str(info.value)
    result = CliRunner().invoke(main, ["convert", str(missing_source), str(dest)])
    assert result.exit_code == 2 and str(dest.parent) in result.output, result.output


def test_a_destination_with_a_trailing_slash_names_a_folder(tmp_path: Path) -> None:
    with pytest.raises(DestinationError, match="folder"):
        sparsemap.save({"w": W}, f"{tmp_path}/new/")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- what a hostile folder holds

def test_a_fifo_under_the_temporary_name_is_skipped_not_opened(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "a.safetensors"
    fifo = make_fifo(tmp_path / f".a.safetensors.{os.getpid()}.deadbeef.tmp")
    names = iter(["deadbeef", "deadbeef", "0badcafe"])
    monkeypatch.setattr(durable.secrets, "token_hex", lambda n: next(names))
    with atomic_write(dest) as fd:
        os.write(fd, b"whole")
    assert dest.read_bytes() == b"whole"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # not ours: left alone


SWEEP = """
import sys
from sparsemap.durable import atomic_write, remove_stale_temporaries
dest = sys.argv[1]
print(remove_stale_temporaries(dest))
with atomic_write(dest) as fd:
    import os
    os.write(fd, b"written")
print("done")
"""


def test_sweeping_stale_temporaries_never_opens_a_fifo(tmp_path: Path) -> None:
    # A writer opening a FIFO with no reader for writing waits forever; the child would time out.
    fifo = make_fifo(tmp_path / ".a.safetensors.4242.abcdabcd.tmp")
    link = tmp_path / ".a.safetensors.4243.abcdabcd.tmp"
    link.symlink_to(fifo)
    stale = tmp_path / ".a.safetensors.4244.abcdabcd.tmp"
    stale.write_bytes(b"partial")  # a real stale temporary is still removed
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(SWEEP), str(tmp_path / "a.safetensors")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "done"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and link.is_symlink() and not stale.exists()
    assert (tmp_path / "a.safetensors").read_bytes() == b"written"


# ---------------------------------------------------------------- writers of one path

def test_a_stale_temporary_named_with_our_own_pid_is_removed(tmp_path: Path) -> None:
    # A container restarted gives its writer the same pid as the one that was killed: its temporary
    # is unlocked, so it is stale, whatever pid its name carries.
    stale = tmp_path / f".a.safetensors.{os.getpid()}.abcdabcd.tmp"
    stale.write_bytes(b"partial")
    assert remove_stale_temporaries(tmp_path / "a.safetensors") == [stale]


PROBE_DURING_RENAME = """
import os, sys
from sparsemap.durable import remove_stale_temporaries
print(len(remove_stale_temporaries(sys.argv[1])))
"""


def test_the_temporary_stays_locked_until_it_is_renamed(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Another process sweeping between the last write and the rename must find the temporary locked.
    dest = tmp_path / "a.safetensors"
    real_replace = os.replace
    swept: list[str] = []

    def replace_after_a_sweep(src: str, dst: str) -> None:
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(PROBE_DURING_RENAME), str(dest)],
                              capture_output=True, text=True, timeout=60, check=True)
        swept.append(proc.stdout.strip())
        real_replace(src, dst)

    monkeypatch.setattr(durable.os, "replace", replace_after_a_sweep)
    with atomic_write(dest) as fd:
        os.write(fd, b"complete")
    assert swept == ["0"]
    assert dest.read_bytes() == b"complete"


def test_two_threads_saving_one_path_both_end_cleanly(tmp_path: Path) -> None:
    dest = tmp_path / "model.sparsemap.safetensors"
    contents = {k: {"w": torch.full((64, 64), float(k)), f"only{k}": torch.arange(k + 3.0)} for k in (1, 2)}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def saver(k: int) -> None:
        try:
            for _ in range(25):
                barrier.wait(timeout=60)
                sparsemap.save(contents[k], dest, layout=Layout(pad_rows="w"))
        except BaseException as e:  # reported by the main thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=saver, args=(k,)) for k in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    state = sparsemap.load_state_dict(dest)
    k = 1 if "only1" in state else 2
    assert set(state) == set(contents[k])
    assert all(torch.equal(state[n], contents[k][n]) for n in state)
    assert os.listdir(tmp_path) == ["model.sparsemap.safetensors"]
