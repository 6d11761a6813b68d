"""The main job's story (``sparsemap demo``): a model answering inside a memory limit, RWKV sparse, a picture.

1. SmolLM2-135M-Instruct answers one prompt with sparsemap (the GGUF's
   quantized blocks, mapped) without a limit. Its own peak RSS, + 10%, sets
   the budget (:func:`pick_budget`): every page it touched fits, so it keeps
   its full speed there.
2. Inside that budget, a real memory cgroup, each way answers the same prompt
   in a fresh process, its model file made cold first (page cache is charged
   to the group that first reads it): sparsemap, transformers' own GGUF
   loading, and llama.cpp when ``llama_cpp`` (llama-cpp-python) is importable.
   A way the kernel kills is reported as killed by the memory limit, with the
   phase it was in and the peak it reached. transformers then answers once
   without a limit: the reference answer, and what it needs. Where no cgroup
   can be made, every way runs once without a limit, and the text says so.
3. An RWKV-7 in the 0.1 B shape (random weights, :mod:`.rwkv_synthetic`)
   answers with the sparse channel mix, which multiplies only the value rows
   of the neurons a token activates; the report has the fraction it read.

Every run is measured from outside (:func:`~.measure.run_measured`: anonymous
and file-backed memory over time, peaks, the cgroup's peak) and announces its
phases as they begin, so a killed run still shows where it was. The analysis
(:func:`story_result`) takes the run records as plain dicts, so it is checked
on records written by hand. No torch here: the children import it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..extras import install_hint
from ..models import generate
from .report import limit_label

MiB = 1 << 20
Say = Callable[[str], None]
TIMEOUT_S = 240.0  # a run still going after this is stopped and reported as such (thrashing)
TRACE_EVERY_S = 0.02  # the picture's resolution; the peaks use every 1 ms sample
MARGIN_PERCENT = 10  # the budget over sparsemap's own peak RSS
ROUND_NBYTES = 10 * MiB
BUSY = 0.10  # above this share of the CPUs taken by other work during the runs, the text warns

# Label -> what it runs, as the intro says it.
WAYS = {
    "sparsemap": "the GGUF's Q4_1/Q8_0 blocks, repacked once for torch's int4/int8 kernels, mapped",
    "transformers": "its own GGUF loading (every tensor dequantized into memory)",
    "llama.cpp": "llama-cpp-python on the same GGUF (mmap, 2 threads)",
    "RWKV-7 sparse": "RWKV-7 in the 0.1 B shape (random weights), the sparse channel mix",
}

# llama.cpp's child: the same protocol as `python -m sparsemap.models.generate` (phases announced on
# stderr as they begin, the report as JSON on the last line of stdout). Chat template from the GGUF, greedy.
LLAMA_CHILD = r"""
import json, sys, time
path, prompt, n, event = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
def phase(name):
    print(event + json.dumps({"name": name, "at": time.monotonic()}), file=sys.stderr, flush=True)
phase("import llama_cpp")
from llama_cpp import Llama
phase("tokenizer + weights")
t0 = time.perf_counter()
llm = Llama(model_path=path, n_threads=2, n_ctx=512, use_mmap=True, verbose=False)
phase("generate")
t1 = time.perf_counter()
stamps, pieces = [], []
for chunk in llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=n,
                                        temperature=0.0, stream=True):
    piece = chunk["choices"][0]["delta"].get("content")
    if piece:
        stamps.append(time.perf_counter())
        pieces.append(piece)
end = time.perf_counter()
rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
print(json.dumps({"answer": "".join(pieces), "new_tokens": len(stamps), "tokens_per_s": rate,
                  "first_token_s": (stamps[0] if stamps else end) - t0, "load_s": t1 - t0,
                  "generate_s": end - t1}))
