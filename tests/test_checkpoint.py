"""sparsemap.Checkpoint: one copy-on-write mapping per file, zero-copy views, and their lifetime."""

from __future__ import annotations

import gc
import json
import os
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sparsemap
from sparsemap import errors


def st_file(path: Path, header: dict, data: bytes) -> Path:
    """A safetensors file from a header dict, padded with spaces so the data section is 8-aligned."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "embed": torch.randn(64, 16, generator=gen),
        "bias": torch.randn(16, generator=gen).half(),
        "ids": torch.arange(10, dtype=torch.int64),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.25, dtype=torch.float64),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path


def maps_of(path: Path) -> list[str]:
    """Lines of /proc/self/maps that map ``path``."""
    with open("/proc/self/maps") as f:
        return [line for line in f if line.rstrip().endswith(str(path))]


# ---------------------------------------------------------------- one mapping, zero-copy views

def test_tensors_of_one_file_share_one_mapping(model_file: Path) -> None:
    ckpt = sparsemap.Checkpoint(model_file)
    assert ckpt.mapped_ranges() == {}  # nothing is mapped before the first tensor
    views = {name: ckpt.tensor(name) for name in ckpt}
    ranges = ckpt.mapped_ranges()
    assert list(ranges) == [str(model_file)]
    base, nbytes = ranges[str(model_file)]
    assert nbytes == model_file.stat().st_size
    for name, t in views.items():
        assert base <= t.data_ptr() < base + nbytes
        assert t.data_ptr() - base == ckpt.catalog[name].offset  # exactly where the header says
        assert ckpt.owns(t)
    # Asking again maps nothing new and serves the same bytes.
    assert ckpt.tensor("embed").data_ptr() == views["embed"].data_ptr()
    assert ckpt.mapped_ranges() == ranges


def test_one_mapping_per_file_of_a_sharded_catalog(tmp_path: Path) -> None:
    save_file({"a": torch.ones(8), "b": torch.zeros(4)}, str(tmp_path / "s1.safetensors"))
    save_file({"c": torch.full((3,), 2.0)}, str(tmp_path / "s2.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s1.safetensors",
                                            "c": "s2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = sparsemap.Checkpoint(tmp_path)
    views = {name: ckpt.tensor(name) for name in ckpt}
    ranges = ckpt.mapped_ranges()
    assert set(ranges) == {str(tmp_path / "s1.safetensors"), str(tmp_path / "s2.safetensors")}
    for name, t in views.items():
        base, nbytes = ranges[ckpt.catalog[name].file]
        assert base <= t.data_ptr() < base + nbytes


def test_concurrent_first_use_maps_once(model_file: Path) -> None:
    ckpt = sparsemap.Checkpoint(model_file)
    with ThreadPoolExecutor(8) as pool:
        ptrs = list(pool.map(lambda _: ckpt.tensor("embed").data_ptr(), range(32)))
    assert len(set(ptrs)) == 1
    assert len(ckpt.mapped_ranges()) == 1


def test_copies_are_not_views(model_file: Path) -> None:
    ckpt = sparsemap.Checkpoint(model_file)
    t = ckpt.tensor("embed")
    assert ckpt.owns(t)
    assert not ckpt.owns(t.clone())
    assert not sparsemap.Checkpoint(model_file).owns(t)  # another checkpoint's mappings


def test_empty_tensor_needs_no_mapping(tmp_path: Path) -> None:
    path = tmp_path / "e.safetensors"
    save_file({"e": torch.zeros(0, 4)}, str(path))
    ckpt = sparsemap.Checkpoint(path)
    assert ckpt.tensor("e").shape == (0, 4)
    assert ckpt.mapped_ranges() == {}


# ---------------------------------------------------------------- copy-on-write

def test_writing_into_a_view_does_not_change_the_file(model_file: Path) -> None:
    before = model_file.read_bytes()
    ckpt = sparsemap.Checkpoint(model_file)
    t = ckpt.tensor("embed")
    original = t.clone()
    t.fill_(42.0)
    ckpt.tensor("ids")[3] = -7
    assert torch.all(t == 42.0)
    assert ckpt.tensor("embed").data_ptr() == t.data_ptr()
    # The file, and a fresh reader of it, still see the original bytes.
    assert model_file.read_bytes() == before
    fresh = sparsemap.Checkpoint(model_file)
    assert torch.equal(fresh.tensor("embed"), original)
    assert fresh.tensor("ids").tolist() == list(range(10))
    del ckpt, t
    gc.collect()
    assert model_file.read_bytes() == before


# ---------------------------------------------------------------- truncation

@pytest.mark.parametrize("cut", [4, 200, None])
def test_file_truncated_after_open_raises_instead_of_sigbus(model_file: Path, cut: int | None) -> None:
    ckpt = sparsemap.Checkpoint(model_file)
    size = model_file.stat().st_size
    new_size = 0 if cut is None else size - cut
    os.truncate(model_file, new_size)
    with pytest.raises(errors.FileChangedError) as info:  # the version parsed is not the one there now
        ckpt.tensor("embed")
    message = str(info.value)
    assert str(model_file) in message
    assert f"size {size} -> {new_size} bytes" in message


@pytest.mark.parametrize("reads", [False, True])
def test_tensors_checks_each_file_even_after_an_empty_tensor(tmp_path: Path, reads: bool) -> None:
    """Regression: tensors() marked a file checked at its first tensor, which for an empty tensor
    returned before checking anything: a truncated file then served views that fault (SIGBUS)."""
    path = tmp_path / "m.safetensors"
    save_file({"a_empty": torch.zeros(0, 4), "b": torch.ones(4096)}, str(path))
    code = f"""
