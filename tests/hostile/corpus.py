"""A corpus of malformed checkpoints, generated (never committed as binaries).

Each :class:`Fault` writes one bad file (or folder) from a few literal bytes
and names the exact sparsemap error it must raise and what the message must
mention: the file, the tensor where there is one, and the numbers. Valid
small files of every format (:func:`valid_files`) are the seeds for the
truncation sweep and the fuzzers.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sparsemap import errors as E

from ..format_writers import random_state, tiny_llama, write_llama2c, write_meta_release, write_mlc
from ..helpers import FakeStorage, FakeTensor, pickle_checkpoint

# ---------------------------------------------------------------- safetensors bytes


def st(header: dict | bytes | str, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors file from a header (dict, JSON text or raw bytes) and a data section."""
    raw = (header if isinstance(header, bytes)
           else (header if isinstance(header, str) else json.dumps(header)).encode())
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def entry(dtype: str = "F32", shape: list = (2, 2), offsets: list = (0, 16)) -> dict:  # type: ignore[assignment]
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def two(a: list, b: list) -> dict:
    """Two F32 [2] tensors 'a' and 'b' at the given offsets."""
    return {"a": entry(shape=[2], offsets=a), "b": entry(shape=[2], offsets=b)}


def with_layout(views: dict | str, stored: dict | None = None, data: bytes = bytes(64)) -> bytes:
    """A converted-layout file: stored tensors plus the sparsemap.layout document."""
    stored = stored if stored is not None else {"w@rows": entry(shape=[4, 4], offsets=[0, 64])}
    doc = views if isinstance(views, str) else json.dumps({"version": 1, "align": 4096, "page": 4096,
                                                           "views": views})
    return st({**stored, "__metadata__": {"sparsemap.layout": doc}}, data)


def view(**kw: object) -> dict:
    v = {"stored": "w@rows", "kind": "rows", "offset": 0, "shape": [4, 4], "strides": [4, 1]}
    v.update(kw)
    return v


# ---------------------------------------------------------------- PyTorch zip


def torch_zip(pkl: bytes, storages: dict[str, bytes] | None = None, *, prefix: str = "archive",
              drop_pkl: bool = False) -> bytes:
    """A torch.save-style zip: {prefix}/data.pkl, {prefix}/data/<key>, {prefix}/version."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        if not drop_pkl:
            z.writestr(f"{prefix}/data.pkl", pkl)
        z.writestr(f"{prefix}/version", "3\n")
        for key, data in (storages or {}).items():
            z.writestr(f"{prefix}/data/{key}", data)
    return buf.getvalue()


def tensor_pickle(size: tuple = (2, 2), stride: tuple = (2, 1), offset: int = 0, numel: int = 4,
                  storage_type: object = None) -> bytes:
    """Pickle bytes of {'w': _rebuild_tensor_v2(storage '0', offset, size, stride)}, every field free."""
    return pickle_checkpoint({"w": FakeTensor(FakeStorage("0", numel, storage_type), offset, size, stride)})


def member_offset_outside(zipped: bytes) -> bytes:
    """The zip with its first central-directory entry's local-header offset pointing past the end."""
    at = zipped.index(b"PK\x01\x02")
    return zipped[:at + 42] + struct.pack("<I", 0x7FFF_FFF0) + zipped[at + 46:]


class _Reduce:
    """Pickles as a call of module.name(*args): what a hostile file carries."""

    def __init__(self, module: str, name: str, args: tuple) -> None:
        self.module, self.name, self.args = module, name, args

    def __reduce__(self):  # type: ignore[no-untyped-def]
        import importlib

        return getattr(importlib.import_module(self.module), self.name), self.args


# ---------------------------------------------------------------- GGUF bytes

GGUF_F32 = 0


def gguf_string(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def gguf(*, magic: bytes = b"GGUF", version: int = 3, kv: list[bytes] | None = None,
         tensors: list[tuple] | None = None, n_tensors: int | None = None, n_kv: int | None = None,
         data: bytes | None = None, alignment: int = 32) -> bytes:
    """A GGUF file from parts; ``tensors`` are (name, dims fastest-first, type, offset)."""
    kv = kv if kv is not None else [gguf_string("general.architecture") + struct.pack("<I", 8)
                                    + gguf_string("x")]
    tensors = tensors if tensors is not None else [("w", [4, 2], GGUF_F32, 0)]
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kv) if n_kv is None else n_kv)
    head += b"".join(kv)
    for name, dims, ttype, offset in tensors:
        head += (gguf_string(name) + struct.pack("<I", len(dims))
                 + b"".join(struct.pack("<Q", d) for d in dims))
        head += struct.pack("<IQ", ttype, offset)
    head += bytes(-len(head) % alignment)
    return head + (data if data is not None else bytes(32))


