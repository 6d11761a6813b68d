"""Fixed costs: ``import sparsemap`` + ``sparsemap.load`` against safetensors'
``load_file`` + ``load_state_dict``.

What a user pays before any weight is read: importing the library and
turning a checkpoint's header into a model's parameters. Each way runs in a
fresh interpreter that has already imported torch and built the model's
parameters on the meta device (both untimed, identical for both ways: a
plain-torch module tree made from the file's names and shapes, so no other
library is imported first). Timed, in the child:

* ``safetensors``: ``from safetensors.torch import load_file`` (import), then
  ``model.load_state_dict(load_file(path), assign=True)`` (load);
* ``sparsemap``: ``import sparsemap`` (import), then ``sparsemap.load(model, path)`` (load).

The file is warm (read once before), so neither way waits for the disk; no
tensor data is touched by either. The two ways alternate, run after run, and
the medians are reported with their ratio. By default Python bytecode is
compiled once beforehand (as an installed package has it), so no run pays for
compiling sparsemap's sources; ``--no-bytecode`` measures the other case
(``PYTHONDONTWRITEBYTECODE=1`` and no cached bytecode: every run compiles).

Usage: ``python benchmarks/fixed_costs.py [--model llama-1b] [--repeat 15] [--no-bytecode]``
(the default model is the 1.1 B-parameter bf16 Llama shape, written once into
``$SPARSEMAP_CACHE/bench``).
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, sys, time
import torch
from torch import nn

way, path, spec = sys.argv[1], sys.argv[2], sys.argv[3]

def skeleton(entries):
    # A module tree with the checkpoint's names and shapes, parameters on meta: plain torch only.
    root = nn.Module()
    for name, shape, dtype in entries:
        *modules, leaf = name.split(".")
        m = root
        for part in modules:
            if not hasattr(m, part):
                m.add_module(part, nn.Module())
            m = getattr(m, part)
        empty = torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
        m.register_parameter(leaf, nn.Parameter(empty, requires_grad=False))
    return root

with open(spec) as f:
    model = skeleton(json.load(f))
t0 = time.perf_counter()
if way == "safetensors":
    from safetensors.torch import load_file
    t1 = time.perf_counter()
    model.load_state_dict(load_file(path), assign=True)
else:
    import sparsemap
    t1 = time.perf_counter()
    sparsemap.load(model, path)
t2 = time.perf_counter()
assert not any(p.is_meta for p in model.parameters())
print(json.dumps({"import_ms": (t1 - t0) * 1e3, "load_ms": (t2 - t1) * 1e3}))
"""

WAYS = ("safetensors", "sparsemap")
TORCH_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
               "U8": "uint8", "BOOL": "bool", "F64": "float64", "I8": "int8", "I16": "int16"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-1b", help="synthetic size (see `sparsemap bench --list`)")
    ap.add_argument("--repeat", type=int, default=15, help="runs of each way (alternating); medians")
    ap.add_argument("--no-bytecode", action="store_true",
                    help="every run compiles sparsemap's sources (no cached bytecode), as in a checkout "
                         "with PYTHONDONTWRITEBYTECODE=1")
    ap.add_argument("--json", default=None, help="default: results/fixed_costs[_no_bytecode].json")
    args = ap.parse_args()
    suffix = "_no_bytecode" if args.no_bytecode else ""
    args.json = args.json or str(HERE / "results" / f"fixed_costs{suffix}.json")

    import sparsemap
    from sparsemap.bench.runner import machine
    from sparsemap.bench.synthetic import generate

    path = generate(args.model) / "model.safetensors"
    catalog = sparsemap.open(path)
    spec = Path(args.json).with_suffix(".spec.json")
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps([(n, list(e.shape), TORCH_NAMES[e.dtype]) for n, e in catalog.items()]))
    with open(path, "rb") as f:  # warm: neither way reads tensor data, but both read the header
        while f.read(64 << 20):
            pass
    package = Path(sparsemap.__file__).parent
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    if args.no_bytecode:
        for cache in package.rglob("__pycache__"):
            shutil.rmtree(cache)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    else:
        compileall.compile_dir(str(package), quiet=1)
    runs: dict[str, list[dict[str, float]]] = {w: [] for w in WAYS}
    for r in range(args.repeat):
        for way in WAYS if r % 2 == 0 else reversed(WAYS):
            proc = subprocess.run([sys.executable, "-c", CHILD, way, str(path), str(spec)],
                                  capture_output=True, text=True, env=env, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"{way} failed:\n{proc.stderr[-2000:]}")
            runs[way].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    spec.unlink()
    medians = {w: {k: statistics.median(run[k] for run in runs[w]) for k in ("import_ms", "load_ms")}
               for w in WAYS}
    for m in medians.values():
        m["total_ms"] = m["import_ms"] + m["load_ms"]
    ratio = medians["sparsemap"]["total_ms"] / medians["safetensors"]["total_ms"]
    print(f"{path} ({len(catalog)} tensors, {catalog.nbytes / 1e9:.2f} GB), medians of {args.repeat} fresh "
          "processes each, torch imported and the model built on meta before the clock; sparsemap's "
          f"bytecode {'compiled by every run' if args.no_bytecode else 'cached'}")
    print(f"{'way':12s} {'import ms':>10s} {'load ms':>9s} {'total ms':>9s}")
    for w, m in medians.items():
        print(f"{w:12s} {m['import_ms']:10.2f} {m['load_ms']:9.2f} {m['total_ms']:9.2f}")
    print(f"sparsemap / safetensors, import included: {ratio:.2f}x")
    Path(args.json).write_text(json.dumps({"machine": machine(path, None), "file": str(path),
                                           "tensors": len(catalog), "repeat": args.repeat,
                                           "bytecode": "none" if args.no_bytecode else "cached", "runs": runs,
                                           "medians": medians, "ratio_total": ratio}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
