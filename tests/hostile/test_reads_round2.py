"""Changes during a read (issue 14, item 6): a file rewritten while it is streamed, a source truncated
while it is converted.

A stream must not hand back tensors that mix two versions of a file: it checks each file's stamp
once its reads are done. A conversion reads its source with ``pread``/``copy_file_range``, never
through a mapping, so a source truncated under it is a short read reported as a FileChangedError
naming the file and both sizes: never SIGBUS (a mapped page past the end), never a raw EFAULT
(``write(2)`` given mapped pages past the end), and no temporary file left behind. The truncating
conversions run in a child process, so a SIGBUS fails the test instead of killing pytest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sparsemap
from sparsemap.errors import FileChangedError
from sparsemap.stream import stream_tensors

# ---------------------------------------------------------------- streaming


def four_tensors(path: Path) -> dict[str, torch.Tensor]:
    state = {f"t{i}": torch.full((256, 1024), float(i)) for i in range(4)}  # 1 MiB each
    save_file(state, str(path))
    return state


def rewrite_one_value(path: Path) -> None:
    """Same inode, same size, one float changed: an in-place edit."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 4)
        f.write(np.float32(-1.0).tobytes())


def rewrite_everything(path: Path) -> None:
    """Same inode, same size, every byte written again (what ``cp new old`` does: truncate, write)."""
    data = path.read_bytes()
    with open(path, "wb") as f:
        f.write(data[:-4] + np.float32(-1.0).tobytes())


@pytest.mark.parametrize("rewrite", [rewrite_one_value, rewrite_everything], ids=["one-value", "whole-file"])
def test_a_file_rewritten_in_place_while_streamed_is_refused(tmp_path: Path, rewrite) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "model.safetensors"
    four_tensors(path)
    catalog = sparsemap.open(path)
    done = [False]

    def rewrite_after_the_first_tensor(_: int) -> None:
        if not done[0]:
            done[0] = True
            time.sleep(0.02)  # a new modification time even on a file system with coarse timestamps
            rewrite(path)

    with pytest.raises(FileChangedError) as info:
        stream_tensors(catalog, staging="1M", readers=1, on_bytes=rewrite_after_the_first_tensor)
    assert info.value.path == str(path) and "changed" in str(info.value)


def test_a_file_replaced_by_rename_while_streamed_gives_the_old_tensors(tmp_path: Path) -> None:
    # The descriptors read the old inode to the end: a whole, consistent version (as a mapping does).
    path = tmp_path / "model.safetensors"
    old = four_tensors(path)
    catalog = sparsemap.open(path)
    done = [False]

    def replace_after_the_first_tensor(_: int) -> None:
        if not done[0]:
            done[0] = True
            save_file({n: -t for n, t in old.items()}, str(tmp_path / "new.safetensors"))
            os.replace(tmp_path / "new.safetensors", path)

    got, _ = stream_tensors(catalog, staging="1M", readers=1, on_bytes=replace_after_the_first_tensor)
    assert done[0] and all(torch.equal(got[n], old[n]) for n in old)


# ---------------------------------------------------------------- converting a source truncated under it

CONVERT_AND_TRUNCATE = """
import os, sys
import sparsemap.converter as converter
import sparsemap.durable as durable
import sparsemap.writer as writer
from sparsemap.cli import main

src, cut_after, cut_to = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
durable._WRITE_NBYTES = writer.CHUNK_NBYTES = 256 << 10  # many small steps, so the cut lands mid-tensor
real_convert = converter.convert


def convert(source, destination, *, layout=None, on_bytes=None):
    written = [0]

    def progress(n):
        written[0] += n
        if written[0] >= cut_after and os.path.getsize(src) > cut_to:
            os.truncate(src, cut_to)  # another process would do the same
        if on_bytes is not None:
            on_bytes(n)

    return real_convert(source, destination, layout=layout, on_bytes=progress)


converter.convert = convert
main(sys.argv[4:])
"""


def safetensors_source(folder: Path) -> Path:
    src = folder / "src.safetensors"
    save_file({"w": torch.randn(1024, 1024), "b": torch.randn(1024)}, str(src))  # w: 4 MiB, first
    return src


