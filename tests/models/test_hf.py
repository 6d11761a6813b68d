"""sparsemap.from_pretrained on folders written by transformers: single, sharded, .bin; ties and buffers."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import sparsemap
from sparsemap.bench.gguf_writer import write_like_llama_cpp
from sparsemap.errors import (
    BadInputError,
    MissingShardError,
    SourceNotFoundError,
    UnsupportedArgumentError,
)
from sparsemap.mapped import mapping_of

from ..conftest import tiny_llama_config


def _ids() -> torch.Tensor:
    return (torch.arange(10) * 7 % 128).unsqueeze(0)


def _save_bin_shards(model: LlamaForCausalLM, folder: Path) -> None:
    """The pre-safetensors layout (transformers 5 only writes safetensors): torch.save shards + index."""
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


# ---------------------------------------------------------------- transformers' arguments

def _saved(folder: Path, *, dtype: torch.dtype = torch.float32, tied: bool = False, seed: int = 0,
           **save: object) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tied)).to(dtype).eval()
    model.save_pretrained(folder, **save)
    return model


def _edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def test_dtype_auto_is_the_configs_then_the_checkpoints_as_transformers_reads_it(tmp_path: Path) -> None:
    """config.json's dtype wins (a cast); without one, the first floating tensor's (zero-copy)."""
    _saved(tmp_path / "says-bf16")  # stored float32, config says bfloat16
    _edit_config(tmp_path / "says-bf16", dtype="bfloat16")
    _saved(tmp_path / "says-nothing", dtype=torch.float16)
    _edit_config(tmp_path / "says-nothing", dtype=None, torch_dtype=None)
    for name, want in (("says-bf16", torch.bfloat16), ("says-nothing", torch.float16)):
        theirs = LlamaForCausalLM.from_pretrained(tmp_path / name, dtype="auto")
        ours = sparsemap.from_pretrained(tmp_path / name, dtype="auto")
        assert theirs.dtype == ours.dtype == want
        assert ours.config.dtype == want
        assert all(p.dtype == want for p in ours.parameters())
    ours = sparsemap.from_pretrained(tmp_path / "says-nothing", dtype="auto")
    for name, p in ours.named_parameters():
        mapping_of(p, name)  # the stored dtype: still views of the file
    # The default keeps what is stored, whatever the config says.
    assert sparsemap.from_pretrained(tmp_path / "says-bf16").dtype == torch.float32


@pytest.mark.parametrize("spelling", [torch.bfloat16, "bfloat16", "torch.bfloat16"])
@pytest.mark.parametrize("argument", ["dtype", "torch_dtype"])
def test_dtype_and_its_old_name_take_a_dtype_or_its_name(tiny_llama, spelling, argument) -> None:
    _, folder = tiny_llama
    model = sparsemap.from_pretrained(folder, **{argument: spelling})
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.config.dtype == torch.bfloat16


def test_dtype_refusals_say_what_was_wrong(tiny_llama) -> None:
    _, folder = tiny_llama
    with pytest.raises(BadInputError, match=r"one argument .*pass dtype= only"):
        sparsemap.from_pretrained(folder, dtype="bfloat16", torch_dtype=torch.bfloat16)
    with pytest.raises(BadInputError, match="'bfloat17' is not a torch dtype"):
        sparsemap.from_pretrained(folder, dtype="bfloat17")
    with pytest.raises(BadInputError, match="not a floating dtype"):
        sparsemap.from_pretrained(folder, torch_dtype="int8")
    with pytest.raises(UnsupportedArgumentError, match="a dtype per sub-config"):
        sparsemap.from_pretrained(folder, dtype={"text_config": "bfloat16"})


def _auto_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("device_map", [None, "cpu", torch.device("cpu"), {"": "cpu"},
                                        {"model": "cpu", "lm_head": "cpu"}, "auto", "balanced", "sequential"])
def test_device_map_onto_one_device(tiny_llama, device_map) -> None:
    reference, folder = tiny_llama
    model = sparsemap.from_pretrained(folder, device_map=device_map)
    want = _auto_device() if isinstance(device_map, str) and device_map != "cpu" else "cpu"
    assert {str(p.device) for p in model.parameters()} == {want}
    if want == "cpu":
        for name, p in model.named_parameters():
            mapping_of(p, name)  # still zero-copy
        ids = torch.arange(6).unsqueeze(0)
        with torch.inference_mode():
            assert torch.equal(model(ids).logits, reference(ids).logits)


def test_a_device_map_onto_several_devices_is_refused_pointing_at_the_budget(tiny_llama) -> None:
    _, folder = tiny_llama
    with pytest.raises(UnsupportedArgumentError, match=r"2 devices \(cpu, cuda:0\).*one device.*"
                       r"sparsemap\.Budget.*--memory-limit") as info:
        sparsemap.from_pretrained(folder, device_map={"model": "cpu", "lm_head": "cuda:0"})
    assert isinstance(info.value, TypeError)
    with pytest.raises(UnsupportedArgumentError, match="does not offload to disk"):
        sparsemap.from_pretrained(folder, device_map={"model": "cpu", "lm_head": "disk"})
    # sparsemap's device= and transformers' device_map= may both be given when they agree.
    assert sparsemap.from_pretrained(folder, device="cpu", device_map={"": "cpu"}).device.type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(("argument", "value", "message"), [
    ("device_map", "cuda:0", r"device_map: device 'cuda:0' is not available here: torch .* without CUDA"),
    ("device", "cuda", r"device: device 'cuda' is not available here"),
    ("device_map", {"": "cuda:1"}, r"device 'cuda:1' is not available"),
    ("device_map", 0, r"device_map=0 names accelerator 0, but torch .* finds no accelerator"),
    ("device", "gpu", r"'gpu' is not a device torch knows"),
    ("device_map", "meta", r"the meta device holds no data"),
])
def test_a_device_torch_cannot_use_here_is_named(tiny_llama, argument, value, message) -> None:
    _, folder = tiny_llama
    with pytest.raises(BadInputError, match=message):
        sparsemap.from_pretrained(folder, **{argument: value})


@pytest.mark.parametrize(("name", "value", "reason"), [
    ("quantization_config", {"load_in_4bit": True}, r"keep_quantized=True.*sparsemap convert --quantize"),
    ("load_in_8bit", True, r"does not quantize while loading.*keep_quantized"),
    ("load_in_4bit", True, r"sparsemap convert --quantize"),
    ("distributed_config", {"tp_size": 2, "fsdp_size": 2}, r"asks for fsdp_size: sparsemap runs tensor "
                                                           r"parallelism only"),
    ("max_memory", {0: "1GB", "cpu": "4GB"}, r"per-device budget.*sparsemap\.Budget"),
    ("offload_folder", "offload/", r"does not offload to disk"),
    ("trust_remote_code", True, r"never runs code from a checkpoint folder"),
    ("state_dict", {}, r"sparsemap\.load\(model, source\)"),
    ("variant", "fp16", r"model\.fp16\.safetensors"),
    ("key_mapping", {"a": "b"}, r"rename="),
    ("weights_only", False, r"never runs pickle code"),
    ("use_kernels", True, r"downloads kernels"),
    ("output_loading_info", True, r"sparsemap\.loader\.plan"),
    ("not_a_config_key", 1, r"neither an argument of sparsemap\.from_pretrained nor an attribute of "
                            r"LlamaConfig"),
])
def test_transformers_arguments_sparsemap_does_not_honour_are_refused_by_name(tiny_llama, name, value,
                                                                              reason) -> None:
    _, folder = tiny_llama
    with pytest.raises(UnsupportedArgumentError, match=reason) as info:
        sparsemap.from_pretrained(folder, **{name: value})
    assert str(info.value).startswith(f"{name}=")
    assert isinstance(info.value, TypeError)  # as Python's own unexpected keyword argument


def test_arguments_that_ask_for_nothing_are_accepted(tiny_llama) -> None:
    """transformers' defaults of refused arguments, and the network-only ones: nothing to refuse."""
    reference, folder = tiny_llama
    model = sparsemap.from_pretrained(
        folder, quantization_config=None, load_in_8bit=False, load_in_4bit=False, max_memory=None,
        offload_folder=None, weights_only=True, trust_remote_code=False, low_cpu_mem_usage=False,
        local_files_only=False, token="hf_unused", proxies={"https": "http://proxy.invalid:1"},
        revision="main", cache_dir="/nonexistent", use_safetensors=False)
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)


