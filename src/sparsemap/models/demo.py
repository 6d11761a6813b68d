"""The demo's comparisons: a real model through sparsemap next to the usual way, each in a fresh process.

:func:`compare_smollm2` answers one prompt three ways (sparsemap's lean
engine, sparsemap loading into transformers' model, transformers' own GGUF
loading); :func:`compare_minilm` embeds sentences two ways (sparsemap,
sentence-transformers). Each way runs in its own interpreter so that every
one pays for its own imports and none inherits another's pages. Both return
a :class:`DemoResult`: the children's reports, the text ``sparsemap demo``
prints, and whether the ways agreed.

The analysis (:func:`smollm2_result`, :func:`minilm_result`) takes the
reports as plain dicts, so it is checked on reports written by hand without
running a model. No torch here: the children import it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import generate

# Label -> the way `python -m sparsemap.models.generate` runs it. Order matters: the table's columns,
# and the last is the reference the ratios divide by (the usual way to load this model).
SMOLLM2_WAYS = {"sparsemap (lean)": "sparsemap-lean",
                "sparsemap + transformers model": "sparsemap-transformers",
                "transformers (GGUF)": "transformers"}
MINILM_WAYS = ("sparsemap", "sentence-transformers")  # ours, then the reference
# How the ratio caption names a reference, where a label alone would read badly.
_REFERENCE_NAMES = {"transformers (GGUF)": "transformers' GGUF loading"}

# The comparison table's rows: (title, key of generate.figures(), format, show the ratio to the reference).
# A title with "MiB" shows bytes in MiB. Ratios of a difference (weights added) or of a speed read badly.
_SMOLLM2_ROWS = (("load: tokenizer + weights, s", "load_s", "{:.2f}", True),
                 ("first token, s after loading began", "first_token_s", "{:.2f}", True),
                 ("weights: anonymous MiB added", "weights_anon", "{:+.1f}", False),
                 ("peak anonymous MiB (whole run)", "peak_anon", "{:.0f}", True),
                 ("peak RSS MiB (whole run)", "peak_rss", "{:.0f}", True),
                 ("tokens/s after the first", "tokens_per_s", "{:.1f}", False))

Say = Callable[[str], None]


@dataclass(frozen=True)
class DemoResult:
    """One demo: each way's report, the text to show after the runs, and whether the ways agreed."""

    runs: dict[str, dict[str, Any]]  # label -> the child's report, in the order the ways ran
    text: str  # answers (or embeddings) with their phase tables, the comparison, the verdict
    same: bool  # smollm2: every way generated the same tokens; minilm: embeddings within the tolerance


def _quiet(_line: str) -> None:
    pass


# ---------------------------------------------------------------- SmolLM2: one prompt, three ways

def compare_smollm2(prompt: str, max_new_tokens: int, *, on_intro: Say | None = None,
                    on_progress: Say | None = None) -> DemoResult:
    """Answer ``prompt`` with SmolLM2-135M-Instruct each way of :data:`SMOLLM2_WAYS`, in fresh processes.

    The first call fetches the GGUF and converts it (cached after). sparsemap
    loads the converted folder, transformers the GGUF itself.

    Args:
        prompt: the user's message (each way wraps it in the chat template).
        max_new_tokens: tokens to generate at most, per way.
        on_intro: called once, before the runs, with which files each way loads and the prompt.
        on_progress: called with a line as each way starts (a run takes seconds to a minute).

    Returns:
        The reports, the text (see :func:`smollm2_result`) and whether all ways gave the same tokens.

    Raises:
        RuntimeError: a child failed (its stderr's tail is in the message).

    Example:
        >>> result = compare_smollm2("Name three planets.", 20, on_progress=print)  # doctest: +SKIP
        >>> print(result.text); assert result.same
    """
    from . import smollm2

    folder = smollm2.prepare()
    gguf = smollm2.gguf_path(quiet=True)
    (on_intro or _quiet)(f"model: SmolLM2-135M-Instruct; sparsemap loads {folder}, "
                         f"transformers loads {gguf.name}\nprompt: {prompt}")
    runs = {}
    for label, way in SMOLLM2_WAYS.items():
        (on_progress or _quiet)(f"running {label} in a fresh process ...")
        model = gguf if way == "transformers" else folder
        runs[label] = generate.run_child(way, str(model), prompt, max_new_tokens)
    return smollm2_result(runs)


def smollm2_result(runs: dict[str, dict[str, Any]]) -> DemoResult:
    """The demo's analysis of answer reports (:func:`~sparsemap.models.generate.answer`'s, one per way).

    The text holds each way's answer and memory-by-phase table, then one table
    comparing load time, time to first token, memory and speed, with each
    figure's ratio to the last way's (the reference), then whether every way
    generated the same tokens (greedy decoding of the same weights should).

    Raises:
        ValueError: fewer than two reports: nothing to compare.
    """
    if len(runs) < 2:
        raise ValueError(f"a comparison needs at least two runs, got {len(runs)}: {list(runs)}")
    labels = list(runs)
    parts = []
    for label, r in runs.items():
        parts.append(f"\n{label} answers: {r['answer'].strip()}")
        parts.append(r["table"].replace("memory by phase", f"{label}: memory by phase"))
    parts.append(f"\n(ratios: against {_REFERENCE_NAMES.get(labels[-1], labels[-1])})")
    parts += _comparison_lines({label: generate.figures(r) for label, r in runs.items()})
    reference_tokens = runs[labels[-1]]["tokens"]
    same = all(r["tokens"] == reference_tokens for r in runs.values())
    everyone = {2: "both", 3: "all three"}.get(len(runs), f"all {len(runs)}")
    torch_phase = next(p for p in runs[labels[0]]["tracker"]["phases"] if p["name"] == "import torch")
    parts.append(f"\nsame tokens from {everyone}: {'yes' if same else 'NO'}. "
                 f"`import torch` alone costs {torch_phase['after']['anon'] / 2**20:.0f} "
                 "MiB anonymous in every process.")
    return DemoResult(runs=runs, text="\n".join(parts), same=same)


