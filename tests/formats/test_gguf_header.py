"""sparsemap.formats.gguf's own header walk against ``gguf.GGUFReader``, which it replaced.

The catalog must be what the reader-based code made: the same entries in file order, and the
scalar metadata rendered as ``str()`` of the reader's Python value (strings decoded with U+FFFD
for bad bytes), arrays left out. The oracle below is that old code, kept here and nowhere else.
Also: the walk reads by ``os.pread`` and survives short reads, reads only the header, and never
calls the reader.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import sparsemap
from sparsemap import errors
from sparsemap.formats import gguf as gguf_format
from sparsemap.formats.catalog import TensorEntry

from ..conftest import ModuleFolders
from ..helpers import raises, write_gguf

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402 - only after importorskip found gguf
from gguf.quants import quantize  # noqa: E402 - only after importorskip found gguf


def reader_catalog(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """(entries, metadata) as sparsemap built them from ``gguf.GGUFReader`` before its own walk."""
    reader = gguf.GGUFReader(str(path))
    entries = {}
    for t in reader.tensors:
        qtype = t.tensor_type.name
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        plain = qtype in gguf_format.PLAIN_TYPES
        entries[t.name] = TensorEntry(t.name, str(path), int(t.data_offset), int(t.n_bytes),
                                      qtype if plain else "F32", shape, encoding=None if plain else qtype)
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or field.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        value: Any = field.parts[field.data[0]]
        if field.types[0] == gguf.GGUFValueType.STRING:
            metadata[key] = bytes(value).decode("utf-8", errors="replace")
        else:
            metadata[key] = str(value[0].item())
    return entries, metadata


def assert_same_as_reader(path: Path) -> None:
    catalog = sparsemap.open(path)
    entries, metadata = reader_catalog(path)
    assert list(catalog.items()) == list(entries.items())
    assert list(catalog.metadata.items()) == list(metadata.items())


@pytest.fixture(scope="module")
def every_type(module_folders: ModuleFolders) -> Path:
    """A file with a value of every metadata type, odd values included, alignment 64, mixed tensors."""
    path = module_folders.make("types") / "types.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 255)
    w.add_int8("t.i8", -128)
    w.add_uint16("t.u16", 65535)
    w.add_int16("t.i16", -5)
    w.add_uint32("t.u32", 2**32 - 1)
    w.add_int32("t.i32", -2**31)
    w.add_float32("t.f32", 1e-5)  # a float32 rendered as the double it is: 9.999999747378752e-06
    w.add_float32("t.nan", float("nan"))
    w.add_float32("t.inf", float("-inf"))
    w.add_bool("t.true", True)
    w.add_bool("t.false", False)
    w.add_uint64("t.u64", 2**64 - 1)
    w.add_int64("t.i64", -2**63)
    w.add_float64("t.f64", 0.1)
    w.add_string("t.text", "héllo ✓ 😀")
    w.add_key_value("t.empty", "", gguf.GGUFValueType.STRING)  # (add_string skips empty strings)
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.strings", ["a", "bb", ""])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_array("t.none", [])
    w.add_custom_alignment(64)
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((4, 64)).astype(np.float32)
    w.add_tensor("a", weights)
    w.add_tensor("q", quantize(weights, Q.Q8_0), raw_dtype=Q.Q8_0)
    w.add_tensor("b", np.arange(3, dtype=np.int16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------- same catalog as the reader made

def test_every_metadata_type_renders_as_the_reader_rendered_it(every_type: Path) -> None:
    assert_same_as_reader(every_type)
    meta = sparsemap.open(every_type).metadata
    assert meta["t.f32"] == "9.999999747378752e-06" and meta["t.true"] == "True" and meta["t.nan"] == "nan"
    assert meta["t.u64"] == str(2**64 - 1) and meta["t.text"] == "héllo ✓ 😀" and meta["t.empty"] == ""
    assert not {"t.ints", "t.strings", "t.nested", "t.none"} & set(meta)


def test_alignment_64_is_honoured(every_type: Path) -> None:
    catalog = sparsemap.open(every_type)
    assert catalog.metadata["general.alignment"] == "64"
    assert all(e.offset % 64 == 0 for e in catalog.values())


def test_string_value_with_bad_bytes_is_replaced_as_the_reader_did(every_type: Path, tmp_path: Path) -> None:
    data = bytearray(every_type.read_bytes())
    at = data.find("héllo".encode())
    data[at + 1] = 0xFF  # the first byte of "é" becomes an invalid start byte
    path = tmp_path / "bad-value.gguf"
    path.write_bytes(bytes(data))
    assert_same_as_reader(path)
    assert sparsemap.open(path).metadata["t.text"].startswith("h\ufffd")


def test_files_the_gguf_writer_writes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 256)).astype(np.float32)
    tensors = {"f32": (w, None), "f16": (w.astype(np.float16), None), "bf16": (quantize(w, Q.BF16), Q.BF16),
               "i8": (rng.integers(-128, 128, (3, 5)).astype(np.int8), None)}
    for q in ("Q4_0", "Q4_1", "Q8_0"):
        tensors[q] = (quantize(w, Q[q]), Q[q])
    for q in ("Q4_K", "Q6_K"):  # gguf cannot quantize these: random blocks, (rows, bytes per row)
        block, type_size = gguf.GGML_QUANT_SIZES[Q[q]]
        tensors[q] = (rng.integers(0, 256, (8, 256 // block * type_size), dtype=np.uint8), Q[q])
    assert_same_as_reader(write_gguf(tmp_path / "m.gguf", tensors, {"test.answer": 42, "test.note": "x"}))


@pytest.mark.model
def test_smollm2_catalog_is_the_readers(smollm2_gguf: Path) -> None:
    assert_same_as_reader(smollm2_gguf)
    assert len(sparsemap.open(smollm2_gguf).metadata) == 29


# ---------------------------------------------------------------- how the header is read

def test_the_reader_is_never_used(every_type: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("GGUFReader was called")

    monkeypatch.setattr(gguf, "GGUFReader", refuse)
    monkeypatch.setattr(gguf.gguf_reader, "GGUFReader", refuse)
    assert len(sparsemap.open(every_type)) == 3


def test_short_reads_of_three_bytes_give_the_same_catalog(every_type: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    want = sparsemap.open(every_type)
    real = os.pread
    calls = []

    def three_at_a_time(fd: int, n: int, offset: int) -> bytes:
        calls.append(n)
        return real(fd, min(n, 3), offset)

    monkeypatch.setattr(os, "pread", three_at_a_time)
    got = sparsemap.open(every_type)
    assert got == want and list(got.metadata.items()) == list(want.metadata.items())
    assert len(calls) > 100


def test_a_file_that_shrinks_while_read_is_truncated(every_type: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pread
    # Reads see a 100-byte file; fstat still says the size it had.
    monkeypatch.setattr(os, "pread", lambda fd, n, offset: real(fd, max(0, min(n, 100 - offset)), offset))
    err = raises(errors.TruncatedFileError, every_type, "shrank")
    assert err.path == str(every_type)


def test_only_the_header_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = np.zeros((1024, 1024), dtype=np.float32)  # 4 MiB of data after a small header
    path = write_gguf(tmp_path / "big.gguf", {"w": (big, None)}, {"test.note": "x"})
    real = os.pread
    read = []

    def counting(fd: int, n: int, offset: int) -> bytes:
        out = real(fd, n, offset)
        read.append(len(out))
        return out

    monkeypatch.setattr(os, "pread", counting)
    catalog = sparsemap.open(path)
    assert sum(read) <= catalog["w"].offset + gguf_format.WINDOW_NBYTES, read


def test_validate_returns_what_it_read(every_type: Path) -> None:
    with open(every_type, "rb") as f:
        header = gguf_format.validate(f, os.fstat(f.fileno()).st_size, str(every_type))
    assert (header.version, header.alignment) == (3, 64) and header.data_offset % 64 == 0
    assert [t.name for t in header.tensors] == ["a", "q", "b"]
    a, q, b = header.tensors
    assert (a.ggml_type, a.shape, a.offset, a.nbytes) == ("F32", (4, 64), 0, 1024)
    assert (q.ggml_type, q.shape, q.nbytes) == ("Q8_0", (4, 64), 4 * 2 * 34)
    assert b.shape == (3,) and b.nbytes == 6 and b.offset % 64 == 0
    assert header.metadata["general.architecture"] == "llama"


# ---------------------------------------------------------------- faults the reader used to find

def _header(kv: list[bytes], infos: list[bytes], data: bytes = bytes(64)) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(kv)) + b"".join(kv) + b"".join(infos)
    return head + bytes(-len(head) % 32) + data


def _s(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw


def _info(name: bytes, dims: list[int], ttype: int, offset: int = 0) -> bytes:
    return _s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ttype, offset)


def test_a_big_endian_file_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "be.gguf"
    w = gguf.GGUFWriter(str(path), "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_tensor("w", np.ones((2, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    raises(errors.GGUFError, path, "big-endian", f"version {3 << 24}", "version 3 byte-swapped")


def test_alignment_of_another_integer_type_is_refused(tmp_path: Path) -> None:
    # llama.cpp reads general.alignment as a uint32 (and the gguf package refused any other type).
    path = tmp_path / "align.gguf"
    path.write_bytes(_header([_s(b"general.alignment") + struct.pack("<IQ", 10, 32)], [_info(b"w", [8], 0)]))
    raises(errors.MetadataError, path, "general.alignment", "UINT64 32", "uint32")


def test_alignment_zero_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "align0.gguf"
    path.write_bytes(_header([_s(b"general.alignment") + struct.pack("<II", 4, 0)], [_info(b"w", [8], 0)]))
    raises(errors.MetadataError, path, "general.alignment", "UINT32 0")


def test_a_quantized_scalar_is_refused(tmp_path: Path) -> None:
    # 0 dims is one element, never a whole Q8_0 block; the reader made it a 0-byte tensor of shape ().
    path = tmp_path / "qscalar.gguf"
    path.write_bytes(_header([], [_info(b"q", [], Q.Q8_0)]))
    raises(errors.InvalidShapeError, path, "'q'", "0 dimensions", "Q8_0", "32")


def test_a_plain_scalar_opens_as_shape_empty(tmp_path: Path) -> None:
    path = tmp_path / "scalar.gguf"
    path.write_bytes(_header([], [_info(b"s", [], 0)], data=struct.pack("<f", 2.5) + bytes(28)))
    entry = sparsemap.open(path)["s"]
    assert (entry.shape, entry.nbytes, math.prod(entry.shape)) == ((), 4, 1)
    assert sparsemap.Checkpoint(path).tensor("s").item() == 2.5


def test_keys_named_like_the_readers_own_fields_stay_out_of_the_metadata(tmp_path: Path) -> None:
    # The reader kept GGUF.version and the counts under "GGUF."; catalogs never showed that prefix.
    path = tmp_path / "prefix.gguf"
    path.write_bytes(_header([_s(b"GGUF.note") + struct.pack("<I", 8) + _s(b"x"),
                              _s(b"general.name") + struct.pack("<I", 8) + _s(b"y")], [_info(b"w", [8], 0)]))
    assert dict(sparsemap.open(path).metadata) == {"general.name": "y"}


def test_a_tensor_name_longer_than_any_name(tmp_path: Path) -> None:
    path = tmp_path / "long.gguf"
    path.write_bytes(_header([], [_info(b"w" * 70_000, [8], 0)]))
    raises(errors.MetadataError, path, "name of tensor 0", "70000 bytes", "65535")
