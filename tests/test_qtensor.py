"""sparsemap.qtensor: a weight kept quantized, used in place of the float weight.

Weights are quantized end to end: a float safetensors file converted with
``Layout(quantize=...)``, then served by ``Checkpoint.tensor(name,
keep_quantized=True)``. ``F.linear`` on the :class:`QuantizedTensor` (torch's
int4/int8 kernels, bf16 activations) must match ``F.linear`` on its
dequantized weight to within bf16 rounding; ``F.embedding`` must give that
weight's rows exactly; modules holding it must work, and any other operation
must see the dequantized weight.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsemap
from sparsemap.checkpoint import Checkpoint
from sparsemap.converter import convert
from sparsemap.errors import QuantizationError
from sparsemap.qtensor import QuantizedTensor
from sparsemap.writer import Layout

from .conftest import ModuleFolders

K = 256
SHAPES = {"proj.weight": (128, K), "odd.weight": (40, K), "model.embed_tokens.weight": (64, K)}

# (mode, weight) -> (scheme, group, has a zero) the conversion must choose
CASES = {
    ("q4_1", "proj.weight"): ("int4", 32, True),
    ("q8_0", "proj.weight"): ("int8", 32, False),
    ("int8", "proj.weight"): ("int8", K, False),  # one scale per row
    ("q4_1", "odd.weight"): ("int8", 32, True),  # 40 rows: the int4 packer wants multiples of 16
    ("q4_1", "model.embed_tokens.weight"): ("int8", 32, True),  # gathered rows: never int4
}


@pytest.fixture(scope="module")
def originals() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=gen) * 0.5 for name, shape in SHAPES.items()}
    state["norm.weight"] = torch.rand(K, generator=gen)  # (K,): stays plain
    return state


@pytest.fixture(scope="module")
def converted(module_folders: ModuleFolders,
              originals: dict[str, torch.Tensor]) -> dict[str, Path]:
    """mode -> a file converted from ``originals`` with ``Layout(quantize=mode)``."""
    folder = module_folders.make("qtensor")
    src = folder / "float.safetensors"
    sparsemap.save(originals, src)
    out = {}
    for mode in ("q4_1", "q8_0", "int8"):
        out[mode] = folder / f"{mode}.safetensors"
        convert(src, out[mode], layout=Layout(quantize=mode))
    return out


def quantized(converted: dict[str, Path], mode: str, name: str) -> QuantizedTensor:
    qt = Checkpoint(converted[mode]).tensor(name, keep_quantized=True)
    assert isinstance(qt, QuantizedTensor)
    return qt


def assert_close_to_output_scale(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-2) -> None:
    """``got`` within ``rel`` of the largest magnitude in ``want`` (bf16 activations and outputs)."""
    assert got.shape == want.shape
    err = (got.float() - want.float()).abs().max()
    assert err <= rel * want.float().abs().max(), f"max error {float(err):.4g}"


def inputs(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------- what the conversion made

@pytest.mark.parametrize(("mode", "name"), list(CASES))
def test_converted_weight_is_served_quantized(converted: dict[str, Path], originals: dict[str, torch.Tensor],
                                              mode: str, name: str) -> None:
    scheme, group, zero = CASES[mode, name]
    ckpt = Checkpoint(converted[mode])
    weight = ckpt.catalog.quantized[name]
    assert (weight.scheme, weight.group, weight.zero is not None or scheme == "int4") == (scheme, group, zero)
    assert ckpt.catalog[name].encoding == scheme
    qt = ckpt.tensor(name, keep_quantized=True)
    assert isinstance(qt, QuantizedTensor)
    assert qt.shape == SHAPES[name] and qt.dtype == torch.float32
    assert all(ckpt.owns(p) for p in qt.parts)  # the parts are views of the mapped file
    deq = qt.dequantize()
    assert torch.equal(deq, ckpt.tensor(name))  # the same as the plain read
    # Quantization error: within one step of 4 bits (or 8) over the widest range a group can have.
    step = 2 * originals[name].abs().max() / (15 if mode == "q4_1" else 254)
    assert (deq - originals[name]).abs().max() <= step


def test_norm_stays_plain(converted: dict[str, Path], originals: dict[str, torch.Tensor]) -> None:
    ckpt = Checkpoint(converted["q4_1"])
    assert "norm.weight" not in ckpt.catalog.quantized
    assert torch.equal(ckpt.tensor("norm.weight", keep_quantized=True), originals["norm.weight"])


# ---------------------------------------------------------------- F.linear

@pytest.mark.parametrize(("mode", "name"), list(CASES))
def test_linear_matches_the_dequantized_weight(converted: dict[str, Path], mode: str, name: str) -> None:
    qt = quantized(converted, mode, name)
    x = inputs((5, K), seed=1)  # (M, K) bf16
    y = F.linear(x, qt)  # (M, N)
    assert type(y) is torch.Tensor and y.dtype == torch.bfloat16
    assert_close_to_output_scale(y, F.linear(x.float(), qt.dequantize()))


@pytest.mark.parametrize("rows", [1, 7, 3000])
@pytest.mark.parametrize(("mode", "name"), [("q8_0", "proj.weight"), ("q4_1", "odd.weight")])  # zeros too
def test_int8_groups_sum_alike_one_kernel_call_a_group_or_batched(converted: dict[str, Path], mode: str,
                                                                  name: str, rows: int) -> None:
    """F.linear takes the batched way for groups of 16 or several input rows, else a kernel call a group;
    both add the same bf16 products (3000 rows: too many to batch, a call a group)."""
    qt = quantized(converted, mode, name)  # int8 in groups of 32
    n = SHAPES[name][0]
    xg = inputs((rows, K), seed=4).view(rows, K // 32, 32)  # (M, G, group) bf16
    one_by_one, batched = qt._group_sums(xg), qt._batched_group_sums(xg)  # (M, N) each
    assert batched.shape == one_by_one.shape == (rows, n) and batched.is_contiguous()
    # Equal but for the order of float32 additions, and where a group's sum rounds to the other bf16.
    assert (batched - one_by_one).abs().max() <= 1e-4 * one_by_one.abs().max()
    assert_close_to_output_scale(F.linear(xg.view(rows, K), qt), F.linear(xg.view(rows, K).float(),
                                                                           qt.dequantize()))


@pytest.mark.parametrize(("mode", "name"), list(CASES))
def test_linear_with_float32_input_returns_float32(converted: dict[str, Path], mode: str, name: str) -> None:
    qt = quantized(converted, mode, name)
    x = inputs((3, K), seed=2, dtype=torch.float32)  # (M, K)
    y = F.linear(x, qt)  # (M, N)
    assert y.dtype == torch.float32
    assert_close_to_output_scale(y, F.linear(x, qt.dequantize()))


@pytest.mark.parametrize(("mode", "name"), [("q4_1", "proj.weight"), ("q8_0", "proj.weight"),
                                            ("q4_1", "odd.weight")])
def test_linear_with_bias(converted: dict[str, Path], mode: str, name: str) -> None:
    qt = quantized(converted, mode, name)
    n = qt.shape[0]
    x = inputs((4, K), seed=3, dtype=torch.float32)  # (M, K)
    bias = torch.linspace(-1, 1, n)  # (N,)
    plain = F.linear(x, qt)  # (M, N)
    assert torch.equal(F.linear(x, qt, bias), plain + bias)
    assert torch.equal(F.linear(x, qt, bias=bias), plain + bias)
    assert_close_to_output_scale(F.linear(x, qt, bias), F.linear(x, qt.dequantize(), bias))


@pytest.mark.parametrize(("mode", "name"), [("q4_1", "proj.weight"), ("q8_0", "proj.weight"),
                                            ("int8", "proj.weight"), ("q4_1", "odd.weight")])
def test_linear_keeps_leading_dims(converted: dict[str, Path], mode: str, name: str) -> None:
    qt = quantized(converted, mode, name)
    x = inputs((2, 3, K), seed=4)  # (2, 3, K)
    y = F.linear(x, qt)
    assert y.shape == (2, 3, qt.shape[0])
    assert torch.equal(y, F.linear(x.reshape(6, K), qt).view(2, 3, -1))
    assert_close_to_output_scale(y, F.linear(x.float(), qt.dequantize()))


def test_nn_linear_runs_on_the_quantized_weight(converted: dict[str, Path]) -> None:
    qt = quantized(converted, "q4_1", "proj.weight")
    layer = nn.Linear(K, 128)
    layer._parameters["weight"] = qt
    x = inputs((2, 7, K), seed=5, dtype=torch.float32)  # (2, 7, K)
    with torch.no_grad():
        y = layer(x)  # (2, 7, 128)
        want = F.linear(x, qt.dequantize(), layer.bias)
    assert y.shape == (2, 7, 128)
    assert_close_to_output_scale(y, want)


# ---------------------------------------------------------------- F.embedding

@pytest.mark.parametrize(("mode", "name"), [("q4_1", "model.embed_tokens.weight"), ("q8_0", "proj.weight"),
                                            ("int8", "proj.weight"), ("q4_1", "odd.weight")])
def test_embedding_gives_the_dequantized_rows_exactly(converted: dict[str, Path], mode: str,
                                                      name: str) -> None:
    qt = quantized(converted, mode, name)
    assert qt.weight.scheme == "int8"
    ids = torch.tensor([[0, 5, 5, 39], [7, 1, 2, 3]])  # (2, 4)
    rows = F.embedding(ids, qt)  # (2, 4, K)
    assert rows.shape == (2, 4, K) and rows.dtype == torch.float32
    assert torch.equal(rows, qt.dequantize()[ids])


def test_embedding_of_an_int4_weight_decodes_it(converted: dict[str, Path]) -> None:
    qt = quantized(converted, "q4_1", "proj.weight")
    ids = torch.tensor([3, 127, 0])  # (3,)
    assert torch.equal(F.embedding(ids, qt), qt.dequantize()[ids])


def test_nn_embedding_runs_on_the_quantized_weight(converted: dict[str, Path]) -> None:
    qt = quantized(converted, "q4_1", "model.embed_tokens.weight")
    table = nn.Embedding(64, K)
    table._parameters["weight"] = qt
    ids = torch.tensor([[1, 2, 63], [0, 0, 9]])  # (2, 3)
    with torch.no_grad():
        assert torch.equal(table(ids), qt.dequantize()[ids])


def test_embedding_with_max_norm_renorms_the_rows(converted: dict[str, Path]) -> None:
    qt = quantized(converted, "q8_0", "proj.weight")
    ids = torch.tensor([1, 2])  # (2,)
    rows = F.embedding(ids, qt, max_norm=1.0)  # (2, K)
    assert (rows.norm(dim=-1) <= 1 + 1e-4).all()


# ---------------------------------------------------------------- everything else

@pytest.mark.parametrize("mode", ["q4_1", "q8_0"])
def test_other_ops_see_the_dequantized_weight(converted: dict[str, Path], mode: str) -> None:
    qt = quantized(converted, mode, "proj.weight")
    deq = qt.dequantize()
    plus = qt + 1
    assert type(plus) is torch.Tensor
    assert torch.equal(plus, deq + 1)
    torch.testing.assert_close(qt.sum(), deq.sum())
    assert torch.equal(qt[3], deq[3])
    x = inputs((K, 2), seed=6, dtype=torch.float32)  # (K, 2)
    torch.testing.assert_close(qt @ x, deq @ x)


def test_detach_keeps_the_parts(converted: dict[str, Path]) -> None:
    qt = quantized(converted, "q8_0", "proj.weight")
    detached = qt.detach()
    assert isinstance(detached, QuantizedTensor)
    assert all(a is b for a, b in zip(detached.parts, qt.parts, strict=True))
    assert "int8 in groups of 32" in repr(qt) and qt.nbytes_stored == qt.weight.nbytes


def test_another_int4_layout_is_refused(converted: dict[str, Path]) -> None:
    ckpt = Checkpoint(converted["q4_1"])
    weight = ckpt.catalog.quantized["proj.weight"]._replace(int4_layout="torch-cpu-int4pack:ELSEWHERE:0")
    with pytest.raises(QuantizationError) as info:
        QuantizedTensor(weight, ckpt.quantized("proj.weight"))
    assert info.value.tensor == "proj.weight" and "ELSEWHERE" in str(info.value)


# ---------------------------------------------------------------- loading and saving

class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(64, K)
        self.proj = nn.Linear(K, 128)


def test_load_assigns_quantized_tensors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = TwoLayers()
    src, dst = tmp_path / "float.safetensors", tmp_path / "q8_0.safetensors"
    sparsemap.save(reference, src)
    convert(src, dst, layout=Layout(quantize="q8_0"))
    model = sparsemap.load(TwoLayers, dst)
    assert isinstance(model.proj.weight, QuantizedTensor)
    assert isinstance(model.embed_tokens.weight, QuantizedTensor)
    assert not isinstance(model.proj.bias, QuantizedTensor)
    ids = torch.tensor([[4, 8, 15, 16]])  # (1, 4)
    with torch.no_grad():
        y = model.proj(model.embed_tokens(ids))  # (1, 4, 128)
        want = reference.proj(reference.embed_tokens(ids))
    assert y.shape == (1, 4, 128)
    assert_close_to_output_scale(y, want, rel=3e-2)  # quantization error of 8 bits, bf16 activations


@pytest.mark.parametrize("mode", ["q8_0", "q4_1"])
def test_save_with_quantize_writes_quantized_weights(tmp_path: Path, originals: dict[str, torch.Tensor],
                                                     mode: str) -> None:
    path = tmp_path / f"{mode}.safetensors"
    sparsemap.save(originals, path, layout=Layout(quantize=mode))
    assert set(sparsemap.open(path).quantized) == set(SHAPES)


@pytest.mark.parametrize(("mode", "name"), [("q4_1", "proj.weight"), ("int8", "proj.weight")])
def test_linear_takes_a_non_contiguous_input(converted: dict[str, Path], mode: str, name: str) -> None:
    qt = quantized(converted, mode, name)
    x = torch.randn(K, 5).t()  # (5, K), transposed: not contiguous
    assert_close_to_output_scale(F.linear(x, qt), F.linear(x, qt.dequantize()), rel=3e-2)


def test_changing_a_quantized_weight_in_place_is_refused(converted: dict[str, Path]) -> None:
    qt = quantized(converted, "q4_1", "proj.weight")
    before = qt.dequantize()
    for change in (lambda: qt.zero_(), lambda: qt.mul_(0), lambda: qt.copy_(torch.zeros(qt.shape))):
        with pytest.raises(QuantizationError, match="read-only"):
            change()
    assert torch.equal(qt.dequantize(), before)  # nothing was lost silently


def test_load_state_dict_into_quantized_weights_is_refused(tmp_path: Path) -> None:
    src, dst = tmp_path / "float.safetensors", tmp_path / "q8_0.safetensors"
    sparsemap.save(TwoLayers(), src)
    convert(src, dst, layout=Layout(quantize="q8_0"))
    model = sparsemap.load(TwoLayers, dst)
    with pytest.raises(RuntimeError, match=r"proj\.weight.*read-only"):  # torch wraps each parameter's error
        model.load_state_dict({k: torch.zeros(v.shape) for k, v in model.state_dict().items()})


class Twins(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(K, 128, bias=False), nn.Linear(K, 128, bias=False)


def test_saving_a_quantized_models_state_keeps_each_weight(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src, dst = tmp_path / "float.safetensors", tmp_path / "q4_1.safetensors"
    sparsemap.save(Twins(), src)
    convert(src, dst, layout=Layout(quantize="q4_1"))
    model = sparsemap.load(Twins, dst)
    state = model.state_dict()
    out = tmp_path / "again.safetensors"
    sparsemap.save(state, out)  # two weights of one shape are not mistaken for tied ones
    again = Checkpoint(out)
    for name, t in state.items():
        want = t.dequantize() if isinstance(t, QuantizedTensor) else t
        assert torch.equal(again.tensor(name), want), name
