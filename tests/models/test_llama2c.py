"""llama2.c models in the lean engine: logits against the same weights run from safetensors and against
transformers, Q8_0 within its quantization error and kept int8, weights mapped (anonymous memory under
2% of the weights), run.c's tokenizer, and ``sparsemap run model.bin``.

The checkpoints are written here as llama2.c's export.py writes them, from tiny random transformers
Llamas (q and k rows permuted to Meta's order, as export.py's ``load_hf_model`` does). Checked by hand
once against run.c and runq.c built from karpathy/llama2.c, with its real tokenizer.bin: the same
prompt ids for eight prompts (accents, CJK, emoji by byte fallback, tabs, the empty prompt) and the
same greedy continuation from v0, v1 and v2 files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import LlamaConfig, LlamaForCausalLM

import sparsemap
from sparsemap import errors
from sparsemap.cli import main
from sparsemap.mapped import mapping_of
from sparsemap.models import llama
from sparsemap.models.generate import Llama2cEngine, answer, pick_engine
from sparsemap.models.llama2c import config, load
from sparsemap.models.llama2c_tokenizer import BOS, EOS, Llama2cTokenizer, write_tokenizer
from sparsemap.qtensor import QuantizedTensor

from ..format_writers import quantize_q80, random_state, tiny_llama, write_llama2c
from ..helpers import run_isolated

IDS = [BOS, 7, 123, 45, 299, 8, 8, 200, 31]


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        out = model(torch.tensor([ids]))
    return out.logits[0, -1] if hasattr(out, "logits") else out[0]


def _greedy(model: torch.nn.Module, ids: list[int], n: int, stop: int) -> list[int]:
    """``n`` tokens by argmax, without a cache, up to and including ``stop``."""
    out: list[int] = []
    while len(out) < n and (not out or out[-1] != stop):
        out.append(int(_logits(model, ids + out).argmax()))
    return out


def _dequantized(model: LlamaForCausalLM, group: int) -> LlamaForCausalLM:
    """The model with every matrix replaced by what export.py's Q8_0 gives back (norms kept)."""
    q = LlamaForCausalLM(model.config).eval()
    sd = {}
    for name, w in model.state_dict().items():
        if w.dim() == 2:
            values, scale = quantize_q80(w, group)
            w = (values.float() * scale[:, None]).view(w.shape)
        sd[name] = w
    q.load_state_dict(sd)
    return q


@pytest.mark.parametrize("shared", [False, True], ids=["own-classifier", "shared-classifier"])
@pytest.mark.parametrize("version", [0, 1])
def test_float_files_give_the_logits_of_the_same_weights_from_safetensors(tmp_path: Path, version: int,
                                                                          shared: bool) -> None:
    reference = tiny_llama(shared=shared)
    reference.save_pretrained(tmp_path / "hf")
    path = write_llama2c(tmp_path / "model.bin", reference, version)
    lean = load(path)
    from_safetensors = llama.load(tmp_path / "hf")
    want = _logits(from_safetensors, IDS)
    assert torch.allclose(_logits(lean, IDS), want, atol=1e-5, rtol=0)
    assert torch.allclose(_logits(reference, IDS), want, atol=1e-5, rtol=0)
    assert lean.generate(IDS, 12) == from_safetensors.generate(IDS, 12)
    # Every weight a view of the file, q and k included (their outputs are reordered instead).
    file = mapping_of(lean.model.norm.weight).path
    assert all(mapping_of(p).path == file for p in lean.parameters())


@pytest.mark.parametrize("version", [0, 2])
def test_transformers_loads_the_file_in_its_own_row_order(tmp_path: Path, version: int) -> None:
    reference = tiny_llama()
    path = write_llama2c(tmp_path / "model.bin", reference, version)
    cfg = config(sparsemap.open(path))
    model = sparsemap.load(lambda: LlamaForCausalLM(LlamaConfig(**cfg)), path).eval()
    if version == 0:
        assert torch.equal(_logits(model, IDS), _logits(reference, IDS))
    else:  # dequantized q and k in transformers' order, the other matrices on the int8 kernel
        assert type(model.model.layers[0].self_attn.v_proj.weight) is QuantizedTensor
        want = _logits(_dequantized(reference, 64), IDS)
        assert torch.allclose(_logits(model, IDS), want, atol=0.05, rtol=0)


