"""``sparsemap serve``: one model behind an OpenAI-compatible HTTP API, like llama.cpp's llama-server.

Routes:

* ``POST /v1/chat/completions``: a conversation's next assistant turn, rendered by the model's chat
  template (as ``sparsemap run`` renders a prompt);
* ``POST /v1/completions``: a prompt continued as plain text (``sparsemap run --raw``);
* ``GET /v1/models``: the one model served; ``GET /health``: ``{"status": "ok"}``;
* ``GET /metrics``: the process's memory (:mod:`sparsemap.memory`), requests and tokens, as Prometheus
  text (JSON with ``?format=json`` or ``Accept: application/json``).

Either completion route streams with ``"stream": true``: server-sent events in OpenAI's chunk format,
ending with ``data: [DONE]``.

The model is loaded once and answers one request at a time. A generation owns the model (its KV cache
or recurrent state, torch's global generator for the seed, a memory budget's hooks), so the other
requests wait on a lock in their own threads; nothing is interleaved. A streamed answer whose client
has gone stops at the next token: writing its chunk fails (``BrokenPipeError``, ``ConnectionResetError``)
and the generation's ``on_token`` says stop, so the next request does not wait for text nobody reads.

The standard library's :mod:`http.server` is enough: one generation at a time needs no event loop, and
no runtime dependency is added. Request parsing (:func:`parse_request`) is the one place a request is
checked; it imports no torch, and neither does this module (torch loads with the model).
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from . import memory
from .errors import BadInputError
from .formats.source import ModelSource
from .models.generate import (
    AnswerText,
    TransformersEngine,
    check_model,
    note_unapplied,
    pick_engine,
    resolve_model,
)
from .models.sampling import Sampling

DEFAULT_HOST = "127.0.0.1"  # this machine only: the server has no authentication
DEFAULT_PORT = 8080  # llama-server's
MAX_TOKENS = 4096  # the most new tokens one request may ask for (`sparsemap run --max-new-tokens` too)
# A body larger than this is refused (413) before it is read: a conversation of this size would not fit
# a small model's context anyway, and reading it whole would let one request take the server's memory.
MAX_BODY_NBYTES = 16 << 20
TOO_LARGE = HTTPStatus.REQUEST_ENTITY_TOO_LARGE  # 413 (CONTENT_TOO_LARGE from Python 3.13)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# ---------------------------------------------------------------- requests

class RequestError(BadInputError):
    """A request the server refuses, answered with ``status`` and OpenAI's error body
    (``{"error": {"message", "type", "param", "code"}}``)."""

    def __init__(self, message: str, *, param: str | None = None, status: int = HTTPStatus.BAD_REQUEST,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.param = param
        self.status = int(status)
        self.kind = kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.detail, "type": self.kind, "param": self.param, "code": None}}


@dataclass(frozen=True)
class CompletionRequest:
    """One completion request, checked: what to continue and how.

    Attributes:
        chat: from ``/v1/chat/completions`` (``messages``), else ``/v1/completions`` (``prompt``).
        messages: the conversation, ``({"role": "system" | "user" | "assistant", "content": str}, ...)``.
        prompt: the text to continue (completions).
        max_tokens: new tokens at most (``max_completion_tokens`` or ``max_tokens``); ``None``: the
            server's default.
        temperature, top_p, top_k, min_p, repetition_penalty, seed: the sampling settings given
            (``None``: not given, the model's ``generation_config.json`` decides, as in ``sparsemap run``;
            ``top_k``, ``min_p`` and ``repetition_penalty`` are llama.cpp server's extensions).
        stop: strings that end the answer (not included in it).
        stream: answer with server-sent events; ``include_usage``: a last chunk with the token counts.
    """

    chat: bool
    messages: tuple[dict[str, str], ...] = ()
    prompt: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False

    def sampling(self, generation_config: str | None) -> Sampling:
        """The settings: the model's ``generation_config.json`` under the values given (ranges checked)."""
        return Sampling.for_model(generation_config, temperature=self.temperature, top_k=self.top_k,
                                  top_p=self.top_p, min_p=self.min_p,
                                  repetition_penalty=self.repetition_penalty, seed=self.seed)


# Fields that would change the answer and that this server cannot honour: refused, not ignored, so a
# client never takes an answer for what it did not ask. Each maps to the values that are harmless.
UNSUPPORTED = {
    "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False), "top_logprobs": (None, 0),
    "suffix": (None, ""), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"),
}


def parse_request(body: bytes, *, chat: bool) -> CompletionRequest:
    """Check a completion request's JSON body; the one place requests are validated.

    Fields OpenAI defines that change nothing here (``model``, ``user``, ``metadata``, ...) and unknown
    ones are ignored, as OpenAI's server and llama-server ignore them.

    Raises:
        RequestError: the body is not a JSON object, a required field is missing, a field has the wrong
            type or range, or asks for what the server cannot do (``n`` above 1, log probabilities, ...);
            the message names the field.

    Example:
        >>> parse_request(b'{"prompt": "Once upon a time", "max_tokens": 8, "stop": "."}', chat=False)
        ... # doctest: +ELLIPSIS
        CompletionRequest(chat=False, messages=(), prompt='Once upon a time', max_tokens=8, ...stop=('.',)...)
        >>> parse_request(b'{"prompt": "Hi", "n": 2}', chat=False)
        Traceback (most recent call last):
        ...
        sparsemap.serve.RequestError: n must be 1: one answer per request, not 2
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise RequestError(f"the body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise RequestError(f"the body must be a JSON object, not {_json_type(doc)}")
    n = doc.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise RequestError(f"n must be 1: one answer per request, not {n!r}", param="n")
    for name, harmless in UNSUPPORTED.items():
        if doc.get(name, None) not in harmless:
            raise RequestError(f"{name} is not supported by sparsemap serve (got {doc[name]!r})", param=name)
    fmt = doc.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise RequestError("response_format: only {\"type\": \"text\"} is supported", param="response_format")

    messages: tuple[dict[str, str], ...] = ()
    prompt = ""
    if chat:
        messages = _messages(doc)
    else:
        prompt = _prompt(doc)
    limit_name = "max_completion_tokens" if doc.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _optional(doc, limit_name, int)
    if max_tokens is not None and not 1 <= max_tokens <= MAX_TOKENS:
        raise RequestError(f"{limit_name} must be from 1 to {MAX_TOKENS}, not {max_tokens}", param=limit_name)
    stream = _optional(doc, "stream", bool) or False
    options = doc.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError(f"stream_options must be an object, not {_json_type(options)}",
                           param="stream_options")
    include_usage = _optional(options or {}, "include_usage", bool, "stream_options.include_usage") or False
    return CompletionRequest(
        chat=chat, messages=messages, prompt=prompt, max_tokens=max_tokens,
        temperature=_optional(doc, "temperature", float), top_p=_optional(doc, "top_p", float),
        top_k=_optional(doc, "top_k", int), min_p=_optional(doc, "min_p", float),
        repetition_penalty=_optional(doc, "repetition_penalty", float),
        seed=_optional(doc, "seed", int), stop=_stop(doc.get("stop")), stream=stream,
        include_usage=include_usage)


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _optional(doc: dict[str, Any], name: str, kind: type, shown: str | None = None) -> Any:
    """``doc[name]`` checked to be of ``kind`` (an int is a float too; a boolean is neither), or ``None``
    when absent or null."""
    value = doc.get(name)
    if value is None:
        return None
    ok = isinstance(value, bool) if kind is bool else (
        not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else kind))
    if kind is float and ok:
        try:
            ok = math.isfinite(value)
        except OverflowError:  # an integer too large for a float (JSON numbers have no bound)
            ok = False
    if not ok:
        what = {bool: "true or false", int: "a whole number", float: "a finite number"}[kind]
        raise RequestError(f"{shown or name} must be {what}, not {value!r}", param=shown or name)
    return float(value) if kind is float else value


def _messages(doc: dict[str, Any]) -> tuple[dict[str, str], ...]:
    messages = doc.get("messages")
    if messages is None:
        raise RequestError("messages is required: [{\"role\": \"user\", \"content\": \"...\"}]",
                           param="messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty array of {\"role\", \"content\"} objects",
                           param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object, not {_json_type(m)}", param=where)
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}, not {role!r}",
                               param=f"{where}.role")
        out.append({"role": ROLES[role], "content": _content(m.get("content"), f"{where}.content")})
    return tuple(out)


def _content(content: object, where: str) -> str:
    """A message's text: a string, or an array of ``{"type": "text", "text": ...}`` parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise RequestError(f"{where}[{i}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                   "are supported", param=where)
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"{where} must be a string or an array of text parts, not {_json_type(content)}",
                       param=where)


