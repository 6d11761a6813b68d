"""Sentence embeddings from encoder folders, pooled as their sentence-transformers config says."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsemap.errors import BadInputError
from sparsemap.models.embed import Embedder, Pipeline, pool

TEXTS = ["sparsemap maps weights.", "A cat sat on the mat.", "Quarterly revenue rose by four percent."]


@pytest.mark.model
def test_embeddings_equal_sentence_transformers(minilm_folder: Path) -> None:
    from sentence_transformers import SentenceTransformer

    ours = Embedder(minilm_folder)(TEXTS)
    want = SentenceTransformer(str(minilm_folder), device="cpu").encode(TEXTS, convert_to_tensor=True)
    assert ours.shape == want.shape == (3, 384)
    assert torch.allclose(ours, want, atol=1e-5)


@pytest.mark.model
def test_the_folders_pooling_is_followed(minilm_folder: Path, tmp_path: Path) -> None:
    """CLS pooling without normalisation, written into a copy's config: sentence-transformers agrees."""
    from sentence_transformers import SentenceTransformer

    folder = tmp_path / "cls"
    shutil.copytree(minilm_folder, folder)
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True, pooling_mode_max_tokens=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    modules = [m for m in json.loads((folder / "modules.json").read_text()) if m["path"] != "2_Normalize"]
    (folder / "modules.json").write_text(json.dumps(modules))
    assert Pipeline.of(folder).modes == ("cls_token", "max_tokens") and not Pipeline.of(folder).normalize
    ours = Embedder(folder)(TEXTS)
    want = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_tensor=True)
    assert ours.shape == (3, 768) and torch.allclose(ours, want, atol=1e-4)


def test_pooling_modes_on_known_states() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3 tokens, 2); the last is padding
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, ("mean_tokens",)).tolist() == [[2.0, 3.0]]
    assert pool(hidden, mask, ("cls_token", "max_tokens")).tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert pool(hidden, mask, ("lasttoken",)).tolist() == [[3.0, 4.0]]


def test_a_module_sparsemap_does_not_run_is_refused(tmp_path: Path) -> None:
    (tmp_path / "modules.json").write_text(json.dumps([{"idx": 0, "path": "2_Dense",
                                                        "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(BadInputError, match="module 'Dense' is not one sparsemap runs"):
        Pipeline.of(tmp_path)


@pytest.mark.model
def test_embed_command_and_run_on_an_encoder(minilm_folder: Path) -> None:
    cmd = [sys.executable, "-m", "sparsemap.cli", "embed", str(minilm_folder), *TEXTS, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["dim"] == 384 and len(doc["vectors"]) == 3 and doc["normalized"]
    proc = subprocess.run([sys.executable, "-m", "sparsemap.cli", "run", str(minilm_folder), "hi"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "is an encoder (BertModel)" in proc.stderr and "sparsemap embed" in proc.stderr


def test_last_token_pooling_finds_the_last_kept_token_on_either_side() -> None:
    hidden = torch.arange(12.0).view(2, 3, 2)  # (2 texts, 3 tokens, 2)
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert pool(hidden, right, ("lasttoken",)).tolist() == [[2.0, 3.0], [10.0, 11.0]]
    assert pool(hidden, left, ("lasttoken",)).tolist() == [[4.0, 5.0], [10.0, 11.0]]


@pytest.mark.parametrize(("files", "needle"), [
    ({"modules.json": "[1, 2]"}, "must be a list of objects"),
    ({"modules.json": '[{"path": "1_Pooling", "type": "x.Pooling"}]'}, "not readable JSON"),
    ({"modules.json": "{oops"}, "not readable JSON"),
])
def test_a_broken_sentence_transformers_folder_is_refused_by_path(tmp_path: Path, files: dict,
                                                                  needle: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(BadInputError, match=needle):
        Pipeline.of(tmp_path)
