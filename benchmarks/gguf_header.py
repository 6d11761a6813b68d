"""GGUF header cost: ``sparsemap.open`` (one walk of its own) against ``gguf.GGUFReader`` alone.

Opening a GGUF file reads only its header (names, shapes, types, offsets, and the metadata: the
tokenizer's vocabulary, merges and scores are most of it). This measures what that costs each way:

* ``sparsemap``: ``sparsemap.open(path)``, the catalog (entries and scalar metadata);
* ``GGUFReader``: ``gguf.GGUFReader(path)``, the ``gguf`` package's reader (what sparsemap used to
  run after its own validation walk).

Each measurement runs in a fresh interpreter that has imported ``sparsemap``, its GGUF module and
``gguf`` (numpy included) before the clock, so both ways start from the same baseline. Two kinds of
run, each way, ``--repeat`` times, medians reported:

* untraced: wall time, and RSS growth (peak RSS during the call, reset through ``/proc/self/clear_refs``
  just before it, minus the RSS before);
* traced: the peak of Python allocations (``tracemalloc``; numpy's buffers included), which slows
  the call, so its time is not used.

The file is read once first (warm cache). ``--synthetic N`` writes and measures a file shaped like
Gemma 3's tokenizer instead: N tokens with scores and token types (Gemma 3: 262,144), a few tensors.

Usage: ``python benchmarks/gguf_header.py [PATH] [--repeat 5] [--synthetic 262144] [--json out.json]``
(PATH defaults to SmolLM2-135M-Instruct's Q4_1 GGUF in the sparsemap cache, fetched if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time, tracemalloc
import gguf
import sparsemap
import sparsemap.formats.gguf

way, path, traced = sys.argv[1], sys.argv[2], sys.argv[3] == "1"

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)

def call():
    if way == "sparsemap":
        return len(sparsemap.open(path))
    return len(gguf.GGUFReader(path).tensors)

if traced:
    tracemalloc.start()
    n = call()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(json.dumps({"tensors": n, "traced_peak": peak}))
else:
    try:
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
            f.write("5")
        reset = True
    except OSError:
        reset = False
    before = status("VmRSS")
    t0 = time.perf_counter()
    n = call()
    seconds = time.perf_counter() - t0
    print(json.dumps({"tensors": n, "seconds": seconds, "rss_growth": status("VmHWM") - before,
                      "hwm_reset": reset}))
"""

WAYS = ("sparsemap", "GGUFReader")


def synthetic(folder: Path, n_vocab: int) -> Path:
    """A GGUF file with Gemma 3's tokenizer shape: ``n_vocab`` tokens, scores and types; three tensors."""
    import gguf
    import numpy as np

    path = folder / f"synthetic-vocab{n_vocab}.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_block_count(1)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"tok{i}" for i in range(n_vocab)])  # 7-9 bytes each, as most real tokens
    writer.add_token_scores([-float(i) for i in range(n_vocab)])
    writer.add_token_types([1] * n_vocab)
    rng = np.random.default_rng(0)
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "output_norm.weight"):
        writer.add_tensor(name, rng.standard_normal((4, 64)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def run(way: str, path: Path, traced: bool) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, way, str(path), "1" if traced else "0"],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{way} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", nargs="?", default=None, help="a .gguf file (default: SmolLM2's, from the cache)")
    ap.add_argument("--repeat", type=int, default=5, help="fresh processes per way and kind of run; medians")
    ap.add_argument("--synthetic", type=int, default=None, metavar="N_VOCAB",
                    help="measure a written file with an N_VOCAB-token vocabulary instead (Gemma 3: 262144)")
    ap.add_argument("--json", default=None, help="also write every run and the medians here")
    args = ap.parse_args()

    import sparsemap
    from sparsemap.formats.gguf import validate

    tmp = tempfile.TemporaryDirectory(prefix="gguf-header-")
    if args.synthetic is not None:
        path = synthetic(Path(tmp.name), args.synthetic)
    elif args.path is not None:
        path = Path(args.path)
    else:
        from sparsemap.models.smollm2 import gguf_path

        path = gguf_path(quiet=True)
    with open(path, "rb") as f:  # warm the cache; only the header is read by either way
        header = validate(f, os.fstat(f.fileno()).st_size, str(path))
        f.seek(0)
        while f.read(64 << 20):
            pass
    n_tensors = len(sparsemap.open(path))

    runs: dict[str, list[dict]] = {w: [] for w in WAYS}
    for r in range(args.repeat):
        for way in WAYS if r % 2 == 0 else reversed(WAYS):
            untraced = run(way, path, traced=False)
            untraced.update(run(way, path, traced=True))
            runs[way].append(untraced)
    keys = ("seconds", "rss_growth", "traced_peak")
    medians = {w: {k: statistics.median(x[k] for x in runs[w]) for k in keys} for w in WAYS}
    mib = 1 << 20
    print(f"{path.name}: {os.path.getsize(path) / mib:.1f} MiB, header {header.data_offset / mib:.2f} MiB, "
          f"{n_tensors} tensors; medians of {args.repeat} fresh processes per way and kind of run, "
          "warm cache")
    if not all(x["hwm_reset"] for w in WAYS for x in runs[w]):
        print("(VmHWM could not be reset: RSS growth is the peak since the process started, minus the RSS "
              "before)")
    print()
    print("| way | time (s) | tracemalloc peak (MiB) | RSS growth (MiB) | peak bytes per header byte |")
    print("|---|---:|---:|---:|---:|")
    for w, m in medians.items():
        print(f"| {w} | {m['seconds']:.3f} | {m['traced_peak'] / mib:.2f} | {m['rss_growth'] / mib:.2f} | "
              f"{m['traced_peak'] / header.data_offset:.2f} |")
    ratio = medians["GGUFReader"]["seconds"] / medians["sparsemap"]["seconds"]
    print(f"\nsparsemap is {ratio:.0f}x faster; GGUFReader allocates "
          f"{medians['GGUFReader']['traced_peak'] / max(medians['sparsemap']['traced_peak'], 1):.0f}x more")
    if args.json:
        from sparsemap.bench.runner import machine

        Path(args.json).write_text(json.dumps({"machine": machine(path, None), "file": str(path),
                                               "file_nbytes": os.path.getsize(path),
                                               "header_nbytes": header.data_offset, "tensors": n_tensors,
                                               "repeat": args.repeat, "runs": runs, "medians": medians},
                                              indent=1))
        print(f"wrote {args.json}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
