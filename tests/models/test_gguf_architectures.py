"""GGUF beyond Llama: config, names and values mapped by transformers' and gguf's own tables.

A real Gemma 3 (its norms stored as 1 + w, sliding-window attention, q/k norms, a 262k vocabulary)
built by sparsemap must give transformers' own GGUF loading's logits and greedy tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import sparsemap
from sparsemap.bench.gguf_writer import write_like_llama_cpp
from sparsemap.errors import GGUFArchitectureError
from sparsemap.models import gguf_hf

from ..helpers import write_gguf

PROMPT = [[2, 818, 5279, 529, 7001, 563]]  # "<bos>The capital of France is" in Gemma 3's vocabulary


@pytest.mark.model
@pytest.mark.slow
def test_gemma3_equals_transformers_own_gguf_loading(gemma3_gguf: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Dequantized: transformers' logits. Blocks kept quantized (Q4_K to int4; Q5_0, Q6_K, Q8_0 to
    int8; repacked once into the cache): the same greedy tokens, every weight still mapped."""
    from transformers import AutoModelForCausalLM

    from sparsemap.qtensor import QuantizedTensor

    ours = sparsemap.from_pretrained(gemma3_gguf)
    reference = AutoModelForCausalLM.from_pretrained(gemma3_gguf.parent, gguf_file=gemma3_gguf.name).eval()
    assert type(ours) is type(reference) and ours.config.layer_types == reference.config.layer_types
    monkeypatch.setenv("SPARSEMAP_CACHE", str(tmp_path))
    kept = sparsemap.from_pretrained(gemma3_gguf, keep_quantized=True)
    assert list((tmp_path / "gguf").glob("*.safetensors"))
    assert isinstance(kept.model.layers[0].self_attn.k_proj.weight, QuantizedTensor)  # a Q5_0 weight
    ids = torch.tensor(PROMPT)
    with torch.inference_mode():
        want = reference(ids).logits
        assert torch.allclose(ours(ids).logits, want, atol=1e-4, rtol=0)
        assert (kept(ids).logits - want).abs().max() < 0.05 * want.abs().max()  # bf16 scales of int4
        mine = ours.generate(ids, max_new_tokens=8, do_sample=False)
        theirs = reference.generate(ids, max_new_tokens=8, do_sample=False)
        quantized = kept.generate(ids, max_new_tokens=8, do_sample=False)
    assert mine.tolist() == theirs.tolist() == quantized.tolist()


@pytest.mark.model
def test_gemma3_norms_come_back_as_transformers_keeps_them(gemma3_gguf: Path) -> None:
    raw = sparsemap.open(gemma3_gguf)
    config = gguf_hf.hf_config(raw)
    assert config.model_type == "gemma3_text" and config.vocab_size == 262144 and config.tie_word_embeddings
    from transformers import Gemma3ForCausalLM

    with sparsemap.skeleton():
        model = Gemma3ForCausalLM(config)
    cat = gguf_hf.hf_catalog(raw, model)
    norm = "model.layers.0.input_layernorm.weight"
    assert cat[norm].shift == -1.0 and not cat[norm].zero_copy
    stored = sparsemap.Checkpoint(raw).tensor("blk.0.attn_norm.weight")
    assert torch.equal(sparsemap.Checkpoint(cat).tensor(norm), stored - 1)


ARCHITECTURES = {  # llama.cpp architecture -> what its tiny model needs beyond the shared sizes
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},  # q/k/v biases
    "qwen3": {},  # q/k norms (head_dim: the default, 128; transformers maps no header key to it)
    "phi3": {},  # fused qkv and gate/up
    # 1 + w norms, sliding windows; the header has no query_pre_attn_scalar: transformers' default (256)
    "gemma3": {"head_dim": 16, "sliding_window": 4},
}


