"""SmolLM2-135M-Instruct: time to first token and peak anonymous memory, sparsemap vs transformers (issue 4).

Each way answers the same prompt in a fresh process (median of --repeat runs,
ways interleaved run by run):
  sparsemap (lean)              `sparsemap run --engine lean` on the converted folder
  sparsemap + transformers      sparsemap.from_pretrained (transformers' LlamaForCausalLM) on it
  transformers (GGUF)           AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)
"first token" counts from the start of loading (tokenizer + weights + prompt
+ first token). Peak anonymous memory is over the whole process, imports
included, sampled every 1 ms by a helper process.

Usage: python benchmarks/smollm2_ttft.py [--repeat 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = "What is the capital of France? Answer in one sentence."


def main() -> None:
    from sparsemap.models import generate, smollm2

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--json", default=str(HERE / "results" / "smollm2_ttft.json"))
    args = ap.parse_args()
    folder, gguf = smollm2.prepare(), smollm2.gguf_path(quiet=True)
    ways = {"sparsemap (lean)": ("sparsemap-lean", str(folder)),
            "sparsemap + transformers model": ("sparsemap-transformers", str(folder)),
            "transformers (GGUF)": ("transformers", str(gguf))}
    runs: dict[str, list[dict]] = {w: [] for w in ways}
    tokens: dict[str, list[int]] = {}
    for i in range(args.repeat):
        for label, (way, model) in ways.items():
            report = generate.run_child(way, model, PROMPT, args.max_new_tokens)
            runs[label].append(generate.figures(report))
            tokens[label] = report["tokens"]
            f = runs[label][-1]
            print(f"run {i + 1}/{args.repeat} {label}: first token {f['first_token_s']:.2f} s, "
                  f"peak anon {f['peak_anon'] / 2**20:.0f} MiB", file=sys.stderr)
    med = {w: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for w, rs in runs.items()}
    ref = med["transformers (GGUF)"]
    lines = ["| way | runs | load s | first token s | vs transformers | peak anon MiB | vs transformers | "
             "weights anon MiB | peak RSS MiB | tokens/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for w, m in med.items():
        lines.append(f"| {w} | {len(runs[w])} | {m['load_s']:.2f} | {m['first_token_s']:.2f} | "
                     f"{m['first_token_s'] / ref['first_token_s']:.2f}x | {m['peak_anon'] / 2**20:.0f} | "
                     f"{m['peak_anon'] / ref['peak_anon']:.2f}x | {m['weights_anon'] / 2**20:+.1f} | "
                     f"{m['peak_rss'] / 2**20:.0f} | {m['tokens_per_s']:.1f} |")
    same = len({tuple(t) for t in tokens.values()}) == 1
    lines.append("")
    lines.append(f"same greedy tokens from all three ways: {'yes' if same else 'NO'}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"prompt": PROMPT, "medians": med, "runs": runs, "tokens": tokens},
                                          indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
