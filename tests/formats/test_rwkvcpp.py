"""sparsemap.formats.rwkvcpp: rwkv.cpp's model files, written here byte by byte; the tiny trained models.

The reader must list every tensor with its row-major shape and the offset of
its data, serve float32 and float16 data as the file holds it, and refuse each
damaged file with its own error. The two tiny trained models of rwkv.cpp (in
the workspace's shared folder, absent elsewhere: those tests skip) must open;
the RWKV-7 one must reproduce rwkv.cpp's expected logits.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import sparsemap
from sparsemap import errors
from sparsemap.formats.rwkvcpp import MAGIC

TINY = Path(__file__).resolve().parents[3] / "shared" / "models" / "tiny-rwkv"


def write(path: Path, tensors: dict[str, np.ndarray], *, version: int = 101, magic: int = MAGIC,
          type_ids: dict[str, int] | None = None, tail: bytes = b"") -> Path:
    """An rwkv.cpp file: the header, then each tensor's description (dims innermost first) and data."""
    vocab, width = (tensors.get("emb.weight") if "emb.weight" in tensors else tensors["head.weight"]).shape
    layers = 1 + max(int(n.split(".")[1]) for n in tensors if n.startswith("blocks."))
    out = bytearray(struct.pack("<6I", magic, version, vocab, width, layers, 0))
    for name, array in tensors.items():
        key = name.encode()
        type_id = (type_ids or {}).get(name, 1 if array.dtype == np.float16 else 0)
        out += struct.pack("<3i", array.ndim, len(key), type_id)
        out += struct.pack(f"<{array.ndim}i", *reversed(array.shape))
        out += key + array.tobytes()
    path.write_bytes(bytes(out) + tail)
    return path


@pytest.fixture
def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"emb.weight": rng.standard_normal((256, 8)).astype(np.float32),
            "blocks.0.ln1.weight": rng.standard_normal(8).astype(np.float32),
            "blocks.0.att.x_rwkvag": rng.standard_normal((6, 1, 8)).astype(np.float32),
            "blocks.0.ffn.key.weight": rng.standard_normal((32, 8)).astype(np.float16),
            "head.weight": rng.standard_normal((256, 8)).astype(np.float32)}


def test_tensors_are_listed_row_major_and_served_as_stored(tmp_path: Path, arrays: dict) -> None:
    path = write(tmp_path / "m.bin", arrays)
    cat = sparsemap.open(path)
    assert cat.format == "rwkv-cpp"
    assert cat.metadata["rwkv_cpp.version"] == "101" and cat.metadata["rwkv_cpp.n_embed"] == "8"
    ckpt = sparsemap.Checkpoint(cat)
    for name, array in arrays.items():
        assert cat[name].shape == array.shape
        assert cat[name].dtype == ("F16" if array.dtype == np.float16 else "F32")
        assert np.array_equal(ckpt.tensor(name).numpy(), array), name


def test_aligned_data_is_a_view_of_the_file_unaligned_data_a_copy(tmp_path: Path, arrays: dict) -> None:
    # The format does not align data: whether a tensor starts on a multiple of its element size depends
    # on the lengths of the keys before it. Both kinds occur here.
    ckpt = sparsemap.Checkpoint(write(tmp_path / "m.bin", arrays))
    kinds = set()
    for name, entry in ckpt.catalog.items():
        aligned = entry.offset % (2 if entry.dtype == "F16" else 4) == 0
        assert ckpt.owns(ckpt.tensor(name)) == aligned, name
        kinds.add(aligned)
    assert kinds == {True, False}


@pytest.mark.parametrize(("damage", "error", "needle"), [
    (lambda p: p.write_bytes(b"\x00" * 4 + p.read_bytes()[4:]),
     errors.UnknownFormatError, "not a checkpoint"),
    (lambda p: p.write_bytes(p.read_bytes()[:4] + struct.pack("<I", 7) + p.read_bytes()[8:]),
     errors.RwkvFormatError, "version 7"),
    (lambda p: p.write_bytes(p.read_bytes()[:-5]), errors.TruncatedFileError, "runs past the end"),
    (lambda p: p.write_bytes(p.read_bytes()[:30]), errors.TruncatedFileError, "needs"),
    (lambda p: p.write_bytes(p.read_bytes()[:12]), errors.TruncatedFileError, "header needs 24 bytes"),
])
def test_damaged_files_are_refused(tmp_path: Path, arrays: dict, damage, error, needle: str) -> None:
    path = write(tmp_path / "m.bin", arrays)
    damage(path)
    with pytest.raises(error, match=needle) as info:
        sparsemap.open(path)
    assert str(path) in str(info.value)


