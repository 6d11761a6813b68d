"""Fuzzing: mutated valid files (hypothesis, in the suite) and the atheris target in fuzz/ (bounded)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsemap
from sparsemap.errors import BadInputError

from .corpus import valid_files

ROOT = Path(__file__).resolve().parents[2]
SEED_DIR = Path(__import__("tempfile").mkdtemp(prefix="sparsemap-seeds-"))
SEEDS = {fmt: path.read_bytes() for fmt, path in valid_files(SEED_DIR).items() if fmt != "shard index"}


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A seed with a few bytes overwritten, inserted or deleted, or cut short."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["set", "insert", "delete", "cut"]))
        # Mutations aim at the first 512 bytes most of the time: that is where the headers are.
        limit = len(data) if draw(st.booleans()) else min(len(data), 512)
        at = draw(st.integers(0, max(0, limit - 1)))
        if op == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[at:at + draw(st.integers(1, 8))]
        elif op == "cut":
            del data[at:]
    return bytes(data)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(content=mutated())
def test_mutated_file_opens_cleanly_or_fails_cleanly(content: bytes, tmp_path_factory: pytest.TempPathFactory
                                                     ) -> None:
    path = tmp_path_factory.getbasetemp() / "mutated.bin"
    path.write_bytes(content)
    try:
        ckpt = sparsemap.Checkpoint(path)
    except BadInputError as e:
        assert e.path == str(path)
        return
    for name in ckpt:  # whatever opened reads in full, in its declared shape
        entry = ckpt.catalog[name]
        tensor = ckpt.tensor(name)
        assert tuple(tensor.shape) == tuple(entry.shape), name


@pytest.mark.slow
def test_atheris_target_runs_without_a_finding(tmp_path: Path) -> None:
    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris is not installed (pip install atheris; it ships wheels for Linux x86-64)")
    corpus = tmp_path / "corpus"
    proc = subprocess.run([sys.executable, str(ROOT / "fuzz" / "fuzz_open.py"), "-max_total_time=20",
                           f"-artifact_prefix={tmp_path}/", str(corpus)],
                          check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    done = re.search(r"Done (\d+) runs in (\d+) second", proc.stderr)
    assert proc.returncode == 0 and done, proc.stderr[-3000:]
    assert int(done.group(1)) > 1000
    assert not list(tmp_path.glob("crash-*"))
    print(f"atheris: {done.group(1)} executions in {done.group(2)} s without a finding")
