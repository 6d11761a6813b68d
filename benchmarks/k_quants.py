"""K-quant GGUF files (Q5_K, Q3_K, Q2_K blocks) through sparsemap.from_pretrained: dequantized, and with the
blocks kept quantized (repacked once into the cache as int8 in their own groups). Each way in a fresh
process, medians of --repeat runs, the page cache warm: seconds to a usable model, peak RSS and anonymous
memory (the phase tracker), the first forward and greedy tokens per second, and how far the kept logits
are from the dequantized ones.

The files are written from a synthetic bench model (random weights in Llama-1B's shape, `sparsemap bench`'s
llama-1b) by sparsemap.bench.gguf_writer with plain min/max scales: llama.cpp's quantizer, which searches
for better scales and mixes in Q6_K, is not on PyPI.

Usage: python benchmarks/k_quants.py [--model llama-1b] [--repeat 3] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# name -> the K-quant of the matrices whose gguf names match (the first pattern that matches); norms stay
# float32. Q5_K everywhere stands for a Q5_K_M file; the Q3_K mix follows Q3_K_M's spirit (the tensors
# llama.cpp gives more bits get Q5_K).
MIXES = {
    "Q5_K": {"*": "Q5_K"},
    "Q3_K mix": {"blk.*.attn_v.weight": "Q5_K", "blk.*.ffn_down.weight": "Q5_K", "output.weight": "Q5_K",
                 "*": "Q3_K"},
    "Q2_K mix": {"output.weight": "Q5_K", "*": "Q2_K"},
}

CHILD = r"""
import json, sys, time
from sparsemap import memory
way, path, new_tokens, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
tracker = memory.PhaseTracker()
with tracker.phase("import"):
    import torch
    import transformers  # noqa: F401
    import sparsemap
start = time.perf_counter()
with tracker.phase("load"):
    model = sparsemap.from_pretrained(path, keep_quantized=way == "blocks kept")
loaded = time.perf_counter() - start
ids = torch.arange(1, 17).view(1, 16)
with tracker.phase("forward"), torch.inference_mode():
    start = time.perf_counter()
    logits = model(ids).logits[0, -1]
    forward = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    per_token = (time.perf_counter() - start - forward) / (new_tokens - 1)
phases = tracker.to_dict()["phases"]
torch.save(logits, out)
print(json.dumps({"load_s": loaded, "forward_s": forward, "tokens_per_s": 1 / per_token,
                  "peak_rss": max(p["peak_rss"] for p in phases),
                  "peak_anon": max(p["peak_anon"] for p in phases)}))
"""
WAYS = ("dequantized", "blocks kept")


def write_files(model_name: str, folder: Path) -> dict[str, Path]:
    """The bench model written once per mix into ``folder`` (kept between runs)."""
    import sparsemap
    from sparsemap.bench import synthetic
    from sparsemap.bench.gguf_writer import write_like_llama_cpp

    source = synthetic.generate(model_name) / "sharded"
    paths = {}
    for mix, patterns in MIXES.items():
        path = folder / f"{model_name}-{mix.replace(' ', '-')}.gguf"
        if not path.is_file():
            print(f"writing {path} ...", file=sys.stderr)
            partial = path.with_suffix(".gguf.partial")
            write_like_llama_cpp(sparsemap.from_pretrained(source), partial, quantize=patterns)
            partial.rename(path)
        paths[mix] = path
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-1b", help="a synthetic bench size (default: llama-1b)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    import torch

    import sparsemap
    from sparsemap.models.assets import cache_dir

    folder = cache_dir() / "bench" / "k-quants"
    folder.mkdir(parents=True, exist_ok=True)
    paths = write_files(args.model, folder)
    for path in paths.values():
        sparsemap.from_pretrained(path, keep_quantized=True)  # the repack, once, before any timed run
    print(f"{args.model} with random weights, medians of {args.repeat} fresh processes, warm page cache\n")
    print("| file | GGUF MiB | way | load s | first forward s | tokens/s | peak RSS MiB | peak anon MiB |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for mix, path in paths.items():
            runs: dict[str, list[dict]] = {way: [] for way in WAYS}
            for _ in range(args.repeat):
                for way in WAYS:
                    out = Path(tmp) / f"{way.replace(' ', '-')}.pt"
                    proc = subprocess.run([sys.executable, "-c", CHILD, way, str(path), str(args.new_tokens),
                                           str(out)], capture_output=True, text=True)
                    if proc.returncode:
                        sys.exit(f"{mix}, {way} failed:\n{proc.stderr[-2000:]}")
                    runs[way].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            dequantized, kept = (torch.load(Path(tmp) / f"{w.replace(' ', '-')}.pt") for w in WAYS)
            gap = float((kept - dequantized).abs().max() / dequantized.abs().max())
            for way, rs in runs.items():
                med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                print(f"| {mix} | {path.stat().st_size / 2**20:,.0f} | {way} | {med['load_s']:.2f} | "
                      f"{med['forward_s']:.2f} | {med['tokens_per_s']:.1f} | "
                      f"{med['peak_rss'] / 2**20:,.0f} | {med['peak_anon'] / 2**20:,.0f} |")
            print(f"| {mix} | | kept vs dequantized: largest logit difference {gap:.2%} of the largest logit "
                  "| | | | | |")


if __name__ == "__main__":
    main()