def torch_source(folder: Path) -> Path:
    src = folder / "src.pt"
    torch.save({"w": torch.randn(1024, 1024), "b": torch.randn(1024)}, src)
    return src


def gguf_source(folder: Path) -> Path:
    gguf = pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    src = folder / "src.gguf"
    w = gguf.GGUFWriter(str(src), "llama")
    w.add_tensor("w", rng.standard_normal((1024, 1024)).astype(np.float32))
    w.add_tensor("q", quantize(rng.standard_normal((256, 1024)).astype(np.float32), Q.Q8_0), raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return src


@pytest.mark.parametrize(("make_source", "options"), [
    (safetensors_source, []),
    (safetensors_source, ["--dtype", "float16"]),
    (safetensors_source, ["--pad-rows", "w"]),
    (safetensors_source, ["--transpose", "w"]),
    (torch_source, []),
    (gguf_source, []),
], ids=["plain", "cast", "pad-rows", "transpose", "torch-zip", "gguf"])
def test_a_source_truncated_during_convert_is_reported_not_a_crash(tmp_path: Path, make_source,  # type: ignore[no-untyped-def]
                                                                   options: list[str]) -> None:
    src = make_source(tmp_path)
    dst = tmp_path / "out.safetensors"
    size = src.stat().st_size
    cut_to = 64 << 10  # the header and a little data: most of w is gone
    argv = [str(src), str(1 << 20), str(cut_to), "convert", str(src), str(dst), *options]
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CONVERT_AND_TRUNCATE), *argv],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != -signal.SIGBUS, "the conversion read a mapped page past the end (SIGBUS)"
    assert proc.returncode in (1, 2), (proc.returncode, proc.stderr[-2000:])
    message = proc.stderr
    assert "sparsemap: error:" in message and "Traceback" not in message, message
    assert "Bad address" not in message, message  # EFAULT: write(2) was handed pages past the end
    assert str(src) in message and str(size) in message and str(cut_to) in message, message
    assert src.stat().st_size == cut_to  # the cut happened while converting
    assert sorted(os.listdir(tmp_path)) == [src.name]  # no destination, no temporary


def test_convert_checks_the_source_after_its_last_tensor(tmp_path: Path) -> None:
    # An in-place edit (same size) made while the last tensor is copied is caught by the check after it.
    src, dst = tmp_path / "src.safetensors", tmp_path / "out.safetensors"
    save_file({"a": torch.ones(1024), "b": torch.ones(1024)}, str(src))
    written = [0]
    file_nbytes = 3 * 4096  # the header padded to a page, then a and b (4 KiB each), each on a page

    def edit_with_the_last_bytes(n: int) -> None:
        written[0] += n
        if written[0] == file_nbytes:
            time.sleep(0.02)
            rewrite_one_value(src)

    with pytest.raises(FileChangedError) as info:
        sparsemap.convert(src, dst, on_bytes=edit_with_the_last_bytes)
    assert written[0] == file_nbytes
    assert info.value.path == str(src) and "modified in place" in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["src.safetensors"]


SAVE_A_TRUNCATED_VIEW = """
import os, sys
import sparsemap
from sparsemap.errors import FileChangedError
src, dst = sys.argv[1], sys.argv[2]
view = sparsemap.Checkpoint(src).tensor("w")  # a view of the mapping: no page read yet
os.truncate(src, 64 << 10)
try:
    sparsemap.save({"w": view}, dst)  # write(2) is handed mapped pages past the end: EFAULT
except FileChangedError as e:
    print("FileChangedError:", e)
"""


def test_saving_a_view_of_a_file_truncated_since_says_so(tmp_path: Path) -> None:
    # sparsemap.save of a mapped tensor whose file shrank: the kernel's copy faults (EFAULT), and the
    # error says which file changed instead of "Bad address".
    src, dst = safetensors_source(tmp_path), tmp_path / "out.safetensors"
    size = src.stat().st_size
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(SAVE_A_TRUNCATED_VIEW), str(src), str(dst)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("FileChangedError:") and str(src) in line and str(size) in line, line
    assert sorted(os.listdir(tmp_path)) == [src.name]