def kv_u32(key: str, value: int) -> bytes:
    return gguf_string(key) + struct.pack("<II", 4, value)


# ---------------------------------------------------------------- llama2.c and MLC/TVM

# A llama2.c model of a few KiB: dim 8, one layer, 2 heads, 1 kv head, hidden 12 (Q8_0 groups of 8: the down
# projection's rows of 12 straddle groups, the other matrices' rows of 8 do not).
LLAMA2C_CFG = {"hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 1, "num_attention_heads": 2,
               "num_key_value_heads": 1, "vocab_size": 32, "max_position_embeddings": 4}


def llama2c_file(path: Path, version: int, *, shared: bool = False) -> Path:
    return write_llama2c(path, (random_state(LLAMA2C_CFG, shared=shared), LLAMA2C_CFG), version, group_size=8)


def _llama2c(version: int, *patches: tuple[int, str, int], cut: int = 0, keep: int | None = None,
             extra: bytes = b"", shared: bool = False) -> Callable[[Path], Path]:
    """A tiny llama2.c file of ``version``, header fields overwritten (offset, struct format, value), ``cut``
    bytes dropped from its end (or only its first ``keep`` kept), ``extra`` appended."""
    def write(folder: Path) -> Path:
        path = llama2c_file(folder / "bad.bin", version, shared=shared)
        data = bytearray(path.read_bytes())
        for offset, fmt, value in patches:
            struct.pack_into(fmt, data, offset, value)
        data = data[:keep] if keep is not None else data[:len(data) - cut]
        path.write_bytes(bytes(data) + extra)
        return path

    return write


def _mlc(edit: Callable[[dict], object] | None = None, shard: bytes | None = None,
         raw: bytes | None = None) -> Callable[[Path], Path]:
    """A two-array MLC cache (``a`` then ``b``, 16 bytes each, one shard): its JSON changed by ``edit``
    or replaced by ``raw``, its shard replaced by ``shard``."""
    import numpy as np

    def write(folder: Path) -> Path:
        path = write_mlc(folder / "mlc", {"a": np.zeros(4, np.float32), "b": np.ones(4, np.float32)},
                         encode_format="raw")
        doc = json.loads(path.read_text())
        if edit is not None:
            edit(doc)
        path.write_bytes(raw if raw is not None else json.dumps(doc).encode())
        if shard is not None:
            (path.parent / "params_shard_0.bin").write_bytes(shard)
        return path

    return write


def _mlc_rec(**kw: object) -> Callable[[dict], object]:
    return lambda doc: doc["records"][0]["records"][1].update(kw)


# A tiny Llama (hidden 16, 1 layer, feed-forward 32: params.json's multiple_of 32 and ffn_dim_multiplier 0.5)
META_MODEL = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 32, "max_position_embeddings": 8}


def meta_release(folder: Path, n_files: int = 1, **params: object) -> Path:
    """Meta's release of a tiny Llama in ``n_files`` files, in ``folder/llama``."""
    return write_meta_release(folder / "llama", tiny_llama(**META_MODEL), n_files, **params)


def _meta(n_files: int = 1, *, params: dict | None = None, raw_params: bytes | None = None,
          edit: Callable[[Path], object] | None = None, **written: object) -> Callable[[Path], Path]:
    """A Meta release (``written``: params.json's values as written), then ``params`` merged into its
    params.json (or ``raw_params`` for it), then ``edit(folder)``."""
    def write(folder: Path) -> Path:
        path = meta_release(folder, n_files, **written)
        if params is not None:
            doc = json.loads((path / "params.json").read_text())
            doc.update(params)
            (path / "params.json").write_text(json.dumps(doc))
        if raw_params is not None:
            (path / "params.json").write_bytes(raw_params)
        if edit is not None:
            edit(path)
        return path

    return write


# ---------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Fault:
    """One malformed input: how to write it, the error it must raise, what the message must say."""

    name: str
    fmt: str
    write: Callable[[Path], Path]
    error: type[E.SparsemapError]
    needles: tuple[str, ...] = ()


