"""sparsemap.budget: the plan (what stays resident, what streams) and the hooks that make it hold.

A small Llama written by transformers is converted to an aligned file and
loaded into the lean runtime; budgets are chosen around its real unit sizes
and the runtime's real baseline. What streams must be released after use
(not present in the process, per pagemap), what is resident must stay, and
the tokens must not change.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsemap import pages
from sparsemap.budget import (
    SCRATCH_NBYTES,
    Budget,
    check_room,
    kv_cache_nbytes,
    plan,
    scratch_nbytes,
    units_of,
)
from sparsemap.converter import convert
from sparsemap.errors import BudgetError
from sparsemap.formats.planner import Layout
from sparsemap.memory import Snapshot
from sparsemap.models import llama

from .conftest import ModuleFolders, tiny_llama_config

IDS = [3, 14, 15, 92, 65, 35]


@pytest.fixture(scope="module")
def raw_folder(module_folders: ModuleFolders) -> Path:
    """A Llama of 4 layers (about 4 MiB each in float32) as transformers writes it: tensors packed
    back to back, so neighbouring layers share a page."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    raw = module_folders.make("raw")
    LlamaForCausalLM(config).save_pretrained(raw)
    return raw


@pytest.fixture(scope="module")
def folder(raw_folder: Path, module_folders: ModuleFolders) -> Path:
    """The same model with every tensor on its own pages (sparsemap convert --fillers)."""
    raw = raw_folder
    out = module_folders.make("aligned")
    convert(raw / "model.safetensors", out / "model.safetensors", layout=Layout(fillers=True))
    (out / "config.json").write_text((raw / "config.json").read_text())
    return out


def _model(folder: Path) -> llama.Llama:
    model = llama.load(folder)
    model.shape = dataclasses.replace(model.shape, eos_token_ids=())  # random weights: all tokens
    return model


def _present(unit) -> int:
    return sum(int(pages.present_in_process(r.start, r.nbytes).sum()) for r in unit.ranges)


def test_units_are_the_embedding_each_layer_and_the_head(folder: Path) -> None:
    units = units_of(_model(folder))
    assert [u.name for u in units] == ["embedding", "model.layers.0", "model.layers.1", "model.layers.2",
                                       "model.layers.3", "head"]
    assert units[0].gathered and not any(u.gathered for u in units[1:])
    # q, o (256 x 256), k, v (128 x 256), gate, up, down (1024 x 256), two norms: float32, each tensor
    # starting on a page, so the layer's pages hold at most one partial page per tensor more.
    params = 2 * 256 * 256 + 2 * 128 * 256 + 3 * 1024 * 256 + 2 * 256
    assert 4 * params <= units[1].nbytes <= 4 * params + 9 * pages.PAGE_SIZE
    assert units[-1].nbytes >= 512 * 256 * 4  # the output projection (untied)


def test_a_limit_that_holds_everything_streams_nothing(folder: Path) -> None:
    units = units_of(_model(folder))
    p = plan(units, limit=1 << 30, baseline=200 << 20, kv_cache=1 << 20)
    assert not p.streamed and p.streamed_nbytes == 0
    assert p.planned_nbytes <= p.limit
    assert "nothing is read again per token" in str(p)


def test_a_tight_limit_streams_the_smallest_units_and_keeps_inside(folder: Path) -> None:
    units = units_of(_model(folder))
    layer = units[1].nbytes
    baseline, kv = 200 << 20, 1 << 20
    limit = baseline + kv + SCRATCH_NBYTES + 4 * layer  # room for two resident and two in flight
    p = plan(units, limit=limit, baseline=baseline, kv_cache=kv)
    assert p.streamed and p.planned_nbytes <= limit
    resident = [u.nbytes for u in units if u.name not in p.streamed and not u.gathered]
    streamed = [u.nbytes for u in units if u.name in p.streamed]
    assert min(resident) >= max(streamed)  # largest kept: small units in flight leave the most room
    assert p.streamed_nbytes == sum(u.nbytes for u in units if u.name in p.streamed)
    assert "read from disk per token" in str(p)


def test_a_limit_below_the_baseline_is_refused_with_the_numbers() -> None:
    with pytest.raises(BudgetError, match=r"runtime needs before any weight: 300 MiB measured"):
        check_room(200 << 20, 300 << 20)


def test_units_stream_whole_where_they_fit_and_a_head_in_pieces_where_it_does_not() -> None:
    from sparsemap.budget import Range, Unit

    mib = 1 << 20
    layers = [Unit(f"layers.{i}", (), (Range(None, 0, 10 * mib),)) for i in range(4)]  # type: ignore[arg-type]
    head = Unit("head", (), (Range(None, 0, 100 * mib),), pieces=(torch.nn.Linear(1, 1),),  # type: ignore[arg-type]
                lead=(Range(None, 0, 5 * mib),), piece_nbytes=4 * mib)  # type: ignore[arg-type]
    units, fixed = [*layers, head], (100 << 20) + SCRATCH_NBYTES

    kept = plan(units, limit=fixed + 125 * mib, baseline=100 << 20, kv_cache=0)
    assert kept.streamed == {"layers.0", "layers.1", "layers.2", "layers.3"} and not kept.in_pieces
    whole = plan(units, limit=fixed + 115 * mib, baseline=100 << 20, kv_cache=0)  # the head in flight, whole
    assert whole.streamed == {u.name for u in units} and not whole.in_pieces
    pieced = plan(units, limit=fixed + 25 * mib, baseline=100 << 20, kv_cache=0)  # the head alone is 100
    assert pieced.streamed == {u.name for u in units} and pieced.in_pieces == {"head"}
    assert head.least_nbytes < 10 * mib and pieced.in_flight_nbytes == 20 * mib  # two layers, not the head
    assert pieced.planned_nbytes <= pieced.limit
    assert "1 in pieces of rows" in str(pieced)
    with pytest.raises(BudgetError, match="in pieces"):
        plan(units, limit=fixed + 15 * mib, baseline=100 << 20, kv_cache=0)


