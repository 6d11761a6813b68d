"""sparsemap.formats.llama2c: llama2.c's three layouts, written here as export.py writes them.

Every tensor must come back under transformers' name, bit-identical to the weights exported (q and k
through their row order), each layer's tensor at its own offset of the file; Q8_0 matrices (v2) as
exactly the values export.py's quantization gives, kept int8 as strided views of the file where their
rows hold whole groups. Legacy files, which have no magic number, are recognised by name and exact
size only, and each damaged file is refused with its own error.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

import sparsemap
from sparsemap import errors
from sparsemap.formats.llama2c import header_of, rotary_order
from sparsemap.formats.llama2c_header import PARAMS, Llama2cHeader
from sparsemap.formats.quantized import LLAMA2C_Q8_0
from sparsemap.formats.source import resolve_source
from sparsemap.mapped import mapping_of

from ..format_writers import AK42, meta_order, quantize_q80, random_state, write_llama2c
from ..helpers import raises

# hidden 48 with groups of 32: the down projection's rows (48) straddle groups, the others' (32) do not.
CFG = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "vocab_size": 40, "max_position_embeddings": 8}
VERSIONS = [0, 1, 2]


@pytest.fixture(params=[False, True], ids=["own-classifier", "shared-classifier"])
def state(request: pytest.FixtureRequest) -> tuple[dict[str, torch.Tensor], bool]:
    return random_state(CFG, shared=request.param), request.param


def write(tmp_path: Path, state: tuple[dict, bool], version: int, name: str = "model.bin") -> Path:
    return write_llama2c(tmp_path / name, (state[0], CFG), version, group_size=32)


def expected(sd: dict[str, torch.Tensor], shared: bool) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not (shared and k == "lm_head.weight")}


@pytest.mark.parametrize("version", [0, 1])
def test_float_tensors_are_transformers_weights_bit_for_bit(tmp_path: Path, state: tuple,
                                                            version: int) -> None:
    sd, shared = state
    path = write(tmp_path, state, version)
    cat = sparsemap.open(path)
    assert cat.format == "llama2c" and resolve_source(path).format == "llama2c"
    assert cat.metadata["llama2c.version"] == str(version)
    assert cat.metadata["llama2c.shared_classifier"] == str(shared)
    assert set(cat) == set(expected(sd, shared))
    ckpt = sparsemap.Checkpoint(cat)
    for name, want in expected(sd, shared).items():
        got = ckpt.tensor(name)
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        assert torch.equal(got, want), name


@pytest.mark.parametrize("version", [0, 1])
def test_each_layer_is_its_own_zero_copy_view_q_and_k_in_stored_order(tmp_path: Path, state: tuple,
                                                                       version: int) -> None:
    sd, _ = state
    path = write(tmp_path, state, version)
    ckpt = sparsemap.Checkpoint(path)
    cat = ckpt.catalog
    base = mapping_of(ckpt.tensor("model.norm.weight")).address
    for name, entry in cat.items():
        view = ckpt.tensor(name, stored_order=True)
        assert mapping_of(view).address == base and view.data_ptr() == base + entry.offset, name
        if ".q_proj." in name or ".k_proj." in name:
            heads = CFG["num_attention_heads"] if ".q_proj." in name else CFG["num_key_value_heads"]
            assert entry.order == rotary_order(entry.shape[0], heads) and not entry.zero_copy
            assert torch.equal(view, meta_order(sd[name], heads)), name  # the file holds Meta's order
        else:
            assert entry.order is None and entry.zero_copy, name
    # Layer after layer: layer 1's q projection starts where layer 0's ends.
    q0, q1 = cat["model.layers.0.self_attn.q_proj.weight"], cat["model.layers.1.self_attn.q_proj.weight"]
    assert q1.offset == q0.end


def test_sizes_add_up_to_the_file_less_header_and_rotary_tables(tmp_path: Path, state: tuple) -> None:
    _, shared = state
    for version, overhead in ((0, 28 + 2 * 4 * 8 * 4), (1, 256)):  # v0: freq_cis (seq 8, head/2 4), twice
        path = write(tmp_path, state, version, f"v{version}.bin")
        cat = sparsemap.open(path)
        assert cat.nbytes == path.stat().st_size - overhead
        header = header_of(cat)
        assert header.file_nbytes() == path.stat().st_size and header.shared == shared


def test_q8_0_values_are_export_pys_quantization_exactly(tmp_path: Path, state: tuple) -> None:
    sd, shared = state
    path = write(tmp_path, state, 2)
    cat = sparsemap.open(path)
    assert cat.metadata["llama2c.group_size"] == "32"
    ckpt = sparsemap.Checkpoint(cat)
    for name, want in expected(sd, shared).items():
        got = ckpt.tensor(name)
        if want.dim() == 1:  # norms stay float32
            assert torch.equal(got, want), name
            continue
        q, s = quantize_q80(want, 32)
        assert torch.equal(got, (q.float() * s[:, None]).view(want.shape)), name
    kept = set(cat.quantized)
    straddling = {n for n in cat if "down_proj" in n}  # rows of 48 in groups of 32
    assert kept == {n for n in expected(sd, shared) if sd[n].dim() == 2} - straddling
    assert all(cat[n].encoding == LLAMA2C_Q8_0 and n not in cat.quantized for n in straddling)


def test_q8_0_parts_are_strided_views_of_the_file(tmp_path: Path, state: tuple) -> None:
    sd, _ = state
    path = write(tmp_path, state, 2)
    ckpt = sparsemap.Checkpoint(path)
    name = "model.layers.1.mlp.up_proj.weight"  # (48, 32): one group a row
    weight = ckpt.catalog.quantized[name]
    values, scales = ckpt.quantized(name)
    assert values.shape == (1, 48, 32) and values.dtype == torch.int8 and scales.shape == (1, 48)
    assert ckpt.owns(values) and ckpt.owns(scales)
    assert values.data_ptr() == mapping_of(values).address + weight.q.offset
    q, s = quantize_q80(sd[name], 32)
    assert torch.equal(values[0], q.view(48, 32)) and torch.equal(scales[0], s)
    # Kept quantized, q and k come in transformers' row order all the same: dequantized, reordered.
    q_name = "model.layers.0.self_attn.q_proj.weight"
    kept = ckpt.tensor(q_name, keep_quantized=True)
    assert type(kept) is torch.Tensor
    qq, qs = quantize_q80(meta_order(sd[q_name], 4), 32)
    assert torch.equal(kept, (qq.float() * qs[:, None]).view(32, 32)[torch.argsort(torch.tensor(
        rotary_order(32, 4)))])
    assert type(ckpt.tensor("model.layers.0.self_attn.v_proj.weight", keep_quantized=True)).__name__ == \
        "QuantizedTensor"


@pytest.mark.parametrize("rows", [1, 5, 4000])
def test_groups_of_8_multiply_in_place_though_the_int8_kernel_cannot_read_them(
        tmp_path: Path, state: tuple, rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """export.py's groups of 8 (a small model's): no dequantized copy of the matrix for a matmul; the same
    products as the dequantized weight's, within the bf16 rounding of the inputs."""
    from sparsemap.qtensor import QuantizedTensor

    path = write_llama2c(tmp_path / "g8.bin", (state[0], CFG), 2, group_size=8)
    weight = sparsemap.Checkpoint(path).tensor("model.layers.1.mlp.up_proj.weight", keep_quantized=True)
    assert type(weight) is QuantizedTensor and weight.weight.group == 8
    x = torch.randn(rows, 32, generator=torch.Generator().manual_seed(rows))  # (M, K)
    want = torch.nn.functional.linear(x.bfloat16().float(), weight.dequantize())  # (M, 48)

    def no_copy(self: QuantizedTensor) -> torch.Tensor:
        raise AssertionError("the matmul dequantized the whole matrix")

    monkeypatch.setattr(QuantizedTensor, "dequantize", no_copy)
    got = torch.nn.functional.linear(x, weight)
    assert got.shape == (rows, 48) and got.dtype == torch.float32
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()


