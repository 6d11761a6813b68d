"""sparsemap.quantize: GGUF blocks and float weights to Coded, and Coded to the stored parts and back.

Each GGUF decoder must give exactly what ``gguf.quants.dequantize`` gives;
packing then decoding must give back the same integers (int8: the same Coded,
bit for bit; int4: the same values, with scales rounded to bf16); quantizing a
float weight must stay within half a step of it. The packed int4 layout is
fingerprinted, and a weight packed for another one is refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsemap.errors import QuantizationError, UnsupportedQuantizationError
from sparsemap.formats.catalog import TensorEntry
from sparsemap.formats.quantized import FROM_GGUF, INT4, INT8, QuantizedWeight, part_specs
from sparsemap.quantize import (
    Coded,
    check_layout,
    decode,
    dequantize,
    from_float,
    from_gguf,
    int4_layout,
    int4_values,
    pack,
)

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402 - only after importorskip found gguf
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

TORCH_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "BF16": torch.bfloat16, "F32": torch.float32}
N, K = 32, 512  # two K-quant super-blocks per row
# K-quant -> (bytes a super-block, where its f16 scales lie); gguf cannot quantize these: random blocks.
K_QUANTS = {"Q4_K": (144, (0, 2)), "Q6_K": (210, (208,)), "Q5_K": (176, (0, 2)), "Q3_K": (110, (108,)),
            "Q2_K": (84, (80, 82))}


def weight_of(scheme: str, shape: tuple[int, int], group: int, zero: bool, *, name: str = "w",
              layout: str | None = None) -> QuantizedWeight:
    """A QuantizedWeight whose part entries describe the parts (their bytes live in memory, not a file)."""
    entries = [TensorEntry(part, "in-memory", 0, 0, dtype, part_shape)
               for part, dtype, part_shape in part_specs(name, scheme, shape, group, zero)]
    return QuantizedWeight(name, scheme, shape, group, "F32", *entries, int4_layout=layout)


def float_weight(seed: int, n: int = 64, k: int = 256) -> torch.Tensor:
    """Random weights whose magnitude varies by row and column, so groups get different scales: (n, k)."""
    gen = torch.Generator().manual_seed(seed)
    spread = torch.rand(n, 1, generator=gen) * 4 + 0.01  # (n, 1)
    return torch.randn(n, k, generator=gen) * spread + torch.randn(1, k, generator=gen) * 0.1


def k_quant_blocks(qtype: str, n: int, k: int, seed: int) -> np.ndarray:
    """Random K-quant blocks with finite f16 scales: (n, bytes per row) uint8."""
    rng = np.random.default_rng(seed)
    size, scale_at = K_QUANTS[qtype]
    blocks = rng.integers(0, 256, (n, k // 256, size), dtype=np.uint8)  # (n, super-blocks, size)
    for start in scale_at:
        d = rng.uniform(0.001, 0.1, (n, k // 256, 1)).astype(np.float16)  # (n, S, 1)
        blocks[..., start:start + 2] = d.view(np.uint8)
    return blocks.reshape(n, -1)


def gguf_blocks(qtype: str) -> np.ndarray:
    """(N, bytes per row) uint8 of a GGUF quantization of random weights."""
    if qtype in K_QUANTS:
        return k_quant_blocks(qtype, N, K, seed=2 + list(K_QUANTS).index(qtype))
    w = float_weight(1, N, K).numpy()  # (N, K)
    return gguf_quantize(w, Q[qtype])


# ---------------------------------------------------------------- GGUF decoders

@pytest.mark.parametrize("qtype", list(FROM_GGUF))
def test_gguf_decoder_equals_gguf_dequantize(qtype: str) -> None:
    raw = gguf_blocks(qtype)  # (N, bytes per row)
    want = torch.from_numpy(gguf_dequantize(raw, Q[qtype]))  # (N, K)
    coded = from_gguf(torch.from_numpy(raw).reshape(-1), qtype, (N, K), name="blk.0.w")
    assert coded.group == FROM_GGUF[qtype][1]
    assert coded.q.shape == (N, K) and coded.scale.shape == (N, K // coded.group)
    assert (coded.zero is not None) == (qtype in ("Q4_0", "Q4_1", "Q4_K", "Q5_1", "Q5_K", "Q2_K"))
    got = coded.values()
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)


@pytest.mark.parametrize(("qtype", "low", "high"), [("Q4_0", 0, 15), ("Q4_1", 0, 15), ("Q4_K", 0, 15),
                                                    ("Q5_0", -16, 15), ("Q5_1", 0, 31),
                                                    ("Q8_0", -128, 127), ("Q6_K", -32, 31),
                                                    ("Q5_K", 0, 31), ("Q3_K", -4, 3), ("Q2_K", 0, 3)])
def test_gguf_values_stay_in_their_range(qtype: str, low: int, high: int) -> None:
    coded = from_gguf(torch.from_numpy(gguf_blocks(qtype)).reshape(-1), qtype, (N, K))
    assert low <= int(coded.q.min()) and int(coded.q.max()) <= high
    if qtype in K_QUANTS:  # random bits reach both ends: every bit of the packing was read
        assert (int(coded.q.min()), int(coded.q.max())) == (low, high)


def test_unsupported_gguf_type_lists_the_supported_ones() -> None:
    raw = torch.zeros(N * (K // 256) * 136, dtype=torch.uint8)  # IQ4_XS's bytes
    with pytest.raises(UnsupportedQuantizationError) as info:
        from_gguf(raw, "IQ4_XS", (N, K), name="blk.0.ffn_up.weight")
    message = str(info.value)
    assert info.value.tensor == "blk.0.ffn_up.weight"
    assert "IQ4_XS" in message and "blk.0.ffn_up.weight" in message
    for supported in FROM_GGUF:
        assert supported in message


def test_coded_rows_are_the_rows_of_its_values() -> None:
    coded = from_gguf(torch.from_numpy(gguf_blocks("Q4_1")).reshape(-1), "Q4_1", (N, K))
    index = torch.randperm(N, generator=torch.Generator().manual_seed(3))  # (N,)
    assert torch.equal(coded.rows(index).values(), coded.values()[index])


# ---------------------------------------------------------------- pack and decode

@pytest.mark.parametrize(("group", "zero"), [(32, False), (32, True), (256, False)])
def test_int8_pack_then_decode_is_exact(group: int, zero: bool) -> None:
    gen = torch.Generator().manual_seed(group + zero)
    n, k = 48, 256
    q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int16)  # (N, K)
    scale = torch.rand(n, k // group, generator=gen) + 0.01  # (N, G)
    zeros = torch.randn(n, k // group, generator=gen) if zero else None  # (N, G)
    coded = Coded(q, scale, zeros, group)
    parts = pack(coded, INT8)
    weight = weight_of(INT8, (n, k), group, zero)
    assert [(TORCH_DTYPES[p.dtype], p.shape) for p in weight.parts] == [(t.dtype, t.shape) for t in parts]
    back = decode(weight, parts)
    assert back.group == group
    assert torch.equal(back.q, q) and torch.equal(back.scale, scale)
    assert (back.zero is None) == (not zero)
    if zeros is not None:
        assert torch.equal(back.zero, zeros)
    assert torch.equal(dequantize(weight, parts), coded.values())


def test_int4_pack_then_decode_gives_the_same_values() -> None:
    coded = from_float(float_weight(4), "q4_1")  # (64, 256) in groups of 32
    n, k = coded.q.shape
    parts = pack(coded, INT4)
    weight = weight_of(INT4, (n, k), 32, True, layout=int4_layout())
    assert [(TORCH_DTYPES[p.dtype], p.shape) for p in weight.parts] == [(t.dtype, t.shape) for t in parts]
    back = decode(weight, parts)
    assert torch.equal(back.q, coded.q)
    # Scales and zeros are stored in bf16 (8 significant bits).
    torch.testing.assert_close(back.scale, coded.scale, rtol=2 ** -8, atol=0)
    bound = 2 ** -8 * (coded.zero.abs() + 32 * coded.scale)  # (N, G): bf16 rounding of scale and zero
    err = (back.values() - coded.values()).abs().view(n, -1, 32).amax(-1)  # (N, G)
    assert (err <= bound + 1e-7).all()


def test_int4_pack_refuses_values_outside_0_to_15() -> None:
    coded = from_float(float_weight(5), "q8_0")  # symmetric: negative values
    with pytest.raises(QuantizationError, match=r"not 0\.\.15"):
        pack(coded, INT4)


@pytest.mark.parametrize("rows", [256, 96])  # one call for the whole of K, or several with a short last one
def test_int4_values_reads_back_the_exact_values(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    n, k, group = 32, 256, 64
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int16)  # (N, K)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)  # (N, K/2)
    got = int4_values(packed, k, group, rows=rows)
    assert got.dtype == torch.int16 and got.shape == (n, k)
    assert torch.equal(got, q)


# ---------------------------------------------------------------- float -> Coded

@pytest.mark.parametrize("mode", ["q8_0", "int8"])
def test_symmetric_int8_is_within_half_a_step(mode: str) -> None:
    w = float_weight(6)  # (64, 256)
    coded = from_float(w, mode)
    n, k = w.shape
    group = 32 if mode == "q8_0" else k
    assert coded.group == group and coded.zero is None and coded.scale.shape == (n, k // group)
    assert int(coded.q.abs().max()) == 127
    err = (coded.values() - w).abs().view(n, -1, group).amax(-1)  # (N, G)
    assert (err <= coded.scale * (0.5 + 1e-4)).all()
    assert torch.equal(coded.q.view(n, -1, group).abs().amax(-1), torch.full((n, k // group), 127,
                                                                             dtype=torch.int16))


def test_q4_1_is_within_half_a_step() -> None:
    w = float_weight(7)  # (64, 256)
    coded = from_float(w, "q4_1")
    n = w.shape[0]
    assert coded.group == 32 and coded.zero is not None
    groups = w.view(n, -1, 32)  # (N, G, 32)
    lo, hi = groups.amin(-1), groups.amax(-1)  # (N, G)
    torch.testing.assert_close(coded.scale, (hi - lo) / 15)
    assert torch.equal(coded.zero, lo)
    q = coded.q.view(n, -1, 32)
    assert (q.amin(-1) == 0).all() and (q.amax(-1) == 15).all()  # the full range is used in every group
    err = (coded.values() - w).abs().view(n, -1, 32).amax(-1)  # (N, G)
    assert (err <= coded.scale * 0.5 + 1e-6 * (lo.abs() + hi.abs()) + 1e-7).all()


@pytest.mark.parametrize("mode", ["q8_0", "int8", "q4_1"])
def test_all_zero_groups_give_zeros(mode: str) -> None:
    w = float_weight(8)  # (64, 256)
    w[0] = 0  # a whole row
    w[1, :32] = 0  # one group
    coded = from_float(w, mode)
    values = coded.values()
    assert not torch.isnan(values).any() and not torch.isnan(coded.scale).any()
    assert torch.equal(values[0], torch.zeros(256))
    assert torch.equal(values[1, :32], torch.zeros(32))


def test_q4_1_constant_group_is_exact() -> None:
    w = float_weight(9)  # (64, 256)
    w[2, 64:96] = 3.25
    coded = from_float(w, "q4_1")
    assert torch.equal(coded.values()[2, 64:96], torch.full((32,), 3.25))


# ---------------------------------------------------------------- the int4 layout

def test_int4_layout_is_a_stable_fingerprint_naming_the_cpu_capability() -> None:
    first = int4_layout()
    int4_layout.cache_clear()
    again = int4_layout()
    assert first == again
    prefix, capability, digest = first.split(":")
    assert prefix == "torch-cpu-int4pack"
    assert capability == torch.backends.cpu.get_cpu_capability()
    assert len(digest) == 16 and int(digest, 16) >= 0


def test_check_layout_refuses_another_int4_layout() -> None:
    other = "torch-cpu-int4pack:SOMEWHERE_ELSE:0123456789abcdef"
    weight = weight_of(INT4, (32, 64), 32, True, name="model.layers.0.mlp.up_proj.weight", layout=other)
    with pytest.raises(QuantizationError) as info:
        check_layout(weight)
    assert info.value.tensor == "model.layers.0.mlp.up_proj.weight"
    assert "model.layers.0.mlp.up_proj.weight" in str(info.value)
    assert other in str(info.value) and int4_layout() in str(info.value)
    parts = pack(from_float(float_weight(10, 32, 64), "q4_1"), INT4)
    with pytest.raises(QuantizationError):
        decode(weight, parts)  # refused before anything is read


def test_check_layout_accepts_this_layout_and_any_int8() -> None:
    check_layout(weight_of(INT4, (32, 64), 32, True, layout=int4_layout()))
    check_layout(weight_of(INT8, (32, 64), 32, False))