def test_from_pretrained_reads_the_config_from_the_header(tmp_path: Path) -> None:
    reference = tiny_llama(shared=True)
    model = sparsemap.from_pretrained(write_llama2c(tmp_path / "model.bin", reference, 1))
    assert type(model) is LlamaForCausalLM and model.config.tie_word_embeddings
    assert model.config.rms_norm_eps == 1e-5 and model.config.max_position_embeddings == 32
    assert torch.equal(_logits(model, IDS), _logits(reference, IDS))


def test_q8_0_runs_on_the_int8_kernel_within_quantization_error(tmp_path: Path) -> None:
    reference = tiny_llama(intermediate_size=128)  # rows of 64 and 128: every matrix kept int8
    path = write_llama2c(tmp_path / "model.bin", reference, 2)
    lean = load(path)
    weights = dict(lean.named_parameters())
    matrices = {n: w for n, w in weights.items() if w.dim() == 2}
    assert matrices and all(type(w) is QuantizedTensor for w in matrices.values())
    assert all(mapping_of(part).path == str(path) for w in matrices.values() for part in w.parts)
    exact = _logits(_dequantized(reference, 64), IDS)
    got = _logits(lean, IDS)
    # The kernel rounds activations to bf16 (llama.cpp's and runq.c's dot products round to 8 bits).
    assert torch.allclose(got, exact, atol=0.05, rtol=0), (got - exact).abs().max()
    assert (got - _logits(reference, IDS)).abs().max() < 0.2
    assert lean.generate(IDS, 8)


def test_q8_0_rows_that_straddle_groups_are_dequantized_exactly(tmp_path: Path) -> None:
    reference = tiny_llama()  # down_proj rows of 96 in groups of 64
    path = write_llama2c(tmp_path / "model.bin", reference, 2)
    lean = load(path)
    down = lean.model.layers[0].mlp.down_proj.weight
    assert type(down) is not QuantizedTensor
    values, scale = quantize_q80(reference.model.layers[0].mlp.down_proj.weight, 64)
    assert torch.equal(down, (values.float() * scale[:, None]).view(64, 96))
    assert torch.allclose(_logits(lean, IDS), _logits(_dequantized(reference, 64), IDS), atol=0.05, rtol=0)


def test_loading_maps_the_weights_anonymous_growth_under_2_percent(tmp_path: Path) -> None:
    """Anonymous memory is what loading costs beyond the mapped file: modules, entries, the int8 weights'
    wrappers (about 250 KiB the first time, whatever the model's size, measured), so the model is large
    enough (84 MB in float32, 22 MB in Q8_0) for that to be under 2%."""
    cfg = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 8,
           "num_key_value_heads": 4, "vocab_size": 8192, "max_position_embeddings": 64}
    state = random_state(cfg)
    files = {v: write_llama2c(tmp_path / f"v{v}.bin", (state, cfg), v) for v in (1, 2)}
    del state
    for version, path in files.items():
        result = run_isolated(f"""
            import json, torch
            import sparsemap.loader, sparsemap.models.llama, sparsemap.qtensor  # code, not weights
            from sparsemap.memory import AnonSampler, rss_anon
            from sparsemap.models.llama2c import load
            from sparsemap.formats.dispatch import open_catalog
            nbytes = open_catalog({str(path)!r}).nbytes
            before = rss_anon()
            with AnonSampler() as sampler:
                model = load({str(path)!r})
            print(json.dumps({{"growth": sampler.peak - before, "nbytes": nbytes}}))
        """)
        assert result["growth"] < 0.02 * result["nbytes"], (version, result)
        print(f"llama2c v{version}: +{result['growth'] / 2**10:.0f} KiB anonymous for "
              f"{result['nbytes'] / 2**20:.1f} MiB of weights")


# ---------------------------------------------------------------- the tokenizer

