"""Every malformed file in the corpus raises its own sparsemap error, naming file, tensor and numbers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

import sparsemap
from sparsemap.cli import main
from sparsemap.errors import BadInputError, SparsemapError

from .corpus import FAULTS, Fault, valid_files


def test_the_corpus_is_large_and_covers_every_format() -> None:
    assert len(FAULTS) >= 40
    assert len({f.name for f in FAULTS}) == len(FAULTS)
    by_format = Counter(f.fmt for f in FAULTS)
    assert set(by_format) == {"safetensors", "layout", "pytorch zip", "shard index", "gguf", "llama2c",
                              "mlc", "meta-llama"}, by_format
    assert min(by_format.values()) >= 5, by_format


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_fault_raises_its_error(fault: Fault, tmp_path: Path) -> None:
    path = fault.write(tmp_path)
    with pytest.raises(SparsemapError) as info:
        sparsemap.open(path)
    err = info.value
    assert type(err) is fault.error, f"expected {fault.error.__name__}, got {type(err).__name__}: {err}"
    assert isinstance(err, BadInputError)
    message = str(err)
    assert Path(err.path or "").name and Path(err.path).name in message, message  # names the file
    for needle in fault.needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    # The command line says the same in one line, exit code 2, no traceback.
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and fault.error.__name__ not in result.output


def test_malicious_pickle_never_runs(tmp_path: Path) -> None:
    target = Path("/tmp/sparsemap-pwned")
    target.unlink(missing_ok=True)
    fault = next(f for f in FAULTS if f.name == "pickle calls a global outside the allowlist")
    path = fault.write(tmp_path)
    for attempt in (lambda: sparsemap.open(path), lambda: sparsemap.load_state_dict(path)):
        with pytest.raises(SparsemapError):
            attempt()
    assert not target.exists()


def test_valid_seeds_open(tmp_path: Path) -> None:
    for fmt, path in valid_files(tmp_path).items():
        ckpt = sparsemap.Checkpoint(path)
        assert len(ckpt) >= 2, fmt
        for name in ckpt:
            ckpt.tensor(name)
