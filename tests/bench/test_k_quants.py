"""The K-quant writer of the tests and benchmarks: its blocks are ones gguf itself reads back near the
weights they came from, and sparsemap's decoder reads them as gguf does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsemap.bench.k_quants import BLOCK_BYTES, quantize_k
from sparsemap.quantize import from_gguf

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402 - only after importorskip found gguf

# The relative error of plain min/max scales; llama.cpp's search does better (about 3%, 10%, 25%).
ERROR_BOUND = {"Q5_K": 0.06, "Q3_K": 0.25, "Q2_K": 0.4}


def _weights(seed: int) -> np.ndarray:
    """(48, 512) float32 whose magnitude varies by row, with an offset: groups of every sign mix."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((48, 512)) * rng.uniform(0.01, 2, (48, 1)) + 0.1).astype(np.float32)


@pytest.mark.parametrize("qtype", list(BLOCK_BYTES))
def test_blocks_read_back_near_their_weights_by_gguf_and_sparsemap_alike(qtype: str) -> None:
    w = _weights(list(BLOCK_BYTES).index(qtype))
    blocks = quantize_k(w, qtype)
    assert blocks.shape == (48, 2 * BLOCK_BYTES[qtype]) and blocks.dtype == np.uint8
    back = dequantize(blocks, gguf.GGMLQuantizationType[qtype])  # (48, 512)
    error = np.linalg.norm(back - w) / np.linalg.norm(w)
    assert 0 < error < ERROR_BOUND[qtype], error
    ours = from_gguf(torch.from_numpy(blocks).reshape(-1), qtype, w.shape).values()
    assert torch.equal(ours, torch.from_numpy(back))


def test_a_row_of_zeros_stays_zero() -> None:
    w = _weights(5)
    w[3] = 0
    for qtype in BLOCK_BYTES:
        back = dequantize(quantize_k(w, qtype), gguf.GGMLQuantizationType[qtype])
        assert not back[3].any() and np.isfinite(back).all(), qtype


@pytest.mark.parametrize(("qtype", "shape", "message"), [
    ("Q4_K", (4, 256), "no K-quant writer for Q4_K"),
    ("Q5_K", (4, 300), "rows of a multiple of 256 values, not 300"),
    ("Q2_K", (512,), r"for a matrix, not shape \[512\]"),
])
def test_what_cannot_be_written_is_refused(qtype: str, shape: tuple[int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quantize_k(np.zeros(shape, np.float32), qtype)
