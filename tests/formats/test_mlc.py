"""sparsemap.formats.mlc: MLC-LLM / TVM parameter caches, written here as tvmjs.dump_ndarray_cache writes
them.

Every array must come back bit-identical, as a view of its shard where aligned (float32 dumped as
"f32-to-bf16" as the bfloat16 bits TVM stored, which widen to what TVM's loader gives); a cache streams
to a device one array at a time through the staging ring; each damaged cache is refused with its own
error, naming the JSON or the shard and the numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import sparsemap
from sparsemap import errors
from sparsemap.formats.source import resolve_source
from sparsemap.stream import stream_tensors

from ..format_writers import f32_to_bf16, write_mlc
from ..helpers import raises, run_isolated


def params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "model.embed_tokens.weight": rng.standard_normal((96, 64)).astype(np.float32),
        "model.layers.0.self_attn.qkv_proj.q_weight": rng.integers(0, 2**32, (48, 8), dtype=np.uint32),
        "model.layers.0.self_attn.qkv_proj.q_scale": rng.standard_normal((48, 2)).astype(np.float16),
        "model.norm.weight": rng.standard_normal(63).astype(np.float32),  # odd: what follows is misaligned
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((64, 128)).astype(np.float32),
        "lm_head.weight": rng.standard_normal((300, 64)).astype(np.float32),  # out of band at this cap
        "ids": np.arange(5, dtype=np.int64),
        "half": rng.integers(0, 2**16, (4, 4), dtype=np.uint16),  # written as TVM's bfloat16
    }


def stored_bits(name: str, array: np.ndarray, encode_format: str) -> torch.Tensor:
    """What the shard holds for ``array``, as a torch tensor of the catalog's dtype."""
    if array.dtype == np.float32 and encode_format == "f32-to-bf16":
        return torch.from_numpy(f32_to_bf16(array).astype(np.int16)).view(torch.bfloat16)
    if array.dtype == np.uint16:
        return torch.from_numpy(array.astype(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


@pytest.mark.parametrize("encode_format", ["f32-to-bf16", "raw"])
def test_arrays_are_what_the_shards_hold(tmp_path: Path, encode_format: str) -> None:
    arrays = params()
    json_path = write_mlc(tmp_path / "cache", arrays, encode_format=encode_format, shard_cap_nbytes=20 << 10)
    assert len(json.loads(json_path.read_text())["records"]) >= 3  # several shards, one out of band
    for opened in (json_path, json_path.parent):
        assert resolve_source(opened).format == "mlc"
        cat = sparsemap.open(opened)
        assert cat.format == "mlc" and cat.metadata == {"mlc.ParamSize": "8"}
        assert set(cat) == set(arrays) and len(cat.files) >= 3
    ckpt = sparsemap.Checkpoint(cat)
    for name, array in arrays.items():
        want = stored_bits(name, array, encode_format)
        got = ckpt.tensor(name)
        assert got.dtype == want.dtype and tuple(got.shape) == array.shape, name
        assert torch.equal(got.view(torch.uint8), want.reshape(array.shape).view(torch.uint8)), name
        entry = cat[name]
        assert ckpt.owns(got) == (entry.offset % got.element_size() == 0), name
    if encode_format == "f32-to-bf16":  # widened as TVM's loader widens (_convert_bf16_to_f32)
        e = arrays["model.embed_tokens.weight"]
        widened = (f32_to_bf16(e).astype(np.uint32) << 16).view(np.float32)
        assert np.array_equal(ckpt.tensor("model.embed_tokens.weight").float().numpy(), widened)
        assert np.abs(widened - e).max() <= np.abs(e).max() * 2**-8


def test_a_cache_streams_one_array_at_a_time_bit_identical(tmp_path: Path) -> None:
    arrays = params()
    json_path = write_mlc(tmp_path / "cache", arrays, shard_cap_nbytes=20 << 10)
    cat = sparsemap.open(json_path)
    got, report = stream_tensors(cat, staging="64K", readers=2)
    ckpt = sparsemap.Checkpoint(cat)
    assert set(got) == set(cat) and report.nbytes == cat.nbytes
    for name, t in got.items():
        assert not ckpt.owns(t), name
        assert torch.equal(t.view(torch.uint8), ckpt.tensor(name).view(torch.uint8)), name
    floats, _ = stream_tensors(cat, names=["model.embed_tokens.weight"], dtype=torch.float32, staging="64K")
    assert torch.equal(floats["model.embed_tokens.weight"], ckpt.tensor("model.embed_tokens.weight").float())


def test_a_mapped_load_adds_under_2_percent_of_the_weights_in_anonymous_memory(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arrays = {f"model.layers.{i}.w{j}": rng.standard_normal((512, 1024)).astype(np.float32)
              for i in range(8) for j in range(4)}  # 32 MiB as bfloat16, in 32-MiB shards
    path = write_mlc(tmp_path / "cache", arrays)
    del arrays
    result = run_isolated(f"""
        import json, torch, sparsemap
        import sparsemap.loader  # code, not weights
        from sparsemap.memory import AnonSampler, rss_anon
        before = rss_anon()
        with AnonSampler() as sampler:
            sd = sparsemap.load_state_dict({str(path)!r})
        total = sum(t.numel() * t.element_size() for t in sd.values())
        print(json.dumps({{"growth": sampler.peak - before, "nbytes": total}}))
    """)
    assert result["growth"] < 0.02 * result["nbytes"], result
    print(f"MLC mapped load: +{result['growth'] / 2**10:.0f} KiB anonymous for "
          f"{result['nbytes'] / 2**20:.0f} MiB")


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device: the pinned-buffer GPU path needs one")
def test_a_cache_streams_to_a_gpu_bit_identical(tmp_path: Path) -> None:
    cat = sparsemap.open(write_mlc(tmp_path / "cache", params(), shard_cap_nbytes=20 << 10))
    got, report = stream_tensors(cat, device="cuda:0", staging="64K", readers=2)
    ckpt = sparsemap.Checkpoint(cat)
    for name, t in got.items():
        assert t.device.type == "cuda"
        assert torch.equal(t.cpu().view(torch.uint8), ckpt.tensor(name).view(torch.uint8)), name
    assert report.device.startswith("cuda")


def test_newer_tvm_names_and_the_b16_listing(tmp_path: Path) -> None:
    arrays = {"w": np.ones((4, 4), dtype=np.float32)}
    path = write_mlc(tmp_path / "new", arrays, name="tensor-cache.json")
    assert sparsemap.open(tmp_path / "new").format == "mlc"
    doc = json.loads(path.read_text())  # dump_tensor_cache's -b16 listing: the same bytes, said bfloat16
    for shard in doc["records"]:
        for rec in shard["records"]:
            rec["format"], rec["dtype"] = "raw", "bfloat16"
    b16 = path.with_name("tensor-cache-b16.json")
    b16.write_text(json.dumps(doc))
    assert torch.equal(sparsemap.Checkpoint(b16).tensor("w"), torch.ones(4, 4, dtype=torch.bfloat16))


def _cache(tmp_path: Path, edit: object = None, shard: bytes | None = None) -> Path:
    """A two-array cache, its JSON changed by ``edit(doc)``, its shard replaced by ``shard``."""
    path = write_mlc(tmp_path / "c", {"a": np.zeros(4, np.float32), "b": np.zeros(4, np.float32)},
                     encode_format="raw")
    doc = json.loads(path.read_text())
    if callable(edit):
        edit(doc)
    path.write_text(json.dumps(doc))
    if shard is not None:
        (path.parent / "params_shard_0.bin").write_bytes(shard)
    return path


def _rec(doc: dict, i: int = 1) -> dict:
    return doc["records"][0]["records"][i]


@pytest.mark.parametrize(("edit", "error", "needles"), [
    (lambda d: d.update(records={}), errors.MlcFormatError, ("records",)),
    (lambda d: d["records"][0].update(dataPath="../params_shard_0.bin"), errors.MlcFormatError,
     ("'../params_shard_0.bin'", "not a file name")),
    (lambda d: d["records"][0].update(dataPath="/etc/passwd"), errors.MlcFormatError, ("'/etc/passwd'",)),
    (lambda d: d["records"][0].update(dataPath="params_shard_9.bin"), errors.MissingShardError,
     ("'params_shard_9.bin'", "missing")),
    (lambda d: d["records"].append(d["records"][0]), errors.MlcFormatError, ("two shard records",)),
    (lambda d: d["records"][0].update(format="zip-shard"), errors.MlcFormatError, ("'zip-shard'",)),
    (lambda d: _rec(d).update(dtype="float4"), errors.UnknownDtypeError, ("'b'", "'float4'")),
    (lambda d: _rec(d).update(format="f16-to-f8"), errors.MlcFormatError, ("'b'", "'f16-to-f8'")),
    (lambda d: _rec(d).update(shape=[-4]), errors.InvalidShapeError, ("'b'", "-4")),
    (lambda d: _rec(d).update(shape=[2**40, 2**40]), errors.SizeOverflowError, ("'b'", "2**63")),
    (lambda d: _rec(d).update(nbytes=12), errors.ByteLengthMismatchError, ("'b'", "nbytes 12", "16")),
    (lambda d: _rec(d).update(byteOffset=8), errors.TensorOverlapError, ("'b'", "'a'", "8")),
    (lambda d: _rec(d).update(byteOffset=24), errors.InvalidOffsetsError, ("'b'", "[24, 40)", "32 bytes")),
    (lambda d: _rec(d).update(byteOffset=-1), errors.InvalidOffsetsError, ("'b'", "-1")),
    (lambda d: _rec(d).update(name="a"), errors.DuplicateTensorError, ("'a'", "twice")),
])
def test_damaged_caches_are_refused_by_name(tmp_path: Path, edit: object, error: type,
                                            needles: tuple) -> None:
    raises(error, _cache(tmp_path, edit), *needles)


def test_shard_sizes_must_be_what_the_json_says(tmp_path: Path) -> None:
    path = _cache(tmp_path, shard=bytes(30))
    with pytest.raises(errors.TruncatedFileError, match=r"params_shard_0.bin: is 30 bytes, but "
                                                        r"ndarray-cache.json says 32"):
        sparsemap.open(path)
    path = _cache(tmp_path, shard=bytes(40))
    with pytest.raises(errors.TrailingBytesError, match="8 bytes no record accounts for"):
        sparsemap.open(path)
    path.write_bytes(b"{records")
    raises(errors.MlcFormatError, path, "not UTF-8 JSON")
