"""Generation options in every engine: sampled tokens equal transformers' ``generate`` under the same seed
and settings; stop strings, the system turn and the context size through :func:`answer`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from sparsemap.bench.rwkv_synthetic import write_rwkv7
from sparsemap.errors import BadInputError
from sparsemap.models import llama, rwkv
from sparsemap.models.generate import AnswerText, LeanEngine, RwkvEngine, TransformersEngine, answer
from sparsemap.models.sampling import Sampling

from ..conftest import ModuleFolders, tiny_llama_config

SETTINGS = {
    "temperature-only": Sampling(temperature=1.0, top_k=0, seed=0),
    "defaults-at-0.7": Sampling(temperature=0.7, seed=1),
    "all-four": Sampling(temperature=0.8, top_k=10, top_p=0.9, repetition_penalty=1.3, seed=5),
    "hot-nucleus": Sampling(temperature=1.5, top_k=0, top_p=0.5, seed=2**40),
    "reward-repeats": Sampling(temperature=2.0, top_k=3, repetition_penalty=0.7, seed=9),
    # The tiny model's logits are nearly flat: min-p filters only at a low temperature.
    "cold-min-p": Sampling(temperature=0.1, top_k=0, min_p=0.3, seed=4),
    "all-five": Sampling(temperature=0.3, top_k=40, top_p=0.95, min_p=0.5, repetition_penalty=1.2, seed=6),
    "greedy-penalized": Sampling(repetition_penalty=1.5),
}
NEW = 40


def _reference(settings: Sampling, model: LlamaForCausalLM, ids: torch.Tensor) -> list[int]:
    """transformers' own: ``torch.manual_seed(seed)``, then ``generate(do_sample=True, ...)``."""
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    kwargs: dict = {"do_sample": False}
    if not settings.greedy:
        kwargs = {"do_sample": True, "temperature": settings.temperature, "top_k": settings.top_k,
                  "top_p": settings.top_p, "min_p": settings.min_p or None}
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                             repetition_penalty=settings.repetition_penalty, **kwargs)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def tiny(module_folders: ModuleFolders) -> tuple[LlamaForCausalLM, llama.Llama, torch.Tensor]:
    """(transformers' model, the lean one from its saved folder, a prompt (1, 9))."""
    folder = module_folders.make("tiny-llama")
    torch.manual_seed(7)
    reference = LlamaForCausalLM(tiny_llama_config()).eval()
    reference.save_pretrained(folder)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    return reference, llama.load(folder), ids


# ---------------------------------------------------------------- lean Llama == transformers

@pytest.mark.parametrize("name", list(SETTINGS))
def test_lean_llama_samples_transformers_tokens(tiny, name: str) -> None:
    reference, lean, ids = tiny
    settings = SETTINGS[name]
    want = _reference(settings, reference, ids)
    assert lean.generate(ids[0].tolist(), NEW, sampling=settings) == want
    if not settings.greedy:
        assert want != _reference(Sampling(), reference, ids)  # it did sample
    if settings.min_p:
        assert want != _reference(replace(settings, min_p=0.0), reference, ids)  # min-p did filter


@pytest.mark.parametrize("name", ["all-four", "all-five", "greedy-penalized"])
def test_both_engines_choose_the_same_tokens_and_stream_each(tiny, name: str) -> None:
    """``LeanEngine.generate`` and ``TransformersEngine.generate`` (seeding, settings, the per-token tap)."""
    reference, lean, ids = tiny
    settings = SETTINGS[name]
    heard: dict[str, list[int]] = {"lean": [], "transformers": []}
    got = {"lean": LeanEngine().generate(lean, ids[0].tolist(), NEW, settings, heard["lean"].append),
           "transformers": TransformersEngine(lambda s: reference).generate(
               reference, ids[0].tolist(), NEW, settings, heard["transformers"].append)}
    want = _reference(settings, reference, ids)
    assert got == heard == {"lean": want, "transformers": want}


@pytest.mark.parametrize("engine", ["lean", "transformers"])
def test_a_true_answer_from_on_token_stops_at_that_token(tiny, engine: str) -> None:
    reference, lean, ids = tiny
    settings = SETTINGS["all-four"]
    full = _reference(settings, reference, ids)
    heard: list[int] = []

    def on_token(token: int) -> bool:
        heard.append(token)
        return len(heard) == 5

    runner = LeanEngine() if engine == "lean" else TransformersEngine(lambda s: reference)
    out = runner.generate(lean if engine == "lean" else reference, ids[0].tolist(), NEW, settings, on_token)
    assert out == heard == full[:5]


def test_the_temperature_shorthand_still_samples(tiny) -> None:
    _, lean, ids = tiny
    torch.manual_seed(3)
    drawn = lean.generate(ids[0].tolist(), 12, temperature=0.9)
    assert drawn == lean.generate(ids[0].tolist(), 12, sampling=Sampling(temperature=0.9, seed=3))
    with pytest.raises(BadInputError, match="not both"):
        lean.generate(ids[0].tolist(), 2, sampling=Sampling(), temperature=0.9)


