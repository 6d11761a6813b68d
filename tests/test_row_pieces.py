"""sparsemap.row_pieces: a linear layer over a mapped weight computed a piece of rows at a time.

The output must equal the whole layer's, bit for bit: each output element is the same dot product over the
input features whatever rows are computed with it (a BLAS that blocked that reduction differently for fewer
rows would break this on its CPU, and the test would say so). The pages behind each piece are handed to the
caller as they are done with (and given back by it: not present in the process afterwards); only a plain
``nn.Linear`` over a mapped weight large enough is cut, and removing gives the module its forward back.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import sparsemap
from sparsemap import pages
from sparsemap.row_pieces import CUT_MIN_NBYTES, PIECE_NBYTES, RowPieces, can_cut, piece_rows

from .conftest import ModuleFolders

OUT, IN = 5003, 1024  # 20 MB of float32 rows, an odd number of them: the last piece is short


class Head(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lm_head = nn.Linear(IN, OUT, bias=bias)


@pytest.fixture(scope="module")
def path(module_folders: ModuleFolders) -> Path:
    torch.manual_seed(0)
    out = module_folders.make("head") / "head.safetensors"
    save_file({"lm_head.weight": torch.randn(OUT, IN), "lm_head.bias": torch.randn(OUT)}, out)
    return out


def _given_back(head: nn.Linear) -> tuple[list[tuple[int, int]], RowPieces]:
    spans: list[tuple[int, int]] = []

    def give_back(start: int, nbytes: int) -> None:
        spans.append((start, nbytes))
        pages.release(start, nbytes)

    return spans, RowPieces(head, give_back=give_back)


def test_pieces_compute_what_the_whole_layer_computes_and_give_back_what_they_leave(path: Path) -> None:
    head = sparsemap.load(Head, path).lm_head
    x = torch.randn(3, 7, IN)  # (batch, tokens, in)
    whole = head(x)
    spans, pieces = _given_back(head)
    got = head(x)
    assert torch.equal(got, whole)
    weight = head.weight
    start, end = weight.data_ptr(), weight.data_ptr() + weight.numel() * weight.element_size()
    assert len(spans) >= (end - start) // PIECE_NBYTES - 1  # a piece at a time, not all at the end
    assert all(start <= s and s + n <= end and s % pages.PAGE_SIZE == 0 for s, n in spans)  # its own pages
    first, last = pages.pages_inside(start, end)
    assert sum(n for _, n in spans) >= last - first - pages.PAGE_SIZE  # all but a page the next tensor shares
    assert not pages.present_in_process(first, last - first - pages.PAGE_SIZE).any()
    pieces.remove()
    assert "forward" not in head.__dict__ and torch.equal(head(x), whole)


def test_a_layer_without_bias_and_a_single_token(path: Path, tmp_path: Path) -> None:
    save_file({"lm_head.weight": sparsemap.safe_open(path).get_tensor("lm_head.weight").clone()},
              tmp_path / "no-bias.safetensors")
    head = sparsemap.load(lambda: Head(bias=False), tmp_path / "no-bias.safetensors").lm_head
    x = torch.randn(1, IN)
    whole = F.linear(x, head.weight)
    _, pieces = _given_back(head)
    assert torch.equal(head(x), whole)
    pieces.remove()


def test_only_a_plain_linear_over_a_large_mapped_weight_is_cut(path: Path) -> None:
    mapped = sparsemap.load(Head, path).lm_head
    assert can_cut(mapped)
    assert not can_cut(nn.Linear(IN, OUT))  # the same size, not mapped: a copy, nothing to give back
    with sparsemap.skeleton():
        small = nn.Linear(64, 64)
    assert not can_cut(small)
    assert not can_cut(nn.Embedding(10, 4))

    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # not F.linear: its own forward is kept
            return 2 * super().forward(x)

    scaled = Scaled(IN, OUT)
    scaled.weight = mapped.weight
    assert not can_cut(scaled)
    with pytest.raises(ValueError, match="not a linear layer over a mapped weight"):
        RowPieces(small, give_back=lambda *_: None)


@pytest.mark.parametrize(("row_nbytes", "want"), [(3072, 1364), (4096, 1024), (1 << 23, 1), (1000, 4096)])
def test_piece_rows_end_on_pages_where_rows_allow(row_nbytes: int, want: int) -> None:
    rows = piece_rows(row_nbytes, 4 << 20)
    assert rows == want
    if row_nbytes * rows >= pages.PAGE_SIZE:
        assert row_nbytes * rows % pages.PAGE_SIZE == 0
    assert CUT_MIN_NBYTES >= 2 * PIECE_NBYTES
