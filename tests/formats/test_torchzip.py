"""sparsemap.formats.torchzip: torch.save checkpoints round trip; hostile and broken ones are refused.

Round trips compare ``sparsemap.Checkpoint(...).tensor(name)`` bit for bit with
``torch.load(path, weights_only=True)``. Malformed checkpoints are built by
hand: a zip written with :mod:`zipfile` around a pickle we write ourselves.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import sparsemap
from sparsemap import errors
from sparsemap.errors import SparsemapError

from ..helpers import (
    FakeStorage,
    FakeTensor,
    FakeTensorV3,
    assert_bit_identical,
    pickle_checkpoint,
    raises,
    random_tensor,
)

# ---------------------------------------------------------------- helpers


def flatten(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of nested dicts under dotted names, as sparsemap names them."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else k))
    return out


def check_round_trip(path: Path) -> sparsemap.Checkpoint:
    want = flatten(torch.load(path, weights_only=True))
    ckpt = sparsemap.Checkpoint(path)
    assert ckpt.format == "torch-zip"
    assert set(ckpt) == set(want)
    for name, ref in want.items():
        assert_bit_identical(ckpt.tensor(name), ref)
    return ckpt


def rezip(src: Path, dst: Path, *, drop: str | None = None, replace: dict[str, bytes] | None = None,
          compression: int = zipfile.ZIP_STORED) -> Path:
    """Copy a zip checkpoint member by member, dropping or replacing some."""
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=compression) as zout:
        for info in zin.infolist():
            if drop is not None and info.filename.endswith(drop):
                continue
            data = zin.read(info)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new
            zout.writestr(info.filename, data, compress_type=compression)
    return dst


def write_checkpoint(path: Path, pkl: bytes, storages: dict[str, bytes] | None = None) -> Path:
    """A zip laid out like torch.save's: ``archive/data.pkl``, ``archive/data/<key>``."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return path


# ---------------------------------------------------------------- round trips

# Dtypes torch.save writes with a legacy typed storage (``torch.FloatStorage``...)
# and _rebuild_tensor_v2.
V2_DTYPES = ["float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
             "bool", "complex64", "complex128"]
# Dtypes torch.save writes with torch._utils._rebuild_tensor_v3 and
# torch.storage.UntypedStorage (no legacy storage class exists for them).
V3_DTYPES = ["float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64", "float8_e8m0fnu",
             "float8_e4m3fnuz", "float8_e5m2fnuz"]
# Regression: these were once refused as unsafe, the allowlist lacking
# _rebuild_tensor_v3 and UntypedStorage.


@pytest.mark.parametrize("torch_name", V2_DTYPES + V3_DTYPES)
def test_round_trip_every_dtype(tmp_path: Path, torch_name: str) -> None:
    if not hasattr(torch, torch_name):
        pytest.skip(f"torch {torch.__version__} has no {torch_name}")
    dtype = getattr(torch, torch_name)
    gen = torch.Generator().manual_seed(11)
    sd = {
        "scalar": random_tensor(dtype, (), gen),
        "empty": random_tensor(dtype, (0, 3), gen),
        "vec": random_tensor(dtype, (7,), gen),
        "mat": random_tensor(dtype, (65, 33), gen),
    }
    path = tmp_path / f"{torch_name}.pt"
    torch.save(sd, path)
    check_round_trip(path)


