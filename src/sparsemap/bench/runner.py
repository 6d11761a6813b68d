"""The benchmark matrix: strategies x cache state x memory limit, each run a fresh measured child.

Before the matrix, the model file is made cold and read once sequentially with
large ``pread`` calls: that speed is the physical limit every strategy is
compared with (``vs_cold_read``), measured on the same file in the same run.
Limited runs always start cold: the page cache a warm file already holds is
charged to whoever read it first, not to the group, so a "warm" limited run
would hide the very memory the limit is there to count. The tables that
show a report are in :mod:`.report`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from . import cgroup, disk
from .measure import run_measured
from .report import limit_label
from .strategies import STRATEGIES, unavailable

PEER_DISTRIBUTIONS = ("sparsemap", "torch", "safetensors", "transformers", "accelerate", "fastsafetensors",
                      "runai-model-streamer", "tensorizer", "numpy")


def strategy_files(folder: Path, strategy: str) -> list[Path]:
    """The files ``strategy`` reads from ``folder`` (a folder entry stands for the files in it)."""
    out: list[Path] = []
    for rel in STRATEGIES[strategy].files:
        path = folder / rel
        out.extend(sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path])
    return out


def prepare_cache(files: Iterable[Path], state: str) -> float:
    """Make ``files`` cold (dropped, verified) or warm (read once); returns the fraction cached after."""
    fractions = []
    for f in files:
        if state == "cold":
            fractions.append(disk.make_cold(f))
        else:
            disk.sequential_read_speed(f)
            fractions.append(disk.file_cached_fraction(f))
    return statistics.mean(fractions) if fractions else 0.0


def cold_read_speed(path: Path, repeat: int = 3) -> float:
    """Median bytes/s of a cold sequential ``pread`` pass over ``path`` (each pass made cold first)."""
    speeds = []
    for _ in range(repeat):
        disk.make_cold(path)
        speeds.append(disk.sequential_read_speed(path))
    disk.make_cold(path)
    return statistics.median(speeds)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during :func:`run`. ``report`` is the report of the runs that finished (with
    ``"interrupted": {"finished": n, "planned": m}``), or ``None`` when none had."""

    def __init__(self, report: dict[str, Any] | None, finished: int, planned: int) -> None:
        super().__init__(f"interrupted after {finished} of {planned} runs")
        self.report, self.finished, self.planned = report, finished, planned


