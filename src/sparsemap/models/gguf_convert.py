"""A GGUF file as a transformers folder: ``sparsemap convert model.gguf OUT/``.

The folder is what ``save_pretrained`` would have written for the same model:
``model.safetensors`` with transformers' names and row order (the values put
back as :mod:`sparsemap.models.gguf_hf` maps them; ``model.sparsemap.safetensors``
when the layout keeps quantized blocks or changes stored shapes, so that other
loaders refuse the folder rather than load it wrong), ``config.json`` built from
the header, the tokenizer converted by transformers (with the header's chat
template; none when the header holds no vocabulary), and ``generation_config.json``.
transformers, accelerate and sparsemap (with its lean engine, which runs folders and not GGUF files) load it
with no missing or unexpected key.

The folder is written beside the destination and renamed into place when
complete, so an interrupted conversion leaves nothing half-written under the
destination's name; an existing folder that is not empty is never written over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DestinationError
from ..formats.catalog import Catalog

if TYPE_CHECKING:
    from ..converter import ConvertSummary
from ..formats.planner import Layout
from ..formats.reserved import RESHAPED_FORMAT, WEIGHTS_NAME

logger = logging.getLogger("sparsemap")
COMPLETE_MARK = ".complete"  # written last: a folder without it was not finished


def check_folder_destination(destination: str | os.PathLike[str]) -> Path:
    """``destination`` as a folder that may be written: absent or empty, in a folder that exists.

    Raises:
        DestinationError: it is a file, a folder holding something, or its parent is missing.
    """
    out = Path(destination).absolute()
    if out.exists() and not out.is_dir():
        raise DestinationError("exists and is not a folder; a GGUF converts to a transformers folder",
                               path=out)
    if out.is_dir() and any(out.iterdir()):
        raise DestinationError("folder is not empty; give a new or empty folder (nothing is written over)",
                               path=out)
    if not out.parent.is_dir():
        raise DestinationError("the folder it would go in does not exist", path=out.parent)
    return out


def transformers_view(raw: Catalog) -> tuple[Catalog, Any]:
    """A GGUF catalog under transformers' names with its values put back, and the config of its model
    (``architectures`` naming the class): what a converted file holds.

    Raises:
        GGUFArchitectureError: an architecture transformers' GGUF tables do not map.
    """
    from ..extras import require
    from ..loader import skeleton
    from .gguf_hf import hf_catalog, hf_config
    from .hf import class_for

    require("transformers", needed_for="a GGUF converted to transformers' names")
    config = hf_config(raw)
    cls = class_for(config)
    config.architectures = [cls.__name__]
    with skeleton():
        model = cls(config)
    return hf_catalog(raw, model), config


def write_folder(gguf: str | os.PathLike[str], destination: str | os.PathLike[str], *,
                 layout: Layout | None = None, mark: str = "",
                 on_bytes: Callable[[int], None] | None = None) -> ConvertSummary:
    """Write ``gguf`` as a transformers folder at ``destination`` (absent or empty).

    Args:
        gguf: a GGUF file of an architecture transformers' GGUF tables map
            (:data:`~sparsemap.models.gguf_hf.MODEL_TYPES`).
        destination: the folder to create.
        layout: how ``model.safetensors`` is laid out (alignment by default;
            ``Layout(quantize="keep")`` keeps the quantized blocks for torch's int4/int8 kernels).
        mark: text written into the folder's ``.complete`` marker (what the folder was made from).
        on_bytes: called with the bytes written so far, for a progress bar.

    Returns:
        The :class:`~sparsemap.converter.ConvertSummary` of the weights file.

    Raises:
        DestinationError: see :func:`check_folder_destination`.
        GGUFArchitectureError: an architecture transformers does not map.

    Example:
        >>> write_folder("SmolLM2-135M-Instruct-Q4_K_M.gguf", "smollm2/")   # doctest: +SKIP
        >>> sparsemap.from_pretrained("smollm2/")                          # doctest: +SKIP
    """
    from transformers import GenerationConfig

    from ..converter import convert
    from ..formats.dispatch import open_catalog
    from ..formats.source import resolve_source
    from .gguf_hf import gguf_tokenizer

    out = check_folder_destination(destination)
    source = resolve_source(gguf)
    raw = open_catalog(source)
    catalog, config = transformers_view(raw)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staging = Path(tmp) / "folder"
        staging.mkdir()
        summary = convert(catalog, staging / WEIGHTS_NAME, layout=layout, on_bytes=on_bytes)
        weights = WEIGHTS_NAME
        if open_catalog(staging / WEIGHTS_NAME).metadata.get("format") != RESHAPED_FORMAT:
            weights = "model.safetensors"  # the model's own shapes: named for every loader
            os.replace(staging / WEIGHTS_NAME, staging / weights)
        config.save_pretrained(staging)
        GenerationConfig.from_model_config(config).save_pretrained(staging)
        if "tokenizer.ggml.model" in raw.metadata:
            gguf_tokenizer(source).save_pretrained(staging)
        else:
            logger.warning("%s: the header holds no tokenizer; the folder has none", source.weights)
        (staging / COMPLETE_MARK).write_text(mark or f"{Path(source.weights).name}\n")
        if out.is_dir():
            out.rmdir()  # empty (checked above); os.replace onto a folder needs it gone
        os.replace(staging, out)
    return dataclasses.replace(summary, destination=str(out / weights))


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