def test_config_overrides_follow_transformers(tiny_llama) -> None:
    _, folder = tiny_llama
    theirs = LlamaForCausalLM.from_pretrained(folder, output_hidden_states=True, rms_norm_eps=1e-3)
    ours = sparsemap.from_pretrained(folder, output_hidden_states=True, rms_norm_eps=1e-3)
    assert ours.config.output_hidden_states and ours.config.rms_norm_eps == theirs.config.rms_norm_eps == 1e-3
    ids = torch.arange(6).unsqueeze(0)
    with torch.inference_mode():
        got, want = ours(ids), theirs(ids)
    assert len(got.hidden_states) == len(want.hidden_states) == 3
    assert torch.equal(got.logits, want.logits)
    # A config given is copied, never changed.
    given = tiny_llama_config()
    model = sparsemap.from_pretrained(folder, config=given, output_hidden_states=True, dtype=torch.bfloat16)
    assert model.config.output_hidden_states and not given.output_hidden_states
    assert model.config is not given and given.dtype is None


def test_attn_implementation_is_set_on_the_config_as_transformers_does(tiny_llama) -> None:
    _, folder = tiny_llama
    for impl in ("eager", "sdpa"):
        theirs = LlamaForCausalLM.from_pretrained(folder, attn_implementation=impl)
        ours = sparsemap.from_pretrained(folder, attn_implementation=impl)
        assert ours.config._attn_implementation == theirs.config._attn_implementation == impl
    with pytest.raises(UnsupportedArgumentError, match="Hugging Face Hub kernel"):
        sparsemap.from_pretrained(folder, attn_implementation="kernels-community/flash-attn")
    with pytest.raises(BadInputError, match=r"attn_implementation='no_such_attention': transformers cannot "
                                            r"build LlamaForCausalLM"):
        sparsemap.from_pretrained(folder, attn_implementation="no_such_attention")


