"""The README's Python snippets run as written, each in a fresh process, on the real models.

Each ```python block runs in its own temporary folder holding the files the
README names (links into the model cache): ``SmolLM2/`` (the float32 folder),
``model.safetensors`` (its weights), ``model-q.safetensors`` (the GGUF's
blocks kept, ``--quantize keep``) and ``gemma-3-270m-q4_k_m.gguf``. A block
that cannot run here is marked in the README by a comment on the line before
it, ``<!-- not tested: REASON -->``, and is reported as skipped with that
reason.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
NOT_TESTED = re.compile(r"^<!--\s*not tested:\s*(?P<reason>.+?)\s*-->$")


class Snippet(NamedTuple):
    """A ```python block: where it starts (1-based line of its fence), its code, why it is not run."""

    line: int
    code: str
    not_tested: str | None


def snippets(text: str) -> list[Snippet]:
    """The ```python blocks of a Markdown text, each with the reason on the line before it, if any."""
    lines = text.splitlines()
    out = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            i += 1
            body = []
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise AssertionError(f"README line {start + 1}: a ```python block that never closes")
            before = lines[start - 1].strip() if start else ""
            marker = NOT_TESTED.match(before)
            out.append(Snippet(start + 1, "\n".join(body) + "\n", marker["reason"] if marker else None))
        i += 1
    return out


SNIPPETS = snippets(README.read_text())


def test_the_marker_parser_reads_reasons_and_blocks() -> None:
    text = ("# t\n\n```python\nx = 1\n```\n\n<!-- not tested: needs CUDA -->\n```python\ny = 2\n```\n"
            "```sh\nls\n```\n")
    assert snippets(text) == [Snippet(3, "x = 1\n", None), Snippet(8, "y = 2\n", "needs CUDA")]


def test_every_untested_snippet_says_why_and_most_are_tested() -> None:
    assert len(SNIPPETS) >= 6, "the README's Python snippets were not found"
    skipped = [s for s in SNIPPETS if s.not_tested is not None]
    assert all(s.not_tested for s in skipped)
    assert len(skipped) <= len(SNIPPETS) // 3, [s.line for s in skipped]


@pytest.fixture(scope="module")
def model_files() -> dict[str, Path]:
    """README name -> the cached file or folder it stands for."""
    from sparsemap.models import assets, smollm2

    try:
        floats = smollm2.prepare(quiet=True)
        quantized = smollm2.prepare_quantized(quiet=True)
        gemma = assets.fetch(assets.GEMMA3, quiet=True) / assets.GEMMA3.file_name
    except assets.AssetError as e:
        pytest.skip(f"the README's models are not in the cache and could not be fetched: {e}")
    return {"SmolLM2": floats, "model.safetensors": floats / "model.safetensors",
            "model-q.safetensors": quantized / "model.sparsemap.safetensors",
            "gemma-3-270m-q4_k_m.gguf": gemma}


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"README-line-{s.line}" for s in SNIPPETS])
def test_readme_snippet_runs_as_written(snippet: Snippet, model_files: dict[str, Path],
                                        tmp_path: Path) -> None:
    if snippet.not_tested is not None:
        pytest.skip(f"README line {snippet.line}: not tested: {snippet.not_tested}")
    for name, target in model_files.items():
        (tmp_path / name).symlink_to(target)
    # HF_HUB_OFFLINE and SPARSEMAP_CACHE come from the environment (conftest sets the offline flags).
    proc = subprocess.run([sys.executable, "-c", snippet.code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"README line {snippet.line} failed:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
