"""SmolLM2's real GGUF (Q4_1 and Q8_0 quantized, F32 norms) reads exactly as gguf dequantizes it."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize

import sparsemap


@pytest.mark.model
def test_every_tensor_equals_gguf_dequantization(smollm2_gguf):
    ckpt = sparsemap.Checkpoint(smollm2_gguf)
    reader = GGUFReader(smollm2_gguf)
    assert len(ckpt) == len(reader.tensors) == 272
    encodings = {e.encoding for e in ckpt.catalog.values()}
    assert {"Q4_1", "Q8_0", None} <= encodings
    for t in reader.tensors:
        ours = ckpt.tensor(t.name)
        assert tuple(ours.shape) == tuple(reversed(t.shape.tolist())), t.name
        expected = dequantize(t.data, t.tensor_type).reshape(ours.shape)
        assert np.array_equal(ours.numpy(), expected), t.name


@pytest.mark.model
def test_metadata_exposes_the_architecture(smollm2_gguf):
    ckpt = sparsemap.Checkpoint(smollm2_gguf)
    assert ckpt.catalog.metadata["general.architecture"] == "llama"
    assert ckpt.catalog.metadata["llama.block_count"] == "30"
