"""GGUF Llama checkpoints seen with transformers' names, rows in transformers' order. No torch.

llama.cpp names tensors ``blk.N.attn_q.weight`` where transformers says
``model.layers.N.self_attn.q_proj.weight``, and its converter permutes the
rows of q and k within each head (it stores rotary pairs interleaved, where
transformers keeps them in halves). This module maps a GGUF catalog to
transformers' names and records the permutation as a row ``order``, so the
checkpoint puts the rows back (exact; a copy, as the tensor is dequantized
anyway). ``sparsemap convert`` then writes a file in transformers' layout,
which loads zero-copy.
"""

from __future__ import annotations

import re

from ..errors import GGUFArchitectureError
from ..formats.catalog import Catalog, TensorEntry

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER = re.compile(r"blk\.(\d+)\.(.+)")
SUPPORTED_ARCHITECTURES = ("llama",)


def hf_name(name: str) -> str | None:
    """transformers' name for a llama.cpp tensor name, or ``None`` if it has none."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    m = _LAYER.fullmatch(name)
    if m and m.group(2) in LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}"
    return None


def rotary_order(n_rows: int, n_heads: int) -> tuple[int, ...]:
    """``order[k]``: the transformers row stored at GGUF row ``k`` of a q or k projection.

    Per head, llama.cpp interleaves the two rotary halves: GGUF row
    ``h*D + 2*j + s`` holds transformers row ``h*D + s*(D/2) + j``.
    """
    if n_heads <= 0 or n_rows % (2 * n_heads):
        raise GGUFArchitectureError(f"{n_rows} rows cannot split into {n_heads} heads of rotary pairs")
    head_dim = n_rows // n_heads
    half = head_dim // 2
    return tuple(h * head_dim + s * half + j for h in range(n_heads) for j in range(half) for s in range(2))


def _int(meta: dict[str, str], key: str, path: str) -> int:
    try:
        return int(meta[key])
    except (KeyError, ValueError):
        raise GGUFArchitectureError(f"metadata {key!r} is missing or not an integer", path=path) from None


def hf_catalog(catalog: Catalog) -> Catalog:
    """The GGUF catalog under transformers' Llama names, q/k rows in transformers' order."""
    meta = catalog.metadata
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFArchitectureError(f"architecture {arch!r} is not mapped to transformers (supported: "
                                    f"{', '.join(SUPPORTED_ARCHITECTURES)})", path=catalog.source)
    n_heads = _int(meta, f"{arch}.attention.head_count", catalog.source)
    n_kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", n_heads))
    entries: dict[str, TensorEntry] = {}
    for name, e in catalog.items():
        hf = hf_name(name)
        if hf is None:
            raise GGUFArchitectureError(f"no transformers name for GGUF tensor {name!r}", path=catalog.source,
                                        tensor=name)
        order = None
        if hf.endswith("q_proj.weight"):
            order = rotary_order(e.shape[0], n_heads)
        elif hf.endswith("k_proj.weight"):
            order = rotary_order(e.shape[0], n_kv_heads)
        entries[hf] = e._replace(name=hf, order=order, order_dim=0)
    return Catalog(source=catalog.source, format="gguf:hf-llama", entries=entries, metadata=dict(meta),
                   stamps=catalog.stamps)


def llama_config_kwargs(catalog: Catalog) -> dict[str, object]:
    """``LlamaConfig`` arguments from a GGUF catalog's metadata (read from the header, fast)."""
    meta, path = catalog.metadata, catalog.source
    arch = meta.get("general.architecture", "llama")
    n_heads = _int(meta, f"{arch}.attention.head_count", path)
    hidden = _int(meta, f"{arch}.embedding_length", path)
    embed = catalog.get("token_embd.weight") or catalog.get("model.embed_tokens.weight")
    if embed is None:
        raise GGUFArchitectureError("no token embedding tensor", path=path)
    kwargs: dict[str, object] = {
        "hidden_size": hidden,
        "intermediate_size": _int(meta, f"{arch}.feed_forward_length", path),
        "num_hidden_layers": _int(meta, f"{arch}.block_count", path),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", n_heads)),
        "max_position_embeddings": _int(meta, f"{arch}.context_length", path),
        "rms_norm_eps": float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", "1e-6")),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", "10000")),
        "head_dim": int(meta.get(f"{arch}.rope.dimension_count", hidden // n_heads)),
        "vocab_size": embed.shape[0],
        "tie_word_embeddings": "output.weight" not in catalog and "lm_head.weight" not in catalog,
    }
    for gguf_key, hf_key in (("bos", "bos"), ("eos", "eos"), ("padding", "pad"), ("unknown", "unk")):
        value = meta.get(f"tokenizer.ggml.{gguf_key}_token_id")
        if value is not None:
            kwargs[f"{hf_key}_token_id"] = int(value)
    return kwargs
