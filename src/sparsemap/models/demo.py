"""The MiniLM demo (``sparsemap demo --model minilm``): sentence embeddings through sparsemap next to
sentence-transformers, each in a fresh process.

:func:`compare_minilm` embeds sentences both ways; each runs in its own
interpreter so that every one pays for its own imports and none inherits
another's pages. It returns a :class:`DemoResult`: the children's reports, the
text ``sparsemap demo`` prints, and whether the embeddings agreed. The analysis
(:func:`minilm_result`) takes the reports as plain dicts, so it is checked on
reports written by hand without running a model. No torch here: the children
import it.

The main demo (SmolLM2 inside a memory limit, RWKV sparse, a picture) measures
its children from outside, in memory cgroups: :mod:`sparsemap.bench.demo`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MINILM_WAYS = ("sparsemap", "sentence-transformers")  # ours, then the reference

Say = Callable[[str], None]


@dataclass(frozen=True)
class DemoResult:
    """One demo: each way's report, the text to show after the runs, and whether the ways agreed."""

    runs: dict[str, dict[str, Any]]  # way -> the child's report, in the order the ways ran
    text: str  # the phase tables, loading side by side, the verdict
    same: bool  # the embeddings agree within the tolerance


def _quiet(_line: str) -> None:
    pass


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
