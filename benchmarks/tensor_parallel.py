"""Tensor-parallel loading on 2 ranks (issue 19): each rank maps its slice, against the peers.

The checkpoint is `sparsemap bench`'s llama-1b (random bf16 weights in TinyLlama-1.1B's shape, 2.2 GB,
written once by safetensors). Every run is `torchrun --nproc-per-node N` (gloo, CPU) of this file's worker;
each rank loads the model split by the model's own plan (transformers' `tp_plan="auto"`: attention heads,
MLP and vocabulary split, norms whole) and runs one forward pass of a 16-token prompt. The ways:

  - sparsemap: `sparsemap.from_pretrained(folder, tp_plan="auto")` on the file as saved;
  - sparsemap aligned: the same on the file converted once with sparsemap's default layout
    (`sparsemap convert model.safetensors out/model.safetensors`: the same names, shapes and dtypes, a
    file every reader reads, with each large tensor starting on a page), so that a rank's part of a row
    of 8 KiB or more is whole pages;
  - sparsemap transposed: the same on the file converted once with the rowwise weights (o_proj, down_proj)
    stored transposed (`sparsemap convert --transpose`), so that every slice is a contiguous run of pages;
  - naive: every rank reads the whole state dict (`safetensors.torch.load_file`), keeps a copy of its
    slices in the same DTensor model, and drops the rest;
  - transformers: `AutoModelForCausalLM.from_pretrained(folder, distributed_config=DistributedConfig(
    tp_size=N))`, transformers' own tensor-parallel loading (its `tp_plan="auto"`).

Each rank reads its own copy of the checkpoint, made cold before every run (and checked with mincore), as
if each ran on its own machine: its bytes read (`/proc/self/io`) and the pages of its copy in the page
cache afterwards are its own. Per rank: load time, first forward, peak anonymous memory (sampled every
millisecond from a helper process) and its growth over the load, file-backed memory, bytes read against the
size of its slices. Libraries (torch, transformers, DTensor's first use) are paid for before the clock
starts; their cost is reported as the baseline. Runs are interleaved way by way; the table gives, for each
figure, the median over the repeats of the larger of the ranks.

Usage: python benchmarks/tensor_parallel.py [--size llama-1b] [--ranks 2] [--repeat 3]
           [--ways sparsemap,aligned,transposed,naive,transformers]
           [--json benchmarks/results/tensor_parallel.json] [--plot benchmarks/tensor_parallel.png]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WAYS = ("sparsemap", "aligned", "transposed", "naive", "transformers")
PROMPT_TOKENS = 16
MiB = 1 << 20


# ---------------------------------------------------------------- one rank (under torchrun)

def read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


def load_naive(folder: Path, mesh: object) -> object:
    """Every rank reads the whole state dict into memory, then keeps a copy of its slices."""
    import torch
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor
    from transformers import AutoConfig, AutoModelForCausalLM

    import sparsemap
    from sparsemap.parallel import prepare

    with sparsemap.skeleton():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    sharding = prepare(model, None, mesh.size())
    sharding.apply(model, mesh)
    state = load_file(str(folder / "model.safetensors"))  # the whole checkpoint, in anonymous memory
    rank = mesh.get_local_rank()
    for name, param in list(model.named_parameters()):
        full = state[name]
        if isinstance(param, DTensor):
            local = sharding.local(full, param, rank).clone()
            value = DTensor.from_local(local, mesh, param.placements, run_check=False, shape=param.shape,
                                       stride=param.stride())
        else:
            value = full.clone()
        module_name, _, attr = name.rpartition(".")
        model.get_submodule(module_name)._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    del state
    model.tie_weights()
    return model.eval()


def load(way: str, folder: Path, mesh: object) -> object:
    import sparsemap

    if way in ("sparsemap", "aligned", "transposed"):
        return sparsemap.from_pretrained(folder, tp_plan="auto", device_mesh=mesh)
    if way == "naive":
        return load_naive(folder, mesh)
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    return AutoModelForCausalLM.from_pretrained(folder,
                                                distributed_config=DistributedConfig(tp_size=mesh.size()))


def warm_up(mesh: object) -> None:
    """What any tensor-parallel load pays once per process: transformers, its Llama, DTensor's first use."""
    import torch
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    from transformers import LlamaForCausalLM  # noqa: F401
    from transformers.integrations import tensor_parallel  # noqa: F401

    with torch.device("meta"):
        tiny = torch.nn.Sequential(torch.nn.Linear(8, 8))
    parallelize_module(tiny, mesh, {"0": ColwiseParallel()}, src_data_rank=None)