def test_use_safetensors(tmp_path: Path) -> None:
    reference = LlamaForCausalLM(tiny_llama_config()).eval()
    _save_bin_shards(reference, tmp_path / "bin")
    with pytest.raises(SourceNotFoundError, match=r"use_safetensors=True, but the weights there are "
                                                  r"pytorch_model\.bin\.index\.json \(sharded\)"):
        sparsemap.from_pretrained(tmp_path / "bin", use_safetensors=True)
    for flag in (False, None):
        model = sparsemap.from_pretrained(tmp_path / "bin", use_safetensors=flag)
        assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    _saved(tmp_path / "st", max_shard_size="40KB")
    sparsemap.from_pretrained(tmp_path / "st", use_safetensors=True)


def test_subfolder_and_gguf_file_are_joined_as_transformers_does(tmp_path: Path) -> None:
    reference = _saved(tmp_path / "repo" / "weights")
    model = sparsemap.from_pretrained(tmp_path / "repo", subfolder="weights")
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight)

    (tmp_path / "ggufs").mkdir()
    written = LlamaForCausalLM(tiny_llama_config(pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    gguf = write_like_llama_cpp(written, tmp_path / "ggufs" / "tiny-f32.gguf")
    shutil.copyfile(gguf, tmp_path / "ggufs" / "other.gguf")
    with pytest.raises(SourceNotFoundError, match="2 GGUF files"):
        sparsemap.from_pretrained(tmp_path / "ggufs")
    ours = sparsemap.from_pretrained(tmp_path / "ggufs", gguf_file="tiny-f32.gguf")
    ids = torch.arange(6).unsqueeze(0)
    with torch.inference_mode():
        assert torch.allclose(ours(ids).logits, written(ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(BadInputError, match=r"gguf_file='model\.safetensors' is not a GGUF file"):
        sparsemap.from_pretrained(tmp_path / "repo", subfolder="weights", gguf_file="model.safetensors")


def test_generation_config_given_replaces_the_folders(tiny_llama) -> None:
    from transformers import GenerationConfig

    _, folder = tiny_llama
    wanted = GenerationConfig(max_new_tokens=3, do_sample=False)
    assert sparsemap.from_pretrained(folder, generation_config=wanted).generation_config is wanted


# ---------------------------------------------------------------- repo ids, from the local cache only

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache: Path, repo_id: str, folder: Path, *, commit: str = COMMIT, ref: str = "main") -> Path:
    """``folder``'s files laid out as huggingface_hub's snapshot_download leaves them: content-addressed
    blobs, a snapshot per commit of relative symbolic links to them, refs naming the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(link.relative_to(repo).parts) - 1)) / "blobs" / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)  # huggingface_hub writes it with no newline
    return snapshot


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test (HF_HUB_OFFLINE, set in conftest, would hide one)."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("shards", [None, "40KB"])
def test_a_repo_id_loads_from_the_local_cache(tmp_path: Path, no_network: None, shards: str | None) -> None:
    saved = tmp_path / "saved"
    reference = _saved(saved, tied=True, **({"max_shard_size": shards} if shards else {}))
    cache = tmp_path / "hub"
    snapshot = _cache_repo(cache, "tiny-org/tiny-llama", saved)
    assert (snapshot / "model.safetensors" if shards is None else snapshot / "config.json").is_symlink()
    model = sparsemap.from_pretrained("tiny-org/tiny-llama", cache_dir=cache)
    ids = torch.arange(6).unsqueeze(0)
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    for name, p in model.named_parameters():
        mapping_of(p, name)  # views of the cached blobs
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_repo_id_finds_the_default_cache_and_revisions(tmp_path: Path, no_network: None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub reads HF_HUB_CACHE when it is imported: its constant is what a later lookup uses."""
    import huggingface_hub.constants

    old, new = tmp_path / "old", tmp_path / "new"
    reference_old, reference_new = _saved(old, seed=1), _saved(new, seed=2)
    cache = tmp_path / "hub"
    _cache_repo(cache, "tiny-org/tiny-llama", old, commit="a" * 40, ref="v1")
    _cache_repo(cache, "tiny-org/tiny-llama", new, commit="b" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    weight = "model.embed_tokens.weight"
    for revision, want in ((None, reference_new), ("v1", reference_old), ("a" * 40, reference_old)):
        model = sparsemap.from_pretrained("tiny-org/tiny-llama", revision=revision)
        assert torch.equal(model.get_parameter(weight), want.get_parameter(weight)), revision
    # Every entry point resolves through the same place.
    assert sparsemap.open("tiny-org/tiny-llama").source.startswith(str(cache))


def test_a_path_that_exists_wins_over_a_repo_id(tmp_path: Path, no_network: None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cached, local = tmp_path / "cached", tmp_path / "work" / "tiny-org" / "tiny-llama"
    _saved(cached, seed=1)
    reference = _saved(local, seed=2)
    _cache_repo(tmp_path / "hub", "tiny-org/tiny-llama", cached)
    monkeypatch.chdir(tmp_path / "work")
    model = sparsemap.from_pretrained("tiny-org/tiny-llama", cache_dir=tmp_path / "hub")
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)


def test_a_repo_id_in_a_subfolder_of_the_cached_snapshot(tmp_path: Path, no_network: None) -> None:
    reference = _saved(tmp_path / "saved" / "text")
    _cache_repo(tmp_path / "hub", "tiny-org/multi", tmp_path / "saved")
    model = sparsemap.from_pretrained("tiny-org/multi", subfolder="text", cache_dir=tmp_path / "hub")
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)


def test_a_repo_id_not_in_the_cache_says_where_it_looked_and_how_to_fetch_it(tmp_path: Path,
                                                                             no_network: None) -> None:
    cache = tmp_path / "hub"
    cache.mkdir()
    with pytest.raises(SourceNotFoundError) as info:
        sparsemap.from_pretrained("HuggingFaceTB/SmolLM2-135M", cache_dir=cache)
    message = str(info.value)
    assert "'HuggingFaceTB/SmolLM2-135M' (revision 'main') is not in the local cache" in message
    assert str(cache) in message and "`hf download HuggingFaceTB/SmolLM2-135M`" in message
    assert "huggingface-cli download HuggingFaceTB/SmolLM2-135M" in message
    _saved(tmp_path / "saved")
    _cache_repo(cache, "tiny-org/tiny-llama", tmp_path / "saved")
    with pytest.raises(SourceNotFoundError, match=r"revision 'v9'.*--revision v9"):
        sparsemap.from_pretrained("tiny-org/tiny-llama", revision="v9", cache_dir=cache)
