"""GGUF files of other architectures through sparsemap.from_pretrained (dequantized, and with the blocks
kept quantized) against transformers' own GGUF loading (issue 15): each way in a fresh process, medians
of --repeat runs: seconds to a usable model, peak RSS and anonymous memory (the phase tracker), and how
far the logits of one prompt are from transformers'.

Usage: python benchmarks/gguf_models.py [PATH.gguf] [--repeat 3]   (default: Gemma 3 270M from the cache)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
from sparsemap import memory
way, path = sys.argv[1], sys.argv[2]
tracker = memory.PhaseTracker()
with tracker.phase("import"):
    import torch
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM
    import sparsemap
start = time.perf_counter()
with tracker.phase("load"):
    if way == "sparsemap":
        model = sparsemap.from_pretrained(path)
    elif way == "sparsemap, blocks kept":
        model = sparsemap.from_pretrained(path, keep_quantized=True)
    else:
        import os
        folder, name = os.path.split(path)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
loaded = time.perf_counter() - start
with tracker.phase("forward"), torch.inference_mode():
    logits = model(torch.tensor([[2, 818, 5279, 529, 7001, 563]])).logits[0, -1]
phases = tracker.to_dict()["phases"]
torch.save(logits, sys.argv[3])
print(json.dumps({"load_s": loaded, "peak_rss": max(p["peak_rss"] for p in phases),
                  "peak_anon": max(p["peak_anon"] for p in phases)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", nargs="?")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.path is None:
        from sparsemap.models import assets

        args.path = str(assets.fetch(assets.GEMMA3) / assets.GEMMA3.file_name)
    import tempfile

    import torch

    import sparsemap

    sparsemap.from_pretrained(args.path, keep_quantized=True)  # the repack, once, before any timed run

    runs: dict[str, list[dict]] = {"sparsemap": [], "sparsemap, blocks kept": [], "transformers": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            for way in runs:
                out = Path(tmp) / f"{way.replace(', ', '-').replace(' ', '_')}.pt"
                proc = subprocess.run([sys.executable, "-c", CHILD, way, args.path, str(out)],
                                      capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"{way} failed:\n{proc.stderr[-2000:]}")
                runs[way].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        ours, theirs = torch.load(Path(tmp) / "sparsemap.pt"), torch.load(Path(tmp) / "transformers.pt")
        kept = torch.load(Path(tmp) / "sparsemap-blocks_kept.pt")
        diff, kept_diff = (ours - theirs).abs().max(), (kept - theirs).abs().max() / theirs.abs().max()
    print(f"{Path(args.path).name}: medians of {args.repeat} fresh processes; largest logit difference "
          f"{float(diff):.2e} dequantized, {float(kept_diff):.2%} of the largest logit with blocks kept "
          "(repacked once into the cache before the first run)\n")
    print("| way | load s | peak RSS MiB | peak anon MiB |")
    print("|---|---|---|---|")
    for way, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(f"| {way} | {med['load_s']:.2f} | {med['peak_rss'] / 2**20:.0f} | "
              f"{med['peak_anon'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