def _comparison_lines(figs: dict[str, dict[str, float]]) -> list[str]:
    """The comparison table, one line per figure: title left, one right-aligned column per way."""
    labels = list(figs)
    ref = figs[labels[-1]]

    def row(title: str, key: str, fmt: str, ratio: bool) -> tuple[str, ...]:
        scale = 2**20 if "MiB" in title else 1
        cells = []
        for label in labels:
            cell = fmt.format(figs[label][key] / scale)
            # A zero reference has no meaningful ratio; a real run never measures one, hand-made data might.
            if ratio and label != labels[-1] and ref[key]:
                cell += f" ({figs[label][key] / ref[key]:.2f}x)"
            cells.append(cell)
        return (title, *cells)

    rows = [("", *labels), *(row(*spec) for spec in _SMOLLM2_ROWS)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join([r[0].ljust(widths[0])] + [c.rjust(widths[i + 1]) for i, c in enumerate(r[1:])])
            for r in rows]


# ---------------------------------------------------------------- MiniLM: sentence embeddings, two ways

def compare_minilm(tolerance: float = 1e-5, *, on_intro: Say | None = None,
                   on_progress: Say | None = None) -> DemoResult:
    """Embed :data:`~sparsemap.models.minilm.SENTENCES` with all-MiniLM-L6-v2 each way of :data:`MINILM_WAYS`.

    Args:
        tolerance: the largest allowed difference between sparsemap's and sentence-transformers' embeddings.
        on_intro: called once, before the runs, with the model's folder.
        on_progress: called with a line as each way starts.

    Returns:
        The reports, the text (see :func:`minilm_result`) and whether the embeddings matched.

    Example:
        >>> assert compare_minilm(on_progress=print).same                           # doctest: +SKIP
    """
    from . import assets, minilm

    folder = assets.fetch(assets.MINILM)
    (on_intro or _quiet)(f"model: {folder}")
    runs = {}
    for way in MINILM_WAYS:
        (on_progress or _quiet)(f"running {way} in a fresh process ...")
        runs[way] = minilm.run_child(way, folder)
    return minilm_result(runs, tolerance)


def minilm_result(runs: dict[str, dict[str, Any]], tolerance: float) -> DemoResult:
    """The MiniLM demo's analysis: both phase tables, loading side by side, the largest difference.

    ``runs`` maps each of :data:`MINILM_WAYS` to its child's report (``tracker``,
    ``table``, ``embeddings``: one list of floats per sentence). Embeddings of
    different shapes never match.
    """
    ours, ref = (runs[way] for way in MINILM_WAYS)
    a, b = ours["embeddings"], ref["embeddings"]
    if len(a) == len(b) and all(len(ra) == len(rb) for ra, rb in zip(a, b, strict=True)) and a:
        diff = max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
    else:
        diff = math.inf
    same = diff <= tolerance
    parts = ["\n" + ours["table"], "\n" + ref["table"],
             "\n" + _loading_side_by_side(ours["tracker"], ref["tracker"]),
             f"\nembeddings of {len(a)} sentences: max |sparsemap - sentence-transformers| "
             f"= {diff:.2e} ({'match' if same else 'MISMATCH'}, tolerance {tolerance:g})"]
    return DemoResult(runs=runs, text="\n".join(parts), same=same)


def _loading_side_by_side(ours: dict[str, Any], ref: dict[str, Any]) -> str:
    """Model loading (tokenizer + weights) and whole-run peaks, side by side (MiB).

    Both ways have phases "import transformers", then loading (one phase or
    two), then "first forward"; loading is everything in between.
    """
    def loading(t: dict[str, Any]) -> dict[str, Any]:
        phases = t["phases"]
        names = [p["name"] for p in phases]
        first, last = names.index("import transformers") + 1, names.index("first forward")
        before, after = phases[first - 1]["after"], phases[last - 1]["after"]
        return {"time": sum(p["seconds"] for p in phases[first:last]),
                "anon": (after["anon"] - before["anon"]) / (1 << 20),
                "file": (after["file"] - before["file"]) / (1 << 20),
                "peak_anon": max(p["peak_anon"] for p in phases) / (1 << 20),
                "peak_rss": max(p["peak_rss"] for p in phases) / (1 << 20)}

    a, b = loading(ours), loading(ref)
    rows = [("tokenizer + weights", *MINILM_WAYS),
            ("  seconds", f"{a['time']:.3f}", f"{b['time']:.3f}"),
            ("  anonymous MiB added", f"{a['anon']:+.1f}", f"{b['anon']:+.1f}"),
            ("  file-backed MiB added", f"{a['file']:+.1f}", f"{b['file']:+.1f}"),
            ("whole run, peak anon MiB", f"{a['peak_anon']:.1f}", f"{b['peak_anon']:.1f}"),
            ("whole run, peak RSS MiB", f"{a['peak_rss']:.1f}", f"{b['peak_rss']:.1f}")]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0].ljust(w[0])}  {r[1].rjust(w[1])}  {r[2].rjust(w[2])}" for r in rows)
