"""Answering a prompt with a causal LM, measured phase by phase.

Two engines run the same steps (tokenizer, weights, chat prompt, streamed
generation): :class:`LeanEngine` (sparsemap's own Llama and the ``tokenizers``
library) and :class:`TransformersEngine` (transformers' classes, with weights
from sparsemap or, for the demo's reference, transformers' own GGUF loading).
``sparsemap run`` and every process of the demo go through :func:`answer`, so
all are measured the same way: memory by phase
(:class:`~sparsemap.memory.PhaseTracker`), time to first token, tokens per
second. Libraries are imported inside the measured phases, so their cost is
shown, not assumed.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import memory
from ..errors import BadInputError, SourceNotFoundError
from ..formats.source import ModelSource, reads_as_repo_id, resolve_source
from .gguf_hf import gguf_tokenizer
from .rwkv_config import detect_version, pytorch_view, shape_of
from .sampling import Sampling, unapplied

# Names sparsemap knows -> the folder's form: its GGUF's blocks kept quantized, or dequantized to float32.
ALIASES = {"smollm2": "quantized", "smollm2-135m-instruct": "quantized", "smollm2-f32": "float32"}


def resolve_model(model: str | Path | ModelSource, *,
                  progress: Callable[[str, int], AbstractContextManager[Callable[[int], None]]] | None = None
                  ) -> ModelSource:
    """What a model argument holds: a path, the name of a model sparsemap knows (fetched and
    converted on first use), or a Hugging Face repo id found in the local cache. No torch.

    Meta's original release (params.json and consolidated.NN.pth) gets its config and tokenizer, and a
    release in several files its joined weights, written once in sparsemap's cache
    (:func:`sparsemap.models.meta_llama.prepare`; ``progress`` makes the bar shown while weights are
    written).

    Raises:
        SourceNotFoundError: no such path and no such name.
    """
    if isinstance(model, ModelSource):
        source = model
    else:
        form = ALIASES.get(str(model).lower())
        if form is not None and not Path(model).exists():
            from . import smollm2

            return resolve_source(smollm2.prepare_quantized() if form == "quantized" else smollm2.prepare())
        if not Path(model).exists() and not ("/" in str(model) and reads_as_repo_id(str(model))):
            raise SourceNotFoundError(f"no such model file or folder (known names: "
                                      f"{', '.join(sorted(ALIASES))})", path=Path(model))
        source = resolve_source(model)
    if source.format == "meta-llama":
        from .meta_llama import prepare

        return prepare(source, progress=progress)
    return source


def check_model(source: ModelSource) -> None:
    """Refuse what is not a model before anything heavy runs (no torch): clear errors, exit code 2."""
    from ..formats.dispatch import open_catalog
    from .gguf_hf import architecture

    catalog = open_catalog(source)  # the weights: missing shards, malformed files, not a checkpoint at all
    if source.is_gguf:
        architecture(catalog)  # transformers must map the architecture (names are mapped at load)
    elif source.format == "llama2c":
        pass  # its header is its config, checked when the file was opened
    elif detect_version(catalog) is not None:
        shape_of(pytorch_view(catalog))  # RWKV: version, every tensor and shape, no compute
    elif source.config is None:
        raise SourceNotFoundError("no config.json next to the weights", path=source.folder)
    else:
        _refuse_encoders(source.config)


# Class name endings of models that generate text; any other architecture is an encoder or a classifier.
GENERATIVE = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _refuse_encoders(config_path: str) -> None:
    """An encoder cannot answer a prompt: say what it can do instead, before any weight is read."""
    import json

    try:
        with open(config_path, "rb") as f:
            architectures = json.loads(f.read()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return  # transformers reads it later and names what is wrong
    if architectures and not any(str(a).endswith(GENERATIVE) for a in architectures):
        raise BadInputError(f"is an encoder ({', '.join(map(str, architectures))}), not a text generator: "
                            f"embed texts with `sparsemap embed {os.path.dirname(config_path)} \"text\"`",
                            path=os.path.dirname(config_path))


def load_tokenizer(source: ModelSource) -> Any:
    """transformers' tokenizer of the model: from the folder, or built from a GGUF's header."""
    from ..extras import require

    require("transformers", needed_for="the transformers engine")
    from transformers import AutoTokenizer

    try:
        if source.is_gguf:
            return gguf_tokenizer(source)
        # The folder its tokenizer.json lies in: the model's, or the cache's for a Meta release.
        return AutoTokenizer.from_pretrained(os.path.dirname(source.tokenizer) if source.tokenizer
                                             else source.folder)
    except (OSError, ValueError) as e:
        raise BadInputError(f"no usable tokenizer next to the model ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]})", path=source.folder) from None


def chat_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """The chat turns of a prompt: the system message (when there is one), then the user's."""
    system_turn = [{"role": "system", "content": system}] if system is not None else []
    return [*system_turn, {"role": "user", "content": prompt}]


