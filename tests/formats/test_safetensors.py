"""sparsemap.formats.safetensors: round trips against the reference writer, and one test per rule.

Round trips write with ``safetensors.torch.save_file`` and compare, bit for bit,
what ``sparsemap.Checkpoint(...).tensor(name)`` serves with ``load_file``. Each
validation rule has a test built from a few literal bytes that asserts the
exact error class and that its message names the file, the tensor and the
numbers involved.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import sparsemap
from sparsemap import errors
from sparsemap.errors import SparsemapError
from sparsemap.formats.safetensors import MAX_HEADER_NBYTES

from ..helpers import assert_bit_identical, raises, random_tensor

# ---------------------------------------------------------------- helpers

# (safetensors name, torch dtype name); dtypes the installed safetensors or
# torch lack are skipped at run time, not failed.
DTYPES = [
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
    ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"),
    ("BOOL", "bool"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("C64", "complex64"),
    ("F8_E8M0", "float8_e8m0fnu"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
]


def st_file(tmp_path: Path, header: dict | bytes | str, data: bytes = b"", *,
            name: str = "x.safetensors") -> Path:
    """Write ``<u64 little-endian len(header)> header data`` and return the path."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    if isinstance(header, str):
        header = header.encode("utf-8")
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def torch_dtype_or_skip(st_name: str, torch_name: str) -> torch.dtype:
    if not hasattr(torch, torch_name):
        pytest.skip(f"torch {torch.__version__} has no {torch_name}")
    dtype = getattr(torch, torch_name)
    try:
        save_file({"probe": torch.zeros(1, dtype=dtype)}, str(Path(tempfile.gettempdir()) / "_probe_unused"))
    except Exception as e:  # the installed safetensors cannot write it
        pytest.skip(f"safetensors cannot write {st_name}: {e}")
    return dtype


def shown(value: object) -> str:
    """How messages quote a bad header value: JSON, or repr for a string."""
    return repr(value) if isinstance(value, str) else json.dumps(value)


def header_of(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8: 8 + n])


def check_round_trip(path: Path) -> sparsemap.Checkpoint:
    """Open ``path`` with sparsemap and compare every tensor and offset with the reference reader."""
    want = load_file(str(path))
    ckpt = sparsemap.Checkpoint(path)
    assert ckpt.format == "safetensors"
    assert set(ckpt) == set(want)
    header_nbytes, header = header_of(path)
    header.pop("__metadata__", None)
    for name, ref in want.items():
        e = ckpt.catalog[name]
        begin, end = header[name]["data_offsets"]
        assert e.offset == 8 + header_nbytes + begin
        assert e.nbytes == end - begin
        assert e.shape == tuple(header[name]["shape"])
        assert e.dtype == header[name]["dtype"]
        assert e.file == str(path)
        assert_bit_identical(ckpt.tensor(name), ref)
    return ckpt


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize(("st_name", "torch_name"), DTYPES, ids=[d for d, _ in DTYPES])
def test_round_trip_every_dtype(tmp_path: Path, st_name: str, torch_name: str) -> None:
    dtype = torch_dtype_or_skip(st_name, torch_name)
    gen = torch.Generator().manual_seed(1234)
    tensors = {
        "scalar": random_tensor(dtype, (), gen),            # 0-d
        "empty": random_tensor(dtype, (0, 3), gen),         # a zero dim
        "empty_last": random_tensor(dtype, (4, 0), gen),
        "vec": random_tensor(dtype, (7,), gen),              # odd length: later tensors unaligned by 8
        "mat": random_tensor(dtype, (257, 129), gen),       # large-ish
        "cube": random_tensor(dtype, (2, 3, 5), gen),
    }
    path = tmp_path / f"{st_name}.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "dtype": st_name})
    ckpt = check_round_trip(path)
    assert ckpt.catalog.metadata == {"format": "pt", "dtype": st_name}
    assert ckpt.catalog["scalar"].shape == ()
    assert ckpt.tensor("empty").shape == (0, 3)