def test_round_trip_views_ties_and_parameters(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 8, generator=gen)
    shared = torch.randn(20, generator=gen)
    sd = {
        "x": x,
        "every_other_column": x[:, ::2],                    # non-contiguous view
        "transposed": x.t(),                                # (8, 6), strides (1, 8)
        "row_slice": x[2:4],                                # contiguous, storage offset 16
        "row_view": x[0][None],                             # (1, 8): any stride on the size-1 dim
        # An .expand()-ed tensor (stride 0) is refused: tests/hostile/test_torchzip_round2.py.
        "tied_a": shared,                                   # two names, one storage
        "tied_b": shared,
        "head": shared[:5],
        "tail": shared[5:],                                 # storage offset 5
        "param": torch.nn.Parameter(torch.randn(4, 4, generator=gen)),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "views.pt"
    torch.save(sd, path)
    ckpt = check_round_trip(path)

    assert ckpt.catalog["every_other_column"].strides == (8, 2)
    assert ckpt.catalog["transposed"].strides == (1, 8)
    assert ckpt.catalog["x"].strides is None and ckpt.catalog["row_slice"].strides is None
    assert ckpt.catalog["row_slice"].offset == ckpt.catalog["x"].offset + 16 * 4
    assert ckpt.catalog["tail"].offset == ckpt.catalog["head"].offset + 5 * 4
    # Ties are one range of bytes, counted once.
    assert ((ckpt.catalog["tied_a"].offset, ckpt.catalog["tied_a"].nbytes)
            == (ckpt.catalog["tied_b"].offset, ckpt.catalog["tied_b"].nbytes))
    assert ckpt.tensor("tied_a").data_ptr() == ckpt.tensor("tied_b").data_ptr()
    assert ckpt.tensor("tail").data_ptr() == ckpt.tensor("head").data_ptr() + 5 * 4
    assert ckpt.tensor("every_other_column").data_ptr() == ckpt.tensor("x").data_ptr()


def test_nested_checkpoint_flattens_to_dotted_names(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "epoch": 3, "lr": 0.1, "tags": ["a"]}, path)
    ckpt = check_round_trip(path)
    assert sorted(ckpt) == sorted(f"model.{k}" for k in model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt.tensor(f"model.{k}"), v)


def test_top_level_storage_alignment_is_zero_copy(tmp_path: Path) -> None:
    path = tmp_path / "a.pt"
    torch.save({"w": torch.randn(16, 16)}, path)
    ckpt = sparsemap.Checkpoint(path)
    assert ckpt.catalog["w"].zero_copy
    assert ckpt.owns(ckpt.tensor("w"))


def test_bert_pytorch_model_bin(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, vocab_size=99)
    model = transformers.BertModel(config)
    folder = tmp_path / "bert"
    model.save_pretrained(folder, safe_serialization=False)
    bin_path = folder / "pytorch_model.bin"
    if not bin_path.exists():
        # transformers >= 5 always writes safetensors; a .bin is what 4.x wrote:
        # torch.save of the state dict.
        for f in folder.glob("model*.safetensors*"):
            f.unlink()
        torch.save(model.state_dict(), bin_path)
    ckpt = check_round_trip(bin_path)
    from_folder = sparsemap.Checkpoint(folder)
    assert from_folder.source == str(bin_path)
    assert set(from_folder) == set(ckpt)
    for name, t in model.state_dict().items():
        assert_bit_identical(from_folder.tensor(name), t)


# ---------------------------------------------------------------- refusals: legacy and arbitrary pickles

@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth"])
def test_legacy_torch_pickle(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"old{suffix}"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    err = raises(errors.LegacyPickleError, path, "legacy", "torch.save(torch.load(", "weights_only=True")
    assert "safetensors" in str(err)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_plain_pickle_is_legacy(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=protocol))
    raises(errors.LegacyPickleError, path, "legacy")


@pytest.mark.parametrize("protocol", [0, 1])
def test_old_protocol_pickle_is_refused(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=protocol))
    with pytest.raises(SparsemapError) as info:
        sparsemap.open(path)
    assert isinstance(info.value, ValueError)


class _System:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.target}",))


class _Open:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.target), "w"))


class _Eval:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (eval, (f"open({str(self.target)!r}, 'w')",))