"""


@dataclass(frozen=True)
class StoryResult:
    """The demo: each run's record (see :func:`record`), the budget, the text to show, and the verdict."""

    runs: list[dict[str, Any]]  # in the order they ran; skipped ways included
    budget: int  # bytes
    limited: bool  # the limited runs ran inside a memory cgroup (else: no limit anywhere)
    text: str  # the answers, the comparison table, the RWKV line
    ok: bool  # sparsemap answered (inside the budget, where there is one), with transformers' tokens
    busy: float | None = None  # the share of the CPUs other work took during the runs (OtherWork)

    def to_dict(self) -> dict[str, Any]:
        """Everything measured, for ``--json``."""
        return {"budget": self.budget, "limited": self.limited, "ok": self.ok, "busy": self.busy,
                "runs": self.runs}


def _quiet(_line: str) -> None:
    pass


class OtherWork:
    """The share of the CPUs that processes other than this one and its children took since it was made.

    All CPUs' busy time comes from ``/proc/stat``; this process tree's own from :func:`os.times` (a child's
    time counts once it has been waited for, and its own children's once it waited for them). Speeds
    measured while other work runs are not the machine's: on 2 cores, torch's threads wait for each other
    whenever one is descheduled.

    Example:
        >>> other = OtherWork()                                          # doctest: +SKIP
        >>> run_the_children()                                           # doctest: +SKIP
        >>> other.fraction()                                             # doctest: +SKIP
        0.03
    """

    def __init__(self) -> None:
        self.start = self._now()

    @staticmethod
    def _now() -> tuple[float, float, float] | None:
        """(all CPUs' busy seconds, this process tree's CPU seconds, time.monotonic()), or None."""
        import os
        import time

        try:
            with open("/proc/stat", "rb") as f:
                # user, nice, system, idle, iowait, irq, softirq (in clock ticks)
                fields = [int(x) for x in f.readline().split()[1:8]]
            busy_s = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None
        t = os.times()
        return busy_s, t.user + t.system + t.children_user + t.children_system, time.monotonic()

    def fraction(self) -> float | None:
        """Other work's share of all CPUs' time since this was made (0 to 1), or None where not known."""
        import os

        now = self._now()
        if self.start is None or now is None or now[2] <= self.start[2]:
            return None
        other_s = (now[0] - self.start[0]) - (now[1] - self.start[1])
        return min(max(other_s / ((now[2] - self.start[2]) * (os.cpu_count() or 1)), 0.0), 1.0)