def test_a_legacy_file_is_recognised_by_name_and_exact_size_only(tmp_path: Path, state: tuple) -> None:
    path = write(tmp_path, state, 0)
    renamed = tmp_path / "model.pt"
    renamed.write_bytes(path.read_bytes())
    raises(errors.UnknownFormatError, renamed, "not a checkpoint")
    with pytest.raises(errors.SourceNotFoundError):  # never picked from a folder
        sparsemap.open(tmp_path)


def test_a_legacy_dim_that_reads_as_a_pickle_opcode_is_llama2c(tmp_path: Path) -> None:
    # dim 640 is 80 02 00 00: the first bytes of a pickle of protocol 2.
    header = Llama2cHeader(0, dim=640, hidden_dim=16, n_layers=1, n_heads=10, n_kv_heads=1, vocab_size=4,
                           seq_len=2, shared=True)
    path = tmp_path / "wide.bin"
    content = PARAMS.pack(640, 16, 1, 10, 1, 4, 2)
    path.write_bytes(content + bytes(header.file_nbytes() - len(content)))
    assert path.read_bytes()[:2] == b"\x80\x02"
    cat = sparsemap.open(path)
    assert cat.format == "llama2c" and cat["model.layers.0.self_attn.q_proj.weight"].shape == (640, 640)
    path.write_bytes(path.read_bytes()[:-4])
    raises(errors.TruncatedFileError, path, str(header.file_nbytes()), str(header.file_nbytes() - 4))


