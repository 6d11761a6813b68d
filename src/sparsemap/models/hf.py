"""transformers integration: ``sparsemap.from_pretrained``.

Builds the transformers model class from its config under
:func:`sparsemap.skeleton` (parameters on meta, buffers such as rotary caches
computed for real), then maps the checkpoint's weights into it. Sources: a
Hugging Face folder (config.json + safetensors / .bin, sharded or not), a
single checkpoint file with ``config=``, or a GGUF file of any architecture
transformers' GGUF tables map (config from its header, tensors renamed to
transformers' names and their values put back, dequantized on access:
:mod:`sparsemap.models.gguf_hf`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from ..errors import BadInputError, SourceNotFoundError, UnsupportedQuantizationError
from ..formats.catalog import Catalog
from ..formats.dispatch import open_catalog
from ..formats.source import ModelSource, resolve_source
from ..loader import Skip, load, skeleton
from ..names import Rename
from .gguf_hf import hf_catalog, hf_config, repacked

logger = logging.getLogger("sparsemap")


def resolve_config(src: ModelSource, config: Any = None) -> Any:
    """The transformers config of a source: ``config`` when given, a GGUF's header (through
    transformers' GGUF tables, :func:`~sparsemap.models.gguf_hf.hf_config`), else ``config.json``."""
    from transformers import AutoConfig

    if config is not None:
        return config
    if src.is_gguf:
        return hf_config(open_catalog(src))
    if src.config is None:
        raise SourceNotFoundError(f"no config.json next to the weights; pass config= (looked in "
                                  f"{src.folder})", path=src.path)
    try:
        return AutoConfig.from_pretrained(src.folder)
    except ValueError as e:  # an unknown model_type, a malformed config
        raise BadInputError(f"transformers cannot read config.json: {str(e).splitlines()[0][:200]}",
                            path=src.config) from None


def _gguf_catalog(src: ModelSource, model: nn.Module, keep_quantized: bool) -> Catalog:
    raw = open_catalog(src)
    if keep_quantized:
        try:
            return repacked(raw, model)
        except UnsupportedQuantizationError as e:
            logger.warning("%s: dequantized instead of kept quantized: %s", src.weights, e.detail)
    return hf_catalog(raw, model)


def class_for(config: Any) -> type[nn.Module]:
    """The transformers class a config names (``architectures``), else its causal-LM or base auto class."""
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    for auto in (AutoModelForCausalLM, AutoModel):
        try:
            return auto._model_mapping[type(config)]  # type: ignore[no-any-return]
        except KeyError:
            continue
    raise BadInputError(f"no transformers model class for config {type(config).__name__}")


def from_pretrained(source: str | os.PathLike[str] | ModelSource, *, config: Any = None,
                    dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    model_class: type[nn.Module] | None = None, skip: Skip = None,
                    strict: bool = False, rename: Rename = None, prefix: str | None = None,
                    keep_quantized: bool = False) -> nn.Module:
    """A transformers model with weights mapped from ``source``, in eval mode.

    Args:
        source: a Hugging Face folder, a checkpoint file (with ``config=``),
            or a GGUF file or folder holding one.
        config: a transformers config; read from the source when omitted.
        dtype: cast floating weights (one tensor at a time); ``None`` keeps the
            file's dtypes (GGUF quantized tensors come as float32).
        device: where the weights go; ``"cpu"`` keeps them as views of the file.
        model_class: the transformers class to build; from the config's
            ``architectures`` (or the causal-LM auto class) when omitted.
        skip, strict, rename, prefix: as for :func:`sparsemap.load`. As transformers does, a base
            model's weights load into a model with a head (its ``base_model_prefix`` added; the head
            initialised, with a warning) and the reverse (the head's weights left out); pass
            ``strict=True`` to refuse anything missing or left over instead.
        keep_quantized: for a GGUF loaded on the CPU, keep its quantized blocks (repacked once into the
            cache for the int4/int8 kernels, :func:`~sparsemap.models.gguf_hf.repacked`) instead of
            dequantizing every weight into memory; block types with no kernel layout dequantize as before.

    Example:
        >>> model = sparsemap.from_pretrained("SmolLM2-135M-Instruct/")      # doctest: +SKIP
        >>> model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=8)
    """
    src = source if isinstance(source, ModelSource) else resolve_source(source)
    config = resolve_config(src, config)
    cls = model_class or class_for(config)
    with skeleton():
        model = cls(config)
    # GGUF weights carry llama.cpp's names and values: seen as this model's (gguf_hf).
    catalog = _gguf_catalog(src, model, keep_quantized and torch.device(device).type == "cpu") \
        if src.is_gguf else open_catalog(src)
    load(model, catalog, device=device, dtype=dtype, skip=skip, strict=strict, rename=rename, prefix=prefix)
    model.eval()
    if hasattr(model, "generation_config") and src.generation_config is not None:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(src.folder)
    return model
