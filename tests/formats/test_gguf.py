"""sparsemap.formats.gguf: files written by gguf.GGUFWriter, plain and quantized; damaged files.

Plain tensors must be zero-copy views whose bytes equal the reader's; quantized
ones must equal ``gguf.quants.dequantize`` exactly. Shapes are row-major, the
reverse of GGUF's fastest-first dims.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

import sparsemap
from sparsemap import errors
from sparsemap.errors import SparsemapError

from ..conftest import ModuleFolders
from ..helpers import write_gguf

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402 - only after importorskip found gguf
from gguf.quants import dequantize, quantize  # noqa: E402 - only after importorskip found gguf

QUANTIZED = ["Q4_0", "Q4_1", "Q8_0"]


def _write(path: Path, tensors: dict[str, tuple[np.ndarray, Q | None]]) -> Path:
    return write_gguf(path, tensors, {"test.answer": 42, "test.note": "sparsemap"})


@pytest.fixture(scope="module")
def weights() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)  # (rows, row_len)


@pytest.fixture(scope="module")
def gguf_file(module_folders: ModuleFolders, weights: np.ndarray) -> Path:
    rng = np.random.default_rng(1)
    tensors: dict[str, tuple[np.ndarray, Q | None]] = {
        "f32": (weights, None),
        "f16": (weights.astype(np.float16), None),
        "f32_3d": (rng.standard_normal((2, 3, 5)).astype(np.float32), None),
        "f32_1d": (rng.standard_normal(17).astype(np.float32), None),
        "i8": (rng.integers(-128, 128, (3, 5)).astype(np.int8), None),
        "i16": (rng.integers(-30000, 30000, (3, 5)).astype(np.int16), None),
        "i32": (rng.integers(-2**31, 2**31, (3, 5)).astype(np.int32), None),
    }
    with contextlib.suppress(Exception):  # an old gguf package that cannot write BF16
        tensors["bf16"] = (quantize(weights, Q.BF16), Q.BF16)
    for q in QUANTIZED:
        tensors[q] = (quantize(weights, Q[q]), Q[q])
    return _write(module_folders.make("gguf") / "model.gguf", tensors)


def raises_any(path: Path, *allowed: type[SparsemapError]) -> SparsemapError:
    with pytest.raises(SparsemapError) as info:
        sparsemap.open(path)
    err = info.value
    assert isinstance(err, allowed), f"{type(err).__name__}: {err}"
    assert isinstance(err, ValueError)
    assert str(path) in str(err)
    return err


# ---------------------------------------------------------------- round trips

def test_shapes_are_row_major(gguf_file: Path) -> None:
    ckpt = sparsemap.Checkpoint(gguf_file)
    reader = gguf.GGUFReader(str(gguf_file))
    assert ckpt.format == "gguf"
    assert set(ckpt) == {t.name for t in reader.tensors}
    for t in reader.tensors:
        dims = [int(d) for d in t.shape]
        assert ckpt.catalog[t.name].shape == tuple(reversed(dims))
        assert ckpt.tensor(t.name).shape == ckpt.catalog[t.name].shape
    assert ckpt.catalog["f32"].shape == (8, 64)
    assert ckpt.catalog["f32_3d"].shape == (2, 3, 5)
    assert ckpt.catalog["Q4_0"].shape == (8, 64)


def test_plain_tensors_are_zero_copy_views_of_the_readers_bytes(gguf_file: Path) -> None:
    ckpt = sparsemap.Checkpoint(gguf_file)
    reader = gguf.GGUFReader(str(gguf_file))
    plain = [t for t in reader.tensors if t.tensor_type.name not in QUANTIZED]
    assert {t.name for t in plain} >= {"f32", "f16", "i8", "i16", "i32"}
    for t in plain:
        e = ckpt.catalog[t.name]
        assert e.encoding is None and e.dtype == t.tensor_type.name
        assert e.offset == t.data_offset and e.nbytes == t.n_bytes
        got = ckpt.tensor(t.name)
        assert ckpt.owns(got), t.name
        want = np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)
        assert got.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() == want.tobytes()


def test_plain_values_match_what_was_written(gguf_file: Path, weights: np.ndarray) -> None:
    ckpt = sparsemap.Checkpoint(gguf_file)
    assert np.array_equal(ckpt.tensor("f32").numpy(), weights)
    assert np.array_equal(ckpt.tensor("f16").numpy(), weights.astype(np.float16))
    if "bf16" in ckpt:
        # bf16 is f32 with the low 16 bits rounded off; compare through torch.
        assert ckpt.tensor("bf16").dtype == torch.bfloat16
        assert torch.allclose(ckpt.tensor("bf16").float(), torch.from_numpy(weights), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("qtype", QUANTIZED)
def test_quantized_tensors_dequantize_exactly(gguf_file: Path, qtype: str) -> None:
    ckpt = sparsemap.Checkpoint(gguf_file)
    reader = gguf.GGUFReader(str(gguf_file))
    (t,) = [t for t in reader.tensors if t.name == qtype]
    e = ckpt.catalog[qtype]
    assert e.encoding == qtype and e.dtype == "F32"
    assert e.offset == t.data_offset and e.nbytes == t.n_bytes
    want = dequantize(t.data, Q[qtype]).reshape(e.shape)
    got = ckpt.tensor(qtype)
    assert got.dtype == torch.float32 and got.shape == (8, 64)
    assert np.array_equal(got.numpy(), want)
    assert not ckpt.owns(got)  # dequantized: a copy by design


def test_metadata_scalars(gguf_file: Path) -> None:
    ckpt = sparsemap.Checkpoint(gguf_file)
    assert ckpt.catalog.metadata["general.architecture"] == "llama"
    assert ckpt.catalog.metadata["test.answer"] == "42"
    assert ckpt.catalog.metadata["test.note"] == "sparsemap"


def test_folder_with_one_gguf(gguf_file: Path) -> None:
    ckpt = sparsemap.Checkpoint(gguf_file.parent)
    assert ckpt.source == str(gguf_file)


# ---------------------------------------------------------------- damaged files

def test_gguf_magic_then_garbage_under_another_name(tmp_path: Path) -> None:
    # Dispatch is by content: "GGUF" decides, whatever the file is called.
    path = tmp_path / "renamed.bin"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    raises_any(path, errors.GGUFError)


def test_wrong_magic_with_gguf_name(tmp_path: Path, gguf_file: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUX" + gguf_file.read_bytes()[4:])
    raises_any(path, errors.UnknownFormatError, errors.GGUFError)


def test_bad_version(tmp_path: Path, gguf_file: Path) -> None:
    data = bytearray(gguf_file.read_bytes())
    data[4:8] = (999).to_bytes(4, "little")
    path = tmp_path / "model.gguf"
    path.write_bytes(bytes(data))
    raises_any(path, errors.GGUFError)


@pytest.mark.parametrize("keep", [-4, -300, -2000, 24, 64])
def test_truncated_file(tmp_path: Path, gguf_file: Path, keep: int) -> None:
    data = gguf_file.read_bytes()
    path = tmp_path / "model.gguf"
    path.write_bytes(data[:keep])
    raises_any(path, errors.GGUFError, errors.TruncatedFileError)


def test_empty_file_named_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"")
    raises_any(path, errors.UnknownFormatError, errors.GGUFError)