def _file(suffix: str, content: bytes) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        path = folder / f"bad{suffix}"
        path.write_bytes(content)
        return path

    return write


def _sharded(index: object, shards: dict[str, bytes], *,
             raw_index: bytes | None = None) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        for name, content in shards.items():
            (folder / name).write_bytes(content)
        path = folder / "model.safetensors.index.json"
        path.write_bytes(raw_index if raw_index is not None else json.dumps(index).encode())
        return path

    return write


SHARD_A = st({"a": entry(shape=[2], offsets=[0, 8])}, bytes(8))
SHARD_B = st({"b": entry(shape=[2], offsets=[0, 8])}, bytes(8))
SHARD_AB = st({"a": entry(shape=[2], offsets=[0, 8]), "b": entry(shape=[2], offsets=[8, 16])}, bytes(16))


def _pt(content: bytes) -> Callable[[Path], Path]:
    return _file(".pt", content)


def _malicious(target: str) -> bytes:
    return pickle.dumps(_Reduce("os", "system", (f"touch {target}",)), protocol=2)


S, L, P, X, G = "safetensors", "layout", "pytorch zip", "shard index", "gguf"
C, M, ML = "llama2c", "mlc", "meta-llama"
F = ".safetensors"

FAULTS: list[Fault] = [
    # ---- safetensors: the header
    Fault("header shorter than 8 bytes", S, _file(F, b"\x05\x00\x00"), E.HeaderTooShortError, ("3 bytes",)),
    Fault("header length beyond the file", S, _file(F, st({}, length=500)), E.HeaderTooLargeError,
          ("500", "10 bytes")),
    Fault("header length beyond the cap", S, _file(F, st({}, length=100_000_001)), E.HeaderTooLargeError,
          ("100000001", "100000000")),
    Fault("header length overflows 64 bits", S, _file(F, st({}, length=2**64 - 1)), E.HeaderTooLargeError,
          (str(2**64 - 1),)),
    Fault("header not UTF-8", S, _file(F, st(b'{"a\xff": 1}')), E.HeaderEncodingError, ("byte 3",)),
    Fault("header not JSON", S, _file(F, st(b"{not json")), E.HeaderJSONError, ("not JSON",)),
    Fault("header JSON not an object", S, _file(F, st(b"[1, 2]")), E.HeaderJSONError, ("list",)),
    Fault("header nested too deep", S, _file(F, st(b"[" * 100_000)), E.HeaderJSONError, ("not JSON",)),
    Fault("entry not an object", S, _file(F, st({"w": [1, 2]})), E.HeaderJSONError, ("'w'", "[1, 2]")),
    Fault("entry missing data_offsets", S, _file(F, st({"w": {"dtype": "F32", "shape": [1]}})),
          E.HeaderJSONError, ("'w'", "data_offsets")),
    Fault("field twice in one entry", S,
          _file(F, st(b'{"w": {"dtype": "F32", "dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}',
                      bytes(8))),
          E.HeaderJSONError, ("'dtype'", "twice")),
    Fault("unknown dtype", S, _file(F, st({"w": entry(dtype="F12")}, bytes(16))), E.UnknownDtypeError,
          ("'w'", "'F12'")),
    Fault("negative dim", S, _file(F, st({"w": entry(shape=[-2, 2])}, bytes(16))), E.InvalidShapeError,
          ("'w'", "-2")),
    Fault("non-integer dim", S, _file(F, st({"w": entry(shape=[2.5, 2])}, bytes(16))), E.InvalidShapeError,
          ("'w'", "2.5")),
    Fault("boolean dim", S, _file(F, st({"w": entry(shape=[True, 4])}, bytes(16))), E.InvalidShapeError,
          ("'w'", "true")),
    Fault("huge dim", S, _file(F, st({"w": entry(shape=[2**70])}, bytes(16))), E.SizeOverflowError,
          ("'w'", str(2**70))),
    Fault("numel overflow", S, _file(F, st({"w": entry(shape=[2**32, 2**32])}, bytes(16))),
          E.SizeOverflowError, ("'w'", "2**63")),
    Fault("nbytes mismatch", S, _file(F, st({"w": entry(shape=[3, 4], offsets=[0, 40])}, bytes(40))),
          E.ByteLengthMismatchError, ("'w'", "40", "48")),
    Fault("offsets reversed", S, _file(F, st({"w": entry(offsets=[16, 0])}, bytes(16))),
          E.InvalidOffsetsError, ("'w'", "[16, 0]")),
    Fault("negative offset", S, _file(F, st({"w": entry(offsets=[-16, 0])}, bytes(16))),
          E.InvalidOffsetsError, ("'w'", "-16")),
    Fault("offsets overlap", S, _file(F, st(two([0, 8], [4, 12]), bytes(12))), E.TensorOverlapError,
          ("'b'", "'a'", "4", "8")),
    Fault("offsets aliased", S, _file(F, st(two([0, 8], [0, 8]), bytes(8))), E.TensorOverlapError,
          ("'b'", "'a'", "0")),
    Fault("gap between tensors", S, _file(F, st(two([0, 8], [12, 20]), bytes(20))), E.TensorGapError,
          ("'b'", "4 bytes", "8")),
    Fault("tensor past the end", S, _file(F, st({"w": entry()}, bytes(10))), E.TruncatedFileError,
          ("'w'", "16", "10")),
    Fault("trailing bytes", S, _file(F, st({"w": entry()}, bytes(20))), E.TrailingBytesError,
          ("4 bytes", "16")),
    Fault("duplicate tensor names", S,
          _file(F, st(b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                      b'"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}', bytes(16))),
          E.DuplicateTensorError, ("'w'", "twice")),
    Fault("__metadata__ not a string map", S, _file(F, st({"__metadata__": {"n": 1}})), E.MetadataError,
          ("__metadata__", '{"n": 1}')),
    # ---- converted layout metadata
    Fault("layout not JSON", L, _file(F, with_layout("{oops")), E.LayoutError,
          ("sparsemap.layout", "not JSON")),
    Fault("layout of an unknown version", L,
          _file(F, with_layout(json.dumps({"version": 9, "views": {}}))), E.LayoutError, ("version 1", "9")),
    Fault("layout view malformed", L, _file(F, with_layout({"w": view(shape=[4, -4])})), E.LayoutError,
          ("'w'", "-4")),
    Fault("layout view outside its stored tensor", L, _file(F, with_layout({"w": view(shape=[5, 4])})),
          E.LayoutError, ("'w'", "element 19", "16")),
    Fault("layout view of a missing tensor", L, _file(F, with_layout({"w": view(stored="nope")})),
          E.LayoutError, ("'w'", "'nope'")),
    Fault("layout rows overlap (impossible row stride)", L,
          _file(F, with_layout({"w": view(shape=[4, 4], strides=[2, 1])})), E.LayoutError,
          ("'w'", "[2, 1]", "overlap")),
    Fault("layout order not a permutation", L, _file(F, with_layout({"w": view(order=[0, 0, 1, 2])})),
          E.LayoutError, ("'w'", "permutation")),
    Fault("layout order of the wrong length", L, _file(F, with_layout({"w": view(order=[1, 0])})),
          E.LayoutError, ("'w'", "2 entries", "[4, 4]")),
    Fault("layout view name collides", L,
          _file(F, with_layout({"x": view()}, stored={"w@rows": entry(shape=[4, 4], offsets=[0, 64]),
                                                      "x": entry(shape=[1], offsets=[64, 68])},
                               data=bytes(68))), E.LayoutError, ("'x'", "collides")),
    # ---- PyTorch zip
    Fault("pickle calls a global outside the allowlist", P,
          _pt(torch_zip(_malicious("/tmp/sparsemap-pwned"))), E.UnsafePickleError, ("os", "system")),
    Fault("legacy (non-zip) torch pickle", P, _pt(pickle.dumps({"w": 1}, protocol=2)), E.LegacyPickleError,
          ("legacy",)),
    Fault("zip without data.pkl", P, _pt(torch_zip(b"", drop_pkl=True)), E.CorruptCheckpointError,
          ("data.pkl",)),
    Fault("zip whose pickle is garbage", P, _pt(torch_zip(b"\x80\x02garbage")), E.CorruptCheckpointError,
          ("data.pkl", "not a valid pickle")),
    Fault("storage member missing", P, _pt(torch_zip(tensor_pickle())), E.CorruptCheckpointError, ("'0'",)),
    Fault("storage smaller than it claims", P, _pt(torch_zip(tensor_pickle(), {"0": bytes(8)})),
          E.StorageBoundsError, ("'0'", "4", "8")),
    Fault("tensor view past its storage", P,
          _pt(torch_zip(tensor_pickle(size=(4, 4), stride=(4, 1)), {"0": bytes(16)})),
          E.StorageBoundsError, ("'w'", "element 15", "4 F32")),
    Fault("negative stride", P, _pt(torch_zip(tensor_pickle(stride=(-2, 1)), {"0": bytes(16)})),
          E.InvalidShapeError, ("'w'", "-2")),
    Fault("unknown storage type", P,
          _pt(torch_zip(tensor_pickle(storage_type=collections.Counter), {"0": bytes(16)})),
          E.UnsafePickleError, ("Counter",)),
    Fault("zip member offset outside the file (found by atheris)", P,
          _pt(member_offset_outside(torch_zip(tensor_pickle(), {"0": bytes(16)}))), E.CorruptCheckpointError,
          ("data.pkl", "cannot be read")),
    Fault("truncated zip", P, _pt(torch_zip(tensor_pickle(), {"0": bytes(16)})[:-30]),
          E.CorruptCheckpointError, ("zip",)),
    # ---- sharded index
    Fault("index names a missing shard", X,
          _sharded({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}},
                   {"s1.safetensors": SHARD_A}),
          E.MissingShardError, ("'s2.safetensors'",)),
    Fault("tensor in two shards", X,
          _sharded({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}},
                   {"s1.safetensors": SHARD_A, "s2.safetensors": SHARD_AB}),
          E.DuplicateTensorError, ("'a'", "2 shards")),
    Fault("index not JSON", X, _sharded(None, {}, raw_index=b"{weight_map"), E.ShardIndexError, ("JSON",)),
    Fault("index weight_map not a map", X, _sharded({"weight_map": ["a"]}, {}), E.ShardIndexError,
          ("weight_map",)),
    Fault("shard path escapes the folder", X, _sharded({"weight_map": {"a": "../s1.safetensors"}}, {}),
          E.ShardIndexError, ("'../s1.safetensors'",)),
    Fault("tensor in the index but in no shard", X,
          _sharded({"weight_map": {"a": "s1.safetensors", "c": "s1.safetensors"}},
                   {"s1.safetensors": SHARD_A}),
          E.ShardIndexError, ("1 tensors", "'c'")),
    # ---- GGUF
    Fault("GGUF bad magic", G, _file(".gguf", gguf(magic=b"GGUX")), E.UnknownFormatError, ("47 47 55 58",)),
    Fault("GGUF unsupported version", G, _file(".gguf", gguf(version=7)), E.GGUFError, ("version 7",)),
    Fault("GGUF big-endian file", G, _file(".gguf", gguf(version=3 << 24)), E.GGUFError, ("big-endian",)),
    Fault("GGUF tensor count beyond the file", G, _file(".gguf", gguf(n_tensors=2**60)), E.TruncatedFileError,
          (str(2**60),)),
    Fault("GGUF metadata count beyond the file", G, _file(".gguf", gguf(n_kv=2**40)), E.TruncatedFileError,
          (str(2**40),)),
    Fault("GGUF string length beyond the file", G,
          _file(".gguf", gguf(kv=[gguf_string("k") + struct.pack("<IQ", 8, 2**50) + b"value"])),
          E.TruncatedFileError, (str(2**50),)),
    Fault("GGUF key not UTF-8", G,
          _file(".gguf", gguf(kv=[gguf_string(b"k\xff") + struct.pack("<II", 4, 1)])),
          E.HeaderEncodingError, ("UTF-8",)),
    Fault("GGUF unknown value type", G, _file(".gguf", gguf(kv=[gguf_string("k") + struct.pack("<I", 99)])),
          E.MetadataError, ("'k'", "99")),
    Fault("GGUF array of an unknown type", G,
          _file(".gguf", gguf(kv=[gguf_string("k") + struct.pack("<IIQ", 9, 77, 1)])),
          E.MetadataError, ("'k'", "77")),
    Fault("GGUF alignment not a power of two", G, _file(".gguf", gguf(kv=[kv_u32("general.alignment", 24)])),
          E.MetadataError, ("24",)),
    Fault("GGUF unknown tensor type", G, _file(".gguf", gguf(tensors=[("w", [4, 2], 99, 0)])),
          E.UnknownDtypeError, ("'w'", "99")),
    Fault("GGUF too many dimensions", G, _file(".gguf", gguf(tensors=[("w", [1] * 9, GGUF_F32, 0)])),
          E.InvalidShapeError, ("'w'", "9 dimensions")),
    Fault("GGUF huge dims", G, _file(".gguf", gguf(tensors=[("w", [2**40, 2**40], GGUF_F32, 0)])),
          E.SizeOverflowError, ("'w'",)),
    Fault("GGUF misaligned offset", G,
          _file(".gguf", gguf(tensors=[("w", [4, 2], GGUF_F32, 4)], data=bytes(64))),
          E.InvalidOffsetsError, ("'w'", "4", "32")),
    Fault("GGUF data past the end", G, _file(".gguf", gguf(tensors=[("w", [4, 2], GGUF_F32, 64)])),
          E.TruncatedFileError, ("'w'",)),
    Fault("GGUF tensors overlap", G,
          _file(".gguf", gguf(tensors=[("a", [16], GGUF_F32, 0), ("b", [16], GGUF_F32, 32)],
                              data=bytes(128))),
          E.TensorOverlapError, ("'b'", "'a'", "32")),
    Fault("GGUF duplicate tensor names", G,
          _file(".gguf", gguf(tensors=[("w", [4], GGUF_F32, 0), ("w", [4], GGUF_F32, 32)], data=bytes(64))),
          E.DuplicateTensorError, ("'w'",)),
    Fault("GGUF dim beyond 2**63 in an empty tensor", G,
          _file(".gguf", gguf(tensors=[("w", [2**63, 0], 2, 0)])), E.SizeOverflowError, ("'w'", str(2**63))),
    Fault("GGUF duplicate metadata key", G, _file(".gguf", gguf(kv=[kv_u32("k", 1), kv_u32("k", 2)])),
          E.MetadataError, ("'k'", "twice")),
    Fault("GGUF key longer than any name", G,
          _file(".gguf", gguf(kv=[gguf_string("k" * 70_000) + struct.pack("<II", 4, 1)])), E.MetadataError,
          ("70000 bytes", "65535")),
    Fault("GGUF millions of strings", G,
          _file(".gguf", gguf(kv=[gguf_string("tokens") + struct.pack("<IIQ", 9, 8, 2_500_000)
                                  + bytes(8 * 2_500_000)])), E.MetadataError, ("'tokens'", "2500000")),
    Fault("GGUF row not a whole number of blocks", G,
          _file(".gguf", gguf(tensors=[("w", [20, 2], 2, 0)], data=bytes(64))), E.InvalidShapeError,
          ("'w'", "20", "32")),
    # ---- llama2.c (v0: no magic, seven int32; v1, v2: "ak42", version, seven int32, flag[, group size])
    Fault("llama2c unknown version", C, _llama2c(1, (4, "<i", 3)), E.Llama2cFormatError, ("version 3",)),
    Fault("llama2c dim not a multiple of n_heads", C, _llama2c(1, (20, "<i", 3)), E.Llama2cFormatError,
          ("dim 8", "n_heads 3")),
    Fault("llama2c negative vocabulary in a versioned file", C, _llama2c(2, (28, "<i", -32)),
          E.Llama2cFormatError, ("vocab_size is -32",)),
    Fault("llama2c shared flag neither 0 nor 1", C, _llama2c(1, (36, "<B", 9)), E.Llama2cFormatError,
          ("flag", "9")),
    Fault("llama2c group size zero", C, _llama2c(2, (37, "<i", 0)), E.Llama2cFormatError,
          ("group size is 0",)),
    Fault("llama2c group size dividing no matrix", C, _llama2c(2, (37, "<i", 5)), E.Llama2cFormatError,
          ("groups of 5", "model.embed_tokens.weight")),
    Fault("llama2c header cut short", C, _llama2c(2, keep=100), E.TruncatedFileError, ("256 bytes", "100")),
    Fault("llama2c file shorter than its header says", C, _llama2c(1, cut=4), E.TruncatedFileError,
          ("needs", "the file has")),
    Fault("llama2c trailing bytes", C, _llama2c(2, extra=bytes(4)), E.TrailingBytesError,
          ("4 bytes after the last tensor",)),
    Fault("llama2c vocabulary far beyond the file", C, _llama2c(1, (28, "<i", 2**31 - 1)),
          E.TruncatedFileError, ("vocabulary 2147483647", "needs")),
    Fault("llama2c tensor beyond 2**63 bytes", C, _llama2c(1, (8, "<i", 2**31 - 4), (28, "<i", 2**31 - 1)),
          E.SizeOverflowError, ("2**63", "model.embed_tokens.weight")),
    Fault("llama2c legacy file cut short", C, _llama2c(0, cut=1), E.TruncatedFileError, ("no magic",)),
    Fault("llama2c legacy size of the other classifier reading", C, _llama2c(0, cut=32 * 8 * 4),
          E.Llama2cFormatError, ("disagree", "not shared")),
    Fault("llama2c legacy trailing bytes", C, _llama2c(0, shared=True, extra=bytes(8)), E.TrailingBytesError,
          ("8 bytes", "run.c ignores")),
    # ---- MLC / TVM parameter caches (ndarray-cache.json + params_shard_N.bin)
    Fault("mlc cache not JSON", M, _mlc(raw=b'{"records": ['), E.MlcFormatError, ("not UTF-8 JSON",)),
    Fault("mlc records not a list", M, _mlc(lambda d: d.update(records={"a": 1})), E.MlcFormatError,
          ("records",)),
    Fault("mlc dataPath escapes the folder", M, _mlc(lambda d: d["records"][0].update(dataPath="../x.bin")),
          E.MlcFormatError, ("'../x.bin'", "not a file name")),
    Fault("mlc shard missing", M, _mlc(lambda d: d["records"][0].update(dataPath="params_shard_9.bin")),
          E.MissingShardError, ("'params_shard_9.bin'",)),
    Fault("mlc shard shorter than the cache says", M, _mlc(shard=bytes(30)), E.TruncatedFileError,
          ("30 bytes", "says 32")),
    Fault("mlc unknown dtype", M, _mlc(_mlc_rec(dtype="float4")), E.UnknownDtypeError, ("'b'", "'float4'")),
    Fault("mlc nbytes disagrees with the shape", M, _mlc(_mlc_rec(nbytes=12)), E.ByteLengthMismatchError,
          ("'b'", "12", "16")),
    Fault("mlc records overlap", M, _mlc(_mlc_rec(byteOffset=8)), E.TensorOverlapError, ("'b'", "'a'", "8")),
    Fault("mlc record past its shard", M, _mlc(_mlc_rec(byteOffset=20)), E.InvalidOffsetsError,
          ("'b'", "[20, 36)", "32 bytes")),
    Fault("mlc array listed twice", M, _mlc(_mlc_rec(name="a")), E.DuplicateTensorError, ("'a'", "twice")),
    # ---- Meta's Llama release (params.json + consolidated.NN.pth)
    Fault("meta params.json not JSON", ML, _meta(raw_params=b'{"dim": '), E.MetaLlamaFormatError,
          ("params.json", "is not JSON")),
    Fault("meta dim not an integer", ML, _meta(params={"dim": "16"}), E.MetaLlamaFormatError,
          ("dim is '16'",)),
    Fault("meta kv heads that do not divide the heads", ML, _meta(params={"n_kv_heads": 3}),
          E.MetaLlamaFormatError, ("n_heads 4 is not a multiple of n_kv_heads 3",)),
    Fault("meta quantized release", ML, _meta(params={"quantization_args": {"group_size": 32}}),
          E.MetaLlamaFormatError, ("a quantized release",)),
    Fault("meta file missing from the numbering", ML,
          _meta(2, edit=lambda p: (p / "consolidated.01.pth").rename(p / "consolidated.02.pth")),
          E.MetaLlamaFormatError, ("not consolidated.01.pth",)),
    Fault("meta feed-forward width params.json does not give", ML, _meta(ffn_dim_multiplier=None),
          E.MetaLlamaFormatError, ("consolidated.00.pth", "has shape (32, 16)", "makes it (64, 16)")),
    Fault("meta vocabulary disagrees with the embedding", ML, _meta(vocab_size=40), E.MetaLlamaFormatError,
          ("holds 32 rows", "vocab_size 40")),
    Fault("meta file not a zip", ML,
          _meta(edit=lambda p: (p / "consolidated.00.pth").write_bytes(b"garbage" * 10)),
          E.CorruptCheckpointError, ("consolidated.00.pth", "not a zip archive")),
    Fault("meta several files opened as one model", ML, _meta(2), E.ShardedReleaseError,
          ("2 model-parallel files", "sparsemap convert")),
]