def _prompt(doc: dict[str, Any]) -> str:
    prompt = doc.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
        raise RequestError(f"one prompt per request, not a batch of {len(prompt)}", param="prompt")
    if prompt is None:
        raise RequestError("prompt is required: the text to continue", param="prompt")
    if not isinstance(prompt, str):
        raise RequestError(f"prompt must be a string, not {_json_type(prompt)} (token ids are not supported)",
                           param="prompt")
    return prompt


def _stop(stop: object) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else stop if stop is not None else ()
    if not isinstance(stops, list | tuple) or not all(isinstance(s, str) for s in stops):
        raise RequestError(f"stop must be a string or an array of strings, not {_json_type(stop)}",
                           param="stop")
    if any(s == "" for s in stops):
        raise RequestError("a stop string must not be empty", param="stop")
    return tuple(stops)


# ---------------------------------------------------------------- the model

class ClientGone(Exception):  # an event, not a fault: nothing went wrong here (hence no "Error")
    """Raised by an ``on_text`` callback when nobody reads the answer any more: the generation stops."""


@dataclass(frozen=True)
class Completion:
    """One answer: its text, token counts and why it ended (OpenAI's ``finish_reason``: ``"stop"``
    for the end-of-text token or a stop string, ``"length"`` for ``max_tokens``)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    cancelled: bool = False  # the client went away mid-stream; the text is what was made until then


@dataclass
class Counters:
    """What the server has done since it started (``/metrics``)."""

    requests: int = 0  # completions answered, cut short ones included
    disconnects: int = 0  # streamed answers whose client went away before the end
    errors: int = 0  # requests answered with an error status
    prompt_tokens: int = 0
    generated_tokens: int = 0
    peak_anon: int = 0  # bytes, sampled at every generated token: the kernel keeps no anonymous peak
    budget_peak: int = 0  # the memory budget's own accounting at its highest (with --memory-limit)
    started: float = field(default_factory=time.time)


class ServedModel:
    """A model loaded once, answering completion requests one at a time.

    Loading follows :func:`sparsemap.models.generate.answer`: the model is checked, torch and the
    engine's libraries imported, the tokenizer loaded; with ``memory_limit`` (bytes) the runtime's
    baseline is measured before any weight is read (a limit below it is refused), and every request runs
    inside a :class:`sparsemap.budget.Budget` planned for its prompt and ``max_tokens``.

    Args:
        model: a path, a name sparsemap knows (``smollm2``) or a cached Hugging Face repo id, or what
            :func:`~sparsemap.models.generate.resolve_model` made of one.
        engine: ``auto``, ``lean`` or ``transformers`` (:func:`~sparsemap.models.generate.pick_engine`).
        memory_limit: keep the process inside this many bytes; ``None``: no limit.
        max_tokens: new tokens for a request that does not say (1 to :data:`MAX_TOKENS`).
        name: the model's id in responses and ``/v1/models``; by default ``model`` as given.
        on_plan: hears the memory plan (with ``memory_limit``).
        on_note: hears of settings of the model's ``generation_config.json`` that a lean engine's
            sampling rules leave out (those that act only when sampling included: a request may sample).

    Raises:
        BadInputError: not a model, no tokenizer, an impossible memory limit (``BudgetError``).

    Example:
        >>> served = ServedModel("smollm2")                                     # doctest: +SKIP
        >>> served.complete(parse_request(b'{"messages": [{"role": "user", "content": "Hi"}]}',
        ...                               chat=True)).text                      # doctest: +SKIP
        'Hello! How can I help you today?'
    """

    def __init__(self, model: str | ModelSource, *, engine: str = "auto", memory_limit: int | None = None,
                 max_tokens: int = 256, name: str | None = None,
                 on_plan: Callable[[str], None] | None = None,
                 on_note: Callable[[str], None] | None = None) -> None:
        if not 1 <= max_tokens <= MAX_TOKENS:
            raise BadInputError(f"max_tokens must be from 1 to {MAX_TOKENS}, not {max_tokens}")
        self.name = name or str(model)
        self.source = resolve_model(model)
        check_model(self.source)
        Sampling.for_model(self.source.generation_config)  # a bad generation_config.json: refused now
        self.engine = pick_engine(self.source, engine)
        if not isinstance(self.engine, TransformersEngine):  # transformers' generate applies the whole file
            # Any request may sample: the settings that act only then are named too.
            note_unapplied(self.source, on_note, sampling=True, transformers_would=True)
        self.max_tokens = max_tokens
        self.memory_limit = memory_limit
        self.counters = Counters()
        self._lock = threading.Lock()  # held by the one generation running
        self._counting = threading.Lock()  # the counters, read by /metrics while a generation runs

        import torch  # noqa: F401 - before the baseline: the runtime's own memory, as answer() measures it

        self.engine.import_libraries()
        self.tokenizer = self.engine.load_tokenizer(self.source)
        self.baseline: int | None = None
        if memory_limit is not None:
            from .budget import check_room

            snap = memory.Snapshot.take()
            self.baseline = snap.anon + snap.file
            check_room(memory_limit, self.baseline)
        self.model = self.engine.load_model(self.source)
        self.eos_ids = _eos_ids(self.model)
        self.counters.peak_anon = memory.rss_anon()  # loading's own peak is in VmHWM (peak_resident_bytes)
        if memory_limit is not None:  # a limit too small to stream this model in is refused now
            with self._budget(max_tokens) as budget:
                if on_plan is not None:
                    on_plan(str(budget.plan))

    def _budget(self, max_tokens: int) -> Any:
        from .budget import Budget

        assert self.memory_limit is not None
        return Budget(self.model, limit=self.memory_limit, baseline=self.baseline, max_tokens=max_tokens)

    def prompt_ids(self, request: CompletionRequest) -> list[int]:
        """The request's prompt as token ids: the conversation through the chat template, or the text."""
        if not request.chat:
            ids = list(self.engine.prompt_ids(self.tokenizer, request.prompt, raw=True))
        elif not self.engine.has_chat(self.tokenizer):
            raise RequestError("the model has no chat template (a base model): send the text to "
                               "/v1/completions instead", param="messages")
        else:
            ids = list(self.engine.messages_ids(self.tokenizer, [dict(m) for m in request.messages]))
        if not ids:
            raise RequestError("the prompt has no tokens (an empty prompt, and no start-of-text token)",
                               param="messages" if request.chat else "prompt")
        return ids

    def complete(self, request: CompletionRequest,
                 on_text: Callable[[str], None] | None = None) -> Completion:
        """Answer ``request``, waiting for the generation before it to end.

        ``on_text`` hears the answer's text as it grows (a stop string is never shown, even in part);
        raising :class:`ClientGone` stops the generation at that token.

        Raises:
            BadInputError: the request cannot be answered (settings out of range, a prompt the chat
                template refuses, a memory limit too small for this many tokens).
        """
        settings = request.sampling(self.source.generation_config)
        if settings.seed is None and not settings.greedy:
            settings = replace(settings, seed=secrets.randbits(32))  # each draw differs, as OpenAI's
        max_new = request.max_tokens or self.max_tokens
        with self._lock:
            ids = self.prompt_ids(request)
            budget = self._budget(len(ids) + max_new) if self.memory_limit is not None else None
            try:
                completion = self._generate(ids, max_new, settings, request.stop, on_text)
            finally:  # the model lives on: a budget's hooks go whatever happened
                if budget is not None:
                    budget.sample(every_s=0)
                    budget.remove()
        with self._counting:
            c = self.counters
            c.requests += 1
            c.disconnects += completion.cancelled
            c.prompt_tokens += completion.prompt_tokens
            c.generated_tokens += completion.completion_tokens
            if budget is not None:
                c.budget_peak = max(c.budget_peak, budget.own_peak)
        return completion

    def _generate(self, ids: list[int], max_new: int, settings: Sampling, stop: tuple[str, ...],
                  on_text: Callable[[str], None] | None) -> Completion:
        new: list[int] = []
        text = AnswerText(lambda tokens: self.engine.decode(self.tokenizer, tokens), stop=stop, echo=on_text)
        gone = False
        peak_anon = 0

        def on_token(token: int) -> bool:
            nonlocal gone, peak_anon
            new.append(token)
            peak_anon = max(peak_anon, memory.rss_anon())  # one small /proc read
            try:
                return (on_text is not None or bool(stop)) and text.add(new)  # no decoding when unread
            except ClientGone:
                gone = True
                return True

        tokens = self.engine.generate(self.model, ids, max_new, settings, on_token)
        answer = ""
        if not gone:
            try:
                answer = text.finish(tokens)  # shows the text held back for a stop string that never came
            except ClientGone:
                gone = True
        with self._counting:
            self.counters.peak_anon = max(self.counters.peak_anon, peak_anon)
        ended = (text.stopped_by is not None or len(tokens) < max_new
                 or bool(tokens and tokens[-1] in self.eos_ids))
        return Completion(answer, len(ids), len(tokens), "stop" if ended else "length", cancelled=gone)

    def count_error(self) -> None:
        with self._counting:
            self.counters.errors += 1

    def metrics(self) -> dict[str, Any]:
        """Memory now (bytes; :class:`sparsemap.memory.Snapshot`), peaks, and the counters."""
        snap = memory.Snapshot.take()
        with self._counting:
            c = replace(self.counters)
        return {
            "model": self.name, "uptime_seconds": time.time() - c.started,
            "resident_bytes": snap.rss, "resident_anonymous_bytes": snap.anon,
            "resident_file_bytes": snap.file,
            "peak_resident_bytes": snap.hwm, "peak_anonymous_bytes": max(c.peak_anon, snap.anon),
            "memory_limit_bytes": self.memory_limit, "budget_peak_bytes": c.budget_peak or None,
            "requests": c.requests, "disconnects": c.disconnects, "errors": c.errors,
            "prompt_tokens": c.prompt_tokens, "generated_tokens": c.generated_tokens,
        }