@pytest.mark.parametrize("payload", [_System, _Open, _Eval])
def test_malicious_pickle_is_never_run(tmp_path: Path, payload: type) -> None:
    # Control: the payload is live; unpickling it for real creates the file.
    control = tmp_path / "control"
    result = pickle.loads(pickle.dumps(payload(control), protocol=2))
    if hasattr(result, "close"):
        result.close()
    assert control.exists()

    target = tmp_path / "pwned"
    evil = {"w": FakeTensor(FakeStorage("0", 2), 0, (2,), (1,)), "x": payload(target)}
    path = write_checkpoint(tmp_path / "evil.pt", pickle_checkpoint(evil), {"0": b"\0" * 8})
    raises(errors.UnsafePickleError, path, "allowlist")
    assert not target.exists()


def test_malicious_pickle_inside_a_real_checkpoint(tmp_path: Path) -> None:
    real = tmp_path / "real.pt"
    torch.save({"w": torch.ones(3)}, real)
    target = tmp_path / "pwned"
    evil = rezip(real, tmp_path / "evil.pt",
                 replace={"/data.pkl": pickle.dumps({"w": _System(target)}, protocol=2)})
    raises(errors.UnsafePickleError, evil, "system")
    assert not target.exists()


# Regression: the unpickler once ran BUILD, which writes into the __dict__ of
# the shared allowlist objects, so one hostile file changed how every later
# file in the process was read (FloatStorage as F64).
def test_build_opcode_cannot_poison_later_files(tmp_path: Path) -> None:
    # GLOBAL torch.FloatStorage; {"dtype": "F64"}; BUILD; pop; then an empty dict.
    pkl = (b"\x80\x02" + b"ctorch\nFloatStorage\n" + b"}" + b"X\x05\x00\x00\x00dtype"
           + b"X\x03\x00\x00\x00F64" + b"s" + b"b" + b"0" + b"}" + b".")
    evil = write_checkpoint(tmp_path / "evil.pt", pkl)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(4.0)}, good)
    # In a fresh interpreter, so that the poisoning (if any) dies with it.
    code = ("import sparsemap\n"
            f"try:\n    sparsemap.open({str(evil)!r})\n    print('opened')\n"
            "except sparsemap.errors.FormatError as e:\n    print(type(e).__name__)\n"
            f"ckpt = sparsemap.Checkpoint({str(good)!r})\n"
            "print(ckpt.catalog['w'].dtype, ckpt.tensor('w').tolist())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    refusal, dtype, *values = out.stdout.split()
    assert refusal in ("UnsafePickleError", "CorruptCheckpointError")
    assert (dtype, " ".join(values)) == ("F32", "[0.0, 1.0, 2.0, 3.0]")


# Regression: BUILD on the record _rebuild_tensor returned once bypassed its
# validation; a non-int size then crashed _entry with a TypeError.
def test_build_opcode_cannot_rewrite_a_tensor_record(tmp_path: Path) -> None:
    ok = pickle_checkpoint({"w": FakeTensor(FakeStorage("0", 2), 0, (2,), (1,))})
    assert ok.endswith(b"s.")  # ... SETITEM STOP: the tensor record is on the stack before SETITEM
    # Insert {"shape": ("x",)} BUILD just before the SETITEM that stores the record.
    patched = ok[:-2] + b"}" + b"X\x05\x00\x00\x00shape" + b"X\x01\x00\x00\x00x\x85" + b"s" + b"b" + b"s."
    path = write_checkpoint(tmp_path / "evil.pt", patched, {"0": b"\0" * 8})
    with pytest.raises((errors.UnsafePickleError, errors.CorruptCheckpointError)) as info:
        sparsemap.open(path)
    assert str(path) in str(info.value)


def test_rebuild_from_a_non_storage(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "x.pt", pickle_checkpoint({"w": FakeTensor(3, 0, (2,), (1,))}))
    with pytest.raises(errors.UnsafePickleError, match="not a storage"):
        sparsemap.open(path)


# Regression: errors raised inside the rebuild functions once lacked the file name.
def test_rebuild_from_a_non_storage_names_the_file(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "x.pt", pickle_checkpoint({"w": FakeTensor(3, 0, (2,), (1,))}))
    raises(errors.UnsafePickleError, path, "not a storage")


# ---------------------------------------------------------------- refusals: broken structure

def test_hand_built_checkpoint_is_read_like_torch_reads_it(tmp_path: Path) -> None:
    # The builder the fault tests use produces a checkpoint both readers accept.
    data = torch.arange(6, dtype=torch.float32)
    sd = {"w": FakeTensor(FakeStorage("0", 6), 1, (2, 2), (2, 1))}
    path = write_checkpoint(tmp_path / "ok.pt", pickle_checkpoint(sd), {"0": data.numpy().tobytes()})
    ckpt = sparsemap.Checkpoint(path)
    assert ckpt.tensor("w").tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert torch.equal(ckpt.tensor("w"), torch.load(path, weights_only=True)["w"])


def test_hand_built_untyped_storage_checkpoint(tmp_path: Path) -> None:
    # An UntypedStorage counts bytes; the view counts elements of the v3 dtype.
    data = torch.arange(6, dtype=torch.int32).to(torch.uint16)
    storage = FakeStorage("0", 12, torch.storage.UntypedStorage)
    sd = {"w": FakeTensorV3(storage, 1, (2, 2), (1, 2), torch.uint16)}
    path = write_checkpoint(tmp_path / "v3.pt", pickle_checkpoint(sd), {"0": data.numpy().tobytes()})
    want = torch.load(path, weights_only=True)["w"]
    got = sparsemap.Checkpoint(path).tensor("w")
    assert_bit_identical(got, want)
    assert got.tolist() == [[1, 3], [2, 4]]


@pytest.mark.parametrize(("offset", "size", "stride", "last"), [(2, (4,), (1,), 5), (0, (2, 2), (1, 4), 5)])
def test_untyped_storage_view_outside_its_storage(tmp_path: Path, offset: int, size: tuple, stride: tuple,
                                                  last: int) -> None:
    storage = FakeStorage("0", 8, torch.storage.UntypedStorage)  # 8 bytes: 4 uint16 elements
    sd = {"w": FakeTensorV3(storage, offset, size, stride, torch.uint16)}
    path = write_checkpoint(tmp_path / "oob.pt", pickle_checkpoint(sd), {"0": b"\0" * 8})
    raises(errors.StorageBoundsError, path, "'w'", f"element {last}", "storage of 4")


def test_compressed_storage_member(tmp_path: Path) -> None:
    real = tmp_path / "real.pt"
    torch.save({"w": torch.zeros(64)}, real)
    path = rezip(real, tmp_path / "deflated.pt", compression=zipfile.ZIP_DEFLATED)
    # Every member is refused before data.pkl is read (a deflated pickle is a zip bomb), the first one
    # named; the storage-only case is in tests/hostile/test_torchzip_round2.py.
    raises(errors.CorruptCheckpointError, path, "compressed", "data.pkl")


def test_missing_storage_member(tmp_path: Path) -> None:
    real = tmp_path / "real.pt"
    torch.save({"w": torch.zeros(4)}, real)
    path = rezip(real, tmp_path / "missing.pt", drop="/data/0")
    raises(errors.CorruptCheckpointError, path, "'0'", "data/0", "'w'")


@pytest.mark.parametrize(("offset", "size", "stride", "last"), [
    (2, (4,), (1,), 5),           # runs off the end
    (0, (2, 3), (3, 2), 7),       # strides reach past the end
    (4, (1,), (1,), 4),           # starts at the end
    (0, (5,), (1,), 4),
])
def test_view_outside_its_storage(tmp_path: Path, offset: int, size: tuple, stride: tuple, last: int) -> None:
    sd = {"w": FakeTensor(FakeStorage("0", 4), offset, size, stride)}
    path = write_checkpoint(tmp_path / "oob.pt", pickle_checkpoint(sd), {"0": b"\0" * 16})
    raises(errors.StorageBoundsError, path, "'w'", f"element {last}", "storage of 4")


def test_storage_larger_than_its_member(tmp_path: Path) -> None:
    sd = {"w": FakeTensor(FakeStorage("0", 8), 0, (8,), (1,))}
    path = write_checkpoint(tmp_path / "short.pt", pickle_checkpoint(sd), {"0": b"\0" * 16})
    raises(errors.StorageBoundsError, path, "'w'", "8 elements", "32 bytes", "holds 16")


@pytest.mark.parametrize(("offset", "size", "stride"), [(-1, (2,), (1,)), (0, (-2,), (1,)), (0, (2,), (-1,))])
def test_negative_view_fields(tmp_path: Path, offset: int, size: tuple, stride: tuple) -> None:
    sd = {"w": FakeTensor(FakeStorage("0", 4), offset, size, stride)}
    path = write_checkpoint(tmp_path / "neg.pt", pickle_checkpoint(sd), {"0": b"\0" * 16})
    raises(errors.InvalidShapeError, path, "'w'")


@pytest.mark.parametrize(("offset", "size", "stride"), [
    (0, (2,), (1, 1)), (0, (2.0,), (1,)), ("0", (2,), (1,)), (0, "2", (1,)), (0, (True,), (1,)),
])
def test_malformed_view_fields(tmp_path: Path, offset: object, size: object, stride: object) -> None:
    sd = {"w": FakeTensor(FakeStorage("0", 4), offset, size, stride)}
    path = write_checkpoint(tmp_path / "bad.pt", pickle_checkpoint(sd), {"0": b"\0" * 16})
    raises(errors.InvalidShapeError, path, "malformed")


def test_malformed_storage_record(tmp_path: Path) -> None:
    sd = {"w": FakeTensor(FakeStorage("0", -1), 0, (1,), (1,))}
    path = write_checkpoint(tmp_path / "rec.pt", pickle_checkpoint(sd), {"0": b"\0" * 4})
    raises(errors.CorruptCheckpointError, path, "malformed storage record")


def test_zip_of_random_bytes(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(9)
    noise = bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=gen).tolist())
    path = tmp_path / "noise.pt"
    path.write_bytes(b"PK\x03\x04" + noise)
    with pytest.raises((errors.CorruptCheckpointError, errors.UnknownFormatError)) as info:
        sparsemap.open(path)
    assert isinstance(info.value, ValueError) and str(path) in str(info.value)


