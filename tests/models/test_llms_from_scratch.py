"""LLMs-from-scratch's GPTModel (PyPI ``llms-from-scratch``), saved as its book saves it, loaded by sparsemap.

The book saves ``torch.save(model.state_dict(), "model.pth")`` and recommends loading it by building the
model under ``torch.device("meta")``, then ``load_state_dict(torch.load(path, mmap=True, weights_only=True),
assign=True)``. ``sparsemap.load`` must give the same model (the same outputs, bit for bit) from the same
file, every weight and the causal masks as views of the file. The 124M configuration, random weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sparsemap
from sparsemap.mapped import mapping_of

ch04 = pytest.importorskip("llms_from_scratch.ch04", reason="llms-from-scratch is not installed "
                           "(the Makefile installs it with --no-deps)")

pytestmark = pytest.mark.slow  # a 702 MB checkpoint is written once for the module

# The book's GPT_CONFIG_124M (chapter 4).
GPT_CONFIG_124M = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
                   "drop_rate": 0.1, "qkv_bias": False}
IDS = torch.tensor([[6109, 3626, 6100, 345], [6109, 1110, 6622, 257]])  # the book's "Every effort moves you"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(123)
    model = ch04.GPTModel(GPT_CONFIG_124M)
    path = tmp_path_factory.mktemp("gpt") / "model.pth"
    torch.save(model.state_dict(), path)  # as the book saves it
    return path


@pytest.fixture(scope="module")
def recipe_outputs(checkpoint: Path) -> torch.Tensor:
    """The book's recommended loading: meta device, torch.load(mmap=True, weights_only=True), assign=True."""
    with torch.device("meta"):
        model = ch04.GPTModel(GPT_CONFIG_124M)
    model.load_state_dict(torch.load(checkpoint, mmap=True, weights_only=True), assign=True)
    with torch.inference_mode():
        return model.eval()(IDS)


def test_a_model_built_on_meta_loads_as_views_and_computes_what_the_recipe_loads(
        checkpoint: Path, recipe_outputs: torch.Tensor):
    with torch.device("meta"):  # as the book builds it
        model = ch04.GPTModel(GPT_CONFIG_124M)
    sparsemap.load(model, checkpoint)
    with torch.inference_mode():
        assert torch.equal(model.eval()(IDS), recipe_outputs)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:  # the masks are saved buffers
        assert mapping_of(t, name).path == str(checkpoint), name


def test_a_model_class_is_built_under_skeleton_and_loaded(checkpoint: Path, recipe_outputs: torch.Tensor):
    model = sparsemap.load(lambda: ch04.GPTModel(GPT_CONFIG_124M), checkpoint).eval()
    with torch.inference_mode():
        assert torch.equal(model(IDS), recipe_outputs)
    assert all(mapping_of(p, n) for n, p in model.named_parameters())