def cached_bytes(folder: Path) -> int:
    from sparsemap.bench.disk import file_cached_fraction

    return sum(round(file_cached_fraction(p) * p.stat().st_size) for p in folder.glob("*.safetensors"))


def worker(way: str, folders: list[str], out: Path) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from sparsemap.memory import AnonSampler, Snapshot, reset_peak

    dist.init_process_group("gloo", timeout=timedelta(minutes=10))
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    folder = Path(folders[rank])
    warm_up(mesh)
    baseline = Snapshot.take()
    prompt = torch.randint(0, 32000, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    with AnonSampler() as sampler:
        dist.barrier()
        sampler.reset()
        reset_peak()
        read_before = read_bytes()
        start = time.perf_counter()
        model = load(way, folder, mesh)
        loaded = time.perf_counter()
        after_load = Snapshot.take()
        with torch.inference_mode():
            logits = model(prompt).logits
        done = time.perf_counter()
        peak_anon = sampler.peak
    after = Snapshot.take()
    slice_bytes = 0
    for p in {id(p): p for p in model.parameters()}.values():
        local = p.to_local() if isinstance(p, DTensor) else p
        slice_bytes += local.numel() * local.element_size()
    result = {
        "way": way, "rank": rank,
        "load_s": loaded - start, "forward_s": done - loaded, "total_s": done - start,
        "baseline_anon": baseline.anon, "baseline_rss": baseline.rss,
        "anon_growth_load": after_load.anon - baseline.anon, "peak_anon": peak_anon,
        "peak_anon_growth": peak_anon - baseline.anon, "peak_rss": after.hwm, "file_after": after.file,
        "read_bytes": read_bytes() - read_before, "cached_bytes": cached_bytes(folder),
        "slice_bytes": slice_bytes, "logits_sum": float(logits.float().sum()),
        "next_token": int(logits[0, -1].argmax()),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- the driver

def copies(folder: Path, root: Path, ranks: int, *, kind: str) -> list[Path]:
    """One folder per rank (config and weights), made once: each rank reads its own copy, as on its own
    machine. ``kind``: "plain" (the file as saved), "aligned" (converted with the default layout),
    "transposed" (converted with the rowwise weights stored transposed)."""
    import sparsemap

    made = []
    name = "model.sparsemap.safetensors" if kind == "transposed" else "model.safetensors"
    for rank in range(ranks):
        target = root / kind / f"rank{rank}"
        made.append(target)
        if (target / ".complete").exists():
            continue
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / "config.json", target)
        if kind == "plain":
            shutil.copy(folder / "model.safetensors", target)
        elif rank == 0:
            from sparsemap.parallel import rowwise_weights

            plan = {"model.layers.*.self_attn.o_proj": "rowwise", "model.layers.*.mlp.down_proj": "rowwise"}
            layout = sparsemap.Layout(transpose=rowwise_weights(plan)) if kind == "transposed" else None
            sparsemap.convert(folder / "model.safetensors", target / name, layout=layout)
        else:
            shutil.copy(made[0] / name, target)
        (target / ".complete").write_text("done\n")
    return made


def run_way(way: str, folders: list[Path], timeout: float) -> list[dict]:
    from sparsemap.bench.disk import make_cold

    for folder in folders:
        for path in folder.glob("*.safetensors"):
            left = make_cold(path)
            if left > 0.01:
                raise RuntimeError(f"{path}: {left:.0%} still cached after dropping it")
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(len(folders)),
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", __file__, "--worker", way,
                   "--folders", ",".join(map(str, folders)), "--out", tmp]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own group: a run past the timeout ends whole
        try:
            log, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return [{"way": way, "error": f"past {timeout} s"}]
        found = sorted(Path(tmp).glob("rank*.json"))
        if proc.returncode != 0 or len(found) != len(folders):
            return [{"way": way, "error": log.decode(errors="replace")[-2000:]}]
        return [json.loads(p.read_text()) for p in found]


FIGURES = (  # (key, column, scale)
    ("load_s", "load s", 1), ("forward_s", "first forward s", 1), ("total_s", "load + forward s", 1),
    ("peak_anon", "peak anon MiB", MiB), ("peak_anon_growth", "anon growth MiB", MiB),
    ("anon_growth_load", "anon growth by load MiB", MiB), ("file_after", "file-backed MiB", MiB),
    ("read_bytes", "read MiB", MiB), ("slice_bytes", "slice MiB", MiB),
)


