"""llama2.c checkpoints in the lean engine: the config from the header, ``run.c``'s tokenizer, the
weights mapped as they lie.

``sparsemap run model.bin "Once upon a time"`` continues the prompt as ``run.c`` does (BOS, its
tokenizer, greedy by default, stopping at BOS, which llama2.c's models emit between stories). The
model is sparsemap's lean :class:`~sparsemap.models.llama.Llama`, built from the header (SiLU, RMSNorm
eps 1e-5, rotary theta 10000: ``run.c``'s constants) with one difference: llama2.c stores the rows of
q and k in Meta's order (each head's rotary halves interleaved), and rather than copying those
matrices into transformers' order, the model maps them as stored and puts each projection's *output*
back in transformers' order (a permutation of ``heads * head_dim`` numbers per token). Every weight
stays a view of the file, Q8_0 matrices (version 2) included, which stay int8 for the kernel.

A transformers ``LlamaForCausalLM`` takes the same file through :func:`config` and
``sparsemap.load``: there q and k are served in transformers' row order (copies).

No torch at import (the engine, :class:`~sparsemap.models.generate.Llama2cEngine`, is picked before the
measured phases begin).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..errors import BadInputError
from ..formats.catalog import Catalog
from ..formats.dispatch import open_catalog
from ..formats.llama2c import Llama2cHeader, header_of
from ..formats.source import ModelSource
from .llama2c_tokenizer import BOS, EOS

if TYPE_CHECKING:
    from .llama import Llama, LlamaShape

# run.c's constants: rmsnorm's 1e-5f, RoPE's 10000.0f.
RMS_NORM_EPS = 1e-5
ROPE_THETA = 10000.0


def config(catalog: Catalog) -> dict[str, Any]:
    """transformers' ``config.json`` for a llama2.c model (``LlamaConfig(**config(catalog))``). No torch.

    Example:
        >>> cfg = config(sparsemap.open("stories15M.bin"))          # doctest: +SKIP
        >>> cfg["hidden_size"], cfg["num_hidden_layers"], cfg["tie_word_embeddings"]
        (288, 6, True)
    """
    h = header_of(catalog)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h.dim,
            "intermediate_size": h.hidden_dim, "num_hidden_layers": h.n_layers,
            "num_attention_heads": h.n_heads, "num_key_value_heads": h.n_kv_heads, "head_dim": h.head_size,
            "vocab_size": h.vocab_size, "max_position_embeddings": h.seq_len, "hidden_act": "silu",
            "rms_norm_eps": RMS_NORM_EPS, "rope_theta": ROPE_THETA, "tie_word_embeddings": h.shared,
            "bos_token_id": BOS, "eos_token_id": EOS}


def shape(header: Llama2cHeader) -> LlamaShape:
    """The lean runtime's hyper-parameters for a llama2.c header; generation stops at BOS, as in run.c."""
    from .llama import LlamaShape

    return LlamaShape(hidden_size=header.dim, intermediate_size=header.hidden_dim,
                      num_hidden_layers=header.n_layers, num_attention_heads=header.n_heads,
                      num_key_value_heads=header.n_kv_heads, head_dim=header.head_size,
                      rms_norm_eps=RMS_NORM_EPS, rope_theta=ROPE_THETA, vocab_size=header.vocab_size,
                      tie_word_embeddings=header.shared, eos_token_ids=(BOS,))


def _check(catalog: Catalog) -> None:
    if catalog.format != "llama2c":
        raise BadInputError(f"not a llama2.c checkpoint (format {catalog.format})", path=catalog.source)


def load(source: str | os.PathLike[str] | ModelSource | Catalog, dtype: Any = None) -> Llama:
    """The lean Llama with a llama2.c file's weights mapped (zero-copy when ``dtype`` is the file's).

    Example:
        >>> model = load("stories15M.bin")                                       # doctest: +SKIP
        >>> model.generate([1, 403, 2501, 263, 931], 20)
    """
    from .llama import Llama, map_weights

    catalog = source if isinstance(source, Catalog) else open_catalog(source)
    _check(catalog)
    return map_weights(Llama(shape(header_of(catalog))), catalog, dtype)

