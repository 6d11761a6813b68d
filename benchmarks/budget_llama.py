"""Llama shapes that do not fit their memory limit: tokens/s inside a cgroup, each representation (issue 12).

The synthetic checkpoints of `sparsemap bench` (random weights in a real shape,
bf16 safetensors) are run greedy from 16 fixed token ids, each run in a fresh
process inside a fresh memory cgroup, the weights made cold first:
  sparsemap <repr> + budget   the lean Llama, `Budget(limit=...)`: what fits stays mapped, the rest
                              streams layer by layer (read ahead, released after use)
  sparsemap <repr>            the same without a budget: the kernel's page reclaim decides
  transformers (mmap)         AutoModelForCausalLM.from_pretrained on the same safetensors file
Representations: bf16 (the file as written), int8 (`convert --quantize int8`: one scale per row),
q4_1 (`convert --quantize q4_1`: 4-bit, groups of 32), written once next to the bf16 folder.
Reported: median tokens/s after the first token, the cgroup's peak, the process's own accounting,
bytes read from disk per generated token, and the floor (bytes streamed per token / cold read speed).

Usage: python benchmarks/budget_llama.py llama-1b --limit 1000M|1.0x,0.75x,0.5x,0.25x
           [--reprs bf16,int8,q4_1] [--repeat 3]
           [--cold-libraries]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASELINE_CHILD = r"""
import torch
import sparsemap.budget, sparsemap.models.llama
from sparsemap import memory
s = memory.Snapshot.take()
print(s.anon + s.file)
"""
CHILD = r"""
import dataclasses, json, sys, time
from sparsemap import memory
way, folder, n, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
limit = None if limit == "none" else int(limit)
import torch
snap = memory.Snapshot.take()
baseline = snap.anon + snap.file
ids = list(range(1, 17))
stamps = []
budget = None
if way == "transformers":
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    class Clock(BaseStreamer):
        def put(self, value):
            stamps.append(time.perf_counter())
        def end(self):
            pass
    with torch.inference_mode():
        model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       streamer=Clock())
    stamps = stamps[1:]  # the first put is the prompt
else:
    from sparsemap.models import llama
    from sparsemap.budget import Budget
    model = llama.load(folder)
    model.shape = dataclasses.replace(model.shape, eos_token_ids=())  # random weights: run all n tokens
    if way == "budget":
        budget = Budget(model, limit=limit, baseline=baseline, max_tokens=len(ids) + n)
        print(budget.plan, file=sys.stderr)
    with torch.inference_mode():
        model.generate(ids, n, on_token=lambda t: stamps.append(time.perf_counter()))