def tiny_vocabulary() -> tuple[list[bytes], list[float]]:
    """llama2.c's id layout (<unk>, BOS, EOS, 256 byte pieces), then a few pieces and merges."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n", *(f"<0x{b:02X}>".encode() for b in range(256))]
    scores = [0.0] * len(pieces)
    for piece, score in [(b" ", -1.0), (b"O", -2.0), (b"n", -2.0), (b"c", -2.0), (b"e", -2.0), (b"u", -2.0),
                         (b"p", -2.0), (b"o", -2.0), (b"a", -2.0), (b"t", -2.0), (b"i", -2.0), (b"m", -2.0),
                         (b"\xc3\xa9", -2.0), (b" O", -5.0), (b"On", -3.0), (b"nc", -4.0), (b"Onc", -6.0),
                         (b"Once", -7.0), (b" Once", -8.0), (b"up", -4.0), (b" up", -6.0), (b"on", -4.0),
                         (b" upon", -9.0), (b" a", -5.0), (b" t", -5.0), (b"me", -4.0), (b"time", -7.0),
                         (b"ti", -3.0), (b" time", -9.0)]:
        pieces.append(piece)
        scores.append(score)
    return pieces, scores


@pytest.fixture
def tokenizer_file(tmp_path: Path) -> Path:
    pieces, scores = tiny_vocabulary()
    write_tokenizer(tmp_path / "tokenizer.bin", pieces, scores)
    return tmp_path / "tokenizer.bin"


def test_a_written_tokenizer_round_trips(tokenizer_file: Path) -> None:
    pieces, scores = tiny_vocabulary()
    tok = Llama2cTokenizer.from_file(tokenizer_file, len(pieces))
    assert tok.pieces == pieces and tok.scores == scores and tok.max_token_length == 6
    for text in ("Once upon a time", "naïve café, 日本 🤖", "", "  two spaces\tand a tab\n"):
        ids = tok.encode(text)
        assert ids[0] == BOS and tok.decode(ids) == text


def test_encoding_is_run_c_s_greedy_merge_by_score(tokenizer_file: Path) -> None:
    tok = Llama2cTokenizer.from_file(tokenizer_file, len(tiny_vocabulary()[0]))
    id_of = tok.ids
    # BOS, the dummy-prefix space, then characters merged best score first (the first of equal scores):
    # "On" and "ti" before " O" and " t", so those never form; then " Once", " upon", " a", " time".
    assert tok.encode("Once upon a time") == [BOS, *(id_of[p] for p in (b" Once", b" upon", b" a", b" time"))]
    assert tok.encode("") == [BOS]
    assert tok.encode("é!", eos=True) == [BOS, id_of[b" "], id_of[b"\xc3\xa9"], ord("!") + 3, EOS]
    assert tok.encode("日")[2:] == [b + 3 for b in "日".encode()]  # byte fallback, one token a byte
    # After BOS a piece loses its leading space, and <0xNN> pieces are their byte.
    assert tok.decode([id_of[b" Once"]], prev=BOS) == "Once" and tok.decode([ord("A") + 3]) == "A"


def test_damaged_tokenizers_are_refused(tokenizer_file: Path) -> None:
    vocab = len(tiny_vocabulary()[0])
    content = tokenizer_file.read_bytes()
    with pytest.raises(errors.TrailingBytesError, match="another vocabulary"):
        Llama2cTokenizer.from_file(tokenizer_file, vocab - 1)
    with pytest.raises(errors.TruncatedFileError, match=f"token {vocab}'s score and length need 8 bytes"):
        Llama2cTokenizer.from_file(tokenizer_file, vocab + 1)
    with pytest.raises(errors.TruncatedFileError, match=f"{2 * vocab} tokens need at least"):
        Llama2cTokenizer.from_file(tokenizer_file, 2 * vocab)  # refused before reading
    tokenizer_file.write_bytes(content[:-3])
    with pytest.raises(errors.TruncatedFileError, match=f"token {vocab - 1}'s 5 bytes"):
        Llama2cTokenizer.from_file(tokenizer_file, vocab)
    write_tokenizer(tokenizer_file, [b"", b"", b"abc"], [0.0] * 3, max_token_length=1)
    with pytest.raises(errors.Llama2cFormatError, match="token 2 is 3 bytes, over max_token_length 1"):
        Llama2cTokenizer.from_file(tokenizer_file, 3)
    tokenizer_file.write_bytes((0).to_bytes(4, "little") + content[4:])
    with pytest.raises(errors.Llama2cFormatError, match="max_token_length is 0"):
        Llama2cTokenizer.from_file(tokenizer_file, vocab)
    tokenizer_file.write_bytes(content + bytes(10_000))
    with pytest.raises(errors.TrailingBytesError, match="take at most"):
        Llama2cTokenizer.from_file(tokenizer_file, vocab)
    small = Llama2cTokenizer([b"<unk>", b"<s>", b"</s>", b" "], [0.0] * 4, 5)
    with pytest.raises(errors.BadInputError, match="byte 0x41 of the text has no token"):
        small.encode("A")


# ---------------------------------------------------------------- sparsemap run model.bin

@pytest.fixture
def llama2c_folder(tmp_path: Path, tokenizer_file: Path) -> Path:
    pieces, _ = tiny_vocabulary()
    reference = tiny_llama(vocab_size=len(pieces))
    write_llama2c(tmp_path / "model.bin", reference, 1)
    reference.save_pretrained(tmp_path / "hf")
    return tmp_path


def test_run_continues_the_prompt_as_run_c_does(llama2c_folder: Path) -> None:
    path = llama2c_folder / "model.bin"
    engine = pick_engine(str(path), "auto")
    assert type(engine) is Llama2cEngine
    report = answer(engine, str(path), "Once upon a time", max_new_tokens=10)
    tok = Llama2cTokenizer.from_file(llama2c_folder / "tokenizer.bin", len(tiny_vocabulary()[0]))
    ids = tok.encode("Once upon a time")
    expected = _greedy(llama.load(llama2c_folder / "hf"), ids, 10, stop=BOS)  # run.c stops at BOS
    assert report["prompt_tokens"] == len(ids) and report["tokens"] == expected
    assert report["answer"] == tok.decode(expected) and report["prompt_form"].startswith("raw")


def test_the_cli_finds_the_tokenizer_beside_or_takes_one(llama2c_folder: Path, tmp_path: Path) -> None:
    path = llama2c_folder / "model.bin"
    prompt = ["run", str(path), "Once upon a time", "--max-new-tokens", "4"]
    result = CliRunner().invoke(main, [*prompt, "--json"])
    assert result.exit_code == 0, result.output
    beside = json.loads(result.stdout.strip().splitlines()[-1])
    elsewhere = llama2c_folder / "tokenizers"
    elsewhere.mkdir()
    (llama2c_folder / "tokenizer.bin").rename(elsewhere / "tok.bin")
    result = CliRunner().invoke(main, prompt)
    assert result.exit_code == 2 and "no tokenizer.bin beside the model" in result.stderr
    result = CliRunner().invoke(main, [*prompt, "--json", "--tokenizer", str(elsewhere / "tok.bin")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["tokens"] == beside["tokens"]
    refusals = ((["--engine", "transformers"], "lean engine"), (["--system", "Be brief."], "system"))
    for refused, words in refusals:
        result = CliRunner().invoke(main, ["run", str(path), "Hi", "--tokenizer", str(elsewhere / "tok.bin"),
                                           *refused])
        assert result.exit_code == 2 and words in result.stderr, result.output
    result = CliRunner().invoke(main, ["run", str(llama2c_folder / "hf"), "Hi", "--tokenizer", str(path)])
    assert result.exit_code == 2 and "--tokenizer names a llama2.c tokenizer.bin" in result.stderr


# ---------------------------------------------------------------- converting

@pytest.mark.parametrize("quantize", [None, "q8_0"])
def test_convert_writes_transformers_rows_float_or_requantized(tmp_path: Path, quantize: str | None) -> None:
    reference = tiny_llama(intermediate_size=128)
    path = write_llama2c(tmp_path / "model.bin", reference, 2)
    out = tmp_path / "out.safetensors"
    sparsemap.convert(path, out, layout=sparsemap.Layout(quantize=quantize))
    source, converted = sparsemap.Checkpoint(path), sparsemap.Checkpoint(out)
    assert set(converted) == set(source)
    for name in source:
        want = source.tensor(name)  # dequantized, q and k in transformers' order
        got = converted.tensor(name)
        if quantize is None or want.dim() == 1:
            assert torch.equal(got, want), name
        else:  # kept in llama2.c's groups of 64 (as a GGUF's blocks are): within half a step of them
            assert converted.catalog.quantized[name].group == 64, name
            step = want.abs().reshape(-1, 32).amax(-1).repeat_interleave(32).view(want.shape) / 127
            assert ((got - want).abs() <= step / 2 + 1e-6).all(), name


def _lean_folder(converted: Path, source: Path, out: Path) -> Path:
    """The file converted from ``source`` as a folder the lean Llama loads: it and the header's config."""
    out.mkdir()
    converted.rename(out / "model.sparsemap.safetensors")
    (out / "config.json").write_text(json.dumps(config(sparsemap.open(source))))
    return out


