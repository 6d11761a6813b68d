"""sparsemap.safe_open: safetensors' ``safe_open`` over every format, checked against safetensors itself.

The same files are opened by both; keys, metadata, tensors (bit for bit) and
slices must agree. Formats safetensors cannot read (torch zip, shard folders,
GGUF, rwkv.cpp) are checked against what wrote them. Zero-copy is checked as
in test_checkpoint: a tensor's data lies in the file's mapping, at the offset
the header gives.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open as st_safe_open
from safetensors.torch import save_file

import sparsemap
from sparsemap import errors
from sparsemap.mapped import mapping_of

from .conftest import ModuleFolders
from .formats.test_rwkvcpp import write as write_rwkv
from .helpers import assert_bit_identical, random_tensor, write_gguf

# Index forms safetensors' slices take, each applied to a (6, 5, 8) tensor.
INDEXES = [
    0, -1, 5, slice(None), slice(1, 4), slice(None, None, 2), slice(-3, None), slice(4, 100), slice(3, 1),
    (slice(None), 2), (slice(None), -2), (1, 2, 3), (-1, -1, -1), (slice(1, None, 2), slice(None, None, 3)),
    (..., 1), (..., slice(2, None, 3)), (0, ..., -1), (slice(None), slice(None), slice(None)),
    (slice(-100, 100, 4), 0), (), (..., None), (None, 1),
]


def ids(index: object) -> str:
    return repr(index).replace("slice", "s").replace("Ellipsis", "...")


# ---------------------------------------------------------------- files


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    """Random bit patterns (NaNs and infs included) of several dtypes and shapes, one scalar, one empty."""
    gen = torch.Generator().manual_seed(0)
    return {
        "model.embed.weight": random_tensor(torch.float32, (6, 5, 8), gen),
        "model.norm.weight": random_tensor(torch.bfloat16, (40,), gen),
        "model.layers.0.mlp.up": random_tensor(torch.float16, (8, 6), gen),
        "ids": random_tensor(torch.int64, (7,), gen),
        "counts": random_tensor(torch.int16, (3, 3), gen),
        "mask": random_tensor(torch.bool, (2, 9), gen),
        "bytes": random_tensor(torch.uint8, (13,), gen),
        "scale": torch.tensor(0.5, dtype=torch.float64),
        "empty": torch.empty(0, 4),
    }


@pytest.fixture(scope="module")
def st_path(module_folders: ModuleFolders, tensors: dict[str, torch.Tensor]) -> Path:
    path = module_folders.make("st") / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "sparsemap"})
    return path


@pytest.fixture(scope="module")
def st_bare(module_folders: ModuleFolders, tensors: dict[str, torch.Tensor]) -> Path:
    """No ``__metadata__`` at all."""
    path = module_folders.make("bare") / "model.safetensors"
    save_file({"w": tensors["model.embed.weight"]}, str(path))
    return path


@pytest.fixture(scope="module")
def zip_path(module_folders: ModuleFolders) -> tuple[Path, dict[str, torch.Tensor]]:
    """A torch.save checkpoint with a nested dict, a transposed view and two views of one storage."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(6, 5, 8, generator=gen)
    shared = torch.randn(4, 10, generator=gen)
    obj = {"model": {"w": base, "wt": torch.randn(8, 6, generator=gen).t(), "half": base.half()},
           "row": shared[1], "cols": shared[:, 2:5], "step": torch.tensor(3)}
    path = module_folders.make("zip") / "model.pt"
    torch.save(obj, path)
    flat = {"model.w": base, "model.wt": obj["model"]["wt"], "model.half": obj["model"]["half"],
            "row": obj["row"], "cols": obj["cols"], "step": obj["step"]}
    return path, flat


