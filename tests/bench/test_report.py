"""The benchmark's tables: terminal and Markdown show the same cells; killed and unavailable runs say why."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from sparsemap.bench import report

MiB = 1 << 20

DONE = {"strategy": "sparsemap", "cache": "cold", "limit": None, "runs": 3, "attempts": 3, "usable_s": 0.25,
        "forward_s": 0.75, "effective_gbps": 2.0, "vs_cold_read": 1.25, "peak_rss": 300 * MiB,
        "peak_anon": 100 * MiB, "anon_growth": 2 * MiB, "peak_file": 200 * MiB, "cgroup_peak": None,
        "major_faults": 12345, "read_bytes": 2048 * MiB, "oom_killed": 0, "note": ""}
KILLED = {"strategy": "naive", "cache": "cold", "limit": 512 * MiB, "runs": 0, "attempts": 2, "oom_killed": 2,
          "note": "killed by the memory limit"}
MISSING = {"strategy": "tensorizer", "cache": "cold", "limit": None, "runs": 0, "attempts": 0,
           "oom_killed": 0, "note": "pip install tensorizer | not here"}


def _report(*rows: dict[str, Any]) -> dict[str, Any]:
    return {"model": "/cache/bench/llama-1b", "model_nbytes": 2_200_000_000, "repeat": 3,
            "cold_read_bytes_per_s": 1.2e9, "medians": list(rows)}


def test_cells_of_a_completed_row() -> None:
    assert report.cells(DONE) == ["sparsemap", "cold", "none", "3/3", "0.250", "0.750", "2.00", "1.25", "300",
                                  "100", "2", "200", "", "12,345", "2,048", ""]


def test_rows_without_a_completed_run_keep_every_column_and_say_why() -> None:
    killed, missing = report.cells(KILLED), report.cells(MISSING)
    assert len(killed) == len(missing) == len(report.COLUMNS)
    assert killed[2] == "512 MiB" and killed[-1] == "OOM-killed 2/2"
    assert missing[-1] == "pip install tensorizer | not here" and set(missing[4:-1]) == {""}


def test_markdown_has_one_cell_per_column_and_escapes_pipes() -> None:
    lines = report.markdown(_report(DONE, KILLED, MISSING)).splitlines()
    assert len(lines) == 5 and lines[1] == "|" + "---|" * len(report.COLUMNS)
    assert all(line.count("|") == len(report.COLUMNS) + 1 for line in lines)
    assert "pip install tensorizer / not here" in lines[4]


def test_the_terminal_table_shows_the_same_cells_with_the_model_and_read_speed_in_its_title() -> None:
    table = report.table(_report(DONE, KILLED))
    assert [c.header for c in table.columns] == list(report.COLUMNS)
    by_column = [list(x) for x in zip(report.cells(DONE), report.cells(KILLED), strict=True)]
    assert [list(c.cells) for c in table.columns] == by_column
    assert [r.style for r in table.rows] == [None, "red"]
    console = Console(width=400, record=True)
    console.print(table)
    assert "llama-1b: 2.20 GB, medians of 3; cold sequential read 1200 MB/s" in console.export_text()
