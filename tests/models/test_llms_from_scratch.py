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

from ..conftest import ModuleFolders

ch04 = pytest.importorskip("llms_from_scratch.ch04", reason="llms-from-scratch is not installed "
                           "(the Makefile installs it with --no-deps)")

pytestmark = pytest.mark.slow  # a 702 MB checkpoint is written once for the module

# The book's GPT_CONFIG_124M (chapter 4).
GPT_CONFIG_124M = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
                   "drop_rate": 0.1, "qkv_bias": False}
IDS = torch.tensor([[6109, 3626, 6100, 345], [6109, 1110, 6622, 257]])  # the book's "Every effort moves you"


@pytest.fixture(scope="module")
def checkpoint(module_folders: ModuleFolders) -> Path:
    torch.manual_seed(123)
    model = ch04.GPTModel(GPT_CONFIG_124M)
    path = module_folders.make("gpt") / "model.pth"
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


def test_a_budget_streams_the_blocks_and_the_head_in_pieces(checkpoint: Path, recipe_outputs: torch.Tensor,
                                                            monkeypatch: pytest.MonkeyPatch):
    from sparsemap import pages
    from sparsemap.budget import Budget, kv_cache_nbytes, scratch_nbytes, units_of
    from sparsemap.memory import Snapshot

    given_back: list[tuple[str, int]] = []  # (unit, bytes), in order
    give_back = Budget._give_back
    monkeypatch.setattr(Budget, "_give_back", staticmethod(
        lambda name, r: (given_back.append((name, r.nbytes)), give_back(name, r))))

    model = sparsemap.load(lambda: ch04.GPTModel(GPT_CONFIG_124M), checkpoint).eval()
    units = units_of(model)
    blocks = [f"trf_blocks.{i}" for i in range(GPT_CONFIG_124M["n_layers"])]
    assert [u.name for u in units] == ["embedding", *blocks, "head"]  # its stack is an nn.Sequential
    head = units[-1]
    assert head.pieces == (model.out_head,) and head.least_nbytes < head.nbytes // 8
    snap = Snapshot.take()
    baseline, n = snap.anon + snap.file, IDS.shape[1]
    limit = baseline + kv_cache_nbytes(model, n) + scratch_nbytes(model, n) + 3 * units[1].nbytes
    assert limit - baseline < head.nbytes  # the head alone would not fit
    with Budget(model, limit=limit, baseline=baseline, max_tokens=n) as budget:
        assert set(budget.plan.streamed) == {*blocks, "head"} and budget.plan.in_pieces == {"head"}
        with torch.inference_mode():
            got = model(IDS)
        for unit in budget.units:
            if unit.name in budget.plan.streamed:
                assert not any(pages.present_in_process(r.start, r.nbytes).any() for r in unit.releasable), \
                    f"{unit.name} stayed in memory after it computed"
    assert torch.equal(got, recipe_outputs)
    assert "forward" not in model.out_head.__dict__  # its own forward again
    # The head was given back a piece at a time while it computed, not all at once after.
    head_pieces = [n for name, n in given_back if name == "head"][:-1]  # the last: the unit's own release
    assert len(head_pieces) >= head.nbytes // head.piece_nbytes - 1
    assert max(head_pieces) <= head.piece_nbytes + pages.PAGE_SIZE