class AnswerText:
    r"""The answer's text as its tokens arrive: what may be shown yet, and where a stop string ends it.

    Text that could still grow into a stop string is held back, so a stop string is never shown, even in
    part; a partial UTF-8 character (``\ufffd`` at the end) is held back too.

    Example:
        >>> pieces = ["Hel", "lo", "\n", "\nBye"]
        >>> text = AnswerText(lambda ids: "".join(pieces[i] for i in ids), stop=("\n\n",), echo=print)
        >>> [text.add([0, 1, 2, 3][:n]) for n in range(1, 5)]
        Hel
        lo
        [False, False, False, True]
        >>> text.final
        'Hello'
    """

    def __init__(self, decode: Callable[[list[int]], str], *, stop: tuple[str, ...] = (),
                 echo: Callable[[str], None] | None = None) -> None:
        self.decode = decode  # the text of new tokens
        self.stop = stop
        self.echo = echo
        self.shown = ""
        self.final: str | None = None  # set when a stop string appeared: the text before it
        self.stopped_by: str | None = None

    def add(self, tokens: list[int]) -> bool:
        """Take the text of the new ``tokens`` so far; true when it holds a stop string (stop here)."""
        text = self.decode(tokens)
        found = [(text.find(s), s) for s in self.stop if s in text]
        if found:
            at, self.stopped_by = min(found)
            self.final = text[:at]
            self._show(self.final)
            return True
        if text.endswith("\ufffd"):  # whole characters only
            return False
        # The longest tail of the text that begins some stop string waits for the next token.
        hold = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self._show(text[:len(text) - hold])
        return False

    def finish(self, tokens: list[int]) -> str:
        """The answer of all new ``tokens`` (up to its stop string, if one appeared); shows what was held."""
        if self.final is not None:
            return self.final
        text = self.decode(tokens)
        self._show(text)
        return text

    def _show(self, text: str) -> None:
        # Decoding more tokens may rewrite earlier text (a merged space): show only what extends the shown.
        if self.echo is not None and text.startswith(self.shown) and len(text) > len(self.shown):
            self.echo(text[len(self.shown):])
            self.shown = text


class TransformersEngine:
    """Tokenizer and model from transformers (any architecture transformers knows)."""

    libraries = "transformers"

    def __init__(self, load_model: Callable[[ModelSource], Any]) -> None:
        self.load_model = load_model

    def import_libraries(self) -> None:
        from ..extras import require

        require("transformers", needed_for="the transformers engine (--engine lean needs only tokenizers)")
        # transformers imports lazily: name the classes so their modules load here.
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401

    def load_tokenizer(self, source: ModelSource) -> Any:
        return load_tokenizer(source)

    def has_chat(self, tokenizer: Any) -> bool:
        return bool(getattr(tokenizer, "chat_template", None))

    def prompt_ids(self, tokenizer: Any, prompt: str, raw: bool = False,
                   system: str | None = None) -> list[int]:
        if raw:
            return list(tokenizer(prompt)["input_ids"])
        return self.messages_ids(tokenizer, chat_messages(prompt, system))

    def messages_ids(self, tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
        """The ids of a conversation (``[{"role": ..., "content": ...}, ...]``) rendered by the chat
        template, ready for the assistant's next turn."""
        if not self.has_chat(tokenizer):
            raise BadInputError("the tokenizer has no chat template: complete the prompt as raw text "
                                "instead (--raw)", path=getattr(tokenizer, "name_or_path", None) or None)
        from jinja2 import TemplateError

        try:
            out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        except TemplateError as e:  # raise_exception() in the template: e.g. no system role
            raise BadInputError(f"chat template refused the prompt: {e}") from None
        return list(out["input_ids"])

    def generate(self, model: Any, ids: list[int], max_new_tokens: int, sampling: Sampling,
                 on_token: Callable[[int], bool | None]) -> list[int]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Tap(StoppingCriteria):  # type: ignore[misc]
            """Hands each new token to ``on_token`` as soon as it is chosen; stops when told to."""

            def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
                stop = bool(on_token(int(input_ids[0, -1])))
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

        sampling.seed_generator()
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]),
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens,
                                 stopping_criteria=StoppingCriteriaList([Tap()]),
                                 **sampling.transformers_kwargs())
        return list(out[0][len(ids):].tolist())

    def decode(self, tokenizer: Any, ids: list[int]) -> str:
        return str(tokenizer.decode(ids, skip_special_tokens=True))

    def start(self, model: Any) -> TransformersState:
        """An empty running sequence of ``model`` (a conversation's state between turns)."""
        return TransformersState(model)


