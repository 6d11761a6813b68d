"""LLMs-from-scratch's GPT-2 124M checkpoint, loaded each way its book teaches and by sparsemap (issue 17).

The checkpoint is the book's GPTModel (``llms_from_scratch.ch04``, GPT_CONFIG_124M: 163 M parameters,
float32, plus the 12 saved causal masks) with random weights, saved as the book saves it:
``torch.save(model.state_dict(), "model.pth")`` (702 MB). Each way runs in a fresh process, the file made
cold first (``posix_fadvise`` DONTNEED, checked with ``mincore``), unlimited and inside a memory cgroup of
half the file (``--limit``), measured from outside (``sparsemap.bench.measure``: resident anonymous and
file-backed memory sampled every millisecond, the kernel's peak RSS, the cgroup's peak):

  load_state_dict      the book's baseline: ``GPTModel(cfg)`` (random init), ``torch.load(path,
                       weights_only=True)``, ``load_state_dict``
  sequential + meta    the book's ``load_sequentially_with_meta``: built on meta, ``to_empty``,
                       ``torch.load``, each tensor ``copy_``'d in (buffers too: the book copies the
                       parameters only, which leaves the masks ``to_empty`` made uninitialised)
  mmap + assign        the book's recommendation: built under ``torch.device("meta")``,
                       ``torch.load(path, mmap=True, weights_only=True)``, ``load_state_dict(assign=True)``
  sparsemap.load       ``sparsemap.load(lambda: GPTModel(cfg), path)``: built under ``sparsemap.skeleton()``
                       (parameters on meta, initialisers skipped, buffers real), then mapped
  sparsemap.load, meta the model built under ``torch.device("meta")`` as the book builds it, then
                       ``sparsemap.load(model, path)``
  sparsemap + Budget   ``sparsemap.load``, then ``sparsemap.Budget(model, limit=L)`` with L the cgroup's
                       limit (in the unlimited runs too): the blocks stream one at a time, read ahead and
                       released after use, and the output head streams in pieces of 4 MiB
  imports only         ``import torch`` and the book's module: the floor under every row

Building under ``torch.device("meta")`` runs the modules' initialisers on meta tensors, and the first
``normal_`` on one (``nn.Embedding``'s) imports torch's Python meta kernels: 0.9 s and about 70 MB of
anonymous memory on this machine, more than mapping the whole checkpoint. ``sparsemap.skeleton()`` skips
initialisers on meta tensors.

Reported, medians over ``--repeat`` runs (ways interleaved run by run): load s (building and loading,
until the model can run), first forward s (2 x 16 tokens: it touches every weight, so a lazy load pays its
reads here), the peak RSS by the end of loading and the anonymous memory then (read by the child itself:
VmHWM, RssAnon), and over the whole run the peaks of anonymous, file-backed and total RSS, the cgroup's
peak, exit (OOM kills). Every way that
finishes must give the same outputs (a checksum of the logits).

Usage: python benchmarks/llms_from_scratch.py [--repeat 3] [--limit 50%] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GPT_CONFIG_124M = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
                   "drop_rate": 0.1, "qkv_bias": False}
WAYS = ("load_state_dict", "sequential + meta", "mmap + assign", "sparsemap.load", "sparsemap.load, meta",
        "sparsemap + Budget", "imports only")
MiB = 2**20


# ---------------------------------------------------------------- the child: one way, one process

def child(way: str, path: str, budget: str) -> None:
    """Load ``path`` one way, run one forward, print a JSON line of timings and a checksum. ``budget``: the
    limit, in bytes, the Budget way plans for."""
    # This file's folder is first on sys.path, and this file is named like the package: look past it.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    import torch
    from llms_from_scratch.ch04 import GPTModel

    if way.startswith("sparsemap"):
        import sparsemap
    torch.manual_seed(0)
    ids = torch.randint(0, GPT_CONFIG_124M["vocab_size"], (2, 16))
    start = time.perf_counter()
    if way == "imports only":
        at_load = _status()
        print(json.dumps({"load_s": 0.0, "forward_s": 0.0, "load_peak_rss": at_load["VmHWM"],
                          "load_anon": at_load["RssAnon"], "checksum": None}))
        return
    if way == "load_state_dict":
        model = GPTModel(GPT_CONFIG_124M)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    elif way == "sequential + meta":
        with torch.device("meta"):
            model = GPTModel(GPT_CONFIG_124M)
        model = model.to_empty(device="cpu")
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                t.copy_(state_dict[name])
        del state_dict
    elif way == "mmap + assign":
        with torch.device("meta"):
            model = GPTModel(GPT_CONFIG_124M)
            model.load_state_dict(torch.load(path, mmap=True, weights_only=True), assign=True)
    elif way == "sparsemap.load":
        model = sparsemap.load(lambda: GPTModel(GPT_CONFIG_124M), path)
    elif way == "sparsemap.load, meta":
        with torch.device("meta"):
            model = GPTModel(GPT_CONFIG_124M)
        sparsemap.load(model, path)
    elif way == "sparsemap + Budget":
        model = sparsemap.load(lambda: GPTModel(GPT_CONFIG_124M), path)
        print(sparsemap.Budget(model, limit=int(budget), max_tokens=ids.shape[1]).plan, file=sys.stderr)
    else:
        raise SystemExit(f"unknown way {way!r}")
    model.eval()
    loaded = time.perf_counter()
    at_load = _status()
    with torch.inference_mode():
        logits = model(ids)
    done = time.perf_counter()
    print(json.dumps({"load_s": loaded - start, "forward_s": done - loaded, "load_peak_rss": at_load["VmHWM"],
                      "load_anon": at_load["RssAnon"], "checksum": float(logits.double().sum())}))


def _status() -> dict[str, int]:
    """This process's VmHWM (peak RSS so far: the kernel keeps it) and RssAnon, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon"):
                out[key] = int(value.split()[0]) * 1024
    return out


