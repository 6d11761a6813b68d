"""The benchmark matrix: strategies x cache state (x memory limit), each run a fresh measured child."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import pages
from .measure import run_measured
from .strategies import unavailable

# Which files each strategy reads (to make them cold or warm beforehand).
FILES = {"naive": ["model.pt"], "torch.load mmap": ["model.pt"], "accelerate dispatch": ["sharded"],
         "transformers from_pretrained": ["sharded"]}


def _files(folder: Path, strategy: str) -> list[Path]:
    out: list[Path] = []
    for rel in FILES.get(strategy, ["model.safetensors"]):
        path = folder / rel
        out.extend(sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path])
    return out


def prepare_cache(files: Iterable[Path], state: str) -> float:
    """Make ``files`` cold (dropped, verified) or warm (read once); returns the fraction cached after."""
    fractions = []
    for f in files:
        if state == "cold":
            fractions.append(pages.make_cold(f))
        else:
            pages.sequential_read_speed(f)
            fractions.append(pages.file_cached_fraction(f))
    return statistics.mean(fractions) if fractions else 0.0


def run(folder: Path, strategies: list[str], caches: list[str], *, repeat: int = 1,
        memory_limit: int | None = None,
        on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the matrix; returns machine description, per-run results and medians."""
    nbytes = os.path.getsize(folder / "model.safetensors")
    results: list[dict[str, Any]] = []
    for i in range(repeat):
        for cache in caches:
            for name in strategies:
                reason = unavailable(name)
                if reason is not None:
                    if i == 0:
                        results.append({"strategy": name, "cache": cache, "unavailable": reason})
                        if on_result:
                            on_result(results[-1])
                    continue
                cached = prepare_cache(_files(folder, name), cache)
                m = run_measured([sys.executable, "-m", "sparsemap.bench.strategies", name, str(folder)],
                                 memory_limit=memory_limit)
                r: dict[str, Any] = {"strategy": name, "cache": cache, "run": i, "cached_before": cached,
                                     **{k: v for k, v in asdict(m).items() if k not in ("stdout", "stderr")}}
                if m.exit_code == 0:
                    r.update(json.loads(m.stdout.strip().splitlines()[-1]))
                else:
                    r["error"] = (m.stderr.strip().splitlines() or [f"exit {m.exit_code}"])[-1][-300:]
                results.append(r)
                if on_result:
                    on_result(r)
    return {"machine": machine(), "model_nbytes": nbytes, "memory_limit": memory_limit,
            "results": results, "medians": medians(results)}


def medians(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = ("usable_s", "forward_s", "wall_s", "peak_rss", "peak_anon", "peak_file", "major_faults", "read_bytes")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["strategy"], r["cache"]), []).append(r)
    out = []
    for (name, cache), rs in groups.items():
        ok = [r for r in rs if r.get("exit_code") == 0]
        row: dict[str, Any] = {"strategy": name, "cache": cache, "runs": len(ok)}
        if ok:
            row.update({k: statistics.median(r[k] for r in ok) for k in keys})
        row["oom_killed"] = any(r.get("oom_killed") for r in rs)
        row["note"] = next((r.get("unavailable") or r.get("error") for r in rs
                            if r.get("unavailable") or r.get("error")), "")
        out.append(row)
    return out


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "kernel": platform.release(), "python": platform.python_version()}
