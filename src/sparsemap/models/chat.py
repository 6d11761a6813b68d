"""A multi-turn conversation that keeps the model's state between turns, as llama.cpp's ``llama-cli -cnv``.

Each turn renders the whole conversation with the chat template (``messages_ids``), as a fresh
``answer`` on it would, then feeds the model only what its state lacks: the ids from the first one
that differs from those fed so far. Chat templates usually append, so that is the new user message
and the turn markers around it; a template that rewrites earlier turns (or an answer whose text
tokenizes differently from the tokens generated) costs a re-feed from the first differing id, never
a wrong answer. The state is the engine's (``engine.start(model)``): the lean Llama's KV cache, a
transformers ``DynamicCache`` (both cut back to any length) or an RWKV state (which keeps a copy at
the end of each turn's prompt to go back to: see :class:`~sparsemap.models.rwkv.RwkvState`).

Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from ..errors import BadInputError
from ..formats.source import ModelSource
from .generate import (
    AnswerText,
    LeanEngine,
    RwkvEngine,
    TransformersEngine,
    check_model,
    check_options,
    fit_context,
    note_unapplied,
    resolve_model,
    seeded,
)
from .sampling import GREEDY, Sampler, Sampling, generate_from

Engine = TransformersEngine | LeanEngine | RwkvEngine


class ModelState(Protocol):
    """A model's running sequence, as every engine's ``start(model)`` returns it."""

    ids: list[int]  # the sequence the state stands for
    eos_ids: tuple[int, ...]  # tokens that end an answer
    processed: int  # ids run through the model since the start, re-fed ones included

    def feed(self, ids: list[int]) -> Any:
        """Run ``ids`` after the sequence; the logits after the last of them, (vocab,)."""
        ...

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` ids of the sequence."""
        ...

    def mark(self) -> None:
        """A point :meth:`truncate` should return to cheaply (a no-op where any length is cheap)."""
        ...


