"""Masking and evicting rows of a page-aligned 512 MiB embedding (issue 3).

Writes a (65536, 2048) fp32 tensor with sparsemap.save (4 KiB aligned; each
row is 8 KiB, two whole pages), touches it, then for `--repeat` rounds: masks
90% of rows (random), measures the RSS drop at once (no sleep) and the time,
restores and checks the data, evicts 90% and re-reads. Also the same on an
unaligned file written by safetensors itself, to show the page/row gap.

Usage: python benchmarks/rows_mask.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import sparsemap
from sparsemap.memory import Snapshot

ROWS, COLS = 65536, 2048


def run(path: Path, repeat: int, label: str) -> None:
    t = sparsemap.Checkpoint(path).tensor("emb")
    reference = t.clone()
    nbytes = t.numel() * 4
    ctl = sparsemap.rows(t, name="emb")
    rng = np.random.default_rng(0)
    drops, mask_ms, restore_ms, evict_drops, page_sp = [], [], [], [], []
    for _ in range(repeat):
        t.sum()  # every page resident
        rows = rng.permutation(ROWS)[: int(ROWS * 0.9)]
        before = Snapshot.take().rss
        start = time.perf_counter()
        ctl.mask(rows)
        mask_ms.append((time.perf_counter() - start) * 1e3)
        drops.append((before - Snapshot.take().rss) / nbytes)
        page_sp.append(ctl.residency().page_sparsity)
        start = time.perf_counter()
        ctl.restore(rows)
        restore_ms.append((time.perf_counter() - start) * 1e3)
        assert torch.equal(t, reference)
        t.sum()
        before = Snapshot.take().rss
        ctl.evict(rows)
        evict_drops.append((before - Snapshot.take().rss) / (len(rows) * COLS * 4))
        assert torch.equal(t, reference)
    print(f"| {label} | {repeat} | {statistics.median(mask_ms):.1f} | "
          f"{100 * statistics.median(drops):.1f}% | "
          f"{100 * statistics.median(page_sp):.1f}% | {statistics.median(restore_ms):.1f} | "
          f"{100 * statistics.median(evict_drops):.1f}% | yes |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        data = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(0))
        sparsemap.save({"emb": data}, Path(tmp) / "aligned.safetensors")
        save_file({"emb": data}, str(Path(tmp) / "unaligned.safetensors"))
        del data
        print("| file | rounds | mask 90% ms | RSS drop at once (% of tensor) | pages freed | restore ms | "
              "evict 90%: RSS drop (% of rows' bytes) | data identical after |")
        print("|---|---|---|---|---|---|---|---|")
        run(Path(tmp) / "aligned.safetensors", args.repeat, "sparsemap.save (4 KiB aligned)")
        run(Path(tmp) / "unaligned.safetensors", args.repeat, "safetensors save_file (offset 88)")


if __name__ == "__main__":
    main()