def test_round_trip_mixed_dtypes_in_one_file(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(7)
    tensors = {}
    for st_name, torch_name in DTYPES:
        if hasattr(torch, torch_name):
            tensors[f"t_{st_name}"] = random_tensor(getattr(torch, torch_name), (3, 5), gen)
    path = tmp_path / "mixed.safetensors"
    try:
        save_file(tensors, str(path))
    except Exception:  # an old safetensors without some dtype: drop the exotic ones
        tensors = {k: v for k, v in tensors.items() if not k.startswith(("t_F8", "t_U1", "t_U3", "t_U6"))}
        save_file(tensors, str(path))
    check_round_trip(path)


def test_round_trip_4_mib_tensor(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    tensors = {"big": torch.randn(1024, 1024, generator=gen), "bias": torch.randn(1024, generator=gen)}
    path = tmp_path / "big.safetensors"
    save_file(tensors, str(path))
    check_round_trip(path)


def test_empty_file_with_empty_header_is_an_empty_catalog(tmp_path: Path) -> None:
    path = st_file(tmp_path, b"{}")
    ckpt = sparsemap.Checkpoint(path)
    assert len(ckpt) == 0 and ckpt.catalog.metadata == {}


def test_header_padding_with_spaces_is_accepted(tmp_path: Path) -> None:
    # The format pads the header with spaces so the data section is 8-aligned.
    header = json.dumps({"w": entry("F32", [2], 0, 8)}).encode() + b"   "
    path = st_file(tmp_path, header, struct.pack("<2f", 1.5, -2.0))
    assert sparsemap.Checkpoint(path).tensor("w").tolist() == [1.5, -2.0]


def test_empty_tensors_may_share_an_offset(tmp_path: Path) -> None:
    # Zero-byte tensors claim no bytes, so two at one offset do not overlap.
    header = {"a": entry("F32", [0], 0, 0), "b": entry("F32", [0, 2], 0, 0), "c": entry("U8", [1], 0, 1)}
    ckpt = sparsemap.Checkpoint(st_file(tmp_path, header, b"\x07"))
    assert ckpt.tensor("a").shape == (0,) and ckpt.tensor("b").shape == (0, 2)
    assert ckpt.tensor("c").tolist() == [7]


# Regression: resolve._open_file once sniffed pickle magic before safetensors,
# so a valid file whose header length begins 80 02..80 05 was refused as a
# legacy pickle.
@pytest.mark.parametrize("header_nbytes", [0x280, 0x380, 0x480, 0x580])
def test_header_length_that_looks_like_pickle_magic(tmp_path: Path, header_nbytes: int) -> None:
    # A valid file from the reference writer: a header of exactly 640 bytes
    # starts the file with 80 02 00 00..., which is also PROTO 2 of a pickle.
    path = tmp_path / "h.safetensors"
    for n in range(header_nbytes - 100, header_nbytes):
        save_file({"a" * n: torch.arange(4, dtype=torch.float32)}, str(path))
        if header_of(path)[0] == header_nbytes:
            break
    assert header_of(path)[0] == header_nbytes
    check_round_trip(path)


_NAMES = st.text(alphabet="abcxyz._0123456789", min_size=1, max_size=12)
_SHAPES = st.lists(st.integers(min_value=0, max_value=5), min_size=0, max_size=3)


@st.composite
def _tensor_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    available = [getattr(torch, t) for _, t in DTYPES if hasattr(torch, t)]
    names = draw(st.lists(_NAMES, min_size=1, max_size=6, unique=True))
    out = {}
    for name in names:
        dtype = draw(st.sampled_from(available))
        shape = tuple(draw(_SHAPES))
        numel = 1
        for d in shape:
            numel *= d
        if dtype == torch.bool:
            bits = draw(st.lists(st.booleans(), min_size=numel, max_size=numel))
            out[name] = torch.tensor(bits, dtype=torch.bool).reshape(shape)
        else:
            raw = draw(st.binary(min_size=numel * dtype.itemsize, max_size=numel * dtype.itemsize))
            out[name] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape) \
                if numel else torch.empty(shape, dtype=dtype)
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensors=_tensor_dicts())
def test_round_trip_property(tensors: dict[str, torch.Tensor]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.safetensors"
        save_file(tensors, str(path))
        ckpt = check_round_trip(path)
        for name, t in tensors.items():
            assert_bit_identical(ckpt.tensor(name), t)


# ---------------------------------------------------------------- the 8-byte length and the header

@pytest.mark.parametrize("nbytes", [0, 1, 7])
def test_file_shorter_than_8_bytes(tmp_path: Path, nbytes: int) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x01" * nbytes)
    raises(errors.HeaderTooShortError, path, f"{nbytes} bytes")


def test_header_length_beyond_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 100) + b"{}")
    raises(errors.HeaderTooLargeError, path, "100", "10 bytes")