def _eos_ids(model: Any) -> frozenset[int]:
    """The end-of-text ids the model's generation stops at (to tell ``"stop"`` from ``"length"`` when
    the last token allowed was one)."""
    shape = getattr(model, "shape", None)
    if hasattr(shape, "eos_token_ids"):  # the lean Llama
        return frozenset(shape.eos_token_ids)
    if hasattr(shape, "n_layer"):  # RWKV ends at token 0
        return frozenset({0})
    config = getattr(model, "generation_config", None) or getattr(model, "config", None)
    eos = getattr(config, "eos_token_id", None)
    return frozenset(eos if isinstance(eos, list | tuple) else () if eos is None else (eos,))


# ---------------------------------------------------------------- metrics

# name in metrics() -> (Prometheus type, help). Names end in their unit, as Prometheus asks.
METRICS = {
    "resident_bytes": ("gauge", "Resident memory of the serving process (VmRSS)."),
    "resident_anonymous_bytes": ("gauge", "Resident anonymous memory (RssAnon): heap and copies, what only "
                                          "swap can take back."),
    "resident_file_bytes": ("gauge", "Resident file-backed memory (RssFile): mapped weights, which the "
                                     "kernel can drop and read again."),
    "peak_resident_bytes": ("gauge", "Peak resident memory since the process started (VmHWM)."),
    "peak_anonymous_bytes": ("gauge", "Peak resident anonymous memory, sampled at every generated token."),
    "memory_limit_bytes": ("gauge", "The --memory-limit the process keeps inside."),
    "budget_peak_bytes": ("gauge", "The memory budget's own accounting at its highest (resident memory "
                                   "plus streamed weights in the page cache)."),
    "requests": ("counter", "Completion requests answered, streams cut short included."),
    "disconnects": ("counter", "Streamed answers whose client went away before the end."),
    "errors": ("counter", "Requests answered with an error status."),
    "prompt_tokens": ("counter", "Prompt tokens read."),
    "generated_tokens": ("counter", "Tokens generated."),
    "uptime_seconds": ("gauge", "Seconds since the server started."),
}


