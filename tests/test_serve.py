"""``sparsemap serve``: OpenAI's API over HTTP, checked with OpenAI's own client against what
``sparsemap run`` answers; requests one at a time, a client that leaves mid-stream, bad requests, memory
figures.

Every server listens on 127.0.0.1 on a free port; every wait is bounded (socket and client timeouts).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from click.testing import CliRunner

from sparsemap.bench.rwkv_synthetic import write_rwkv7
from sparsemap.cli import main
from sparsemap.models.generate import answer, pick_engine
from sparsemap.models.sampling import Sampling
from sparsemap.serve import MAX_TOKENS, RequestError, ServedModel, Server, make_server, parse_request

from .conftest import ModuleFolders

openai = pytest.importorskip("openai")

TIMEOUT_S = 60  # any one request; the tiny model answers in milliseconds
CHAT = "Hello"


@pytest.fixture(scope="module")
def model(module_folders: ModuleFolders) -> str:
    """A tiny random RWKV-7 with a byte vocabulary (one token a byte): fast, and its greedy answers run
    for thousands of tokens without the end-of-text token."""
    return str(write_rwkv7(module_folders.make("rwkv") / "model.pth", 2, 64, 16, 256, 256))


@contextlib.contextmanager
def serving(served: ServedModel) -> Iterator[Server]:
    """``served`` behind a server on a free port of 127.0.0.1, in a thread, for the ``with`` block."""
    server = make_server(served, host="127.0.0.1", port=0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(model: str) -> Iterator[Server]:
    with serving(ServedModel(model, max_tokens=32, name="tiny-rwkv")) as s:
        yield s


@pytest.fixture
def client(server: Server) -> Any:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)


def reference(model: str, prompt: str, max_new_tokens: int, *, raw: bool = False) -> dict[str, Any]:
    """What ``sparsemap run`` answers (greedy): :func:`sparsemap.models.generate.answer`."""
    return answer(pick_engine(model, "auto"), model, prompt, max_new_tokens=max_new_tokens,
                  sampling=Sampling(), raw=raw)


def chat(client: Any, prompt: str, max_tokens: int, **kw: Any) -> Any:
    return client.chat.completions.create(model="any", messages=[{"role": "user", "content": prompt}],
                                          max_tokens=max_tokens, temperature=0, **kw)


def streamed_chat(client: Any, prompt: str, max_tokens: int, **kw: Any) -> tuple[str, list[Any]]:
    chunks = list(chat(client, prompt, max_tokens, stream=True, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def metrics(server: Server) -> dict[str, Any]:
    return get_json(server, "/metrics?format=json")


def get_json(server: Server, path: str) -> Any:
    status, _, body = request(server, "GET", path)
    assert status == 200, body
    return json.loads(body)


def request(server: Server, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(str(host), port, timeout=TIMEOUT_S)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


# ---------------------------------------------------------------- answers

def test_chat_answers_what_sparsemap_run_answers_with_usage_and_ids(client: Any, server: Server,
                                                                     model: str) -> None:
    expected = reference(model, CHAT, 12)
    done = chat(client, CHAT, 12, user="someone")  # user: ignored
    assert done.choices[0].message.content == expected["answer"]
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].finish_reason == "length"  # 12 tokens, no end-of-text token among them
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (
        expected["prompt_tokens"], 12, expected["prompt_tokens"] + 12)
    assert done.id.startswith("chatcmpl-") and done.object == "chat.completion" and done.model == "tiny-rwkv"
    assert abs(done.created - time.time()) < 60
    assert chat(client, CHAT, 12).id != done.id


def test_streamed_chat_chunks_add_up_to_the_whole_answer(client: Any) -> None:
    whole = chat(client, CHAT, 24).choices[0].message.content
    text, chunks = streamed_chat(client, CHAT, 24, stream_options={"include_usage": True})
    assert text == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "length" and not any(finish[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_completions_continue_the_prompt_as_plain_text(client: Any, model: str) -> None:
    expected = reference(model, "Once upon a time", 16, raw=True)
    done = client.completions.create(model="any", prompt="Once upon a time", max_tokens=16, temperature=0)
    assert done.choices[0].text == expected["answer"]
    assert done.usage.prompt_tokens == len(b"Once upon a time") == expected["prompt_tokens"]
    assert done.object == "text_completion" and done.id.startswith("cmpl-")
    chunks = list(client.completions.create(model="any", prompt="Once upon a time", max_tokens=16,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected["answer"]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_stop_string_ends_the_answer_before_it_streamed_or_not(client: Any, model: str) -> None:
    text = reference(model, "Once upon a time", 24, raw=True)["answer"]
    stop = next(text[i:i + 2] for i in range(4, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    expected = text[:text.find(stop)]
    for stops in (stop, [stop, "never appears"]):
        done = client.completions.create(model="any", prompt="Once upon a time", max_tokens=24, temperature=0,
                                         stop=stops)
        assert (done.choices[0].text, done.choices[0].finish_reason) == (expected, "stop")
    chunks = list(client.completions.create(model="any", prompt="Once upon a time", max_tokens=24,
                                            temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_seed_repeats_a_sampled_answer(client: Any) -> None:
    def sampled(seed: int) -> str:
        return client.chat.completions.create(model="any", messages=[{"role": "user", "content": CHAT}],
                                              max_tokens=16, temperature=1.0, top_p=0.9,
                                              seed=seed).choices[0].message.content

    assert sampled(7) == sampled(7)
    assert len({sampled(seed) for seed in range(4)}) > 1


def test_the_models_list_names_the_model(client: Any) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny-rwkv"]


def test_health(server: Server) -> None:
    assert get_json(server, "/health") == {"status": "ok"}


# ---------------------------------------------------------------- one at a time

def test_concurrent_requests_each_get_their_own_answer(client: Any) -> None:
    prompts = ["Hello", "Tell me a story.", "abc", "What is 2+2?"]
    sequential = {p: chat(client, p, 40).choices[0].message.content for p in prompts}

    def ask(i: int) -> tuple[str, str]:
        p = prompts[i % len(prompts)]
        text = streamed_chat(client, p, 40)[0] if i % 2 else chat(client, p, 40).choices[0].message.content
        return p, text

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, i) for i in range(16)]
        results = [f.result(timeout=TIMEOUT_S) for f in futures]
    assert all(text == sequential[p] for p, text in results)


def test_a_client_that_leaves_mid_stream_stops_its_generation(client: Any, server: Server) -> None:
    # The prompt's greedy answer runs past 1024 tokens: only the disconnection can stop it sooner.
    assert chat(client, CHAT, 1024).choices[0].finish_reason == "length"
    before = metrics(server)
    payload = json.dumps({"messages": [{"role": "user", "content": CHAT}], "max_tokens": MAX_TOKENS,
                          "temperature": 0, "stream": True}).encode()
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=TIMEOUT_S) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        received = b""
        while received.count(b"data: ") < 3:  # the role chunk and two pieces of text
            chunk = sock.recv(1 << 16)
            assert chunk, f"the stream ended early: {received!r}"
            received += chunk
        assert received.startswith(b"HTTP/1.1 200") and b"text/event-stream" in received
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
    # The next request waits for the model: it is answered once the abandoned generation has stopped.
    done = chat(client, "abc", 8)
    assert done.choices[0].finish_reason == "length"
    after = metrics(server)
    assert after["disconnects"] == before["disconnects"] + 1
    abandoned = after["generated_tokens"] - before["generated_tokens"] - done.usage.completion_tokens
    assert 2 <= abandoned < 1024


# ---------------------------------------------------------------- refusals

def test_n_above_one_is_a_400_in_openai_error_shape(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}], n=2)
    assert caught.value.status_code == 400
    assert caught.value.body == {"message": "n must be 1: one answer per request, not 2",
                                 "type": "invalid_request_error", "param": "n", "code": None}


@pytest.mark.parametrize(("method", "path", "body", "status", "message"), [
    ("POST", "/v1/chat/completions", b"{not json", 400,
     "the body is not valid JSON: Expecting property name"),
    ("POST", "/v1/chat/completions", b'{"max_tokens": 4}', 400, "messages is required"),
    ("POST", "/v1/completions", b'{"max_tokens": 4}', 400, "prompt is required"),
    ("POST", "/v1/completions", b'{"prompt": "x", "temperature": -1}', 400,
     "temperature must be 0 (greedy) or more, not -1.0"),
    ("POST", "/v1/completions", b'{"prompt": "x", "min_p": 2}', 400, "min_p must be between 0 (off) and 1"),
    ("POST", "/v1/embeddings", b"{}", 404, "no route POST /v1/embeddings; the routes are GET /health"),
    ("GET", "/v2/models", None, 404, "no route GET /v2/models"),
    ("GET", "/v1/completions", None, 405, "/v1/completions takes POST, not GET"),
    ("POST", "/health", b"{}", 405, "/health takes GET, not POST"),
])
def test_bad_requests_get_an_error_status_and_a_clear_message(server: Server, method: str, path: str,
                                                              body: bytes | None, status: int,
                                                              message: str) -> None:
    got, headers, raw = request(server, method, path, body, {"Content-Type": "application/json"})
    assert got == status
    error = json.loads(raw)["error"]
    assert error["message"].startswith(message), error
    assert set(error) == {"message", "type", "param", "code"}
    if status == 405:
        assert headers["Allow"] in ("GET", "POST")


def test_a_body_without_its_length_is_refused(server: Server) -> None:
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=TIMEOUT_S) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"2\r\n{}\r\n0\r\n\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 411") and b"a Content-Length header is required" in reply


ERRORS = [
    (b"[1, 2]", True, None, "the body must be a JSON object, not an array"),
    (b'{"messages": []}', True, "messages", "messages must be a non-empty array"),
    (b'{"messages": ["hi"]}', True, "messages[0]", "messages[0] must be an object, not a string"),
    (b'{"messages": [{"role": "robot", "content": "x"}]}', True, "messages[0].role",
     "messages[0].role must be one of system, developer, user, assistant, not 'robot'"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', True, "messages[0].content",
     "messages[0].content[0]: only text parts"),
    (b'{"messages": [{"role": "user"}]}', True, "messages[0].content",
     "messages[0].content must be a string or an array of text parts, not null"),
    (b'{"prompt": ["a", "b"]}', False, "prompt", "one prompt per request, not a batch of 2"),
    (b'{"prompt": [1, 2]}', False, "prompt", "prompt must be a string, not an array (token ids are not"),
    (b'{"prompt": "x", "max_tokens": 0}', False, "max_tokens",
     f"max_tokens must be from 1 to {MAX_TOKENS}, not 0"),
    (b'{"prompt": "x", "max_completion_tokens": 5000}', False, "max_completion_tokens",
     f"max_completion_tokens must be from 1 to {MAX_TOKENS}, not 5000"),
    (b'{"prompt": "x", "max_tokens": "8"}', False, "max_tokens",
     "max_tokens must be a whole number, not '8'"),
    (b'{"prompt": "x", "temperature": true}', False, "temperature",
     "temperature must be a finite number, not True"),
    (b'{"prompt": "x", "stream": "yes"}', False, "stream", "stream must be true or false, not 'yes'"),
    (b'{"prompt": "x", "stream_options": {"include_usage": 1}}', False, "stream_options.include_usage",
     "stream_options.include_usage must be true or false, not 1"),
    (b'{"prompt": "x", "stop": ""}', False, "stop", "a stop string must not be empty"),
    (b'{"prompt": "x", "stop": [1]}', False, "stop", "stop must be a string or an array of strings"),
    (b'{"prompt": "x", "n": true}', False, "n", "n must be 1: one answer per request, not True"),
    (b'{"prompt": "x", "logprobs": 5}', False, "logprobs",
     "logprobs is not supported by sparsemap serve (got 5)"),
    (b'{"prompt": "x", "presence_penalty": 0.5}', False, "presence_penalty",
     "presence_penalty is not supported"),
    (b'{"prompt": "x", "response_format": {"type": "json_object"}}', False, "response_format",
     "response_format: only"),
]


@pytest.mark.parametrize(("body", "is_chat", "param", "message"), ERRORS)
def test_each_malformed_request_names_what_is_wrong(body: bytes, is_chat: bool, param: str | None,
                                                    message: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_request(body, chat=is_chat)
    assert str(caught.value).startswith(message)
    assert (caught.value.status, caught.value.param) == (400, param)


def test_a_request_is_read_into_its_fields_and_the_rest_ignored() -> None:
    body = {"model": "gpt-4o", "user": "u", "metadata": {"a": 1}, "n": 1, "presence_penalty": 0,
            "messages": [{"role": "developer", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                      {"type": "text", "text": "there"}]},
                         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
            "max_tokens": 9, "max_completion_tokens": 7, "temperature": 1, "top_p": 0.5, "min_p": 0.1,
            "seed": 3, "stop": "\n", "stream": True, "stream_options": {"include_usage": True}}
    r = parse_request(json.dumps(body).encode(), chat=True)
    assert r.messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"})
    assert (r.max_tokens, r.temperature, r.top_p, r.min_p, r.seed, r.stop, r.stream, r.include_usage) == (
        7, 1.0, 0.5, 0.1, 3, ("\n",), True, True)  # max_completion_tokens wins: max_tokens is its old name
    assert r.sampling(None) == Sampling(temperature=1.0, top_p=0.5, min_p=0.1, seed=3)
    assert parse_request(b'{"prompt": ["one"]}', chat=False).prompt == "one"  # a batch of one


# ---------------------------------------------------------------- memory

def test_metrics_report_the_process_memory_and_what_was_served(client: Any, server: Server) -> None:
    before = metrics(server)
    done = chat(client, CHAT, 8)
    after = metrics(server)
    assert after["requests"] == before["requests"] + 1
    assert after["generated_tokens"] - before["generated_tokens"] == done.usage.completion_tokens
    assert after["prompt_tokens"] - before["prompt_tokens"] == done.usage.prompt_tokens
    assert 0 < after["resident_anonymous_bytes"] <= after["peak_anonymous_bytes"]
    assert after["resident_file_bytes"] > 0  # the mapped weights and code
    assert after["resident_bytes"] <= after["peak_resident_bytes"]
    status, headers, text = request(server, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    lines = text.decode().splitlines()
    values = {line.split()[0]: float(line.split()[1]) for line in lines if not line.startswith("#")}
    for name in ("sparsemap_resident_anonymous_bytes", "sparsemap_resident_file_bytes",
                 "sparsemap_peak_resident_bytes", "sparsemap_peak_anonymous_bytes"):
        assert values[name] > 0 and f"# TYPE {name} gauge" in lines
    assert values["sparsemap_requests_total"] >= after["requests"]
    assert values["sparsemap_generated_tokens_total"] >= after["generated_tokens"]
    assert "# TYPE sparsemap_generated_tokens_total counter" in lines
    assert "sparsemap_memory_limit_bytes" not in values  # no limit: not reported
    status, _, body = request(server, "GET", "/metrics", headers={"Accept": "application/json"})
    assert status == 200 and json.loads(body)["model"] == "tiny-rwkv"


def test_a_memory_limit_plans_each_request_and_changes_no_answer(model: str, client: Any) -> None:
    from sparsemap.memory import Snapshot
    from sparsemap.units import format_size

    plans: list[str] = []
    # The server runs in this process, whose baseline is whatever the tests before it left: the limit is
    # that plus room for the model, rounded to MiB.
    snap = Snapshot.take()
    limit = ((snap.anon + snap.file) >> 20) + 400 << 20
    limited = ServedModel(model, max_tokens=16, memory_limit=limit, on_plan=plans.append)
    assert plans and plans[0].startswith(f"memory plan for a limit of {format_size(limit)}")
    with serving(limited) as s:
        limited_client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", timeout=TIMEOUT_S,
                                       max_retries=0)
        assert chat(limited_client, CHAT, 16).choices[0].message.content == \
            chat(client, CHAT, 16).choices[0].message.content
        figures = metrics(s)
    assert figures["memory_limit_bytes"] == limit
    assert 0 < figures["budget_peak_bytes"] <= limit


# ---------------------------------------------------------------- the command

def test_a_limit_below_the_runtime_is_refused_before_serving(model: str) -> None:
    result = CliRunner().invoke(main, ["serve", model, "--port", "0", "--memory-limit", "1M"])
    assert result.exit_code == 2, result.output
    assert "is below what the runtime needs before any weight" in result.stderr
    assert "serving" not in result.stdout


def test_a_port_in_use_is_refused_before_the_model_loads() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "no-such-model", "--port", str(port)])
    assert result.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_help_shows_routes_examples_and_defaults() -> None:
    result = CliRunner().invoke(main, ["serve", "--help"])
    out = " ".join(result.output.split())
    assert result.exit_code == 0
    for words in ("POST /v1/chat/completions", "GET /metrics", "sparsemap serve smollm2",
                  "[default: 127.0.0.1]", "[default: 8080; 0<=x<=65535]", "[default: 256; 1<=x<=4096]",
                  "Default: no limit"):
        assert words in out, words


def _read_line(proc: subprocess.Popen[str], deadline: float) -> str:
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            return proc.stdout.readline()
        if proc.poll() is not None:
            break
    raise AssertionError(f"no line from the server (exit {proc.poll()})")


def test_the_command_prints_its_url_serves_and_stops_on_ctrl_c(model: str) -> None:
    # SIGINT restored: a test run started in the background inherits it ignored.
    code = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from sparsemap.cli import main; main()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", model, "--port", "0", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = _read_line(proc, time.monotonic() + 120)
        assert line.startswith(f"serving {model} at http://127.0.0.1:"), line
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "Hi", "max_tokens": 3}),
                     headers={"Content-Type": "application/json"})
        reply = json.loads(conn.getresponse().read())
        conn.close()
        assert reply["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "sparsemap: interrupted"


# ---------------------------------------------------------------- a real model

@pytest.mark.model
@pytest.mark.slow
def test_smollm2_serves_what_sparsemap_run_answers() -> None:
    from sparsemap.models import assets, smollm2

    try:
        folder = str(smollm2.prepare_quantized(quiet=True))
    except assets.AssetError as e:
        pytest.skip(f"SmolLM2 could not be fetched: {e}")
    prompt = "What is the capital of France?"
    run = CliRunner().invoke(main, ["run", folder, prompt, "--temperature", "0", "--max-new-tokens", "24",
                                    "--json"])
    assert run.exit_code == 0, run.stderr
    expected = json.loads(run.stdout.strip().splitlines()[-1])
    with serving(ServedModel(folder, name="smollm2")) as s:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", timeout=300, max_retries=0)
        done = chat(client, prompt, 24)
        text, _ = streamed_chat(client, prompt, 24)
    assert done.choices[0].message.content == expected["answer"] == text
    assert done.usage.prompt_tokens == expected["prompt_tokens"]
    assert done.usage.completion_tokens == expected["new_tokens"]
    if expected["new_tokens"] < 24:  # the end-of-text token came first
        assert done.choices[0].finish_reason == "stop"
