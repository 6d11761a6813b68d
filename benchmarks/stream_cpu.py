"""Streaming a 2.2 GB checkpoint into anonymous memory, cold cache, against the
disk's cold read speed (issue 7).

The checkpoint is `sparsemap bench`'s llama-1b (random bf16 weights, written
once by safetensors). Each round, interleaved so drift hits all alike, and for each way: the
file's cold sequential read speed right before the run (dropped from the page
cache, verified with mincore, then one pass of 16 MiB preads: the physical
limit), then the run, the file made cold again. The ways:
  - sparsemap.stream into anonymous memory (fresh process, file made cold
    first) with several ring sizes and reader counts, O_DIRECT chosen by its
    own short measurement;
  - the same with O_DIRECT forced off and on;
  - for comparison: sparsemap mapped + copied (materialized), and
    safetensors load_file (which maps the file too) + copied.
Each child is measured from outside (peak anonymous memory sampled every
millisecond). Reported: medians of --repeat rounds of each run's GB/s and of
its ratio to the cold read speed measured just before it.

Usage: python benchmarks/stream_cpu.py [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from sparsemap.bench import disk
from sparsemap.bench.measure import run_measured
from sparsemap.bench.runner import machine
from sparsemap.bench.synthetic import generate

HERE = Path(__file__).resolve().parent

CHILD = """
import json, sys, time
import torch, sparsemap
from sparsemap.memory import rss_anon
way, path = sys.argv[1], sys.argv[2]
ckpt = sparsemap.Checkpoint(path)
base = rss_anon()
start = time.perf_counter()
if way.startswith("stream"):
    _, staging, readers, direct = way.split(":")
    direct = {"auto": None, "on": True, "off": False}[direct]
    tensors, report = sparsemap.stream_tensors(ckpt, staging=staging, readers=int(readers), direct=direct)
    extra = {"direct": report.direct, "trial": report.trial_mb_per_s, "buffers": report.buffers}
elif way == "mapped+copy":
    tensors = {n: ckpt.tensor(n).clone() for n in ckpt}
    extra = {}
else:  # safetensors load_file (which maps the file), then every tensor copied into anonymous memory
    from safetensors.torch import load_file
    tensors = {n: t.clone() for n, t in load_file(path).items()}
    extra = {}
seconds = time.perf_counter() - start
nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
print(json.dumps({"seconds": seconds, "nbytes": nbytes, "base_anon": base, **extra}))
"""

WAYS = ["stream:256M:2:auto", "stream:256M:4:auto", "stream:64M:2:auto", "stream:256M:2:off",
        "stream:256M:2:on", "mapped+copy", "safetensors load_file+copy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=str(HERE / "results" / "stream_cpu.json"))
    args = ap.parse_args()
    path = generate("llama-1b") / "model.safetensors"
    rounds: list[dict] = []
    for r in range(args.repeat):
        row: dict = {"runs": {}}
        for way in WAYS:
            # The physical limit, measured right before this run: this virtual disk's "cold" speed
            # follows the host's cache and drifts within minutes, so each run gets its own.
            disk.make_cold(path)
            cold = disk.sequential_read_speed(path)
            cached = disk.make_cold(path)
            m = run_measured([sys.executable, "-c", CHILD, way, str(path)])
            if m.exit_code != 0:
                raise SystemExit(f"{way} failed: {m.stderr[-2000:]}")
            out = json.loads(m.stdout.strip().splitlines()[-1])
            out.update(cached_before=cached, cold_read_bytes_per_s=cold, peak_anon=m.peak_anon,
                       peak_rss=m.peak_rss, gb_per_s=out["nbytes"] / out["seconds"] / 1e9,
                       vs_cold_read=out["nbytes"] / out["seconds"] / cold,
                       anon_beyond_destination=m.peak_anon - out["base_anon"] - out["nbytes"])
            row["runs"][way] = out
            print(f"round {r + 1}: {way:26s} {out['gb_per_s']:.2f} GB/s = "
                  f"{out['vs_cold_read']:.2f} x cold read "
                  f"({cold / 1e9:.2f} GB/s just before); anon beyond destination "
                  f"{out['anon_beyond_destination'] / 2**20:+.0f} MiB", file=sys.stderr)
        rounds.append(row)
    medians = {way: {k: statistics.median(r["runs"][way][k] for r in rounds)
                     for k in ("seconds", "gb_per_s", "vs_cold_read", "anon_beyond_destination", "peak_anon",
                               "cold_read_bytes_per_s")}
               for way in WAYS}
    cold = statistics.median(r["runs"][w]["cold_read_bytes_per_s"] for r in rounds for w in WAYS)
    print(f"\n{path.name}: {rounds[0]['runs'][WAYS[0]]['nbytes'] / 1e9:.2f} GB, cold sequential pread "
          f"{cold / 1e9:.2f} GB/s (median of {args.repeat})")
    print(f"{'way':24s} {'s':>7s} {'GB/s':>6s} {'x cold read':>12s} {'anon beyond dest MiB':>21s}")
    for way, m in medians.items():
        print(f"{way:24s} {m['seconds']:7.2f} {m['gb_per_s']:6.2f} {m['vs_cold_read']:12.2f} "
              f"{m['anon_beyond_destination'] / 2**20:21.0f}")
    Path(args.json).write_text(json.dumps({"machine": machine(path, cold), "file": str(path),
                                           "rounds": rounds, "medians": medians}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