def prometheus(figures: dict[str, Any]) -> str:
    """``figures`` (from :meth:`ServedModel.metrics`) in Prometheus' text format; absent ones left out."""
    lines = []
    for key, (kind, text) in METRICS.items():
        value = figures.get(key)
        if value is None:
            continue
        name = f"sparsemap_{key}_total" if kind == "counter" else f"sparsemap_{key}"
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- HTTP

class Server(ThreadingHTTPServer):
    """The listening socket and the model it serves (``None`` until loaded); a thread per connection."""

    daemon_threads = True  # a connection left open does not hold the process at exit
    request_queue_size = 64  # connections the kernel holds while the model loads or all threads are busy

    def __init__(self, address: tuple[str, int], served: ServedModel | None = None, *,
                 log: Callable[[str], None] | None = None) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.served = served
        self.log = log
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"


def make_server(served: ServedModel | None = None, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                log: Callable[[str], None] | None = None) -> Server:
    """A bound server (port 0: a free one, in ``.url``), not yet serving: call ``serve_forever()``.

    Raises:
        BadInputError: the address cannot be listened on (in use, not this machine's, a bad name).

    Example:
        >>> server = make_server(ServedModel("smollm2"), port=0)               # doctest: +SKIP
        >>> threading.Thread(target=server.serve_forever, daemon=True).start()  # doctest: +SKIP
    """
    try:
        return Server((host, port), served, log=log)
    except OSError as e:
        raise BadInputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


