"""The token rule shared by the engines: each step equal to transformers' own processor, the draw equal to
``generate``'s, the settings checked once with messages that name the setting."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from sparsemap.errors import BadInputError
from sparsemap.models.sampling import GREEDY, Sampler, Sampling, resolve, unapplied

VOCAB = 97


def _case(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits (1, VOCAB), both signs, and a sequence (1, 30) with repeats: what one step sees."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, VOCAB, generator=g) * 4, torch.randint(0, VOCAB, (1, 30), generator=g)


def _ours(settings: Sampling, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return Sampler(settings, ids[0].tolist()).scores(logits[0])


# ---------------------------------------------------------------- each processor against transformers'

@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("penalty", [1.3, 0.6, 2.0])
def test_repetition_penalty_is_transformers_processor(seed: int, penalty: float) -> None:
    logits, ids = _case(seed)
    want = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    assert torch.equal(_ours(Sampling(repetition_penalty=penalty), ids, logits), want)  # greedy path too
    sampled = Sampling(temperature=1.0, top_k=0, repetition_penalty=penalty)
    assert torch.equal(_ours(sampled, ids, logits), want)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.9])
def test_temperature_is_transformers_warper(seed: int, temperature: float) -> None:
    logits, ids = _case(seed)
    want = TemperatureLogitsWarper(temperature)(ids, logits.clone())
    assert torch.equal(_ours(Sampling(temperature=temperature, top_k=0), ids, logits), want)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("top_k", [1, 5, 50, VOCAB, 1000])
def test_top_k_is_transformers_warper(seed: int, top_k: int) -> None:
    logits, ids = _case(seed)
    want = TopKLogitsWarper(top_k)(ids, logits.clone())
    assert torch.equal(_ours(Sampling(temperature=1.0, top_k=top_k), ids, logits), want)


def test_top_k_keeps_ties_with_the_kth_score_as_transformers_does() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.5]])
    ours = _ours(Sampling(temperature=1.0, top_k=2), torch.zeros(1, 1, dtype=torch.long), logits)
    assert torch.equal(ours, TopKLogitsWarper(2)(None, logits.clone()))
    assert torch.isfinite(ours).sum() == 3


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("top_p", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_top_p_is_transformers_warper(seed: int, top_p: float) -> None:
    logits, ids = _case(seed)
    want = TopPLogitsWarper(top_p)(ids, logits.clone())
    ours = _ours(Sampling(temperature=1.0, top_k=0, top_p=top_p), ids, logits)
    assert torch.equal(ours, want)
    assert torch.isfinite(ours).sum() >= 1  # the likeliest token always stays


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_is_transformers_warper(seed: int, min_p: float) -> None:
    logits, ids = _case(seed)
    want = MinPLogitsWarper(min_p)(ids, logits.clone())
    ours = _ours(Sampling(temperature=1.0, top_k=0, min_p=min_p), ids, logits)
    assert torch.equal(ours, want)
    kept = int(torch.isfinite(ours).sum())
    assert 1 <= kept < VOCAB if min_p >= 0.1 else kept >= 1  # it filtered, and the likeliest stayed


@pytest.mark.parametrize("seed", range(8))
def test_the_chain_runs_in_transformers_order(seed: int) -> None:
    """Penalty, temperature, top-k, top-p, min-p: the order of transformers' ``_get_logits_processor``."""
    logits, ids = _case(seed)
    settings = Sampling(temperature=1.5, top_k=30, top_p=0.95, min_p=0.2, repetition_penalty=1.4)
    want = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.4), TemperatureLogitsWarper(1.5),
                                TopKLogitsWarper(30), TopPLogitsWarper(0.95),
                                MinPLogitsWarper(0.2)])(ids, logits.clone())
    ours = _ours(settings, ids, logits)
    assert torch.equal(ours, want)
    # Each step filtered something the ones before it kept.
    counts = [int(torch.isfinite(_ours(replace(settings, **off), ids, logits)).sum())
              for off in ({"top_k": 0, "top_p": 1.0, "min_p": 0.0}, {"top_p": 1.0, "min_p": 0.0},
                          {"min_p": 0.0}, {})]
    assert counts[0] > counts[1] > counts[2] > counts[3] >= 1, counts


def test_neutral_values_leave_the_logits_as_they_are() -> None:
    logits, ids = _case(0)
    assert torch.equal(_ours(Sampling(temperature=1.0, top_k=0), ids, logits), logits)


# ---------------------------------------------------------------- choosing

def test_greedy_is_the_argmax_of_the_penalized_logits() -> None:
    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    assert Sampler(GREEDY, [])(logits) == 1
    assert Sampler(GREEDY, [])(logits.half()) == 1
    assert Sampler(Sampling(repetition_penalty=1.2), [1])(logits) == 3  # 3.0 / 1.2 < 2.9


