"""RWKV-7 with sparsemap against the reference runtime, and the sparse channel mix's figures (issue 13).

Part 1, the 0.1 B shape (12 layers, 768 wide, a 65,536 vocabulary, random weights written by
torch.save as BlinkDL's releases are): each way answers one prompt in a fresh process, measured
phase by phase (import torch, the runtime, tokenizer, weights, generate) with sparsemap's tracker:
  sparsemap       `sparsemap run` (RwkvEngine: mapped weights, World tokenizer, sparse channel mix)
  rwkv package    rwkv.model.RWKV(strategy="cpu fp32") and rwkv.utils.PIPELINE's World tokenizer
Median of --repeat runs of: time to first token (from the start of loading), tokens/s after it,
anonymous memory the weights add, peak anonymous and peak RSS of the whole run.

Part 2, the sparse channel mix on a trained model (rwkv.cpp's tiny RWKV-7, byte-level; give its
path): over a text, per layer, the fraction of FFN neurons active per token; the value bytes a
token reads, dense against sparse, counted from the pages present after each token (pagemap) with
value stored transposed (one neuron a row, `convert --transpose`); tokens/s dense and sparse.

Usage: python benchmarks/rwkv.py [--repeat 3] [--tiny ../shared/models/tiny-rwkv/tiny-rwkv-7v0-834K-FP32.bin]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = "Write a haiku about memory."
REFERENCE = r"""
import json, os, sys, time
os.environ["RWKV_V7_ON"] = "1"
os.environ["RWKV_JIT_ON"] = "0"
from sparsemap import memory
path, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
tracker = memory.PhaseTracker()
with tracker.phase("import torch"):
    import torch
with tracker.phase("import rwkv"):
    from rwkv.model import RWKV
    from rwkv.utils import PIPELINE
start = time.perf_counter()
with tracker.phase("weights"):
    model = RWKV(model=path[:-len(".pth")], strategy="cpu fp32")
with tracker.phase("tokenizer"):
    pipeline = PIPELINE(model, "rwkv_vocab_v20230424")
stamps = []
with tracker.phase("generate"):
    ids = pipeline.encode(f"User: {prompt}\n\nAssistant:")
    logits, state = model.forward(ids, None)
    for _ in range(n):
        token = int(torch.argmax(logits))
        stamps.append(time.perf_counter())
        logits, state = model.forward([token], state)
