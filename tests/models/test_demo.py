"""The demo's analysis, on reports written by hand: the comparison table, its ratios, the verdicts.

The reports have the shape of :func:`sparsemap.models.generate.answer`'s (the
fields :func:`~sparsemap.models.generate.figures` reads) and of the MiniLM
children's; no model runs here.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from sparsemap.models import demo

MiB = 1 << 20


def _phase(name: str, seconds: float, anon_mib: float, file_mib: float, peak_anon_mib: float | None = None,
           peak_rss_mib: float | None = None) -> dict[str, Any]:
    anon, file = int(anon_mib * MiB), int(file_mib * MiB)
    return {"name": name, "seconds": seconds, "after": {"rss": anon + file, "anon": anon, "file": file},
            "peak_anon": int((peak_anon_mib or anon_mib) * MiB),
            "peak_rss": int((peak_rss_mib or anon_mib + file_mib) * MiB)}


def _answer(*, load_s: float, first_token_s: float, tokens_per_s: float, weights_anon_mib: float,
            peak_anon_mib: float, peak_rss_mib: float, tokens: list[int],
            text: str = " Paris. ") -> dict[str, Any]:
    """A report like generate.answer()'s: phases import torch, import ..., tokenizer, weights, generate."""
    torch_anon = 143.0  # what `import torch` costs here, the figure the verdict line quotes
    after_tokenizer = torch_anon + 40
    phases = [_phase("import torch", 1.5, torch_anon, 130),
              _phase("import tokenizers", 0.1, torch_anon + 30, 140),
              _phase("tokenizer", 0.05, after_tokenizer, 141),
              _phase("weights", load_s - 0.05, after_tokenizer + weights_anon_mib, 150),
              _phase("generate", 2.0, after_tokenizer + weights_anon_mib, 600, peak_anon_mib, peak_rss_mib)]
    return {"answer": text, "tokens": tokens, "new_tokens": len(tokens), "load_s": load_s,
            "first_token_s": first_token_s, "tokens_per_s": tokens_per_s, "tracker": {"phases": phases},
            "table": "memory by phase (MiB)\nphase  time s  RSS"}


# What the hand-made runs of _three() must print (the README shows this table): widths and ratios matter.
SMOLLM2_TABLE = """\
                                    sparsemap (lean)  sparsemap + transformers model  transformers (GGUF)
load: tokenizer + weights, s            0.20 (0.01x)                    0.33 (0.02x)                18.64
first token, s after loading began      0.41 (0.02x)                    0.56 (0.03x)                18.81
weights: anonymous MiB added                    +1.2                            +0.4               +541.7
peak anonymous MiB (whole run)           186 (0.19x)                     330 (0.34x)                  978
peak RSS MiB (whole run)                 780 (0.67x)                     930 (0.79x)                 1170
tokens/s after the first                        17.5                            15.0                 12.2
"""


def _three(reference_tokens: list[int] | None = None) -> dict[str, dict[str, Any]]:
    tokens = [791, 6722, 315, 9822, 374, 12366, 13]
    return {
        "sparsemap (lean)": _answer(load_s=0.20, first_token_s=0.41, tokens_per_s=17.5, weights_anon_mib=1.2,
                                    peak_anon_mib=186, peak_rss_mib=780, tokens=tokens),
        "sparsemap + transformers model": _answer(load_s=0.33, first_token_s=0.56, tokens_per_s=15.0,
                                                  weights_anon_mib=0.4, peak_anon_mib=330, peak_rss_mib=930,
                                                  tokens=tokens),
        "transformers (GGUF)": _answer(load_s=18.64, first_token_s=18.81, tokens_per_s=12.25,
                                       weights_anon_mib=541.7, peak_anon_mib=978, peak_rss_mib=1170,
                                       tokens=reference_tokens or tokens),
    }


def test_smollm2_table_shows_each_figure_with_its_ratio_to_the_reference() -> None:
    result = demo.smollm2_result(_three())
    lines = result.text.splitlines()
    start = lines.index("(ratios: against transformers' GGUF loading)")
    assert lines[start + 1:start + 8] == SMOLLM2_TABLE.splitlines()
    assert result.same and result.runs.keys() == _three().keys()
    assert lines[-1] == ("same tokens from all three: yes. `import torch` alone costs 143 MiB anonymous "
                         "in every process.")


def test_smollm2_text_holds_each_answer_and_its_titled_phase_table() -> None:
    text = demo.smollm2_result(_three()).text
    assert text.startswith("\nsparsemap (lean) answers: Paris.\nsparsemap (lean): memory by phase (MiB)\n")
    for label in _three():
        assert f"\n{label} answers: Paris.\n{label}: memory by phase (MiB)\n" in text


def test_smollm2_different_tokens_are_a_failed_verdict() -> None:
    result = demo.smollm2_result(_three(reference_tokens=[791, 6722, 315, 9822, 374, 12366, 0]))
    assert not result.same
    assert "same tokens from all three: NO." in result.text


def test_smollm2_two_ways_compare_against_the_second() -> None:
    runs = dict(list(_three().items())[1:])
    result = demo.smollm2_result(runs)
    assert "same tokens from both: yes." in result.text
    peak = next(line for line in result.text.splitlines() if line.startswith("peak anonymous MiB"))
    assert peak.split() == ["peak", "anonymous", "MiB", "(whole", "run)", "330", "(0.34x)", "978"]
    with pytest.raises(ValueError, match="at least two runs"):
        demo.smollm2_result(dict(list(runs.items())[:1]))


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
