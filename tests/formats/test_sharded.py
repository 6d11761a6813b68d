"""sparsemap.formats.sharded: Hugging Face shard folders open as one catalog; bad indexes are refused.

A tiny LlamaForCausalLM is saved in several shards, as safetensors (by
``save_pretrained(max_shard_size=...)``) and as ``.bin`` (torch.save per shard,
with the index transformers 4.x wrote for ``safe_serialization=False``).
Faults are made by editing a copy of those folders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sparsemap
from sparsemap import errors

from ..conftest import ModuleFolders
from ..helpers import assert_bit_identical, raises

transformers = pytest.importorskip("transformers")

SHARD_SIZE = "20KB"  # the tiny model is ~90 KB of weights: several shards


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def st_folder(llama: torch.nn.Module, module_folders: ModuleFolders) -> Path:
    folder = module_folders.make("llama_st")
    llama.save_pretrained(folder, max_shard_size=SHARD_SIZE)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


@pytest.fixture(scope="module")
def bin_folder(llama: torch.nn.Module, module_folders: ModuleFolders) -> Path:
    folder = module_folders.make("llama_bin")
    llama.save_pretrained(folder, max_shard_size=SHARD_SIZE, safe_serialization=False)
    if not (folder / "pytorch_model.bin.index.json").is_file():
        # transformers >= 5 writes only safetensors; write the shards the way 4.x
        # did for safe_serialization=False: torch.save per shard plus an index.
        for f in folder.glob("model*.safetensors*"):
            f.unlink()
        from huggingface_hub import split_torch_state_dict_into_shards

        sd = llama.state_dict()
        split = split_torch_state_dict_into_shards(sd, filename_pattern="pytorch_model{suffix}.bin",
                                                   max_shard_size=SHARD_SIZE)
        for filename, names in split.filename_to_tensors.items():
            torch.save({n: sd[n].contiguous() for n in names}, folder / filename)
        index = {"metadata": {"total_size": sum(t.nbytes for t in sd.values())},
                 "weight_map": split.tensor_to_filename}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    return folder


def index_path(folder: Path) -> Path:
    (path,) = folder.glob("*.index.json")
    return path


def weight_map(folder: Path) -> dict[str, str]:
    return json.loads(index_path(folder).read_text())["weight_map"]


def write_weight_map(folder: Path, wm: dict[str, str]) -> None:
    path = index_path(folder)
    doc = json.loads(path.read_text())
    doc["weight_map"] = wm
    path.write_text(json.dumps(doc))


def shard_with_several_tensors(wm: dict[str, str], *, skip: str | None = None) -> tuple[str, str]:
    """``(shard, one of its tensors)`` for a shard holding more than one tensor.

    A shard the edited index no longer names is never opened, so faults are
    planted in shards that stay named.
    """
    counts: dict[str, list[str]] = {}
    for name, shard in wm.items():
        counts.setdefault(shard, []).append(name)
    shard = next(s for s in sorted(counts) if len(counts[s]) > 1 and s != skip)
    return shard, sorted(counts[shard])[0]


def copy_of(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / folder.name
    shutil.copytree(folder, dst)
    return dst








def load_shard(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, weights_only=True)


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("kind", ["st_folder", "bin_folder"])
@pytest.mark.parametrize("via", ["folder", "index"])
def test_sharded_round_trip(request: pytest.FixtureRequest, llama: torch.nn.Module, kind: str,
                            via: str) -> None:
    folder: Path = request.getfixturevalue(kind)
    wm = weight_map(folder)
    shards = sorted(set(wm.values()))
    assert len(shards) >= 3
    ckpt = sparsemap.Checkpoint(folder if via == "folder" else index_path(folder))
    assert ckpt.source == str(index_path(folder))
    fmt = "safetensors" if kind == "st_folder" else "torch-zip"
    assert ckpt.format == f"sharded-{fmt}"
    assert sorted(Path(f).name for f in ckpt.files) == shards

    expected = llama.state_dict()
    assert set(ckpt) == set(expected) == set(wm)
    for shard in shards:
        for name, ref in load_shard(folder / shard).items():
            assert ckpt.catalog[name].file == str(folder / shard)
            assert_bit_identical(ckpt.tensor(name), ref)
    for name, ref in expected.items():
        assert_bit_identical(ckpt.tensor(name), ref)


def test_sharded_safetensors_match_transformers_loader(st_folder: Path) -> None:
    loaded = transformers.LlamaForCausalLM.from_pretrained(st_folder).state_dict()
    ckpt = sparsemap.Checkpoint(st_folder)
    assert set(ckpt) == set(loaded)
    for name, ref in loaded.items():
        assert_bit_identical(ckpt.tensor(name), ref)


def test_one_mapping_per_shard(st_folder: Path) -> None:
    ckpt = sparsemap.Checkpoint(st_folder)
    for name in ckpt:
        ckpt.tensor(name)
    assert set(ckpt.mapped_ranges()) == set(ckpt.files)


# ---------------------------------------------------------------- faults

@pytest.mark.parametrize("kind", ["st_folder", "bin_folder"])
def test_missing_shard(request: pytest.FixtureRequest, tmp_path: Path, kind: str) -> None:
    folder = copy_of(request.getfixturevalue(kind), tmp_path)
    shard = sorted(set(weight_map(folder).values()))[1]
    (folder / shard).unlink()
    err = raises(errors.MissingShardError, index_path(folder), repr(shard), "missing")
    assert isinstance(err, errors.ShardIndexError) and isinstance(err, errors.SourceNotFoundError)
    # Through the folder too: the index is found, the shard is not.
    with pytest.raises(errors.MissingShardError):
        sparsemap.open(folder)


def test_tensor_in_two_shards(st_folder: Path, tmp_path: Path) -> None:
    folder = copy_of(st_folder, tmp_path)
    wm = weight_map(folder)
    order = list(dict.fromkeys(wm.values()))  # shards in the order the index names them
    first, last = order[0], order[-1]
    name = next(n for n, s in wm.items() if s == first)
    # Copy one tensor of the first shard into the last; the index still maps it to the first.
    extra = load_file(str(folder / last))
    extra[name] = load_file(str(folder / first))[name]
    save_file(extra, str(folder / last), metadata={"format": "pt"})
    raises(errors.DuplicateTensorError, index_path(folder), repr(name), repr(first), repr(last))


def test_index_maps_a_tensor_to_the_wrong_shard(st_folder: Path, tmp_path: Path) -> None:
    folder = copy_of(st_folder, tmp_path)
    wm = weight_map(folder)
    shard, name = shard_with_several_tensors(wm)
    other = next(s for s in sorted(set(wm.values())) if s != shard)
    wm[name] = other
    write_weight_map(folder, wm)
    raises(errors.ShardIndexError, index_path(folder), repr(name), repr(shard), repr(other))


def test_index_lists_a_tensor_in_no_shard(st_folder: Path, tmp_path: Path) -> None:
    folder = copy_of(st_folder, tmp_path)
    wm = weight_map(folder)
    wm["model.ghost.weight"] = sorted(set(wm.values()))[0]
    write_weight_map(folder, wm)
    raises(errors.ShardIndexError, index_path(folder), "1 tensors", "'model.ghost.weight'")


def test_shard_with_tensor_missing_from_index(st_folder: Path, tmp_path: Path) -> None:
    folder = copy_of(st_folder, tmp_path)
    wm = weight_map(folder)
    _, name = shard_with_several_tensors(wm)
    del wm[name]
    write_weight_map(folder, wm)
    raises(errors.ShardIndexError, index_path(folder), repr(name), "None")


@pytest.mark.parametrize("shard", ["../model-00001-of-00007.safetensors", "/etc/passwd", "sub/x.safetensors",
                                   "..", ".", ""])
def test_shard_name_outside_the_folder(st_folder: Path, tmp_path: Path, shard: str) -> None:
    folder = copy_of(st_folder, tmp_path)
    wm = weight_map(folder)
    name = sorted(wm)[0]
    wm[name] = shard
    write_weight_map(folder, wm)
    raises(errors.ShardIndexError, index_path(folder), repr(shard), repr(name))


@pytest.mark.parametrize("text", [b"{not json", b"\xff\xfe", b"", b"[]", b'{"weight_map": []}',
                                  b'{"weight_map": {"a": 1}}', b'{"metadata": {}}'])
def test_index_not_a_valid_index(tmp_path: Path, text: bytes) -> None:
    path = tmp_path / "model.safetensors.index.json"
    path.write_bytes(text)
    raises(errors.ShardIndexError, path)


def test_broken_shard_error_names_the_shard(st_folder: Path, tmp_path: Path) -> None:
    folder = copy_of(st_folder, tmp_path)
    shard = sorted(set(weight_map(folder).values()))[0]
    data = (folder / shard).read_bytes()
    (folder / shard).write_bytes(data[:-3])
    with pytest.raises(errors.TruncatedFileError) as info:
        sparsemap.open(folder)
    assert str(folder / shard) in str(info.value)
