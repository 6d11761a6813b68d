"""Hostile torch zip checkpoints, round two (issue 14): readers that disagree, amplification, names.

Every file here is a few literal bytes or a hand-built pickle. Each refusal is
a sparsemap error naming the file, the tensor where there is one, and the
numbers; nothing foreign (RecursionError, MemoryError, zipfile errors) escapes.
The amplification cases run under a deadline: before the fix some of them ran
for hours (2**40 dotted names) or until the machine ran out of memory.
"""

from __future__ import annotations

import io
import pickle
import signal
import struct
import time
import tracemalloc
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import sparsemap
from sparsemap import errors
from sparsemap.errors import SparsemapError

from ..helpers import FakeStorage, FakeTensor, pickle_checkpoint, raises
from .corpus import tensor_pickle, torch_zip

# ---------------------------------------------------------------- helpers

PROTO2 = b"\x80\x02"


def uni(text: str) -> bytes:
    """BINUNICODE: a str, UTF-8 with surrogates passed through (as pickle writes them)."""
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


REBUILD = b"ctorch._utils\n_rebuild_tensor_v2\n"
ODICT = b"ccollections\nOrderedDict\n"
# persistent id ('storage', torch.FloatStorage, '0', 'cpu', 4): a float storage of 4 elements.
STORAGE_F32_4 = (b"(" + uni("storage") + b"ctorch\nFloatStorage\n" + uni("0") + uni("cpu") + b"K\x04tQ")


def write(tmp_path: Path, content: bytes, name: str = "bad.pt") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def pt(tmp_path: Path, pkl: bytes, storages: dict[str, bytes] | None = None) -> Path:
    return write(tmp_path, torch_zip(pkl, storages))


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail (TimeoutError) instead of running for hours: before the fix some cases never ended."""
    def fire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def refused(cls: type[SparsemapError], path: Path, *needles: object, seconds: float = 20) -> SparsemapError:
    """``raises`` under a deadline; the class must match exactly."""
    with deadline(seconds):
        return raises(cls, path, *needles)


def one_tensor_zip(pkl: bytes, nbytes: int = 16) -> bytes:
    return torch_zip(pkl, {"0": bytes(nbytes)})


def patched(zipped: bytes, old: bytes, new: bytes, *, count: int = -1) -> bytes:
    assert len(old) == len(new) and zipped.count(old) >= 1
    return zipped.replace(old, new, count)


# ---------------------------------------------------------------- 1. readers that disagree


def _zip_with_duplicate(member: str) -> bytes:
    """A checkpoint holding ``archive/<member>`` twice: Python's zipfile reads the last, torch the first."""
    first = {"data.pkl": tensor_pickle(), "data/0": bytes(16), "version": b"3\n"}
    second = {"data.pkl": tensor_pickle(size=(4,), stride=(1,)), "data/0": b"\x01" * 16, "version": b"9\n"}
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        warnings.simplefilter("ignore")  # zipfile warns "Duplicate name", then writes it anyway
        for name, data in first.items():
            z.writestr(f"archive/{name}", data)
        z.writestr(f"archive/{member}", second[member])
    return buf.getvalue()


@pytest.mark.parametrize("member", ["data.pkl", "data/0", "version"])
def test_duplicate_member_names_are_refused(tmp_path: Path, member: str) -> None:
    path = write(tmp_path, _zip_with_duplicate(member))
    refused(errors.CorruptCheckpointError, path, f"'archive/{member}'", "twice")


def test_member_name_with_a_nul_byte_is_refused(tmp_path: Path) -> None:
    # zipfile cuts a name at its first NUL ("archive/version\0" reads as "archive/version"); torch's
    # reader keeps the whole name. Two readers, two names.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", tensor_pickle())
        z.writestr("archive/data/0", bytes(16))
        z.writestr("archive/versionZ", "3\n")
    path = write(tmp_path, patched(buf.getvalue(), b"archive/versionZ", b"archive/version\0"))
    refused(errors.CorruptCheckpointError, path, "NUL", "archive/version")


