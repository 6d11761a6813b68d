"""A mapped checkpoint changed underneath: replaced, converted over, truncated, rewritten in place.

What sparsemap guarantees: a file replaced by rename (what ``sparsemap convert``
and ``sparsemap.save`` do) never disturbs a loaded model, which keeps reading
the old inode; a file truncated or rewritten in place is detected before any
page is faulted in again, by every operation sparsemap runs (mapping, evict,
restore, prefetch, convert) with a FileChangedError. What no library can
guard: torch touching a page of a truncated file itself (a forward pass) is
SIGBUS; the README says so. The SIGBUS-prone checks run in a child process,
so a failed guard fails the test instead of killing pytest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sparsemap
from sparsemap.errors import FileChangedError

ROWS, COLS = 512, 1024  # 4 KiB rows of float32: one page each


def write(path: Path, fill: float) -> dict[str, torch.Tensor]:
    state = {"emb": torch.full((ROWS, COLS), fill) + torch.arange(ROWS).unsqueeze(1),
             "norm": torch.full((COLS,), fill)}
    sparsemap.save(state, path, layout=sparsemap.Layout(pad_rows="emb"))
    return state


def rewrite_last_value_in_place(path: Path) -> None:
    """Same inode, same size, other bytes: the last float becomes +inf."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 4)
        f.write(b"\x00\x00\x80\x7f")


def test_replacing_by_rename_leaves_a_loaded_model_untouched(tmp_path: Path) -> None:
    path = tmp_path / "model.sparsemap.safetensors"
    old = write(path, 1.0)
    state = sparsemap.load_state_dict(path)
    controller = sparsemap.rows(state["emb"])
    write(path, 2.0)  # a new inode renamed over the old name
    assert torch.equal(state["emb"], old["emb"]) and torch.equal(state["norm"], old["norm"])
    controller.evict(range(0, ROWS, 2), drop_cache=True)  # faults back from the old inode, not the new file
    assert torch.equal(state["emb"], old["emb"])
    controller.mask([3])
    controller.restore([3])
    assert torch.equal(state["emb"], old["emb"])
    assert sparsemap.Checkpoint(path).tensor("norm")[0].item() == 2.0  # opening again sees the new file


def test_converting_onto_a_mapped_file_keeps_the_loaders_data(tmp_path: Path) -> None:
    path, other = tmp_path / "model.sparsemap.safetensors", tmp_path / "other.safetensors"
    old = write(path, 1.0)
    save_file({"emb": torch.zeros(ROWS, COLS), "norm": torch.zeros(COLS)}, other)
    state = sparsemap.load_state_dict(path)
    sparsemap.convert(other, path)
    assert torch.equal(state["emb"], old["emb"]) and torch.equal(state["norm"], old["norm"])
    assert sparsemap.Checkpoint(path).tensor("norm").abs().sum().item() == 0


def test_file_rewritten_in_place_after_open_is_refused_at_mapping(tmp_path: Path) -> None:
    path = tmp_path / "model.sparsemap.safetensors"
    write(path, 1.0)
    ckpt = sparsemap.Checkpoint(path)
    rewrite_last_value_in_place(path)
    with pytest.raises(FileChangedError, match="modified in place"):
        ckpt.tensor("norm")


def test_rewrite_that_restores_the_modification_time_is_still_seen(tmp_path: Path) -> None:
    path = tmp_path / "model.sparsemap.safetensors"
    write(path, 1.0)
    ckpt = sparsemap.Checkpoint(path)
    ckpt.tensor("norm")  # mapped
    st = os.stat(path)
    rewrite_last_value_in_place(path)  # then set the old mtime back, as cp -p or rsync --inplace -t do
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(FileChangedError, match="change time"):
        ckpt.tensor("emb")


def test_file_truncated_after_open_is_refused_at_mapping(tmp_path: Path) -> None:
    path = tmp_path / "model.sparsemap.safetensors"
    write(path, 1.0)
    ckpt = sparsemap.Checkpoint(path)
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(FileChangedError, match="size"):
        ckpt.tensor("emb")


CHILD = """
import os, sys, json
import sparsemap
from sparsemap.errors import FileChangedError
path = sys.argv[1]
ckpt = sparsemap.Checkpoint(path)
state = sparsemap.load_state_dict(ckpt)
rows = sparsemap.rows(state["emb"])
rows.mask([1, 2])
os.truncate(path, os.path.getsize(path) // 2)
outcome = {}
for op, call in [("evict", lambda: rows.evict(range(100, 400))), ("restore", lambda: rows.restore([1, 2])),
                 ("prefetch", lambda: rows.prefetch(range(400, 500))), ("mask", lambda: rows.mask([450])),
                 ("another tensor", lambda: ckpt.tensor("norm")),
                 ("convert", lambda: sparsemap.convert(ckpt, path + ".out"))]:
    try:
        call()
        outcome[op] = "ran"
    except FileChangedError as e:
        outcome[op] = str(e)
print(json.dumps(outcome))
"""


def test_file_truncated_while_mapped_is_detected_before_any_page_faults(tmp_path: Path) -> None:
    path = tmp_path / "model.sparsemap.safetensors"
    write(path, 1.0)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD), str(path)], check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != -signal.SIGBUS, "a guarded operation touched a page past the end (SIGBUS)"
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    for op in ("evict", "restore", "prefetch", "mask", "another tensor", "convert"):
        assert "size" in outcome[op] and path.name in outcome[op], (op, outcome[op])
    assert not Path(str(path) + ".out").exists()
