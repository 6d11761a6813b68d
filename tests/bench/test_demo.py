"""The demo's story (``sparsemap demo``): its analysis on run records written by hand, how a child's end
is read, the picture, and one real run.

The records have the shape :func:`sparsemap.bench.demo.record` gives (a child measured from outside:
outcome, peaks, memory over time, the phases it announced, its report). Only the last test runs models.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sparsemap.bench import demo
from sparsemap.bench.measure import Measurement
from sparsemap.models.generate import PHASE_EVENT

MiB = 1 << 20
TOKENS = [504, 3575, 282, 4649, 314, 7042, 30, 2]
ANSWER = "The capital of France is Paris, and two famous landmarks there are the Eiffel Tower."


def _run(label: str, limit_mib: int | None, outcome: str = "answered", *, tokens_per_s: float = 80.0,
         first_token_s: float = 0.3, tokens: list[int] | None = None, answer: str = ANSWER,
         peaks_mib: tuple[int, int, int | None] = (186, 364, None), reason: str = "", wall_s: float = 4.0,
         phases: list[list[Any]] | None = None, **report: Any) -> dict[str, Any]:
    """A record as demo.record() makes it: outcome, peaks (anon, RSS, cgroup; MiB), phases, the report."""
    anon, rss, cgroup = peaks_mib
    answered = outcome == "answered"
    rep = {"answer": answer, "tokens": tokens or TOKENS, "tokens_per_s": tokens_per_s,
           "first_token_s": first_token_s, "prompt_tokens": 17, **report} if answered else None
    return {"label": label, "limit": limit_mib * MiB if limit_mib else None, "outcome": outcome,
            "reason": reason, "report": rep, "wall_s": wall_s, "peak_anon": anon * MiB,
            "peak_file": (rss - anon) * MiB, "peak_rss": rss * MiB,
            "cgroup_peak": cgroup * MiB if cgroup else None,
            "trace": [[0.0, 6 * MiB, 6 * MiB], [wall_s / 2, anon * MiB, (rss - anon) * MiB],
                      [wall_s, anon * MiB, (rss - anon) * MiB]],
            "phases": phases if phases is not None else [
                ["start-up", 0.0, 0.1], ["import torch", 0.1, 1.2], ["import tokenizers", 1.2, 1.3],
                ["tokenizer", 1.3, 1.4], ["weights", 1.4, 1.5], ["first token", 1.5, 1.7],
                ["generation", 1.7, wall_s - 0.3]]}


ROWS_READ = {"ffn_size": 3072, "layers": 2, "per_layer": [[3040, 1500, 1600], [3000, 1550, 1494]]}


def _story() -> list[dict[str, Any]]:
    """A limited story as run_story runs it: sparsemap free then in the budget, transformers killed in it,
    llama.cpp skipped, transformers free, RWKV sparse."""
    return [
        _run("sparsemap", None, tokens_per_s=80.0),
        _run("sparsemap", 410, tokens_per_s=79.2, first_token_s=0.33, peaks_mib=(185, 364, 278)),
        _run("transformers", 410, "killed", reason="killed by the memory limit", wall_s=5.8,
             peaks_mib=(405, 505, 410), phases=[["start-up", 0.0, 0.1], ["import torch", 0.1, 1.0],
                                                ["import transformers", 1.0, 3.7], ["tokenizer", 3.7, 3.9],
                                                ["weights", 3.9, 5.8]]),
        demo.record("llama.cpp", 410 * MiB, skipped="llama-cpp-python is not installed (pip install x)"),
        _run("transformers", None, tokens_per_s=12.2, first_token_s=18.8, peaks_mib=(978, 1170, None)),
        _run("RWKV-7 sparse", None, tokens_per_s=28.6, first_token_s=1.16, answer="approx PC\n  MIT ####",
             peaks_mib=(177, 790, None), rows_read=ROWS_READ),
    ]


# What _story() must print (the README shows a table like it): columns, "-" where a run reached nothing.
STORY_TABLE = """\
way            limit    outcome                     tokens/s  1st token s  peak anon  peak RSS  cgroup peak
sparsemap      none     answered                        80.0         0.30        186       364            -
sparsemap      410 MiB  answered                        79.2         0.33        185       364          278
transformers   410 MiB  killed by the memory limit         -            -        405       505          410
transformers   none     answered                        12.2        18.80        978      1170            -
RWKV-7 sparse  none     answered                        28.6         1.16        177       790            -
llama.cpp      410 MiB  skipped: llama-cpp-python is not installed (pip install x)
(peaks in MiB, sampled from outside each process; 1st token: seconds from the start of loading)
"""


# ---------------------------------------------------------------- the analysis

def test_the_story_shows_the_answers_one_table_and_what_happened_in_the_budget() -> None:
    result = demo.story_result(_story(), budget=410 * MiB, limited=True)
    assert result.ok
    lines = result.text.splitlines()
    assert lines[1:4] == [
        f"sparsemap answers in 410 MiB: {ANSWER}",  # the run in the budget; the free one only calibrates
        f"transformers answers without a limit: {ANSWER}",
        'RWKV-7 sparse answers: "approx PC MIT ####" (gibberish, as random weights give)']
    start = lines.index(STORY_TABLE.splitlines()[0])
    assert lines[start:start + 8] == STORY_TABLE.splitlines()
    assert lines[start + 9:] == [
        "In 410 MiB sparsemap answered at 79.2 tokens/s, 0.99x its speed without a limit.",
        "In 410 MiB transformers was killed by the memory limit (peak 410 MiB) during 'weights', 5.8 s in.",
        "Same tokens from sparsemap and transformers: yes.",
        "RWKV-7's sparse FFN read 50.0% of its value rows per token (1,536 of 3,072 a layer, mean over 2 "
        "layers and 2 tokens; the prompt's 17 tokens together: 98.3%)."]
    assert result.to_dict()["runs"] is result.runs and result.to_dict()["budget"] == 410 * MiB


def test_sparsemap_killed_in_the_budget_fails_the_story() -> None:
    runs = _story()
    runs[1] = _run("sparsemap", 410, "killed", reason="killed by the memory limit", wall_s=2.0,
                   peaks_mib=(180, 300, 410))
    result = demo.story_result(runs, budget=410 * MiB, limited=True)
    assert not result.ok
    said = "In 410 MiB sparsemap was killed by the memory limit (peak 410 MiB) during 'generation', 2.0 s in."
    assert said in result.text.splitlines()
    assert "sparsemap answers" not in result.text and "Same tokens" not in result.text


def test_tokens_other_than_transformers_fail_the_story() -> None:
    runs = _story()
    runs[1]["report"]["tokens"] = [*TOKENS[:-1], 0]
    result = demo.story_result(runs, budget=410 * MiB, limited=True)
    assert not result.ok and "Same tokens from sparsemap and transformers: NO." in result.text


def test_a_run_that_thrashed_past_its_time_says_so() -> None:
    runs = _story()
    runs[2] = _run("transformers", 410, "timed out", reason="stopped after 240 s", wall_s=240.0,
                   peaks_mib=(380, 400, 409))
    lines = demo.story_result(runs, budget=410 * MiB, limited=True).text.splitlines()
    assert "In 410 MiB transformers was stopped after 240 s (peak 409 MiB) during 'generation', 240.0 s in." \
        in lines
    assert any(line.startswith("transformers   410 MiB  stopped after 240 s") for line in lines)


def test_without_a_cgroup_every_way_runs_once_without_a_limit() -> None:
    runs = [_run("sparsemap", None), _run("transformers", None, tokens_per_s=12.0),
            demo.record("llama.cpp", None, skipped="not installed"), _run("RWKV-7 sparse", None,
                                                                          rows_read=ROWS_READ)]
    result = demo.story_result(runs, budget=410 * MiB, limited=False)
    assert result.ok and not result.limited
    assert f"sparsemap answers without a limit: {ANSWER}" in result.text
    assert not any(line.startswith("In ") for line in result.text.splitlines())


def test_other_work_during_the_runs_is_said_and_kept() -> None:
    busy = demo.story_result(_story(), budget=410 * MiB, limited=True, busy=0.42)
    assert busy.text.splitlines()[-1] == ("(Other work took 42% of the CPUs during these runs: the speeds "
                                          "are lower than this machine's own.)")
    assert busy.to_dict()["busy"] == 0.42 and busy.ok
    quiet = demo.story_result(_story(), budget=410 * MiB, limited=True, busy=0.02)
    assert "Other work" not in quiet.text


def test_other_work_counts_what_this_process_tree_did_not() -> None:
    other = demo.OtherWork()
    subprocess.run([sys.executable, "-c", "x = 0\nfor i in range(3_000_000): x += i"], check=True)
    share = other.fraction()
    # The child's CPU time is ours, not other work's (what others do meanwhile is unknown: a bound only).
    assert share is not None and 0.0 <= share <= 1.0


def test_a_story_without_sparsemap_is_refused() -> None:
    with pytest.raises(ValueError, match="no sparsemap run"):
        demo.story_result(_story()[2:], budget=410 * MiB, limited=True)


def test_the_rows_line_without_a_step_after_the_prompt_says_so() -> None:
    line = demo.rows_line({"ffn_size": 8, "layers": 1, "per_layer": [[5]]}, 3)
    assert line == "RWKV-7's sparse FFN ran no step after the prompt: no fraction per token to report."


def test_the_budget_is_the_peak_plus_ten_percent_rounded_up_to_10_mib() -> None:
    assert demo.pick_budget(364 * MiB) == 410 * MiB
    assert demo.pick_budget(100 * MiB) == 110 * MiB  # exactly 110: no rounding up past it
    assert demo.pick_budget(1) == 10 * MiB


# ---------------------------------------------------------------- a child's end, read from outside

def _events(*phases: tuple[str, float]) -> str:
    return "".join(PHASE_EVENT + json.dumps({"name": n, "at": at}) + "\n" for n, at in phases)


M = Measurement(exit_code=0, wall_s=3.0, peak_rss=364 * MiB, peak_anon=186 * MiB, peak_file=178 * MiB,
                major_faults=0, read_bytes=0, samples=100, started=100.0,
                trace=((0.0, MiB, MiB), (1.0, 150 * MiB, 80 * MiB), (2.95, 186 * MiB, 178 * MiB)))


def test_an_answered_run_splits_generate_into_first_token_and_generation() -> None:
    report = {"answer": "Paris.", "first_token_s": 0.4,
              "tracker": {"phases": [{"name": "generate", "seconds": 1.0}]}}
    m = replace(M, stdout="noise\n" + json.dumps(report) + "\n",
                stderr=_events(("import torch", 100.1), ("tokenizer", 101.2), ("weights", 101.3),
                               ("generate", 101.5)))
    r = demo.record("sparsemap", None, measurement=m)
    assert r["outcome"] == "answered" and r["report"] == report and r["reason"] == ""
    assert r["phases"] == [["start-up", 0.0, 0.1], ["import torch", 0.1, 1.2], ["tokenizer", 1.2, 1.3],
                           ["weights", 1.3, 1.5], ["first token", 1.5, 1.6], ["generation", 1.6, 2.5]]
    assert r["trace"] == [[0.0, MiB, MiB], [1.0, 150 * MiB, 80 * MiB], [2.95, 186 * MiB, 178 * MiB]]
    assert json.loads(json.dumps(r)) == r  # plain data: --json writes it as it is


def test_a_killed_run_keeps_the_phase_it_died_in_until_its_last_sample() -> None:
    m = replace(M, exit_code=-9, oom_killed=True, cgroup_peak=410 * MiB,
                stderr=_events(("import torch", 100.1), ("weights", 102.0)) + "Killed\n")
    r = demo.record("transformers", 410 * MiB, measurement=m)
    assert (r["outcome"], r["reason"], r["report"]) == ("killed", "killed by the memory limit", None)
    assert r["phases"][-1] == ["weights", 2.0, 2.95] and r["cgroup_peak"] == 410 * MiB


def test_a_run_past_its_time_is_timed_out_and_a_failure_says_its_last_line() -> None:
    late = demo.record("x", None, measurement=replace(M, exit_code=-9, wall_s=240.5), timeout_s=240)
    assert (late["outcome"], late["reason"]) == ("timed out", "stopped after 240 s")
    failed = demo.record("x", None, measurement=replace(
        M, exit_code=1, stderr="Traceback\nValueError: bad\n" + _events(("generate", 101.0))))
    assert (failed["outcome"], failed["reason"]) == ("failed", "exit 1: ValueError: bad")
    assert demo.record("x", None, measurement=replace(M, exit_code=2))["phases"] == [["start-up", 0.0, 2.95]]


# ---------------------------------------------------------------- the picture

def test_phases_take_the_colour_of_their_group() -> None:
    pytest.importorskip("matplotlib")
    from sparsemap.bench.plot import PHASE_COLOURS, phase_key

    assert phase_key("import transformers") == phase_key("import llama_cpp") == "import libraries"
    assert phase_key("import torch") == "import torch" and phase_key("tokenizer + weights") == "weights"
    assert {phase_key(p[0]) for r in _story() for p in r["phases"]} <= PHASE_COLOURS.keys()


def test_timeline_writes_the_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from sparsemap.bench.plot import timeline

    out = timeline(_story(), tmp_path / "sub" / "story.png", budget=410 * MiB, limited=True, title="a story")
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) < 300_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1500, 820)  # three panels a row, two rows (in the budget, without a limit)


def test_the_demo_module_imports_no_torch() -> None:
    code = ("import sys, sparsemap.bench.demo, sparsemap.bench.plot\n"
            "leaked = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            "assert not leaked, leaked[:5]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- the real thing

@pytest.mark.model
@pytest.mark.slow
def test_sparsemap_demo_tells_the_story(smollm2_gguf: Path, tmp_path: Path) -> None:
    """`sparsemap demo` end to end (about a minute on 2 cores): sparsemap answers Paris in its budget,
    transformers' GGUF loading does not live there, RWKV reads a measured fraction of its value rows."""
    from sparsemap.bench.cgroup import available

    png, raw = tmp_path / "demo.png", tmp_path / "demo.json"
    proc = subprocess.run([sys.executable, "-m", "sparsemap.cli", "demo", "--max-new-tokens", "24",
                           "--png", str(png), "--json", str(raw)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    told = json.loads(raw.read_text())
    runs = {(r["label"], r["limit"] is not None): r for r in told["runs"]}
    ours = runs["sparsemap", told["limited"]]
    assert ours["outcome"] == "answered" and "Paris" in ours["report"]["answer"]
    assert ours["trace"] and [p[0] for p in ours["phases"]][-2:] == ["first token", "generation"]
    if available()[0]:
        assert told["limited"] and runs["transformers", True]["outcome"] == "killed"
        assert ours["cgroup_peak"] <= told["budget"]
    assert "RWKV-7's sparse FFN read" in proc.stdout and f"picture: {png}" in proc.stdout
    assert png.read_bytes().startswith(b"\x89PNG")
