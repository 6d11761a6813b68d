"""``sparsemap chat``: piped lines and a real pseudo-terminal (typed turns, commands, Ctrl-D, Ctrl-C), on a
tiny byte-level RWKV; each answer shown is the one the conversation API gives."""

from __future__ import annotations

import os
import pty
import select
import signal
import struct
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from sparsemap.bench.rwkv_synthetic import write_rwkv7
from sparsemap.cli import main
from sparsemap.models.chat import open_conversation
from sparsemap.models.generate import RwkvEngine

from .conftest import ModuleFolders

NEW = 6


@pytest.fixture(scope="module")
def model(module_folders: ModuleFolders) -> str:
    """A tiny random RWKV-7 with a byte vocabulary whose answers never end before --max-new-tokens: the
    end-of-text token's head row is zero, so some other token is always likelier."""
    path = write_rwkv7(module_folders.make("rwkv") / "model.pth", 2, 64, 16, 256, 256)
    weights = torch.load(path)
    weights["head.weight"][0] = 0
    torch.save(weights, path)
    return str(path)


def _answers(model: str, messages: list[str], new: int = NEW) -> list[str]:
    """What the conversation API answers to ``messages``, greedy: what the command must show."""
    chat = open_conversation(RwkvEngine(), model, max_new_tokens=new)
    return [chat.reply(text) for text in messages]


def _run(*args: str, input: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["chat", *args], input=input)
    return result.exit_code, result.stdout, result.stderr


def test_help_shows_examples_commands_and_every_option() -> None:
    code, out, _ = _run("--help", input="")
    assert code == 0 and "Examples:" in out and "sparsemap chat smollm2" in out and "/clear" in out
    for flag in ("--system", "--max-new-tokens", "--ctx-size", "--temperature", "--top-k", "--top-p",
                 "--repetition-penalty", "--seed", "--stop", "--engine"):
        assert flag in out


def test_piped_lines_are_turns_and_commands_work(model: str) -> None:
    first, second = _answers(model, ["Hello", "How are you?"])
    code, out, err = _run(model, "--max-new-tokens", str(NEW),
                          input="Hello\nHow are you?\n/help\n/nope\n/clear\nHello\n/exit\nnever read\n")
    assert code == 0, err
    assert out.count(first) == 2 and second in out  # after /clear, the first answer again
    assert "/clear   start a new conversation" in err and "(no command /nope: /help lists them)" in err
    assert "(a new conversation)" in err and "greedy decoding" in err


def test_a_line_ending_with_a_backslash_goes_on_and_the_end_of_input_leaves(model: str) -> None:
    (joined,) = _answers(model, ["two\nlines"])
    code, out, _ = _run(model, "--max-new-tokens", str(NEW), input="two\\\nlines\n")
    assert code == 0 and joined in out


def test_a_message_the_context_cannot_hold_is_refused_and_the_session_goes_on(model: str) -> None:
    held = len(b"User: Hi\n\nAssistant:") + NEW  # the first turn and its answer fill the context
    code, out, err = _run(model, "--max-new-tokens", str(NEW), "--ctx-size", str(held),
                          input="Hi\nAgain\n/clear\nHi\n")
    assert code == 0
    assert "no room for an answer" in err and "/clear starts a new conversation" in err
    (first,) = _answers(model, ["Hi"])
    assert out.count(first) == 2


@pytest.mark.parametrize("flags", [["--temperature", "-1"], ["--ctx-size", "1"], ["--stop", ""]])
def test_bad_values_exit_2_naming_the_setting(model: str, flags: list[str]) -> None:
    code, _, err = _run(model, *flags, input="")
    assert code == 2 and err.startswith("sparsemap: error: ") and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- a real terminal

class Terminal:
    """``sparsemap chat`` under a pseudo-terminal it controls (Ctrl-C and Ctrl-D reach it as a user's do):
    type, read until a text shows (bounded by a deadline), wait for the exit code."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ, TERM="xterm", PYTHONUNBUFFERED="1")
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: a new session whose controlling terminal is the pty
            try:
                os.execve(sys.executable, [sys.executable, "-m", "sparsemap.cli", "chat", *args], env)
            finally:
                os._exit(127)
        import fcntl
        import termios

        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))
        self.seen = ""  # everything shown so far, "\r" dropped (the terminal writes "\r\n" for "\n")

    def expect(self, text: str, timeout: float = 120) -> None:
        """Read until ``text`` shows after what earlier calls consumed; fail showing the screen if it
        does not by the deadline."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                raise AssertionError(f"{text!r} never showed; the terminal showed:\n{self.seen[-3000:]}")
        self.seen = self.seen[self.seen.index(text) + len(text):]

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.seen += data.decode("utf-8", errors="replace").replace("\r", "")
        return bool(data)

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def exit_code(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read(0.1)  # keep the terminal drained, so the child never blocks writing
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        self.kill()
        raise AssertionError(f"still running after {timeout} s; the terminal showed:\n{self.seen[-3000:]}")

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


@pytest.fixture
def terminal():
    started: list[Terminal] = []

    def start(*args: str) -> Terminal:
        started.append(Terminal(*args))
        return started[-1]

    yield start
    for t in started:  # a failed test leaves no child behind
        t.kill()


def test_typed_turns_show_their_answers_then_clear_and_exit_0(model: str, terminal) -> None:
    first, second = _answers(model, ["Hello", "How are you?"])
    term = terminal(model, "--max-new-tokens", str(NEW))
    term.expect("> ")
    term.type("Hello\r")
    term.expect(first.replace("\r", ""))
    term.expect("> ")
    term.type("How are you?\r")
    term.expect(second.replace("\r", ""))
    term.expect("> ")
    term.type("/clear\r")
    term.expect("(a new conversation)")
    term.type("/exit\r")
    assert term.exit_code() == 0


def test_ctrl_d_at_the_prompt_exits_0(model: str, terminal) -> None:
    term = terminal(model)
    term.expect("> ")
    term.type("\x04")
    assert term.exit_code() == 0


def test_ctrl_c_stops_an_answer_and_at_the_prompt_exits_130(model: str, terminal) -> None:
    (start,) = _answers(model, ["Tell me everything"], new=3)
    term = terminal(model, "--max-new-tokens", "4096")  # minutes of answer, were it not stopped
    term.expect("> ")
    term.type("Tell me everything\r")
    term.expect(start.replace("\r", "").rstrip("\ufffd"))  # the answer is streaming
    term.type("\x03")
    term.expect("(interrupted)")
    term.expect("> ")  # the session goes on
    # Python's readline checks for a signal when its wait for a key is interrupted: a Ctrl-C that lands
    # while the prompt is being drawn waits for the next key. A person is never that quick.
    time.sleep(0.5)
    term.type("\x03")
    assert term.exit_code() == 130
    assert "sparsemap: interrupted" in term.seen
