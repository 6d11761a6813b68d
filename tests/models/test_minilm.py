"""The real all-MiniLM-L6-v2 through sparsemap equals sentence-transformers' own loading."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sparsemap.models import minilm


@pytest.mark.model
def test_embeddings_equal_sentence_transformers(minilm_folder):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    model = minilm.build_model(minilm_folder)
    ours = minilm.mean_pooled(model, AutoTokenizer.from_pretrained(minilm_folder), minilm.SENTENCES)
    reference = SentenceTransformer(str(minilm_folder), device="cpu").encode(
        minilm.SENTENCES, convert_to_tensor=True, normalize_embeddings=True)
    assert ours.shape == (len(minilm.SENTENCES), 384)
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0)


@pytest.mark.model
@pytest.mark.slow
def test_demo_command_runs_end_to_end(minilm_folder):
    proc = subprocess.run([sys.executable, "-m", "sparsemap.cli", "demo", "--model", "minilm"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "(match" in proc.stdout and "anonymous MiB added" in proc.stdout
