"""all-MiniLM-L6-v2 computes exactly the same from every converted layout as from its source file."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

from sparsemap.converter import convert
from sparsemap.writer import Layout

random.seed(0)
PROFILE = {"embeddings.word_embeddings.weight": tuple(random.random() for _ in range(30522)),
           "encoder.layer.0.intermediate.dense.weight": tuple(random.random() for _ in range(1536))}
LAYOUTS = {
    "aligned": Layout(),
    "align 64K": Layout(align=64 << 10),
    "pad rows (all)": Layout(pad_rows=("*",)),
    "transpose": Layout(transpose=("*.output.dense.weight", "*.query.weight")),
    "bundle ffn": Layout(bundle_ffn=True),
    "reorder": Layout(reorder=PROFILE),
    "everything": Layout(pad_rows=("*word_embeddings*",), bundle_ffn=True, transpose=("*.key.weight",),
                         reorder=PROFILE),
}


@pytest.fixture(scope="module")
def reference(minilm_folder):
    from transformers import AutoTokenizer

    from sparsemap.models import minilm

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder)
    return tokenizer, minilm.mean_pooled(minilm.build_model(minilm_folder), tokenizer, minilm.SENTENCES)


@pytest.mark.model
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_converted_layout_gives_identical_embeddings(minilm_folder, reference, tmp_path: Path, layout_name):
    from sparsemap.models import minilm

    folder = tmp_path / "model"
    folder.mkdir()
    for f in minilm_folder.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, folder)
    summary = convert(minilm_folder, folder / "model.sparsemap.safetensors", layout=LAYOUTS[layout_name])
    assert summary.tensors == 104
    tokenizer, expected = reference
    got = minilm.mean_pooled(minilm.build_model(folder), tokenizer, minilm.SENTENCES)
    assert torch.equal(got, expected)


@pytest.mark.model
def test_a_reshaped_folder_is_refused_by_transformers_and_sentence_transformers(minilm_folder,
                                                                              tmp_path: Path) -> None:
    """A layout that changes stored shapes, written as sparsemap names it in a folder: transformers and
    sentence-transformers refuse the folder (no weights they know) instead of initialising the tensors
    they cannot find at random; sparsemap loads it."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from sparsemap.models import minilm

    folder = tmp_path / "model"
    shutil.copytree(minilm_folder, folder, ignore=shutil.ignore_patterns("model.safetensors", "*.bin"))
    convert(minilm_folder, folder / "model.sparsemap.safetensors", layout=LAYOUTS["transpose"])
    with pytest.raises(OSError, match=r"model\.safetensors"):
        AutoModel.from_pretrained(folder)
    with pytest.raises(OSError):
        SentenceTransformer(str(folder), device="cpu")
    assert minilm.build_model(folder) is not None
