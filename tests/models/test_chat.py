"""A conversation keeps the model's state between turns and each turn is exact: its tokens are those of a
fresh generation on the whole conversation rendered for that turn, and it runs only the ids the state
lacks (counted). Lean Llama and transformers (KV caches cut back to any length), RWKV (a kept copy of
the state), tiny random models and the real SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from sparsemap.bench.rwkv_synthetic import write_rwkv7
from sparsemap.errors import BadInputError
from sparsemap.models import llama, rwkv
from sparsemap.models.chat import Conversation, common_prefix, open_conversation
from sparsemap.models.generate import LeanEngine, RwkvEngine, TransformersEngine, answer, load_tokenizer
from sparsemap.models.sampling import Sampling

from ..conftest import ModuleFolders, tiny_llama_config

# ChatML, as SmolLM2 and Qwen2 write it: each turn appends.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# A template that rewrites the start at every turn (it counts the messages there): no prefix survives.
RECOUNTING = "{{ messages | length }} messages\n" + CHATML
SPECIALS = ["<|im_start|>", "<|im_end|>"]
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]  # one token each: any answer's text tokenizes back to it
MESSAGES = ["Hello there", "What is a cache?", "Thanks!"]
NEW = 12


def write_chat_llama(folder: Path, template: str = CHATML) -> LlamaForCausalLM:
    """A tiny random Llama with a character tokenizer and a ChatML template, saved to ``folder``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")  # one character a token
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(SPECIALS)
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=len(vocab), bos_token_id=0, eos_token_id=1, pad_token_id=None,
                               max_position_embeddings=1024)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # <|im_start|> is never the likeliest token: greedy answers are plain text
        model.lm_head.weight[0] = 0
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": template, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return model


@pytest.fixture(scope="module")
def tiny(module_folders: ModuleFolders) -> tuple[LlamaForCausalLM, Path]:
    folder = module_folders.make("chat-llama")
    return write_chat_llama(folder), folder


def _conversation(engine_name: str, tiny: tuple[LlamaForCausalLM, Path], **kw: Any) -> Conversation:
    reference, folder = tiny
    if engine_name == "lean":
        engine: Any = LeanEngine()
        return Conversation(engine, llama.load(folder), engine.load_tokenizer(folder), **kw)
    from sparsemap.formats.source import resolve_source

    return Conversation(TransformersEngine(lambda s: reference), reference,
                        load_tokenizer(resolve_source(folder)), **kw)


def _fresh(chat: Conversation, new: int = NEW) -> list[int]:
    """A fresh greedy generation on the conversation as its last turn saw it (all but the last answer)."""
    ids = chat.engine.messages_ids(chat.tokenizer, chat.messages[:-1])
    return chat.engine.generate(chat.model, ids, new, Sampling(), lambda token: None)


def _talk(chat: Conversation, messages: list[str], new: int = NEW) -> list[dict[str, Any]]:
    """Each turn's numbers, with what the state held before it and a fresh generation's tokens."""
    seen = []
    for text in messages:
        before = list(chat.state.ids)
        chat.reply(text)
        turn = chat.turns[-1]
        ids = chat.engine.messages_ids(chat.tokenizer, chat.messages[:-1])
        seen.append({"turn": turn, "before": before, "ids": ids, "fresh": _fresh(chat, new=new)})
    return seen


# ---------------------------------------------------------------- KV caches: exact, and only new ids fed

@pytest.mark.parametrize("engine_name", ["lean", "transformers"])
def test_each_turn_is_a_fresh_generation_and_feeds_only_the_new_ids(tiny, engine_name: str) -> None:
    chat = _conversation(engine_name, tiny, system="Be brief.", max_new_tokens=NEW)
    turns = _talk(chat, MESSAGES)
    for i, t in enumerate(turns):
        assert t["turn"].tokens == t["fresh"], f"turn {i}"
        assert t["turn"].prompt_tokens == len(t["ids"])
        # The state held everything fed before (each turn's prompt and answer, all but its last token),
        # all of it a prefix of this turn's rendering: only the rest ran.
        assert t["ids"][:len(t["before"])] == t["before"]
        assert t["turn"].fed_tokens == len(t["ids"]) - len(t["before"])
        if i:
            last = turns[i - 1]["turn"]
            assert len(t["before"]) == last.prompt_tokens + len(last.tokens) - 1
            assert t["turn"].fed_tokens < len(t["ids"]) - last.prompt_tokens
    first_answer = answer(LeanEngine(), tiny[1], MESSAGES[0], system="Be brief.", max_new_tokens=NEW)
    assert turns[0]["turn"].tokens == first_answer["tokens"]
    assert chat.messages[-1] == {"role": "assistant", "content": turns[-1]["turn"].answer}