def _tiny(arch: str) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(gguf_hf.MODEL_TYPES[arch], vocab_size=96, hidden_size=64,
                                  intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2,
                                  max_position_embeddings=64, tie_word_embeddings=arch == "gemma3",
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2, **ARCHITECTURES[arch])
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random norms and biases, so a wrong shift or order shows
        for p in model.parameters():
            if p.ndim == 1:
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_mapped_architecture_comes_back_as_the_model_written(arch: str, tmp_path: Path) -> None:
    """A transformers model written as llama.cpp writes it (names, q/k order, 1 + w norms) comes back from
    ``from_pretrained(gguf)`` with its own logits and greedy tokens, and as transformers' own GGUF loading
    gives it. Mistral is checked against the model only: transformers' loading of a Mistral GGUF asks the
    gguf package for an architecture named "mistral", which it does not have (NotImplementedError)."""
    from transformers import AutoModelForCausalLM

    model = _tiny(arch)
    path = write_like_llama_cpp(model, tmp_path / f"{arch}.gguf")
    ours = sparsemap.from_pretrained(path)
    assert type(ours) is type(model)
    ids = torch.tensor([[1, 5, 9, 33, 2, 77, 40, 41]])
    with torch.inference_mode():
        want = model(ids).logits
        assert torch.allclose(ours(ids).logits, want, atol=1e-5, rtol=0)
        assert torch.equal(ours.generate(ids, max_new_tokens=6, do_sample=False),
                           model.generate(ids, max_new_tokens=6, do_sample=False))
    if arch != "mistral":
        reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
        with torch.inference_mode():
            assert torch.allclose(ours(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


# A Q3_K_M-like mix of every K-quant sparsemap keeps; the norms stay float32, as llama.cpp keeps them.
K_QUANT_MIX = {"blk.*.attn_q.weight": "Q3_K", "blk.*.attn_k.weight": "Q2_K", "blk.*.attn_v.weight": "Q5_K",
               "blk.*.attn_output.weight": "Q3_K", "blk.*.ffn_*.weight": "Q5_K", "token_embd.weight": "Q2_K",
               "output.weight": "Q5_K"}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_k_quants_kept_in_place_compute_the_dequantized_models_logits(arch: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Q2_K, Q3_K and Q5_K blocks kept quantized (repacked once into the cache, int8 in their own groups)
    compute what their dequantized values compute; and they are the model written, at K-quant error."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sparsemap.qtensor import QuantizedTensor

    torch.manual_seed(0)
    config = AutoConfig.for_model(gguf_hf.MODEL_TYPES[arch], vocab_size=96, hidden_size=256,
                                  intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=64,
                                  tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config).eval()
    path = write_like_llama_cpp(model, tmp_path / f"{arch}-k.gguf", quantize=K_QUANT_MIX)
    monkeypatch.setenv("SPARSEMAP_CACHE", str(tmp_path / "cache"))
    dequantized = sparsemap.from_pretrained(path)
    kept = sparsemap.from_pretrained(path, keep_quantized=True)
    layer = kept.model.layers[1]
    for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.down_proj, kept.lm_head):
        assert isinstance(linear.weight, QuantizedTensor)
        assert linear.weight.weight.scheme == "int8"
    ids = torch.tensor([[1, 5, 9, 33, 2, 77, 40, 41]])
    with torch.inference_mode():
        want = dequantized(ids).logits
        # The int8 kernel's products differ (it rounds the inputs to bf16: test_quantized's linear tests
        # bound it alike), not the values; this random model's top logits lie too close for equal tokens.
        assert (kept(ids).logits - want).abs().max() <= 2e-2 * want.abs().max()
        original = model(ids).logits
    similarity = torch.nn.functional.cosine_similarity(want.flatten(), original.flatten(), dim=0)
    assert similarity > 0.8  # near the float model, as far as 2 to 5 bits go


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_a_gguf_converts_to_a_folder_transformers_loads_with_no_key_left_over(arch: str,
                                                                              tmp_path: Path) -> None:
    """``sparsemap convert model.gguf OUT/``: transformers loads the folder with no missing, unexpected or
    mismatched key and computes the model's logits; safetensors lists exactly the model's own tensors."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from sparsemap.models.gguf_convert import write_folder

    model = _tiny(arch)
    path = write_like_llama_cpp(model, tmp_path / f"{arch}.gguf")
    write_folder(path, tmp_path / "out")
    assert {"config.json", "generation_config.json", "model.safetensors"} <= {
        p.name for p in (tmp_path / "out").iterdir()}
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        stored = set(f.keys())
    assert stored == set(model.state_dict()) - ({"lm_head.weight"} if arch == "gemma3" else set())
    ids = torch.tensor([[1, 5, 9, 33]])
    with torch.inference_mode():
        assert torch.allclose(loaded.eval()(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def test_a_gguf_converts_only_into_a_new_or_empty_folder(tmp_path: Path) -> None:
    from sparsemap.errors import DestinationError
    from sparsemap.models.gguf_convert import write_folder

    path = write_like_llama_cpp(_tiny("llama"), tmp_path / "m.gguf")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(DestinationError, match="not empty"):
        write_folder(path, tmp_path / "full")
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"
    with pytest.raises(DestinationError, match="does not exist"):
        write_folder(path, tmp_path / "missing" / "out")


def test_an_architecture_transformers_does_not_map_is_refused_by_name(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "x.gguf", {"token_embd.weight": (np.zeros((4, 8), np.float32), None)},
                      {"general.architecture": "rwkv7"})
    with pytest.raises(GGUFArchitectureError, match=r"architecture 'rwkv7' is not mapped .*gemma3"):
        sparsemap.from_pretrained(path)


@pytest.mark.model
def test_a_gguf_tokenizer_is_converted_once_into_the_cache(smollm2_gguf: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    from sparsemap.formats.source import resolve_source
    from sparsemap.models.gguf_hf import gguf_tokenizer

    monkeypatch.setenv("SPARSEMAP_CACHE", str(tmp_path))
    source = resolve_source(smollm2_gguf)
    first = gguf_tokenizer(source)
    saved = list((tmp_path / "tokenizers").glob("*/tokenizer.json"))
    assert len(saved) == 1 and (saved[0].parent / ".complete").is_file()
    again = gguf_tokenizer(source)  # from tokenizer.json in the cache this time
    reference = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    text = "Memory maps, not copies. 12345 héllo"
    assert first(text)["input_ids"] == again(text)["input_ids"] == reference(text)["input_ids"]
    assert again.chat_template and again.chat_template == sparsemap.open(smollm2_gguf).metadata[
        "tokenizer.chat_template"]


def test_llama_q_and_k_biases_are_put_back_in_order_and_rope_freqs_left_out(tmp_path: Path) -> None:
    """llama.cpp permutes q/k biases as it does their weights; rope_freqs.weight is computed by the model."""
    from transformers import LlamaForCausalLM

    from ..conftest import tiny_llama_config

    config = tiny_llama_config(attention_bias=True)  # 4 heads of 8, 2 kv heads
    q_bias = np.arange(32, dtype=np.float32)
    path = write_gguf(tmp_path / "b.gguf", {
        "token_embd.weight": (np.zeros((128, 32), np.float32), None),
        "blk.0.attn_q.bias": (q_bias, None),
        "rope_freqs.weight": (np.ones(4, np.float32), None),
    }, {"llama.attention.head_count": 4, "llama.attention.head_count_kv": 2})
    with sparsemap.skeleton():
        model = LlamaForCausalLM(config)
    cat = gguf_hf.hf_catalog(sparsemap.open(path), model)
    assert set(cat) == {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.bias"}
    got = sparsemap.Checkpoint(cat).tensor("model.layers.0.self_attn.q_proj.bias")
    order = torch.tensor(gguf_hf.rotary_order(32, 4))  # stored row k holds transformers row order[k]
    want = torch.empty(32)
    want[order] = torch.from_numpy(q_bias)
    assert torch.equal(got, want)


def test_a_gguf_rewritten_in_place_with_its_mtime_put_back_is_repacked_again(tmp_path: Path,
                                                                            monkeypatch) -> None:
    """The repacked copy in the cache is keyed by the GGUF's inode and change time too: ``cp -p`` or
    ``rsync -t`` over the file restores its mtime, never its change time."""
    import os

    monkeypatch.setenv("SPARSEMAP_CACHE", str(tmp_path / "cache"))
    model = _tiny("llama")
    path = write_like_llama_cpp(model, tmp_path / "llama.gguf")
    with sparsemap.skeleton():
        skeleton = type(model)(model.config)
    first = gguf_hf.repacked(sparsemap.open(path), skeleton)
    assert gguf_hf.repacked(sparsemap.open(path), skeleton).source == first.source  # made once
    before = os.stat(path)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    data = write_like_llama_cpp(model, tmp_path / "other.gguf").read_bytes()
    assert len(data) == before.st_size
    with open(path, "r+b") as f:  # in place: the same inode and size
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    second = gguf_hf.repacked(sparsemap.open(path), skeleton)
    assert second.source != first.source
    head = "lm_head.weight"
    old, new = sparsemap.Checkpoint(first).tensor(head), sparsemap.Checkpoint(second).tensor(head)
    assert torch.equal(new, 2 * old)
