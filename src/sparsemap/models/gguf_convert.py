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

The folder is written whole or not at all (:mod:`sparsemap.models.hf_folder`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..formats.catalog import Catalog
from ..formats.planner import Layout
from ..formats.reserved import WEIGHTS_NAME
from .hf_folder import COMPLETE_MARK, check_folder_destination, name_weights, save_configs, staged_folder

if TYPE_CHECKING:
    from ..converter import ConvertSummary

logger = logging.getLogger("sparsemap")


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
                 on_bytes: Callable[[int], None] | None = None,
                 view: tuple[Catalog, Any] | None = None) -> ConvertSummary:
    """Write ``gguf`` as a transformers folder at ``destination`` (absent or empty).

    Args:
        gguf: a GGUF file of an architecture transformers' GGUF tables map
            (:data:`~sparsemap.models.gguf_hf.MODEL_TYPES`).
        destination: the folder to create.
        layout: how ``model.safetensors`` is laid out (alignment by default;
            ``Layout(quantize="keep")`` keeps the quantized blocks for torch's int4/int8 kernels).
        mark: text written into the folder's ``.complete`` marker (what the folder was made from).
        on_bytes: called with the bytes written so far, for a progress bar.
        view: what :func:`transformers_view` gives for this file, when the caller has it already.

    Returns:
        The :class:`~sparsemap.converter.ConvertSummary` of the weights file.

    Raises:
        DestinationError: see :func:`~sparsemap.models.hf_folder.check_folder_destination`.
        GGUFArchitectureError: an architecture transformers does not map.

    Example:
        >>> write_folder("SmolLM2-135M-Instruct-Q4_K_M.gguf", "smollm2/")   # doctest: +SKIP
        >>> sparsemap.from_pretrained("smollm2/")                          # doctest: +SKIP
    """
    from ..converter import convert
    from ..formats.dispatch import open_catalog
    from ..formats.source import resolve_source
    from .gguf_hf import gguf_tokenizer

    out = check_folder_destination(destination, "a GGUF")
    source = resolve_source(gguf)
    raw = open_catalog(source)
    catalog, config = view if view is not None else transformers_view(raw)
    with staged_folder(out) as staging:
        summary = convert(catalog, staging / WEIGHTS_NAME, layout=layout, on_bytes=on_bytes)
        weights = name_weights(staging)
        save_configs(config, staging)
        if "tokenizer.ggml.model" in raw.metadata:
            gguf_tokenizer(source).save_pretrained(staging)
        else:
            logger.warning("%s: the header holds no tokenizer; the folder has none", source.weights)
        (staging / COMPLETE_MARK).write_text(mark or f"{Path(source.weights).name}\n")
    return dataclasses.replace(summary, destination=str(out / weights))