class Handler(BaseHTTPRequestHandler):
    """One connection: routes, JSON in and out, server-sent events for streams."""

    server: Server
    protocol_version = "HTTP/1.1"  # keep-alive for clients that reuse connections (OpenAI's does)
    server_version = "sparsemap"
    timeout = 600  # seconds a connection may sit idle, or a read or write may block

    GET_ROUTES = ("/health", "/v1/models", "/metrics")
    POST_ROUTES = ("/v1/chat/completions", "/v1/completions")

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.log is not None:
            self.server.log(f"{self.address_string()} {format % args}")

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def _answer(self, route: Callable[[], None]) -> None:
        """Run ``route``; whatever it raises becomes an error response, and the server goes on."""
        try:
            route()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left while its answer was written
        except Exception as e:
            self._error(self._as_request_error(e))

    def _as_request_error(self, e: Exception) -> RequestError:
        if isinstance(e, RequestError):
            return e
        if isinstance(e, BadInputError):  # what the model refuses: a chat template's error, a small budget
            return RequestError(e.detail)
        self.log_error("failed: %r", e)  # a bug or a failure while generating: told to the client and the log
        return RequestError(f"the server failed: {type(e).__name__}: {e}",
                            status=HTTPStatus.INTERNAL_SERVER_ERROR, kind="server_error")

    def _get(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/health":
            self._json(HTTPStatus.OK, {"status": "ok"})
        elif url.path == "/v1/models":
            served = self._served()
            self._json(HTTPStatus.OK, {"object": "list", "data": [{
                "id": served.name, "object": "model", "created": int(served.counters.started),
                "owned_by": "sparsemap"}]})
        elif url.path == "/metrics":
            figures = self._served().metrics()
            as_json = parse_qs(url.query).get("format") == ["json"] or "application/json" in (
                self.headers.get("Accept") or "")
            if as_json:
                self._json(HTTPStatus.OK, figures)
            else:
                self._send(HTTPStatus.OK, prometheus(figures).encode(),
                           "text/plain; version=0.0.4; charset=utf-8")
        else:
            self._unrouted("GET", url.path)

    def _post(self) -> None:
        path = urlsplit(self.path).path
        if path not in self.POST_ROUTES:
            self.close_connection = True  # its body is left unread: it must not be taken for a request
            self._unrouted("POST", path)
            return
        request = parse_request(self._body(), chat=path == "/v1/chat/completions")
        served = self._served()
        ident = ("chatcmpl-" if request.chat else "cmpl-") + secrets.token_hex(12)
        head = {"id": ident, "object": "chat.completion" if request.chat else "text_completion",
                "created": int(time.time()), "model": served.name}
        if not request.stream:
            done = served.complete(request)
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": done.finish_reason}
            if request.chat:
                choice["message"] = {"role": "assistant", "content": done.text}
            else:
                choice["text"] = done.text
            self._json(HTTPStatus.OK, {**head, "choices": [choice], "usage": _usage(done)})
            return
        events = EventStream(self, head, chat=request.chat)
        try:
            done = served.complete(request, on_text=events.text)
        except Exception as e:
            if not events.started:
                raise  # nothing sent yet: an ordinary error response
            served.count_error()
            events.error(self._as_request_error(e))
            return
        if done.cancelled:
            return
        events.finish(done, usage=request.include_usage)

    # ------------------------------------------------------------ plumbing

    def _served(self) -> ServedModel:
        if self.server.served is None:
            raise RequestError("the model is still loading", status=HTTPStatus.SERVICE_UNAVAILABLE,
                               kind="unavailable_error")
        return self.server.served

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True  # a chunked body left unread would be taken for the next request
            raise RequestError("a Content-Length header is required", status=HTTPStatus.LENGTH_REQUIRED)
        try:
            nbytes = int(length)
        except ValueError:
            nbytes = -1
        if not 0 <= nbytes <= MAX_BODY_NBYTES:
            self.close_connection = True
            raise RequestError(f"Content-Length must be from 0 to {MAX_BODY_NBYTES} bytes, not {length!r}",
                               status=HTTPStatus.BAD_REQUEST if nbytes < 0 else TOO_LARGE)
        body = self.rfile.read(nbytes)
        if len(body) < nbytes:
            self.close_connection = True
            raise RequestError(f"the body ended after {len(body)} of {nbytes} bytes")
        return body

    def _unrouted(self, method: str, path: str) -> None:
        other = self.POST_ROUTES if method == "GET" else self.GET_ROUTES
        if path in other:
            self._error(RequestError(f"{path} takes {'POST' if method == 'GET' else 'GET'}, not {method}",
                                     status=HTTPStatus.METHOD_NOT_ALLOWED),
                        {"Allow": "POST" if method == "GET" else "GET"})
            return
        routes = ", ".join([*(f"GET {r}" for r in self.GET_ROUTES), *(f"POST {r}" for r in self.POST_ROUTES)])
        self._error(RequestError(f"no route {method} {path}; the routes are {routes}",
                                 status=HTTPStatus.NOT_FOUND, kind="not_found_error"))

    def _error(self, e: RequestError, headers: dict[str, str] | None = None) -> None:
        if self.server.served is not None:
            self.server.served.count_error()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._json(e.status, e.body(), headers)

    def _json(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(doc).encode(), "application/json", headers)

    def _send(self, status: int, body: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


def _usage(done: Completion) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


class EventStream:
    """An answer sent as server-sent events in OpenAI's chunk format, the headers with the first chunk
    (so a request refused before any text is still an ordinary error response)."""

    def __init__(self, handler: Handler, head: dict[str, Any], *, chat: bool) -> None:
        self.handler = handler
        self.head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        self.chat = chat
        self.started = False

    def _start(self) -> None:
        h = self.handler
        h.send_response(HTTPStatus.OK)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Cache-Control", "no-cache")
        h.send_header("Connection", "close")  # the end of the stream is the end of the connection
        h.end_headers()
        h.close_connection = True
        self.started = True
        if self.chat:  # OpenAI's first chunk names the role
            self._event(self._chunk({"role": "assistant", "content": ""}, None))

    def _event(self, doc: Any) -> None:
        data = doc if isinstance(doc, str) else json.dumps(doc)
        self.handler.wfile.write(f"data: {data}\n\n".encode())

    def _chunk(self, content: dict[str, str] | str, finish_reason: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        choice["delta" if self.chat else "text"] = content
        return {**self.head, "choices": [choice]}

    def text(self, piece: str) -> None:
        """Send one piece of the answer; :class:`ClientGone` when the client has gone."""
        try:
            if not self.started:
                self._start()
            self._event(self._chunk({"content": piece} if self.chat else piece, None))
        except (BrokenPipeError, ConnectionResetError, TimeoutError) as e:
            raise ClientGone from e

    def finish(self, done: Completion, *, usage: bool) -> None:
        """The last chunk (its ``finish_reason``), the usage chunk when asked for, then ``[DONE]``."""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, TimeoutError):
            if not self.started:
                self._start()
            self._event(self._chunk({} if self.chat else "", done.finish_reason))
            if usage:
                self._event({**self.head, "choices": [], "usage": _usage(done)})
            self._event("[DONE]")

    def error(self, e: RequestError) -> None:
        """An error after the stream began: one event with OpenAI's error body, and the stream ends."""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, TimeoutError):
            self._event(e.body())


def serve(served: ServedModel, server: Server) -> None:
    """Serve until interrupted (Ctrl-C raises ``KeyboardInterrupt`` here); the socket is closed either way."""
    server.served = served
    try:
        server.serve_forever()
    finally:
        server.server_close()