def test_random_bytes_are_an_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "noise.pt"
    path.write_bytes(bytes(range(7, 256)) * 4)
    raises(errors.UnknownFormatError, path, "07 08 09")


def test_zip_without_data_pkl(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "not a checkpoint")
    raises(errors.CorruptCheckpointError, path, "data.pkl", "found 0")


def test_data_pkl_that_is_not_a_pickle(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "x.pt", b"\x80\x02garbage that is not a pickle")
    raises(errors.CorruptCheckpointError, path, "not a valid pickle")


def test_big_endian_checkpoint(tmp_path: Path) -> None:
    real = tmp_path / "real.pt"
    torch.save({"w": torch.zeros(4)}, real)
    path = rezip(real, tmp_path / "be.pt", replace={"/byteorder": b"big"})
    raises(errors.CorruptCheckpointError, path, "big-endian")


def test_truncated_zip_checkpoint(tmp_path: Path) -> None:
    real = tmp_path / "real.pt"
    torch.save({"w": torch.zeros(256)}, real)
    path = tmp_path / "cut.pt"
    path.write_bytes(real.read_bytes()[:-200])
    with pytest.raises(SparsemapError) as info:
        sparsemap.open(path)
    assert isinstance(info.value, errors.FormatError)


# Regression: flattening once went through dict(), so {"a.b": t1, "a": {"b": t2}}
# silently kept one of the two tensors.
def test_flattened_name_collision_is_a_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "dup.pt"
    torch.save({"a.b": torch.zeros(2), "a": {"b": torch.ones(2)}}, path)
    raises(errors.DuplicateTensorError, path, "'a.b'")