def test_a_limit_too_small_to_stream_is_refused(folder: Path) -> None:
    units = units_of(_model(folder))
    with pytest.raises(BudgetError, match="two units in flight"):
        plan(units, limit=(200 << 20) + SCRATCH_NBYTES + units[1].nbytes, baseline=200 << 20, kv_cache=0)


def test_streamed_units_are_released_resident_ones_stay_and_tokens_do_not_change(folder: Path) -> None:
    expected = _model(folder).generate(IDS, 6)
    model = _model(folder)
    units = units_of(model)
    snap = Snapshot.take()
    baseline = snap.anon + snap.file
    layer = units[1].nbytes
    max_tokens = len(IDS) + 6
    fixed = baseline + kv_cache_nbytes(model, max_tokens) + scratch_nbytes(model, max_tokens)
    limit = fixed + 3 * layer + layer // 2  # one layer resident, two in flight
    with Budget(model, limit=limit, baseline=baseline, max_tokens=max_tokens) as budget:
        assert budget.plan.streamed
        got = model.generate(IDS, 6)
        for unit in budget.units:
            if unit.name in budget.plan.streamed:
                assert _present(unit) == 0, f"{unit.name} stayed mapped in after it computed"
            elif not unit.gathered:
                assert _present(unit) * pages.PAGE_SIZE == unit.nbytes, f"{unit.name} was released"
        budget.sample(every_s=0)
        assert budget.own_peak > baseline
    assert got == expected
    # removed: the model runs unbudgeted, and nothing is released any more
    model.generate(IDS, 2)
    assert all(_present(u) for u in units if not u.gathered)


def _streaming_budget(model: llama.Llama, layers_resident: int = 1) -> Budget:
    units = units_of(model)
    snap = Snapshot.take()
    baseline = snap.anon + snap.file
    max_tokens = len(IDS) + 6
    fixed = baseline + kv_cache_nbytes(model, max_tokens) + scratch_nbytes(model, max_tokens)
    return Budget(model, limit=fixed + (layers_resident + 2) * units[1].nbytes + units[1].nbytes // 2,
                  baseline=baseline, max_tokens=max_tokens)


def test_a_streamed_weight_changed_in_memory_is_not_thrown_away(folder: Path) -> None:
    model = _model(folder)
    with _streaming_budget(model) as budget:
        streamed = next(u for u in budget.units if u.name in budget.plan.streamed and u.name != "head")
        weight = streamed.modules[0].mlp.up_proj.weight
        with torch.no_grad():
            weight.mul_(0)  # a copy-on-write page of the mapping now holds the change
        with pytest.raises(BudgetError, match=f"{streamed.name} has weights changed in memory"):
            model.generate(IDS, 2)
        assert weight.abs().sum() == 0  # the change is still there


def test_releasing_a_streamed_layer_keeps_a_resident_neighbours_page(raw_folder: Path) -> None:
    model = _model(raw_folder)
    with _streaming_budget(model, layers_resident=1) as budget:
        resident = next(u for u in budget.units if u.name.startswith("model.layers.")
                        and u.name not in budget.plan.streamed)
        streamed = [u for u in budget.units if u.name in budget.plan.streamed]
        shares = [u for u in streamed if any(r.mapping is s.mapping and s.start < r.start + r.nbytes
                                             and r.start < s.start + s.nbytes
                                             for r in u.ranges for s in resident.ranges)]
        assert shares, "the raw file should put a streamed layer and the resident one on a common page"
        assert all(u.releasable != u.ranges for u in shares)  # the common page is not released

        def on_a_common_page(t: torch.Tensor) -> bool:
            start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
            return any(r.start < end and start < r.start + r.nbytes for u in shares for r in u.ranges)

        edited = next(p for p in resident.modules[0].parameters() if on_a_common_page(p))
        with torch.no_grad():
            edited.fill_(2.0)  # a change to the resident layer, on the page it shares
        model.generate(IDS, 2)
        assert (edited == 2.0).all()  # streaming its neighbour did not throw it away
        for u in shares:
            for r in u.releasable:
                assert not pages.present_in_process(r.start, r.nbytes).any()


def test_run_refuses_a_limit_below_the_runtime_before_loading() -> None:
    from sparsemap.models import assets

    if not (assets.cache_dir() / "SmolLM2-135M-Instruct-sparsemap-q4" / ".complete").is_file():
        pytest.skip("SmolLM2's quantized folder is not in the cache (make models, then run smollm2 once)")
    proc = subprocess.run([sys.executable, "-m", "sparsemap.cli", "run", "smollm2", "Hi",
                           "--memory-limit", "100M"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "below what the runtime needs before any weight" in proc.stderr
    assert "MiB measured" in proc.stderr