def test_convert_keep_writes_the_q8_0_groups_as_they_lie_and_computes_the_same_logits(tmp_path: Path,
                                                                                       caplog) -> None:
    reference = tiny_llama(intermediate_size=128)  # rows of 64 and 128: every matrix kept int8
    path = write_llama2c(tmp_path / "model.bin", reference, 2)
    with caplog.at_level("WARNING", logger="sparsemap"):
        sparsemap.convert(path, tmp_path / "out.safetensors", layout=sparsemap.Layout(quantize="keep"))
    assert "dequantized" not in caplog.text
    source, converted = sparsemap.Checkpoint(path), sparsemap.Checkpoint(tmp_path / "out.safetensors")
    assert set(converted.catalog.quantized) == set(source.catalog.quantized)
    assert len(source.catalog.quantized) == 16
    for name, weight in converted.catalog.quantized.items():
        assert (weight.scheme, weight.group, weight.source) == ("int8", 64, "llama2c-Q8_0/64"), name
        # The same int8 values and float32 scales, contiguous now (the source's are strided views).
        theirs, ours = source.quantized(name), converted.quantized(name)
        if source.catalog[name].order is not None:  # q and k: rows put in transformers' order
            index = torch.tensor(source.catalog[name].order).argsort()
            theirs = [theirs[0].index_select(1, index), theirs[1].index_select(1, index)]
        assert all(torch.equal(a, b) for a, b in zip(theirs, ours, strict=True)), name
        assert torch.equal(converted.tensor(name), source.tensor(name)), name
    # The same logits, bit for bit: the lean engine runs the same int8 groups through the same kernel.
    lean = load(path)
    folder = _lean_folder(tmp_path / "out.safetensors", path, tmp_path / "converted")
    from_converted = llama.load(folder)
    assert all(type(w) is QuantizedTensor for w in from_converted.parameters() if w.dim() == 2)
    assert torch.equal(_logits(from_converted, IDS), _logits(lean, IDS))
    assert from_converted.generate(IDS, 8) == lean.generate(IDS, 8)


