"""Streaming a 2.2 GB checkpoint onto a GPU with 256 MiB of staging, against the peers (issue 7).

Needs a CUDA device; exits with the reason where there is none. Each round,
interleaved: the file's cold sequential pread speed and the host-to-device
bandwidth of one pinned 256 MiB buffer (the two limits), then, each in a
fresh process with the file made cold first:
  - sparsemap.stream_tensors(device="cuda:0", staging="256M", readers=K);
  - safetensors.torch.load_file(device="cuda:0");
  - torch.load(mmap=True) then every tensor .to("cuda:0");
  - fastsafetensors' fastsafe_open(device="cuda:0", nogds=True), where installed.
Reported: seconds to tensors on the device (synchronized), GB/s, the ratio to
min(cold read, host-to-device), and peak host anonymous memory.

Usage: python benchmarks/stream_gpu.py [--repeat 3] [--readers 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = """
import json, sys, time
import torch
way, path, pt, readers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.cuda.init()
torch.empty(1, device="cuda:0")  # context created before the clock
start = time.perf_counter()
if way == "sparsemap stream":
    import sparsemap
    tensors, report = sparsemap.stream_tensors(sparsemap.open(path), device="cuda:0", staging="256M",
                                               readers=readers)
elif way == "safetensors load_file":
    from safetensors.torch import load_file
    tensors = load_file(path, device="cuda:0")
elif way == "torch.load mmap + .to":
    tensors = {n: t.to("cuda:0") for n, t in torch.load(pt, mmap=True, weights_only=True).items()}
else:
    from fastsafetensors import fastsafe_open
    with fastsafe_open(path, device="cuda:0", nogds=True) as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118 - no __iter__
torch.cuda.synchronize()
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "nbytes": sum(t.numel() * t.element_size() for t in tensors.values())}))
"""


def host_to_device_bandwidth() -> float:
    import torch

    buf = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(buf, device="cuda:0")
    dev.copy_(buf, non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(8):
        dev.copy_(buf, non_blocking=True)
    torch.cuda.synchronize()
    return 8 * buf.numel() / (time.perf_counter() - start)


def main() -> None:
    import torch

    from sparsemap.bench import disk
    from sparsemap.bench.measure import run_measured
    from sparsemap.bench.runner import machine
    from sparsemap.bench.synthetic import generate

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--readers", type=int, default=4)
    ap.add_argument("--json", default=str(HERE / "results" / "stream_gpu.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("skipped: no CUDA device here (torch.cuda.is_available() is False)")
    folder = generate("llama-1b")
    path, pt = folder / "model.safetensors", folder / "model.pt"
    ways = ["sparsemap stream", "safetensors load_file", "torch.load mmap + .to"]
    if importlib.util.find_spec("fastsafetensors"):
        ways.append("fastsafetensors")
    rounds = []
    for r in range(args.repeat):
        disk.make_cold(path)
        read_speed = disk.sequential_read_speed(path)
        h2d = host_to_device_bandwidth()
        limit = min(read_speed, h2d)
        row = {"disk_bytes_per_s": read_speed, "h2d_bytes_per_s": h2d, "runs": {}}
        for way in ways:
            disk.make_cold(pt if way.startswith("torch") else path)
            m = run_measured([sys.executable, "-c", CHILD, way, str(path), str(pt), str(args.readers)])
            if m.exit_code != 0:
                row["runs"][way] = {"error": m.stderr[-1000:]}
                continue
            out = json.loads(m.stdout.strip().splitlines()[-1])
            out.update(peak_anon=m.peak_anon, gb_per_s=out["nbytes"] / out["seconds"] / 1e9,
                       vs_limit=out["nbytes"] / out["seconds"] / limit)
            row["runs"][way] = out
            print(f"round {r + 1}: {way:24s} {out['seconds']:.2f} s {out['gb_per_s']:.2f} GB/s "
                  f"= {out['vs_limit']:.2f} x min(disk {read_speed / 1e9:.2f}, h2d {h2d / 1e9:.2f} GB/s); "
                  f"peak host anon {m.peak_anon / 2**20:.0f} MiB", file=sys.stderr)
        rounds.append(row)
    medians = {w: {k: statistics.median(r["runs"][w][k] for r in rounds if k in r["runs"][w])
                   for k in ("seconds", "gb_per_s", "vs_limit", "peak_anon")}
               for w in ways if all("seconds" in r["runs"][w] for r in rounds)}
    for w, m in medians.items():
        print(f"{w:24s} {m['seconds']:6.2f} s {m['gb_per_s']:5.2f} GB/s {m['vs_limit']:5.2f} x limit "
              f"{m['peak_anon'] / 2**20:7.0f} MiB host anon")
    Path(args.json).write_text(json.dumps({"machine": {**machine(path), "gpu": torch.cuda.get_device_name(0)},
                                           "rounds": rounds, "medians": medians}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