# ---------------------------------------------------------------- valid seeds


def valid_files(folder: Path) -> dict[str, Path]:
    """Small valid files of every format, written by the real writers (the sweep's and fuzzers' seeds)."""
    import gguf as gguf_pkg
    import numpy as np
    import torch
    from safetensors.torch import save_file

    import sparsemap

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    state = {"embed.weight": torch.randn(8, 16, generator=gen), "norm.weight": torch.randn(16, generator=gen),
             "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
             "half": torch.randn(4, 4).to(torch.bfloat16)}
    out = {"safetensors": folder / "model.safetensors", "pytorch zip": folder / "model.pt",
           "layout": folder / "laid-out.safetensors", "gguf": folder / "model.gguf"}
    save_file(state, out["safetensors"])
    torch.save(state, out["pytorch zip"])
    sparsemap.save(state, out["layout"], layout=sparsemap.Layout(align=64, pad_rows="embed.*",
                                                                 transpose="half"))
    writer = gguf_pkg.GGUFWriter(out["gguf"], "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight",
                      np.random.default_rng(0).standard_normal((8, 16), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(16, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    # Larger files, so the sweep also cuts beyond its first 4 KiB (at random offsets there).
    big = {"embed.weight": torch.randn(256, 64, generator=gen), "norm.weight": torch.randn(64, generator=gen)}
    out["safetensors 64K"] = folder / "big.safetensors"
    save_file(big, out["safetensors 64K"])
    out["pytorch zip 64K"] = folder / "big.pt"
    torch.save(big, out["pytorch zip 64K"])
    out["gguf Q8_0"] = folder / "q8.gguf"
    writer = gguf_pkg.GGUFWriter(out["gguf Q8_0"], "llama")
    q8 = gguf_pkg.GGMLQuantizationType.Q8_0
    weights = np.random.default_rng(1).standard_normal((64, 256), dtype=np.float32)
    writer.add_tensor("token_embd.weight", gguf_pkg.quants.quantize(weights, q8), raw_dtype=q8)
    writer.add_tensor("output_norm.weight", np.ones(256, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    shards = folder / "sharded"
    shards.mkdir(exist_ok=True)
    save_file({"embed.weight": state["embed.weight"]}, shards / "model-00001-of-00002.safetensors")
    save_file({"norm.weight": state["norm.weight"]}, shards / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"embed.weight": "model-00001-of-00002.safetensors",
                                            "norm.weight": "model-00002-of-00002.safetensors"}}
    out["shard index"] = shards / "model.safetensors.index.json"
    out["shard index"].write_text(json.dumps(index))
    for version in (0, 1, 2):
        out[f"llama2c v{version}"] = llama2c_file(folder / f"llama2c-v{version}.bin", version)
    out["mlc"] = write_mlc(folder / "mlc", {"embed.weight": state["embed.weight"].numpy(),
                                            "norm.weight": state["norm.weight"].numpy(),
                                            "ids": state["ids"].numpy()}, shard_cap_nbytes=300)
    out["rwkv.cpp"] = write_rwkv_cpp(folder / "rwkv.bin", {
        "emb.weight": np.random.default_rng(2).standard_normal((16, 8), dtype=np.float32),
        "blocks.0.ln1.weight": np.ones(8, dtype=np.float32),
        "blocks.0.ffn.key.weight": np.random.default_rng(3).standard_normal((32, 8)).astype(np.float16),
        "head.weight": np.random.default_rng(4).standard_normal((16, 8), dtype=np.float32)})
    return out


def write_rwkv_cpp(path: Path, tensors: dict) -> Path:
    """An rwkv.cpp model file (no library writes the format: its converter is a script), by its spec:
    six uint32 of header, then each tensor's dimension count, key length and type, its dimensions
    innermost first, its key, its data."""
    import numpy as np

    vocab, width = tensors["emb.weight"].shape
    layers = 1 + max(int(n.split(".")[1]) for n in tensors if n.startswith("blocks."))
    out = bytearray(struct.pack("<6I", 0x67676D66, 101, vocab, width, layers, 0))
    for name, array in tensors.items():
        key = name.encode()
        out += struct.pack("<3i", array.ndim, len(key), 1 if array.dtype == np.float16 else 0)
        out += struct.pack(f"<{array.ndim}i", *reversed(array.shape)) + key + array.tobytes()
    path.write_bytes(bytes(out))
    return path