@pytest.mark.parametrize("header_nbytes", [MAX_HEADER_NBYTES + 1, 2**63, 2**64 - 1])
def test_header_length_beyond_the_cap(tmp_path: Path, header_nbytes: int) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", header_nbytes) + b"{}")
    raises(errors.HeaderTooLargeError, path, str(header_nbytes), str(MAX_HEADER_NBYTES))


def test_header_not_utf8(tmp_path: Path) -> None:
    raises(errors.HeaderEncodingError, st_file(tmp_path, b'{"\xff":1}'), "UTF-8", "byte 2")


@pytest.mark.parametrize("header", [b"{not json", b'{"w": ', b"", b"   ", b"[" * 100_000])
def test_header_not_json(tmp_path: Path, header: bytes) -> None:
    raises(errors.HeaderJSONError, st_file(tmp_path, header), "not JSON")


@pytest.mark.parametrize(("header", "kind"), [(b"[1, 2]", "list"), (b'"w"', "str"), (b"3", "int"),
                                              (b"null", "NoneType")])
def test_header_json_not_an_object(tmp_path: Path, header: bytes, kind: str) -> None:
    raises(errors.HeaderJSONError, st_file(tmp_path, header), kind, "not an object")


@pytest.mark.parametrize("info", [
    {"dtype": "F32", "shape": [1]},                       # no data_offsets
    {"shape": [1], "data_offsets": [0, 4]},               # no dtype
    {"dtype": "F32", "data_offsets": [0, 4]},             # no shape
    [0, 4],                                               # not an object
    "F32",
])
def test_entry_missing_a_field(tmp_path: Path, info: object) -> None:
    raises(errors.HeaderJSONError, st_file(tmp_path, {"w": info}, b"\0" * 4), "'w'", "data_offsets")


@pytest.mark.parametrize("dtype", ["F128", "f32", "F4", "float32", 7, None])
def test_unknown_dtype(tmp_path: Path, dtype: object) -> None:
    path = st_file(tmp_path, {"w": entry(dtype, [1], 0, 4)}, b"\0" * 4)  # type: ignore[arg-type]
    raises(errors.UnknownDtypeError, path, "'w'", repr(dtype))


@pytest.mark.parametrize("shape", [[-1], [2, -3], [2.0], [True], [False, 2], ["2"], [None], "2", None, 4])
def test_invalid_shape(tmp_path: Path, shape: object) -> None:
    path = st_file(tmp_path, {"w": entry("F32", shape, 0, 8)}, b"\0" * 8)  # type: ignore[arg-type]
    raises(errors.InvalidShapeError, path, "'w'", shown(shape))


@pytest.mark.parametrize(("dtype", "shape"), [("F32", [2**62, 2]), ("U8", [2**63]), ("U8", [2**40, 2**40, 0]),
                                              ("F64", [10**30])])
def test_size_overflow(tmp_path: Path, dtype: str, shape: list[int]) -> None:
    path = st_file(tmp_path, {"w": entry(dtype, shape, 0, 0)})
    raises(errors.SizeOverflowError, path, "'w'", str(shape), "2**63")


def test_size_just_below_the_overflow_limit_is_a_length_mismatch(tmp_path: Path) -> None:
    # 2**63 - 1 bytes is representable, so the rule that fires is the byte count, not overflow.
    path = st_file(tmp_path, {"w": entry("U8", [2**63 - 1], 0, 0)})
    raises(errors.ByteLengthMismatchError, path, "'w'", str(2**63 - 1))


def test_byte_length_mismatch(tmp_path: Path) -> None:
    path = st_file(tmp_path, {"w": entry("F32", [2], 0, 4)}, b"\0" * 4)
    raises(errors.ByteLengthMismatchError, path, "'w'", "[0, 4]", "4 bytes", "needs 8")


@pytest.mark.parametrize("offsets", [[0], [0, 4, 8], [-1, 3], [0.0, 4], [0, 4.0], "0,4", [True, 4], None,
                                     [None, 4]])
def test_malformed_data_offsets(tmp_path: Path, offsets: object) -> None:
    header = {"w": {"dtype": "F32", "shape": [1], "data_offsets": offsets}}
    raises(errors.InvalidOffsetsError, st_file(tmp_path, header, b"\0" * 4), "'w'", shown(offsets))


def test_reversed_data_offsets(tmp_path: Path) -> None:
    path = st_file(tmp_path, {"w": entry("F32", [1], 4, 0)}, b"\0" * 4)
    raises(errors.InvalidOffsetsError, path, "'w'", "[4, 0]")


