"""sparsemap.convert and ``sparsemap convert``: every source format in, an aligned safetensors file out.

Each converted file must load, under the source's names, bit-identical to
what the source's own library reads; memory must stay bounded; a replaced
destination must never be seen half-written.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sparsemap
from sparsemap.cli import main
from sparsemap.converter import ConvertSummary, convert
from sparsemap.formats.layout import PAD_PREFIX
from sparsemap.memory import AnonSampler, MiB
from sparsemap.writer import Layout

from .conftest import tiny_llama_config
from .helpers import random_tensor


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    dense = torch.empty(t.shape, dtype=t.dtype)
    dense.copy_(t)
    return dense.reshape(-1).view(torch.uint8)


def assert_converted(dst: Path, want: dict[str, torch.Tensor]) -> sparsemap.Catalog:
    """``dst`` opens with exactly ``want``'s names, each bit-identical, every tensor of whole pages on a
    page; a file of plain tensors holds no filler, so other readers list exactly the tensors stored."""
    ckpt = sparsemap.Checkpoint(dst)
    assert set(ckpt) == set(want)
    for name, t in want.items():
        got = ckpt.tensor(name)
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(as_bytes(got), as_bytes(t)), name
    for name in ckpt:
        e = ckpt.catalog[name]
        if e.nbytes and e.nbytes % 4096 == 0 and e.strides is None:
            assert e.offset % 4096 == 0, name
    with safe_open(dst, framework="pt") as f:
        stored, metadata = f.keys(), f.metadata()
    if metadata.get("format") != "sparsemap":
        assert not [k for k in stored if k.startswith("__sparsemap")]
    return ckpt


def assert_summary(summary: ConvertSummary, dst: Path, n_tensors: int) -> None:
    assert summary.tensors == n_tensors
    assert summary.destination == os.fspath(dst)
    assert summary.file_nbytes == dst.stat().st_size
    # Padding is everything that is not the 8-byte length, the JSON header or tensor data.
    with open(dst, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header_text = f.read(n)
    header = json.loads(header_text)
    data = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
               if k != "__metadata__" and not k.startswith(PAD_PREFIX))
    assert summary.padding_nbytes == summary.file_nbytes - 8 - len(header_text.rstrip(b" ")) - data
    assert summary.padding_percent == pytest.approx(100 * summary.padding_nbytes / summary.file_nbytes)
    assert 0 <= summary.padding_percent < 100
    assert summary.seconds > 0 and summary.mb_per_s > 0
    assert summary.mb_per_s == pytest.approx(summary.file_nbytes / 1e6 / summary.seconds)
    text = str(summary)
    assert f"{n_tensors} tensors" in text and os.fspath(dst) in text and "MB/s" in text


# ---------------------------------------------------------------- each source format

def test_convert_safetensors(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    src = tmp_path / "src.safetensors"
    tensors = {"embed.weight": random_tensor(torch.bfloat16, (100, 24), g), "norm": torch.ones(24),
               "ids": torch.arange(7), "flag": torch.tensor([True, False]), "scalar": torch.tensor(3.5)}
    save_file(tensors, str(src), metadata={"format": "pt", "note": "kept"})
    dst = tmp_path / "dst.safetensors"
    summary = convert(src, dst)
    cat = assert_converted(dst, load_file(str(src)))
    assert_summary(summary, dst, len(tensors))
    assert summary.source == str(src)
    assert cat.catalog.metadata["note"] == "kept"  # the source's own metadata strings travel


def test_convert_torch_pt_with_views_and_ties(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(16, 12, generator=g)
    state = {"w": base, "w_t": base.t(), "w_alias": base, "rows": base[4:9],
             "h": torch.randn(5, generator=g).half()}
    src = tmp_path / "model.pt"
    torch.save(state, src)
    dst = tmp_path / "model.safetensors"
    summary = convert(src, dst)
    want = torch.load(src, weights_only=True)
    assert_converted(dst, want)
    assert_summary(summary, dst, len(state))
    # The alias is the same bytes seen the same way: stored once.
    assert sparsemap.open(dst)["w_alias"].offset == sparsemap.open(dst)["w"].offset
    assert sparsemap.open(dst).metadata["sparsemap.source_format"] != "safetensors"


def test_convert_sharded_folder(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="20KB")
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 2 and (folder / "model.safetensors.index.json").exists()
    want: dict[str, torch.Tensor] = {}
    for shard in shards:
        want.update(load_file(str(shard)))
    dst = tmp_path / "one.safetensors"
    summary = convert(folder, dst, layout=Layout(pad_rows=("*embed_tokens*",), transpose=("*down_proj*",)))
    cat = assert_converted(dst, want)
    assert_summary(summary, dst, len(want))
    assert cat.catalog["model.embed_tokens.weight"].offset % 4096 == 0
    # And the model still computes the same thing from the converted file.
    ids = torch.tensor([[1, 5, 9, 3]])
    loaded = sparsemap.load(lambda: LlamaForCausalLM(tiny_llama_config()), dst)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)


def test_convert_gguf_dequantizes(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(2)
    weights = rng.standard_normal((8, 64)).astype(np.float32)
    src = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(src), "llama")
    writer.add_tensor("plain", weights)
    writer.add_tensor("half", weights.astype(np.float16))
    writer.add_tensor("q8", quantize(weights, Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    dst = tmp_path / "model.safetensors"
    summary = convert(src, dst)
    reader = gguf.GGUFReader(str(src))
    (q8,) = [t for t in reader.tensors if t.name == "q8"]
    want = {"plain": torch.from_numpy(weights), "half": torch.from_numpy(weights.astype(np.float16)),
            "q8": torch.from_numpy(dequantize(q8.data, Q.Q8_0).reshape(8, 64).astype(np.float32))}
    assert not torch.equal(want["q8"], want["plain"])  # quantization is lossy: this checks the decoder
    cat = assert_converted(dst, want)
    assert_summary(summary, dst, 3)
    # q8 is a plain tensor now: mappable
    assert cat.catalog["q8"].encoding is None and cat.catalog["q8"].dtype == "F32"
    assert cat.catalog.metadata["sparsemap.source_format"] == "gguf"


def test_convert_with_a_dtype_cast_and_bundles(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    tensors = {"l.mlp.gate_proj.weight": torch.randn(32, 8, generator=g),
               "l.mlp.up_proj.weight": torch.randn(32, 8, generator=g),
               "l.mlp.down_proj.weight": torch.randn(8, 32, generator=g), "pos": torch.arange(4)}
    src, dst = tmp_path / "src.safetensors", tmp_path / "dst.safetensors"
    save_file(tensors, str(src))
    convert(src, dst, layout=Layout(dtype=torch.bfloat16, bundle_ffn=True))
    assert_converted(dst, {n: (t.bfloat16() if t.is_floating_point() else t) for n, t in tensors.items()})
    assert "l.mlp@bundle" in load_file(str(dst))


# ---------------------------------------------------------------- reading the source (never mapped)

def _layouts_source(path: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    tensors = {"l.mlp.gate_proj.weight": torch.randn(40, 12, generator=g),
               "l.mlp.up_proj.weight": torch.randn(40, 12, generator=g),
               "l.mlp.down_proj.weight": torch.randn(12, 40, generator=g),
               "emb": torch.randn(50, 7, generator=g).bfloat16(), "head": torch.randn(9, 33, generator=g),
               "counts": torch.arange(11), "odd": torch.randn(3, 5, generator=g).half()}
    save_file(tensors, str(path))  # offsets as safetensors packs them: not aligned to anything
    return tensors


LAYOUTS = [
    Layout(),
    Layout(dtype=torch.float16),
    Layout(pad_rows=("emb", "head"), transpose=("head",)),
    Layout(bundle_ffn=True, pad_rows="emb",
           reorder={"emb": [i % 7 for i in range(50)], "counts": list(range(11)),
                    "l.mlp.down_proj.weight": [(5 * i) % 3 for i in range(40)]}),
    Layout(dtype="bfloat16", transpose=("*proj.weight", "emb", "odd"), reorder={"odd": [0, 2, 1, 4, 3]}),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["plain", "cast", "rows-transposed", "bundle-reordered",
                                                  "cast-transposed-reordered"])
@pytest.mark.parametrize("in_kernel", [True, False], ids=["copy_file_range", "pread"])
def test_every_layout_is_read_from_the_source_bit_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            layout: Layout, in_kernel: bool) -> None:
    if not in_kernel:  # a kernel or file system that refuses copy_file_range: the pread fallback
        def refuse(*_: object) -> int:
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    src, dst = tmp_path / "src.safetensors", tmp_path / "dst.safetensors"
    again = tmp_path / "again.safetensors"
    tensors = _layouts_source(src)
    convert(src, dst, layout=layout)
    want = {n: t.to(torch.float16 if layout.dtype == "F16" else torch.bfloat16)
            if layout.dtype and t.is_floating_point() else t for n, t in tensors.items()}
    assert_converted(dst, want)
    # A laid-out file of ours as the source: strided, reordered views, read whole with pread.
    convert(dst, again)
    assert_converted(again, want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.safetensors", "dst.safetensors",
                                                          "src.safetensors"]


# ---------------------------------------------------------------- bounded memory

def _write_big_safetensors(path: Path, n_tensors: int, tensor_nbytes: int) -> dict[str, int]:
    """A plain safetensors file of random F32 tensors, written a tensor at a time; returns name -> nbytes."""
    rng = np.random.default_rng(4)
    n_cols = 4096
    n_rows = tensor_nbytes // (4 * n_cols)
    header, offset = {}, 0
    for i in range(n_tensors):
        rows = n_rows + i  # sizes differ a little: nothing lands on a page by luck
        nbytes = rows * n_cols * 4
        header[f"layer.{i}.weight"] = {"dtype": "F32", "shape": [rows, n_cols],
                                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8 + 4)  # data starts 4 bytes past an 8-aligned spot: not on a page
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.writelines(rng.bytes(v["data_offsets"][1] - v["data_offsets"][0]) for v in header.values())
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}


@pytest.mark.slow
def test_convert_keeps_anonymous_memory_bounded(tmp_path: Path) -> None:
    src, dst = tmp_path / "big.safetensors", tmp_path / "big-aligned.safetensors"
    sizes = _write_big_safetensors(src, 8, 50 * MiB)
    assert sum(sizes.values()) > 400 * MiB
    try:
        with AnonSampler() as sampler:
            start = sampler.sample()
            summary = convert(src, dst)
        growth = sampler.peak - start
        limit = max(sizes.values()) + 64 * MiB
        assert growth < limit, f"peak anonymous growth {growth / MiB:.0f} MiB, limit {limit / MiB:.0f} MiB"
        assert summary.tensors == 8 and summary.file_nbytes == dst.stat().st_size
        a, b = sparsemap.Checkpoint(src), sparsemap.Checkpoint(dst)
        for name in sizes:
            assert b.catalog[name].offset % 4096 == 0
            assert torch.equal(a.tensor(name).view(torch.int32), b.tensor(name).view(torch.int32)), name
    finally:
        for p in (src, dst):
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------- replacing a destination

def test_existing_destination_is_replaced_atomically(tmp_path: Path) -> None:
    dst = tmp_path / "model.safetensors"
    old_values, new_values = torch.full((64, 64), 1.0), torch.full((64, 64), 2.0)
    sparsemap.save({"w": old_values}, dst)
    held = sparsemap.Checkpoint(dst).tensor("w")  # a reader that has the old file mapped
    assert torch.equal(held, old_values)
    src = tmp_path / "new.safetensors"
    save_file({"w": new_values}, str(src))
    convert(src, dst)
    assert torch.equal(held, old_values)  # still the old inode's bytes
    assert torch.equal(sparsemap.Checkpoint(dst).tensor("w"), new_values)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "new.safetensors"]


def test_a_failed_convert_leaves_the_destination(tmp_path: Path) -> None:
    dst = tmp_path / "model.safetensors"
    dst.write_bytes(b"precious")
    src = tmp_path / "src.safetensors"
    save_file({"cube": torch.zeros(2, 3, 4)}, str(src))
    with pytest.raises(sparsemap.errors.BadInputError):
        convert(src, dst, layout=Layout(transpose=("cube",)))  # 3-D: cannot be transposed
    assert dst.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "src.safetensors"]


# ---------------------------------------------------------------- the command line

def test_cli_convert_prints_the_summary(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.safetensors", tmp_path / "dst.safetensors"
    save_file({"emb": torch.randn(40, 24), "b": torch.zeros(3)}, str(src))
    result = CliRunner().invoke(main, ["convert", str(src), str(dst), "--pad-rows", "emb", "--align", "16K"])
    assert result.exit_code == 0, result.output
    assert f"wrote {dst}: 2 tensors" in result.output and "MB/s" in result.output
    cat = assert_converted(dst, load_file(str(src)))
    assert cat.catalog["emb"].offset % (16 << 10) == 0 and cat.catalog["emb"].strides == (32, 1)
    with safe_open(str(dst), framework="pt") as f:
        assert "emb@rows" in set(f.keys())


@pytest.mark.parametrize("args", [
    ["convert", "{tmp}/missing.safetensors", "{tmp}/out.safetensors"],
    ["convert", "{src}", "{tmp}/out.safetensors", "--align", "3000"],
    ["convert", "{src}", "{tmp}/out.safetensors", "--align", "lots"],
], ids=["missing-source", "align-not-power-of-two", "align-not-a-size"])
def test_cli_convert_bad_input_exits_2(tmp_path: Path, args: list[str]) -> None:
    src = tmp_path / "src.safetensors"
    save_file({"a": torch.ones(2)}, str(src))
    argv = [a.format(tmp=tmp_path, src=src) for a in args]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_convert_missing_source_says_so(tmp_path: Path) -> None:
    missing, out = tmp_path / "nope.gguf", tmp_path / "out.safetensors"
    result = CliRunner().invoke(main, ["convert", str(missing), str(out)])
    assert result.exit_code == 2
    assert "sparsemap: error:" in result.output and "nope.gguf" in result.output
    assert "Traceback" not in result.output


def test_a_file_of_other_shapes_is_never_taken_for_the_model_by_another_loader(tmp_path: Path) -> None:
    """Transposed (or padded, bundled, quantized) tensors: refused under a name Hugging Face loaders read,
    written as model.sparsemap.safetensors (found by sparsemap in a folder), and its format metadata makes
    accelerate refuse it instead of loading it wrong."""
    from accelerate.utils.modeling import load_state_dict as accelerate_load

    from sparsemap.errors import DestinationError

    src = tmp_path / "src.safetensors"
    w = torch.arange(12.0).reshape(3, 4)
    save_file({"w": w, "b": torch.ones(3)}, src)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(DestinationError, match=r"transpose.*model\.sparsemap\.safetensors"):
        convert(src, folder / "model.safetensors", layout=Layout(transpose="w"))
    assert not list(folder.iterdir())
    convert(src, folder / "model.sparsemap.safetensors", layout=Layout(transpose="w"))
    assert sparsemap.open(folder).source.endswith("model.sparsemap.safetensors")
    assert torch.equal(sparsemap.Checkpoint(folder).tensor("w"), w)
    with pytest.raises(OSError, match="valid metadata"):
        accelerate_load(str(folder / "model.sparsemap.safetensors"), device_map={"": "cpu"})
    convert(src, folder / "model.safetensors")  # a plain layout keeps Hugging Face's name
    assert accelerate_load(str(folder / "model.safetensors"), device_map={"": "cpu"}).keys() == {"w", "b"}
