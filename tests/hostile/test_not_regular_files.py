"""Paths that are not regular files on a disk are refused by name before anything reads them (issue 14,
item 5): a FIFO (opening one blocks until a writer comes), a socket, a device, a file of /proc. Each
command runs in a subprocess with a timeout, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sparsemap
from sparsemap import errors


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    os.mkfifo(path)
    return path


def unix_socket(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sparsemap.cli", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("command", [["inspect"], ["load"], ["convert", "{tmp}/out.safetensors"]])
@pytest.mark.parametrize("kind", ["fifo", "socket", "/dev/zero", "/proc/self/mem", "/dev/stdin"])
def test_cli_refuses_what_is_not_a_file_without_hanging(tmp_path: Path, command: list[str],
                                                        kind: str) -> None:
    if kind == "fifo":
        target = tmp_path / "model.safetensors"
        os.mkfifo(target)
    elif kind == "socket":
        target = unix_socket(tmp_path)
    else:
        target = Path(kind)
    args = [command[0], str(target), *(a.format(tmp=tmp_path) for a in command[1:])]
    proc = cli(*args)  # a FIFO opened for reading would block here until the timeout
    assert proc.returncode == 2, proc.stderr[-1000:]
    assert "not a checkpoint file" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_open_names_what_the_path_is(fifo: Path) -> None:
    with pytest.raises(errors.NotRegularFileError, match="is a FIFO, not a checkpoint file") as info:
        sparsemap.open(fifo)
    assert info.value.path == str(fifo)


def test_a_kernel_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(errors.NotRegularFileError, match="kernel file under /proc"):
        sparsemap.open("/proc/self/status")


def test_a_shard_that_is_a_fifo_is_refused_by_name(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "one.safetensors"))
    os.mkfifo(tmp_path / "two.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "one.safetensors", "b": "two.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(errors.NotRegularFileError, match="is a FIFO") as info:
        sparsemap.open(tmp_path)
    assert info.value.path == str(tmp_path / "two.safetensors")


def test_a_regular_file_behind_a_symbolic_link_still_opens(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "real.safetensors"))
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "real.safetensors")
    assert set(sparsemap.open(tmp_path / "link.safetensors")) == {"a"}


def test_a_fifo_found_in_a_folder_is_refused_by_name(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "model.gguf")
    with pytest.raises(errors.NotRegularFileError, match="is a FIFO") as info:
        sparsemap.open(tmp_path)
    assert info.value.path == str(tmp_path / "model.gguf")


def test_a_fifo_swapped_in_after_the_path_was_checked_is_refused_not_waited_on(tmp_path: Path) -> None:
    """The check is on what was opened: a FIFO put where a checkpoint was (after resolve_source looked)
    is refused at once by every reader, never blocked on for a writer that does not come."""
    import os

    from sparsemap.errors import NotRegularFileError
    from sparsemap.formats.source import open_regular, open_regular_fd

    path = tmp_path / "model.safetensors"
    os.mkfifo(path)
    with pytest.raises(NotRegularFileError, match="a FIFO"):
        open_regular_fd(path)
    with pytest.raises(NotRegularFileError, match="a FIFO"):
        open_regular(path)
    path.unlink()
    path.write_bytes(b"x")
    with open_regular(path) as f:
        assert f.read() == b"x" and os.get_blocking(f.fileno())