@dataclass(frozen=True)
class Turn:
    """What one :meth:`Conversation.reply` did: the numbers a user (or a test) checks."""

    prompt_tokens: int  # the whole conversation rendered for this turn
    fed_tokens: int  # of those, run through the model this turn (the rest were in the state already)
    tokens: list[int]  # the answer's tokens, the end-of-text token included when it came
    answer: str
    max_new_tokens: int  # the limit this turn had (less than asked where the context is nearly full)
    stopped_by: str | None = None  # the stop string that ended the answer
    interrupted: bool = False  # Ctrl-C ended it


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many ids ``a`` and ``b`` share from the start.

    Example:
        >>> common_prefix([1, 2, 3, 4], [1, 2, 5])
        2
    """
    n = 0
    for x, y in zip(a, b, strict=False):  # the shorter one ends the prefix
        if x != y:
            break
        n += 1
    return n


def check_chat(engine: Engine, tokenizer: Any, system: str | None) -> None:
    """Refuse a tokenizer without a chat template, or a template that refuses the system turn, before a
    conversation starts (not at its first message)."""
    if not engine.has_chat(tokenizer):
        raise BadInputError("the tokenizer has no chat template, and a conversation needs one "
                            "(`sparsemap run --raw` continues a prompt as plain text)")
    if system is not None:
        engine.messages_ids(tokenizer, [{"role": "system", "content": system},
                                        {"role": "user", "content": "Hello"}])


class Conversation:
    """A conversation with a loaded model that keeps the model's state (KV cache or RNN state) between
    turns, so each turn runs only the ids its rendering adds to what was fed.

    Each answer is what a fresh generation on the whole conversation rendered for that turn gives
    (``answer`` on one turn, ``engine.generate`` on its ids): same ids, same sampling settings, the
    repetition penalty over the whole conversation. A seed seeds torch's generator once, at the first
    turn, so the same messages give the same answers again. Each answer ends at the end-of-text token,
    after ``max_new_tokens``, or before one of the ``stop`` strings; with ``ctx_size``, the rendered
    conversation and its answer fit in that many tokens: a message that leaves no room is refused (with
    the numbers; the conversation is as it was), and the answer gets the room left.

    Args:
        engine: one of :mod:`sparsemap.models.generate`'s engines.
        model: the engine's loaded model.
        tokenizer: the engine's tokenizer of it, with a chat template.
        sampling: how tokens are chosen; ``None`` is greedy.
        system: a system message, first in every rendering.
        ctx_size: the context, in tokens; ``None`` for no limit.
        stop: strings that end an answer (not part of it).
        max_new_tokens: the longest answer, in tokens.
        on_note: hears of a shortened answer (the context nearly full).

    Raises:
        BadInputError: an option out of range, a tokenizer without a chat template, a template that
            refuses the system turn.

    Example:
        >>> chat = open_conversation(LeanEngine(), "smollm2", system="Answer in one sentence.")
        >>> chat.reply("What is the capital of France?", on_text=print)
        The capital of France is Paris.
        'The capital of France is Paris.'
        >>> chat.reply("And of Italy?")              # runs only this message's ids, then answers
        'The capital of Italy is Rome.'
        >>> chat.turns[-1].fed_tokens < chat.turns[-1].prompt_tokens
        True
    """

    def __init__(self, engine: Engine, model: Any, tokenizer: Any, sampling: Sampling | None = None, *,
                 system: str | None = None, ctx_size: int | None = None, stop: Sequence[str] = (),
                 max_new_tokens: int = 256, on_note: Callable[[str], None] | None = None) -> None:
        self.stop = tuple(stop)
        check_options(stop=self.stop, max_new_tokens=max_new_tokens, ctx_size=ctx_size)
        check_chat(engine, tokenizer, system)
        self.engine, self.model, self.tokenizer = engine, model, tokenizer
        self.sampling = sampling if sampling is not None else GREEDY
        self.system, self.ctx_size, self.on_note = system, ctx_size, on_note
        self.max_new_tokens = max_new_tokens
        self.messages: list[dict[str, str]] = self._opening()
        self.turns: list[Turn] = []
        self.state: ModelState = engine.start(model)
        self._seeded = False

    def _opening(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}] if self.system is not None else []

    def clear(self) -> None:
        """Start a new conversation (the system message stays). The state is cut back at the next turn,
        to what that turn shares with it (the system turn, usually)."""
        self.messages = self._opening()

    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """The answer to the user's ``text``, streamed to ``on_text`` as it comes; both join the
        conversation. :attr:`turns` ends with this turn's numbers.

        Ctrl-C (``KeyboardInterrupt``) while answering ends the answer there: the text so far is
        returned and kept (nothing is kept when no token came yet), and the turn says ``interrupted``.

        Raises:
            BadInputError: the conversation with this message leaves no room in ``ctx_size`` (the
                message is not kept), or the chat template refuses the conversation.
        """
        messages = [*self.messages, {"role": "user", "content": text}]
        ids = self.engine.messages_ids(self.tokenizer, messages)
        max_new_tokens = fit_context(len(ids), self.max_new_tokens, self.ctx_size,
                                     what="the conversation with this message", on_note=self.on_note)
        state = self.state
        # At least the last id is fed, even when the state holds them all: its logits start the answer.
        state.truncate(min(common_prefix(state.ids, ids), len(ids) - 1))
        settings = self.sampling if not self._seeded else replace(self.sampling, seed=None)
        self._seeded = True
        shown = AnswerText(lambda tokens: self.engine.decode(self.tokenizer, tokens), stop=self.stop,
                           echo=on_text)
        new: list[int] = []

        def on_token(token: int) -> bool:
            new.append(token)
            return (on_text is not None or bool(self.stop)) and shown.add(new)  # no decoding unread

        before, fed = state.processed, 0
        try:
            logits = state.feed(ids[len(state.ids):])
            fed = state.processed - before
            state.mark()
            tokens = generate_from(state, logits, Sampler(settings, ids), max_new_tokens,
                                   stop_ids=state.eos_ids, on_token=on_token)
            interrupted = False
        except KeyboardInterrupt:
            tokens, interrupted = list(new), True
            state.truncate(len(state.ids))  # mends a feed cut short (or has it re-fed next turn)
        reply = shown.finish(tokens) if tokens else ""
        self.turns.append(Turn(prompt_tokens=len(ids), fed_tokens=fed, tokens=tokens, answer=reply,
                               max_new_tokens=max_new_tokens, stopped_by=shown.stopped_by,
                               interrupted=interrupted))
        if tokens:  # an answer cut off before its first token is no turn: the message goes too
            self.messages = [*messages, {"role": "assistant", "content": reply}]
        return reply


def open_conversation(engine: Engine, model: str | Path | ModelSource, *, sampling: Sampling | None = None,
                      system: str | None = None, ctx_size: int | None = None, stop: Sequence[str] = (),
                      max_new_tokens: int = 256, on_note: Callable[[str], None] | None = None,
                      ) -> Conversation:
    """Load ``model`` (a path, a name sparsemap knows, a cached repo id) with ``engine`` and start a
    :class:`Conversation` with it. ``sampling`` ``None`` takes the model's own defaults
    (:meth:`Sampling.for_model`); sampling without a seed gets a fresh one (``conversation.sampling``).
    Every engine's turns are chosen by :class:`Sampler`'s rules: ``on_note`` hears at once of any setting
    of the model's ``generation_config.json`` they leave out (beam search, typical-p, ...).

    The tokenizer and its chat template are checked before any weight is read.

    Example:
        >>> chat = open_conversation(pick_engine("smollm2", "auto"), "smollm2")
    """
    stop = tuple(stop)
    check_options(stop=stop, max_new_tokens=max_new_tokens, ctx_size=ctx_size)
    source = resolve_model(model)
    check_model(source)
    settings = seeded(sampling if sampling is not None else Sampling.for_model(source.generation_config))
    note_unapplied(source, on_note, sampling=not settings.greedy)
    engine.import_libraries()
    tokenizer = engine.load_tokenizer(source)
    check_chat(engine, tokenizer, system)  # before the weights: a refusal costs no load
    return Conversation(engine, engine.load_model(source), tokenizer, settings, system=system,
                        ctx_size=ctx_size, stop=stop, max_new_tokens=max_new_tokens, on_note=on_note)
