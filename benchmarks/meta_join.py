"""Joining Meta's model-parallel Llama files into a transformers folder: time and memory (issue 17).

A random Llama of 160 M parameters (hidden 1024, 8 layers, 16 heads, 8 KV heads, vocabulary 32000, float32)
is written as Meta's release in 2 files (``tests/format_writers.py``: Meta's names, q/k rows interleaved,
split as fairscale splits, ``torch.save``), once into the cache. Each run makes the files cold, then runs
``sparsemap convert REL OUT/`` in a fresh process, unlimited and inside memory cgroups, measured from
outside (peak anonymous, file-backed and total RSS, the cgroup's peak). A baseline child imports what the
command imports (torch, transformers, sparsemap) and nothing else.

Usage: python benchmarks/meta_join.py [--repeat 3] [--limits none,480M,400M] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MiB = 2**20
MAKE = """
import sys, torch
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from tests.format_writers import write_meta_release
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)
torch.manual_seed(0)
write_meta_release(Path(sys.argv[1]), LlamaForCausalLM(cfg), 2, multiple_of=256, ffn_dim_multiplier=None)
"""
IMPORTS = ("import torch, transformers, rich.progress, sparsemap.cli, sparsemap.models.meta_llama, "
           "sparsemap.converter; from transformers import LlamaConfig, GenerationConfig")


def main() -> None:
    from sparsemap.bench.disk import make_cold
    from sparsemap.bench.measure import run_measured
    from sparsemap.models.assets import cache_dir
    from sparsemap.units import parse_size

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--limits", default="none,480M,400M")
    ap.add_argument("--json", default=str(HERE / "results" / "meta_join.json"))
    args = ap.parse_args()

    release = cache_dir() / "bench" / "meta-llama-160m-2-files"
    if not (release / "consolidated.01.pth").is_file():
        shutil.rmtree(release, ignore_errors=True)
        subprocess.run([sys.executable, "-c", MAKE, str(release), str(HERE.parent)], check=True)
    nbytes = sum(p.stat().st_size for p in release.glob("consolidated.*.pth"))
    out = release.parent / "meta-llama-160m-joined"
    limits = [None if x == "none" else parse_size(x) for x in args.limits.split(",")]
    base = run_measured([sys.executable, "-c", IMPORTS])
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeat):
        for limit in limits:
            shutil.rmtree(out, ignore_errors=True)
            for f in release.iterdir():
                make_cold(f)
            m = run_measured([sys.executable, "-m", "sparsemap.cli", "convert", str(release), f"{out}/"],
                             memory_limit=limit, timeout_s=600)
            runs.setdefault("none" if limit is None else f"{limit // MiB} MiB", []).append(
                {"exit": m.exit_code, "oom_killed": m.oom_killed, "wall_s": m.wall_s,
                 "peak_anon": m.peak_anon, "peak_file": m.peak_file, "peak_rss": m.peak_rss,
                 "cgroup_peak": m.cgroup_peak, "stdout": m.stdout.strip()[-200:]})
    shutil.rmtree(out, ignore_errors=True)
    lines = [f"release: 2 files, {nbytes / 1e6:.0f} MB float32; largest tensor 125 MiB (embedding, head); "
             f"imports alone: {base.peak_anon / MiB:.0f} MiB anonymous, {base.peak_rss / MiB:.0f} MiB RSS",
             "", "| memory limit | runs ok | wall s | peak anon MiB | anon above the imports MiB | "
             "peak file MiB | peak RSS MiB | cgroup peak MiB |", "|---|---|---|---|---|---|---|---|"]
    for limit, rs in runs.items():
        good = [r for r in rs if r["exit"] == 0]
        oom = sum(r["oom_killed"] for r in rs)
        ok = f"{len(good)}/{len(rs)}" + (f" ({oom} OOM-killed)" if oom else "")
        if not good:
            lines.append(f"| {limit} | {ok} | - | - | - | - | - | - |")
            continue

        def med(key: str, rows: list[dict] = good) -> float:
            return statistics.median(r[key] for r in rows)

        cg = "-" if good[0]["cgroup_peak"] is None else f"{med('cgroup_peak') / MiB:.0f}"
        lines.append(f"| {limit} | {ok} | {med('wall_s'):.2f} | {med('peak_anon') / MiB:.0f} | "
                     f"{(med('peak_anon') - base.peak_anon) / MiB:.0f} | {med('peak_file') / MiB:.0f} | "
                     f"{med('peak_rss') / MiB:.0f} | {cg} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"release_nbytes": nbytes, "imports_peak_anon": base.peak_anon,
                                           "runs": runs}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