def test_a_draw_is_transformers_draw_under_the_same_seed() -> None:
    """``generate(do_sample=True)``: softmax of the processed scores, one multinomial draw on the global
    generator seeded by ``torch.manual_seed``."""
    settings = Sampling(temperature=0.8, top_k=30, top_p=0.95, repetition_penalty=1.1, seed=1234)
    for case in range(6):
        logits, ids = _case(case)
        processed = _ours(settings, ids, logits)
        torch.manual_seed(1234)
        want = int(torch.multinomial(torch.softmax(processed, dim=-1), num_samples=1))
        assert Sampler(settings, ids[0].tolist())(logits[0]) == want  # seeds at creation


def test_chosen_tokens_join_the_penalized_sequence() -> None:
    sampler = Sampler(Sampling(repetition_penalty=10.0), prompt_ids=[])
    logits = torch.tensor([1.0, 2.0, 1.5])
    assert [sampler(logits) for _ in range(3)] == [1, 2, 0]


def test_prompt_ids_past_the_head_are_ignored() -> None:
    """A tokenizer may know more ids than the head has rows (transformers drops them too)."""
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    ids = torch.tensor([[0, 7]])
    want = RepetitionPenaltyLogitsProcessor(2.0)(ids, logits.clone())
    assert torch.equal(_ours(Sampling(repetition_penalty=2.0), ids, logits), want)


def test_draws_follow_the_softmax_and_repeat_under_one_seed() -> None:
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    sampler = Sampler(Sampling(temperature=1.0, seed=0), [])
    draws = [sampler(logits) for _ in range(3000)]
    shares = [draws.count(i) / len(draws) for i in range(3)]
    assert shares == pytest.approx([0.7, 0.2, 0.1], abs=0.03)
    again = Sampler(Sampling(temperature=1.0, seed=0), [])
    assert [again(logits) for _ in range(3000)] == draws
    cold = Sampler(Sampling(temperature=1e-4), [])
    assert {cold(logits) for _ in range(50)} == {0}  # a low temperature is nearly greedy


def test_without_a_seed_the_global_generator_is_left_alone() -> None:
    logits = torch.zeros(50)
    torch.manual_seed(5)
    first = [Sampler(Sampling(temperature=1.0), [])(logits) for _ in range(5)]
    torch.manual_seed(5)
    assert [Sampler(Sampling(temperature=1.0), [])(logits) for _ in range(5)] == first
    assert len(set(first)) > 1  # each sampler went on drawing from where the last stopped


# ---------------------------------------------------------------- the settings

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"temperature": -1}, "temperature must be 0 (greedy) or more, not -1"),
    ({"temperature": float("nan")}, "temperature must be a finite number, not nan"),
    ({"temperature": "hot"}, "temperature must be a finite number, not 'hot'"),
    ({"top_k": -1}, "top_k must be a whole number, 0 (off) or more, not -1"),
    ({"top_k": 2.5}, "top_k must be a whole number, 0 (off) or more, not 2.5"),
    ({"top_k": True}, "top_k must be a whole number, 0 (off) or more, not True"),
    ({"top_p": 1.5}, "top_p must be between 0 and 1, not 1.5"),
    ({"top_p": -0.1}, "top_p must be between 0 and 1, not -0.1"),
    ({"min_p": 1.01}, "min_p must be between 0 (off) and 1, not 1.01"),
    ({"min_p": None}, "min_p must be a finite number, not None"),
    ({"repetition_penalty": 0}, "repetition_penalty must be above 0 (1 turns it off), not 0"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty must be a finite number, not inf"),
    ({"seed": -1}, "seed must be a whole number from 0 to 2**64 - 1, not -1"),
    ({"seed": 2**64}, f"seed must be a whole number from 0 to 2**64 - 1, not {2**64}"),
])
def test_out_of_range_settings_are_refused_by_name(kwargs: dict, message: str) -> None:
    with pytest.raises(BadInputError) as e:
        Sampling(**kwargs)
    assert str(e.value) == message


def test_settings_are_frozen_and_numbers_become_floats() -> None:
    s = Sampling(temperature=1, top_p=1, repetition_penalty=2, seed=2**64 - 1)
    assert (type(s.temperature), type(s.top_p), type(s.repetition_penalty)) == (float, float, float)
    with pytest.raises(AttributeError):
        s.top_k = 3  # type: ignore[misc]
    assert s.to_dict() == {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.0,
                           "repetition_penalty": 2.0, "seed": 2**64 - 1}