@pytest.mark.parametrize("engine_name", ["lean", "transformers"])
def test_a_template_that_rewrites_earlier_turns_refeeds_from_the_first_difference(
        tmp_path: Path, engine_name: str) -> None:
    model = write_chat_llama(tmp_path, RECOUNTING)
    chat = _conversation(engine_name, (model, tmp_path), max_new_tokens=NEW)
    for i, t in enumerate(_talk(chat, MESSAGES)):
        assert t["turn"].tokens == t["fresh"], f"turn {i}"
        shared = common_prefix(t["before"], t["ids"])
        assert t["turn"].fed_tokens == len(t["ids"]) - shared
        if i:
            assert shared < len(t["before"])  # the count at the start changed: the cache was cut back


def test_a_seed_repeats_the_session_and_the_first_turn_is_a_seeded_fresh_run(tiny) -> None:
    settings = Sampling(temperature=1.5, top_k=0, seed=11)
    answers = []
    for _ in range(2):
        chat = _conversation("lean", tiny, sampling=settings, max_new_tokens=NEW)
        answers.append([chat.reply(text) for text in MESSAGES[:2]])
        if not answers[:-1]:
            assert chat.turns[0].tokens == LeanEngine().generate(
                chat.model, chat.engine.messages_ids(chat.tokenizer, chat.messages[:1]), NEW, settings,
                lambda token: None)
    greedy = _conversation("lean", tiny, max_new_tokens=NEW)
    assert answers[0] == answers[1] != [greedy.reply(text) for text in MESSAGES[:2]]


def test_a_stop_string_ends_an_answer_and_the_next_turn_is_still_exact(tiny) -> None:
    full = _conversation("lean", tiny, max_new_tokens=NEW).reply(MESSAGES[0])
    stop = full[4:6]
    chat = _conversation("lean", tiny, max_new_tokens=NEW, stop=[stop])
    shown: list[str] = []
    assert chat.reply(MESSAGES[0], on_text=shown.append) == full[:full.index(stop)] == "".join(shown)
    assert chat.turns[-1].stopped_by == stop
    t = _talk(chat, MESSAGES[1:2])[0]
    # The answer was cut in its text, not in its tokens: the state is cut back to the shared prefix.
    assert t["turn"].tokens == _fresh(chat, new=NEW)
    assert t["turn"].fed_tokens == len(t["ids"]) - common_prefix(t["before"], t["ids"])


def test_the_context_size_refuses_a_message_that_leaves_no_room_and_the_session_goes_on(tiny) -> None:
    probe = _conversation("lean", tiny, max_new_tokens=NEW)
    probe.reply(MESSAGES[0])
    first = probe.turns[-1].prompt_tokens
    second = len(probe.engine.messages_ids(probe.tokenizer, [*probe.messages,
                                                             {"role": "user", "content": MESSAGES[1]}]))
    notes: list[str] = []
    chat = _conversation("lean", tiny, max_new_tokens=NEW, ctx_size=second, on_note=notes.append)
    chat.reply(MESSAGES[0])
    kept = list(chat.messages)
    with pytest.raises(BadInputError) as e:
        chat.reply(MESSAGES[1])
    assert str(e.value) == (f"the conversation with this message is {second} tokens and the context "
                            f"{second}: no room for an answer (a context of {second + NEW} fits it and "
                            f"{NEW} new tokens)")
    assert chat.messages == kept and len(chat.turns) == 1
    chat.clear()
    chat.reply(MESSAGES[1])  # a new conversation fits again, and is exact
    assert chat.turns[-1].tokens == _fresh(chat) and not notes
    short = _conversation("lean", tiny, max_new_tokens=NEW, ctx_size=first + 5, on_note=notes.append)
    short.reply(MESSAGES[0])  # the answer gets the room left
    assert short.turns[-1].max_new_tokens == 5 and len(short.turns[-1].tokens) == 5
    assert notes == [f"(the conversation with this message is {first} tokens and the context {first + 5}: "
                     "at most 5 new tokens)"]


