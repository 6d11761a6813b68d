"""A transformers folder, written whole or not at all: what ``sparsemap convert`` makes of a GGUF file
or of a Meta release, and what sparsemap keeps in its cache to run them from. No torch.

The folder is built beside the destination and renamed into place when complete, so an interrupted
conversion leaves nothing under the destination's name; an existing folder that is not empty is never
written over. Its weights go by ``model.safetensors`` when their stored shapes are the model's, else by
:data:`~sparsemap.formats.reserved.WEIGHTS_NAME`, which other loaders do not take for the model.

A folder in the cache (:func:`cached_folder`: SmolLM2's, a Meta release joined for ``sparsemap run``)
says what it was made from in its :data:`COMPLETE_MARK`, one line each (a format version, the source's
file stamps): one whose mark is not exactly the lines wanted now is made again and replaces it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import DestinationError
from ..formats.reserved import RESHAPED_FORMAT, WEIGHTS_NAME

COMPLETE_MARK = ".complete"  # written last: a folder without it was not finished


def check_folder_destination(destination: str | os.PathLike[str], what: str) -> Path:
    """``destination`` as a folder that may be written: absent or empty, in a folder that exists.

    Args:
        destination: the folder to create.
        what: what converts into it, for the message (``"a GGUF"``).

    Raises:
        DestinationError: it is a file, a folder holding something, or its parent is missing.

    Example:
        >>> check_folder_destination("/no/such/place/out", "a GGUF")
        Traceback (most recent call last):
        ...
        sparsemap.errors.DestinationError: /no/such/place: the folder it would go in does not exist
    """
    out = Path(destination).absolute()
    if out.exists() and not out.is_dir():
        raise DestinationError(f"exists and is not a folder; {what} converts to a transformers folder",
                               path=out)
    if out.is_dir() and any(out.iterdir()):
        raise DestinationError("folder is not empty; give a new or empty folder (nothing is written over)",
                               path=out)
    if not out.parent.is_dir():
        raise DestinationError("the folder it would go in does not exist", path=out.parent)
    return out


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A new folder beside ``out`` to fill; put in ``out``'s place (absent or empty, checked by
    :func:`check_folder_destination`) only when the block ends without an error."""
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staging = Path(tmp) / "folder"
        staging.mkdir()
        yield staging
        if out.is_dir():
            out.rmdir()  # empty; os.replace onto a folder needs it gone
        os.replace(staging, out)


def name_weights(staging: Path) -> str:
    """The name of the weights written to ``staging / WEIGHTS_NAME``: renamed ``model.safetensors`` when
    their stored shapes are the model's (the file's format says so), so that every loader finds them."""
    from ..formats.dispatch import open_catalog

    if open_catalog(staging / WEIGHTS_NAME).metadata.get("format") == RESHAPED_FORMAT:
        return WEIGHTS_NAME
    os.replace(staging / WEIGHTS_NAME, staging / "model.safetensors")
    return "model.safetensors"


def save_configs(config: Any, folder: Path) -> None:
    """``config.json`` and the ``generation_config.json`` transformers derives from it."""
    from transformers import GenerationConfig

    config.save_pretrained(folder)
    GenerationConfig.from_model_config(config).save_pretrained(folder)


def replace_folder(staging_parent: Path, target: Path, build: Callable[[Path], None]) -> None:
    """Build a folder with ``build(path)`` beside ``target`` and put it in ``target``'s place, removing
    a previous ``target`` only once the new one is complete (for cache folders sparsemap owns)."""
    with tempfile.TemporaryDirectory(dir=staging_parent, prefix=f".{target.name}.") as tmp:
        staging = Path(tmp) / "folder"
        build(staging)
        if target.exists():  # moved aside, not removed in place: another process may be reading it
            with contextlib.suppress(FileNotFoundError):
                os.replace(target, Path(tmp) / "old")
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / COMPLETE_MARK).is_file():  # not another process's finished copy: a real fault
                raise


def is_current(target: Path, made_of: Sequence[str]) -> bool:
    """Whether the cached folder ``target`` is complete and was made from exactly ``made_of`` (its mark's
    lines: a source file gone from the list is a change too)."""
    marker = target / COMPLETE_MARK
    try:
        lines = marker.read_text().splitlines()
    except OSError:  # none yet (or not a file): not made
        return False
    return lines == list(made_of)


def cached_folder(target: Path, made_of: Sequence[str], build: Callable[[Path, str], None]) -> Path:
    """``target``, a folder sparsemap keeps in its cache: returned as it is when :func:`is_current`, else
    made by ``build(staging, mark)`` (a new folder at ``staging``, ``mark`` the text of its
    :data:`COMPLETE_MARK`: the lines ``made_of``) and put in ``target``'s place (:func:`replace_folder`).

    Example:
        >>> cached_folder(cache_dir() / "model", ["made of x 1", "folder 2"],       # doctest: +SKIP
        ...               lambda staging, mark: write_folder("x", staging, mark=mark))
    """
    if is_current(target, made_of):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    mark = "".join(f"{line}\n" for line in made_of)
    replace_folder(target.parent, target, lambda staging: build(staging, mark))
    return target