def test_defaults_are_transformers_and_greedy_means_temperature_zero() -> None:
    assert Sampling(temperature=0.0, top_k=50, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                    seed=None) == GREEDY
    assert GREEDY.greedy and not Sampling(temperature=0.1).greedy
    assert GREEDY.transformers_kwargs() == {"do_sample": False, "repetition_penalty": 1.0}
    assert Sampling(temperature=0.5, top_k=0, top_p=0.9).transformers_kwargs() == {
        "do_sample": True, "temperature": 0.5, "top_k": 0, "top_p": 0.9, "min_p": None,
        "repetition_penalty": 1.0}
    # min_p 0 goes as None, transformers' off, so a model's generation_config cannot turn it on; greedy
    # decoding ignores it.
    assert Sampling(temperature=0.5, min_p=0.1).transformers_kwargs()["min_p"] == 0.1
    assert "min_p" not in Sampling(min_p=0.1).transformers_kwargs()


def test_resolve_takes_settings_or_the_temperature_shorthand() -> None:
    assert resolve(None, None) is GREEDY
    assert resolve(None, 0.5) == Sampling(temperature=0.5)
    settings = Sampling(top_p=0.5)
    assert resolve(settings, None) is settings
    with pytest.raises(BadInputError, match="not both"):
        resolve(settings, 0.5)


# ---------------------------------------------------------------- generation_config.json

def _config(tmp_path: Path, values: object) -> Path:
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps(values))
    return path


def test_a_sampling_generation_config_sets_the_defaults(tmp_path: Path) -> None:
    path = _config(tmp_path, {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05,
                              "repetition_penalty": 1.1, "eos_token_id": 2})
    assert Sampling.for_model(path) == Sampling(temperature=0.6, top_k=20, top_p=0.9, min_p=0.05,
                                                repetition_penalty=1.1)
    assert Sampling.for_model(path, min_p=0).min_p == 0.0
    # Given values win, one by one; temperature 0 asks for greedy decoding.
    assert Sampling.for_model(path, top_k=5, seed=3) == Sampling(
        temperature=0.6, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.1, seed=3)
    assert Sampling.for_model(path, temperature=0).greedy


def test_without_do_sample_the_files_temperature_is_ignored(tmp_path: Path) -> None:
    """transformers decodes greedily unless ``do_sample`` is true, whatever temperature the file names."""
    path = _config(tmp_path, {"temperature": 0.6, "top_p": 0.9})
    assert Sampling.for_model(path) == Sampling(temperature=0.0, top_p=0.9)
    assert Sampling.for_model(path, temperature=0.8) == Sampling(temperature=0.8, top_p=0.9)
    assert Sampling.for_model(_config(tmp_path, {"do_sample": True})) == Sampling(temperature=1.0)
    assert Sampling.for_model(None) == GREEDY


def test_a_bad_value_in_the_file_names_the_file_unless_overridden(tmp_path: Path) -> None:
    path = _config(tmp_path, {"do_sample": True, "top_p": 1.5})
    with pytest.raises(BadInputError) as e:
        Sampling.for_model(path)
    assert str(e.value) == f"{path}: top_p must be between 0 and 1, not 1.5"
    assert Sampling.for_model(path, top_p=0.5).top_p == 0.5
    with pytest.raises(BadInputError) as e:
        Sampling.for_model(path, top_p=2.0)
    assert str(e.value) == "top_p must be between 0 and 1, not 2.0"


@pytest.mark.parametrize(("text", "needle"), [("[1, 2]", "not a JSON object"), ("{", "cannot read")])
def test_a_malformed_generation_config_is_refused(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "generation_config.json"
    path.write_text(text)
    with pytest.raises(BadInputError, match=needle) as e:
        Sampling.for_model(path)
    assert e.value.path == str(path)


def test_settings_the_rules_leave_out_are_named_with_their_values(tmp_path: Path) -> None:
    path = _config(tmp_path, {"do_sample": True, "typical_p": 0.95, "no_repeat_ngram_size": 3,
                              "bad_words_ids": [[5, 6]], "num_beams": 1, "epsilon_cutoff": 0.0,
                              "suppress_tokens": [], "min_p": 0.1, "top_k": 20, "eos_token_id": 2})
    # num_beams 1, epsilon 0 and no suppressed tokens ask for nothing; min_p and top_k are applied.
    assert unapplied(path, sampling=True) == ["no_repeat_ngram_size 3", "bad_words_ids [[5, 6]]",
                                              "typical_p 0.95"]
    # Greedy decoding: transformers ignores typical_p too.
    assert unapplied(path, sampling=False) == ["no_repeat_ngram_size 3", "bad_words_ids [[5, 6]]"]
    assert unapplied(_config(tmp_path, {"eos_token_id": 2, "pad_token_id": 2}), sampling=True) == []
    assert unapplied(None, sampling=True) == []
    with pytest.raises(BadInputError, match="not a JSON object"):
        unapplied(_config(tmp_path, [1]), sampling=False)
