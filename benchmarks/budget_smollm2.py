"""SmolLM2-135M-Instruct answering inside a memory limit: tokens/s against the limit (issue 12).

Each run answers the same prompt (greedy, --max-new-tokens) in a fresh
process inside a fresh memory cgroup, the model files made cold first:
  sparsemap (int4/int8 mapped)   `sparsemap run`'s lean engine on the GGUF's blocks repacked for
                                 torch's int4/int8 kernels (smollm2.prepare_quantized)
  sparsemap (float32 mapped)     the same model dequantized once to float32 (smollm2.prepare)
  llama.cpp                      llama-cpp-python on the same Q4_1 GGUF, mmap, 2 threads (the `llama`
                                 extra, or --llama-python: an interpreter that has it; skipped if neither)
Limits run from unlimited down; a way stops at the first limit where it is
killed or times out. Reported: median tokens/s after the first token, the
cgroup's peak, bytes read from disk per generated token (ru_inblock), OOM kills.

Usage: python benchmarks/budget_smollm2.py [--repeat 3] [--limits none,400M,300M,...]
           [--llama-python /path/to/python] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = "Write a haiku about memory."
LLAMA_CHILD = r"""
import json, sys, time
from llama_cpp import Llama
path, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.perf_counter()
llm = Llama(model_path=path, n_threads=2, n_ctx=512, use_mmap=True, verbose=False)
load = time.perf_counter() - t0
stamps = []
for chunk in llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=n,
                                        temperature=0.0, stream=True):
    if chunk["choices"][0]["delta"].get("content"):
        stamps.append(time.perf_counter())
rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
print(json.dumps({"tokens_per_s": rate, "load_s": load, "tokens": len(stamps)}))
"""


def _sparsemap_cmd(folder: Path, n: int) -> list[str]:
    return [sys.executable, "-m", "sparsemap.models.generate", "sparsemap-lean", str(folder), PROMPT, str(n)]


def main() -> None:
    from sparsemap.bench.cgroup import available
    from sparsemap.bench.disk import make_cold
    from sparsemap.bench.measure import run_measured
    from sparsemap.models import smollm2
    from sparsemap.units import parse_size

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--limits", default="none,600M,400M,300M,200M,150M,120M,100M,80M")
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds before a run counts as failed")
    ap.add_argument("--llama-python", default=None,
                    help="an interpreter with llama_cpp installed (default: this one, if it has it)")
    ap.add_argument("--ways", default="int4,float32,llama.cpp",
                    help="which ways to run, by a word of their label")
    ap.add_argument("--json", default=str(HERE / "results" / "budget_smollm2.json"))
    args = ap.parse_args()
    ok, why = available()
    if not ok:
        sys.exit(f"no memory cgroup here: {why}")
    quantized, floats, gguf = smollm2.prepare_quantized(), smollm2.prepare(), smollm2.gguf_path(quiet=True)
    ways: dict[str, tuple[list[str], list[Path]]] = {
        "sparsemap (int4/int8 mapped)": (_sparsemap_cmd(quantized, args.max_new_tokens),
                                         [quantized / "model.sparsemap.safetensors"]),
        "sparsemap (float32 mapped)": (_sparsemap_cmd(floats, args.max_new_tokens),
                                       [floats / "model.safetensors"]),
    }
    if args.llama_python is None and importlib.util.find_spec("llama_cpp") is not None:
        args.llama_python = sys.executable  # the benchmark extra: pip install -e '.[llama]'
    if args.llama_python:
        ways["llama.cpp (llama-cpp-python)"] = ([args.llama_python, "-c", LLAMA_CHILD, str(gguf), PROMPT,
                                                 str(args.max_new_tokens)], [gguf])
    else:
        print("llama.cpp: skipped (no --llama-python given)", file=sys.stderr)
    ways = {label: way for label, way in ways.items() if any(w in label for w in args.ways.split(","))}
    limits = [None if x == "none" else parse_size(x) for x in args.limits.split(",")]
    rows = []
    for label, (cmd, files) in ways.items():
        for limit in limits:
            runs = []
            for i in range(args.repeat):
                for f in files:
                    make_cold(f)
                m = run_measured(cmd, memory_limit=limit, timeout_s=args.timeout)
                failed = m.exit_code != 0
                report = {} if failed else json.loads(m.stdout.strip().splitlines()[-1])
                tokens = len(report.get("tokens", [])) if isinstance(report.get("tokens"), list) \
                    else report.get("tokens", 0)
                runs.append({"tokens_per_s": report.get("tokens_per_s", 0.0), "oom": m.oom_killed,
                             "failed": failed, "cgroup_peak": m.cgroup_peak or m.peak_rss,
                             "peak_anon": m.peak_anon, "read_per_token": m.read_bytes / max(tokens, 1)})
                shown = "limit " + (f"{limit >> 20} MiB" if limit else "none")
                outcome = " (OOM-killed)" if m.oom_killed else " (failed)" if failed else ""
                print(f"{label}, {shown}, run {i + 1}: {runs[-1]['tokens_per_s']:.1f} tokens/s{outcome}",
                      file=sys.stderr)
                if failed:
                    break
            med = {k: statistics.median(r[k] for r in runs) for k in ("tokens_per_s", "cgroup_peak",
                                                                         "peak_anon", "read_per_token")}
            rows.append({"way": label, "limit": limit, "runs": len(runs), "oom": any(r["oom"] for r in runs),
                         "failed": any(r["failed"] for r in runs), **med})
            if rows[-1]["failed"]:
                break  # lower limits will not do better
    lines = ["| way | limit | runs | tokens/s (median) | cgroup peak MiB | peak anon MiB | "
             "read from disk per token | outcome |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        limit = f"{r['limit'] >> 20} MiB" if r["limit"] else "none"
        outcome = "OOM-killed" if r["oom"] else "failed or timed out" if r["failed"] else "ok"
        lines.append(f"| {r['way']} | {limit} | {r['runs']} | {r['tokens_per_s']:.1f} | "
                     f"{r['cgroup_peak'] / 2**20:.0f} | {r['peak_anon'] / 2**20:.0f} | "
                     f"{r['read_per_token'] / 2**20:.2f} MiB | {outcome} |")
    print("\n".join(lines))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "prompt": PROMPT,
                                           "max_new_tokens": args.max_new_tokens}, indent=1))


if __name__ == "__main__":
    main()
