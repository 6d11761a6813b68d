"""atheris target: any bytes, opened as a checkpoint, give a catalog or a sparsemap error, never a crash.

Each input is written to a file and opened with ``sparsemap.open`` (which
sniffs the format from the content); when it opens, every tensor is read.
Anything but a :class:`~sparsemap.errors.BadInputError` is a finding.

Usage (seeds are written into the corpus folder when it is empty):
    python fuzz/fuzz_open.py -max_total_time=60 fuzz/corpus
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris
import torch  # noqa: F401 - imported before instrumentation: only sparsemap's code is instrumented

with atheris.instrument_imports(include=["sparsemap"]):
    import sparsemap
    from sparsemap.errors import BadInputError

WORK = Path(tempfile.mkdtemp(prefix="sparsemap-fuzz-"))
TARGET = WORK / "input"


def test_one_input(data: bytes) -> None:
    TARGET.write_bytes(data)
    try:
        ckpt = sparsemap.Checkpoint(TARGET)
        for name in ckpt:
            ckpt.tensor(name)
    except BadInputError:
        pass


def write_seeds(corpus: Path) -> None:
    """Valid small files of every format (from the test corpus) as starting points."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.hostile.corpus import valid_files

    seeds = valid_files(WORK / "seeds")
    for fmt, path in seeds.items():
        if path.is_file() and not path.name.endswith(".json"):
            (corpus / f"seed-{fmt.replace(' ', '-')}").write_bytes(path.read_bytes())


def main() -> None:
    corpora = [Path(a) for a in sys.argv[1:] if not a.startswith("-")]
    for corpus in corpora:
        corpus.mkdir(parents=True, exist_ok=True)
        if not any(corpus.iterdir()):
            write_seeds(corpus)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
