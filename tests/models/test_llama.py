"""The lean Llama runtime against transformers' LlamaForCausalLM on tiny random models of several shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from sparsemap.errors import BadInputError
from sparsemap.formats.source import resolve_source
from sparsemap.models import llama
from sparsemap.models.generate import LeanEngine, TransformersEngine, pick_engine
from sparsemap.models.gguf_hf import rotary_order

from ..conftest import tiny_llama_config

SHAPES = {
    "gqa-untied": {},
    "mha-tied": {"num_key_value_heads": 4, "tie_word_embeddings": True},
    "mqa-head-dim": {"num_key_value_heads": 1, "head_dim": 16, "rope_theta": 5e5},
}


def _saved(tmp_path: Path, **overrides) -> tuple[LlamaForCausalLM, Path]:
    torch.manual_seed(7)
    reference = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    reference.save_pretrained(tmp_path)
    return reference, tmp_path


@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_and_greedy_tokens_match_transformers(tmp_path: Path, shape: str) -> None:
    reference, folder = _saved(tmp_path, **SHAPES[shape])
    model = llama.load(folder)
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.allclose(model(ids), reference(ids).logits[:, -1], atol=1e-5, rtol=0)
        prompt = ids[0].tolist()
        expected = reference.generate(ids[:1], max_new_tokens=40, do_sample=False,
                                      eos_token_id=None)[0, len(prompt):].tolist()
    assert model.generate(prompt, 40) == expected


def test_cached_forward_of_several_tokens_sees_the_past(tmp_path: Path) -> None:
    """Chunked prefill: a second chunk with a cache gives the logits of one full pass."""
    _, folder = _saved(tmp_path)
    model = llama.load(folder)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    caches: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    with torch.inference_mode():
        model(ids[:, :5], 0, caches)
        chunked = model(ids[:, 5:], 5, caches)
        assert torch.allclose(chunked, model(ids), atol=1e-5, rtol=0)


def test_rotary_order_undoes_llama_cpp_permutation() -> None:
    heads, head_dim = 3, 8
    hf = torch.arange(heads * head_dim)
    # llama.cpp's converter: within each head, interleave the two rotary halves.
    gguf = hf.reshape(heads, 2, head_dim // 2).transpose(1, 2).reshape(-1)
    assert list(rotary_order(heads * head_dim, heads)) == gguf.tolist()


def _config(folder: Path, **changes) -> Path:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize(("change", "needle"), [
    ({"hidden_act": "gelu"}, "hidden_act"), ({"model_type": "qwen2", "use_sliding_window": True}, "sliding"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling"),
    ({"model_type": "mistral"}, "model_type"),
])
def test_unsupported_configs_are_refused_or_fall_back(tmp_path: Path, change: dict, needle: str) -> None:
    _, folder = _saved(tmp_path)
    (folder / "tokenizer.json").write_text("{}")  # present, so only the config decides
    _config(folder, **change)
    with pytest.raises(BadInputError, match=needle):
        llama.LlamaShape.from_source(resolve_source(folder))
    with pytest.raises(BadInputError, match=needle):
        pick_engine(folder, "lean")
    assert isinstance(pick_engine(folder, "auto"), TransformersEngine)


def test_auto_picks_lean_for_a_plain_llama_folder(tmp_path: Path) -> None:
    _, folder = _saved(tmp_path)
    (folder / "tokenizer.json").write_text("{}")
    assert isinstance(pick_engine(folder, "auto"), LeanEngine)


def test_chat_tokenizer_reads_added_token_objects_and_without_a_template_raw_text(
        minilm_folder, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "tok"
    shutil.copytree(minilm_folder, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    plain = llama.ChatTokenizer(folder)
    assert plain.template is None and plain.raw_ids("hello")[0] == plain.tokenizer.token_to_id("[CLS]")
    with pytest.raises(BadInputError, match=r"no chat template .*\(--raw\)"):
        plain.prompt_ids("hello")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{{ bos_token }}{{ m['content'] }}"
                               "{% break %}{% endfor %}")
    config["bos_token"] = {"__type": "AddedToken", "content": "[CLS]"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    chat = llama.ChatTokenizer(folder)
    assert chat.prompt_ids("hello")[0] == chat.tokenizer.token_to_id("[CLS]")


def _random_model(config, folder: Path):
    torch.manual_seed(1)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # biases start at zero: give them values that show
            p.normal_(0, 0.2)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("kind", ["qwen2", "llama-biases"])
def test_qwen2_and_llama_with_biases_give_transformers_logits(tmp_path: Path, kind: str) -> None:
    from transformers import Qwen2Config

    from ..conftest import tiny_llama_config

    if kind == "qwen2":
        config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                             tie_word_embeddings=True)
    else:
        config = tiny_llama_config(attention_bias=True, mlp_bias=True)
    reference = _random_model(config, tmp_path / kind)
    ours = llama.load(tmp_path / kind)
    ids = torch.tensor([[5, 17, 99, 3, 64, 12]])
    with torch.inference_mode():
        assert torch.allclose(ours(ids), reference(ids).logits[:, -1], atol=1e-5)
        want = reference.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
    assert ours.generate(ids[0].tolist(), 6) == want[: len(ours.generate(ids[0].tolist(), 6))]


def test_other_model_types_are_refused_by_name() -> None:
    assert "not one of llama, qwen2" in (llama.unsupported({"model_type": "gemma3_text"}) or "")