import os, sparsemap
from sparsemap.errors import FileChangedError
ckpt = sparsemap.Checkpoint({str(path)!r})
ckpt.tensor("b")  # mapped
os.truncate({str(path)!r}, 4096)
try:
    for name, t in ckpt.tensors(reads={reads}):
        t.sum()
except FileChangedError as e:
    print("refused:", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"rc {out.returncode}: {out.stderr[-2000:]}"  # -7 would be SIGBUS
    assert "refused:" in out.stdout and "changed since it was mapped" in out.stdout


def test_tensors_that_read_their_pages_are_checked_one_by_one(model_file: Path) -> None:
    """A cast reads every page: with reads=True a file truncated mid-way is refused at the next tensor."""
    ckpt = sparsemap.Checkpoint(model_file)
    served = ckpt.tensors(["embed", "bias", "ids"], reads=True)
    next(served)
    os.truncate(model_file, 100)
    with pytest.raises(errors.FileChangedError, match="changed since it was mapped"):
        next(served)


def test_file_too_short_for_its_header_when_mapped(model_file: Path) -> None:
    """Without a stamp (a catalog built by hand), the size check still refuses a short file."""
    from sparsemap.mapped import map_file

    size = model_file.stat().st_size
    os.truncate(model_file, size - 4)
    with pytest.raises(errors.TruncatedFileError,
                       match=f"file is {size - 4} bytes but its tensors need {size}"):
        map_file(str(model_file), size)


# ---------------------------------------------------------------- misaligned data

def test_misaligned_tensor_is_served_as_a_correct_copy(tmp_path: Path) -> None:
    # One byte of U8, then F32 at data offset 1: unaligned for its 4-byte elements.
    values = [1.5, -2.25, 2.0**40, float("inf")]  # exact in float32
    header = {"byte": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "f": {"dtype": "F32", "shape": [2, 2], "data_offsets": [1, 17]}}
    path = st_file(tmp_path / "odd.safetensors", header, b"\x07" + struct.pack("<4f", *values))
    ckpt = sparsemap.Checkpoint(path)
    assert ckpt.catalog["f"].offset % 8 == 1
    assert not ckpt.catalog["f"].zero_copy and ckpt.catalog["byte"].zero_copy

    f = ckpt.tensor("f")
    assert f.dtype == torch.float32 and f.shape == (2, 2)
    assert f.reshape(-1).tolist() == values
    assert f.data_ptr() % 4 == 0
    assert not ckpt.owns(f)
    assert (f * 2).reshape(-1).tolist() == [v * 2 for v in values]  # usable by kernels

    b = ckpt.tensor("byte")
    assert b.tolist() == [7] and ckpt.owns(b)


# ---------------------------------------------------------------- lifetime

def test_view_outlives_its_checkpoint(model_file: Path) -> None:
    ckpt = sparsemap.Checkpoint(model_file)
    t = ckpt.tensor("embed")
    want = t.clone()
    del ckpt
    gc.collect()
    churn = [torch.randn(256, 256) for _ in range(16)]  # reuse freed memory, if any was freed
    assert torch.equal(t, want)
    assert float(t.sum()) == float(want.sum())
    del churn


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_mapping_is_released_with_the_last_view(model_file: Path) -> None:
    ckpt = sparsemap.Checkpoint(model_file)
    t = ckpt.tensor("embed")
    assert len(maps_of(model_file)) >= 1
    del ckpt
    gc.collect()
    assert len(maps_of(model_file)) >= 1  # the view keeps it
    del t
    gc.collect()
    assert maps_of(model_file) == []
