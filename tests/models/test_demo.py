"""The MiniLM demo's analysis, on reports written by hand: loading side by side, the verdict.

The reports have the shape of the MiniLM children's; no model runs here. The
main demo (SmolLM2 in a memory limit, RWKV sparse) is tested in tests/bench/test_demo.py.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from sparsemap.models import demo

MiB = 1 << 20


def _phase(name: str, seconds: float, anon_mib: float, file_mib: float, peak_anon_mib: float | None = None,
           peak_rss_mib: float | None = None) -> dict[str, Any]:
    anon, file = int(anon_mib * MiB), int(file_mib * MiB)
    return {"name": name, "seconds": seconds, "after": {"rss": anon + file, "anon": anon, "file": file},
            "peak_anon": int((peak_anon_mib or anon_mib) * MiB),
            "peak_rss": int((peak_rss_mib or anon_mib + file_mib) * MiB)}


def _minilm_run(way: str, loading: list[tuple[str, float, float, float]],
                embeddings: list[list[float]]) -> dict[str, Any]:
    phases = [_phase("import torch", 1.0, 140, 130), _phase("import transformers", 1.0, 270, 200),
              *(_phase(*p) for p in loading), _phase("first forward", 0.1, 400, 300, 420, 800)]
    return {"way": way, "tracker": {"phases": phases}, "table": f"{way} (MiB)", "embeddings": embeddings}


def _minilm(difference: float) -> dict[str, dict[str, Any]]:
    ours = [[0.5, -0.25], [0.125, 1.0]]
    theirs = [[x + difference for x in row] for row in ours]
    return {"sparsemap": _minilm_run("sparsemap", [("tokenizer", 0.2, 300, 210),
                                                   ("weights (sparsemap.load)", 0.05, 301, 300)], ours),
            "sentence-transformers": _minilm_run("sentence-transformers",
                                                 [("tokenizer + weights", 1.5, 390, 210)], theirs)}


def test_minilm_loading_is_everything_between_the_imports_and_the_first_forward() -> None:
    result = demo.minilm_result(_minilm(2e-6), 1e-5)
    assert result.same
    lines = result.text.splitlines()
    assert lines[lines.index("tokenizer + weights       sparsemap  sentence-transformers") + 1:][:3] == [
        "  seconds                     0.250                  1.500",
        "  anonymous MiB added         +31.0                 +120.0",
        "  file-backed MiB added      +100.0                  +10.0"]
    assert lines[-1] == ("embeddings of 2 sentences: max |sparsemap - sentence-transformers| = 2.00e-06 "
                         "(match, tolerance 1e-05)")


def test_minilm_embeddings_beyond_the_tolerance_or_of_another_shape_do_not_match() -> None:
    assert "(MISMATCH, tolerance 1e-05)" in demo.minilm_result(_minilm(1e-3), 1e-5).text
    runs = _minilm(0.0)
    runs["sentence-transformers"]["embeddings"] = runs["sentence-transformers"]["embeddings"][:1]
    result = demo.minilm_result(runs, 1e-5)
    assert not result.same and "= inf (MISMATCH" in result.text


def test_the_demo_module_imports_no_torch() -> None:
    code = ("import sys, sparsemap.models.demo\n"
            "leaked = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            "assert not leaked, leaked[:5]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