def _patch(path: Path, offset: int, fmt: str, *values: object) -> Path:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, *values)
    path.write_bytes(bytes(data))
    return path


def test_legacy_faults(tmp_path: Path) -> None:
    sd = random_state(CFG, shared=False)
    path = write_llama2c(tmp_path / "m.bin", (sd, CFG), 0)
    size = path.stat().st_size
    # The sign says "own classifier" but the size is that of a shared one: refused, not guessed.
    shared_size = size - 40 * 32 * 4
    cut = tmp_path / "cut.bin"
    cut.write_bytes(path.read_bytes()[:shared_size])
    raises(errors.Llama2cFormatError, cut, "not shared", str(shared_size), "disagree")
    cut.write_bytes(path.read_bytes()[:size - 1])
    raises(errors.TruncatedFileError, cut, str(size), str(size - 1), "no magic")
    cut.write_bytes(path.read_bytes() + bytes(3))
    raises(errors.TrailingBytesError, cut, "3 bytes", "run.c ignores")
    # A header no model has (dim not a multiple of n_heads): not llama2.c at all.
    raises(errors.UnknownFormatError, _patch(cut, 0, "<i", 33), "not a checkpoint")


@pytest.mark.parametrize(("version", "offset", "fmt", "value", "error", "needles"), [
    (1, 4, "<i", 3, errors.Llama2cFormatError, ("version 3",)),
    (1, 8, "<i", -32, errors.Llama2cFormatError, ("dim is -32",)),
    (1, 8 + 4 * 3, "<i", 5, errors.Llama2cFormatError, ("dim 32", "n_heads 5")),
    (1, 8 + 4 * 4, "<i", 3, errors.Llama2cFormatError, ("n_heads 4", "n_kv_heads 3")),
    (1, 8 + 4 * 5, "<i", -40, errors.Llama2cFormatError, ("vocab_size is -40",)),
    (1, 36, "<B", 7, errors.Llama2cFormatError, ("flag", "7")),
    (2, 37, "<i", 0, errors.Llama2cFormatError, ("group size is 0",)),
    (2, 37, "<i", 7, errors.Llama2cFormatError, ("groups of 7", "model.embed_tokens.weight")),
    (1, 8 + 4 * 2, "<i", 2**31 - 1, errors.TruncatedFileError, ("needs", "the file has")),
    (1, 8 + 4 * 5, "<i", 2**31 - 1, errors.SizeOverflowError, ("2**63", "model.embed_tokens.weight")),
])
def test_versioned_header_faults(tmp_path: Path, version: int, offset: int, fmt: str, value: int,
                                 error: type, needles: tuple) -> None:
    sd = random_state(CFG)
    path = write_llama2c(tmp_path / "m.bin", (sd, CFG), version, group_size=32)
    if error is errors.SizeOverflowError:  # a vocabulary of 2**31 words of dim 2**31
        _patch(path, 8, "<i", 2**31 - 32)
    raises(error, _patch(path, offset, fmt, value), *needles)


def test_versioned_size_faults(tmp_path: Path) -> None:
    path = write_llama2c(tmp_path / "m.bin", (random_state(CFG), CFG), 2, group_size=32)
    content = path.read_bytes()
    path.write_bytes(content[:100])
    raises(errors.TruncatedFileError, path, "256 bytes", "100")
    path.write_bytes(content[:-8])
    raises(errors.TruncatedFileError, path, str(len(content)), str(len(content) - 8))
    path.write_bytes(content + b"\0")
    raises(errors.TrailingBytesError, path, "1 bytes after the last tensor")
    assert path.read_bytes()[:4] == struct.pack("<I", AK42) == b"24ka"


def test_rotary_order_is_export_pys_permutation() -> None:
    w = torch.arange(24 * 3).view(24, 3)
    for heads in (1, 2, 3):
        stored = meta_order(w, heads)
        order = torch.tensor(rotary_order(24, heads))
        assert torch.equal(stored, w[order])  # stored row k is transformers' row order[k]