def baseline(folder: Path) -> dict[str, int]:
    """Resident bytes (``anon``, ``file``) of a fresh child that has imported what every strategy
    imports (torch, safetensors, the model's transformers class) and loaded nothing yet: measured
    the way ``sparsemap.budget`` measures a runtime, in the same kind of process the runs use."""
    import subprocess

    out = subprocess.run([sys.executable, "-m", "sparsemap.bench.strategies", "--baseline", str(folder)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        raise RuntimeError(f"measuring the runs' baseline failed: {last}")
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    return {"anon": int(doc["anon"]), "file": int(doc["file"])}


def check_limits(limits: Iterable[int | None], measured: dict[str, int]) -> None:
    """Refuse memory limits no run can live in: below what a child holds before loading any weight.

    Such a run is OOM-killed while importing, every time; the table would only say "OOM-killed".

    Raises:
        BudgetError: naming the smallest such limit and the measured numbers.
    """
    from ..errors import BudgetError
    from ..units import format_size

    floor = measured["anon"] + measured["file"]
    low = sorted(limit for limit in limits if limit is not None and limit <= floor)
    if low:
        raise BudgetError(f"a memory limit of {format_size(low[0])} is below what each run holds before "
                          f"loading any weight: {format_size(floor)} measured in a fresh interpreter "
                          f"(python, torch, safetensors, transformers: {format_size(measured['anon'])} "
                          f"anonymous + {format_size(measured['file'])} file-backed); give more than "
                          f"{format_size(floor)}, or a percentage of the model above that")


def run(folder: Path, strategies: list[str], caches: list[str], *, repeat: int = 1,
        limits: list[int | None] | None = None,
        on_progress: Callable[[str], None] | None = None,
        on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the matrix; returns machine description, per-run results and medians.

    Args:
        folder: a synthetic folder (:mod:`.synthetic`): every layout of one model.
        strategies: names from :data:`~.strategies.STRATEGIES`.
        caches: ``"cold"`` and/or ``"warm"`` for the unlimited runs.
        repeat: runs of each cell (medians are reported).
        limits: memory limits in bytes; ``None`` is unlimited. Limited runs are cold.
        on_progress: called with a line before each run.
        on_result: called with each run's result.

    Raises:
        Interrupted: on Ctrl-C, after the running child is killed; it carries the finished runs' report.
    """
    limits = limits if limits is not None else [None]
    model = folder / "model.safetensors"
    nbytes = os.path.getsize(model)
    notify = on_progress or (lambda _line: None)
    skipped_limits: dict[int, str] = {}
    if any(limit is not None for limit in limits):
        ok, why = cgroup.available()
        if not ok:
            skipped_limits = {limit: why for limit in limits if limit is not None}
    cells = [(limit, cache) for limit in limits for cache in (caches if limit is None else ["cold"])]
    total = repeat * len(cells) * len(strategies)
    planned = repeat * sum(1 for limit, _ in cells for name in strategies  # runs that will be measured
                           if unavailable(name) is None and limit not in skipped_limits)
    results: list[dict[str, Any]] = []
    read_speed = 0.0

    def report() -> dict[str, Any]:
        return {"machine": machine(model, read_speed), "model": str(folder), "model_nbytes": nbytes,
                "cold_read_bytes_per_s": read_speed, "repeat": repeat, "results": results,
                "medians": medians(results, nbytes, read_speed)}

    def emit(r: dict[str, Any]) -> None:
        results.append(r)
        if on_result:
            on_result(r)

    try:
        for name in strategies:
            strategy = STRATEGIES[name]
            if strategy.prepare is not None and unavailable(name) is None:
                notify(f"preparing {name} (once, not timed)")
                strategy.prepare(folder)
        notify("measuring the cold sequential read speed of the file")
        read_speed = cold_read_speed(model)
        done = 0
        for i in range(repeat):
            for limit, cache in cells:
                for name in strategies:
                    done += 1
                    base = {"strategy": name, "cache": cache, "limit": limit, "run": i}
                    reason = unavailable(name) or skipped_limits.get(limit)  # type: ignore[arg-type]
                    if reason is not None:
                        if i == 0:
                            emit({**base, "unavailable": reason})
                        continue
                    notify(f"[{done}/{total}] {name}, {cache} cache, limit {limit_label(limit)}")
                    emit(_measure(folder, name, cache, limit, base))
    except KeyboardInterrupt:
        # run_measured has killed the child of the run in progress; the runs that finished are kept
        # (a run counts once measured, whatever its exit code: an OOM kill is a result).
        finished = sum("exit_code" in r for r in results)
        partial = ({**report(), "interrupted": {"finished": finished, "planned": planned}}
                   if finished else None)
        raise Interrupted(partial, finished, planned) from None
    return report()


def _measure(folder: Path, name: str, cache: str, limit: int | None, base: dict[str, Any]) -> dict[str, Any]:
    """One run of strategy ``name``: its files made cold or warm, then a fresh child measured."""
    cached = prepare_cache(strategy_files(folder, name), cache)
    m = run_measured([sys.executable, "-m", "sparsemap.bench.strategies", name, str(folder)],
                     memory_limit=limit)
    r: dict[str, Any] = {**base, "cached_before": cached,
                         **{k: v for k, v in asdict(m).items() if k not in ("stdout", "stderr")}}
    if m.exit_code == 0:
        r.update(json.loads(m.stdout.strip().splitlines()[-1]))
        r["anon_growth"] = r["peak_anon"] - r["baseline_anon"]
    else:
        r["error"] = ("killed by the memory limit" if m.oom_killed else
                      (m.stderr.strip().splitlines() or [f"exit {m.exit_code}"])[-1][-300:])
    return r


MEDIAN_KEYS = ("usable_s", "forward_s", "wall_s", "peak_rss", "peak_anon", "anon_growth", "peak_file",
               "cgroup_peak", "major_faults", "read_bytes")


def medians(results: list[dict[str, Any]], model_nbytes: int, read_speed: float) -> list[dict[str, Any]]:
    """One row per (strategy, cache, limit): medians of the runs that completed.

    ``anon_growth`` is the peak anonymous memory above what the child held
    after its imports, before loading began: the loading's own cost.
    ``effective_gbps`` is the model's bytes over the time to a usable model
    plus its first forward pass: by then every strategy has read every weight
    (a mapped one reads them during that pass), so it is comparable across
    strategies. ``vs_cold_read`` divides it by the file's cold ``pread`` speed.
    """
    groups: dict[tuple[str, str, int | None], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["strategy"], r["cache"], r["limit"]), []).append(r)
    out = []
    for (name, cache, limit), rs in groups.items():
        ok = [r for r in rs if r.get("exit_code") == 0]
        row: dict[str, Any] = {"strategy": name, "cache": cache, "limit": limit, "runs": len(ok),
                               "attempts": sum("exit_code" in r for r in rs)}
        if ok:
            for k in MEDIAN_KEYS:
                values = [r[k] for r in ok if r.get(k) is not None]
                row[k] = statistics.median(values) if values else None
            seconds = row["usable_s"] + row["forward_s"]
            row["effective_gbps"] = model_nbytes / seconds / 1e9
            row["vs_cold_read"] = model_nbytes / seconds / read_speed
        elif any("wall_s" in r for r in rs):  # every run failed: how long until it was killed
            row["wall_s"] = statistics.median(r["wall_s"] for r in rs if "wall_s" in r)
        row["oom_killed"] = sum(bool(r.get("oom_killed")) for r in rs)
        row["note"] = next((r.get("unavailable") or r.get("error") for r in rs
                            if r.get("unavailable") or r.get("error")), "")
        out.append(row)
    return out


def _versions() -> dict[str, str]:
    out = {}
    for dist in PEER_DISTRIBUTIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _filesystem(path: Path) -> str:
    """The mount (device and type) ``path`` lives on, from /proc/self/mounts."""
    best = ("", "?", "?")
    target = str(path.resolve())
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                dev, mount, fstype = line.split()[:3]
                if ((target == mount or target.startswith(mount.rstrip("/") + "/"))
                        and len(mount) > len(best[0])):
                    best = (mount, dev, fstype)
    except OSError:
        pass
    return f"{best[1]} ({best[2]}) at {best[0]}"


def machine(model: Path | None = None, read_speed: float | None = None) -> dict[str, Any]:
    """Cores, RAM, kernel, CPU, the file's filesystem and cold read speed, and library versions."""
    out: dict[str, Any] = {
        "cpus": os.cpu_count(), "cpu": _cpu_model(),
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "kernel": platform.release(), "python": platform.python_version(), "versions": _versions(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if model is not None:
        out["filesystem"] = _filesystem(model)
    if read_speed is not None:
        out["cold_read_mb_per_s"] = round(read_speed / 1e6, 1)
    return out

