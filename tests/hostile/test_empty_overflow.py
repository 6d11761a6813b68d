"""Regression: an empty tensor whose other dimensions overflow int64 (found by the atheris target on a
GGUF): torch multiplies every dimension even when one is 0 ("Stride calculation overflowed"), so each
format refuses it at open with SizeOverflowError, never a torch error at ``tensor()``."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

import sparsemap
from sparsemap import errors

HUGE = [0, 2**62, 2**62]


def test_gguf_empty_tensor_with_overflowing_dimensions(tmp_path: Path) -> None:
    name = b"token_embd.weight"
    dims = HUGE[::-1]  # GGUF lists the fastest dimension first
    header = (b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + struct.pack("<Q", len(name)) + name
              + struct.pack("<I", 3) + struct.pack("<3Q", *dims) + struct.pack("<IQ", 0, 0))
    path = tmp_path / "empty.gguf"
    path.write_bytes(header + bytes(-len(header) % 32))
    with pytest.raises(errors.SizeOverflowError, match="more than 2\\*\\*63 bytes") as info:
        sparsemap.Checkpoint(path).tensor("token_embd.weight")
    assert info.value.tensor == "token_embd.weight"


def test_safetensors_empty_tensor_with_overflowing_dimensions(tmp_path: Path) -> None:
    raw = json.dumps({"w": {"dtype": "F32", "shape": HUGE, "data_offsets": [0, 0]}}).encode()
    path = tmp_path / "empty.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(errors.SizeOverflowError, match="zero dimensions counted as one"):
        sparsemap.open(path)


def test_empty_tensors_of_ordinary_shapes_still_open(tmp_path: Path) -> None:
    raw = json.dumps({"w": {"dtype": "F32", "shape": [0, 4096], "data_offsets": [0, 0]}}).encode()
    path = tmp_path / "ok.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    assert sparsemap.Checkpoint(path).tensor("w").shape == (0, 4096)