def summary(runs: list[list[dict]]) -> dict[str, float]:
    """Median over runs of the larger rank's figure; read / slice as the larger rank's ratio."""
    ok = [ranks for ranks in runs if not any("error" in r for r in ranks)]
    out: dict[str, float] = {"runs": len(ok), "of": len(runs)}
    if not ok:
        return out
    for key, _, _ in FIGURES:
        out[key] = statistics.median(max(r[key] for r in ranks) for ranks in ok)
    out["read_over_slice"] = statistics.median(max(r["read_bytes"] / r["slice_bytes"] for r in ranks)
                                               for ranks in ok)
    out["growth_over_slice"] = statistics.median(max(r["anon_growth_load"] / r["slice_bytes"] for r in ranks)
                                                 for ranks in ok)
    out["baseline_anon"] = statistics.median(max(r["baseline_anon"] for r in ranks) for ranks in ok)
    out["next_tokens"] = sorted({r["next_token"] for ranks in ok for r in ranks})
    return out


def table(summaries: dict[str, dict]) -> str:
    head = ["way", "runs", *(c for _, c, _ in FIGURES), "read / slice", "load growth / slice"]
    rows = [head, ["---"] * len(head)]
    for way, s in summaries.items():
        if "load_s" not in s:
            rows.append([way, f"0/{s['of']}", *[""] * (len(head) - 2)])
            continue
        cells = [way, f"{s['runs']}/{s['of']}"]
        for key, _, scale in FIGURES:
            cells.append(f"{s[key]:.2f}" if scale == 1 else f"{s[key] / scale:,.0f}")
        cells += [f"{s['read_over_slice']:.3f}", f"{s['growth_over_slice']:.2%}"]
        rows.append(cells)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def plot(summaries: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ways = [w for w, s in summaries.items() if "load_s" in s]
    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(11, 4))
    loads = [summaries[w]["load_s"] for w in ways]
    forwards = [summaries[w]["forward_s"] for w in ways]
    time_ax.bar(ways, loads, label="load")
    time_ax.bar(ways, forwards, bottom=loads, label="first forward")
    time_ax.set_ylabel("seconds (the slower rank)")
    time_ax.legend()
    memory_ax.bar(ways, [summaries[w]["peak_anon_growth"] / MiB for w in ways], label="peak anon growth")
    memory_ax.bar(ways, [summaries[w]["read_bytes"] / MiB for w in ways], alpha=0.4, label="read from disk")
    memory_ax.set_ylabel("MiB per rank")
    memory_ax.legend()
    for ax in (time_ax, memory_ax):
        ax.tick_params(axis="x", rotation=15)
    fig.suptitle("llama-1b bf16 on 2 tensor-parallel ranks (gloo, CPU), cold, medians")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="llama-1b")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run (default 600)")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "tensor_parallel.json")
    parser.add_argument("--plot", type=Path, default=HERE / "tensor_parallel.png")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folders", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.folders.split(","), args.out)
        return 0

    from sparsemap.bench.runner import machine
    from sparsemap.bench.synthetic import folder_for, generate

    folder = generate(args.size)
    root = folder_for(args.size).with_name(f"{folder.name}-tp{args.ranks}")
    kinds = {"sparsemap": "plain", "aligned": "aligned", "transposed": "transposed"}
    folders = {way: copies(folder, root, args.ranks, kind=kind) for way, kind in kinds.items()}
    folders["naive"] = folders["transformers"] = folders["sparsemap"]
    ways = args.ways.split(",")
    runs: dict[str, list[list[dict]]] = {way: [] for way in ways}
    for round_ in range(args.repeat):
        for way in ways:
            ranks = run_way(way, [Path(f) for f in folders[way]], args.timeout)
            runs[way].append(ranks)
            shown = ranks[0].get("error", "")[-300:] or (
                f"load {max(r['load_s'] for r in ranks):.2f} s, "
                f"forward {max(r['forward_s'] for r in ranks):.2f} s, "
                f"peak anon {max(r['peak_anon'] for r in ranks) / MiB:,.0f} MiB, "
                f"read {max(r['read_bytes'] for r in ranks) / MiB:,.0f} MiB")
            print(f"round {round_ + 1} {way}: {shown}", flush=True)
    summaries = {way: summary(r) for way, r in runs.items()}
    print(table(summaries))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine(folder / "model.safetensors"), "size": args.size,
                                     "ranks": args.ranks, "summaries": summaries, "runs": runs}, indent=1))
    plot(summaries, args.plot)
    print(f"wrote {args.json} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
