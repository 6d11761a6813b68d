"""Meta's original Llama release as transformers' LlamaForCausalLM: loaded from one file, joined from several.

The releases are a tiny random transformers Llama split the way Meta's model-parallel code saves it (Meta's
names, q/k rows interleaved, each file written by ``torch.save``; ``tests/format_writers.py``). The model
loaded from a release, and the folder ``sparsemap convert`` joins, must compute the original's logits.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import weakref
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import sparsemap
from sparsemap import errors
from sparsemap.cli import main
from sparsemap.errors import NotMappedError
from sparsemap.formats.meta_llama import read_release
from sparsemap.formats.planner import Layout
from sparsemap.mapped import mapping_of
from sparsemap.models import meta_llama
from sparsemap.models.meta_llama import hf_config, write_folder

from ..format_writers import meta_state_dicts, tiny_llama, write_meta_release

IDS = torch.tensor([[1, 17, 250, 3, 99, 42, 7, 280, 5, 64, 128, 2]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS).logits


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


# ---------------------------------------------------------------- one file: loaded in place

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_file_loads_as_views_of_the_file_and_computes_the_original_logits(tmp_path: Path,
                                                                              dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    # The reference is transformers' own loading of the same weights in the same dtype (a model cast with
    # .to(bfloat16) would also cast its rotary frequencies, which loading keeps in float32).
    model = tiny_llama().to(dtype)
    model.save_pretrained(tmp_path / "hf")
    reference = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=dtype).eval()
    folder = write_meta_release(tmp_path / "llama", model)
    loaded = sparsemap.from_pretrained(folder)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(loaded), logits(reference), atol=1e-5, rtol=0)
    params = dict(loaded.named_parameters())
    assert {p.dtype for p in params.values()} == {dtype}
    reordered = {n for n in params if "q_proj" in n or "k_proj" in n}
    assert len(reordered) == 4
    for name, p in params.items():
        if name in reordered:  # rows put in transformers' order: a copy, as for a GGUF
            with pytest.raises(NotMappedError):
                mapping_of(p, name)
        else:
            assert mapping_of(p, name).path == str(folder / "consolidated.00.pth"), name


def test_load_takes_the_release_folder_as_any_checkpoint(tmp_path: Path, model):
    folder = write_meta_release(tmp_path / "llama", model)
    built = sparsemap.load(lambda: type(model)(hf_config(read_release(folder))), folder).eval()
    torch.testing.assert_close(logits(built), logits(model), atol=1e-5, rtol=0)


def test_the_config_is_params_json_as_transformers_conversion_reads_it(tmp_path: Path):
    folder = write_meta_release(tmp_path / "llama", tiny_llama(shared=True), rope_theta=500000.0,
                                use_scaled_rope=True)
    config = sparsemap.from_pretrained(folder).config
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers,
            config.num_attention_heads, config.num_key_value_heads, config.vocab_size, config.head_dim) == \
        (64, 96, 2, 4, 2, 300, 16)
    assert config.tie_word_embeddings and config.architectures == ["LlamaForCausalLM"]
    rope = config.to_dict().get("rope_parameters") or {**config.rope_scaling, "rope_theta": config.rope_theta}
    assert (rope["rope_type"], rope["factor"], rope["rope_theta"]) == ("llama3", 8.0, 500000.0)
    assert config.max_position_embeddings == 131072  # Llama 3.1's
    stated = write_meta_release(tmp_path / "b", tiny_llama(), use_scaled_rope=True, rope_scaling_factor=32,
                                max_seq_len=2048)
    config = hf_config(read_release(stated))
    rope = config.to_dict().get("rope_parameters") or config.rope_scaling
    assert rope["factor"] == 32.0 and config.max_position_embeddings == 2048


# ---------------------------------------------------------------- several files: refused, then joined

def test_several_files_are_refused_as_one_model_with_the_line_that_joins_them(tmp_path: Path, model):
    folder = write_meta_release(tmp_path / "llama", model, 2)
    with pytest.raises(errors.ShardedReleaseError) as info:
        sparsemap.from_pretrained(folder)
    assert f"join them once with `sparsemap convert {folder} OUT/`" in str(info.value)


@pytest.mark.parametrize(("n_files", "embedding_dim"), [(2, 1), (2, 0), (1, 1)],
                         ids=["2-files-embedding-by-columns", "2-files-embedding-by-rows", "1-file"])
def test_convert_joins_the_files_into_a_folder_transformers_loads(tmp_path: Path, model, n_files: int,
                                                                  embedding_dim: int, caplog):
    from transformers import LlamaForCausalLM

    folder = write_meta_release(tmp_path / "llama", model, n_files, embedding_dim=embedding_dim)
    out = tmp_path / "hf"
    summary = write_folder(folder, out)
    assert sorted(p.name for p in out.iterdir()) == [".complete", "config.json", "generation_config.json",
                                                    "model.safetensors"]
    assert summary.tensors == len(model.state_dict())
    assert summary.destination == str(out / "model.safetensors")
    # transformers' own loading: every tensor used, none missing, the original's logits.
    with caplog.at_level(logging.WARNING):
        theirs, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    torch.testing.assert_close(logits(theirs.eval()), logits(model), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(sparsemap.from_pretrained(out)), logits(model), atol=1e-5, rtol=0)


def test_convert_on_the_command_line(tmp_path: Path, model):
    folder = write_meta_release(tmp_path / "llama", model, 2)
    result = CliRunner().invoke(main, ["convert", str(folder), str(tmp_path / "hf") + "/"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and (tmp_path / "hf" / "config.json").is_file()
    torch.testing.assert_close(logits(sparsemap.from_pretrained(tmp_path / "hf")), logits(model), atol=1e-5,
                               rtol=0)
    # A file destination cannot hold a joined release with its config: the same one line says how.
    result = CliRunner().invoke(main, ["convert", str(folder), str(tmp_path / "one.safetensors")])
    assert result.exit_code == 2 and "join them once with `sparsemap convert" in result.output


def test_convert_with_a_layout_casts_while_joining(tmp_path: Path, model):
    folder = write_meta_release(tmp_path / "llama", model, 2)
    write_folder(folder, tmp_path / "hf", layout=Layout(dtype=torch.bfloat16))
    loaded = sparsemap.from_pretrained(tmp_path / "hf")
    for name, p in loaded.state_dict().items():
        assert torch.equal(p, model.state_dict()[name].bfloat16()), name


def test_convert_holds_one_joined_tensor_at_a_time(tmp_path: Path, model, monkeypatch):
    folder = write_meta_release(tmp_path / "llama", model, 2)
    real, held = meta_llama._joined, []

    def joined(*args):
        assert all(ref() is None for ref in held), "the previous joined tensor is still held"
        t = real(*args)
        if isinstance(t, torch.Tensor):
            held.append(weakref.ref(t))
        return t

    monkeypatch.setattr(meta_llama, "_joined", joined)
    write_folder(folder, tmp_path / "hf")
    assert len(held) == len(model.state_dict())


def test_parts_split_by_columns_are_read_a_block_of_rows_at_a_time(tmp_path: Path, model, monkeypatch):
    monkeypatch.setattr(meta_llama, "CHUNK_NBYTES", 300)  # blocks of 2 rows of wo's 32 float32 columns
    folder = write_meta_release(tmp_path / "llama", model, 2)
    write_folder(folder, tmp_path / "hf")
    loaded = sparsemap.from_pretrained(tmp_path / "hf")
    for name, p in loaded.state_dict().items():
        assert torch.equal(p, model.state_dict()[name]), name


def test_files_whose_replicated_norms_differ_are_refused(tmp_path: Path, model):
    folder = write_meta_release(tmp_path / "llama", model, 2)
    sds = meta_state_dicts(model, 2)
    sds[1]["norm.weight"] = sds[1]["norm.weight"] + 1
    torch.save(sds[1], folder / "consolidated.01.pth")
    with pytest.raises(errors.MetaLlamaFormatError, match=r"differs from the same tensor in consolidated"):
        write_folder(folder, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_destination_that_holds_something_is_never_written_over(tmp_path: Path, model):
    folder = write_meta_release(tmp_path / "llama", model, 2)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "mine.txt").write_text("keep")
    with pytest.raises(errors.DestinationError, match="not empty"):
        write_folder(folder, tmp_path / "hf")
    assert (tmp_path / "hf" / "mine.txt").read_text() == "keep"


# ---------------------------------------------------------------- the tokenizer

def test_without_sentencepiece_the_tokenizer_is_skipped_and_said(tmp_path: Path, model, monkeypatch, caplog):
    folder = write_meta_release(tmp_path / "llama", model)
    (folder / "tokenizer.model").write_bytes(b"\x0a\x0b\x0a\x05<unk>")  # a SentencePiece ModelProto's start
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import sentencepiece fails
    with caplog.at_level(logging.WARNING, logger="sparsemap"):
        write_folder(folder, tmp_path / "hf")
    assert (f"sentencepiece is not installed, and converting the SentencePiece {folder / 'tokenizer.model'} "
            "needs it: pip install sentencepiece; the folder has no tokenizer") in caplog.text
    assert not list((tmp_path / "hf").glob("tokenizer*"))


def test_a_tiktoken_tokenizer_model_is_not_converted_and_said(tmp_path: Path, model, caplog):
    folder = write_meta_release(tmp_path / "llama", model)
    (folder / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")  # Llama 3's: base64 token, rank
    with caplog.at_level(logging.WARNING, logger="sparsemap"):
        write_folder(folder, tmp_path / "hf")
    assert "not a SentencePiece model" in caplog.text


def test_a_sentencepiece_tokenizer_model_is_converted_by_transformers(tmp_path: Path, model):
    spm = pytest.importorskip("sentencepiece")
    from transformers import AutoTokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox jumps over the lazy dog {i}" for i in range(200)))
    # Llama's settings: BPE, byte fallback, no normalisation.
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tok"), vocab_size=300,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, split_digits=True, minloglevel=2)
    folder = write_meta_release(tmp_path / "llama", model)
    (tmp_path / "tok.model").rename(folder / "tokenizer.model")
    write_folder(folder, tmp_path / "hf")
    ours = AutoTokenizer.from_pretrained(tmp_path / "hf")
    theirs = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    for text in ("the quick brown fox", "a lazy dog jumps 42 times", "héllo"):
        assert ours(text)["input_ids"] == [1, *theirs.encode(text)], text


# ---------------------------------------------------------------- sparsemap run: written once into the cache

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "a", "cat", "sat", "on", "mat"]


def _word_tokenizer(folder: Path) -> None:
    """A tokenizer.json (and tokenizer_config.json) of whole words with Llama's ids for <unk>, <s>, </s>,
    made with the tokenizers library: what a release gets from its Hugging Face repo, no sentencepiece."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: 3 + i for i, w in enumerate(WORDS)}}
    vocab.update({f"w{i}": i for i in range(len(vocab), 300)})  # the model's 300 rows, every one a token
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "<s>{% for m in messages %}{{ m['content'] }} {% endfor %}"}))


