"""sparsemap.mapped: a file mapping owns its descriptor and its tensors' row state, for its lifetime."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sparsemap
from sparsemap import errors
from sparsemap.formats.catalog import FileStamp
from sparsemap.mapped import DTYPE_NAMES, LIVE_MAPPINGS, TORCH_DTYPES, map_file, mapping_of, release_pages


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(4096, dtype=torch.float32).reshape(4, 1024), "b": torch.ones(3)}, str(path))
    return path


def test_the_torch_dtype_table_derives_from_the_format_table() -> None:
    from sparsemap.formats.dtypes import ITEMSIZE, TORCH_NAMES

    assert set(TORCH_NAMES) == set(ITEMSIZE)
    for name, dtype in TORCH_DTYPES.items():
        assert dtype.itemsize == ITEMSIZE[name] and DTYPE_NAMES[dtype] == name


def test_map_file_refuses_a_file_that_is_not_the_version_parsed(model_file: Path) -> None:
    stamp = FileStamp.of(str(model_file))
    os.utime(model_file, ns=(stamp.mtime_ns + 10**9, stamp.mtime_ns + 10**9))
    with pytest.raises(errors.FileChangedError, match="changed since its header was read"):
        map_file(str(model_file), 0, stamp)


def test_mapping_of_finds_the_mapping_of_any_view_and_only_of_views(model_file: Path) -> None:
    t = sparsemap.Checkpoint(model_file).tensor("w")
    mm = mapping_of(t)
    assert mm.path == str(model_file) and mm.address <= t.data_ptr() < mm.end
    assert mapping_of(t[2:]) is mm and mapping_of(t.t()) is mm
    with pytest.raises(errors.NotMappedError, match="not a view of a file mapped by sparsemap"):
        mapping_of(t.clone(), "w")


def test_row_state_lives_on_the_mapping_and_goes_with_it(tmp_path: Path) -> None:
    path = tmp_path / "padded.safetensors"
    sparsemap.save({"emb": torch.ones(8, 100)}, path, layout=sparsemap.Layout(pad_rows=("emb",)))
    t = sparsemap.Checkpoint(path).tensor("emb")
    mm = mapping_of(t)
    assert mm.row_span(t) == t.stride(0) * 4  # each padded row owns its whole 512-byte slot
    assert mm.row_span(t[:4]) is None  # a view of other rows is another key
    ctl = sparsemap.rows(t)
    assert list(mm.row_controllers.values()) == [ctl]
    address = mm.address
    del t, ctl, mm
    gc.collect()
    assert LIVE_MAPPINGS.containing(address, address + 1) is None  # the index held it weakly


def test_release_pages_leaves_anonymous_memory_alone(model_file: Path) -> None:
    copy = torch.ones(4096 * 4)
    assert release_pages(copy) == 0 and bool((copy == 1).all())  # MADV_DONTNEED would have zeroed it
    t = sparsemap.Checkpoint(model_file).tensor("w")
    want = t.clone()
    release_pages(t)
    assert torch.equal(t, want)  # faulted back from the file


def test_a_mapping_cannot_be_closed_under_its_views(model_file: Path) -> None:
    """Closing the mmap would leave every view pointing at unmapped memory (a segfault on touch)."""
    ckpt = sparsemap.Checkpoint(model_file)
    t = ckpt.tensor("w")
    mm = ckpt.mapping(str(model_file))
    with pytest.raises(RuntimeError, match="never closed by hand"):
        mm.close()
    with pytest.raises(RuntimeError, match="not a context manager"), mm:
        pass
    assert not mm.closed and float(t[1, 0]) == 1024.0 and mapping_of(t) is mm