def make_checkpoint(path: Path) -> None:
    """The book's GPTModel (seed 123) saved as the book saves it, by a child (the parent stays small)."""
    code = ("import sys, torch; from llms_from_scratch.ch04 import GPTModel; torch.manual_seed(123); "
            f"m = GPTModel({GPT_CONFIG_124M!r}); tmp = sys.argv[1] + '.tmp'; "
            "torch.save(m.state_dict(), tmp); import os; os.replace(tmp, sys.argv[1])")
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)


# ---------------------------------------------------------------- the parent

def main() -> None:
    from sparsemap.bench.cgroup import available
    from sparsemap.bench.disk import make_cold
    from sparsemap.bench.measure import run_measured
    from sparsemap.models.assets import cache_dir
    from sparsemap.units import parse_size

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--limit", default="50%", help="the cgroup's limit: a size (350M) or a share of the file")
    ap.add_argument("--json", default=str(HERE / "results" / "llms_from_scratch.json"))
    ap.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS), metavar="WAY",
                    help=f"the ways to run (default: all of {', '.join(WAYS)})")
    ap.add_argument("--child", nargs=3, metavar=("WAY", "PATH", "BUDGET"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return

    path = cache_dir() / "bench" / "llms-from-scratch-gpt2-124m" / "model.pth"
    if not path.is_file():
        print(f"writing the checkpoint once: {path}", file=sys.stderr)
        make_checkpoint(path)
    nbytes = path.stat().st_size
    limit = (int(nbytes * float(args.limit[:-1]) / 100) if args.limit.endswith("%")
             else parse_size(args.limit))
    ok, why = available()
    limits: list[int | None] = [None, limit] if ok else [None]
    if not ok:
        print(f"no memory cgroup here ({why}): unlimited runs only", file=sys.stderr)

    runs: dict[str, list[dict]] = {f"{way}|{lim}": [] for way in args.ways for lim in limits}
    for i in range(args.repeat):
        for lim in limits:
            for way in args.ways:
                cached = make_cold(path)
                m = run_measured([sys.executable, __file__, "--child", way, str(path), str(limit)],
                                 memory_limit=lim, timeout_s=600)
                out = {}
                if m.exit_code == 0 and m.stdout.strip():
                    out = json.loads(m.stdout.strip().splitlines()[-1])
                run = {"exit": m.exit_code, "oom_killed": m.oom_killed, "wall_s": m.wall_s,
                       "peak_rss": m.peak_rss, "peak_anon": m.peak_anon, "peak_file": m.peak_file,
                       "cgroup_peak": m.cgroup_peak, "major_faults": m.major_faults,
                       "read_bytes": m.read_bytes, "cached_before": cached, "stderr": m.stderr.strip()[-300:],
                       **out}
                runs[f"{way}|{lim}"].append(run)
                load = out.get("load_s", float("nan"))
                print(f"run {i + 1}/{args.repeat} {way} limit {lim and f'{lim / MiB:.0f} MiB'}: exit "
                      f"{m.exit_code}{' (OOM)' if m.oom_killed else ''}, load {load:.3f} s, peak anon "
                      f"{m.peak_anon / MiB:.0f} MiB, file {m.peak_file / MiB:.0f} MiB", file=sys.stderr)

    def med(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    checksums = {r["checksum"] for rs in runs.values() for r in rs if r.get("checksum") is not None}
    lines = [f"checkpoint: {path.name}, {nbytes / 1e6:.0f} MB (GPT_CONFIG_124M, float32, torch.save); cold "
             f"before every run; medians of {args.repeat}; cgroup limit {limit / MiB:.0f} MiB", "",
             "| way | memory limit | runs ok | load s | first forward s | load + forward s | "
             "peak RSS by end of load MiB | anon at end of load MiB | peak anon MiB | peak file-backed MiB | "
             "peak RSS MiB | cgroup peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for key, rs in runs.items():
        way, lim = key.split("|")
        good = [r for r in rs if r["exit"] == 0]
        s = {"runs": len(rs), "ok": len(good), "oom": sum(r["oom_killed"] for r in rs),
             "load_s": med([r["load_s"] for r in good]), "forward_s": med([r["forward_s"] for r in good]),
             "usable_s": med([r["load_s"] + r["forward_s"] for r in good]),
             "peak_anon": med([r["peak_anon"] for r in good]),
             "peak_file": med([r["peak_file"] for r in good]),
             "peak_rss": med([r["peak_rss"] for r in good]),
             "load_peak_rss": med([r["load_peak_rss"] for r in good]),
             "load_anon": med([r["load_anon"] for r in good]),
             "cgroup_peak": med([r["cgroup_peak"] for r in good if r["cgroup_peak"] is not None])}
        summary[key] = s
        shown = "none" if lim == "None" else f"{int(lim) / MiB:.0f} MiB"
        ok_text = f"{s['ok']}/{s['runs']}" + (f" ({s['oom']} OOM-killed)" if s["oom"] else "")
        if not good:
            lines.append(f"| {way} | {shown} | {ok_text} | - | - | - | - | - | - | - | - | - |")
            continue
        cg = "-" if s["cgroup_peak"] != s["cgroup_peak"] else f"{s['cgroup_peak'] / MiB:.0f}"
        lines.append(f"| {way} | {shown} | {ok_text} | {s['load_s']:.3f} | {s['forward_s']:.3f} | "
                     f"{s['usable_s']:.3f} | {s['load_peak_rss'] / MiB:.0f} | {s['load_anon'] / MiB:.0f} | "
                     f"{s['peak_anon'] / MiB:.0f} | {s['peak_file'] / MiB:.0f} | "
                     f"{s['peak_rss'] / MiB:.0f} | {cg} |")
    lines += ["", f"same outputs from every way that finished: {'yes' if len(checksums) == 1 else 'NO'} "
              f"({len(checksums)} distinct checksums)"]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"checkpoint_nbytes": nbytes, "limit": limit, "summary": summary,
                                           "runs": runs, "machine": {"cpus": os.cpu_count()}}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
