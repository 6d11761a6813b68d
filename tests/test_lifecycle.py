"""sparsemap.lifecycle: ``to_mapped`` frees anonymous memory; ``drop`` frees weights, names who holds them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import sparsemap
from sparsemap.mapped import mapping_of
from sparsemap.memory import MiB

from .helpers import run_isolated

_HELD: object = None  # a module global, for the lingering-reference test


def mapped_model(tmp_path: Path, width: int = 64, depth: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
    return sparsemap.to_mapped(model, tmp_path / "weights.safetensors")


# ---------------------------------------------------------------- to_mapped

@pytest.mark.slow
def test_to_mapped_gives_the_anonymous_memory_back(tmp_path: Path) -> None:
    r = run_isolated(f"""
        import gc, json, torch
        from torch import nn
        import sparsemap
        from sparsemap.mapped import mapping_of
        from sparsemap.memory import Snapshot
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(4)])  # 4 x 64 MiB of fp32 weights
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        x = torch.randn(3, 4096, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            before_out = model(x)
        gc.collect()
        before = Snapshot.take().anon
        returned = sparsemap.to_mapped(model, {str(tmp_path / "weights.safetensors")!r})
        gc.collect()
        after = Snapshot.take().anon
        mapped = all(mapping_of(p, n) is not None and isinstance(p, nn.Parameter)
                     for n, p in model.named_parameters())
        with torch.no_grad():
            same = torch.equal(model(x), before_out)
        print(json.dumps({{"nbytes": nbytes, "fell": before - after, "is_model": returned is model,
                          "mapped": mapped, "same": same, "run_anon": Snapshot.take().anon - after}}))
    """)
    assert r["nbytes"] >= 256 * MiB
    assert r["fell"] >= 0.9 * r["nbytes"], (f"anonymous memory fell {r['fell'] / MiB:.0f} MiB of "
                                            f"{r['nbytes'] / MiB:.0f}")
    assert r["is_model"] and r["mapped"] and r["same"]
    assert r["run_anon"] < 32 * MiB  # running it reads file pages, it does not copy them


def test_to_mapped_keeps_ties_and_buffers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 16), nn.LayerNorm(16), nn.BatchNorm1d(16), nn.Linear(16, 50))
    model[3].weight = model[0].weight
    model[2].running_var.uniform_(0.5, 2.0)
    model.eval()
    ids = torch.tensor([1, 4, 9, 49])
    with torch.no_grad():
        want = model(ids)
    sparsemap.to_mapped(model, tmp_path / "tied.safetensors", layout=sparsemap.Layout(pad_rows=("0.weight",)))
    assert model[3].weight is model[0].weight
    mapping_of(model[2].running_var)
    with torch.no_grad():
        assert torch.equal(model(ids), want)


# ---------------------------------------------------------------- drop

def test_drop_replaces_with_meta_and_releases_pages(tmp_path: Path) -> None:
    model = mapped_model(tmp_path)
    weight = model[0].weight
    shape, addr = weight.shape, weight.data_ptr()
    from sparsemap import pages

    int(weight.sum())  # fault the pages in
    del weight
    report = sparsemap.drop(model, ["0.weight", "1.bias"])
    assert report.dropped == ["0.weight", "1.bias"]
    assert model[0].weight.device.type == "meta" and model[0].weight.shape == shape
    assert model[1].bias.device.type == "meta"
    assert report.released_nbytes > 0
    first, last = pages.pages_inside(addr, addr + 64 * 64 * 4)
    assert report.released_nbytes >= last - first
    assert not pages.present_in_process(first, last - first).any()
    assert report.lingering == {}
    assert "dropped 2 tensors" in str(report)
    assert model[2].weight.device.type == "cpu"  # the others are untouched


def test_drop_a_string_name_and_a_buffer(tmp_path: Path) -> None:
    model = nn.Sequential(nn.BatchNorm1d(8))
    sparsemap.to_mapped(model, tmp_path / "bn.safetensors")
    report = sparsemap.drop(model, "0.running_mean")
    assert report.dropped == ["0.running_mean"]
    assert model[0].running_mean.device.type == "meta"
    assert report.lingering == {}


def test_drop_of_a_tensor_in_anonymous_memory_releases_nothing_now() -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    report = sparsemap.drop(model, ["0.weight"])
    assert report.released_nbytes == 0 and report.dropped == ["0.weight"]
    assert model[0].weight.device.type == "meta"


def test_lingering_names_a_global(tmp_path: Path) -> None:
    global _HELD
    model = mapped_model(tmp_path)
    _HELD = model[0].weight
    try:
        report = sparsemap.drop(model, ["0.weight"])
        assert list(report.lingering) == ["0.weight"]
        assert any(f"global '_HELD' of module {__name__}" in r for r in report.lingering["0.weight"])
        assert "0.weight is still referenced" in str(report)
    finally:
        _HELD = None


def test_lingering_names_a_dict_key_and_a_list(tmp_path: Path) -> None:
    model = mapped_model(tmp_path)
    cache = {"kept": model[1].weight}
    things = [model[2].weight]
    report = sparsemap.drop(model, ["1.weight", "2.weight", "0.weight"])
    assert report.lingering["1.weight"] == ["a dict, key 'kept'"]
    assert report.lingering["2.weight"] == ["a list of 1 items"]
    assert "0.weight" not in report.lingering
    assert cache and things


def test_lingering_names_the_other_name_of_a_tied_weight(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Embedding(32, 8), nn.Linear(8, 32, bias=False))
    model[1].weight = model[0].weight
    sparsemap.to_mapped(model, tmp_path / "tied.safetensors")
    report = sparsemap.drop(model, ["0.weight"])
    assert report.lingering == {"0.weight": ["1._parameters['weight']"]}
    report = sparsemap.drop(model, ["1.weight"])
    assert report.lingering == {}


def test_lingering_names_an_optimizer(tmp_path: Path) -> None:
    model = mapped_model(tmp_path)
    optimizer = torch.optim.SGD([model[0].weight], lr=0.1)
    report = sparsemap.drop(model, ["0.weight"])
    assert report.lingering.get("0.weight"), report
    assert optimizer.param_groups


def test_lingering_names_a_local_variable(tmp_path: Path) -> None:
    # Regression: since Python 3.11 a running function's locals are not in gc.get_referrers.
    model = mapped_model(tmp_path)
    held = model[0].weight
    report = sparsemap.drop(model, ["0.weight"])
    assert held is not None
    assert any("a local variable of test_lingering_names_a_local_variable()" in r
               for r in report.lingering.get("0.weight", []))


def test_tied_names_dropped_together_count_their_pages_once(tmp_path: Path) -> None:
    # Regression: released_nbytes added the same pages once per name.
    model = nn.Sequential(nn.Embedding(64, 64), nn.Linear(64, 64, bias=False))
    model[1].weight = model[0].weight
    sparsemap.to_mapped(model, tmp_path / "tied.safetensors")
    report = sparsemap.drop(model, ["0.weight", "1.weight"])
    assert report.lingering == {}
    assert report.released_nbytes == 64 * 64 * 4  # 16 KiB, page-aligned: four pages, released once


def test_dropping_an_unknown_parameter_raises_key_error(tmp_path: Path) -> None:
    model = mapped_model(tmp_path)
    with pytest.raises(KeyError, match=r"0.nope"):
        sparsemap.drop(model, ["0.nope"])
    assert model[0].weight.device.type == "cpu"


def test_dropping_a_name_under_an_unknown_module_raises_key_error(tmp_path: Path) -> None:
    # Regression: get_submodule's AttributeError escaped.
    model = mapped_model(tmp_path)
    with pytest.raises(KeyError, match=r"nope.weight"):
        sparsemap.drop(model, ["nope.weight"])
