"""sparsemap.from_pretrained on folders written by transformers: single, sharded, .bin; ties and buffers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import sparsemap
from sparsemap.errors import MissingShardError, SourceNotFoundError
from sparsemap.mapped import mapping_of

from ..conftest import tiny_llama_config


def _ids() -> torch.Tensor:
    return (torch.arange(10) * 7 % 128).unsqueeze(0)


def _save_bin_shards(model: LlamaForCausalLM, folder: Path) -> None:
    """The pre-safetensors layout (transformers 5 only writes safetensors): torch.save shards + index."""
    import json

    from huggingface_hub import split_torch_state_dict_into_shards

    folder.mkdir()
    model.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"
             or not model.config.tie_word_embeddings}
    split = split_torch_state_dict_into_shards(state, filename_pattern="pytorch_model{suffix}.bin",
                                               max_shard_size="40KB")
    for shard, names in split.filename_to_tensors.items():
        torch.save({n: state[n] for n in names}, folder / shard)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": split.tensor_to_filename}))


@pytest.mark.parametrize("layout", ["single", "sharded", "bin-sharded"])
@pytest.mark.parametrize("tied", [False, True])
def test_from_pretrained_matches_transformers(tmp_path: Path, layout: str, tied: bool) -> None:
    torch.manual_seed(3)
    reference = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tied)).eval()
    folder = tmp_path / layout
    if layout == "single":
        reference.save_pretrained(folder)
    elif layout == "sharded":
        reference.save_pretrained(folder, max_shard_size="40KB")
        assert (folder / "model.safetensors.index.json").is_file()
    else:
        _save_bin_shards(reference, folder)
    model = sparsemap.from_pretrained(folder)
    assert not model.training
    with torch.inference_mode():
        assert torch.equal(model(_ids()).logits, reference(_ids()).logits)
        assert torch.equal(model.generate(_ids(), max_new_tokens=5, do_sample=False),
                           reference.generate(_ids(), max_new_tokens=5, do_sample=False))
    for name, p in model.named_parameters():
        mapping_of(p, name)  # zero-copy
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


def test_dtype_and_config_arguments(tmp_path: Path) -> None:
    reference = LlamaForCausalLM(tiny_llama_config()).eval()
    reference.save_pretrained(tmp_path)
    model = sparsemap.from_pretrained(tmp_path / "model.safetensors", config=reference.config,
                                      dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_missing_inputs_are_clear(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError):
        sparsemap.from_pretrained(tmp_path / "nothing")
    reference = LlamaForCausalLM(tiny_llama_config())
    reference.save_pretrained(tmp_path / "m", max_shard_size="40KB")
    next((tmp_path / "m").glob("model-0000*.safetensors")).unlink()
    with pytest.raises(MissingShardError):
        sparsemap.from_pretrained(tmp_path / "m")


def test_base_weights_load_into_a_model_with_a_head_as_transformers_does(minilm_folder, tmp_path) -> None:
    """all-MiniLM-L6-v2 stores BertModel's names (no 'bert.'): into BertForMaskedLM the prefix is added,
    the head initialised with a warning; the encoder's outputs equal transformers' own load."""
    from transformers import AutoTokenizer, BertForMaskedLM

    with pytest.warns(UserWarning, match="missing"):
        ours = sparsemap.from_pretrained(minilm_folder, model_class=BertForMaskedLM)
    reference = BertForMaskedLM.from_pretrained(minilm_folder).eval()
    batch = AutoTokenizer.from_pretrained(minilm_folder)(["memory maps"], return_tensors="pt")
    with torch.no_grad():
        got = ours.bert(**batch).last_hidden_state
        want = reference.bert(**batch).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5)
    assert not any(p.is_meta for p in ours.parameters())
    with pytest.raises(sparsemap.errors.MissingKeysError, match=r"cls\.predictions"):
        sparsemap.from_pretrained(minilm_folder, model_class=BertForMaskedLM, strict=True)


def test_head_weights_load_into_the_base_model_leaving_the_head_out(minilm_folder, tmp_path) -> None:
    from safetensors.torch import save_file
    from transformers import BertForMaskedLM, BertModel

    head = BertForMaskedLM.from_pretrained(minilm_folder)
    state = {k: v.contiguous().clone() for k, v in head.state_dict().items()}
    (tmp_path / "config.json").write_text((minilm_folder / "config.json").read_text())
    save_file(state, tmp_path / "model.safetensors")
    with pytest.warns(UserWarning, match="unexpected"):
        base = sparsemap.from_pretrained(tmp_path, model_class=BertModel)
    assert torch.equal(base.encoder.layer[0].output.dense.weight,
                       head.bert.encoder.layer[0].output.dense.weight)
