"""The pictures: the benchmark's (:func:`plot`) and the demo's (:func:`timeline`).

:func:`timeline` draws resident memory over time, one panel per run of ``sparsemap demo``: anonymous
and file-backed stacked, the phases each process announced, the memory limit, the speed.

:func:`plot`: peak memory against time to a usable model, one point per strategy.

One panel per cell of the matrix (cache state, memory limit). Each strategy
is a filled dot at its peak anonymous memory and a hollow ring at its peak
RSS (anonymous + file-backed), joined by a line: the gap is what the page
cache carries. A strategy the memory limit killed is a cross at the limit
(the red dashed line), placed at the time it was killed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..extras import require
from .report import limit_label

MiB = 2**20


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """Write the report's medians as a PNG at ``path``; returns the path.

    Example:
        >>> report = runner.run(folder, ["sparsemap", "naive"], ["warm"])   # doctest: +SKIP
        >>> plot(report, "bench.png")                                         # doctest: +SKIP
    """
    matplotlib = require("matplotlib", needed_for="the bench's plot (--plot)")
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    rows = [r for r in report["medians"] if r["runs"] or r["oom_killed"]]
    cells = sorted({(r["limit"] is not None, r["limit"] or 0, r["cache"]) for r in rows})
    names = sorted({r["strategy"] for r in rows})
    colours = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(names)}
    fig, axes = plt.subplots(1, max(1, len(cells)), figsize=(6.2 * max(1, len(cells)), 5.4), squeeze=False)
    for ax, (_, limit, cache) in zip(axes[0], cells, strict=False):
        limit_or_none = limit or None
        for r in rows:
            if r["cache"] != cache or r["limit"] != limit_or_none:
                continue
            c = colours[r["strategy"]]
            if r["runs"]:
                x, anon, rss = r["usable_s"], r["peak_anon"] / MiB, r["peak_rss"] / MiB
                ax.plot([x, x], [anon, rss], color=c, lw=1, alpha=0.5)
                ax.scatter([x], [rss], facecolors="none", edgecolors=[c], s=60)
                ax.scatter([x], [anon], color=c, s=60)
            else:  # every run killed by the limit: a cross at the limit, at the time it was killed
                ax.scatter([r.get("wall_s") or 0.1], [limit_or_none / MiB], marker="x", color=c, s=90,
                           linewidths=2.5)
        if limit_or_none:
            ax.axhline(limit_or_none / MiB, color="red", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("time to a usable model (s, log)")
        ax.set_ylabel("peak memory (MiB): dot anonymous, ring RSS")
        ax.set_title(f"{cache} cache, memory limit {limit_label(limit_or_none)}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", ls="", color=colours[n], label=n) for n in names]
    handles.append(Line2D([], [], marker="x", ls="", color="black", markeredgewidth=2.5,
                          label="OOM-killed (x: time of the kill)"))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    gb = report["model_nbytes"] / 1e9
    fig.suptitle(f"{Path(report['model']).name}: {gb:.2f} GB; medians of {report['repeat']} "
                 f"(cold read {report['cold_read_bytes_per_s'] / 1e6:.0f} MB/s)")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


# ---------------------------------------------------------------- the demo's picture: memory over time

# One colour per phase, the same in every panel; an "import <library>" other than torch is "import libraries".
PHASE_COLOURS = {"start-up": "#d9d9d9", "import torch": "#9e9ac8", "import libraries": "#c6dbef",
                 "tokenizer": "#fdd0a2", "weights": "#fd8d3c", "first token": "#74c476",
                 "generation": "#238b45"}
ANON_COLOUR, FILE_COLOUR, LIMIT_COLOUR = "#de2d26", "#9ecae1", "#a50f15"


def phase_key(name: str) -> str:
    """The colour group of a phase name: "tokenizer + weights" (llama.cpp loads both at once) is weights."""
    if name.startswith("import ") and name != "import torch":
        return "import libraries"
    return "weights" if name == "tokenizer + weights" else name


def timeline(runs: list[dict[str, Any]], path: str | Path, *, budget: int, limited: bool,
             title: str) -> Path:
    """Resident memory over time, one panel per run, as a PNG at ``path``; returns the path.

    Each panel stacks anonymous memory (what only swap could take back) under file-backed memory (mapped
    pages the kernel can drop and re-read), sampled from outside the process; a strip above it shows the
    phases the process announced; the memory limit is a red line (dotted grey where the run had none: the
    budget, for comparison); the legend has the speed, or how the run ended. Panels share the memory axis;
    each has its own time axis. Runs with a limit form the first row, the others the second.

    ``runs`` are :func:`sparsemap.bench.demo.record` dicts; a skipped one is a panel saying why.

    Example:
        >>> timeline(told.runs, "demo.png", budget=told.budget, limited=True, title="")  # doctest: +SKIP
    """
    matplotlib = require("matplotlib", needed_for="the demo's picture")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    shown = [r for r in runs if r["outcome"] == "skipped" or r["trace"]]
    rows = [[r for r in shown if r["limit"] is not None], [r for r in shown if r["limit"] is None]]
    rows = [row for row in rows if row]
    ncols = max(len(row) for row in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(5.0 * ncols, 3.6 * len(rows) + 1.0),
                             squeeze=False, sharey=True)
    top = max((max(a + f for _, a, f in r["trace"]) for r in shown if r["trace"]), default=0)
    top = max(top, budget) / MiB * 1.12
    strips = []
    for row, panels in zip(axes, rows, strict=False):
        for ax, r in zip(row, panels, strict=False):
            if r["outcome"] == "skipped":
                _skipped(ax, r)
            else:
                strips.append((_panel(ax, r, budget=budget, top=top), r["phases"]))
        for ax in row[len(panels):]:
            ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("resident memory (MiB)")
    handles = [Patch(color=ANON_COLOUR, label="anonymous"), Patch(color=FILE_COLOUR, label="file-backed")]
    handles += [Patch(color=c, label=n) for n, c in PHASE_COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8.5, frameon=False,
               bbox_to_anchor=(0.5, 0.0), title="memory (stacked)  |  phases (the strip above each panel)",
               title_fontsize=8.5)
    fig.suptitle(title, fontsize=11)
    fig.text(0.5, 0.065, "Memory is the process's resident set (RSS); a memory limit charges what the "
             "process brings into memory, not library pages other processes already hold.", ha="center",
             fontsize=8, color="#525252")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    dpi = 100
    for strip, phases in strips:  # once the layout is final: a phase's name where its bar has room for it
        left, right = strip.get_xlim()
        width_px = strip.get_position().width * fig.get_figwidth() * dpi
        for name, start, stop in phases:
            if (stop - start) / (right - left) * width_px > 5.2 * len(name) + 6:
                strip.text((start + stop) / 2, 0.5, name, ha="center", va="center", fontsize=7.5,
                           color="white" if phase_key(name) in ("generation", "import torch") else "black")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def _panel(ax: Any, r: dict[str, Any], *, budget: int, top: float) -> Any:
    """One run: stacked memory, the phase strip, the limit, the legend with the speed or the ending.
    Returns the strip's axes."""
    from matplotlib.lines import Line2D

    t = [s[0] for s in r["trace"]]
    anon = [s[1] / MiB for s in r["trace"]]
    file = [s[2] / MiB for s in r["trace"]]
    ax.stackplot(t, anon, file, colors=[ANON_COLOUR, FILE_COLOUR], alpha=0.9, lw=0)
    end = max(t[-1], r["phases"][-1][2] if r["phases"] else 0)
    ax.set_xlim(0, end * 1.03)
    ax.set_ylim(0, top)
    ax.set_xlabel("seconds since the process started")
    ax.grid(True, axis="y", alpha=0.3)
    strip = ax.inset_axes((0, 1.01, 1, 0.1), sharex=ax)
    for name, start, stop in r["phases"]:
        strip.broken_barh([(start, max(stop - start, end * 0.004))], (0, 1),
                          color=PHASE_COLOURS.get(phase_key(name), "#bdbdbd"))
    strip.set_ylim(0, 1)
    strip.axis("off")
    handles = []
    smollm2 = not r["label"].startswith("RWKV")
    if r["limit"] is not None:
        ax.axhline(r["limit"] / MiB, color=LIMIT_COLOUR, ls="--", lw=1.6)
        handles.append(Line2D([], [], color=LIMIT_COLOUR, ls="--", label=f"limit {r['limit'] / MiB:.0f} MiB"))
    elif smollm2:
        ax.axhline(budget / MiB, color="#636363", ls=":", lw=1.4)
        handles.append(Line2D([], [], color="#636363", ls=":",
                              label=f"budget {budget / MiB:.0f} MiB (no limit here)"))
    rep = r["report"] or {}
    if r["outcome"] == "answered":
        ending = f"{rep['tokens_per_s']:.1f} tokens/s"
    elif r["outcome"] == "killed":  # a cross where it was killed, at the height it had reached
        ending = "killed by the memory limit"
        ax.plot([t[-1]], [max(a + f for a, f in zip(anon, file, strict=True))], marker="X", ms=15,
                color="black", ls="")
    else:
        ending = r["reason"]
    handles.append(Line2D([], [], ls="", label=ending))
    ax.legend(handles=handles, loc="upper left", fontsize=9, frameon=True, framealpha=0.85,
              handlelength=1.6, prop={"weight": "bold", "size": 9})
    where = f"in {r['limit'] / MiB:.0f} MiB" if r["limit"] is not None else "no limit"
    ax.set_title(f"{r['label']}, {where}", fontsize=10.5, pad=16)
    return strip


def _skipped(ax: Any, r: dict[str, Any]) -> None:
    """A way that did not run: its panel says why."""
    import textwrap

    ax.axis("off")
    where = f"in {r['limit'] / MiB:.0f} MiB" if r["limit"] is not None else "no limit"
    ax.set_title(f"{r['label']}, {where}", fontsize=10.5, y=1.11, pad=16)  # level with the others' titles
    ax.text(0.5, 0.5, "skipped:\n" + textwrap.fill(r["reason"], 34), ha="center", va="center",
            fontsize=10, color="#525252", transform=ax.transAxes,
            bbox={"boxstyle": "round", "facecolor": "#f7f7f7", "edgecolor": "#bdbdbd"})
