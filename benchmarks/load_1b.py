"""Loading a ~1 B-parameter bf16 Llama checkpoint: sparsemap against the usual ways.

Each strategy runs in a fresh process on a warm page cache and records, per
phase (imports, build the model, load the weights, first forward), wall time,
RSS, anonymous and file-backed memory and their peaks (see sparsemap.memory).
The checkpoint is random weights in TinyLlama-1.1B's shape, written once by the
real writers (safetensors.torch.save_file, torch.save) into the cache folder.

Figures reported (median of --repeat runs):
  usable s      build + load: time until the model can run a forward pass
  forward s     one 16-token forward pass (every weight page is touched)
  anon growth   peak anonymous memory during build + load, minus anonymous
                memory after the imports
  peak RSS      over the whole run

Usage:
  python benchmarks/load_1b.py [--repeat 5] [--json out.json] [--strategies a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
              num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
              tie_word_embeddings=False)

STRATEGIES = {
    # name: (checkpoint suffix, one-line description)
    "sparsemap (safetensors)": ("safetensors", "sparsemap.load(factory, file)"),
    "safetensors load_file": ("safetensors", "meta + safetensors.torch.load_file + load_state_dict(assign=True)"),
    "sparsemap (.pt)": ("pt", "sparsemap.load(factory, file)"),
    "torch.load mmap": ("pt", "meta + torch.load(mmap=True, weights_only=True) + load_state_dict(assign=True)"),
    "naive": ("pt", "random init + torch.load + load_state_dict"),
}


def checkpoint_paths() -> dict[str, Path]:
    from sparsemap.models.assets import cache_dir

    folder = cache_dir() / "bench" / "llama-1b-bf16"
    return {"safetensors": folder / "model.safetensors", "pt": folder / "model.pt", "config": folder}


def generate() -> dict[str, Path]:
    """Write the random checkpoint once (both formats)."""
    paths = checkpoint_paths()
    if paths["safetensors"].exists() and paths["pt"].exists():
        return paths
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    import sparsemap

    paths["config"].mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**CONFIG)
    config.save_pretrained(paths["config"])
    with sparsemap.skeleton():
        model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, p in model.state_dict().items():
        # Small values keep activations finite in the forward pass.
        state[name] = (torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)
    n = sum(t.numel() for t in state.values())
    print(f"generating {n / 1e9:.2f} B parameters ({n * 2 / 1e9:.2f} GB bf16) in {paths['config']}",
          file=sys.stderr)
    for key, write in (("safetensors", lambda p: save_file(state, p)), ("pt", lambda p: torch.save(state, p))):
        tmp = paths[key].with_suffix(".tmp")
        write(str(tmp))
        os.replace(tmp, paths[key])
    return paths


# ---------------------------------------------------------------- the child

def child(strategy: str, path: str, config_dir: str) -> dict:
    from sparsemap.memory import PhaseTracker

    tracker = PhaseTracker()
    with tracker.phase("imports"):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        import sparsemap
        config = LlamaConfig.from_pretrained(config_dir)
    factory = lambda: LlamaForCausalLM(config)  # noqa: E731

    if strategy.startswith("sparsemap"):
        with tracker.phase("build"):
            with sparsemap.skeleton():
                model = factory()
        with tracker.phase("load"):
            sparsemap.load(model, path)
    elif strategy == "safetensors load_file":
        from safetensors.torch import load_file

        with tracker.phase("build"):
            with sparsemap.skeleton():  # same meta builder as ours: only loading differs
                model = factory()
        with tracker.phase("load"):
            model.load_state_dict(load_file(path), assign=True)
    elif strategy == "torch.load mmap":
        with tracker.phase("build"):
            with sparsemap.skeleton():
                model = factory()
        with tracker.phase("load"):
            model.load_state_dict(torch.load(path, mmap=True, weights_only=True), assign=True)
    elif strategy == "naive":
        with tracker.phase("build"):
            model = factory()  # random init in memory
        with tracker.phase("load"):
            model.load_state_dict(torch.load(path, weights_only=True))
    else:
        raise SystemExit(f"unknown strategy {strategy!r}")
    model.eval()
    with tracker.phase("first forward"):
        with torch.inference_mode():
            model(torch.arange(16).unsqueeze(0)).logits.float().sum().item()
    return tracker.to_dict()


def figures(t: dict) -> dict:
    phases = {p["name"]: p for p in t["phases"]}
    base_anon = phases["imports"]["after"]["anon"]
    return {
        "usable_s": phases["build"]["seconds"] + phases["load"]["seconds"],
        "load_s": phases["load"]["seconds"],
        "forward_s": phases["first forward"]["seconds"],
        "anon_growth": max(phases["build"]["peak_anon"], phases["load"]["peak_anon"]) - base_anon,
        "peak_anon": max(p["peak_anon"] for p in t["phases"]),
        "peak_rss": max(p["peak_rss"] for p in t["phases"]),
        "after_load_file": phases["load"]["after"]["file"],
    }


def run_child(strategy: str, path: Path, config_dir: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", strategy, str(path), str(config_dir)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return figures(json.loads(proc.stdout.strip().splitlines()[-1]))


def warm(path: Path) -> float:
    """Read the file once (page cache warm); returns GB/s of that read."""
    start, n = time.perf_counter(), 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(64 << 20):
            n += len(chunk)
    return n / (time.perf_counter() - start) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--naive-repeat", type=int, default=1, help="runs of the slow naive strategy")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--json", default=str(HERE / "results" / "load_1b.json"))
    args = ap.parse_args()
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return

    paths = generate()
    strategies = [s.strip() for s in args.strategies.split(",")]
    model_nbytes = paths["safetensors"].stat().st_size
    for k in ("safetensors", "pt"):
        warm(paths[k])
    reads = {k: warm(paths[k]) for k in ("safetensors", "pt")}  # now from the page cache
    runs: dict[str, list[dict]] = {s: [] for s in strategies}
    # Interleave strategies so drift on a shared machine hits all of them alike.
    for i in range(args.repeat):
        for s in strategies:
            if s == "naive" and i >= args.naive_repeat:
                continue
            suffix = STRATEGIES[s][0]
            warm(paths[suffix])
            r = run_child(s, paths[suffix], paths["config"])
            runs[s].append(r)
            print(f"run {i + 1}/{args.repeat} {s}: " + (r.get("error") or
                  f"usable {r['usable_s']:.3f} s, anon +{r['anon_growth'] / 2**20:.1f} MiB"), file=sys.stderr)

    medians = {}
    for s, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if ok:
            medians[s] = {k: statistics.median(r[k] for r in ok) for k in ok[0]} | {"runs": len(ok)}
        else:
            medians[s] = {"error": rs[0]["error"] if rs else "not run"}
    report = {
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                    "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
        "model_nbytes": model_nbytes, "warm_read_GBps": reads, "medians": medians, "runs": runs,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(markdown(report))


def markdown(report: dict) -> str:
    m = report["medians"]
    size = report["model_nbytes"]
    ref = m.get("safetensors load_file", {}).get("usable_s")
    lines = [f"checkpoint: {size / 1e9:.2f} GB bf16; warm read {report['warm_read_GBps']['safetensors']:.1f} GB/s",
             "",
             "| strategy | runs | usable s | vs load_file | load s | load vs load_file | first forward s | "
             "anon growth MiB | anon growth % of model | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    ref_load = m.get("safetensors load_file", {}).get("load_s")
    for s, r in m.items():
        if "error" in r:
            lines.append(f"| {s} | 0 | {r['error']} |")
            continue
        ratio = f"{r['usable_s'] / ref:.2f}x" if ref else ""
        load_ratio = f"{r['load_s'] / ref_load:.2f}x" if ref_load else ""
        lines.append(f"| {s} | {r['runs']} | {r['usable_s']:.3f} | {ratio} | {r['load_s']:.3f} | {load_ratio} | "
                     f"{r['forward_s']:.3f} | {r['anon_growth'] / 2**20:.1f} | "
                     f"{100 * r['anon_growth'] / size:.2f}% | {r['peak_rss'] / 2**20:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3], sys.argv[4])))
    else:
        main()