def _two_records_one_key(second: FakeStorage, size: tuple) -> bytes:
    return pickle_checkpoint({"a": FakeTensor(FakeStorage("0", 4), 0, (4,), (1,)),
                              "b": FakeTensor(second, 0, size, (1,))})


def test_storage_key_with_two_dtypes_is_refused(tmp_path: Path) -> None:
    # torch.load refuses it too ("Trying to resize storage that is not resizable").
    pkl = _two_records_one_key(FakeStorage("0", 8, torch.HalfStorage), (8,))
    path = pt(tmp_path, pkl, {"0": bytes(16)})
    refused(errors.CorruptCheckpointError, path, "'0'", "F32", "F16")


def test_storage_key_with_two_element_counts_is_refused(tmp_path: Path) -> None:
    # torch.load keeps the first count and silently serves the second tensor from it.
    pkl = _two_records_one_key(FakeStorage("0", 2), (2,))
    path = pt(tmp_path, pkl, {"0": bytes(16)})
    refused(errors.CorruptCheckpointError, path, "'0'", "4 F32", "2 F32")


def _deflated(members: dict[str, bytes], compressed: set[str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED if name in compressed
                       else zipfile.ZIP_STORED)
    return buf.getvalue()


@pytest.mark.parametrize("member", ["archive/data.pkl", "archive/version", "archive/data/0"])
def test_compressed_member_is_refused(tmp_path: Path, member: str) -> None:
    members = {"archive/data.pkl": tensor_pickle(), "archive/version": b"3\n", "archive/data/0": bytes(16)}
    path = write(tmp_path, _deflated(members, {member}))
    refused(errors.CorruptCheckpointError, path, repr(member), "compressed")


def test_deflated_data_pkl_is_refused_before_inflating(tmp_path: Path) -> None:
    # A zip bomb: 64 MiB of pickle (a valid one, then zeros after STOP) deflate to 64 KiB.
    bomb = tensor_pickle() + bytes(64 << 20)
    path = write(tmp_path, _deflated({"archive/data.pkl": bomb, "archive/data/0": bytes(16)},
                                     {"archive/data.pkl"}))
    assert path.stat().st_size < 200_000
    tracemalloc.start()
    try:
        refused(errors.CorruptCheckpointError, path, "'archive/data.pkl'", "compressed")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak


def test_stored_member_whose_sizes_disagree_is_refused(tmp_path: Path) -> None:
    # Central directory entry of archive/data/0: compressed size 16 -> 12, uncompressed size kept at 16.
    content = bytearray(one_tensor_zip(tensor_pickle()))
    at = content.index(b"PK\x01\x02")
    while True:
        name_len = struct.unpack_from("<H", content, at + 28)[0]
        if content[at + 46:at + 46 + name_len] == b"archive/data/0":
            break
        at = content.index(b"PK\x01\x02", at + 4)
    assert struct.unpack_from("<II", content, at + 20) == (16, 16)
    struct.pack_into("<I", content, at + 20, 12)
    path = write(tmp_path, bytes(content))
    refused(errors.CorruptCheckpointError, path, "'archive/data/0'", "12", "16")


def test_local_header_naming_another_member_is_refused(tmp_path: Path) -> None:
    # The central directory says archive/data/0, the local header before the bytes says archive/data/9:
    # a reader that walks local headers (a streaming unzip) sees another file.
    content = bytearray(one_tensor_zip(tensor_pickle()))
    local = content.index(b"PK\x03\x04")
    while content[local + 30:local + 44] != b"archive/data/0":
        local = content.index(b"PK\x03\x04", local + 4)
    content[local + 43] = ord("9")
    path = write(tmp_path, bytes(content))
    refused(errors.CorruptCheckpointError, path, "archive/data/0", "archive/data/9")


def test_torch_save_writes_every_member_stored_and_still_opens(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 8, generator=gen)
    sd = {"x": x, "transposed": x.t(), "rows": x[2:5], "columns": x[:, 1:7:2], "narrow": x.narrow(1, 2, 3),
          "position_ids": torch.arange(8).expand(1, -1),  # stride 0, but on a dimension of size 1
          "empty": torch.zeros(0, 4), "scalar": torch.tensor(1.5)}
    path = tmp_path / "real.pt"
    torch.save(sd, path)
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            assert info.compress_type == zipfile.ZIP_STORED, info.filename
            assert info.compress_size == info.file_size, info.filename
    ckpt = sparsemap.Checkpoint(sparsemap.open(path))
    want = torch.load(path, weights_only=True)
    assert set(ckpt) == set(want)
    for name, ref in want.items():
        got = ckpt.tensor(name)
        assert got.shape == ref.shape and torch.equal(got, ref), name
    assert ckpt.catalog["transposed"].strides == (1, 8)
    assert ckpt.catalog["columns"].strides == (8, 2)


# ---------------------------------------------------------------- 2. amplification

# (a) containers that share substructure


def test_dicts_sharing_substructure_40_levels_deep(tmp_path: Path) -> None:
    # d0 = {"a": d1, "b": d1}, d1 = {"a": d2, "b": d2}, ...: a few hundred bytes, 2**40 dotted names.
    level: object = FakeTensor(FakeStorage("0", 4), 0, (4,), (1,))
    for _ in range(40):
        level = {"a": level, "b": level}
    pkl = pickle_checkpoint(level)
    assert len(pkl) < 1000
    path = pt(tmp_path, pkl, {"0": bytes(16)})
    refused(errors.AmplificationError, path, f"{len(pkl)} bytes", "dicts shared under many keys", seconds=10)


def test_wide_shared_dicts_multiply_names(tmp_path: Path) -> None:
    # 400 names for one tensor, under 400 names for that dict: 160,000 tensors from 12 KB of pickle.
    t = FakeTensor(FakeStorage("0", 4), 0, (4,), (1,))
    inner = {f"w{i}": t for i in range(400)}
    pkl = pickle_checkpoint({f"m{i}": inner for i in range(400)})
    assert len(pkl) < 15_000
    path = pt(tmp_path, pkl, {"0": bytes(16)})
    refused(errors.AmplificationError, path, f"{len(pkl)} bytes", seconds=10)


def test_shared_dicts_within_the_budget_still_open(tmp_path: Path) -> None:
    # A training checkpoint that saves one state dict under two names (model and EMA) is legitimate.
    sd = {f"layer{i}.weight": torch.full((3,), float(i)) for i in range(50)}
    path = tmp_path / "ema.pt"
    torch.save({"model": sd, "ema": sd}, path)
    ckpt = sparsemap.Checkpoint(sparsemap.open(path))
    assert len(ckpt) == 100
    assert torch.equal(ckpt.tensor("ema.layer7.weight"), torch.full((3,), 7.0))


# (b) memo indexes and lengths past the data


@pytest.mark.parametrize(("put", "index"), [
    (b"r" + struct.pack("<I", 2**31), 2**31),   # LONG_BINPUT: the C unpickler sizes its memo to 2**32 slots
    (b"p1000000000000\n", 10**12),              # PUT (protocol 0 text)
    (b"q\xff", 255),                            # BINPUT: harmless in size, but no pickler skips indexes
])
def test_memo_index_past_the_memo_is_refused(tmp_path: Path, put: bytes, index: int) -> None:
    pkl = PROTO2 + b"}" + put + b"."
    path = pt(tmp_path, pkl)
    refused(errors.AmplificationError, path, "memo", str(index), seconds=10)


def test_memo_get_of_an_index_never_stored(tmp_path: Path) -> None:
    path = pt(tmp_path, PROTO2 + b"}q\x00j" + struct.pack("<I", 2**31 - 1) + b".")
    refused(errors.CorruptCheckpointError, path, "memo", str(2**31 - 1))


def test_frame_longer_than_the_data_is_refused(tmp_path: Path) -> None:
    pkl = b"\x80\x04\x95" + struct.pack("<Q", 2**60) + b"}."
    path = pt(tmp_path, pkl)
    refused(errors.AmplificationError, path, "FRAME", str(2**60))


@pytest.mark.parametrize(("op", "fmt", "length"), [
    (b"\x8e", "<Q", 2**40),   # BINBYTES8: the C unpickler allocates the length before reading
    (b"\x8d", "<Q", 2**40),   # BINUNICODE8
    (b"X", "<I", 2**31),      # BINUNICODE
    (b"B", "<I", 2**31),      # BINBYTES
])
def test_length_past_the_data_is_refused(tmp_path: Path, op: bytes, fmt: str, length: int) -> None:
    pkl = b"\x80\x04" + op + struct.pack(fmt, length) + b"abc."
    path = pt(tmp_path, pkl)
    refused(errors.AmplificationError, path, str(length), "4 remain")


# (c) nesting


def test_dict_that_contains_itself(tmp_path: Path) -> None:
    # d = {"a": d}: EMPTY_DICT, BINPUT 0, "a", BINGET 0, SETITEM.
    pkl = PROTO2 + b"}q\x00" + uni("a") + b"h\x00s."
    path = pt(tmp_path, pkl)
    refused(errors.NestingError, path, "contains itself", "'a'")


def test_ordered_dict_that_contains_itself_under_a_tensor(tmp_path: Path) -> None:
    d: OrderedDict = OrderedDict(w=FakeTensor(FakeStorage("0", 4), 0, (4,), (1,)))
    d["self"] = d
    path = pt(tmp_path, pickle_checkpoint({"m": d}), {"0": bytes(16)})
    refused(errors.NestingError, path, "contains itself", "'m.self'")


def _nested_dicts(depth: int) -> bytes:
    # {"a": {"a": ... {"a": None}}}: push dict, key, dict, key, ..., None, then one SETITEM per level.
    return PROTO2 + uni("a") + b"q\x000" + (b"}h\x00" * depth) + b"N" + b"s" * depth + b"."


def test_dicts_nested_100000_deep(tmp_path: Path) -> None:
    path = pt(tmp_path, _nested_dicts(100_000))
    refused(errors.NestingError, path, "64", "a.a.a.a")


def test_lists_nested_100000_deep_as_a_size(tmp_path: Path) -> None:
    # A tensor whose size is [[[[...]]]]: its error message used to repr it (RecursionError).
    deep = b"]" * 100_000 + b"a" * 99_999
    pkl = (PROTO2 + b"}" + uni("w") + REBUILD + b"(" + STORAGE_F32_4 + b"K\x00" + deep + b"(K\x01K\x01t"
           + b"tRs.")
    path = pt(tmp_path, pkl, {"0": bytes(16)})
    err = refused(errors.InvalidShapeError, path, "malformed", "[[[")
    assert "Recursion" not in str(err) and len(str(err)) < 500


def test_lists_nested_100000_deep_as_a_value_are_ignored(tmp_path: Path) -> None:
    # Not a tensor and not a dict: nothing walks it. It opens, with the one real tensor.
    deep = b"]" * 100_000 + b"a" * 99_999
    pkl = tensor_pickle()
    assert pkl.endswith(b"s.")
    pkl = pkl[:-1] + uni("junk") + deep + b"s."
    path = pt(tmp_path, pkl, {"0": bytes(16)})
    with deadline(20):
        assert list(sparsemap.open(path)) == ["w"]


# hash flooding: dict keys whose hash the file chooses make every insert walk one chain


def test_int_keys_wider_than_64_bits_are_refused(tmp_path: Path) -> None:
    # k * (2**61 - 1) all hash to 0 in CPython: 20,000 such keys take minutes to insert.
    keys = [k * (2**61 - 1) for k in range(1, 2001)]
    pkl = pickle.dumps({"w": None, "opt": dict.fromkeys(keys)}, protocol=2)
    path = pt(tmp_path, pkl)
    refused(errors.AmplificationError, path, "key", "64 bits")


@pytest.mark.parametrize("key", [(1, 2), 1.5, (1, (2, 3))])
def test_keys_whose_hash_the_file_chooses_are_refused(tmp_path: Path, key: object) -> None:
    pkl = pickle.dumps({"state": {key: 1}}, protocol=4)
    path = pt(tmp_path, pkl)
    refused(errors.AmplificationError, path, "key", type(key).__name__)


@pytest.mark.parametrize("value", [set(), {1, 2}, frozenset({"a"})])
def test_sets_are_refused_at_every_protocol(tmp_path: Path, value: object) -> None:
    # Protocol 2 (torch.save's) writes a set as a call of builtins.set, which the allowlist refuses; protocol
    # 4 has opcodes for sets (EMPTY_SET: 216 bytes of memory per byte of pickle), refused the same way.
    for protocol in (2, 4):
        path = pt(tmp_path, pickle.dumps({"w": None, "seen": value}, protocol=protocol))
        refused(errors.UnsafePickleError, path, "set")


def test_int_str_and_none_keys_still_open(tmp_path: Path) -> None:
    # Optimizer state dicts key parameters by int.
    path = tmp_path / "opt.pt"
    torch.save({"model": {"w": torch.ones(2)}, "optim": {"state": {0: {"step": 3}, -1: None},
                                                          "param_groups": [{"lr": 0.1, "params": [0]}]},
                None: True, 7: "seven"}, path)
    assert list(sparsemap.open(path)) == ["model.w"]


# calls whose cost the pickle multiplies


def test_rebuild_called_with_a_shared_huge_argument_tuple(tmp_path: Path) -> None:
    # One args tuple of 100,000 items, built once, passed to 50 REDUCEs through the memo.
    args = b"(" + STORAGE_F32_4 + b"K\x00(K\x04t(K\x01t" + b"N" * 100_000 + b"tq\x01"
    body = b"".join(uni(f"w{i}") + b"h\x00h\x01R" for i in range(50))
    pkl = PROTO2 + REBUILD + b"q\x00" + args + b"0" + b"}(" + body + b"u."
    path = pt(tmp_path, pkl, {"0": bytes(16)})
    refused(errors.AmplificationError, path, "REDUCE", "100004 arguments")


def test_build_with_a_shared_huge_state(tmp_path: Path) -> None:
    # 500 OrderedDicts each given the same 2,000-item state: 10**6 attributes from 30 KB.
    state = b"}q\x01(" + b"".join(uni(f"k{i}") + b"N" for i in range(2000)) + b"u"
    body = b"".join(uni(f"m{i}") + b"h\x00)Rh\x01b" for i in range(500))
    pkl = PROTO2 + ODICT + b"q\x00" + state + b"0" + b"}(" + body + b"u."
    path = pt(tmp_path, pkl)
    refused(errors.AmplificationError, path, "BUILD", "2000")


def test_ordered_dict_called_with_arguments(tmp_path: Path) -> None:
    # torch.save calls OrderedDict() with no arguments and adds the items after (SETITEMS).
    pkl = PROTO2 + ODICT + b"]" + uni("w") + b"N" + b"\x86" + b"a" + b"\x85R."  # OrderedDict([("w", None)])
    path = pt(tmp_path, pkl)
    refused(errors.UnsafePickleError, path, "OrderedDict", "argument")


# (e) views that materialize more than the file holds


@pytest.mark.parametrize(("size", "stride", "numel", "materialized"), [
    ((10**9,), (0,), 1, 4 * 10**9),
    ((10**5, 10**5), (1, 1), 2 * 10**5 - 1, 4 * 10**10),
    ((3, 4), (1, 2), 12, 48),  # a stride inside the span of the smaller one: rows overlap
])
def test_view_that_repeats_elements_is_refused(tmp_path: Path, size: tuple, stride: tuple, numel: int,
                                               materialized: int) -> None:
    pkl = tensor_pickle(size=size, stride=stride, numel=numel)
    path = pt(tmp_path, pkl, {"0": bytes(4 * numel)})
    refused(errors.AmplificationError, path, "'w'", str(list(stride)), f"{materialized} bytes")


def test_expand_saved_by_torch_is_refused(tmp_path: Path) -> None:
    # torch.save keeps an expanded tensor's stride 0: 4 elements read from 1 stored. Refused (a reader
    # that copies it materializes more than the file holds); save t.contiguous() instead.
    path = tmp_path / "expand.pt"
    torch.save({"w": torch.zeros(1).expand(4)}, path)
    refused(errors.AmplificationError, path, "'w'", "[0]", "contiguous")


@pytest.mark.parametrize("size", [
    (0, 2**62),          # torch 2.13 builds it (its strides fit int64), but 2**64 bytes once filled
    (0, 2**63),          # torch: "Overflow when unpacking long long" (TypeError)
    (0, 2**40, 2**40),   # torch: "Stride calculation overflowed" (RuntimeError)
])
def test_empty_view_of_a_huge_shape(tmp_path: Path, size: tuple) -> None:
    pkl = tensor_pickle(size=size, stride=(1,) * len(size), numel=1)
    path = pt(tmp_path, pkl, {"0": bytes(4)})
    with deadline(10), pytest.raises(errors.SizeOverflowError) as info:
        sparsemap.Checkpoint(sparsemap.open(path)).tensor("w")
    assert str(path) in str(info.value) and "'w'" in str(info.value)
    refused(errors.SizeOverflowError, path, "'w'", str(list(size)), "2**63")


def test_empty_views_of_ordinary_shapes_open(tmp_path: Path) -> None:
    pkl = tensor_pickle(size=(0, 4096, 2**20), stride=(2**32, 2**20, 1), numel=1)
    path = pt(tmp_path, pkl, {"0": bytes(4)})
    assert sparsemap.Checkpoint(sparsemap.open(path)).tensor("w").shape == (0, 4096, 2**20)


@pytest.mark.parametrize(("size", "stride", "offset", "needle"), [
    ((1, 2, 2), (2**70, 1, 2), 0, str(2**70)),     # torch: "Overflow when unpacking long long"
    ((-(10**5000), 1), (1, 1), 0, "16610-bit"),     # a 5001-digit number: its repr raised ValueError
    ((2,), (1,), 2**64, str(2**64)),
])
def test_view_numbers_outside_int64(tmp_path: Path, size: tuple, stride: tuple, offset: int,
                                    needle: str) -> None:
    pkl = tensor_pickle(size=size, stride=stride, offset=offset)
    path = pt(tmp_path, pkl, {"0": bytes(16)})
    refused(errors.InvalidShapeError, path, "'w'", needle)


def test_view_with_more_dimensions_than_the_cap(tmp_path: Path) -> None:
    pkl = tensor_pickle(size=(1,) * 65, stride=(1,) * 65, numel=1)
    path = pt(tmp_path, pkl, {"0": bytes(4)})
    refused(errors.InvalidShapeError, path, "65 dimensions", "64")


# ---------------------------------------------------------------- 3. names


@pytest.mark.parametrize(("sd", "shown"), [
    ({"w\udc80": "T"}, "w\\udc80"),
    ({"model\ud800": {"w": "T"}}, "model\\ud800"),
])
def test_name_with_a_lone_surrogate_is_refused(tmp_path: Path, sd: dict, shown: str) -> None:
    t = FakeTensor(FakeStorage("0", 4), 0, (4,), (1,))

    def fill(d: dict) -> dict:
        return {k: fill(v) if isinstance(v, dict) else t for k, v in d.items()}

    path = pt(tmp_path, pickle_checkpoint(fill(sd)), {"0": bytes(16)})
    err = refused(errors.InvalidNameError, path, "surrogate", shown)
    str(err).encode("utf-8")  # the message itself prints anywhere


def test_surrogate_in_a_key_that_names_no_tensor_is_ignored(tmp_path: Path) -> None:
    sd = {"w": FakeTensor(FakeStorage("0", 4), 0, (4,), (1,)), "note\udc80": 3}
    path = pt(tmp_path, pickle_checkpoint(sd), {"0": bytes(16)})
    assert list(sparsemap.open(path)) == ["w"]


# ---------------------------------------------------------------- the bound, end to end


def test_open_time_grows_linearly_with_a_large_hostile_pickle(tmp_path: Path) -> None:
    # 200,000 tensors tied to one storage, each under its own name (about 3 MB of pickle): opens,
    # and in time proportional to its size.
    t = FakeTensor(FakeStorage("0", 4), 0, (4,), (1,))
    small = pickle_checkpoint({f"w{i}": t for i in range(20_000)})
    large = pickle_checkpoint({f"w{i}": t for i in range(200_000)})
    times = []
    for name, pkl in (("small.pt", small), ("large.pt", large)):
        path = write(tmp_path, one_tensor_zip(pkl), name)
        start = time.perf_counter()
        with deadline(60):
            assert len(sparsemap.open(path)) in (20_000, 200_000)
        times.append(time.perf_counter() - start)
    assert times[1] < 25 * times[0] + 1.0, times


_FLOOD = 200_000


@pytest.mark.parametrize(("body", "what"), [
    (b"(" + b"}" * _FLOOD + b"l", "EMPTY_DICT"),       # the worst measured: 90 bytes per byte
    (b"(" + b"]" * _FLOOD + b"l", "EMPTY_LIST"),
    (b"(" + b"}\x94" * (_FLOOD // 2) + b"l", "EMPTY_DICT MEMOIZE"),
    (b"(" + b"N\x85" * (_FLOOD // 2) + b"l", "TUPLE1"),
    (b"N" + b"(" * _FLOOD + b"1" * _FLOOD, "MARK"),
])
def test_memory_stays_within_the_stated_bound(tmp_path: Path, body: bytes, what: str) -> None:
    # The module docstring's bound: at most 64 KiB + 90 bytes of memory per byte of data.pkl (100 here).
    pkl = b"\x80\x04}" + uni("junk") + body + b"s."
    path = pt(tmp_path, pkl)
    tracemalloc.start()
    try:
        with deadline(20):
            assert len(sparsemap.open(path)) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (64 << 10) + 100 * len(pkl), (what, peak, len(pkl))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_torch_save_at_every_pickle_protocol_opens(tmp_path: Path, protocol: int) -> None:
    # The pre-scan follows every opcode torch.save (Python's pickler) writes.
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    path = tmp_path / f"p{protocol}.pt"
    torch.save({"model": model.state_dict(), "optim": {"state": {0: {"step": torch.tensor(3.0)}},
                                                      "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
                "epoch": 3, "p": torch.nn.Parameter(torch.ones(2))}, path, pickle_protocol=protocol)
    ckpt = sparsemap.Checkpoint(sparsemap.open(path))
    assert sorted(ckpt) == sorted([f"model.{k}" for k in model.state_dict()] + ["p"])
    assert torch.equal(ckpt.tensor("model.0.weight"), model.state_dict()["0.weight"])


def test_storage_members_that_overlap_in_the_file_are_refused(tmp_path: Path) -> None:
    """Member 0's data holds member 1 (its local header and bytes): torch reads two storages, a mapping
    would serve one set of bytes under two tensors. The central directory is patched to point there."""
    import struct as _struct
    import zipfile as _zipfile

    from ..helpers import FakeStorage, FakeTensor, pickle_checkpoint
    from .corpus import torch_zip

    inner_name = b"archive/data/1"
    payload = bytes(range(16))
    local = _struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 0, 0, 0, _zipfile.crc32(payload), 16, 16,
                         len(inner_name), 0) + inner_name
    pkl = pickle_checkpoint({"a": FakeTensor(FakeStorage("0", 4), 0, (4,), (1,)),
                             "b": FakeTensor(FakeStorage("1", 4), 0, (4,), (1,))})
    content = bytearray(torch_zip(pkl, {"0": local + payload, "1": payload}))
    z = _zipfile.ZipFile(io.BytesIO(bytes(content)))
    data0 = z.getinfo("archive/data/0")
    inside = data0.header_offset + 30 + len(data0.filename) + len(data0.extra)  # where member 0's data starts
    record = next(i for i in range(len(content)) if content.startswith(b"PK\x01\x02", i)
                  and content[i + 46:i + 46 + len(inner_name)] == inner_name)
    content[record + 42:record + 46] = _struct.pack("<I", inside)
    path = tmp_path / "overlap.pt"
    path.write_bytes(bytes(content))
    with pytest.raises(errors.CorruptCheckpointError, match=r"share the bytes .* members overlap") as info:
        sparsemap.open(path)
    assert str(path) in str(info.value)