@pytest.mark.parametrize("engine_name", ["lean", "transformers"])
def test_ctrl_c_inside_a_forward_keeps_the_answer_so_far_and_the_next_turn_is_exact(
        tiny, engine_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    chat = _conversation(engine_name, tiny, max_new_tokens=NEW)
    model = chat.model
    layer = model.model.layers[1]
    calls = {"n": 0}
    forward = layer.forward

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        # The 5th forward of the answer (its 5th fed token): layer 0 has already cached it, layer 1 not.
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    monkeypatch.setattr(layer, "forward", interrupted)
    partial = chat.reply(MESSAGES[0])
    turn = chat.turns[-1]
    assert turn.interrupted and len(turn.tokens) == 5 and partial == turn.answer
    assert chat.messages[-1] == {"role": "assistant", "content": partial}
    t = _talk(chat, MESSAGES[1:2])[0]
    assert t["turn"].tokens == t["fresh"] and not t["turn"].interrupted


def test_ctrl_c_before_the_first_token_keeps_no_turn(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    chat = _conversation("lean", tiny, system="Be brief.", max_new_tokens=NEW)

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(chat.model.model.layers[0], "forward", interrupted)
    assert chat.reply(MESSAGES[0]) == "" and chat.turns[-1].interrupted
    assert chat.messages == [{"role": "system", "content": "Be brief."}] and chat.state.ids == []
    monkeypatch.undo()
    t = _talk(chat, MESSAGES[:1])[0]
    assert t["turn"].tokens == t["fresh"]


def test_a_model_without_a_chat_template_or_refusing_the_system_turn_is_refused_first(tmp_path: Path) -> None:
    write_chat_llama(tmp_path, "")
    with pytest.raises(BadInputError, match="no chat template, and a conversation needs one"):
        open_conversation(LeanEngine(), tmp_path)
    refusing = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    write_chat_llama(tmp_path, refusing + CHATML)
    with pytest.raises(BadInputError, match="chat template refused the prompt: no system role"):
        open_conversation(LeanEngine(), tmp_path, system="Be brief.")
    with pytest.raises(BadInputError, match="a stop string must not be empty"):
        open_conversation(LeanEngine(), tmp_path, stop=[""])


def test_the_llama_state_cut_back_and_fed_again_gives_a_fresh_forward(tiny) -> None:
    model = llama.load(tiny[1])
    ids = torch.randint(0, 98, (14,), generator=torch.Generator().manual_seed(2)).tolist()
    state = model.start()
    state.feed(ids[:10])
    state.truncate(6)
    logits = state.feed(ids[6:])
    assert state.ids == ids and state.processed == 10 + 8
    assert all(t.shape[2] == 14 for cache in state.caches for t in cache)
    with torch.inference_mode():
        assert torch.allclose(logits, model(torch.tensor([ids]))[0], atol=1e-5, rtol=0)
    with pytest.raises(BadInputError, match="nothing to feed"):
        state.feed([])


# ---------------------------------------------------------------- RWKV: a kept copy of the state

@pytest.fixture(scope="module")
def rwkv_path(module_folders: ModuleFolders) -> Path:
    return write_rwkv7(module_folders.make("rwkv") / "model.pth", 2, 64, 16, 256, 256)


def test_rwkv_turns_equal_a_fresh_run_and_restart_from_the_last_prompt(rwkv_path: Path) -> None:
    chat = open_conversation(RwkvEngine(), rwkv_path, system="Be brief.", max_new_tokens=NEW)
    for i, t in enumerate(_talk(chat, MESSAGES)):
        assert t["turn"].tokens == t["fresh"], f"turn {i}"
        if i:
            # Random bytes do not decode to text that encodes back to them: the state goes back to its
            # copy at the end of the last turn's prompt, and only the rest (answer included) runs.
            last = chat.turns[i - 1]
            assert t["turn"].fed_tokens <= len(t["ids"]) - last.prompt_tokens


def test_the_rwkv_state_goes_back_to_the_newest_copy_and_refeeds_the_rest(rwkv_path: Path) -> None:
    model = rwkv.load(rwkv_path)
    ids = list(range(40, 70))
    state = model.start()
    for start in range(0, 30, 5):  # a copy after every 5 ids; only the newest MAX_MARKS stay
        state.feed(ids[start:start + 5])
        state.mark()
    assert [at for at, _ in state.marks] == [10, 15, 20, 25, 30][-rwkv.MAX_MARKS:]
    state.truncate(17)  # back to the copy at 15; ids 15 and 16 wait for the next feed
    assert state.ids == ids[:17] and state.done == 15 and [at for at, _ in state.marks] == [15]
    processed = state.processed
    logits = state.feed([7, 8])
    assert state.processed - processed == 4 and state.ids == [*ids[:17], 7, 8]
    fresh, _ = model([*ids[:17], 7, 8])
    assert torch.allclose(logits, fresh, atol=1e-5, rtol=0)
    state.truncate(3)  # before every copy: from the start
    assert state.done == 0 and state.marks == []
    assert torch.allclose(state.feed([9]), model([*ids[:3], 9])[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("engine", ["lean", "transformers"])
def test_what_the_sampling_rules_leave_out_of_generation_config_is_said(tiny, engine: str,
                                                                         tmp_path: Path) -> None:
    """A conversation's turns are chosen by ``Sampler`` in every engine; ``serve`` answers with
    transformers' ``generate`` there, which applies the whole file, so only its lean engine says so."""
    from sparsemap.models.generate import pick_engine
    from sparsemap.serve import ServedModel

    _, folder = tiny
    copy = tmp_path / "beams"
    copy.mkdir()
    for f in folder.iterdir():
        if f.name != "generation_config.json":  # written anew below, never through a link
            (copy / f.name).symlink_to(f)
    (copy / "generation_config.json").write_text(json.dumps({"num_beams": 4, "eos_token_id": 2}))
    notes: list[str] = []
    open_conversation(pick_engine(copy, engine), copy, on_note=notes.append, max_new_tokens=2)
    assert notes == ["(generation_config.json asks for num_beams 4: sparsemap's sampling does not apply it)"]
    served: list[str] = []
    ServedModel(str(copy), engine=engine, on_note=served.append)
    hinted = notes[0].removesuffix(")") + "; --engine transformers does)"
    assert served == ([hinted] if engine == "lean" else [])


# ---------------------------------------------------------------- the real SmolLM2

@pytest.mark.model
def test_smollm2_two_turns_equal_fresh_answers_and_the_second_feeds_only_its_message() -> None:
    from sparsemap.models import assets, smollm2

    try:
        folder = smollm2.prepare_quantized(quiet=True)
    except assets.AssetError as e:
        pytest.skip(f"SmolLM2 could not be fetched: {e}")
    chat = open_conversation(LeanEngine(), folder, sampling=Sampling(), max_new_tokens=24)
    turns = _talk(chat, ["What is the capital of France?", "And of Italy?"], new=24)
    first = answer(LeanEngine(), folder, "What is the capital of France?", sampling=Sampling(),
                   max_new_tokens=24)
    assert turns[0]["turn"].tokens == first["tokens"] and "Paris" in turns[0]["turn"].answer
    second = turns[1]
    assert second["turn"].tokens == second["fresh"] and "Rome" in second["turn"].answer
    # Everything the first turn fed is a prefix of the second's rendering: only the new message ran
    # (the end of the first answer, the user's turn, the assistant's opening).
    assert second["ids"][:len(second["before"])] == second["before"]
    message = len(chat.tokenizer.tokenizer.encode("And of Italy?", add_special_tokens=False).ids)
    assert second["turn"].fed_tokens == len(second["ids"]) - len(second["before"]) < message + 12