def _run(model: Path | str, *more: str) -> tuple[dict, str]:
    """``sparsemap run MODEL "the quick brown" --json`` (8 greedy tokens): the report and the stderr."""
    result = CliRunner().invoke(main, ["run", str(model), "the quick brown", "--raw", "--max-new-tokens", "8",
                                       "--temperature", "0", "--json", *more])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.stderr


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("SPARSEMAP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_run_on_a_release_in_several_files_joins_it_once_and_answers_as_the_converted_folder(
        tmp_path: Path, model, cache: Path):
    folder = write_meta_release(tmp_path / "llama", model, 2)
    _word_tokenizer(folder)
    write_folder(folder, tmp_path / "hf")  # `sparsemap convert`: the reference
    want, _ = _run(tmp_path / "hf")
    got, stderr = _run(folder)
    assert got["tokens"] == want["tokens"] and got["answer"] == want["answer"] and len(got["tokens"]) == 8
    assert got["engine"] == "LeanEngine"
    assert f"sparsemap: {folder} is a Meta release: writing it once as a transformers folder (its 2 files " \
        "joined" in stderr
    cached = meta_llama.cache_folder(folder)
    assert cached.parent == cache / "meta-llama" and got["model"] == str(cached)
    assert sorted(p.name for p in cached.iterdir()) == [".complete", "config.json", "generation_config.json",
                                                        "model.safetensors", "tokenizer.json",
                                                        "tokenizer_config.json"]
    # Every weight maps from the cached file, q and k too (their rows were put in order once, on disk).
    loaded = sparsemap.from_pretrained(cached)
    weights = str(cached / "model.safetensors")
    assert all(mapping_of(p, n).path == weights for n, p in loaded.named_parameters())
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=0)

    # The next run takes the folder as it is: nothing said, nothing written.
    inode = (cached / "model.safetensors").stat().st_ino
    again, stderr = _run(folder)
    assert again["tokens"] == want["tokens"] and "Meta release" not in stderr
    assert (cached / "model.safetensors").stat().st_ino == inode