class TransformersState:
    """A running sequence of a transformers model: the ids fed so far and their ``DynamicCache``.

    The same protocol as the lean engines' states (``feed``, ``truncate``, ``mark``): :meth:`truncate`
    crops the cache. Two things a crop cannot do start the cache over instead, the ids kept re-fed with
    the next :meth:`feed`: mend a forward cut short (Ctrl-C), which may leave some layers longer than
    others, and cut back a sliding-window layer that has already dropped the tokens before its window.

    Example:
        >>> state = TransformersEngine(sparsemap_loader()).start(model)
        >>> logits = state.feed([1, 2, 3, 4])    # (vocab,): what follows token 4
        >>> state.truncate(2)
        >>> logits = state.feed([5])             # the sequence is now [1, 2, 5]
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.ids: list[int] = []  # the sequence this state stands for
        self.cache: Any = None  # holds ids[:done]
        self.done = 0
        self._restart()
        eos = getattr(model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        self.eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        self.processed = 0  # ids run through the model since the start, re-fed ones included
        self._busy = False  # a forward began and did not finish

    def _restart(self) -> None:
        """An empty cache, made as ``generate`` makes it; every id kept waits for the next feed."""
        from transformers import DynamicCache

        try:  # transformers 5: each layer's kind (full or sliding window) from the config
            self.cache = DynamicCache(config=self.model.config)
        except TypeError:  # transformers 4: one kind
            self.cache = DynamicCache()
        self.done, self._busy = 0, False

    def feed(self, ids: list[int]) -> Any:
        """Run ``ids`` (after any ids waiting since :meth:`truncate`); the logits after the last, (vocab,).

        Raises:
            BadInputError: no ids.
        """
        import torch

        if not ids:
            raise BadInputError("nothing to feed: no ids")
        if self._busy:
            self._restart()
        todo = self.ids[self.done:] + list(ids)
        self._busy = True
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([todo]), past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        fed = self.ids + list(ids)
        self.ids, self.done, self._busy = fed, len(fed), False
        self.processed += len(todo)
        return out.logits[0, -1]

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` ids (all of them when there are fewer): the cache is cropped to them."""
        import torch

        if n >= len(self.ids) and not self._busy:
            return
        n = min(n, len(self.ids))
        if self._busy:
            self._restart()
        elif n < self.done:
            try:
                with torch.inference_mode():
                    self.cache.crop(n - self.done)  # negative: tokens to drop (transformers 4 and 5 alike)
                self.done = n
            except (ValueError, RuntimeError):  # a sliding window past its size: what it dropped is gone
                self._restart()
        self.ids = self.ids[:n]

    def mark(self) -> None:
        """Nothing to do: the cache can be cropped to any length."""


