"""sparsemap.writer: aligned, laid-out safetensors files that any reader opens and sparsemap undoes.

Round trips compare bit for bit (random bit patterns: NaNs, infinities and
subnormals included). Layout checks read the raw header, so they do not rely
on sparsemap's own reader to tell where tensors are. What the planner decides
(offsets, views, header) is tested without torch in ``tests/formats/test_planner.py``;
temporary files and writeback in ``tests/test_durable.py``.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import sparsemap
from sparsemap.errors import LayoutOptionError
from sparsemap.formats.layout import LAYOUT_KEY, PAD_PREFIX
from sparsemap.formats.planner import Layout, Spec, plan
from sparsemap.mapped import DTYPE_NAMES, TORCH_DTYPES
from sparsemap.writer import write

from .helpers import random_tensor

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int16, torch.int32,
          torch.int64, torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def raw_header(path: Path) -> tuple[int, dict]:
    """``(data_start, header)`` read straight from the file's bytes."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def stored_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute ``(begin, end)`` byte range of every stored tensor."""
    data_start, header = raw_header(path)
    return {k: (data_start + v["data_offsets"][0], data_start + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """(nbytes,) uint8 of ``t`` in row-major order, whatever its strides (even size-1 dims with odd ones)."""
    dense = torch.empty(t.shape, dtype=t.dtype)
    dense.copy_(t)
    return dense.reshape(-1).view(torch.uint8)


def assert_bit_identical(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    assert torch.equal(as_bytes(got), as_bytes(want))


def assert_round_trip(path: Path, want: dict[str, torch.Tensor]) -> None:
    ckpt = sparsemap.Checkpoint(path)
    assert set(ckpt) == set(want)
    for name, t in want.items():
        assert_bit_identical(ckpt.tensor(name), t)


# ---------------------------------------------------------------- round trips

def test_dict_round_trip_of_every_dtype(tmp_path: Path) -> None:
    g = gen()
    tensors = {f"t.{str(d).removeprefix('torch.')}": random_tensor(d, (5, 7), g) for d in DTYPES}
    tensors["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    tensors["empty"] = torch.zeros(0, 3)
    tensors["vec"] = random_tensor(torch.float32, (11,), g)
    tensors["cube"] = random_tensor(torch.bfloat16, (2, 3, 4), g)
    path = tmp_path / "all.safetensors"
    sparsemap.save(tensors, path)
    assert_round_trip(path, tensors)
    loaded = load_file(str(path))  # the reference reader agrees
    for name, t in tensors.items():
        assert_bit_identical(loaded[name], t)


def test_module_round_trip_with_buffers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Embedding(10, 8).to(torch.float16))
    model[1].running_mean.normal_()
    path = tmp_path / "module.safetensors"
    sparsemap.save(model, path)
    state = model.state_dict()
    assert "1.num_batches_tracked" in state
    assert_round_trip(path, state)


def test_single_tensor_is_saved_as_tensor(tmp_path: Path) -> None:
    t = random_tensor(torch.float32, (4, 4), gen())
    sparsemap.save(t, tmp_path / "one.safetensors")
    assert_round_trip(tmp_path / "one.safetensors", {"tensor": t})


def test_user_metadata_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    sparsemap.save({"a": torch.ones(3)}, path, metadata={"author": "me"})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["author"] == "me" and meta["format"] == "pt"
    assert json.loads(meta[LAYOUT_KEY])["align"] == 4096
    assert sparsemap.open(path).metadata["author"] == "me"


def test_exact_bytes_of_a_small_file_with_no_filler(tmp_path: Path) -> None:
    a = torch.tensor([1.0, 2.0, 3.0])  # 12 bytes
    b = torch.tensor([7, -1], dtype=torch.int64)  # 16 bytes
    path = tmp_path / "exact.safetensors"
    sparsemap.save({"a": a, "b": b}, path, layout=Layout(align=64))
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    data = 8 + n
    assert data % 64 == 0
    header = json.loads(raw[8:data])
    # Neither fills a page: largest elements first (b, int64, on a multiple of 8), no filler between.
    assert set(header) == {"__metadata__", "a", "b"}
    assert header["b"]["data_offsets"] == [0, 16] and header["a"]["data_offsets"] == [16, 28]
    assert raw[data:] == b.numpy().tobytes() + a.numpy().tobytes()


def test_exact_bytes_of_a_small_file_with_fillers(tmp_path: Path) -> None:
    a = torch.tensor([1.0, 2.0, 3.0])  # 12 bytes
    b = torch.tensor([7, -1], dtype=torch.int64)  # 16 bytes
    path = tmp_path / "exact.safetensors"
    sparsemap.save({"a": a, "b": b}, path, layout=Layout(align=64, fillers=True))
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header_text = raw[8:8 + n]
    assert (8 + n) % 64 == 0
    assert header_text == header_text.rstrip(b" ") + b" " * (n - len(header_text.rstrip(b" ")))
    data = 8 + n
    header = json.loads(header_text)
    # a at 0, a 52-byte padding tensor up to 64, b at 64: 80 bytes of data.
    assert header["a"]["data_offsets"] == [0, 12]
    assert header[f"{PAD_PREFIX}1"] == {"dtype": "U8", "shape": [52], "data_offsets": [12, 64]}
    assert header["b"]["data_offsets"] == [64, 80]
    assert len(raw) == data + 80
    assert raw[data:data + 12] == a.numpy().tobytes()
    assert raw[data + 12:data + 64] == bytes(52)
    assert raw[data + 64:] == b.numpy().tobytes()


# ---------------------------------------------------------------- alignment

@pytest.mark.parametrize("align", [4096, 16 << 10, 64 << 10])
def test_every_tensor_starts_on_the_alignment(tmp_path: Path, align: int) -> None:
    g = gen(1)
    tensors = {"a": random_tensor(torch.float32, (3, 5), g), "b": random_tensor(torch.int8, (1001,), g),
               "c": random_tensor(torch.float16, (7, 3), g), "d": random_tensor(torch.float64, (2,), g)}
    path = tmp_path / "aligned.safetensors"
    sparsemap.save(tensors, path, layout=Layout(align=align, pad_rows=("c",)))
    data_start, _ = raw_header(path)
    assert data_start % align == 0
    for name, (begin, end) in stored_offsets(path).items():
        if end > begin and not name.startswith(PAD_PREFIX):
            assert begin % align == 0, (name, begin)
    cat = sparsemap.open(path)
    for name in ("a", "b", "c", "d"):
        assert cat[name].offset % align == 0, (name, cat[name].offset)
    assert_round_trip(path, tensors)


@pytest.mark.parametrize("align", [3000, 0, -4096, 4097])
def test_alignment_must_be_a_power_of_two(align: int) -> None:
    with pytest.raises(LayoutOptionError, match=f"align must be a power of two, got {align}"):
        Layout(align=align)


def test_row_page_must_be_a_power_of_two() -> None:
    with pytest.raises(LayoutOptionError, match="page"):
        Layout(page=3000)


# ---------------------------------------------------------------- special layouts

def ffn_dict(g: torch.Generator, inter: int = 24, hidden: int = 10) -> dict[str, torch.Tensor]:
    """A tiny Llama-like MLP and a tiny BERT-like layer (shapes as PyTorch stores them)."""
    return {
        "x.mlp.gate_proj.weight": random_tensor(torch.float32, (inter, hidden), g),
        "x.mlp.up_proj.weight": random_tensor(torch.float32, (inter, hidden), g),
        "x.mlp.down_proj.weight": random_tensor(torch.float32, (hidden, inter), g),
        "l.intermediate.dense.weight": random_tensor(torch.float32, (inter, hidden), g),
        "l.intermediate.dense.bias": random_tensor(torch.float32, (inter,), g),
        "l.output.dense.weight": random_tensor(torch.float32, (hidden, inter), g),
        "l.attention.output.dense.weight": random_tensor(torch.float32, (hidden, hidden), g),
        "emb": random_tensor(torch.float32, (50, 12), g),
        "w": random_tensor(torch.float16, (6, 9), g),
    }


def test_special_layouts_round_trip_and_open_in_safetensors(tmp_path: Path) -> None:
    tensors = ffn_dict(gen(2))
    path = tmp_path / "laid-out.safetensors"
    layout = Layout(pad_rows=("emb",), transpose=("w",), bundle_ffn=True)
    sparsemap.save(tensors, path, layout=layout)

    loaded = load_file(str(path))  # any safetensors reader opens it
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(loaded)
    plain = {"l.intermediate.dense.bias", "l.attention.output.dense.weight"}
    special = {"emb@rows", "w@T", "x.mlp@bundle", "l@bundle"}
    padding = {n for n in loaded if n.startswith(PAD_PREFIX)}
    assert padding and all(loaded[n].dtype == torch.uint8 for n in padding)
    assert set(loaded) == plain | special | padding
    for name in plain:
        assert_bit_identical(loaded[name], tensors[name])
    # What other tools see of the special tensors: the same values, laid out differently.
    assert loaded["emb@rows"].shape == (50, 16)  # 48-byte rows padded to 64
    assert_bit_identical(loaded["emb@rows"][:, :12], tensors["emb"])
    assert_bit_identical(loaded["w@T"], tensors["w"].t().contiguous())
    bundle = loaded["x.mlp@bundle"]
    assert bundle.shape == (24, 32)  # 30 values per neuron, padded to 128 bytes: a page holds 32 neurons
    assert_bit_identical(bundle[:, :10], tensors["x.mlp.gate_proj.weight"])
    assert_bit_identical(bundle[:, 10:20], tensors["x.mlp.up_proj.weight"])
    assert_bit_identical(bundle[:, 20:30], tensors["x.mlp.down_proj.weight"].t())

    # sparsemap hides padding and stored names, and undoes every layout without copying.
    cat = sparsemap.open(path)
    assert set(cat) == set(tensors)
    assert_round_trip(path, tensors)
    ckpt = sparsemap.Checkpoint(cat)
    mapped = ckpt.tensor("x.mlp.down_proj.weight")
    assert mapped.stride() == (1, bundle.shape[1])  # a strided view of the bundle, not a copy
    assert ckpt.owns(mapped)


def test_pad_rows_geometry(tmp_path: Path) -> None:
    g = gen(3)
    tensors = {"small": random_tensor(torch.float32, (9, 384), g),   # 1536 B -> 2048 B
               "big": random_tensor(torch.float32, (3, 1100), g),    # 4400 B -> 8192 B
               "exact": random_tensor(torch.float32, (4, 1024), g),  # 4096 B stays
               "tiny": random_tensor(torch.int8, (5, 3), g)}          # 3 B -> 4 B
    path = tmp_path / "pad.safetensors"
    sparsemap.save(tensors, path, layout=Layout(pad_rows=("*",)))
    cat = sparsemap.open(path)
    assert cat["small"].strides == (512, 1)
    assert cat["big"].strides == (2048, 1)
    assert cat["exact"].strides == (1024, 1)
    assert cat["tiny"].strides == (4, 1)
    for name in tensors:
        assert cat[name].offset % 4096 == 0
    assert_round_trip(path, tensors)


def test_tied_tensors_are_stored_once(tmp_path: Path) -> None:
    w = random_tensor(torch.float32, (256, 64), gen(4))  # 64 KiB
    single, tied, untied = (tmp_path / f"{n}.safetensors" for n in ("single", "tied", "two"))
    sparsemap.save({"a": w}, single)
    sparsemap.save({"a": w, "b": w}, tied)
    sparsemap.save({"a": w, "b": w.clone()}, untied)
    assert tied.stat().st_size < single.stat().st_size + w.nbytes // 2
    assert untied.stat().st_size >= single.stat().st_size + w.nbytes
    assert set(load_file(str(tied))) == {"a"}  # the second name is an alias in the layout metadata
    assert_round_trip(tied, {"a": w, "b": w})


def test_tied_tensors_in_a_special_layout_share_the_record(tmp_path: Path) -> None:
    w = random_tensor(torch.float32, (64, 100), gen(5))
    path = tmp_path / "tied-rows.safetensors"
    sparsemap.save({"emb": w, "head": w}, path, layout=Layout(pad_rows=("emb",)))
    assert {n for n in load_file(str(path)) if not n.startswith(PAD_PREFIX)} == {"emb@rows"}
    cat = sparsemap.open(path)
    assert cat["emb"].offset == cat["head"].offset
    assert_round_trip(path, {"emb": w, "head": w})


def test_tied_module_weights(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Embedding(40, 16), nn.Linear(16, 40, bias=False))
    model[1].weight = model[0].weight
    path = tmp_path / "tied-module.safetensors"
    sparsemap.save(model, path)
    assert_round_trip(path, {"0.weight": model[0].weight.detach(), "1.weight": model[0].weight.detach()})
    assert path.stat().st_size < 4096 * 2 + model[0].weight.nbytes  # header page + one copy


def test_dtype_cast_casts_only_floating_tensors(tmp_path: Path) -> None:
    g = gen(6)
    tensors = {"f32": torch.randn(4, 8, generator=g), "bf16": torch.randn(3, 3, generator=g).bfloat16(),
               "f64": torch.randn(5, generator=g).double(), "ids": torch.arange(6),
               "mask": torch.tensor([True, False]),
               "q": random_tensor(torch.int8, (4, 4), g)}
    path = tmp_path / "half.safetensors"
    sparsemap.save(tensors, path, layout=Layout(dtype=torch.float16, pad_rows=("f32",)))
    cat = sparsemap.open(path)
    ckpt = sparsemap.Checkpoint(cat)
    for name, t in tensors.items():
        want = t.to(torch.float16) if t.is_floating_point() else t
        assert cat[name].dtype == ("F16" if t.is_floating_point() else cat[name].dtype)
        assert_bit_identical(ckpt.tensor(name), want)
    assert cat["ids"].dtype == "I64" and cat["mask"].dtype == "BOOL" and cat["q"].dtype == "I8"


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16", "BF16"])
def test_the_cast_dtype_may_be_a_torch_dtype_or_a_name(tmp_path: Path, dtype: object) -> None:
    tensors = {"w": random_tensor(torch.float32, (4, 8), gen(8)), "ids": torch.arange(3)}
    sparsemap.save(tensors, tmp_path / "named.safetensors", layout=Layout(dtype="BF16"))
    sparsemap.save(tensors, tmp_path / "given.safetensors", layout=Layout(dtype=dtype))
    assert (tmp_path / "given.safetensors").read_bytes() == (tmp_path / "named.safetensors").read_bytes()
    assert_round_trip(tmp_path / "given.safetensors", {"w": tensors["w"].bfloat16(), "ids": tensors["ids"]})


def _ffn(inter: int, hidden: int) -> dict[str, torch.Tensor]:
    return {"x.mlp.gate_proj.weight": torch.zeros(inter, hidden),
            "x.mlp.up_proj.weight": torch.ones(inter, hidden),
            "x.mlp.down_proj.weight": torch.full((hidden, inter), 2.0)}


@pytest.mark.parametrize(("tensors", "layout"), [
    ({"a": torch.zeros(5, 0)}, Layout(pad_rows=("a",))),
    ({"a": torch.zeros(5, 0)}, Layout(transpose=("a",))),
    (_ffn(4, 0), Layout(bundle_ffn=True)),
    # Regressions: _write_rows raised RuntimeError (reshape(0, -1)) or ZeroDivisionError (row stride 0).
    ({"a": torch.zeros(0, 5)}, Layout(pad_rows=("a",))),
    ({"a": torch.zeros(0, 5)}, Layout(transpose=("a",))),
    (_ffn(0, 4), Layout(bundle_ffn=True)),
    ({"a": torch.zeros(0, 0), "b": torch.zeros(3, 0, 2)}, Layout(pad_rows=("*",), transpose=("a",))),
], ids=["pad-5x0", "transpose-5x0", "bundle-hidden-0", "pad-0x5", "transpose-0x5", "bundle-inter-0", "mixed"])
def test_empty_tensors_in_row_layouts(tmp_path: Path, tensors: dict[str, torch.Tensor],
                                      layout: Layout) -> None:
    path = tmp_path / "empty.safetensors"
    sparsemap.save(tensors, path, layout=layout)
    assert_round_trip(path, tensors)


# ---------------------------------------------------------------- refused layouts

def test_refused_inputs_name_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    with pytest.raises(LayoutOptionError, match=r"'cube'|cube: only 2-D"):
        sparsemap.save({"cube": torch.zeros(2, 3, 4)}, path, layout=Layout(transpose=("cube",)))
    with pytest.raises(LayoutOptionError, match="m: on the meta device"):
        sparsemap.save({"m": torch.empty(3, device="meta")}, path)
    with pytest.raises(LayoutOptionError, match="n: not a tensor"):
        sparsemap.save({"n": [1, 2]}, path)  # type: ignore[dict-item]
    with pytest.raises(LayoutOptionError, match=r"c: dtype torch.bits8 has no safetensors name"):
        sparsemap.save({"c": torch.empty(2, dtype=torch.bits8)}, path)
    bad = ffn_dict(gen(7))
    bad["x.mlp.down_proj.weight"] = torch.zeros(10, 23)
    with pytest.raises(LayoutOptionError, match=r"x.mlp.down_proj.weight has 23 rows"):
        sparsemap.save(bad, path, layout=Layout(bundle_ffn=True))
    assert not path.exists()
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- a file appears whole or not at all

def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    dest = tmp_path / "model.safetensors"
    sparsemap.save({"old": torch.ones(3)}, dest)
    old_bytes = dest.read_bytes()
    tensors = {f"t{i}": torch.full((1000,), float(i)) for i in range(5)}
    the_plan = plan([Spec(n, tuple(t.shape), DTYPE_NAMES[t.dtype]) for n, t in tensors.items()], Layout())
    calls = []

    def get(name: str) -> torch.Tensor:
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return tensors[name]

    with pytest.raises(RuntimeError, match="disk on fire"):
        write(the_plan, get, dest)
    assert calls == ["t0", "t1", "t2"]
    assert dest.read_bytes() == old_bytes
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]

    write(the_plan, tensors.__getitem__, dest)  # the same plan, written whole
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    assert_round_trip(dest, tensors)


def test_a_reader_holding_the_old_file_keeps_its_values(tmp_path: Path) -> None:
    dest = tmp_path / "model.safetensors"
    sparsemap.save({"w": torch.ones(2048)}, dest)
    old = sparsemap.Checkpoint(dest).tensor("w")
    sparsemap.save({"w": torch.full((2048,), 2.0)}, dest)
    assert torch.equal(old, torch.ones(2048))  # a new inode: the old mapping is intact
    assert torch.equal(sparsemap.Checkpoint(dest).tensor("w"), torch.full((2048,), 2.0))


# ---------------------------------------------------------------- property: any dict, any layout

NAMES = ["a", "b.weight", "c.bias", "emb", "w2", "z"]
ST_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int32,
             torch.int64, torch.uint8, torch.bool]


@st.composite
def dicts_and_layouts(draw: st.DrawFn) -> tuple[dict[str, torch.Tensor], Layout]:
    g = gen(draw(st.integers(0, 2**31 - 1)))
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=len(NAMES), unique=True))
    tensors = {}
    for name in names:
        dtype = draw(st.sampled_from(ST_DTYPES))
        shape = tuple(draw(st.lists(st.integers(1, 9), min_size=0, max_size=3)))
        tensors[name] = random_tensor(dtype, shape, g)
    if draw(st.booleans()):  # an FFN to bundle (consistent shapes, one dtype)
        inter, hidden = draw(st.integers(1, 9)), draw(st.integers(1, 9))
        dtype = draw(st.sampled_from([torch.float32, torch.float16]))
        tensors["h.mlp.gate_proj.weight"] = random_tensor(dtype, (inter, hidden), g)
        tensors["h.mlp.up_proj.weight"] = random_tensor(dtype, (inter, hidden), g)
        tensors["h.mlp.down_proj.weight"] = random_tensor(dtype, (hidden, inter), g)
    if draw(st.booleans()) and names:  # a tie
        tensors["tied"] = tensors[draw(st.sampled_from(names))]
    two_d = [n for n in names if tensors[n].dim() == 2]
    layout = Layout(
        align=draw(st.sampled_from([1, 8, 64, 4096, 16384])),
        dtype=draw(st.sampled_from([None, torch.float16, torch.bfloat16, torch.float32])),
        pad_rows=tuple(draw(st.lists(st.sampled_from(names), unique=True))),
        transpose=tuple(draw(st.lists(st.sampled_from(two_d), unique=True))) if two_d else (),
        bundle_ffn=draw(st.booleans()),
        page=draw(st.sampled_from([None, 64, 4096])),
    )
    return tensors, layout


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dicts_and_layouts())
def test_any_dict_round_trips_through_any_layout(case: tuple[dict[str, torch.Tensor], Layout]) -> None:
    tensors, layout = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.safetensors"
        sparsemap.save(tensors, path, layout=layout)
        cast = {n for n, t in tensors.items() if layout.dtype is not None and t.is_floating_point()}
        want = {n: (t.to(TORCH_DTYPES[layout.dtype]) if n in cast else t) for n, t in tensors.items()}
        ckpt = sparsemap.Checkpoint(path)
        assert set(ckpt) == set(want)
        for name, t in want.items():
            got = ckpt.tensor(name)
            if name in cast:  # casts may give a NaN another payload; every other value is exact
                assert got.dtype == t.dtype
                torch.testing.assert_close(got, t, rtol=0, atol=0, equal_nan=True)
            else:
                assert_bit_identical(got, t)
        loaded = load_file(str(path))  # stays a valid safetensors file
        data_start, _ = raw_header(path)
        assert data_start % layout.align == 0
        filled = raw_header(path)[1]["__metadata__"]["format"] == "sparsemap"  # reshaped: gaps filled
        for name, (begin, end) in stored_offsets(path).items():
            assert name in loaded
            assert filled or not name.startswith(PAD_PREFIX)
            whole_pages = (end - begin) % layout.align == 0
            if end > begin and not name.startswith(PAD_PREFIX) and (filled or whole_pages):
                assert begin % layout.align == 0
        for name in loaded:
            if name in tensors and name not in cast and name not in layout.transpose:
                assert torch.equal(as_bytes(loaded[name]), as_bytes(want[name]))
        assert os.listdir(folder) == ["p.safetensors"]