out = {"tokens": len(stamps), "tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}
if budget is not None:
    budget.sample(every_s=0)
    p = budget.plan
    out.update(own_peak=budget.own_peak, planned=p.planned_nbytes, streamed=p.streamed_nbytes,
               resident=p.resident_nbytes)
print(json.dumps(out))
"""


def representation(folder: Path, name: str) -> Path:
    """The folder of ``name`` (bf16: the synthetic folder; int8, q4_1: converted once next to it)."""
    if name == "bf16":
        return folder
    target = folder.parent / f"{folder.name}-{name}"
    if (target / ".complete").is_file():
        return target
    from sparsemap.converter import convert
    from sparsemap.formats.planner import Layout

    target.mkdir(exist_ok=True)
    print(f"converting {folder.name} to {name} ...", file=sys.stderr)
    print(convert(folder / "model.safetensors", target / "model.sparsemap.safetensors",
                  layout=Layout(quantize=name)), file=sys.stderr)
    shutil.copyfile(folder / "config.json", target / "config.json")
    (target / ".complete").write_text(name + "\n")
    return target


def _weights(folder: Path) -> Path:
    """The weights file of a folder: quantized ones go by sparsemap's name, which other loaders skip."""
    laid_out = folder / "model.sparsemap.safetensors"
    return laid_out if laid_out.is_file() else folder / "model.safetensors"


def main() -> None:
    from sparsemap.bench import synthetic
    from sparsemap.bench.cgroup import available
    from sparsemap.bench.disk import make_cold, sequential_read_speed
    from sparsemap.bench.measure import run_measured
    from sparsemap.units import parse_size

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("size", choices=sorted(synthetic.SIZES))
    ap.add_argument("--limit", default="1000M",
                    help="limits, comma-separated: sizes (1000M) or fractions of the representation's file "
                         "plus the runtime's measured baseline (1.0x,0.75x,0.5x,0.25x)")
    ap.add_argument("--reprs", default="bf16,int8,q4_1")
    ap.add_argument("--ways", default="budget,mapped,transformers")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--cold-libraries", action="store_true",
                    help="also make torch's shared libraries cold before each run, so the run's cgroup pays "
                         "for the code pages it maps (as in a fresh container)")
    args = ap.parse_args()
    libraries: list[Path] = []
    if args.cold_libraries:
        import torch

        libraries = sorted(Path(torch.__file__).parent.joinpath("lib").glob("*.so*"))
    ok, why = available()
    if not ok:
        sys.exit(f"no memory cgroup here: {why}")
    base = synthetic.generate(args.size)
    make_cold(base / "model.safetensors")
    speed = sequential_read_speed(base / "model.safetensors")
    print(f"cold sequential read: {speed / 1e9:.2f} GB/s", file=sys.stderr)
    baseline = int(run_measured([sys.executable, "-c", BASELINE_CHILD]).stdout.split()[-1])
    print(f"runtime baseline (torch and the lean runtime): {baseline / 2**20:.0f} MiB", file=sys.stderr)
    rows = []
    for repr_name in args.reprs.split(","):
        folder = representation(base, repr_name)
        weights = _weights(folder)
        for text in args.limit.split(","):
            limit = (baseline + int(float(text[:-1]) * weights.stat().st_size) if text.endswith("x")
                     else parse_size(text))
            for way in args.ways.split(","):
                if way == "transformers" and repr_name != "bf16":
                    continue  # transformers reads the bf16 file only
                rows.append(_measure(way, repr_name, folder, limit, text, args, libraries))
    lines = [f"{args.size}, {args.max_new_tokens} tokens, cold read {speed / 1e9:.2f} GB/s, runtime baseline "
             f"{baseline / 2**20:.0f} MiB", "",
             "| representation (file) | limit | way | runs | tokens/s | cgroup peak MiB | "
             "own accounting MiB | read per token | streamed per token | floor tokens/s | outcome |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        floor = f"{speed / r['streamed']:.1f}" if r["streamed"] else "-"
        outcome = "OOM-killed" if r["oom"] else "failed" if r["failed"] else "ok"
        own = f"{r['own_peak'] / 2**20:.0f}" if r["own_peak"] else "-"
        lines.append(f"| {r['repr']} ({r['file_nbytes'] / 1e9:.2f} GB) | {r['limit_text']} = "
                     f"{r['limit'] / 2**20:.0f} MiB | {r['way']} | {r['runs']} | "
                     f"{r['tokens_per_s']:.2f} | {r['cgroup_peak'] / 2**20:.0f} | {own} | "
                     f"{r['read_per_token'] / 2**20:.0f} MiB | {r['streamed'] / 2**20:.0f} MiB | {floor} | "
                     f"{outcome} |")
    print("\n".join(lines))
    out = Path(args.json or HERE / "results" / f"budget_{args.size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "read_speed": speed, "baseline": baseline}, indent=1))


def _measure(way: str, repr_name: str, folder: Path, limit: int, limit_text: str, args: argparse.Namespace,
             libraries: list[Path]) -> dict:
    """Median figures of ``args.repeat`` runs of one way at one limit (stops at the first failure)."""
    from sparsemap.bench.disk import make_cold
    from sparsemap.bench.measure import run_measured

    weights = _weights(folder)
    runs = []
    for i in range(args.repeat):
        for path in (weights, *libraries):
            make_cold(path)
        cmd = [sys.executable, "-c", CHILD, way, str(folder), str(args.max_new_tokens), str(limit)]
        m = run_measured(cmd, memory_limit=limit, timeout_s=args.timeout)
        failed = m.exit_code != 0
        out = {} if failed else json.loads(m.stdout.strip().splitlines()[-1])
        runs.append({"tokens_per_s": out.get("tokens_per_s", 0.0), "cgroup_peak": m.cgroup_peak or 0,
                     "own_peak": out.get("own_peak", 0), "oom": m.oom_killed, "failed": failed,
                     "read_per_token": m.read_bytes / max(out.get("tokens", 1), 1),
                     "streamed": out.get("streamed", 0), "err": m.stderr[-600:] if failed else ""})
        r = runs[-1]
        print(f"{repr_name} {limit_text} {way} run {i + 1}: {r['tokens_per_s']:.2f} tokens/s, cgroup peak "
              f"{r['cgroup_peak'] / 2**20:.0f} MiB{' OOM' if r['oom'] else ''}"
              f"{' FAILED ' + r['err'] if failed and not r['oom'] else ''}", file=sys.stderr)
        if failed:
            break
    med = {k: statistics.median(r[k] for r in runs)
           for k in ("tokens_per_s", "cgroup_peak", "own_peak", "read_per_token", "streamed")}
    return {"repr": repr_name, "way": way, "limit": limit, "limit_text": limit_text,
            "file_nbytes": weights.stat().st_size, "runs": len(runs), "oom": any(r["oom"] for r in runs),
            "failed": any(r["failed"] for r in runs), **med}

if __name__ == "__main__":
    main()
