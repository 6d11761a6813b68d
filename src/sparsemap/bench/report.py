"""The benchmark's tables: one median row per (strategy, cache, limit), for a terminal or for Markdown.

Both tables are built from the same :func:`cells`, so the numbers a terminal
shows are the numbers a RESULTS file records. The input is the report
:func:`sparsemap.bench.runner.run` returns (or the JSON ``sparsemap bench
--json`` wrote). No torch here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from rich.table import Table

COLUMNS = ("strategy", "cache", "limit", "runs", "usable s", "forward s", "GB/s", "x cold read",
           "peak RSS MiB", "peak anon MiB", "anon growth MiB", "peak file MiB", "cgroup peak MiB",
           "major faults", "read MiB", "note")
_LEFT = ("strategy", "cache", "limit", "note")  # text columns; the numbers are right-aligned


def limit_label(limit: int | None) -> str:
    """A memory limit as people read it: ``"none"`` or ``"512 MiB"``."""
    return "none" if limit is None else f"{limit / 2**20:.0f} MiB"


def cells(row: dict[str, Any]) -> list[str]:
    """One median row as the strings of :data:`COLUMNS` (the terminal table and Markdown share them)."""

    def mib(v: float | None) -> str:
        return "" if v is None else f"{v / 2**20:,.0f}"

    killed = f"OOM-killed {row['oom_killed']}/{row['attempts']}" if row["oom_killed"] else ""
    out = [row["strategy"], row["cache"], limit_label(row["limit"]), f"{row['runs']}/{row['attempts']}"]
    if not row["runs"]:  # no run completed: nothing to measure, only why
        return [*out, *[""] * (len(COLUMNS) - len(out) - 1), killed or row["note"]]
    return [*out, f"{row['usable_s']:.3f}", f"{row['forward_s']:.3f}", f"{row['effective_gbps']:.2f}",
            f"{row['vs_cold_read']:.2f}", mib(row["peak_rss"]), mib(row["peak_anon"]),
            mib(row["anon_growth"]), mib(row["peak_file"]), mib(row["cgroup_peak"]),
            f"{row['major_faults']:,.0f}", mib(row["read_bytes"]), killed or row["note"]]


def markdown(report: dict[str, Any]) -> str:
    """The medians as a Markdown table (for RESULTS files and issue threads)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in cells(r)) + " |" for r in report["medians"]]
    return "\n".join(lines) + "\n"


def table(report: dict[str, Any]) -> Table:
    """The medians as a rich table titled with the model, its size and the file's cold read speed.

    A row where no run completed is red when the memory limit killed it, dim
    when the strategy could not run here.

    Example:
        >>> from rich.console import Console                              # doctest: +SKIP
        >>> Console().print(table(json.loads(Path("r.json").read_text())))
    """
    from rich.table import Table  # here, not above: runner and plot import this module and draw nothing

    gb = report["model_nbytes"] / 1e9
    stopped = report.get("interrupted")  # Ctrl-C: the runs that finished, of those planned
    out = Table(title=f"{Path(report['model']).name}: {gb:.2f} GB, medians of {report['repeat']}; "
                      f"cold sequential read {report['cold_read_bytes_per_s'] / 1e6:.0f} MB/s"
                      + (f"; interrupted after {stopped['finished']} of {stopped['planned']} runs"
                         if stopped else ""))
    for col in COLUMNS:
        out.add_column(col, justify="left" if col in _LEFT else "right")
    for row in report["medians"]:
        style = None if row["runs"] else ("red" if row["oom_killed"] else "dim")
        out.add_row(*cells(row), style=style)
    return out
