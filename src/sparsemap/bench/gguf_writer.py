"""Transformers models written as GGUF files the way llama.cpp's converter writes them, float or in
K-quants: the tests' and benchmarks' own GGUFs of every architecture sparsemap maps (the ``gguf`` package
has the writer; the names, the row orders and the header keys are put back here).
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .k_quants import quantize_k


def write_like_llama_cpp(model: Any, path: str | os.PathLike[str], *,
                         quantize: Mapping[str, str] | None = None) -> Path:
    """``model`` (a transformers causal LM of an architecture in ``gguf_hf.MODEL_TYPES``) written as
    llama.cpp's converter writes it: its config as header keys (transformers' GGUF table read backwards),
    tensors under gguf's names (transformers' own name map, inverted), q/k rows of Llama-family models
    interleaved per head, Gemma's norm weights stored as ``1 + w``; no tokenizer.

    Tensors are float32, but matrices whose gguf name matches a pattern of ``quantize`` (fnmatch, the
    first that matches), which are written as that K-quant (:func:`~sparsemap.bench.k_quants.quantize_k`:
    ``"Q2_K"``, ``"Q3_K"``, ``"Q5_K"``).

    Example:
        >>> write_like_llama_cpp(model, "tiny.gguf", quantize={"blk.*": "Q5_K"})   # doctest: +SKIP
    """
    import gguf
    import numpy as np
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    from ..models.gguf_hf import MODEL_TYPES, NORM_PLUS_ONE, ROTARY_PERMUTED, rotary_order

    config = model.config
    arch = next(a for a, t in MODEL_TYPES.items() if t == config.model_type)
    stored = "llama" if arch == "mistral" else arch  # llama.cpp stores Mistral as llama, named so
    writer = gguf.GGUFWriter(os.fspath(path), stored)
    if arch == "mistral":
        writer.add_name("Mistral")
    for key, field in GGUF_CONFIG_MAPPING[arch].items():
        value = getattr(config, field, None) if field else None
        if isinstance(value, float):
            writer.add_float32(f"{stored}.{key}", value)
        elif isinstance(value, int) and not isinstance(value, bool):
            writer.add_uint32(f"{stored}.{key}", value)
    for add, token in ((writer.add_pad_token_id, config.pad_token_id),
                       (writer.add_bos_token_id, config.bos_token_id),
                       (writer.add_eos_token_id, config.eos_token_id)):
        if isinstance(token, int):  # a config may have none (or, for eos, a list)
            add(token)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    to_gguf = get_gguf_hf_weights_map(model, processor, model_type=stored if arch == "mistral" else None)
    state = model.state_dict()
    for gguf_name, hf_name in to_gguf.items():
        if hf_name not in state or (hf_name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        array = state[hf_name].detach().float().numpy()
        if arch in ROTARY_PERMUTED and any(f".attn_{p}." in gguf_name for p in "qk"):
            heads = config.num_attention_heads if ".attn_q." in gguf_name else config.num_key_value_heads
            array = array[np.array(rotary_order(array.shape[0], heads))]
        if arch in NORM_PLUS_ONE and gguf_name.endswith("norm.weight"):
            array = array + 1
        qtype = next((t for pattern, t in (quantize or {}).items()
                      if array.ndim == 2 and fnmatch.fnmatchcase(gguf_name, pattern)), None)
        if qtype is None:
            writer.add_tensor(gguf_name, np.ascontiguousarray(array))
        else:
            writer.add_tensor(gguf_name, quantize_k(array, qtype), raw_dtype=gguf.GGMLQuantizationType[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