# ---------------------------------------------------------------- RWKV

@pytest.fixture(scope="module")
def rwkv_path(module_folders: ModuleFolders) -> Path:
    return write_rwkv7(module_folders.make("rwkv") / "model.pth", 2, 64, 16, 256, 256)


PROMPT = [(i * 37 + 11) % 256 for i in range(16)]


def test_rwkv_honours_every_setting(rwkv_path: Path) -> None:
    model = rwkv.load(rwkv_path)
    greedy = model.generate(PROMPT, 24)
    # top-k 1 leaves one token to draw: the argmax, whatever the temperature.
    assert model.generate(PROMPT, 24, sampling=Sampling(temperature=3.0, top_k=1, seed=0)) == greedy
    nucleus_of_one = Sampling(temperature=3.0, top_k=0, top_p=0.0, seed=0)
    assert model.generate(PROMPT, 24, sampling=nucleus_of_one) == greedy
    drawn = model.generate(PROMPT, 24, sampling=Sampling(temperature=2.0, seed=11))
    assert drawn == model.generate(PROMPT, 24, sampling=Sampling(temperature=2.0, seed=11)) != greedy
    penalized = model.generate(PROMPT, 24, sampling=Sampling(repetition_penalty=5.0))
    assert penalized != greedy
    # The penalty divides (or multiplies) the logits of every token seen: none repeats while others remain.
    assert len(set(penalized)) == len(penalized) and not set(penalized) & set(PROMPT)


def test_rwkv_engine_answers_with_settings_a_system_turn_and_a_context(rwkv_path: Path) -> None:
    notes: list[str] = []
    settings = Sampling(temperature=1.2, top_p=0.8, seed=77)
    first = answer(RwkvEngine(), rwkv_path, "Hello", max_new_tokens=8, sampling=settings)
    again = answer(RwkvEngine(), rwkv_path, "Hello", max_new_tokens=8, sampling=settings)
    assert first["tokens"] == again["tokens"] and first["sampling"] == settings.to_dict()
    engine = RwkvEngine()
    tokenizer = engine.load_tokenizer(_source(rwkv_path))
    assert bytes(engine.prompt_ids(tokenizer, "Hi", system="Be brief.")) == \
        b"System: Be brief.\n\nUser: Hi\n\nAssistant:"
    prompt_tokens = len(b"User: Hello\n\nAssistant:")
    capped = answer(RwkvEngine(), rwkv_path, "Hello", max_new_tokens=8, ctx_size=prompt_tokens + 3,
                    on_note=notes.append)
    assert capped["new_tokens"] <= 3 and capped["prompt_tokens"] == prompt_tokens
    assert notes == [f"(the prompt is {prompt_tokens} tokens and the context {prompt_tokens + 3}: "
                     "at most 3 new tokens)"]
    with pytest.raises(BadInputError) as e:
        answer(RwkvEngine(), rwkv_path, "Hello", max_new_tokens=8, ctx_size=prompt_tokens)
    assert str(e.value) == (f"the prompt is {prompt_tokens} tokens and the context {prompt_tokens}: no room "
                            f"for an answer (a context of {prompt_tokens + 8} fits it and 8 new tokens)")


def _source(path: Path):
    from sparsemap.models.generate import resolve_model

    return resolve_model(path)


def test_a_draw_without_a_seed_gets_one_and_reports_it(rwkv_path: Path) -> None:
    first = answer(RwkvEngine(), rwkv_path, "Hello", max_new_tokens=6, sampling=Sampling(temperature=1.5))
    seed = first["sampling"]["seed"]
    assert isinstance(seed, int)
    repeat = answer(RwkvEngine(), rwkv_path, "Hello", max_new_tokens=6,
                    sampling=Sampling(temperature=1.5, seed=seed))
    assert repeat["tokens"] == first["tokens"]
    greedy = answer(RwkvEngine(), rwkv_path, "Hello", max_new_tokens=6)  # no generation_config: greedy
    assert greedy["sampling"] == Sampling().to_dict()


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"stop": ("",)}, "a stop string must not be empty"),
    ({"ctx_size": 1}, "ctx_size must be 2 or more"),
    ({"system": "Be brief.", "raw": True}, "a system message needs the chat template"),
    ({"raw": True, "prompt": ""}, "the prompt has no tokens"),
])
def test_bad_options_are_refused(rwkv_path: Path, kwargs: dict, needle: str) -> None:
    prompt = kwargs.pop("prompt", "Hello")
    with pytest.raises(BadInputError, match=needle):
        answer(RwkvEngine(), rwkv_path, prompt, max_new_tokens=4, **kwargs)


# ---------------------------------------------------------------- stop strings, token by token

def _pieces(*texts: str):
    return lambda ids: "".join(texts[i] for i in ids)