@pytest.fixture(scope="module")
def sharded(module_folders: ModuleFolders, tensors: dict[str, torch.Tensor]) -> Path:
    """A Hugging Face shard folder: two safetensors shards and their index."""
    folder = module_folders.make("sharded")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard_names, shard))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def reference(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a shard folder, read by safetensors shard by shard."""
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with st_safe_open(shard, framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118 - not a dict
    return out


def assert_view_of(t: torch.Tensor, path: Path, offset: int) -> None:
    """``t``'s first element is byte ``offset`` of ``path``'s mapping: served zero-copy."""
    mm = mapping_of(t)
    assert mm.path == str(path)
    assert t.data_ptr() - mm.address == offset


# ---------------------------------------------------------------- the same answers as safetensors


def test_keys_metadata_and_tensors_match_safetensors(st_path: Path) -> None:
    with st_safe_open(st_path, framework="pt") as want, sparsemap.safe_open(st_path, framework="pt") as got:
        assert got.keys() == want.keys() == sorted(want.keys())
        assert got.offset_keys() == want.offset_keys()
        assert got.metadata() == want.metadata() == {"format": "pt", "note": "sparsemap"}
        for name in want.keys():  # noqa: SIM118 - safe_open is not a dict
            assert_bit_identical(got.get_tensor(name), want.get_tensor(name))
            assert got.get_slice(name).get_shape() == want.get_slice(name).get_shape()
            assert got.get_slice(name).get_dtype() == want.get_slice(name).get_dtype()
        everything = got.get_tensors()
        assert list(everything) == got.offset_keys()
        for name, t in want.get_tensors().items():
            assert_bit_identical(everything[name], t)


def test_missing_metadata_is_none_as_in_safetensors(st_bare: Path) -> None:
    with st_safe_open(st_bare, framework="pt") as want, sparsemap.safe_open(st_bare) as got:
        assert got.metadata() is None and want.metadata() is None


@pytest.mark.parametrize("index", INDEXES, ids=ids)
def test_slices_match_safetensors(st_path: Path, index: object) -> None:
    name = "model.embed.weight"  # (6, 5, 8) float32
    with st_safe_open(st_path, framework="pt") as want, sparsemap.safe_open(st_path) as got:
        got_part = got.get_slice(name)[index]
        assert_bit_identical(got_part, want.get_slice(name)[index])
        assert_bit_identical(got_part, got.get_tensor(name)[index])


@pytest.mark.parametrize(("index", "error"), [(6, IndexError), (-7, IndexError), ((0, 0, 0, 0), IndexError),
                                              (slice(None, None, -1), ValueError)], ids=ids)
def test_bad_indexes_fail_as_in_safetensors(st_path: Path, index: object, error: type[Exception]) -> None:
    with st_safe_open(st_path, framework="pt") as want, sparsemap.safe_open(st_path) as got:
        with pytest.raises(error):
            want.get_slice("model.embed.weight")[index]
        with pytest.raises(error):
            got.get_slice("model.embed.weight")[index]


def test_numpy_framework_matches_safetensors(st_path: Path) -> None:
    with st_safe_open(st_path, framework="np") as want, \
            sparsemap.safe_open(st_path, framework="numpy") as got:
        for name in ("model.embed.weight", "ids", "mask", "scale", "empty"):
            a, b = got.get_tensor(name), want.get_tensor(name)
            assert isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
            assert a.tobytes() == b.tobytes()
        assert np.array_equal(got.get_slice("counts")[1:, ::2], want.get_slice("counts")[1:, ::2])
        # numpy has no bfloat16: safetensors fails with numpy's TypeError, sparsemap names the way out.
        with pytest.raises(TypeError):
            want.get_tensor("model.norm.weight")
        with pytest.raises(errors.UnsupportedArgumentError, match="framework='pt'") as info:
            got.get_tensor("model.norm.weight")
        assert info.value.tensor == "model.norm.weight" and str(st_path) in str(info.value)


# ---------------------------------------------------------------- zero-copy


def test_tensors_and_slices_are_views_of_the_mapped_file(st_path: Path, tensors: dict) -> None:
    catalog = sparsemap.open(st_path)
    with sparsemap.safe_open(st_path) as f:
        for name in ("model.embed.weight", "model.norm.weight", "ids", "scale"):
            assert_view_of(f.get_tensor(name), st_path, catalog[name].offset)
        s = f.get_slice("model.embed.weight")  # (6, 5, 8) float32, rows of 5 * 8 * 4 bytes
        start = catalog["model.embed.weight"].offset
        assert_view_of(s[2], st_path, start + 2 * 160)
        assert_view_of(s[1:, 3, ::2], st_path, start + 160 + 3 * 32)
        assert_view_of(s[..., -1], st_path, start + 7 * 4)
    with sparsemap.safe_open(st_path, framework="np") as g:  # numpy arrays share the view's memory
        assert_view_of(torch.from_numpy(g.get_tensor("ids")), st_path, catalog["ids"].offset)
        assert_view_of(torch.from_numpy(g.get_slice("counts")[1:]), st_path, catalog["counts"].offset + 6)


def test_a_copy_to_another_device_reads_only_the_slice(st_path: Path) -> None:
    # The meta device stands for a GPU here: the copy path runs, the data is not compared.
    with sparsemap.safe_open(st_path, device="meta") as f:
        t = f.get_tensor("model.embed.weight")
        assert t.device.type == "meta" and t.shape == (6, 5, 8) and t.dtype == torch.float32
        part = f.get_slice("model.embed.weight")[1:3, ..., ::4]
        assert part.device.type == "meta" and part.shape == (2, 5, 2)
        assert all(v.device.type == "meta" for v in f.get_tensors().values())


# ---------------------------------------------------------------- every other format


def test_a_torch_zip_checkpoint(zip_path: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, flat = zip_path
    catalog = sparsemap.open(path)
    with sparsemap.safe_open(path, framework="pt") as f:
        assert f.keys() == sorted(flat)
        assert f.metadata() is None
        assert set(f.offset_keys()) == set(flat)
        for name, want in flat.items():
            got = f.get_tensor(name)
            assert_bit_identical(got, want)
            assert got.stride() == want.stride(), name  # a transposed view stays one
            assert_view_of(got, path, catalog[name].offset)
            assert f.get_slice(name).get_shape() == list(want.shape)
        for index in [(slice(None), -1), (slice(1, None, 2), ...), (..., slice(None, None, 3))]:
            assert_bit_identical(f.get_slice("model.wt")[index], flat["model.wt"][index])
            assert_bit_identical(f.get_slice("model.w")[index], flat["model.w"][index])
        assert f.get_slice("model.half").get_dtype() == "F16" and f.get_slice("step").get_dtype() == "I64"


def test_a_shard_folder_reads_as_one_file(sharded: Path) -> None:
    want = reference(sharded)
    with sparsemap.safe_open(sharded) as f:
        assert f.keys() == sorted(want)
        assert f.metadata() == {"format": "pt"}
        for name, t in want.items():
            assert_bit_identical(f.get_tensor(name), t)
        # Storage order: the first shard's tensors by offset, then the second's.
        order = []
        for shard in sorted(sharded.glob("*.safetensors")):
            with st_safe_open(shard, framework="pt") as g:
                order += g.offset_keys()
        assert f.offset_keys() == order
        assert_bit_identical(f.get_slice("model.embed.weight")[-2:, 1], want["model.embed.weight"][-2:, 1])
    with sparsemap.safe_open(sharded / "model.safetensors.index.json") as f:
        assert f.keys() == sorted(want)


def test_a_gguf_file_plain_views_and_dequantized_copies(tmp_path: Path) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(2)
    weights = rng.standard_normal((4, 64)).astype(np.float32)  # (rows, row_len): Q8_0 blocks are 32 wide
    blocks = quantize(weights, GGMLQuantizationType.Q8_0)
    path = write_gguf(tmp_path / "m.gguf", {"plain": (weights, None),
                                            "half": (weights.astype(np.float16), None),
                                            "q8": (blocks, GGMLQuantizationType.Q8_0)}, {"test.note": "hi"})
    catalog = sparsemap.open(path)
    with sparsemap.safe_open(path) as f:
        assert f.keys() == ["half", "plain", "q8"]
        metadata = f.metadata()
        assert metadata is not None and metadata["test.note"] == "hi"
        assert metadata["general.architecture"] == "llama"
        plain = f.get_tensor("plain")
        assert np.array_equal(plain.numpy(), weights)
        assert_view_of(plain, path, catalog["plain"].offset)
        assert np.array_equal(f.get_slice("half")[:, ::3].numpy(), weights.astype(np.float16)[:, ::3])
        q8 = f.get_slice("q8")
        assert q8.get_shape() == [4, 64] and q8.get_dtype() == "F32"  # served dequantized
        dequantized = dequantize(blocks, GGMLQuantizationType.Q8_0).reshape(4, 64)
        assert np.array_equal(f.get_tensor("q8").numpy(), dequantized)
        assert np.array_equal(q8[1:3, 5].numpy(), dequantized[1:3, 5])


def test_an_rwkv_cpp_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    arrays = {"emb.weight": rng.standard_normal((16, 8)).astype(np.float32),
              "blocks.0.ln1.weight": rng.standard_normal(8).astype(np.float32),
              "blocks.0.ffn.key.weight": rng.standard_normal((32, 8)).astype(np.float16),
              "head.weight": rng.standard_normal((16, 8)).astype(np.float32)}
    path = write_rwkv(tmp_path / "rwkv.bin", arrays)
    with sparsemap.safe_open(path, framework="np") as f:
        assert f.keys() == sorted(arrays)
        metadata = f.metadata()
        assert metadata is not None and metadata["rwkv_cpp.n_embed"] == "8"
        for name, array in arrays.items():
            assert np.array_equal(f.get_tensor(name), array), name
        assert np.array_equal(f.get_slice("head.weight")[::5, -3:], arrays["head.weight"][::5, -3:])


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("method", ["get_tensor", "get_slice"])
def test_an_unknown_name_names_the_file_the_tensor_and_close_names(st_path: Path, method: str) -> None:
    with sparsemap.safe_open(st_path) as f, pytest.raises(errors.TensorNotFoundError) as info:
        getattr(f, method)("model.embed.weights")
    err = info.value
    assert isinstance(err, KeyError) and err.tensor == "model.embed.weights" and err.path == str(st_path)
    message = str(err)
    assert str(st_path) in message and "'model.embed.weights'" in message
    assert "close names: 'model.embed.weight'" in message
    with sparsemap.safe_open(st_path) as f, pytest.raises(errors.TensorNotFoundError, match="it has 'bytes'"):
        f.get_tensor("zzz")  # nothing close: the first names are shown instead


@pytest.mark.parametrize("framework", ["tf", "jax", "PT", "", None])
def test_an_unknown_framework_is_refused_before_the_file_is_read(tmp_path: Path, framework: object) -> None:
    with pytest.raises(errors.UnsupportedArgumentError) as info:
        sparsemap.safe_open(tmp_path / "missing.safetensors", framework=framework)  # type: ignore[arg-type]
    assert repr(framework) in str(info.value) and "'pt'" in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", 0, torch.device("cuda", 1)], ids=repr)
def test_a_cuda_device_without_cuda_is_a_sparsemap_error(st_path: Path, device: object) -> None:
    with pytest.raises(errors.UnsupportedArgumentError, match=r"not available here.*device='cpu'"):
        sparsemap.safe_open(st_path, device=device)  # type: ignore[arg-type]


@pytest.mark.parametrize(("framework", "device", "needle"), [
    ("pt", "bogus", "not a torch device"), ("pt", True, "not a torch device"),
    ("pt", 1.5, "not a torch device"), ("np", "meta", "CPU only"),
])
def test_bad_devices_are_refused(st_path: Path, framework: str, device: object, needle: str) -> None:
    with pytest.raises(errors.UnsupportedArgumentError, match=needle):
        sparsemap.safe_open(st_path, framework=framework, device=device)  # type: ignore[arg-type]


def test_a_bad_file_raises_the_formats_own_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x03\x00")
    with pytest.raises(errors.HeaderTooShortError):
        sparsemap.safe_open(path)


# ---------------------------------------------------------------- lifetime


def test_use_after_close_is_a_clear_error_and_served_tensors_stay_valid(st_path: Path, tensors: dict) -> None:
    with sparsemap.safe_open(st_path) as f:
        t = f.get_tensor("model.embed.weight")
        s = f.get_slice("model.embed.weight")
        part = s[1:3]
    assert f.closed
    for call in (f.keys, f.offset_keys, f.metadata, f.get_tensors, lambda: f.get_tensor("ids"),
                 lambda: f.get_slice("ids"), lambda: s[0], f.__enter__):
        with pytest.raises(ValueError, match="closed") as info:
            call()
        assert str(st_path) in str(info.value)
    assert s.get_shape() == [6, 5, 8]  # the header's answers need no mapping
    assert_bit_identical(t, tensors["model.embed.weight"])  # views keep their mapping alive
    assert_bit_identical(part, tensors["model.embed.weight"][1:3])
    f.close()  # closing twice is allowed


def test_closing_lets_go_of_the_mappings(st_path: Path) -> None:
    f = sparsemap.safe_open(st_path)
    mm = weakref.ref(mapping_of(f.get_tensor("ids")))
    gc.collect()
    assert mm() is not None  # the handle holds it
    f.close()
    gc.collect()
    assert mm() is None


def test_a_handle_left_open_lets_go_when_collected(st_path: Path) -> None:
    f = sparsemap.safe_open(st_path)
    t = f.get_tensor("ids")
    mm = weakref.ref(mapping_of(t))
    del f
    gc.collect()
    assert mm() is not None  # the view still holds it
    del t
    gc.collect()
    assert mm() is None


def test_the_function_is_not_shadowed_by_its_module() -> None:
    """Importing the submodule first (as another import may) must leave ``sparsemap.safe_open`` the function:
    importing a submodule binds its name in the package."""
    code = ("import sparsemap, sparsemap.safetensors_api\n"
            "from sparsemap import safe_open\n"
            "assert callable(safe_open) and safe_open is sparsemap.safe_open, safe_open\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
