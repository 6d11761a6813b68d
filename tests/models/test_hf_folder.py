"""The cache folders sparsemap keeps (SmolLM2's, a Meta release written for ``sparsemap run``): made once,
taken as they are while their mark says what they were made from, made again, whole, when it does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparsemap.models.hf_folder import COMPLETE_MARK, cached_folder, is_current


def _builder(calls: list[str], text: str):
    def build(staging: Path, mark: str) -> None:
        calls.append(mark)
        staging.mkdir()
        (staging / "weights").write_text(text)
        (staging / COMPLETE_MARK).write_text(mark)

    return build


def test_a_folder_is_made_once_and_again_when_what_it_is_made_of_changes(tmp_path: Path):
    target, calls = tmp_path / "cache" / "model", []
    assert not is_current(target, ["v1", "file size 10"])
    assert cached_folder(target, ["v1", "file size 10"], _builder(calls, "first")) == target
    assert calls == ["v1\nfile size 10\n"] and (target / "weights").read_text() == "first"
    assert is_current(target, ["v1", "file size 10"])
    assert not is_current(target, ["v1"])  # made of a file no longer in the list: not this folder
    cached_folder(target, ["v1", "file size 10"], _builder(calls, "unused"))
    assert len(calls) == 1
    cached_folder(target, ["v1", "file size 12"], _builder(calls, "second"))
    assert len(calls) == 2 and (target / "weights").read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["model"]  # nothing left beside it


def test_a_build_that_fails_leaves_the_folder_that_was_there(tmp_path: Path):
    target, calls = tmp_path / "model", []
    cached_folder(target, ["v1"], _builder(calls, "first"))

    def fail(staging: Path, mark: str) -> None:
        staging.mkdir()
        (staging / "weights").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cached_folder(target, ["v2"], fail)
    assert (target / "weights").read_text() == "first" and is_current(target, ["v1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_folder_without_its_mark_is_not_current(tmp_path: Path):
    (tmp_path / "model").mkdir()
    assert not is_current(tmp_path / "model", [])  # even when nothing is asked of it: never finished
