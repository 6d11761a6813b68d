"""The picture of issue 12's budget benchmarks: tokens/s against the memory limit.

Left: SmolLM2-135M-Instruct, one line per way (sparsemap with the GGUF's
blocks kept, sparsemap dequantized to float32, llama.cpp), tokens/s (log
scale) against the cgroup's limit, an OOM kill marked with a cross. Right:
the Llama shapes in their limit (llama-1b in 1000 MB, llama-3b in 1.5 GB),
one bar per representation and way.

Usage: python benchmarks/plot_budget.py [--out benchmarks/budget.png]
Reads results/budget_smollm2.json, results/budget_smollm2_float32.json,
results/budget_llama-1b.json (its int8/q4_1 budget rows replaced by
results/budget_llama-1b-after-fix.json when present) and results/budget_llama-3b.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MiB = 2**20


def _rows(name: str) -> list[dict]:
    path = RESULTS / name
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE / "budget.png"))
    args = ap.parse_args()

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [1.1, 1]})
    smol = _rows("budget_smollm2.json") + _rows("budget_smollm2_float32.json")
    unlimited_x = 1000  # where "no limit" is drawn, MiB
    palette = {"int4": "tab:blue", "float32": "tab:purple", "llama.cpp": "tab:orange"}
    for way in dict.fromkeys(r["way"] for r in smol):
        rows = [r for r in smol if r["way"] == way]
        xs = [r["limit"] / MiB if r["limit"] else unlimited_x for r in rows if not r["oom"]]
        ys = [max(r["tokens_per_s"], 0.1) for r in rows if not r["oom"]]
        color = next((c for key, c in palette.items() if key in way), None)
        (line,) = left.plot(xs, ys, marker="o", label=way, color=color)
        for r in rows:
            if r["oom"]:
                left.plot(r["limit"] / MiB, 0.1, marker="x", markersize=12, color=line.get_color())
    left.set_xscale("log")
    left.set_yscale("log")
    ticks = [80, 100, 120, 150, 200, 300, 400, 600, unlimited_x]
    left.set_xticks(ticks, [str(t) for t in ticks[:-1]] + ["none"])
    left.minorticks_off()
    left.invert_xaxis()
    left.set_xlabel("memory cgroup limit, MiB (cold files; x = OOM-killed)")
    left.set_ylabel("tokens/s after the first (median of 3)")
    left.set_title("SmolLM2-135M-Instruct Q4_1, 48 greedy tokens, 2 cores")
    left.grid(True, which="both", alpha=0.3)
    left.legend(loc="lower left", fontsize=9)

    llama = _rows("budget_llama-1b.json")
    fixed = {(r["repr"], r["way"]): r for r in _rows("budget_llama-1b-after-fix.json")}
    llama = [fixed.get((r["repr"], r["way"]), r) for r in llama]
    bars = [("llama-1b / 1000 MB", r) for r in llama] + [("llama-3b / 1500 MB", r)
                                                          for r in _rows("budget_llama-3b.json")]
    labels = [f"{size}\n{r['repr']} {r['way']}" for size, r in bars]
    colors = {"budget": "tab:green", "mapped": "tab:gray", "transformers": "tab:red"}
    ys = [r["tokens_per_s"] for _, r in bars]
    right.barh(range(len(bars)), ys, color=[colors.get(r["way"], "tab:blue") for _, r in bars])
    for i, (_, r) in enumerate(bars):
        right.text(r["tokens_per_s"] * 1.1, i, f"{r['tokens_per_s']:.2f}", va="center", fontsize=8)
    right.set_yticks(range(len(bars)), labels, fontsize=7)
    right.invert_yaxis()
    right.set_xscale("log")
    right.set_xlabel("tokens/s after the first (log)")
    from matplotlib.patches import Patch

    right.legend(handles=[Patch(color=c, label=label) for label, c in (
        ("sparsemap, budget", colors["budget"]), ("sparsemap, mapped, no budget", colors["mapped"]),
        ("transformers (mmap)", colors["transformers"]))], loc="lower right", fontsize=8)
    right.set_title("Llama shapes that do not fit their limit (random weights)")
    right.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
