"""Threads reading, evicting, masking, restoring and prefetching rows of the same tensors at once.

Rows are split: "kept" rows are never masked, so every read of one must give
its true values, whatever the other threads do to its pages and neighbours;
"maskable" rows may read as zero while masked, so each of their elements must
be its true value or zero, nothing else. Bounded in time.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import sparsemap

SECONDS = 4.0


@pytest.fixture()
def mapped(tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    truth = {"pages": torch.randn(1024, 1024, generator=gen) + 3.0,  # 4 KiB rows: one page each
             "shared": torch.randn(4096, 64, generator=gen) + 3.0}  # 256-byte rows: 16 to a page
    path = tmp_path / "rows.safetensors"
    sparsemap.save(truth, path, layout=sparsemap.Layout(pad_rows="pages"))
    return truth, sparsemap.load_state_dict(path)


def test_concurrent_row_operations_never_corrupt_a_row(mapped) -> None:  # type: ignore[no-untyped-def]
    truth, state = mapped
    controllers = {name: sparsemap.rows(t) for name, t in state.items()}
    kept = {name: np.arange(0, len(t), 3) for name, t in truth.items()}  # every third row
    maskable = {name: np.setdiff1d(np.arange(len(t)), kept[name]) for name, t in truth.items()}
    stop = time.monotonic() + SECONDS
    failures: list[str] = []
    counts = {"reads": 0, "evicts": 0, "masks": 0, "restores": 0, "prefetches": 0}
    lock = threading.Lock()

    def count(key: str) -> None:
        with lock:
            counts[key] += 1

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while time.monotonic() < stop:
            for name, t in state.items():
                i = int(rng.choice(kept[name]))
                if not torch.equal(t[i], truth[name][i]):
                    failures.append(f"{name} kept row {i} read wrong values")
                j = int(rng.choice(maskable[name]))
                row, want = t[j].clone(), truth[name][j]
                if not bool(((row == want) | (row == 0)).all()):
                    failures.append(f"{name} maskable row {j} holds values that are neither true nor zero")
                count("reads")

    def evicter(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while time.monotonic() < stop:
            for name, c in controllers.items():
                c.evict(rng.choice(len(truth[name]), size=64, replace=False),
                        drop_cache=bool(rng.integers(2)))
                count("evicts")

    def masker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while time.monotonic() < stop:
            for name, c in controllers.items():
                rows = rng.choice(maskable[name], size=128, replace=False)
                c.mask(rows)
                count("masks")
                c.restore(rng.choice(maskable[name], size=256, replace=False))
                count("restores")

    def prefetcher(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while time.monotonic() < stop:
            for name, c in controllers.items():
                c.prefetch(rng.choice(len(truth[name]), size=32, replace=False))
                c.residency()
                count("prefetches")

    workers = [threading.Thread(target=f, args=(i,)) for i, f in
               enumerate([reader, reader, evicter, masker, prefetcher])]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=SECONDS + 60)
    assert not any(w.is_alive() for w in workers)
    assert not failures, failures[:5]
    # After everything is restored, every row is true again.
    for name, c in controllers.items():
        c.restore(range(len(truth[name])))
        assert torch.equal(state[name], truth[name]), name
    assert all(v > 10 for v in counts.values()), counts
    print(f"{len(workers)} threads x {SECONDS:.0f} s = {len(workers) * SECONDS:.0f} thread-seconds: {counts}")