def test_run_on_a_release_in_one_file_maps_it_as_it_lies(tmp_path: Path, model, cache: Path):
    """One file: only the config and tokenizer are written to the cache; the lean engine maps every weight
    from the release's own file, q and k as stored (their outputs put in order), and answers as the
    converted folder does."""
    from sparsemap.models import llama
    from sparsemap.models.generate import resolve_model

    folder = write_meta_release(tmp_path / "llama", model, 1)
    _word_tokenizer(folder)
    write_folder(folder, tmp_path / "hf")
    want, _ = _run(tmp_path / "hf")
    got, stderr = _run(folder)
    assert got["tokens"] == want["tokens"] and got["answer"] == want["answer"]
    assert got["engine"] == "LeanEngine" and "writing its config and tokenizer once" in stderr
    cached = meta_llama.cache_folder(folder)
    assert sorted(p.name for p in cached.iterdir()) == [".complete", "config.json", "generation_config.json",
                                                        "tokenizer.json", "tokenizer_config.json"]
    source, weights = resolve_model(folder), str(folder / "consolidated.00.pth")
    assert source.format == "meta-llama" and source.folder == str(folder)
    assert source.config == str(cached / "config.json")
    lean = llama.load(source)
    assert all(mapping_of(p, n).path == weights for n, p in lean.named_parameters())  # q and k too
    reference = llama.load(tmp_path / "hf")
    ids = torch.tensor([[1, 5, 9, 33, 2, 77]])
    with torch.inference_mode():
        torch.testing.assert_close(lean(ids), reference(ids), atol=1e-5, rtol=0)
    again, stderr = _run(folder)
    assert again["tokens"] == want["tokens"] and "Meta release" not in stderr
    through_transformers, _ = _run(folder, "--engine", "transformers")  # its tokenizer from the cache too
    assert through_transformers["tokens"] == want["tokens"]


