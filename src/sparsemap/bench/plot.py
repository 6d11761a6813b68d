"""The benchmark's picture: peak memory against time to a usable model, one point per strategy.

One panel per cell of the matrix (cache state, memory limit). Each strategy
is a filled dot at its peak anonymous memory and a hollow ring at its peak
RSS (anonymous + file-backed), joined by a line: the gap is what the page
cache carries. A strategy the memory limit killed is a cross at the limit
(the red dashed line), placed at the time it was killed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .report import limit_label

MiB = 2**20


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """Write the report's medians as a PNG at ``path``; returns the path.

    Example:
        >>> report = runner.run(folder, ["sparsemap", "naive"], ["warm"])   # doctest: +SKIP
        >>> plot(report, "bench.png")                                         # doctest: +SKIP
    """
    import matplotlib

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