def pick_budget(peak_rss: int) -> int:
    """The memory limit the limited runs get: sparsemap's peak RSS without a limit, + 10%, rounded up to
    10 MiB. Every page it held at its peak fits, with room for the cgroup's page cache of the files it
    reads (clean pages the kernel reclaims first), so it needs to re-read nothing.

    Example:
        >>> pick_budget(364 << 20) >> 20
        410
    """
    needed = peak_rss + peak_rss * MARGIN_PERCENT // 100  # integers: 100 MiB gives exactly 110 MiB
    return -(-needed // ROUND_NBYTES) * ROUND_NBYTES


# ---------------------------------------------------------------- one run, measured from outside

def record(label: str, limit: int | None, *, measurement: Any = None, skipped: str = "",
           timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
    """A run as the analysis and the picture read it (plain data, JSON as it is).

    Keys: ``label``, ``limit`` (bytes or None), ``outcome`` ("answered", "killed" by the memory limit,
    "timed out", "failed", "skipped"), ``reason`` (why skipped or failed), ``report`` (the child's JSON
    or None), ``wall_s``, ``peak_anon``, ``peak_file``, ``peak_rss``, ``cgroup_peak`` (bytes or None),
    ``trace`` ([seconds, anon, file] rows), ``phases`` ([name, start s, end s] rows, from the child's
    announcements; "start-up" before the first, "first token" and "generation" split from "generate"
    by the report).
    """
    if measurement is None:
        return {"label": label, "limit": limit, "outcome": "skipped", "reason": skipped, "report": None,
                "wall_s": 0.0, "peak_anon": 0, "peak_file": 0, "peak_rss": 0, "cgroup_peak": None,
                "trace": [], "phases": []}
    m = measurement
    report = None
    if m.exit_code == 0:
        outcome, reason = "answered", ""
        report = json.loads(m.stdout.strip().splitlines()[-1])
    elif m.oom_killed:
        outcome, reason = "killed", "killed by the memory limit"
    elif m.exit_code == -9 and m.wall_s >= timeout_s:
        outcome, reason = "timed out", f"stopped after {timeout_s:.0f} s"
    else:
        outcome = "failed"
        tail = generate.without_events(m.stderr).strip().splitlines()
        reason = f"exit {m.exit_code}: {tail[-1] if tail else 'no message'}"
    trace = [[round(t, 4), anon, file] for t, anon, file in m.trace]
    end = trace[-1][0] if trace else m.wall_s
    starts = [(name, at - m.started) for name, at in generate.phase_events(m.stderr)]
    return {"label": label, "limit": limit, "outcome": outcome, "reason": reason, "report": report,
            "wall_s": m.wall_s, "peak_anon": m.peak_anon, "peak_file": m.peak_file, "peak_rss": m.peak_rss,
            "cgroup_peak": m.cgroup_peak, "trace": trace, "phases": phase_spans(starts, report, end)}


def phase_spans(starts: list[tuple[str, float]], report: dict[str, Any] | None,
                end_s: float) -> list[list[Any]]:
    """``[name, start s, end s]`` of each phase: "start-up" (the interpreter and sparsemap's imports)
    before the first announced one, each announced one until the next, and "generate" split into
    "first token" (the prompt and the first token) and "generation" where the report says when the first
    token came (``first_token_s``, counted from the start of loading) and how long generating took.

    Example:
        >>> phase_spans([("import torch", 0.1), ("tokenizer", 1.0), ("weights", 1.1), ("generate", 1.2)],
        ...             {"first_token_s": 0.3, "tracker": {"phases": [{"name": "generate", "seconds": 0.5}]}},
        ...             2.0)                                           # doctest: +NORMALIZE_WHITESPACE
        [['start-up', 0.0, 0.1], ['import torch', 0.1, 1.0], ['tokenizer', 1.0, 1.1], ['weights', 1.1, 1.2],
         ['first token', 1.2, 1.3], ['generation', 1.3, 1.7]]
    """
    if not starts:
        return [["start-up", 0.0, end_s]]
    spans = [["start-up", 0.0, starts[0][1]]]
    for (name, at), nxt in zip(starts, [*starts[1:], (None, end_s)], strict=True):
        spans.append([name, at, nxt[1]])
    last = spans[-1]
    if report is not None and last[0] == "generate":
        names = [s[0] for s in spans]
        load = next((n for n in ("tokenizer", "tokenizer + weights") if n in names), None)
        generate_s = report.get("generate_s")
        if generate_s is None:
            generate_s = next((p["seconds"] for p in report.get("tracker", {}).get("phases", [])
                               if p["name"] == "generate"), None)
        if load is not None and generate_s is not None:
            first = spans[names.index(load)][1] + report["first_token_s"]
            stop = last[1] + generate_s
            first = min(max(first, last[1]), stop)
            spans[-1:] = [["first token", last[1], first], ["generation", first, stop]]
    return [[name, round(a, 4), round(b, 4)] for name, a, b in spans]


def _measure(label: str, cmd: list[str], limit: int | None, cold: list[Path], *,
             on_progress: Say) -> dict[str, Any]:
    from .disk import make_cold
    from .measure import run_measured

    if limit is not None:
        for path in cold:
            make_cold(path)
    where = f"in {limit_label(limit)}" if limit is not None else "without a limit"
    on_progress(f"running {label} {where}, in a fresh process ...")
    env = {**_child_env(), "TOKENIZERS_PARALLELISM": "false"}
    m = run_measured(cmd, memory_limit=limit, timeout_s=TIMEOUT_S, env=env, trace_every_s=TRACE_EVERY_S)
    return record(label, limit, measurement=m)


def _child_env() -> dict[str, str]:
    import os

    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _generate_cmd(way: str, model: Path, prompt: str, max_new_tokens: int) -> list[str]:
    return [sys.executable, "-m", "sparsemap.models.generate", way, str(model), prompt, str(max_new_tokens)]


# ---------------------------------------------------------------- the story

def run_story(prompt: str, max_new_tokens: int, *, memory_limit: int | None = None,
              on_intro: Say | None = None, on_progress: Say | None = None) -> StoryResult:
    """Run the demo (module docstring): SmolLM2 each way, in and out of the budget, then RWKV sparse.

    Args:
        prompt: the user's message (each way applies SmolLM2's chat template).
        max_new_tokens: tokens to generate at most, per run (greedy).
        memory_limit: the budget in bytes; default :func:`pick_budget` of sparsemap's own peak RSS.
        on_intro: hears, once, what each way runs and the prompt, then the budget.
        on_progress: hears a line as each run starts.

    Returns:
        The runs and their analysis (:func:`story_result`).

    Example:
        >>> result = run_story("Name three planets.", 32, on_intro=print)   # doctest: +SKIP
        >>> print(result.text); assert result.ok                            # doctest: +SKIP
    """
    from ..models import smollm2
    from .cgroup import available
    from .rwkv_synthetic import paths_0_1b

    say, progress = on_intro or _quiet, on_progress or _quiet
    other = OtherWork()
    folder = smollm2.prepare_quantized()
    gguf = smollm2.gguf_path(quiet=True)
    weights = folder / "model.sparsemap.safetensors"
    has_llama = importlib.util.find_spec("llama_cpp") is not None
    lines = [f"SmolLM2-135M-Instruct ({gguf.stat().st_size / 1e6:.0f} MB GGUF) answers \"{prompt}\", "
             f"greedy, each way in a fresh process:"]
    width = max(map(len, WAYS))
    for label, what in WAYS.items():
        if label == "llama.cpp" and not has_llama:
            what = f"skipped: llama-cpp-python is not installed ({install_hint('llama_cpp')})"
        lines.append(f"  {label.ljust(width)}  {what}")
    say("\n".join(lines))

    runs = [_measure("sparsemap", _generate_cmd("sparsemap-lean", folder, prompt, max_new_tokens), None,
                     [weights], on_progress=progress)]
    if runs[0]["outcome"] != "answered":
        raise RuntimeError(f"sparsemap did not answer without a limit ({runs[0]['reason']})")
    budget = memory_limit if memory_limit is not None else pick_budget(runs[0]["peak_rss"])
    limited, why_not = available()
    how = "as asked" if memory_limit is not None else (
        f"sparsemap's own peak RSS without a limit ({runs[0]['peak_rss'] / MiB:.0f} MiB) "
        f"+ {MARGIN_PERCENT}%, rounded up to {ROUND_NBYTES // MiB} MiB")
    if limited:
        say(f"budget: {limit_label(budget)}, {how}. Each limited run is in a memory cgroup of that size, "
            "its model file made cold first.")
    else:
        say(f"budget: {limit_label(budget)}, {how}. No memory cgroup can be made here ({why_not}): "
            "every way runs without a limit, and the picture draws the budget as a line.")
    limit = budget if limited else None
    llama = [sys.executable, "-c", LLAMA_CHILD, str(gguf), prompt, str(max_new_tokens), generate.PHASE_EVENT]
    if limited:
        runs.append(_measure("sparsemap", _generate_cmd("sparsemap-lean", folder, prompt, max_new_tokens),
                             limit, [weights], on_progress=progress))
    runs.append(_measure("transformers", _generate_cmd("transformers", gguf, prompt, max_new_tokens),
                         limit, [gguf], on_progress=progress))
    if has_llama:
        runs.append(_measure("llama.cpp", llama, limit, [gguf], on_progress=progress))
    else:
        runs.append(record("llama.cpp", limit, skipped=f"llama-cpp-python is not installed "
                                                       f"({install_hint('llama_cpp')})"))
    if limited:  # the reference answer, and what the usual way needs
        runs.append(_measure("transformers", _generate_cmd("transformers", gguf, prompt, max_new_tokens),
                             None, [], on_progress=progress))
    rwkv = paths_0_1b()[1]
    if not rwkv.is_file():
        progress("writing the 0.1 B-shaped RWKV-7 (random weights, 749 MB, once) ...")
        import subprocess

        subprocess.run([sys.executable, "-m", "sparsemap.bench.rwkv_synthetic"], check=True,
                       stdout=subprocess.DEVNULL)
    runs.append(_measure("RWKV-7 sparse", _generate_cmd("rwkv-sparse", rwkv, prompt, max_new_tokens), None,
                         [], on_progress=progress))
    return story_result(runs, budget=budget, limited=limited, busy=other.fraction())


# ---------------------------------------------------------------- the analysis

_COLUMNS = ("way", "limit", "outcome", "tokens/s", "1st token s", "peak anon", "peak RSS", "cgroup peak")


def story_result(runs: list[dict[str, Any]], *, budget: int, limited: bool,
                 busy: float | None = None) -> StoryResult:
    """The text of the demo from its run records (:func:`record`): the answers, one table, the RWKV line.

    ``busy``: the share of the CPUs other work took during the runs; above :data:`BUSY` the text says so.

    ``ok``: sparsemap answered inside the budget (without a limit where ``limited`` is false) and, where
    transformers answered without a limit, with the same tokens (greedy decoding of the same weights;
    sparsemap's int4/int8 kernels round activations to bf16, which has not changed a token here).

    Raises:
        ValueError: no sparsemap run among ``runs``.
    """
    ours = [r for r in runs if r["label"] == "sparsemap"]
    if not ours:
        raise ValueError(f"no sparsemap run among {[r['label'] for r in runs]}")
    in_budget = next((r for r in ours if r["limit"] is not None), ours[0])
    reference = next((r for r in runs if r["label"] == "transformers" and r["limit"] is None
                      and r["outcome"] == "answered"), None)
    parts = [""]
    for r in runs:
        if r["outcome"] != "answered" or (r["label"] == "sparsemap" and r is not in_budget):
            continue
        where = f"in {limit_label(r['limit'])}" if r["limit"] is not None else "without a limit"
        text = _one_line(r["report"]["answer"])
        if r["label"] == "RWKV-7 sparse":
            parts.append(f"{r['label']} answers: \"{_clip(text, 80)}\" (gibberish, as random weights give)")
        else:
            parts.append(f"{r['label']} answers {where}: {text}")
    parts += ["", *_table(runs), ""]
    answered = in_budget["outcome"] == "answered"
    parts += _verdicts(runs, in_budget)
    same = None
    if answered and reference is not None:
        same = in_budget["report"]["tokens"] == reference["report"]["tokens"]
        parts.append(f"Same tokens from sparsemap and transformers: {'yes' if same else 'NO'}.")
    rwkv = next((r for r in runs if r["label"] == "RWKV-7 sparse" and r["outcome"] == "answered"), None)
    if rwkv is not None and "rows_read" in rwkv["report"]:
        parts.append(rows_line(rwkv["report"]["rows_read"], rwkv["report"]["prompt_tokens"]))
    if busy is not None and busy > BUSY:
        parts.append(f"(Other work took {busy:.0%} of the CPUs during these runs: the speeds are lower than "
                     "this machine's own.)")
    ok = answered and (in_budget["limit"] is not None or not limited) and same is not False
    return StoryResult(runs=runs, budget=budget, limited=limited, text="\n".join(parts), ok=ok, busy=busy)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


def rows_line(rows_read: dict[str, Any], prompt_tokens: int) -> str:
    """What the sparse channel mix read: the mean fraction of value rows a generated token multiplied,
    over layers and tokens, and the prompt's (its tokens run as one step: the rows any of them uses).

    Example:
        >>> print(rows_line({"ffn_size": 4, "layers": 2, "per_layer": [[4, 2, 1], [3, 2, 3]]}, 5))
        ...                                                            # doctest: +NORMALIZE_WHITESPACE
        RWKV-7's sparse FFN read 50.0% of its value rows per token (2 of 4 a layer, mean over 2 layers
        and 2 tokens; the prompt's 5 tokens together: 87.5%).
    """
    ffn, per_layer = rows_read["ffn_size"], rows_read["per_layer"]
    steps = [c for layer in per_layer for c in layer[1:]]
    prompt = [layer[0] for layer in per_layer if layer]
    if not steps:
        return "RWKV-7's sparse FFN ran no step after the prompt: no fraction per token to report."
    mean = sum(steps) / len(steps)
    tokens = len(per_layer[0]) - 1
    return (f"RWKV-7's sparse FFN read {mean / ffn:.1%} of its value rows per token ({mean:,.0f} of {ffn:,} "
            f"a layer, mean over {len(per_layer)} layers and {tokens} tokens; the prompt's {prompt_tokens} "
            f"tokens together: {sum(prompt) / len(prompt) / ffn:.1%}).")


def _verdicts(runs: list[dict[str, Any]], in_budget: dict[str, Any]) -> list[str]:
    """What happened in the budget, one sentence a way: speed against the same way without a limit, or
    how and where (phase, time) the run ended."""
    lines = []
    for r in runs:
        if r["limit"] is None or r["outcome"] == "skipped":
            continue
        where = f"In {limit_label(r['limit'])}"
        if r["outcome"] == "answered":
            alone = next((f for f in runs if f["label"] == r["label"] and f["limit"] is None
                          and f["outcome"] == "answered"), None)
            rate = r["report"]["tokens_per_s"]
            speed = alone["report"]["tokens_per_s"] if alone is not None else 0
            ratio = f", {rate / speed:.2f}x its speed without a limit" if speed else ""
            lines.append(f"{where} {r['label']} answered at {rate:.1f} tokens/s{ratio}.")
        else:
            during = f" during {r['phases'][-1][0]!r}" if r["phases"] else ""
            peak = f" (peak {r['cgroup_peak'] / MiB:.0f} MiB)" if r["cgroup_peak"] else ""
            lines.append(f"{where} {r['label']} was {r['reason']}{peak}{during}, {r['wall_s']:.1f} s in.")
    if in_budget["outcome"] != "answered" and in_budget["limit"] is None:
        lines.append(f"sparsemap did not answer: {in_budget['reason']}.")
    return lines


def _table(runs: list[dict[str, Any]]) -> list[str]:
    """One line per run: outcome, speed, first token (s from the start of loading), peaks in MiB. Figures
    a run did not reach are "-"."""
    def mib(n: int | None) -> str:
        return f"{n / MiB:.0f}" if n else "-"

    rows = [_COLUMNS]
    for r in runs:
        rep = r["report"] or {}
        outcome = {"answered": "answered",
                   "skipped": f"skipped: {r['reason']}"}.get(r["outcome"], r["reason"])
        answered = r["outcome"] == "answered"
        rows.append((r["label"], limit_label(r["limit"]), outcome,
                     f"{rep['tokens_per_s']:.1f}" if answered else "-",
                     f"{rep['first_token_s']:.2f}" if answered else "-",
                     mib(r["peak_anon"]), mib(r["peak_rss"]), mib(r["cgroup_peak"])))
    skipped = [r for r in rows[1:] if r[2].startswith("skipped")]
    measured = [r for r in rows if not r[2].startswith("skipped")]
    widths = [max(len(r[i]) for r in measured) for i in range(len(_COLUMNS))]
    left = (0, 1, 2)
    lines = []
    for r in measured:
        lines.append("  ".join(c.ljust(w) if i in left else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())
    # A skipped way says why on one line of its own: no column holds a reason that long.
    lines += [f"{r[0].ljust(widths[0])}  {r[1].ljust(widths[1])}  {r[2]}" for r in skipped]
    return [*lines, "(peaks in MiB, sampled from outside each process; 1st token: seconds from the start "
                    "of loading)"]


def write_json(result: StoryResult, path: str | Path) -> Path:
    """The raw figures (every run's record, traces included) as JSON at ``path``."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result.to_dict(), indent=1))
    return out