def test_a_changed_release_is_written_again(tmp_path: Path, cache: Path):
    folder = write_meta_release(tmp_path / "llama", tiny_llama(seed=1), 2)
    _word_tokenizer(folder)
    first, _ = _run(folder)
    # One file rewritten in place, the same size and modification time (as `cp -p` leaves it): the change
    # time still tells.
    other = tiny_llama(seed=2)
    part = folder / "consolidated.01.pth"
    st = part.stat()
    torch.save(meta_state_dicts(other, 2)[1], part)
    os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert part.stat().st_size == st.st_size
    with pytest.raises(errors.MetaLlamaFormatError, match="differs from the same tensor"):  # half of each
        meta_llama.prepare(folder, on_note=lambda _: None)
    torch.save(meta_state_dicts(other, 2)[0], folder / "consolidated.00.pth")
    second, stderr = _run(folder)
    assert "writing it once" in stderr
    write_folder(folder, tmp_path / "hf")
    want, _ = _run(tmp_path / "hf")
    assert second["tokens"] == want["tokens"] != first["tokens"]
    torch.testing.assert_close(logits(sparsemap.from_pretrained(meta_llama.cache_folder(folder))),
                               logits(other), atol=1e-5, rtol=0)
    assert [p.name for p in (cache / "meta-llama").iterdir()] == [meta_llama.cache_folder(folder).name]


