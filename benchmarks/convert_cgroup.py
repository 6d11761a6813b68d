"""Converting a 2.2 GB checkpoint inside a 512 MiB memory cgroup (issue 3).

For each layout: make the source cold (verified with mincore), run
`sparsemap convert` in a fresh process inside a real memory cgroup, then check
outside the group that every tensor of the converted file (layout undone)
is bit-identical to the source. Time and MB/s are compared with the source's
cold sequential pread speed and the disk's durable write speed, both measured
in the same run just before each conversion (converting reads and writes the
same number of bytes, so the slower of the two bounds it).

The source is the 1.1 B-parameter bf16 Llama `sparsemap bench llama-1b` uses (generated once).

Usage:
  python benchmarks/convert_cgroup.py [--repeat 3] [--limit 512M] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

LAYOUTS = {
    "aligned": [],
    "pad-rows embed + bundle-ffn": ["--pad-rows", "*embed_tokens*", "--bundle-ffn"],
    "transpose down": ["--transpose", "*.mlp.down_proj.weight"],
}


def bit_identical(src: str, dst: str) -> tuple[bool, int]:
    """Every tensor of ``dst`` (layout undone: strided views) equals the source's; the weights hold no NaN."""
    import torch

    import sparsemap

    a, b = sparsemap.Checkpoint(src), sparsemap.Checkpoint(dst)
    if set(a) != set(b):
        return False, 0
    return all(torch.equal(a.tensor(n), b.tensor(n)) for n in a), len(a)


def main() -> None:
    from sparsemap.bench import cgroup, disk
    from sparsemap.cli import _parse_size

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--limit", default="512M")
    ap.add_argument("--json", default=str(HERE / "results" / "convert_cgroup.json"))
    args = ap.parse_args()
    limit = _parse_size(args.limit)

    ok, why = cgroup.available()
    if not ok:
        raise SystemExit(f"skipped: no memory cgroup can be created here ({why})")
    from sparsemap.bench.synthetic import generate

    src = str(generate("llama-1b") / "model.safetensors")
    dst = str(Path(src).with_name("converted.safetensors"))
    src_nbytes = os.path.getsize(src)
    results: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
    cold_reads, writes = [], []
    for i in range(args.repeat):
        for name, options in LAYOUTS.items():
            assert disk.make_cold(src) < 0.01, "could not make the source cold"
            cold_reads.append(disk.sequential_read_speed(src))
            writes.append(disk.sequential_write_speed(Path(src).parent))
            if os.path.exists(dst):
                os.unlink(dst)
            cached = disk.make_cold(src)
            with cgroup.MemoryLimit(limit) as group:
                start = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "sparsemap.cli", "convert", src, dst, *options],
                                      preexec_fn=group.enter_in_child, capture_output=True, text=True)
                seconds = time.perf_counter() - start
                peak, kills = group.peak_nbytes(), group.oom_kills()
            inner = re.search(r" in ([0-9.]+) s,", proc.stdout)
            run = {"exit": proc.returncode, "seconds": seconds,
                   "convert_s": float(inner.group(1)) if inner else None,
                   "cgroup_peak": peak, "oom_kills": kills,
                   "source_cached_before": cached, "stdout": proc.stdout.strip()[-300:],
                   "stderr": proc.stderr.strip()[-300:]}
            if proc.returncode == 0:
                run["dst_nbytes"] = os.path.getsize(dst)
                if i == 0:  # checking costs a full read of both files; once per layout is enough
                    same, n = bit_identical(src, dst)
                    run["bit_identical"], run["tensors_checked"] = same, n
            results[name].append(run)
            print(f"run {i + 1}/{args.repeat} {name}: exit {proc.returncode}, {seconds:.1f} s, "
                  f"cgroup peak {(peak or 0) / 2**20:.0f} MiB, oom kills {kills}", file=sys.stderr)
    if os.path.exists(dst):
        os.unlink(dst)

    cold, write_speed = statistics.median(cold_reads), statistics.median(writes)
    lines = [f"source: {src_nbytes / 1e9:.2f} GB bf16 safetensors; memory limit {limit / 2**20:.0f} MiB; "
             f"cold sequential pread {cold / 1e6:.0f} MB/s, durable write {write_speed / 1e6:.0f} MB/s "
             f"(medians of {len(cold_reads)}, same run)", "",
             "| layout | runs ok | wall s (incl. start-up) | convert s | MB/s | vs cold read | "
             "vs disk write | cgroup peak MiB | OOM kills | output GB | bit-identical |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for name, runs in results.items():
        good = [r for r in runs if r["exit"] == 0]
        med = statistics.median(r["seconds"] for r in good) if good else float("nan")
        inner = statistics.median(r["convert_s"] for r in good) if good else float("nan")
        mbps = src_nbytes / 1e6 / inner if good else 0.0
        checked = [r.get("bit_identical") for r in good if "bit_identical" in r]
        summary[name] = {"runs": len(runs), "ok": len(good), "median_s": med, "convert_s": inner,
                         "MBps": mbps, "ratio_to_cold_read": mbps * 1e6 / cold,
                         "ratio_to_write": mbps * 1e6 / write_speed,
                         "cgroup_peak_max": max((r["cgroup_peak"] or 0) for r in runs),
                         "oom_kills": sum(r["oom_kills"] for r in runs),
                         "bit_identical": all(checked) and bool(checked)}
        s = summary[name]
        lines.append(f"| {name} | {s['ok']}/{s['runs']} | {med:.1f} | {inner:.1f} | {mbps:.0f} | "
                     f"{s['ratio_to_cold_read']:.2f}x | {s['ratio_to_write']:.2f}x | "
                     f"{s['cgroup_peak_max'] / 2**20:.0f} | {s['oom_kills']} | "
                     f"{(good[0]['dst_nbytes'] / 1e9) if good else 0:.2f} | "
                    f"{'yes' if s['bit_identical'] else 'NO'} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"source_nbytes": src_nbytes, "limit": limit,
                                           "cold_read_Bps": cold_reads, "write_Bps": writes,
                                           "summary": summary, "runs": results}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
