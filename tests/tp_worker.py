"""One rank of a tensor-parallel run, launched by tests/test_tensor_parallel.py under ``torchrun`` (or alone
with ``--reference``, the single-process run it is compared with).

Each rank loads the model with its slices mapped, runs it (greedy tokens for a transformers model, one forward
for a plain MLP) and writes ``rank<N>.json`` to --out with what it read of the checkpoint.

Several ranks on one machine share the page cache, and a fault maps whatever neighbouring pages are cached
(fault-around; whole large folios on recent kernels), so one rank's page tables soon hold pages another rank
read. With ``{rank}`` in --source, each rank loads its own copy of the checkpoint instead, as if each ran on
its own machine: the copy is dropped from the page cache first, and ``mincore`` over it afterwards says
exactly which pages this rank made the kernel read (its slices, plus any read-around).

A sparsemap error is written there too ("Class: message"); the rank then waits for the others at a barrier and
exits with 2, so every rank gets to report it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from torch import nn

import sparsemap
from sparsemap import pages
from sparsemap.mapped import mapping_of
from sparsemap.memory import Snapshot
from sparsemap.rank_sources import page_runs


class MLP(nn.Module):
    """A plain stack of up/down projections (torch's ColwiseParallel and RowwiseParallel), no transformers."""

    def __init__(self, width: int, hidden: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(width, hidden), "down": nn.Linear(hidden, width)})
            for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer["down"](torch.relu(layer["up"](x)))
        return x


def mlp_input(width: int) -> torch.Tensor:
    return torch.randn(3, width, generator=torch.Generator().manual_seed(1))


def files_of(source: Path) -> list[Path]:
    return sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else [source]


def cached_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache now (``mincore`` over a mapping of it)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    anchor = ctypes.c_char.from_buffer(mm)
    try:
        return int(pages.in_page_cache(ctypes.addressof(anchor), size).sum()) * pages.PAGE_SIZE
    finally:
        del anchor
        mm.close()


def evict(source: Path) -> int:
    """Drop ``source``'s files from the page cache; the bytes still cached after (0 unless refused)."""
    for path in files_of(source):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # the dirty pages of a fresh copy cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return sum(cached_bytes(path) for path in files_of(source))


def read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


def load(args: argparse.Namespace, source: str, mesh: object) -> nn.Module:
    plan = None if args.plan == "auto" else json.loads(args.plan)
    if args.mode == "mlp":
        width, hidden, depth = args.mlp
        return sparsemap.load(lambda: MLP(width, hidden, depth), source, tp=mesh,
                              tp_plan=plan if mesh is not None else None)
    if mesh is None:
        return sparsemap.from_pretrained(source)
    return sparsemap.from_pretrained(source, tp_plan="auto" if plan is None else plan, device_mesh=mesh)


def warm_up(args: argparse.Namespace, source: str, mesh: object) -> None:
    """Pay what any tensor-parallel load pays once per process (transformers, the model's module, torch's
    DTensor machinery: 29 MiB anonymous the first time, whatever the model) before the memory baseline: the
    anonymous growth measured is then this load's own."""
    if mesh is not None:
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        with torch.device("meta"):
            tiny = nn.Sequential(nn.Linear(8, 8))
        parallelize_module(tiny, mesh, {"0": ColwiseParallel()}, src_data_rank=None)
    if args.mode == "hf":
        from transformers.integrations import tensor_parallel  # noqa: F401

        from sparsemap.formats.source import resolve_source
        from sparsemap.models.hf import class_for, resolve_config

        class_for(resolve_config(resolve_source(source)))  # config.json, or a Meta release's params.json


def catalogs(source: str) -> list[sparsemap.Catalog]:
    """The checkpoint's catalogs: one, or a Meta release's one per file (which sparsemap.open refuses)."""
    from sparsemap.formats.meta_llama import read_release
    from sparsemap.formats.source import resolve_source

    src = resolve_source(source)
    return list(read_release(src).ranks) if src.format == "meta-llama" else [sparsemap.open(source)]


