"""sparsemap.formats.meta_llama: Meta's release (params.json + consolidated.NN.pth), read and checked.

The releases are a tiny transformers Llama split the way Meta's model-parallel code saves it
(``tests/format_writers.py``). Every file must come back under transformers' names with the dimension the
files split it along, each part equal to its slice of the model (q and k through their row order); each
inconsistent params.json or file set is refused with its own message.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sparsemap
from sparsemap import errors
from sparsemap.checkpoint import Checkpoint
from sparsemap.formats.llama2c import rotary_order as llama2c_order
from sparsemap.formats.meta_llama import read_params, read_params_dict, read_release, rotary_order
from sparsemap.formats.source import resolve_source
from sparsemap.models.gguf_hf import rotary_order as gguf_order

from ..format_writers import meta_state_dicts, tiny_llama, write_meta_release
from ..helpers import raises

BASE = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": -1, "multiple_of": 32,
        "ffn_dim_multiplier": 0.5, "norm_eps": 1e-5, "rope_theta": 10000.0}


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


# ---------------------------------------------------------------- params.json

def test_params_take_meta_defaults_and_compute_the_feed_forward_width():
    p = read_params_dict({"dim": 4096, "n_layers": 32, "n_heads": 32})  # Llama 2 7B's params.json
    assert (p.n_kv_heads, p.vocab_size, p.multiple_of, p.norm_eps, p.rope_theta) == (32, None, 256, 1e-5, 1e4)
    assert p.intermediate_size == 11008 and p.head_dim == 128
    # Llama 3 8B and Llama 2 70B, as transformers' conversion script computes them.
    assert read_params_dict({"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "multiple_of": 1024,
                             "ffn_dim_multiplier": 1.3}).intermediate_size == 14336
    assert read_params_dict({"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "multiple_of": 4096,
                             "ffn_dim_multiplier": 1.3}).intermediate_size == 28672
    assert read_params_dict({"model": dict(BASE)}) == read_params_dict(BASE)  # nested, as some releases do


@pytest.mark.parametrize(("change", "needle"), [
    ({"dim": "64"}, "dim is '64'"),
    ({"n_layers": True}, "n_layers is True"),
    ({"n_heads": 0}, "n_heads is 0"),
    ({"dim": 1 << 30}, "expected an integer from 1 to"),
    ({"n_heads": 5}, "dim 64 does not split into n_heads 5 heads"),
    ({"n_kv_heads": 3}, "n_heads 4 is not a multiple of n_kv_heads 3"),
    ({"dim": 12, "n_heads": 4, "n_kv_heads": 4}, "head size 3 (dim / n_heads) is odd"),
    ({"norm_eps": -1}, "norm_eps is -1"),
    ({"rope_theta": "inf"}, "rope_theta is 'inf'"),
    ({"use_scaled_rope": 1}, "use_scaled_rope is 1"),
    ({"vocab_size": 0}, "vocab_size is 0"),
    ({"quantization_args": {"scheme": "int4_weight_int8_dynamic_activation"}}, "a quantized release"),
    ({"vision_chunk_size": 560}, "a vision model"),
    ({"moe_args": {"num_experts": 16}}, "a mixture of experts"),
])
def test_each_bad_params_value_is_refused_by_name(tmp_path: Path, change: dict, needle: str):
    path = tmp_path / "params.json"
    path.write_text(json.dumps({**BASE, **change}))
    with pytest.raises(errors.MetaLlamaFormatError) as info:
        read_params(path)
    assert needle in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize(("text", "needle"), [(b"[1, 2]", "a JSON list"), (b"{\"dim\": 4", "is not JSON"),
                                              (b"\xff\xfe", "is not JSON"), (b"{}", "has no 'dim'")])
def test_params_that_are_no_object_of_parameters_are_refused(tmp_path: Path, text: bytes, needle: str):
    path = tmp_path / "params.json"
    path.write_bytes(text)
    with pytest.raises(errors.MetaLlamaFormatError, match=needle):
        read_params(path)


def test_an_oversized_params_json_is_not_read_whole(tmp_path: Path):
    path = tmp_path / "params.json"
    path.write_bytes(b" " * (2 << 20))
    with pytest.raises(errors.MetaLlamaFormatError, match="is over 1048576 bytes"):
        read_params(path)


# ---------------------------------------------------------------- finding a release

def test_a_release_is_found_by_its_folder_or_its_params_json(tmp_path: Path, model):
    folder = write_meta_release(tmp_path / "llama", model)
    for path in (folder, folder / "params.json"):
        src = resolve_source(path)
        assert (src.format, Path(src.weights).name, src.config, src.tokenizer) == \
            ("meta-llama", "params.json", None, None)
    # The file itself is a plain torch checkpoint under Meta's names.
    assert resolve_source(folder / "consolidated.00.pth").format == "torch-zip"
    assert "layers.0.attention.wq.weight" in sparsemap.open(folder / "consolidated.00.pth")


def test_params_json_without_consolidated_files_is_no_release(tmp_path: Path):
    # Mistral's releases: params.json beside consolidated.safetensors, another format.
    (tmp_path / "params.json").write_text(json.dumps(BASE))
    (tmp_path / "consolidated.safetensors").write_bytes(b"")
    with pytest.raises(errors.SourceNotFoundError, match=r"params\.json with consolidated\.NN\.pth"):
        resolve_source(tmp_path)


def test_hugging_face_weights_in_the_folder_come_first(tmp_path: Path, model):
    folder = write_meta_release(tmp_path / "llama", model)
    model.save_pretrained(folder)
    assert resolve_source(folder).format == "safetensors"


def test_a_gap_in_the_numbering_is_refused(tmp_path: Path, model):
    folder = write_meta_release(tmp_path / "llama", model, 2)
    (folder / "consolidated.01.pth").rename(folder / "consolidated.02.pth")
    raises(errors.MetaLlamaFormatError, folder, "not consolidated.01.pth", "every one is needed")


# ---------------------------------------------------------------- one file: transformers' names

def test_one_file_opens_under_transformers_names_with_q_and_k_in_transformers_order(tmp_path: Path, model):
    folder = write_meta_release(tmp_path / "llama", model)
    cat = sparsemap.open(folder)
    assert cat.format == "meta-llama" and set(cat) == set(model.state_dict())
    with Checkpoint(cat) as ckpt:
        for name, want in model.state_dict().items():
            assert torch.equal(ckpt[name], want), name
    q = cat["model.layers.0.self_attn.q_proj.weight"]
    assert q.order == rotary_order(64, 4) and not q.zero_copy
    assert cat["model.layers.0.self_attn.k_proj.weight"].order == rotary_order(32, 2)
    assert all(e.order is None for n, e in cat.items() if "q_proj" not in n and "k_proj" not in n)


def test_the_rotary_order_is_the_one_gguf_and_llama2c_files_inherited():
    for rows, heads in ((8, 1), (64, 4), (128, 2)):
        assert rotary_order(rows, heads) == gguf_order(rows, heads) == llama2c_order(rows, heads)


def test_a_tied_head_is_a_release_without_output_weight(tmp_path: Path):
    folder = write_meta_release(tmp_path / "llama", tiny_llama(shared=True))
    release = read_release(folder)
    assert release.tied and "lm_head.weight" not in release.ranks[0]


def test_vocab_size_minus_one_is_the_embeddings_rows(tmp_path: Path, model):
    assert read_release(write_meta_release(tmp_path / "a", model)).vocab_size == 300
    assert read_release(write_meta_release(tmp_path / "b", model, vocab_size=None)).vocab_size == 300
    folder = write_meta_release(tmp_path / "c", model, vocab_size=320)
    refused(folder, "consolidated.00.pth", "holds 300 rows", "params.json says vocab_size 320")


# ---------------------------------------------------------------- several files: each rank's slice

@pytest.mark.parametrize("embedding_dim", [1, 0], ids=["embedding-by-columns", "embedding-by-rows"])
def test_each_file_is_its_slice_of_the_model_split_as_fairscale_splits(tmp_path: Path, model,
                                                                       embedding_dim: int):
    folder = write_meta_release(tmp_path / "llama", model, 2, embedding_dim=embedding_dim)
    release = read_release(folder)
    assert len(release.ranks) == 2 and release.vocab_size == 300
    dims = release.split_dims
    assert dims["model.embed_tokens.weight"] == embedding_dim
    assert (dims["lm_head.weight"], dims["model.norm.weight"]) == (0, None)
    layer = "model.layers.1."
    assert [dims[layer + n] for n in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                      "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                      "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                                      "input_layernorm.weight", "post_attention_layernorm.weight")] == \
        [0, 0, 0, 1, 0, 0, 1, None, None]
    state = model.state_dict()
    for rank, cat in enumerate(release.ranks):
        # Each rank's q and k rows are in transformers' order over that rank's heads (2 of 4, 1 of 2).
        assert cat[layer + "self_attn.q_proj.weight"].order == rotary_order(32, 2)
        assert cat[layer + "self_attn.k_proj.weight"].order == rotary_order(16, 1)
        with Checkpoint(cat) as ckpt:
            for name, whole in state.items():
                assert release.shape(name) == tuple(whole.shape)
                dim = dims[name]
                want = whole if dim is None else whole.chunk(2, dim=dim)[rank]
                assert torch.equal(ckpt[name], want), (rank, name)


def test_a_release_in_several_files_is_refused_as_one_model_with_the_line_that_joins_it(tmp_path: Path,
                                                                                         model):
    folder = write_meta_release(tmp_path / "llama", model, 2)
    err = raises(errors.ShardedReleaseError, folder, "2 model-parallel files",
                 "consolidated.00.pth ... consolidated.01.pth", f"sparsemap convert {folder} OUT/")
    assert "\n" not in str(err)


def refused(folder: Path, file_name: str, *needles: str) -> None:
    """Open the release at ``folder``: a MetaLlamaFormatError naming ``folder/file_name`` and ``needles``."""
    with pytest.raises(errors.SparsemapError) as info:
        sparsemap.open(folder)
    assert type(info.value) is errors.MetaLlamaFormatError, f"{type(info.value).__name__}: {info.value}"
    for needle in (str(folder / file_name), *needles):
        assert needle in str(info.value), f"{needle!r} not in {str(info.value)!r}"


def _save(folder: Path, sds: list[dict]) -> None:
    for i, sd in enumerate(sds):
        torch.save(sd, folder / f"consolidated.{i:02d}.pth")


def test_files_that_do_not_hold_the_same_tensors_are_refused(tmp_path: Path, model):
    folder = write_meta_release(tmp_path / "llama", model, 2)
    sds = meta_state_dicts(model, 2)
    del sds[1]["layers.1.ffn_norm.weight"]
    _save(folder, sds)
    refused(folder, "consolidated.01.pth", "does not hold the tensors consolidated.00.pth holds",
            "layers.1.ffn_norm.weight")


def test_a_tensor_that_is_not_llamas_is_refused_by_name(tmp_path: Path, model):
    folder = write_meta_release(tmp_path / "llama", model)
    sd = meta_state_dicts(model, 1)[0]
    sd["layers.2.attention.wq.weight"] = torch.zeros(4)  # a layer params.json does not have
    _save(folder, [sd])
    refused(folder, "consolidated.00.pth", "'layers.2.attention.wq.weight'", "n_layers 2")


def test_a_missing_tensor_is_refused_by_name(tmp_path: Path, model):
    folder = write_meta_release(tmp_path / "llama", model)
    sd = meta_state_dicts(model, 1)[0]
    del sd["layers.1.feed_forward.w2.weight"]
    _save(folder, [sd])
    refused(folder, "consolidated.00.pth", "lacks 1 of the model's tensors",
            "layers.1.feed_forward.w2.weight")


def test_rope_freqs_of_llama_1_is_left_out(tmp_path: Path, model):
    folder = write_meta_release(tmp_path / "llama", model)
    sd = meta_state_dicts(model, 1)[0]
    sd["rope.freqs"] = torch.ones(8)
    _save(folder, [sd])
    cat = sparsemap.open(folder)
    assert "rope.freqs" not in cat and len(cat) == len(model.state_dict())


def test_a_feed_forward_width_params_json_does_not_give_is_refused_with_its_numbers(tmp_path: Path, model):
    folder = write_meta_release(tmp_path / "llama", model, ffn_dim_multiplier=None)  # 192, not the model's 96
    refused(folder, "consolidated.00.pth", "has shape (96, 64)", "makes it (192, 64)",
            "multiple_of 32 and ffn_dim_multiplier None give a feed-forward width of 192")


def test_a_part_of_the_wrong_size_is_refused_with_both_shapes(tmp_path: Path, model):
    folder = write_meta_release(tmp_path / "llama", model, 2)
    sds = meta_state_dicts(model, 2)
    sds[1]["layers.0.attention.wo.weight"] = sds[1]["layers.0.attention.wo.weight"][:, :16].clone()
    _save(folder, sds)
    refused(folder, "consolidated.01.pth", "layers.0.attention.wo.weight", "has shape (64, 16)",
            "(64, 32) in each file")


def test_parts_of_different_dtypes_are_refused(tmp_path: Path, model):
    folder = write_meta_release(tmp_path / "llama", model, 2)
    sds = meta_state_dicts(model, 2)
    sds[1]["layers.0.attention.wv.weight"] = sds[1]["layers.0.attention.wv.weight"].bfloat16()
    _save(folder, sds)
    refused(folder, "consolidated.01.pth", "is BF16 here but F32 in consolidated.00.pth")


def test_heads_the_file_count_does_not_divide_are_refused(tmp_path: Path):
    folder = write_meta_release(tmp_path / "llama", tiny_llama(num_key_value_heads=1), 2)
    raises(errors.MetaLlamaFormatError, folder, "n_kv_heads 1 do not split over 2 files")


def test_an_embedding_split_neither_way_is_refused(tmp_path: Path, model):
    folder = write_meta_release(tmp_path / "llama", model, 2)
    sds = meta_state_dicts(model, 2)
    for sd in sds:
        sd["tok_embeddings.weight"] = torch.zeros(300, 48)
    _save(folder, sds)
    refused(folder, "consolidated.00.pth", "has 48 columns in each of 2 files",
            "dim 64 is 64 columns whole or 32 per file")
