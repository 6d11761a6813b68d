"""SmolLM2-135M-Instruct through sparsemap generates exactly what transformers' GGUF loading generates."""

from __future__ import annotations

import pytest
import torch

import sparsemap
from sparsemap.mapped import mapping_of

PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def smollm2():
    """(converted folder, gguf path, tokenizer, prompt ids, reference tokens, reference logits)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsemap.models import assets, smollm2

    try:
        folder = smollm2.prepare(quiet=True)
    except assets.AssetError as e:
        pytest.skip(f"SmolLM2 could not be fetched: {e}")
    gguf = smollm2.gguf_path(quiet=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    with torch.inference_mode():
        tokens = reference.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        logits = reference(**ids).logits[0, -1]
    return folder, gguf, tokenizer, ids, tokens, logits


def _generate(model, ids):
    with torch.inference_mode():
        return model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False), model(**ids).logits[0, -1]


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("which", ["converted", "gguf"])
def test_greedy_tokens_and_logits_match_transformers(smollm2, which):
    folder, gguf, tokenizer, ids, ref_tokens, ref_logits = smollm2
    model = sparsemap.from_pretrained(folder if which == "converted" else gguf)
    tokens, logits = _generate(model, ids)
    assert torch.equal(tokens, ref_tokens), tokenizer.decode(tokens[0])
    # float32 both ways, same values: equal up to float32 rounding.
    assert torch.allclose(logits, ref_logits, rtol=0, atol=1e-4)
    assert "Paris" in tokenizer.decode(tokens[0][ids["input_ids"].shape[1]:])


@pytest.mark.model
def test_the_converted_folder_is_the_model_to_transformers_safetensors_and_accelerate(smollm2, caplog):
    """No filler tensor and no other name: transformers loads it with nothing missing, unexpected or
    mismatched, safetensors lists exactly the model's tensors, accelerate uses every one of them."""
    from accelerate import init_empty_weights, load_checkpoint_in_model
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = smollm2[0]
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        stored = set(f.keys())
    assert stored == set(model.state_dict()) - {"lm_head.weight"}  # tied to the embedding, stored once
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    empty.tie_weights()
    with caplog.at_level("WARNING"):
        load_checkpoint_in_model(empty, str(folder / "model.safetensors"), device_map={"": "cpu"})
    assert not [r for r in caplog.records if "not used" in r.getMessage() or "unexpected" in r.getMessage()]
    assert not any(p.is_meta for p in empty.parameters())


@pytest.mark.model
def test_converted_weights_are_zero_copy_and_tied(smollm2):
    folder = smollm2[0]
    model = sparsemap.from_pretrained(folder)
    for name, p in model.named_parameters():
        assert mapping_of(p, name).path.endswith("model.safetensors")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    inv_freq = model.model.rotary_emb.inv_freq
    assert inv_freq.device.type == "cpu" and torch.isfinite(inv_freq).all() and inv_freq[0] == 1.0


@pytest.mark.model
def test_config_from_the_gguf_header_matches_transformers(smollm2):
    from transformers import AutoConfig

    from sparsemap.models.gguf_hf import hf_config

    gguf = smollm2[1]
    ours = hf_config(sparsemap.open(gguf)).to_dict()
    theirs = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).to_dict()
    differ = {k: (ours.get(k), theirs.get(k)) for k in {*ours, *theirs} if ours.get(k) != theirs.get(k)}
    assert set(differ) <= {"_name_or_path", "_model_name_or_path"}, differ  # where it was read from


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    sparsemap.Layout(pad_rows=("*embed_tokens*",), transpose=("*.down_proj.weight",)),
    sparsemap.Layout(bundle_ffn=True),
], ids=["pad+transpose", "bundle"])
def test_converted_layouts_generate_the_same(smollm2, tmp_path, layout):
    import shutil

    folder, _, _, ids, ref_tokens, ref_logits = smollm2
    target = tmp_path / "model"
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("model.safetensors"))
    sparsemap.convert(folder / "model.safetensors", target / "model.sparsemap.safetensors", layout=layout)
    tokens, logits = _generate(sparsemap.from_pretrained(target), ids)
    assert torch.equal(tokens, ref_tokens)
    assert torch.allclose(logits, ref_logits, rtol=0, atol=1e-4)


@pytest.mark.model
def test_lean_runtime_generates_the_same_tokens(smollm2):
    from sparsemap.models import llama

    folder, _, _, ids, ref_tokens, ref_logits = smollm2
    chat = llama.ChatTokenizer(folder)
    prompt_ids = chat.prompt_ids(PROMPT[0]["content"])
    assert prompt_ids == ids["input_ids"][0].tolist()  # same chat template, same tokenization
    model = llama.load(folder)
    assert all(mapping_of(p, n) is not None for n, p in model.named_parameters())
    out = model.generate(prompt_ids, NEW_TOKENS)
    assert out == ref_tokens[0][len(prompt_ids):].tolist()[: len(out)]
    assert len(out) == len(ref_tokens[0]) - len(prompt_ids)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids]))[0]
    assert torch.allclose(logits, ref_logits, rtol=0, atol=1e-3)


@pytest.mark.model
def test_run_command_errors_are_one_line_with_exit_code_2(tmp_path):
    import subprocess
    import sys

    (tmp_path / "notes.txt").write_text("not a model\n")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    (broken / "model.safetensors.index.json").write_text(
        '{"weight_map": {"w": "model-00001-of-00002.safetensors"}}')
    for target, needle in ((tmp_path / "missing", "no such model"),
                           (tmp_path / "notes.txt", "not a checkpoint"),
                           (broken, "model-00001-of-00002.safetensors")):
        proc = subprocess.run([sys.executable, "-m", "sparsemap.cli", "run", str(target), "hi"],
                              capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], proc.stderr


@pytest.mark.model
@pytest.mark.slow
def test_run_command_streams_an_answer_and_the_memory_report():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "sparsemap.cli", "run", "smollm2", PROMPT[0]["content"],
                           "--max-new-tokens", "16"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout and "import torch" in proc.stdout and "first token" in proc.stdout


@pytest.mark.model
@pytest.mark.parametrize("engine", ["lean", "transformers"])
def test_a_base_model_without_a_chat_template_completes_raw_text(tmp_path, engine):
    """A folder whose tokenizer has no chat template (a base model) is continued as plain text, with a
    note; the tokens are transformers' greedy continuation of the same raw ids."""
    import json
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsemap.models import smollm2

    folder = smollm2.prepare(quiet=True)
    base = tmp_path / "base"
    base.mkdir()
    for f in folder.iterdir():
        if f.name == "chat_template.jinja" or f.name.startswith("."):
            continue
        if f.name == "tokenizer_config.json":
            config = json.loads(f.read_text())
            config.pop("chat_template", None)
            (base / f.name).write_text(json.dumps(config))
        else:
            (base / f.name).symlink_to(f)
    prompt = "The capital of France is"
    cmd = [sys.executable, "-m", "sparsemap.cli", "run", str(base), prompt, "--max-new-tokens", "6",
           "--engine", engine, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["prompt_form"] == "raw: the tokenizer has no chat template"
    assert "no chat template" in proc.stderr
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        want = AutoModelForCausalLM.from_pretrained(base).generate(**ids, max_new_tokens=6, do_sample=False)
    assert report["tokens"] == want[0][ids["input_ids"].shape[1]:].tolist()[: len(report["tokens"])]


@pytest.mark.model
def test_raw_forces_plain_text_on_a_chat_model():
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "sparsemap.cli", "run", "smollm2", "Once upon a time", "--raw",
           "--max-new-tokens", "4", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["prompt_form"] == "raw"