def test_a_quantized_type_is_named(tmp_path: Path, arrays: dict) -> None:
    path = write(tmp_path / "m.bin", arrays, type_ids={"blocks.0.ln1.weight": 9})
    with pytest.raises(errors.UnknownDtypeError, match=r"rwkv\.cpp quantization Q8_0 is not read") as info:
        sparsemap.open(path)
    assert info.value.tensor == "blocks.0.ln1.weight"


def test_a_key_given_twice_is_refused(tmp_path: Path, arrays: dict) -> None:
    once = write(tmp_path / "once.bin", arrays)
    path = tmp_path / "twice.bin"
    path.write_bytes(once.read_bytes() + once.read_bytes()[24:])
    with pytest.raises(errors.DuplicateTensorError):
        sparsemap.open(path)


@pytest.mark.parametrize("left_out", ["head.weight", "emb.weight"])
def test_a_file_cut_between_tensors_is_refused(tmp_path: Path, arrays: dict, left_out: str) -> None:
    # The format counts no tensors: the header's sizes are what tell a whole model from a cut one.
    path = write(tmp_path / "m.bin", {k: v for k, v in arrays.items() if k != left_out})
    with pytest.raises(errors.TruncatedFileError, match=f"no '{left_out}'"):
        sparsemap.open(path)


def test_the_layer_count_must_match_the_header(tmp_path: Path, arrays: dict) -> None:
    path = write(tmp_path / "m.bin", arrays)
    raw = bytearray(path.read_bytes())
    raw[16:20] = struct.pack("<I", 3)  # n_layer
    path.write_bytes(bytes(raw))
    with pytest.raises(errors.RwkvFormatError, match="the header says 3 layers"):
        sparsemap.open(path)


@pytest.mark.parametrize(("dims", "needle"), [((0, 4), "must be positive"), ((1, 1, 1, 1, 1), "dimensions")])
def test_bad_dimensions_are_refused(tmp_path: Path, dims: tuple[int, ...], needle: str) -> None:
    key = b"w.x"
    raw = struct.pack("<6I", MAGIC, 101, 256, 8, 1, 0) + struct.pack("<3i", len(dims), len(key), 0)  # header
    raw += struct.pack(f"<{len(dims)}i", *dims) + key
    path = tmp_path / "m.bin"
    path.write_bytes(raw)
    with pytest.raises(errors.FormatError, match=needle):
        sparsemap.open(path)


def _tiny(name: str) -> Path:
    path = TINY / name
    if not path.is_file():
        pytest.skip(f"{TINY} holds no {name} (rwkv.cpp's tiny models exist only in the workspace)")
    return path


@pytest.mark.parametrize("version", ["7v0-834K", "5v2-730K"])
def test_the_tiny_models_reproduce_rwkv_cpps_logits(version: str) -> None:
    from sparsemap.models import rwkv

    model = rwkv.load(_tiny(f"tiny-rwkv-{version}-FP32.bin"))
    expected = torch.from_numpy(np.fromfile(_tiny(f"expected-logits-{version}.bin"), dtype=np.float32))
    state = None
    for byte in b'"in':  # rwkv.cpp's test feeds these one at a time from the initial state
        logits, state = model([byte], state)
    diff = logits - expected
    print(f"{version}: summed difference {float(diff.sum()):.3e}, largest {float(diff.abs().max()):.3e}")
    assert abs(float(diff.sum())) < 1e-3 and float(diff.abs().max()) < 1e-5
    whole, _ = model(list(b'"in'))  # sequence mode: the same
    assert torch.allclose(whole, logits, atol=1e-5)
