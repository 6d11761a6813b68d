"""GGUF beyond Llama: config, names and values mapped by transformers' and gguf's own tables.

A real Gemma 3 (its norms stored as 1 + w, sliding-window attention, q/k norms, a 262k vocabulary)
built by sparsemap must give transformers' own GGUF loading's logits and greedy tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import sparsemap
from sparsemap.errors import GGUFArchitectureError
from sparsemap.models import gguf_hf, gguf_llama

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


@pytest.mark.model
def test_llama_names_from_the_tables_equal_the_llama_map(smollm2_gguf: Path) -> None:
    """SmolLM2 (llama) through the generic tables: the same names and q/k orders as the Llama map."""
    from transformers import LlamaForCausalLM

    raw = sparsemap.open(smollm2_gguf)
    with sparsemap.skeleton():
        model = LlamaForCausalLM(gguf_hf.hf_config(raw))
    generic, static = gguf_hf.hf_catalog(raw, model), gguf_llama.hf_catalog(raw)
    want = {n: (e.order, 0.0) for n, e in static.items()}
    assert {n: (e.order, e.shift) for n, e in generic.items()} == want


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
    from sparsemap.models.generate import gguf_tokenizer

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
    order = torch.tensor(gguf_llama.rotary_order(32, 4))  # stored row k holds transformers row order[k]
    want = torch.empty(32)
    want[order] = torch.from_numpy(q_bias)
    assert torch.equal(got, want)