def _feed(text: AnswerText, count: int) -> list[bool]:
    return [text.add(list(range(n))) for n in range(1, count + 1)]


def test_a_stop_string_is_never_shown_even_across_tokens() -> None:
    shown: list[str] = []
    text = AnswerText(_pieces("The ", "answer", " is", " EN", "D", " more"), stop=("END",), echo=shown.append)
    assert _feed(text, 5) == [False, False, False, False, True]
    assert "".join(shown) == text.final == text.finish(list(range(5))) == "The answer is "
    assert text.stopped_by == "END"


def test_the_earliest_of_several_stop_strings_wins_inside_one_token() -> None:
    text = AnswerText(_pieces("a", "b\n\nc### d"), stop=("###", "\n\n"))
    assert _feed(text, 2) == [False, True]
    assert (text.final, text.stopped_by) == ("ab", "\n\n")


def test_held_text_is_shown_when_no_stop_string_comes() -> None:
    shown: list[str] = []
    text = AnswerText(_pieces("x", "E", "N"), stop=("END",), echo=shown.append)
    assert _feed(text, 3) == [False, False, False]
    assert shown == ["x"]  # "EN" may still become "END"
    assert text.finish([0, 1, 2]) == "xEN" and "".join(shown) == "xEN" and text.stopped_by is None


def test_partial_characters_wait_and_rewritten_text_is_not_shown_twice() -> None:
    shown: list[str] = []
    text = AnswerText(lambda ids: ["a\ufffd", "aé", "aé b", "ab c"][len(ids) - 1], echo=shown.append)
    _feed(text, 4)
    assert shown == ["aé", " b"]  # "ab c" does not extend "aé b": it waits for the end
    assert text.finish([0, 1, 2, 3]) == "ab c"


# ---------------------------------------------------------------- the real SmolLM2

@pytest.fixture(scope="module")
def smollm2_folder() -> Path:
    from sparsemap.models import assets, smollm2

    try:
        return smollm2.prepare(quiet=True)
    except assets.AssetError as e:
        pytest.skip(f"SmolLM2 could not be fetched: {e}")


QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.mark.model
@pytest.mark.slow
def test_smollm2_both_engines_sample_transformers_tokens(smollm2_folder: Path) -> None:
    """The real model through :func:`answer`: each engine draws what transformers' ``generate`` draws."""
    from transformers import AutoModelForCausalLM

    from sparsemap.models.generate import sparsemap_loader

    settings = Sampling(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.2, seed=2024)
    lean = answer(LeanEngine(), smollm2_folder, QUESTION, max_new_tokens=24, sampling=settings,
                  system="You are a geography teacher.")
    hf = answer(TransformersEngine(sparsemap_loader()), smollm2_folder, QUESTION, max_new_tokens=24,
                sampling=settings, system="You are a geography teacher.")
    reference = AutoModelForCausalLM.from_pretrained(smollm2_folder).eval()
    tokenizer = LeanEngine().load_tokenizer(_source(smollm2_folder))
    ids = torch.tensor([LeanEngine().prompt_ids(tokenizer, QUESTION, system="You are a geography teacher.")])
    want = _reference(settings, reference, ids)[:24]  # NEW tokens, or fewer when it ends
    assert lean["tokens"] == hf["tokens"] == want
    assert lean["tokens"] != answer(LeanEngine(), smollm2_folder, QUESTION, max_new_tokens=24)["tokens"]


@pytest.mark.model
def test_smollm2_system_turn_is_the_same_in_both_engines(smollm2_folder: Path) -> None:
    source = _source(smollm2_folder)
    lean, hf = LeanEngine(), TransformersEngine(lambda s: None)
    lean_ids = lean.prompt_ids(lean.load_tokenizer(source), QUESTION, system="Answer in French.")
    hf_ids = hf.prompt_ids(hf.load_tokenizer(source), QUESTION, system="Answer in French.")
    assert lean_ids == hf_ids
    assert lean_ids != lean.prompt_ids(lean.load_tokenizer(source), QUESTION)


@pytest.mark.model
@pytest.mark.parametrize("engine", ["lean", "transformers"])
def test_smollm2_stops_before_a_stop_string_and_never_shows_it(smollm2_folder: Path, engine: str) -> None:
    from sparsemap.models.generate import sparsemap_loader

    runner = LeanEngine() if engine == "lean" else TransformersEngine(sparsemap_loader())
    full = answer(runner, smollm2_folder, QUESTION, max_new_tokens=16)
    assert "Paris" in full["answer"]
    shown: list[str] = []
    stopped = answer(runner, smollm2_folder, QUESTION, max_new_tokens=16, stop=("Paris", "zzz"),
                     echo=shown.append)
    assert stopped["answer"] == "".join(shown) == full["answer"][: full["answer"].index("Paris")]
    assert stopped["stopped_by"] == "Paris"
    assert stopped["tokens"] == full["tokens"][: len(stopped["tokens"])]
    assert len(stopped["tokens"]) < len(full["tokens"])
