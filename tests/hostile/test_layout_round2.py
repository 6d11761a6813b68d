"""Layout metadata must keep tensors isolated (issue 14, item 3).

A converted file's views may overlap only in ways that cannot let one tensor change another: a
``rows`` view owns the padding after each of its rows (masking or evicting a row frees or zeroes
its whole slot), so no other view may read those bytes; views of the same recipe are tied weights,
one tensor under two names. Degenerate views (zero or tiny strides, empty views of huge shapes)
are refused at ``open`` with LayoutError, never a torch error at ``tensor()``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sparsemap
from sparsemap import errors
from sparsemap.formats.layout import LAYOUT_KEY

STORED = "w@rows"  # (4, 8) float32: rows of 6 values and 2 of padding


def laid_out(tmp_path: Path, **views: dict) -> Path:
    path = tmp_path / "laid-out.safetensors"
    tensors = {STORED: torch.arange(1, 33, dtype=torch.float32).view(4, 8), "bias": torch.ones(8)}
    save_file(tensors, str(path), metadata={LAYOUT_KEY: json.dumps({"version": 1, "views": views})})
    return path


def view(kind: str = "rows", offset: int = 0, shape: tuple = (4, 6), strides: tuple = (8, 1),
         stored: str = STORED) -> dict:
    return {"stored": stored, "kind": kind, "offset": offset, "shape": list(shape), "strides": list(strides)}


def test_a_view_reading_another_views_row_padding_is_refused(tmp_path: Path) -> None:
    """Masking a row of 'w' zeroes its whole slot, padding included: 'tail' reads that padding."""
    path = laid_out(tmp_path, w=view(), tail=view(offset=6, shape=(4, 2)))
    with pytest.raises(errors.LayoutError, match="owns as padded rows") as info:
        sparsemap.open(path)
    assert info.value.tensor == "tail" and "'w'" in str(info.value) and str(path) in str(info.value)


def test_an_alias_of_the_stored_tensor_beside_a_rows_view_is_refused(tmp_path: Path) -> None:
    path = laid_out(tmp_path, w=view(), whole=view(kind="alias", shape=(32,), strides=(1,)))
    with pytest.raises(errors.LayoutError, match="padded rows"):
        sparsemap.open(path)


def test_two_rows_views_of_one_stored_tensor_at_different_offsets_are_refused(tmp_path: Path) -> None:
    path = laid_out(tmp_path, a=view(shape=(2, 6)), b=view(offset=8, shape=(2, 6)))
    with pytest.raises(errors.LayoutError, match="padded rows"):
        sparsemap.open(path)


def test_tied_views_share_their_recipe_and_mask_together(tmp_path: Path) -> None:
    """Tied weights (one recipe, two names) are one tensor: allowed, and masking shows in both."""
    path = laid_out(tmp_path, emb=view(), head=view())
    ckpt = sparsemap.Checkpoint(path)
    emb, head = ckpt.tensor("emb"), ckpt.tensor("head")
    assert torch.equal(emb, head)
    sparsemap.rows(emb, "emb").mask([1])
    assert not emb[1].any() and not head[1].any() and emb[0].eq(head[0]).all()


def test_views_of_separate_columns_that_own_nothing_may_interleave(tmp_path: Path) -> None:
    """A bundle's parts read columns side by side in each row: none owns padding, so they coexist."""
    path = laid_out(tmp_path, gate=view(kind="bundle", shape=(4, 4)),
                    up=view(kind="bundle", offset=4, shape=(4, 4)))
    cat = sparsemap.open(path)
    assert set(cat) == {"gate", "up", "bias"}


@pytest.mark.parametrize(("shape", "strides", "needle"), [
    ((4, 6), (0, 1), "make elements overlap"),  # every row the same bytes
    ((4, 6), (1, 1), "make elements overlap"),  # rows one element apart
    ((32, 32), (1, 0), "make elements overlap"),
    ((0, 2**62), (8, 1), "is wider than its stored tensor"),
    ((2**40, 0), (1, 1), "is wider than its stored tensor"),
])
def test_degenerate_views_are_refused_at_open(tmp_path: Path, shape: tuple, strides: tuple,
                                              needle: str) -> None:
    path = laid_out(tmp_path, w=view(kind="transpose", shape=shape, strides=strides))
    with pytest.raises(errors.LayoutError, match=needle) as info:
        sparsemap.open(path)
    assert info.value.tensor == "w"
