"""A valid file of each format cut at every byte offset (up to 4 KiB, then 1,000 random ones) never
gives a crash or a partial result: a clean sparsemap error, or (cuts that only drop trailing padding)
every tensor complete and bit-identical."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
import torch

import sparsemap
from sparsemap.errors import BadInputError

from ..conftest import ModuleFolders
from .corpus import valid_files

EVERY_OFFSET_UP_TO = 4096
RANDOM_BEYOND = 1000


@pytest.fixture(scope="module")
def seeds(module_folders: ModuleFolders) -> dict[str, Path]:
    return valid_files(module_folders.make("seeds"))


def offsets(size: int, rng: random.Random) -> list[int]:
    head = list(range(min(size, EVERY_OFFSET_UP_TO + 1)))
    tail = range(EVERY_OFFSET_UP_TO + 1, size)
    return head + (sorted(rng.sample(tail, min(RANDOM_BEYOND, len(tail)))) if len(tail) else [])


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    ckpt = sparsemap.Checkpoint(path)
    return {name: ckpt.tensor(name).clone() for name in ckpt}


def sweep(original: Path, target: Path, opened: Path, expected: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Cut ``original`` into ``target`` at every offset and open ``opened``; returns (cuts, complete)."""
    content = original.read_bytes()
    cuts = offsets(len(content), random.Random(len(content)))
    complete = 0
    for n in cuts:
        target.write_bytes(content[:n])
        try:
            ckpt = sparsemap.Checkpoint(opened)
        except BadInputError as e:
            assert e.path, f"cut at {n}: error names no file: {e}"
            continue
        # Opened: only acceptable if nothing was lost.
        assert set(ckpt) == set(expected), f"cut at {n} of {len(content)} opened with missing tensors"
        for name, want in expected.items():
            assert torch.equal(ckpt.tensor(name).view(torch.uint8), want.view(torch.uint8)), (n, name)
        complete += 1
    target.write_bytes(content)
    return len(cuts), complete


@pytest.mark.parametrize("fmt", ["safetensors", "pytorch zip", "layout", "gguf", "safetensors 64K",
                                 "pytorch zip 64K", "gguf Q8_0", "llama2c v0", "llama2c v1", "llama2c v2"])
def test_truncated_file(fmt: str, seeds: dict[str, Path], tmp_path: Path) -> None:
    original = seeds[fmt]
    expected = tensors_of(original)
    target = tmp_path / original.name
    cuts, complete = sweep(original, target, target, expected)
    assert cuts >= min(os.path.getsize(original), EVERY_OFFSET_UP_TO)
    print(f"{fmt}: {cuts} cuts of a {os.path.getsize(original)}-byte file, {complete} complete")


@pytest.mark.parametrize("member", ["model.safetensors.index.json", "model-00002-of-00002.safetensors"])
def test_truncated_shard_folder(member: str, seeds: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "sharded"
    shutil.copytree(seeds["shard index"].parent, folder)
    index = folder / "model.safetensors.index.json"
    expected = tensors_of(index)
    cuts, _ = sweep(seeds["shard index"].parent / member, folder / member, index, expected)
    assert cuts > 50


@pytest.mark.parametrize("member", ["ndarray-cache.json", "params_shard_0.bin", "params_shard_1.bin"])
def test_truncated_mlc_cache(member: str, seeds: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "mlc"
    shutil.copytree(seeds["mlc"].parent, folder)
    cache = folder / "ndarray-cache.json"
    expected = tensors_of(cache)
    cuts, complete = sweep(seeds["mlc"].parent / member, folder / member, cache, expected)
    assert cuts > 40
    assert complete == 0  # a shard must be exactly its listed size, and the JSON ends with its last "}"


@pytest.mark.parametrize("member", ["params.json", "consolidated.00.pth"])
def test_truncated_meta_release(member: str, tmp_path: Path) -> None:
    from .corpus import meta_release

    seed = meta_release(tmp_path / "seed")
    folder = tmp_path / "llama"
    shutil.copytree(seed, folder)
    expected = tensors_of(folder)
    cuts, complete = sweep(seed / member, folder / member, folder, expected)
    assert cuts > 40
    assert complete == 0  # params.json ends with its last "}", a zip with its end-of-directory record