phases = {p["name"]: p for p in tracker.to_dict()["phases"]}
rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
print(json.dumps({"first_token_s": stamps[0] - start, "tokens_per_s": rate, "tracker": tracker.to_dict()}))
"""


def _phase_figures(tracker: dict) -> dict[str, float]:
    phases = tracker["phases"]
    names = [p["name"] for p in phases]
    before = phases[names.index("weights") - 1]["after"]
    return {"weights_anon": phases[names.index("weights")]["after"]["anon"] - before["anon"],
            "peak_anon": max(p["peak_anon"] for p in phases), "peak_rss": max(p["peak_rss"] for p in phases)}


def part1(repeat: int, new_tokens: int) -> list[str]:
    from sparsemap.bench.rwkv_synthetic import prepare_0_1b
    from sparsemap.models import generate

    path, laid = prepare_0_1b()  # the big matrices stored (in, out) in laid: the layout a vector-matrix
    # product streams (written and converted on first use, cached)
    files = {"sparsemap (.pth as released)": path, "sparsemap (matrices stored transposed)": laid}
    runs: dict[str, list[dict]] = {**{way: [] for way in files}, "rwkv package": []}
    for i in range(repeat):
        for way, file in files.items():
            report = generate.run_child("sparsemap", str(file), PROMPT, new_tokens)
            figures = _phase_figures(report["tracker"])
            runs[way].append({"first_token_s": report["first_token_s"],
                              "tokens_per_s": report["tokens_per_s"], **figures})
        import subprocess

        proc = subprocess.run([sys.executable, "-c", REFERENCE, str(path), PROMPT, str(new_tokens)],
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"rwkv package run failed:\n{proc.stderr[-2000:]}")
        ref = json.loads(proc.stdout.strip().splitlines()[-1])
        runs["rwkv package"].append({"first_token_s": ref["first_token_s"],
                                     "tokens_per_s": ref["tokens_per_s"], **_phase_figures(ref["tracker"])})
        for way, r in runs.items():
            last = r[-1]
            print(f"run {i + 1} {way}: first token {last['first_token_s']:.2f} s, {last['tokens_per_s']:.1f} "
                  f"tokens/s, peak anon {last['peak_anon'] / 2**20:.0f} MiB", file=sys.stderr)
    med = {w: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for w, rs in runs.items()}
    ref = med["rwkv package"]
    lines = [f"0.1 B-shaped RWKV-7 ({path.stat().st_size / 1e6:.0f} MB .pth), {new_tokens} tokens, "
             f"medians of {repeat}", "",
             "| way | first token s | tokens/s | vs rwkv | weights anon MiB | peak anon MiB | vs rwkv | "
             "peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    for w, m in med.items():
        lines.append(f"| {w} | {m['first_token_s']:.2f} | {m['tokens_per_s']:.1f} | "
                     f"{m['tokens_per_s'] / ref['tokens_per_s']:.2f}x | {m['weights_anon'] / 2**20:+.1f} | "
                     f"{m['peak_anon'] / 2**20:.0f} | {m['peak_anon'] / ref['peak_anon']:.2f}x | "
                     f"{m['peak_rss'] / 2**20:.0f} |")
    return lines


def part2(tiny: Path, text: bytes) -> list[str]:
    import tempfile

    import torch

    from sparsemap import pages
    from sparsemap.converter import convert
    from sparsemap.formats.planner import Layout
    from sparsemap.models import rwkv

    with tempfile.TemporaryDirectory() as tmp:
        laid = Path(tmp) / "transposed.safetensors"
        convert(rwkv.pytorch_view(__import__("sparsemap").open(tiny)), laid,
                layout=Layout(transpose="*ffn.value.weight"))
        lines = []
        touched: dict[str, list[int]] = {}
        speed: dict[str, float] = {}
        for way in ("dense", "sparse"):
            model = rwkv.load(laid, sparse=way == "sparse")
            values = [b.ffn.value.weight.t() for b in model.blocks]  # (F, C) rows, views of the mapping
            spans = [pages.pages_covering(v.data_ptr(), v.data_ptr() + v.numel() * v.element_size())
                     for v in values]
            model.count_active(way == "sparse")
            state, per_token = None, []
            for byte in text:
                for first, last in spans:  # every value page out, so each token's reads show
                    pages.release(first, last - first)
                _, state = model([byte], state)
                per_token.append(sum(int(pages.present_in_process(first, last - first).sum())
                                     for first, last in spans) * pages.PAGE_SIZE)
            touched[way] = per_token
            counts = model.count_active(False)
            if way == "sparse":
                ffn = model.shape.ffn_size
                fractions = [sum(c) / len(c) / ffn for c in counts]
                by_layer = ", ".join(f"{f:.1%}" for f in fractions)
                mean = statistics.mean(fractions)
                lines.append(f"active neurons per token, by layer: {by_layer} (mean {mean:.1%}, "
                             f"{len(text)} tokens)")
            state = None
            start = time.perf_counter()
            with torch.inference_mode():
                for byte in text[:256]:
                    _, state = model([byte], state)
            speed[way] = min(256, len(text)) / (time.perf_counter() - start)
        row = model.blocks[0].ffn.value.weight.t()
        row_nbytes = row.shape[1] * row.element_size()
        dense, sparse = statistics.mean(touched["dense"]), statistics.mean(touched["sparse"])
        lines += [f"value bytes read per token (pages present after the token, all layers): dense "
                  f"{dense / 1024:.1f} KiB, sparse {sparse / 1024:.1f} KiB ({1 - sparse / dense:.1%} fewer); "
                  f"a value row is {row_nbytes} bytes, so a {pages.PAGE_SIZE}-byte page holds "
                  f"{pages.PAGE_SIZE // row_nbytes} neurons",
                  f"tokens/s (one token at a time, 256 tokens): dense {speed['dense']:.0f}, "
                  f"sparse {speed['sparse']:.0f}"]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--tiny", default=str(HERE.parent.parent / "shared" / "models" / "tiny-rwkv" /
                                          "tiny-rwkv-7v0-834K-FP32.bin"))
    ap.add_argument("--skip-part1", action="store_true")
    args = ap.parse_args()
    lines = [] if args.skip_part1 else part1(args.repeat, args.max_new_tokens)
    tiny = Path(args.tiny)
    if tiny.is_file():
        text = (HERE.parent / "README.md").read_bytes()[:2000]
        lines += ["", f"sparse channel mix on {tiny.name}, over the first {len(text)} bytes of README.md:"]
        lines += part2(tiny, text)
    else:
        lines.append(f"(part 2 skipped: no {tiny})")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