class LeanEngine:
    """sparsemap's own Llama in plain torch, with the ``tokenizers`` library: no transformers import."""

    libraries = "tokenizers"

    def __init__(self, dtype: Any = None) -> None:
        self.dtype = dtype

    def import_libraries(self) -> None:
        import jinja2  # noqa: F401
        import tokenizers  # noqa: F401

    def load_tokenizer(self, source: ModelSource) -> Any:
        from .llama import ChatTokenizer

        return ChatTokenizer(source)

    def load_model(self, source: ModelSource) -> Any:
        from .llama import load

        return load(source, dtype=self.dtype)

    def has_chat(self, tokenizer: Any) -> bool:
        return tokenizer.template is not None

    def prompt_ids(self, tokenizer: Any, prompt: str, raw: bool = False,
                   system: str | None = None) -> list[int]:
        if raw:
            return list(tokenizer.raw_ids(prompt))
        if system is None or tokenizer.template is None:  # without a template, prompt_ids says what to do
            return list(tokenizer.prompt_ids(prompt))
        return self.messages_ids(tokenizer, chat_messages(prompt, system))

    def messages_ids(self, tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
        """The ids of a conversation rendered by the chat template, ready for the assistant's next turn."""
        if tokenizer.template is None:
            raise BadInputError("the tokenizer has no chat template: complete the prompt as raw text "
                                "instead (--raw)")
        # ChatTokenizer.prompt_ids renders one user turn; a conversation goes through the same template.
        text = tokenizer.template.render(messages=messages, add_generation_prompt=True, **tokenizer.special)
        return list(tokenizer.tokenizer.encode(text, add_special_tokens=False).ids)

    def generate(self, model: Any, ids: list[int], max_new_tokens: int, sampling: Sampling,
                 on_token: Callable[[int], bool | None]) -> list[int]:
        return list(model.generate(ids, max_new_tokens, sampling=sampling, on_token=on_token))

    def decode(self, tokenizer: Any, ids: list[int]) -> str:
        return str(tokenizer.decode(ids))

    def start(self, model: Any) -> Any:
        """An empty running sequence of ``model`` (:class:`~sparsemap.models.llama.LlamaState`)."""
        return model.start()


class Llama2cEngine(LeanEngine):
    """The lean Llama for llama2.c files (:mod:`sparsemap.models.llama2c`), with ``run.c``'s tokenizer
    (``tokenizer.bin``): raw completion, stopping at BOS as ``run.c`` does."""

    libraries = "sparsemap.models.llama2c_tokenizer"

    def import_libraries(self) -> None:
        from . import llama2c_tokenizer  # noqa: F401

    def load_tokenizer(self, source: ModelSource) -> Any:
        from ..formats.dispatch import open_catalog
        from ..formats.llama2c import header_of
        from .llama2c_tokenizer import Llama2cTokenizer

        if source.tokenizer is None:
            raise SourceNotFoundError("no tokenizer.bin beside the model: pass its path with --tokenizer",
                                      path=source.folder)
        return Llama2cTokenizer.from_file(source.tokenizer, header_of(open_catalog(source)).vocab_size)

    def load_model(self, source: ModelSource) -> Any:
        from .llama2c import load

        return load(source, dtype=self.dtype)

    def has_chat(self, tokenizer: Any) -> bool:
        return False  # llama2.c's models continue text

    def prompt_ids(self, tokenizer: Any, prompt: str, raw: bool = False,
                   system: str | None = None) -> list[int]:
        if system is not None:
            raise BadInputError("a llama2.c model continues text: a system message has no place")
        return list(tokenizer.encode(prompt))

    def messages_ids(self, tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
        raise BadInputError("a llama2.c model has no chat template: give the text to continue as a prompt")


class RwkvEngine:
    """sparsemap's RWKV (7, 6, 5.2, 4) with the World tokenizer (or bytes, for a 256-token vocabulary): no
    rwkv import."""
    libraries = "sparsemap.models.rwkv_tokenizer"

    def __init__(self, sparse: bool = False) -> None:
        # Dense by default: at the half of neurons active measured on trained and random models,
        # gathering the active value rows costs more than it saves (benchmarks/rwkv.py).
        self.sparse = sparse

    def import_libraries(self) -> None:
        from . import rwkv_tokenizer  # noqa: F401

    def load_tokenizer(self, source: ModelSource) -> Any:
        from ..formats.dispatch import open_catalog
        from .rwkv_config import find_vocabulary
        from .rwkv_tokenizer import ByteTokenizer, WorldTokenizer

        vocab_size = shape_of(pytorch_view(open_catalog(source))).vocab_size
        if vocab_size == 256:
            return ByteTokenizer()
        vocabulary = find_vocabulary(source.folder)
        if vocabulary is None:
            raise SourceNotFoundError("no rwkv_vocab_v20230424.txt (the World vocabulary) beside the model",
                                      path=source.folder)
        return WorldTokenizer(vocabulary)

    def load_model(self, source: ModelSource) -> Any:
        from .rwkv import load

        return load(source.weights, sparse=self.sparse)

    def has_chat(self, tokenizer: Any) -> bool:
        return True  # the chat form RWKV models learn is plain text: every RWKV model takes it

    def prompt_ids(self, tokenizer: Any, prompt: str, raw: bool = False,
                   system: str | None = None) -> list[int]:
        if raw:
            return list(tokenizer.encode(prompt))
        return self.messages_ids(tokenizer, chat_messages(prompt, system))

    def messages_ids(self, tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
        """The ids of a conversation in the plain-text form RWKV models learn (``User: ...\n\nAssistant:``),
        ready for the assistant's next turn."""
        names = {"system": "System", "user": "User", "assistant": "Assistant"}
        turns = "".join(f"{names.get(m['role'], m['role'].title())}: {m['content']}\n\n" for m in messages)
        return list(tokenizer.encode(turns + "Assistant:"))

    def generate(self, model: Any, ids: list[int], max_new_tokens: int, sampling: Sampling,
                 on_token: Callable[[int], bool | None]) -> list[int]:
        return list(model.generate(ids, max_new_tokens, sampling=sampling, stop=(0,), on_token=on_token))

    def decode(self, tokenizer: Any, ids: list[int]) -> str:
        return str(tokenizer.decode(ids))

    def start(self, model: Any) -> Any:
        """An empty running sequence of ``model`` (:class:`~sparsemap.models.rwkv.RwkvState`)."""
        return model.start()


def pick_engine(model: str | Path | ModelSource, engine: str,
                dtype: Any = None) -> TransformersEngine | LeanEngine | RwkvEngine:
    """RWKV for RWKV checkpoints; llama2.c's own for llama2.c files; ``lean`` for Llama folders with a
    tokenizer.json (``auto``), else transformers."""
    source = resolve_model(model)
    if source.format == "llama2c":
        if engine == "transformers":
            raise BadInputError("a llama2.c checkpoint runs in the lean engine (its tokenizer.bin is not "
                                "transformers'): drop --engine transformers", path=source.path)
        return Llama2cEngine(dtype)
    if engine == "transformers":
        return TransformersEngine(sparsemap_loader(dtype))
    # A Hugging Face folder has a config.json; an RWKV checkpoint has none: only then are its keys read.
    if source.config is None and not source.is_gguf and source.format != "sharded":
        from ..formats.dispatch import open_catalog

        if detect_version(open_catalog(source)) is not None:
            return RwkvEngine()
    reason = _lean_refusal(source)
    if engine == "lean" and reason is not None:
        raise BadInputError(f"the lean engine cannot run this model: {reason} (use --engine transformers)",
                            path=source.path)
    return LeanEngine(dtype) if reason is None else TransformersEngine(sparsemap_loader(dtype))


def _lean_refusal(source: ModelSource) -> str | None:
    """Why the lean engine cannot run ``source`` (``auto`` then falls back to transformers), or ``None``."""
    from .llama import read_config, unsupported

    if source.is_gguf:
        return "it runs converted folders, not GGUF files (convert a GGUF with `sparsemap convert`)"
    if source.tokenizer is None:
        return "the folder has no tokenizer.json"
    if source.config is None:
        return "the folder has no config.json"
    return unsupported(read_config(source.config))


def check_options(*, stop: tuple[str, ...], max_new_tokens: int, ctx_size: int | None) -> None:
    """Refuse generation options out of range, naming the option and the value (``answer`` and a chat).

    Example:
        >>> check_options(stop=(), max_new_tokens=0, ctx_size=None)
        Traceback (most recent call last):
        ...
        sparsemap.errors.BadInputError: max_new_tokens must be 1 or more, not 0
    """
    if any(s == "" for s in stop):
        raise BadInputError("a stop string must not be empty")
    if max_new_tokens < 1:
        raise BadInputError(f"max_new_tokens must be 1 or more, not {max_new_tokens}")
    if ctx_size is not None and ctx_size < 2:
        raise BadInputError(f"ctx_size must be 2 or more (a prompt token and a new one), not {ctx_size}")


def seeded(settings: Sampling) -> Sampling:
    """``settings`` with a fresh random seed when they sample without one: reported, so a run can be
    repeated."""
    if settings.seed is None and not settings.greedy:
        import secrets

        return replace(settings, seed=secrets.randbits(32))
    return settings


def note_unapplied(source: ModelSource, on_note: Callable[[str], None] | None, *, sampling: bool,
                   transformers_would: bool = False) -> None:
    """Tell ``on_note`` which settings of the model's ``generation_config.json`` generations leave out
    because sparsemap's sampling rules do not have them (:func:`~sparsemap.models.sampling.unapplied`;
    ``sampling``: generations that sample); ``transformers_would``: the line says that the transformers
    engine applies them (where it can run the model)."""
    left_out = unapplied(source.generation_config, sampling=sampling)
    if left_out and on_note is not None:
        hint = "; --engine transformers does" if transformers_would else ""
        on_note(f"(generation_config.json asks for {', '.join(left_out)}: sparsemap's sampling does not "
                f"apply {'it' if len(left_out) == 1 else 'them'}{hint})")


def fit_context(prompt_tokens: int, max_new_tokens: int, ctx_size: int | None, *, what: str = "the prompt",
                on_note: Callable[[str], None] | None = None) -> int:
    """The new tokens a prompt of ``prompt_tokens`` may have within ``ctx_size`` (``None``: no limit), as
    llama.cpp's ``llama-cli`` counts: ``max_new_tokens``, or the room left (``on_note`` hears of it).

    Raises:
        BadInputError: the prompt leaves no room; the message has the numbers (``what`` names the prompt).

    Example:
        >>> fit_context(10, 64, 16)
        6
    """
    if ctx_size is None:
        return max_new_tokens
    if prompt_tokens >= ctx_size:
        raise BadInputError(f"{what} is {prompt_tokens} tokens and the context {ctx_size}: no room "
                            f"for an answer (a context of {prompt_tokens + max_new_tokens} fits it and "
                            f"{max_new_tokens} new tokens)")
    if prompt_tokens + max_new_tokens > ctx_size:
        max_new_tokens = ctx_size - prompt_tokens
        if on_note is not None:
            on_note(f"({what} is {prompt_tokens} tokens and the context {ctx_size}: "
                    f"at most {max_new_tokens} new tokens)")
    return max_new_tokens


def answer(engine: TransformersEngine | LeanEngine | RwkvEngine, model: str | Path | ModelSource,
           prompt: str, *,
           max_new_tokens: int = 64, sampling: Sampling | None = None, system: str | None = None,
           ctx_size: int | None = None, stop: Sequence[str] = (), echo: Callable[[str], None] | None = None,
           tracker: memory.PhaseTracker | None = None, memory_limit: int | None = None,
           on_plan: Callable[[str], None] | None = None, raw: bool | None = None,
           on_note: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Load a model and answer ``prompt``; returns the answer and the measurements.

    The prompt is the user's turn of the model's chat template, after ``system`` (a system turn) when
    given; ``raw=True`` (or, when ``raw`` is ``None``, a tokenizer without a chat template: a base model)
    continues it as plain text, and the report says which (``"prompt_form"``); ``on_note`` hears of the
    fallback before generation starts. A system message has no place in plain text: refused there.

    Tokens are chosen by ``sampling``; ``None`` takes the model's own defaults
    (:meth:`Sampling.for_model`: its ``generation_config.json``, else greedy). A draw without a seed
    gets a fresh random one; the report's ``"sampling"`` holds the settings used, seed included, so a
    run can be repeated. Generation ends at the end-of-text token, after ``max_new_tokens``, or where
    the text holds one of the ``stop`` strings: the answer ends before it (``"stopped_by"``), and
    ``echo`` never shows it. With ``ctx_size``, prompt and answer fit in that many tokens, as in
    llama.cpp's ``llama-cli``: a prompt that leaves no room is refused with the numbers, and
    ``max_new_tokens`` shrinks to the room left (``on_note`` hears of it). The lean engines choose tokens
    by :class:`Sampler`'s rules; ``on_note`` hears of any setting of the model's
    ``generation_config.json`` those leave out (beam search, typical-p, ...) and transformers applies.

    Phases: import torch, import the engine's libraries, tokenizer, weights,
    generate. ``first_token_s`` counts from the start of loading (tokenizer +
    weights + prompt + first token): what a user waits for.

    With ``memory_limit`` (bytes), the run keeps inside it
    (:class:`sparsemap.budget.Budget`): the runtime's baseline is measured
    before any weight is loaded (a limit below it is refused then), the plan
    (what stays resident, what streams) goes to ``on_plan``, and the report
    gets a ``budget`` entry: the plan and the process's own peak accounting.

    Raises:
        BadInputError: an empty stop string, a system message for a plain-text prompt, a prompt with no
            tokens or too long for ``ctx_size``; settings out of range (from :class:`Sampling`).
        BudgetError: the limit is below the runtime's baseline, or too small to stream the model in.
    """
    stop = tuple(stop)
    check_options(stop=stop, max_new_tokens=max_new_tokens, ctx_size=ctx_size)
    if system is not None and raw:
        raise BadInputError("a system message needs the chat template, and --raw continues the prompt as "
                            "plain text: drop one of them")
    source = resolve_model(model)
    check_model(source)
    settings = seeded(sampling if sampling is not None else Sampling.for_model(source.generation_config))
    if not isinstance(engine, TransformersEngine):
        note_unapplied(source, on_note, sampling=not settings.greedy,
                       transformers_would=not isinstance(engine, RwkvEngine))
    tracker = tracker or memory.PhaseTracker()
    try:  # its sampler process ends however this does (a refused prompt, Ctrl-C)
        with tracker.phase("import torch"):
            import torch  # noqa: F401
        with tracker.phase(f"import {engine.libraries}"):
            engine.import_libraries()
        load_start = time.perf_counter()
        with tracker.phase("tokenizer"):
            tokenizer = engine.load_tokenizer(source)
        # The prompt is checked before any weight is read: a refusal costs no load.
        raw_text = raw if raw is not None else not engine.has_chat(tokenizer)
        if system is not None and raw_text:
            raise BadInputError("the tokenizer has no chat template, so a system message has no place: "
                                "put it in the prompt instead", path=source.path)
        if raw is None and raw_text and on_note is not None:
            on_note("(the tokenizer has no chat template: the prompt is continued as plain text)")
        ids = engine.prompt_ids(tokenizer, prompt, raw_text, system)
        if not ids:
            raise BadInputError("the prompt has no tokens (an empty prompt, and no start-of-text token)")
        max_new_tokens = fit_context(len(ids), max_new_tokens, ctx_size, on_note=on_note)
        baseline = None
        if memory_limit is not None:  # refuse an impossible limit before any weight is loaded
            from ..budget import check_room

            snap = memory.Snapshot.take()
            baseline = snap.anon + snap.file
            check_room(memory_limit, baseline)
        with tracker.phase("weights"):
            lm = engine.load_model(source)
        budget = None
        if memory_limit is not None:
            from ..budget import Budget

            budget = Budget(lm, limit=memory_limit, baseline=baseline, max_tokens=len(ids) + max_new_tokens)
            if on_plan is not None:
                try:
                    on_plan(str(budget.plan))
                except BaseException:
                    budget.remove()
                    raise
        new: list[int] = []
        text = AnswerText(lambda tokens: engine.decode(tokenizer, tokens), stop=stop, echo=echo)
        first_token_at: list[float] = []

        def on_token(token: int) -> bool:
            if not first_token_at:
                first_token_at.append(time.perf_counter())
            new.append(token)
            return (echo is not None or bool(stop)) and text.add(new)  # no decoding when nobody reads it

        try:
            with tracker.phase("generate"):
                tokens = engine.generate(lm, ids, max_new_tokens, settings, on_token)
                end = time.perf_counter()
            if budget is not None:
                budget.sample(every_s=0)
        finally:  # the model may live on (a caller's): its hooks go whatever happened
            if budget is not None:
                budget.remove()
        first = first_token_at[0] if first_token_at else end
        decode_tokens = max(len(tokens) - 1, 0)
        report = {
            "model": source.path, "engine": type(engine).__name__, "prompt": prompt, "system": system,
            "prompt_form": (("raw" if raw else "raw: the tokenizer has no chat template") if raw_text
                            else "chat"),
            "prompt_tokens": len(ids), "sampling": settings.to_dict(),
            "answer": text.finish(tokens), "stop": list(stop), "stopped_by": text.stopped_by,
            "tokens": tokens, "new_tokens": len(tokens),
            "load_s": sum(p.seconds for p in tracker.phases if p.name in ("tokenizer", "weights")),
            "first_token_s": first - load_start,
            "tokens_per_s": decode_tokens / (end - first) if end > first and decode_tokens else 0.0,
            "tracker": tracker.to_dict(), "table": tracker.table(),
        }
        if budget is not None:
            p = budget.plan
            report["budget"] = {"limit": p.limit, "baseline": p.baseline, "planned": p.planned_nbytes,
                                "resident": p.resident_nbytes, "streamed": p.streamed_nbytes,
                                "own_peak": budget.own_peak, "plan": str(p)}
    finally:
        tracker.close()
    return report


def sparsemap_loader(dtype: Any = None) -> Callable[[ModelSource], Any]:
    def load_model(source: ModelSource) -> Any:
        from .hf import from_pretrained

        # A GGUF's blocks stay quantized (repacked once into the cache) unless a dtype is asked for.
        return from_pretrained(source, dtype=dtype, keep_quantized=dtype is None)

    return load_model


def transformers_gguf_loader(source: ModelSource) -> Any:
    """transformers' own loading of a GGUF file (dequantizes every tensor into memory)."""
    from ..extras import require

    require("transformers", needed_for="transformers' own GGUF loading")
    from transformers import AutoModelForCausalLM

    if not source.is_gguf:
        raise SourceNotFoundError("transformers' GGUF loading needs a GGUF file", path=source.path)
    return AutoModelForCausalLM.from_pretrained(source.folder, gguf_file=Path(source.weights).name).eval()


def run_child(way: str, model: str, prompt: str, max_new_tokens: int) -> dict[str, Any]:
    """One measured run (``way``: "sparsemap" or "transformers") in a fresh interpreter."""
    import json
    import os
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "sparsemap.models.generate", way, model, prompt,
                           str(max_new_tokens)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = without_events(proc.stderr)[-3000:]
        raise RuntimeError(f"{way} run failed (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# A child announces each phase on stderr as it begins: `sparsemap phase: {"name": ..., "at": monotonic}`.
# A parent watching from outside marks the phases on its samples, even those of a child killed mid-phase.
PHASE_EVENT = "sparsemap phase: "


def phase_events(stderr: str) -> list[tuple[str, float]]:
    """The ``(name, time.monotonic())`` of each phase a child began, in order, from its stderr."""
    import json

    return [(e["name"], float(e["at"])) for line in stderr.splitlines() if line.startswith(PHASE_EVENT)
            for e in [json.loads(line[len(PHASE_EVENT):])]]


def without_events(stderr: str) -> str:
    """A child's stderr without its phase events: what to show when it failed."""
    return "".join(line for line in stderr.splitlines(keepends=True) if not line.startswith(PHASE_EVENT))


def figures(report: dict[str, Any]) -> dict[str, float]:
    """The numbers `sparsemap run` and the benchmarks compare, from one run's report."""
    phases = {p["name"]: p for p in report["tracker"]["phases"]}
    names = [p["name"] for p in report["tracker"]["phases"]]
    before_weights = report["tracker"]["phases"][names.index("weights") - 1]["after"]
    imports = report["tracker"]["phases"][names.index("tokenizer") - 1]
    return {
        "load_s": report["load_s"],
        "first_token_s": report["first_token_s"],
        "tokens_per_s": report["tokens_per_s"],
        "weights_anon": phases["weights"]["after"]["anon"] - before_weights["anon"],
        "weights_file": phases["weights"]["after"]["file"] - before_weights["file"],
        "peak_anon": max(p["peak_anon"] for p in report["tracker"]["phases"]),
        "peak_rss": max(p["peak_rss"] for p in report["tracker"]["phases"]),
        "imports_anon": imports["after"]["anon"],
    }


def _announce(name: str, at: float) -> None:
    import json

    print(PHASE_EVENT + json.dumps({"name": name, "at": at}), file=sys.stderr, flush=True)


class SparseRwkvEngine(RwkvEngine):
    """RWKV with the sparse channel mix, counting the value rows each step multiplies (the demo's run)."""

    def __init__(self) -> None:
        super().__init__(sparse=True)
        self.model: Any = None

    def load_model(self, source: ModelSource) -> Any:
        self.model = super().load_model(source)
        self.model.count_active(True)
        return self.model

    def rows_read(self) -> dict[str, Any]:
        """Value rows multiplied per step and layer: the prompt's step first (the rows any of its tokens
        uses), then one step per token fed after it."""
        counts = self.model.count_active(False)  # (layers, steps)
        return {"ffn_size": self.model.shape.ffn_size, "layers": len(counts), "per_layer": counts}


def _child_main(argv: list[str]) -> None:
    """``python -m sparsemap.models.generate WAY MODEL PROMPT MAX_NEW [MEMORY_LIMIT]``: one measured run,
    JSON on the last line, each phase announced on stderr as it begins (:data:`PHASE_EVENT`).

    WAY: ``transformers`` (transformers' own GGUF loading), ``sparsemap`` (the engine ``sparsemap run``
    picks), ``sparsemap-lean``, ``sparsemap-transformers``, or ``rwkv-sparse`` (RWKV with the sparse
    channel mix; the report gets ``rows_read``).
    """
    import json
    import os

    way, model, prompt, max_new, *limit = argv
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tracker = memory.PhaseTracker(on_phase=_announce)
    engine: TransformersEngine | LeanEngine | RwkvEngine
    if way == "transformers":
        engine = TransformersEngine(transformers_gguf_loader)
    elif way == "sparsemap-lean":
        # Not pick_engine: its checks import torch, which would then cost nothing in the "import torch"
        # phase. The lean engine refuses what it cannot run when it loads.
        engine = LeanEngine()
    elif way == "rwkv-sparse":
        engine = SparseRwkvEngine()
    else:  # "sparsemap" (auto), "sparsemap-transformers"
        engine = pick_engine(model, {"sparsemap-transformers": "transformers"}.get(way, "auto"))
    report = answer(engine, model, prompt, max_new_tokens=int(max_new), tracker=tracker,
                    memory_limit=int(limit[0]) if limit else None)
    if isinstance(engine, SparseRwkvEngine):
        report["rows_read"] = engine.rows_read()
    print(json.dumps(report))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