# ---------------------------------------------------------------- how tensors tile the data section

def test_gap_between_tensors(tmp_path: Path) -> None:
    header = {"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}
    raises(errors.TensorGapError, st_file(tmp_path, header, b"\0" * 12),
           "'b'", "4 bytes at data offset 4", "starts at 8")


def test_first_tensor_not_at_zero(tmp_path: Path) -> None:
    header = {"a": entry("F32", [1], 4, 8)}
    raises(errors.TensorGapError, st_file(tmp_path, header, b"\0" * 8),
           "'a'", "4 bytes at data offset 0", "starts at 4")


def test_overlapping_tensors(tmp_path: Path) -> None:
    header = {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}
    raises(errors.TensorOverlapError, st_file(tmp_path, header, b"\0" * 12),
           "'b'", "'a'", "start at 4", "ends at 8")


def test_aliased_tensors(tmp_path: Path) -> None:
    # Same bytes under two names: the format forbids it (safetensors dedups ties on write).
    header = {"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 0, 4)}
    err = raises(errors.TensorOverlapError, st_file(tmp_path, header, b"\0" * 4), "start at 0", "ends at 4")
    assert err.tensor in ("a", "b")


def test_tensor_inside_another(tmp_path: Path) -> None:
    header = {"outer": entry("F32", [4], 0, 16), "inner": entry("F32", [1], 4, 8)}
    raises(errors.TensorOverlapError, st_file(tmp_path, header, b"\0" * 16), "'inner'", "'outer'")


def test_data_shorter_than_last_offset(tmp_path: Path) -> None:
    header = {"a": entry("F32", [1], 0, 4), "b": entry("F32", [2], 4, 12)}
    raises(errors.TruncatedFileError, st_file(tmp_path, header, b"\0" * 10),
           "'b'", "need 12 data bytes", "has 10")


def test_trailing_bytes_after_last_tensor(tmp_path: Path) -> None:
    header = {"a": entry("F32", [1], 0, 4)}
    raises(errors.TrailingBytesError, st_file(tmp_path, header, b"\0" * 7), "3 bytes", "7 bytes")


def test_trailing_bytes_with_no_tensors(tmp_path: Path) -> None:
    raises(errors.TrailingBytesError, st_file(tmp_path, b"{}", b"\0"), "1 bytes")


# ---------------------------------------------------------------- metadata and names

@pytest.mark.parametrize("metadata", [{"a": 1}, {"a": None}, {"a": {"b": "c"}}, ["x"], "x", 3, True])
def test_metadata_not_a_string_map(tmp_path: Path, metadata: object) -> None:
    raises(errors.MetadataError, st_file(tmp_path, {"__metadata__": metadata}), "__metadata__")


def test_metadata_string_map_is_kept(tmp_path: Path) -> None:
    header = {"__metadata__": {"format": "pt", "note": "ünïcode"}, "w": entry("U8", [1], 0, 1)}
    ckpt = sparsemap.Checkpoint(st_file(tmp_path, header, b"\x05"))
    assert ckpt.catalog.metadata == {"format": "pt", "note": "ünïcode"}
    assert list(ckpt) == ["w"]


def test_duplicate_tensor_names(tmp_path: Path) -> None:
    # json.loads would keep the second silently; the raw text has both.
    header = '{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},' \
             '"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}'
    raises(errors.DuplicateTensorError, st_file(tmp_path, header, b"\0\0"), "'w'", "twice")


# ---------------------------------------------------------------- garbage and damaged real files

def test_4096_zero_bytes(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\0" * 4096)
    with pytest.raises(SparsemapError) as info:
        sparsemap.open(path)
    assert isinstance(info.value, errors.FormatError) and isinstance(info.value, ValueError)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("cut", [1, 3, 8])
def test_real_file_truncated_by_a_few_bytes(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.arange(16, dtype=torch.float32), "b": torch.ones(3, 3)}, str(path))
    path.write_bytes(path.read_bytes()[:-cut])
    err = raises(errors.TruncatedFileError, path, f"has {16 * 4 + 9 * 4 - cut}")
    assert err.tensor in ("a", "b")


def test_real_file_truncated_inside_its_header(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.arange(16, dtype=torch.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:20])
    raises(errors.HeaderTooLargeError, path, "20 bytes")


def test_every_error_is_a_value_error() -> None:
    for name in dir(errors):
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, errors.FormatError):
            assert issubclass(cls, SparsemapError) and issubclass(cls, ValueError), name