def test_convert_keep_dequantizes_groups_that_straddle_rows_and_says_so(tmp_path: Path, caplog) -> None:
    reference = tiny_llama()  # down_proj rows of 96 in groups of 64: no kernel layout holds them
    path = write_llama2c(tmp_path / "model.bin", reference, 2)
    with caplog.at_level("WARNING", logger="sparsemap"):
        result = CliRunner().invoke(main, ["convert", str(path), str(tmp_path / "out.safetensors"),
                                           "--quantize", "keep"])
    assert result.exit_code == 0, result.output
    notes = [r.getMessage() for r in caplog.records if "dequantized" in r.getMessage()]
    assert notes == [f"{path}: --quantize keep: 2 tensor(s) stored dequantized to float32 "
                     "(model.layers.0.mlp.down_proj.weight, model.layers.1.mlp.down_proj.weight): "
                     "llama2.c's Q8_0 groups straddle their rows (96 values a row, groups of 64), which no "
                     "kernel layout holds"]
    converted = sparsemap.Checkpoint(tmp_path / "out.safetensors")
    assert len(converted.catalog.quantized) == 14 and "model.layers.0.mlp.down_proj.weight" not in \
        converted.catalog.quantized
    source = sparsemap.Checkpoint(path)
    assert all(torch.equal(converted.tensor(n), source.tensor(n)) for n in source)
    folder = _lean_folder(tmp_path / "out.safetensors", path, tmp_path / "converted")
    assert torch.equal(_logits(llama.load(folder), IDS), _logits(load(path), IDS))


def test_convert_q8_0_quantizes_the_straddling_groups_from_their_values(tmp_path: Path) -> None:
    path = write_llama2c(tmp_path / "model.bin", tiny_llama(), 2)
    sparsemap.convert(path, tmp_path / "out.safetensors", layout=sparsemap.Layout(quantize="q8_0"))
    source, converted = sparsemap.Checkpoint(path), sparsemap.Checkpoint(tmp_path / "out.safetensors")
    down = converted.catalog.quantized["model.layers.0.mlp.down_proj.weight"]
    assert (down.group, down.source) == (32, "F32")  # quantized again, in groups of 32 of each row
    assert converted.catalog.quantized["model.layers.0.mlp.up_proj.weight"].group == 64  # kept as it lies
    want = source.tensor("model.layers.0.mlp.down_proj.weight")
    step = want.abs().reshape(-1, 32).amax(-1).repeat_interleave(32).view(want.shape) / 127
    assert ((converted.tensor("model.layers.0.mlp.down_proj.weight") - want).abs() <= step / 2 + 1e-6).all()
