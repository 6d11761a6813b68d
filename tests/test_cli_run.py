"""``sparsemap run``'s generation options: where the prompt comes from, sampling flags over the model's
generation_config.json, stop strings, the system turn and the context size; bad values exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sparsemap.bench.rwkv_synthetic import write_rwkv7
from sparsemap.cli import main

from .conftest import ModuleFolders


@pytest.fixture(scope="module")
def model(module_folders: ModuleFolders) -> str:
    """A tiny random RWKV-7 with a byte vocabulary: a model with a tokenizer, fast enough to run often."""
    return str(write_rwkv7(module_folders.make("rwkv") / "model.pth", 2, 64, 16, 256, 256))


def _run(*args: str, input: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["run", *args], input=input)
    return result.exit_code, result.stdout, result.stderr


def _report(*args: str, input: str | None = None) -> dict:
    code, out, err = _run(*args, "--json", input=input)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_help_shows_examples_and_every_option_with_range_and_default() -> None:
    code, out, _ = _run("--help")
    assert code == 0 and "Examples:" in out and "sparsemap run smollm2" in out and "--seed 42" in out
    expected = {"--seed": ("2**64-1", "Default: a fresh random seed"),
                "--top-k": ("0 turns it off", "else 50"), "--top-p": ("0 to 1", "else 1"),
                "--min-p": ("0 turns it off", "llama.cpp's --min-p", "else 0"),
                "--repetition-penalty": ("Above 0", "else 1"), "--temperature": ("0 or more", "else 0"),
                "--ctx-size": ("refused", "Default: no limit"), "--stop": ("repeatable", "Default: none"),
                "--system": ("--raw", "Default: none"), "--file": ("exactly one",)}
    for flag, words in expected.items():
        assert flag in out
        for word in words:
            assert word in " ".join(out.split()), (flag, word)


@pytest.mark.parametrize("args", [[], ["Hello", "--file", "prompt.txt"], ["-", "--file", "prompt.txt"]])
def test_exactly_one_prompt_source_or_exit_2(args: list[str]) -> None:
    code, _, err = _run("no-such-model", *args)  # refused before the model is looked at
    assert code == 2 and "give the prompt one way: PROMPT, - to read stdin, or --file PATH" in err


@pytest.mark.parametrize(("flags", "message"), [
    (["--temperature", "-1"], "temperature must be 0 (greedy) or more, not -1.0"),
    (["--top-k", "-3"], "top_k must be a whole number, 0 (off) or more, not -3"),
    (["--top-p", "1.5"], "top_p must be between 0 and 1, not 1.5"),
    (["--min-p", "-0.5"], "min_p must be between 0 (off) and 1, not -0.5"),
    (["--repetition-penalty", "0"], "repetition_penalty must be above 0 (1 turns it off), not 0.0"),
    (["--seed", "-1"], "seed must be a whole number from 0 to 2**64 - 1, not -1"),
    (["--ctx-size", "1"], "ctx_size must be 2 or more (a prompt token and a new one), not 1"),
    (["--stop", ""], "a stop string must not be empty"),
    (["--system", "Be brief.", "--raw"], "a system message needs the chat template"),
])
def test_bad_values_exit_2_with_one_line_naming_the_setting(model: str, flags: list[str],
                                                            message: str) -> None:
    code, out, err = _run(model, "Hello", *flags)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparsemap: error: ") and message in lines[0]
    assert "memory by phase" not in out  # nothing ran


def test_the_prompt_from_stdin_or_a_file_loses_one_trailing_newline(model: str, tmp_path: Path) -> None:
    from_stdin = _report(model, "-", "--raw", "--max-new-tokens", "2", input="Hello\n")
    assert (from_stdin["prompt"], from_stdin["prompt_tokens"]) == ("Hello", 5)  # one byte a token
    path = tmp_path / "prompt.txt"
    path.write_text("line one\nline two\n\n")
    from_file = _report(model, "--file", str(path), "--raw", "--max-new-tokens", "2")
    assert from_file["prompt"] == "line one\nline two\n"
    code, _, err = _run(model, "--file", str(tmp_path / "missing.txt"))
    assert code == 2 and "missing.txt" in err and "cannot read the prompt" in err


def test_the_seed_repeats_a_run_and_a_run_without_one_reports_its_own(model: str) -> None:
    args = (model, "Hello", "--temperature", "1.5", "--top-k", "20", "--top-p", "0.9", "--min-p", "0.05",
            "--repetition-penalty", "1.1", "--max-new-tokens", "8")
    first = _report(*args, "--seed", "7")
    assert first["sampling"] == {"temperature": 1.5, "top_k": 20, "top_p": 0.9, "min_p": 0.05,
                                 "repetition_penalty": 1.1, "seed": 7}
    assert _report(*args, "--seed", "7")["tokens"] == first["tokens"]
    unseeded = _report(*args)
    assert isinstance(unseeded["sampling"]["seed"], int)
    assert _report(*args, "--seed", str(unseeded["sampling"]["seed"]))["tokens"] == unseeded["tokens"]


def test_the_text_output_names_the_settings_and_greedy_flags_get_a_note(model: str) -> None:
    code, out, _ = _run(model, "Hello", "--temperature", "0.5", "--seed", "3", "--max-new-tokens", "3")
    assert code == 0 and "sampled: temperature 0.5, top-k 50, top-p 1, seed 3" in out and "min-p" not in out
    code, out, _ = _run(model, "Hello", "--temperature", "0.5", "--min-p", "0.1", "--seed", "3",
                        "--max-new-tokens", "3")
    assert code == 0 and "sampled: temperature 0.5, top-k 50, top-p 1, min-p 0.1, seed 3" in out
    code, out, err = _run(model, "Hello", "--top-k", "5", "--max-new-tokens", "3")
    assert code == 0 and "greedy decoding" in out
    assert "--top-k, --top-p, --min-p and --seed apply when sampling" in err


def test_stop_strings_take_escapes_and_the_system_turn_reaches_the_prompt(model: str) -> None:
    report = _report(model, "Hi", "--stop", "\\n\\n", "--stop", "a\\tb\\\\", "--system", "Be brief.",
                     "--max-new-tokens", "2")
    assert report["stop"] == ["\n\n", "a\tb\\"]
    assert report["system"] == "Be brief." and report["prompt_form"] == "chat"
    assert report["prompt_tokens"] == len(b"System: Be brief.\n\nUser: Hi\n\nAssistant:")


def test_the_context_size_caps_new_tokens_and_refuses_a_prompt_that_fills_it(model: str) -> None:
    prompt_tokens = len(b"User: Hello\n\nAssistant:")
    code, out, err = _run(model, "Hello", "--ctx-size", str(prompt_tokens + 2), "--json")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["new_tokens"] <= 2
    assert f"the context {prompt_tokens + 2}: at most 2 new tokens" in err
    code, _, err = _run(model, "Hello", "--ctx-size", str(prompt_tokens), "--max-new-tokens", "10")
    assert code == 2
    assert (f"the prompt is {prompt_tokens} tokens and the context {prompt_tokens}: no room for an answer "
            f"(a context of {prompt_tokens + 10} fits it and 10 new tokens)") in err


# ---------------------------------------------------------------- the model's generation_config.json

@pytest.fixture
def sampling_smollm2(tmp_path: Path) -> Path:
    """SmolLM2's converted folder (linked) with a generation_config.json that samples."""
    from sparsemap.models import assets, smollm2

    try:
        folder = smollm2.prepare(quiet=True)
    except assets.AssetError as e:
        pytest.skip(f"SmolLM2 could not be fetched: {e}")
    copy = tmp_path / "smollm2-sampling"
    copy.mkdir()
    for f in folder.iterdir():
        if f.name != "generation_config.json" and not f.name.startswith("."):
            (copy / f.name).symlink_to(f)
    config = json.loads((folder / "generation_config.json").read_text())
    config.update(do_sample=True, temperature=0.6, top_k=20, top_p=0.9, repetition_penalty=1.05)
    (copy / "generation_config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.model
def test_generation_config_gives_the_defaults_and_flags_override_them(sampling_smollm2: Path) -> None:
    folder = str(sampling_smollm2)
    defaults = _report(folder, "Hi", "--max-new-tokens", "2", "--seed", "1")["sampling"]
    assert defaults == {"temperature": 0.6, "top_k": 20, "top_p": 0.9, "min_p": 0.0,
                        "repetition_penalty": 1.05, "seed": 1}
    flags = ("--temperature", "0", "--top-k", "5")
    overridden = _report(folder, "Hi", "--max-new-tokens", "2", *flags)["sampling"]
    assert overridden == {"temperature": 0.0, "top_k": 5, "top_p": 0.9, "min_p": 0.0,
                          "repetition_penalty": 1.05, "seed": None}


@pytest.mark.model
def test_settings_the_lean_engine_leaves_out_of_generation_config_are_said(sampling_smollm2: Path) -> None:
    path = sampling_smollm2 / "generation_config.json"
    config = json.loads(path.read_text())
    config.update(typical_p=0.9, no_repeat_ngram_size=3, num_beams=1)  # num_beams 1: nothing asked
    path.write_text(json.dumps(config))
    folder = str(sampling_smollm2)
    code, _, err = _run(folder, "Hi", "--max-new-tokens", "2", "--engine", "lean")
    assert code == 0, err
    assert ("(generation_config.json asks for no_repeat_ngram_size 3, typical_p 0.9: sparsemap's sampling "
            "does not apply them; --engine transformers does)") in err
    # Greedy decoding: transformers ignores typical_p too.
    code, _, err = _run(folder, "Hi", "--max-new-tokens", "2", "--engine", "lean", "--temperature", "0")
    assert code == 0 and "asks for no_repeat_ngram_size 3: sparsemap's sampling does not apply it;" in err
    code, _, err = _run(folder, "Hi", "--max-new-tokens", "2", "--engine", "transformers")
    assert code == 0 and "generation_config.json asks for" not in err