def test_chat_and_serve_take_a_release_too(tmp_path: Path, model, cache: Path):
    from sparsemap.serve import ServedModel

    folder = write_meta_release(tmp_path / "llama", model, 2)
    _word_tokenizer(folder)
    served = ServedModel(str(folder), name="llama")
    assert served.source.folder == str(meta_llama.cache_folder(folder))
    result = CliRunner().invoke(main, ["chat", str(folder), "--max-new-tokens", "4"],
                                input="the fox\n/exit\n")
    assert result.exit_code == 0 and "chatting with" in result.stderr, result.output
    assert "Meta release" not in result.stderr  # written once, by the server above


@pytest.mark.parametrize(("module", "distribution"), [("sentencepiece", "sentencepiece"),
                                                      ("google.protobuf", "protobuf")])
def test_run_without_sentencepiece_is_refused_before_anything_is_written(tmp_path: Path, model, cache: Path,
                                                                        monkeypatch, module: str,
                                                                        distribution: str):
    folder = write_meta_release(tmp_path / "llama", model, 2)
    (folder / "tokenizer.model").write_bytes(b"\x0a\x0b\x0a\x05<unk>")  # a SentencePiece ModelProto's start
    monkeypatch.setitem(sys.modules, module, None)  # importing it fails
    result = CliRunner().invoke(main, ["run", str(folder), "Hi"])
    assert result.exit_code != 0
    assert result.stderr.strip().splitlines() == [
        f"sparsemap: error: {distribution} is not installed, and converting the SentencePiece "
        f"{folder / 'tokenizer.model'} needs it: pip install {distribution}"]
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))


@pytest.mark.parametrize(("tokenizer", "words"), [
    (None, "no tokenizer.model (nor tokenizer.json) beside params.json"),
    (b"IQ== 0\nIg== 1\n", "not a SentencePiece model (Llama 3's tiktoken ranks?), which sparsemap does not "
                          "convert: put tokenizer.json and tokenizer_config.json"),
], ids=["none", "tiktoken"])
def test_run_without_a_tokenizer_it_can_convert_is_refused(tmp_path: Path, model, cache: Path,
                                                           tokenizer: bytes | None, words: str):
    folder = write_meta_release(tmp_path / "llama", model, 2)
    if tokenizer is not None:
        (folder / "tokenizer.model").write_bytes(tokenizer)
    result = CliRunner().invoke(main, ["run", str(folder), "Hi"])
    assert result.exit_code == 2 and words in result.stderr, result.output
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))


def test_run_with_llama_s_sentencepiece_tokenizer_model(tmp_path: Path, model, cache: Path):
    spm = pytest.importorskip("sentencepiece", reason="converting tokenizer.model needs sentencepiece "
                                                      "(the test extra installs it)")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox jumps over the lazy dog {i}" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tok"), vocab_size=300,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, split_digits=True, minloglevel=2)
    folder = write_meta_release(tmp_path / "llama", model, 2)
    (tmp_path / "tok.model").rename(folder / "tokenizer.model")
    got, _ = _run(folder)
    theirs = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert got["prompt_tokens"] == 1 + len(theirs.encode("the quick brown"))  # BOS, as Meta's generate()
    ids = [1, *theirs.encode("the quick brown")]
    want = []
    with torch.inference_mode():  # greedy with the original model, no cache
        for _ in range(8):
            want.append(int(model(torch.tensor([ids + want])).logits[0, -1].argmax()))
    assert got["tokens"] == want