def residency(model: nn.Module, source: str) -> dict[str, object]:
    """What this rank holds of the checkpoint: its slices (bytes, and the pages they span; copies such as a
    Meta release's q and k, in transformers' row order, counted apart), the pages mapped into this process
    (pagemap), the pages in the page cache (mincore: on a copy of its own, what it read), and for each file of
    the checkpoint whether this rank mapped it and how much of it is cached."""
    from torch.distributed.tensor import DTensor

    from sparsemap.errors import NotMappedError

    page = pages.PAGE_SIZE
    mappings: dict[int, object] = {}
    slice_pages: dict[int, set[int]] = {}
    slice_bytes = split_full = whole = copied = 0
    for p in {id(p): p for p in model.parameters()}.values():
        local = p.to_local() if isinstance(p, DTensor) else p.data
        nbytes = local.numel() * local.element_size()
        if isinstance(p, DTensor):
            split_full += p.numel() * p.element_size()
        else:
            whole += nbytes
        try:
            mm = mapping_of(local)
        except NotMappedError:
            copied += nbytes
            continue
        mappings[mm.address] = mm
        covered = slice_pages.setdefault(mm.address, set())
        for start, end in page_runs(local):
            covered.update(range(start // page, end // page))
        slice_bytes += nbytes
    found = {"touched_bytes": 0, "touched_outside_bytes": 0, "cached_bytes": 0, "cached_outside_bytes": 0,
             "file_bytes": 0, "header_bytes": 0}
    headers: dict[str, int] = {}
    for catalog in catalogs(source):
        for e in catalog.values():
            headers[e.file] = min(headers.get(e.file, e.offset), e.offset)
    for address, mm in mappings.items():
        inside = np.zeros(-(-len(mm) // page), dtype=bool)
        inside[np.fromiter(slice_pages[address], dtype=np.int64) - address // page] = True
        for kind, present in (("touched", pages.present_in_process(address, len(mm))),
                              ("cached", pages.in_page_cache(address, len(mm)))):
            found[f"{kind}_bytes"] += int(present.sum()) * page
            found[f"{kind}_outside_bytes"] += int((present & ~inside).sum()) * page
        found["file_bytes"] += len(mm)
        found["header_bytes"] += headers[mm.path]
    files = {os.path.basename(path): {"cached_bytes": cached_bytes(Path(path)), "header_bytes": header,
                                      "file_bytes": os.path.getsize(path)}
             for path, header in headers.items()}
    return {**found, "tensors": len({id(p) for p in model.parameters()}),
            "slice_bytes": slice_bytes, "split_full_bytes": split_full, "whole_bytes": whole,
            "copied_bytes": copied, "slice_page_bytes": sum(len(s) for s in slice_pages.values()) * page,
            "mapped_files": sorted(os.path.basename(mm.path) for mm in mappings.values()),  # type: ignore[attr-defined]
            "files": files}


def run(args: argparse.Namespace, mesh: object, rank: int = 0) -> dict[str, object]:
    source = args.source.format(rank=rank)
    result: dict[str, object] = {}
    if "{rank}" in args.source:
        result["cached_at_start"] = evict(Path(source))
    warm_up(args, source, mesh)
    before, read_before = Snapshot.take(), read_bytes()
    start = time.perf_counter()
    model = load(args, source, mesh)
    result.update(load_s=time.perf_counter() - start, anon_growth=Snapshot.take().anon - before.anon)
    with torch.inference_mode():
        if args.mode == "mlp":
            result["output"] = model(mlp_input(args.mlp[0])).flatten().tolist()
        else:
            prompt = torch.tensor([[int(t) for t in args.prompt.split(",")]])
            out = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False,
                                 attention_mask=torch.ones_like(prompt))
            result["tokens"] = out[0, prompt.shape[1]:].tolist()
    result["read_bytes"] = read_bytes() - read_before
    result.update(residency(model, source))
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("hf", "mlp"), default="hf")
    parser.add_argument("--source", required=True,
                        help="a checkpoint or folder; {rank} in it: each rank's own copy")
    parser.add_argument("--plan", default="auto", help="'auto' or a JSON object of patterns to styles")
    parser.add_argument("--prompt", default="1,2,3,4")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--mlp", type=int, nargs=3, default=(1024, 4096, 2),
                        metavar=("WIDTH", "HIDDEN", "DEPTH"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--reference", action="store_true", help="one process, no tensor parallelism")
    args = parser.parse_args()
    out = Path(args.out)
    if args.reference:
        (out / "reference.json").write_text(json.dumps(run(args, None)))
        return 0

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    code = 0
    try:
        result = run(args, mesh, rank)
    except sparsemap.SparsemapError as e:
        result, code = {"error": f"{type(e).__name__}: {e}"}, 2
    result.update(rank=rank, size=dist.get_world_size(), pid=os.getpid())
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()  # every rank has written its result before any exits (torchrun ends the others then)
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
