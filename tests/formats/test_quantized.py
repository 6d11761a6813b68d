"""sparsemap.formats.quantized: which tensors become int4 or int8, and the document that says so.

:func:`scheme_for` is checked rule by rule (GGUF types kept, float modes,
tensors that stay plain, gathered rows and odd row counts going int8). Each
malformed quantization document is written by hand into an otherwise valid
safetensors file and must be refused by :func:`sparsemap.open` with
:class:`QuantizationError`, its message naming the file and the weight. GGUF
files converted with ``Layout(quantize="keep")`` must reopen with their
weights quantized and dequantize to what ``gguf`` dequantizes (exactly for
int8, within bf16 rounding of the scales for int4); a type with no kernel
layout must be refused, naming the tensor and the types there are.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import sparsemap
from sparsemap import errors
from sparsemap.converter import convert
from sparsemap.formats.quantized import (
    FROM_GGUF,
    GATHERED,
    QUANT_VERSION,
    document,
    part_specs,
    scheme_for,
)
from sparsemap.formats.reserved import QUANT_KEY
from sparsemap.writer import Layout

from ..conftest import ModuleFolders
from ..helpers import raises, write_gguf

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402 - only after importorskip found gguf
from gguf.quants import dequantize, quantize  # noqa: E402 - only after importorskip found gguf

LAYOUT = "torch-cpu-int4pack:TEST:0000000000000000"  # not this torch's: opening must not care


# ---------------------------------------------------------------- scheme_for

@pytest.mark.parametrize(("encoding", "shape", "want"), [
    ("Q4_0", (32, 64), ("int4", 32, True)),  # int4 always stores a zero beside each scale
    ("Q4_1", (32, 64), ("int4", 32, True)),
    ("Q4_K", (32, 256), ("int4", 32, True)),
    ("Q8_0", (32, 64), ("int8", 32, False)),
    ("Q6_K", (32, 256), ("int8", 16, False)),
])
def test_keep_maps_gguf_types(encoding: str, shape: tuple[int, int], want: tuple[str, int, bool]) -> None:
    assert scheme_for("blk.0.ffn_up.weight", shape, "F32", encoding, "keep") == want


@pytest.mark.parametrize(("mode", "dtype", "shape", "want"), [
    ("q8_0", "F32", (32, 64), ("int8", 32, False)),
    ("q4_1", "F16", (32, 64), ("int4", 32, True)),
    ("q4_1", "BF16", (48, 96), ("int4", 32, True)),
    ("int8", "BF16", (32, 112), ("int8", 112, False)),  # one group per row: any K the kernel reads
])
def test_float_modes_quantize_2d_floats(mode: str, dtype: str, shape: tuple[int, int],
                                        want: tuple[str, int, bool]) -> None:
    assert scheme_for("layers.0.proj.weight", shape, dtype, None, mode) == want


@pytest.mark.parametrize(("mode", "dtype", "shape"), [
    ("q8_0", "F32", (64,)),  # 1-D: a norm, a bias
    ("q4_1", "F32", (64,)),
    ("q8_0", "F32", (32, 48)),  # rows not a multiple of 32
    ("q4_1", "F32", (32, 40)),
    ("q8_0", "F32", (2, 32, 64)),  # 3-D
    ("q8_0", "F32", (0, 64)),  # empty
    ("int8", "F32", (32, 0)),
    ("q8_0", "I32", (32, 64)),  # not floating
    ("keep", "F32", (32, 64)),  # keep quantizes nothing that is not quantized already
])
def test_tensors_that_stay_plain(mode: str, dtype: str, shape: tuple[int, ...]) -> None:
    assert scheme_for("layers.0.proj.weight", shape, dtype, None, mode) is None


def test_no_mode_keeps_everything_as_it_is() -> None:
    assert scheme_for("blk.0.ffn_up.weight", (32, 64), "F32", "Q4_0", None) is None
    assert scheme_for("layers.0.proj.weight", (32, 64), "F32", None, None) is None


def test_a_gguf_type_wins_over_a_float_mode() -> None:
    assert scheme_for("blk.0.ffn_up.weight", (32, 64), "F32", "Q4_0", "q8_0") == ("int4", 32, True)


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "token_embd.weight", "transformer.wte.weight",
                                  "bert.embeddings.word_embeddings.weight", "encoder.embeddings.weight"])
def test_gathered_weights_go_int8_not_int4(name: str) -> None:
    assert scheme_for(name, (32, 64), "F32", None, "q4_1") == ("int8", 32, True)
    assert scheme_for(name, (32, 64), "F32", "Q4_1", "keep") == ("int8", 32, True)
    assert scheme_for(name, (32, 64), "F32", None, "q8_0") == ("int8", 32, False)  # int8 anyway
    assert scheme_for("layers.0.proj.weight", (32, 64), "F32", None, "q4_1")[0] == "int4"


def test_gathered_patterns_can_be_chosen() -> None:
    assert scheme_for("model.embed_tokens.weight", (32, 64), "F32", None, "q4_1", gathered=())[0] == "int4"
    assert scheme_for("lm_head.weight", (32, 64), "F32", None, "q4_1", gathered=("lm_head*",))[0] == "int8"
    assert "*embed_tokens*" in GATHERED


@pytest.mark.parametrize("rows", [8, 24, 40])
def test_rows_not_a_multiple_of_16_go_int8(rows: int) -> None:
    assert scheme_for("layers.0.proj.weight", (rows, 64), "F32", None, "q4_1") == ("int8", 32, True)
    assert scheme_for("blk.0.ffn_up.weight", (rows, 64), "F32", "Q4_1", "keep") == ("int8", 32, True)


@pytest.mark.parametrize("mode", ["q4_0", "Q8_0", "int4", ""])
def test_unknown_mode_is_refused(mode: str) -> None:
    with pytest.raises(errors.LayoutOptionError, match="quantize must be one of keep, q8_0, q4_1, int8"):
        scheme_for("w", (32, 64), "F32", None, mode)
    with pytest.raises(errors.LayoutOptionError):
        Layout(quantize=mode)


def test_unsupported_gguf_type_is_refused_naming_the_supported_ones() -> None:
    with pytest.raises(errors.UnsupportedQuantizationError) as info:
        scheme_for("blk.0.ffn_up.weight", (32, 256), "F32", "IQ4_XS", "keep")
    assert info.value.tensor == "blk.0.ffn_up.weight"
    assert "IQ4_XS" in str(info.value)
    assert "Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q8_0, Q6_K, Q5_K, Q3_K, Q2_K" in str(info.value)


@pytest.mark.parametrize("shape", [(64,), (4, 32, 64)])  # a vector; a stack of experts' matrices
def test_a_gguf_tensor_no_kernel_takes_is_stored_dequantized(shape: tuple[int, ...]) -> None:
    assert scheme_for("blk.0.ffn_up_exps.weight", shape, "F32", "Q8_0", "keep") is None


def test_part_specs() -> None:
    assert part_specs("w", "int4", (32, 64), 32, True) == [("w@int4", "U8", (32, 32)),
                                                          ("w@int4.scale_zero", "BF16", (2, 32, 2))]
    assert part_specs("w", "int8", (32, 64), 16, False) == [("w@int8", "I8", (4, 32, 16)),
                                                           ("w@int8.scale", "F32", (4, 32))]
    assert part_specs("w", "int8", (32, 64), 64, True) == [("w@int8", "I8", (1, 32, 64)),
                                                          ("w@int8.scale", "F32", (1, 32)),
                                                          ("w@int8.zero", "F32", (1, 32))]


def test_document() -> None:
    text = document({"a": ("int4", (32, 64), 32, True, "Q4_1", None),
                     "b": ("int4", (32, 64), 32, True, "Q4_1", "a")}, LAYOUT)
    assert json.loads(text) == {"version": QUANT_VERSION, "int4_layout": LAYOUT, "weights": {
        "a": {"scheme": "int4", "shape": [32, 64], "group": 32, "zero": True, "from": "Q4_1"},
        "b": {"tied": "a"}}}


# ---------------------------------------------------------------- documents checked on open

def w_spec(**changes: object) -> dict[str, object]:
    """The document entry of ``w``: int8 (16, 64) in groups of 32, no zero."""
    return {"scheme": "int8", "shape": [16, 64], "group": 32, "zero": False, "from": "F32", **changes}


def v_spec(**changes: object) -> dict[str, object]:
    """The document entry of ``v``: int4 (16, 64) in groups of 32."""
    return {"scheme": "int4", "shape": [16, 64], "group": 32, "zero": True, "from": "Q4_1", **changes}


def doc(int4_layout: object = LAYOUT, **weights: object) -> dict[str, object]:
    return {"version": QUANT_VERSION, "int4_layout": int4_layout,
            "weights": weights or {"w": w_spec(), "v": v_spec()}}


def parts() -> dict[str, torch.Tensor]:
    """The stored parts of ``w`` and ``v`` (see ``w_spec`` and ``v_spec``) and a plain ``norm``."""
    return {
        "norm": torch.ones(64),  # (64,)
        "w@int8": torch.arange(2 * 16 * 32).remainder(255).sub(127).to(torch.int8).view(2, 16, 32),
        "w@int8.scale": torch.full((2, 16), 0.5),  # (G, N)
        "v@int4": torch.zeros(16, 32, dtype=torch.uint8),  # (N, K/2)
        "v@int4.scale_zero": torch.ones(2, 16, 2, dtype=torch.bfloat16),  # (G, N, 2)
    }


def quant_file(tmp_path: Path, document_: object = None, *, raw: str | None = None,
               drop: tuple[str, ...] = (), extra: dict[str, torch.Tensor] | None = None) -> Path:
    """A safetensors file with ``parts()`` (less ``drop``, plus ``extra``) and a quantization document."""
    tensors = {n: t for n, t in parts().items() if n not in drop}
    tensors.update(extra or {})
    path = tmp_path / "quantized.safetensors"
    text = raw if raw is not None else json.dumps(doc() if document_ is None else document_)
    save_file(tensors, str(path), metadata={"format": "pt", QUANT_KEY: text})
    return path


def test_a_valid_document_lists_each_weight_once(tmp_path: Path) -> None:
    cat = sparsemap.open(quant_file(tmp_path))
    assert set(cat) == {"norm", "w", "v"}  # parts hidden
    assert set(cat.quantized) == {"w", "v"}
    w, v = cat.quantized["w"], cat.quantized["v"]
    assert (w.scheme, w.shape, w.group, w.source, w.int4_layout) == ("int8", (16, 64), 32, "F32", None)
    assert [p.name for p in w.parts] == ["w@int8", "w@int8.scale"]
    assert (v.scheme, v.int4_layout) == ("int4", LAYOUT)
    assert [p.name for p in v.parts] == ["v@int4", "v@int4.scale_zero"]
    assert (cat["w"].encoding, cat["w"].dtype, cat["w"].shape, cat["w"].offset) == ("int8", "F32", (16, 64),
                                                                                   w.q.offset)
    assert cat["v"].encoding == "int4" and cat["norm"].encoding is None


def test_a_valid_int8_weight_dequantizes(tmp_path: Path) -> None:
    ckpt = sparsemap.Checkpoint(quant_file(tmp_path))
    stored = parts()
    want = stored["w@int8"].float().transpose(0, 1).reshape(16, 64) * 0.5  # (N, K)
    assert torch.equal(ckpt.tensor("w"), want)


def test_an_int4_weight_of_another_layout_opens_but_is_not_served(tmp_path: Path) -> None:
    ckpt = sparsemap.Checkpoint(quant_file(tmp_path))
    with pytest.raises(errors.QuantizationError) as info:
        ckpt.tensor("v")
    assert info.value.tensor == "v" and LAYOUT in str(info.value)
    with pytest.raises(errors.QuantizationError):
        ckpt.tensor("v", keep_quantized=True)


def test_a_tied_weight_reads_the_parts_of_its_target(tmp_path: Path) -> None:
    cat = sparsemap.open(quant_file(tmp_path, doc(w=w_spec(), v=v_spec(), head={"tied": "w"})))
    assert set(cat) == {"norm", "w", "v", "head"}
    head = cat.quantized["head"]
    assert head.name == "head" and head.parts == cat.quantized["w"].parts
    assert cat["head"].encoding == "int8"
    ckpt = sparsemap.Checkpoint(cat)
    assert torch.equal(ckpt.tensor("head"), ckpt.tensor("w"))


@pytest.mark.parametrize(("raw", "needle"), [
    ("{not json", "is not JSON"),
    ("[]", f"version {QUANT_VERSION}"),
    (json.dumps({"version": 2, "int4_layout": LAYOUT, "weights": {}}), f"version {QUANT_VERSION}"),
    (json.dumps({"int4_layout": LAYOUT, "weights": {}}), f"version {QUANT_VERSION}"),
    (json.dumps({"version": QUANT_VERSION, "int4_layout": LAYOUT, "weights": []}), "weights"),
    (json.dumps({"version": QUANT_VERSION, "int4_layout": 7, "weights": {}}), "int4_layout must be a string"),
])
def test_malformed_document_is_refused(tmp_path: Path, raw: str, needle: str) -> None:
    path = quant_file(tmp_path, raw=raw)
    raises(errors.QuantizationError, path, QUANT_KEY, needle)


@pytest.mark.parametrize(("spec", "needle"), [
    (w_spec(scheme="int2"), "'int2' is not int4 or int8"),
    ({k: v for k, v in w_spec().items() if k != "scheme"}, "is not int4 or int8"),
    (w_spec(shape="16x64"), "'shape' must be list"),
    (w_spec(shape=[16, 64, 1]), "not two positive integers"),
    (w_spec(shape=[16, 0]), "not two positive integers"),
    (w_spec(shape=[16.0, 64]), "not two positive integers"),
    (w_spec(group="32"), "'group' must be int"),
    (w_spec(group=True), "'group' must be int"),
    (w_spec(zero=0), "'zero' must be bool"),
    (w_spec(**{"from": None}), "'from' must be str"),
    (w_spec(group=24), "cannot have groups of 24"),  # does not divide K = 64
    (w_spec(group=8), "cannot have groups of 8"),  # divides K, but the int8 kernel reads runs of 16
    (w_spec(group=0), "cannot have groups of 0"),
    (w_spec(group=-32), "cannot have groups of -32"),
    ("int8", "must be an object"),
])
def test_malformed_weight_entry_is_refused(tmp_path: Path, spec: object, needle: str) -> None:
    path = quant_file(tmp_path, doc(w=spec, v=v_spec()))
    err = raises(errors.QuantizationError, path, "tensor 'w'", needle)
    assert err.tensor == "w"


@pytest.mark.parametrize(("spec", "needle"), [
    (v_spec(group=16), "cannot have groups of 16"),  # divides K, but the int4 kernel takes 32..256
    (v_spec(shape=[24, 64]), "cannot have groups of 32"),  # rows not a multiple of 16
])
def test_int4_group_or_rows_the_kernel_refuses(tmp_path: Path, spec: object, needle: str) -> None:
    path = quant_file(tmp_path, doc(w=w_spec(), v=spec))
    assert raises(errors.QuantizationError, path, "tensor 'v'", needle).tensor == "v"


def test_int4_without_the_files_int4_layout(tmp_path: Path) -> None:
    path = quant_file(tmp_path, doc(int4_layout=None))
    raises(errors.QuantizationError, path, "tensor 'v'", "int4_layout")


def test_int8_alone_needs_no_int4_layout(tmp_path: Path) -> None:
    path = quant_file(tmp_path, doc(int4_layout=None, w=w_spec()), drop=("v@int4", "v@int4.scale_zero"))
    assert set(sparsemap.open(path).quantized) == {"w"}


@pytest.mark.parametrize(("name", "weight"), [("w@int8", "w"), ("w@int8.scale", "w"),
                                              ("v@int4", "v"), ("v@int4.scale_zero", "v")])
def test_missing_part(tmp_path: Path, name: str, weight: str) -> None:
    path = quant_file(tmp_path, drop=(name,))
    raises(errors.QuantizationError, path, f"tensor '{weight}'", f"part '{name}' is missing")


def test_missing_zero_part(tmp_path: Path) -> None:
    path = quant_file(tmp_path, doc(w=w_spec(zero=True), v=v_spec()))
    raises(errors.QuantizationError, path, "tensor 'w'", "part 'w@int8.zero' is missing")


@pytest.mark.parametrize(("name", "bad", "weight", "should"), [
    ("w@int8.scale", torch.full((2, 16), 0.5, dtype=torch.float16), "w", "should be plain F32 [2, 16]"),
    ("w@int8.scale", torch.full((16, 2), 0.5), "w", "should be plain F32 [2, 16]"),
    ("w@int8", torch.zeros(16, 64, dtype=torch.int8), "w", "should be plain I8 [2, 16, 32]"),
    ("w@int8", torch.zeros(2, 16, 32, dtype=torch.uint8), "w", "should be plain I8 [2, 16, 32]"),
    ("v@int4", torch.zeros(16, 64, dtype=torch.uint8), "v", "should be plain U8 [16, 32]"),
    ("v@int4.scale_zero", torch.ones(2, 16, 2), "v", "should be plain BF16 [2, 16, 2]"),
])
def test_part_of_the_wrong_dtype_or_shape(tmp_path: Path, name: str, bad: torch.Tensor, weight: str,
                                          should: str) -> None:
    path = quant_file(tmp_path, extra={name: bad})
    raises(errors.QuantizationError, path, f"tensor '{weight}'", f"part '{name}'", should)


@pytest.mark.parametrize("orphan", ["x@int8", "x@int4.scale_zero", "w@int8.zero"])
def test_a_part_no_weight_claims(tmp_path: Path, orphan: str) -> None:
    path = quant_file(tmp_path, extra={orphan: torch.zeros(4, dtype=torch.int8)})
    raises(errors.QuantizationError, path, f"tensor '{orphan}'", "no weight claims it")


def test_a_weight_named_like_a_stored_tensor(tmp_path: Path) -> None:
    path = quant_file(tmp_path, doc(w=w_spec(), v=v_spec(), norm=w_spec()))
    raises(errors.QuantizationError, path, "tensor 'norm'", "collides with a stored tensor")


@pytest.mark.parametrize("target", ["missing", "norm", "head"])
def test_tied_to_what_is_not_a_quantized_weight(tmp_path: Path, target: str) -> None:
    path = quant_file(tmp_path, doc(w=w_spec(), v=v_spec(), head={"tied": target}))
    raises(errors.QuantizationError, path, "tensor 'head'", f"tied to '{target}'")


def test_tied_to_a_non_string(tmp_path: Path) -> None:
    path = quant_file(tmp_path, doc(w=w_spec(), v=v_spec(), head={"tied": 3}))
    raises(errors.QuantizationError, path, "tensor 'head'", "'tied' must be str")


# ---------------------------------------------------------------- GGUF files kept quantized

def k_quant_blocks(qtype: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant (or IQ4_XS) blocks with finite f16 scales: (n, bytes per row) uint8."""
    size, scale_at = {"Q4_K": (144, (0, 2)), "Q6_K": (210, (208,)), "Q5_K": (176, (0, 2)),
                      "Q3_K": (110, (108,)), "Q2_K": (84, (80, 82)), "IQ4_XS": (136, (0,))}[qtype]
    blocks = rng.integers(0, 256, (n, k // 256, size), dtype=np.uint8)  # (n, super-blocks, size)
    for start in scale_at:
        d = rng.uniform(0.001, 0.1, (n, k // 256, 1)).astype(np.float16)  # (n, S, 1)
        blocks[..., start:start + 2] = d.view(np.uint8)
    return blocks.reshape(n, -1)


# name -> (GGUF type, shape, scheme kept as)
KEPT = {
    "blk.0.attn_q.weight": ("Q4_0", (32, 64), "int4"),
    "blk.0.ffn_up.weight": ("Q4_1", (48, 64), "int4"),
    "blk.0.ffn_down.weight": ("Q8_0", (32, 64), "int8"),
    "blk.0.attn_k.weight": ("Q4_K", (16, 256), "int4"),
    "blk.0.attn_v.weight": ("Q6_K", (16, 256), "int8"),
    "blk.0.ffn_gate.weight": ("Q5_K", (16, 512), "int8"),
    "blk.1.attn_q.weight": ("Q3_K", (16, 256), "int8"),
    "blk.1.attn_k.weight": ("Q2_K", (32, 256), "int8"),
    "token_embd.weight": ("Q4_1", (32, 64), "int8"),  # gathered rows
}


@pytest.fixture(scope="module")
def kept_gguf(module_folders: ModuleFolders) -> tuple[Path, Path]:
    """(source GGUF, its conversion with quantize="keep")."""
    rng = np.random.default_rng(0)
    tensors: dict[str, tuple[np.ndarray, Q | None]] = {}
    for name, (qtype, (n, k), _) in KEPT.items():
        if qtype.endswith("_K"):
            tensors[name] = (k_quant_blocks(qtype, n, k, rng), Q[qtype])
        else:
            tensors[name] = (quantize(rng.standard_normal((n, k)).astype(np.float32), Q[qtype]), Q[qtype])
    tensors["output_norm.weight"] = (rng.standard_normal(64).astype(np.float32), None)
    folder = module_folders.make("kept")
    src = write_gguf(folder / "model.gguf", tensors)
    dst = folder / "model.sparsemap.safetensors"
    convert(src, dst, layout=Layout(quantize="keep"))
    return src, dst


def gguf_values(src: Path, name: str) -> torch.Tensor:
    """What gguf itself dequantizes the tensor ``name`` to: (N, K) float32."""
    tensor = next(t for t in gguf.GGUFReader(str(src)).tensors if t.name == name)
    return torch.from_numpy(np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))


def test_kept_gguf_reopens_quantized(kept_gguf: tuple[Path, Path]) -> None:
    from sparsemap.quantize import int4_layout

    _, dst = kept_gguf
    cat = sparsemap.open(dst)
    assert set(cat) == {*KEPT, "output_norm.weight"}
    assert set(cat.quantized) == set(KEPT)
    assert cat["output_norm.weight"].encoding is None and cat["output_norm.weight"].dtype == "F32"
    for name, (qtype, shape, scheme) in KEPT.items():
        weight = cat.quantized[name]
        assert (weight.scheme, weight.shape, weight.source) == (scheme, shape, qtype), name
        assert weight.group == FROM_GGUF[qtype][1]
        assert weight.int4_layout == (int4_layout() if scheme == "int4" else None)
        assert (cat[name].encoding, cat[name].dtype, cat[name].shape) == (scheme, "F32", shape)


@pytest.mark.parametrize("name", list(KEPT))
def test_kept_gguf_dequantizes_to_what_gguf_reads(kept_gguf: tuple[Path, Path], name: str) -> None:
    from sparsemap.quantize import from_gguf

    src, dst = kept_gguf
    want = gguf_values(src, name)  # (N, K)
    got = sparsemap.Checkpoint(dst).tensor(name)
    qtype, (n, k), scheme = KEPT[name]
    assert got.shape == (n, k) and got.dtype == torch.float32
    if scheme == "int8":
        assert torch.equal(got, want)
        return
    # int4 stores bf16 scales and zeros (8 significant bits): each group is off by that rounding at most.
    coded = from_gguf(sparsemap.Checkpoint(src).raw(name), qtype, (n, k))
    bound = 2 ** -8 * (coded.zero.abs() + 32 * coded.scale.abs())  # (N, G)
    err = (got - want).abs().view(n, -1, coded.group).amax(-1)  # (N, G)
    assert (err <= bound + 1e-7).all()
    assert not torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("name", list(KEPT))
def test_kept_gguf_runs_linear(kept_gguf: tuple[Path, Path], name: str) -> None:
    src, dst = kept_gguf
    qt = sparsemap.Checkpoint(dst).tensor(name, keep_quantized=True)
    x = torch.randn(3, KEPT[name][1][1], generator=torch.Generator().manual_seed(0))  # (3, K)
    want = F.linear(x, gguf_values(src, name))  # (3, N)
    got = F.linear(x, qt)
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()


@pytest.mark.parametrize(("name", "shape"), [("token_embd.weight", (32, 64)),  # gathered
                                            ("blk.0.ffn_gate.weight", (24, 64))])  # 24 rows
def test_q4_0_kept_as_int8_keeps_its_offset(tmp_path: Path, name: str, shape: tuple[int, int]) -> None:
    w = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    src = write_gguf(tmp_path / "q4_0.gguf", {name: (quantize(w, Q.Q4_0), Q.Q4_0)})
    dst = tmp_path / "q4_0.safetensors"
    convert(src, dst, layout=Layout(quantize="keep"))
    assert sparsemap.open(dst).quantized[name].scheme == "int8"
    assert torch.equal(sparsemap.Checkpoint(dst).tensor(name), gguf_values(src, name))


def test_a_type_with_no_kernel_layout_is_stored_dequantized_with_a_note(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An IQ4_XS file's other weights are still kept; its IQ4_XS weight is float32, named in one line."""
    rng = np.random.default_rng(2)
    src = write_gguf(tmp_path / "iq4_xs.gguf", {
        "blk.0.ffn_up.weight": (k_quant_blocks("IQ4_XS", 16, 256, rng), Q.IQ4_XS),
        "blk.0.ffn_down.weight": (k_quant_blocks("Q5_K", 16, 256, rng), Q.Q5_K),
        "output_norm.weight": (rng.standard_normal(64).astype(np.float32), None),
    })
    dst = tmp_path / "iq4_xs.safetensors"
    with caplog.at_level("WARNING", logger="sparsemap"):
        convert(src, dst, layout=Layout(quantize="keep"))
    cat = sparsemap.open(dst)
    assert set(cat.quantized) == {"blk.0.ffn_down.weight"}
    assert cat["blk.0.ffn_up.weight"].dtype == "F32" and cat["blk.0.ffn_up.weight"].encoding is None
    for name in ("blk.0.ffn_up.weight", "blk.0.ffn_down.weight"):
        assert torch.equal(sparsemap.Checkpoint(dst).tensor(name), gguf_values(src, name)), name
    notes = [r.getMessage() for r in caplog.records if "stored dequantized" in r.getMessage()]
    assert len(notes) == 1, notes
    assert str(src) in notes[0] and "1 tensor(s)" in notes[0] and "blk.0.ffn_up.weight" in notes[0]
    assert "IQ4_XS blocks have no kernel layout (kept: Q4_0" in notes[0] and "Q2_K" in notes[0]
    # A mode that quantizes floats quantizes the IQ4_XS weight's values; the Q5_K blocks stay as they are.
    q8 = tmp_path / "iq4_xs-q8_0.safetensors"
    convert(src, q8, layout=Layout(quantize="q8_0"))
    weights = sparsemap.open(q8).quantized
    assert (weights["blk.0.ffn_up.weight"].source, weights["blk.0.ffn_down.weight"].source) == ("F32", "Q5_K")
    want = gguf_values(src, "blk.0.ffn_up.weight")
    got = sparsemap.Checkpoint(q8).tensor("blk.0.ffn_up.weight")
    assert (got - want).abs().max() <= want.abs().max() / 127  # int8 steps of a group's largest value


def test_int8_rows_the_kernel_cannot_read_stay_plain() -> None:
    # The int8 kernel reads K in runs of 16: one scale per row of 24 would crash it.
    assert scheme_for("w", (16, 24), "F32", None, "int8") is None
    assert scheme_for("w", (16, 48), "F32", None, "int8") == ("int8", 48, False)


def test_a_tied_embedding_is_int8_whichever_name_comes_first(tmp_path: Path) -> None:
    w = torch.randn(64, 64)
    path = tmp_path / "tied.safetensors"
    tied = {"lm_head.weight": w, "model.embed_tokens.weight": w}  # the head first
    sparsemap.save(tied, path, layout=Layout(quantize="q4_1"))
    cat = sparsemap.open(path)
    assert {n: q.scheme for n, q in cat.quantized.items()} == {"lm_head.weight": "int8",
                                                             "model.embed_tokens.weight": "int8"}
    one = cat.quantized["lm_head.weight"]
    assert cat.nbytes == sum(e.nbytes for n, e in cat.items() if n not in cat.quantized) + one.nbytes
