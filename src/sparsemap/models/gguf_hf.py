"""Any GGUF architecture transformers loads, seen as transformers' model: config, names, values.

Three things differ between a llama.cpp file and a transformers checkpoint of
the same model, and each comes from a table someone else keeps:

- the config: transformers' ``GGUF_CONFIG_MAPPING`` (GGUF key -> config field),
  read from the header's scalars (sparsemap's own walk, milliseconds);
- the tensor names: the ``gguf`` package's name map for the architecture,
  matched against the names of the transformers model built from that config
  (transformers' ``get_gguf_hf_weights_map``, on a model with no weights);
- the values, where llama.cpp's converter changed them: the rows of q and k
  within each head for Llama-family files (put back as a row ``order``, see
  :func:`~sparsemap.formats.rotary.rotary_order`), and Gemma's norm weights,
  which it stores as ``1 + w`` (given back with a ``shift`` of -1).

The tokenizer is transformers' conversion of the header's vocabulary, done
once and kept in the cache (:func:`gguf_tokenizer`).

Quantized tensors stay quantized in the file: dequantized on access, or
repacked with ``sparsemap convert --quantize keep``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..errors import GGUFArchitectureError
from ..formats.catalog import Catalog, TensorEntry
from ..formats.rotary import rotary_order
from ..formats.source import ModelSource

# llama.cpp architecture -> transformers model_type: the architectures transformers' GGUF loading knows
# whose values need no transform beyond those below. Checked in tests/models/test_gguf_architectures.py
# on real files against transformers' own GGUF loading (llama: SmolLM2; gemma3: Gemma 3 270M), and every
# one on files written from a transformers model the way llama.cpp's converter writes them.
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
               "gemma2": "gemma2", "gemma3": "gemma3_text", "phi3": "phi3"}
logger = logging.getLogger("sparsemap")
ROTARY_PERMUTED = ("llama", "mistral")  # llama.cpp interleaves q/k rotary halves for these
NORM_PLUS_ONE = ("gemma2", "gemma3")  # llama.cpp stores Gemma's RMSNorm weights as 1 + w


def architecture(catalog: Catalog) -> str:
    """The file's llama.cpp architecture, ``mistral`` for Mistral models stored as ``llama`` (as
    transformers reads them); refused by name when transformers has no mapping for it. No torch."""
    arch = catalog.metadata.get("general.architecture", "")
    if arch == "llama" and "mistral" in catalog.metadata.get("general.name", "").lower():
        arch = "mistral"
    if arch not in MODEL_TYPES:
        raise GGUFArchitectureError(f"architecture {arch!r} is not mapped to transformers (supported: "
                                    f"{', '.join(sorted(MODEL_TYPES))})", path=catalog.source)
    return arch


def _typed(text: str) -> Any:
    """A header scalar back from its text (the catalog keeps metadata as strings)."""
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            continue
    return {"True": True, "False": False}.get(text, text)


def hf_config(catalog: Catalog) -> Any:
    """transformers' config for a GGUF file, from its header as transformers' GGUF tables map it."""
    from transformers import AutoConfig
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    arch = architecture(catalog)
    stored = catalog.metadata.get("general.architecture", arch)
    fields: dict[str, Any] = dict(GGUF_CONFIG_DEFAULTS_MAPPING.get(MODEL_TYPES[arch], {}))
    for key, text in catalog.metadata.items():
        prefix, _, rest = key.partition(".")
        section = arch if prefix == stored else prefix  # llama.* keys of a Mistral file are Mistral's
        target = GGUF_CONFIG_MAPPING.get(section, {}).get(rest) if section in (arch, "tokenizer") else None
        if target not in (None, -1):
            fields[target] = _typed(text)
    embed = catalog.get("token_embd.weight")
    if embed is None:
        raise GGUFArchitectureError("no token embedding tensor (token_embd.weight)", path=catalog.source)
    fields.setdefault("vocab_size", embed.shape[0])
    fields["tie_word_embeddings"] = "output.weight" not in catalog
    fields.pop("model_type", None)
    return AutoConfig.for_model(MODEL_TYPES[arch], **fields)


def hf_catalog(catalog: Catalog, model: Any) -> Catalog:
    """The GGUF catalog under the names of ``model`` (a transformers model built from
    :func:`hf_config`, on the meta device), with the values put back as transformers keeps them.

    Tensors of the file the model has no name for (llama 3's ``rope_freqs.weight``, which the model
    computes) are left out, as transformers leaves them; a model tensor the file lacks is refused
    when loading.
    """
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    arch = architecture(catalog)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
    # gguf's tables know Mistral files by what they are stored as: llama (transformers' own loading asks
    # for "mistral" and fails with this gguf).
    to_hf = get_gguf_hf_weights_map(model, processor, model_type="llama" if arch == "mistral" else None)
    config = model.config
    entries: dict[str, TensorEntry] = {}
    left_out = []
    for name, e in catalog.items():
        hf = to_hf.get(name)
        if hf is None:  # a tensor the model computes (llama 3's rope_freqs.weight): as transformers does
            left_out.append(name)
            continue
        entry = e._replace(name=hf)
        if arch in ROTARY_PERMUTED and any(f".attn_{p}." in name for p in "qk"):  # weights and biases
            heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
            entry = entry._replace(order=rotary_order(e.shape[0], heads), order_dim=0)
        if arch in NORM_PLUS_ONE and name.endswith("norm.weight"):
            entry = entry._replace(shift=-1.0)
        entries[hf] = entry
    if left_out:
        logger.info("%s: tensors with no name in %s left out: %s", catalog.source, type(model).__name__,
                    ", ".join(left_out[:8]))
    return Catalog(source=catalog.source, format=f"gguf:hf-{arch}", entries=entries,
                   metadata=dict(catalog.metadata), stamps=catalog.stamps)


def gguf_tokenizer(source: ModelSource) -> Any:
    """transformers' tokenizer of a GGUF file, converted from its header once and kept in the cache
    (``tokenizers/<file>-<hash of path, size, mtime>``): the conversion takes seconds (16 s for Gemma 3's
    262k vocabulary), loading the saved ``tokenizer.json`` a fraction of one. The header's
    ``tokenizer.chat_template``, which transformers' conversion leaves out, is kept with it."""
    import hashlib
    import shutil
    import tempfile

    import transformers
    from transformers import AutoTokenizer

    from ..formats.catalog import FileStamp
    from ..formats.dispatch import open_catalog
    from .assets import cache_dir

    weights = Path(source.weights)
    stamp = FileStamp.of(str(weights))
    # transformers' version too: a newer conversion is not served a stale tokenizer.json.
    identity = f"{weights.resolve()}|{stamp.size}|{stamp.mtime_ns}|{transformers.__version__}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:12]
    folder = cache_dir() / "tokenizers" / f"{weights.stem}-{key}"
    if (folder / ".complete").is_file():
        return AutoTokenizer.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(source.folder, gguf_file=weights.name)
    template = open_catalog(source).metadata.get("tokenizer.chat_template")
    if template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.") as tmp:
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / ".complete").write_text(str(weights.resolve()) + "\n")
        if folder.exists() and not (folder / ".complete").is_file():  # an interrupted earlier attempt
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
            os.makedirs(tmp)  # for the context manager to remove
        except OSError:  # another process put its copy in place first: keep it, drop ours
            pass
    return tokenizer


def repacked(catalog: Catalog, model: Any) -> Catalog:
    """The GGUF's weights as ``model`` names them, their blocks kept quantized in the int4/int8 kernels'
    layouts: a file written once into the cache (``gguf/<file>-<hash>.safetensors``, keyed by the GGUF's
    path, inode, size, mtime and change time, and this torch's int4 packing) and mapped from then on.
    Quantized weights then cost their packed size in the page cache instead of a float32 copy in anonymous
    memory; a weight in a block type with no kernel layout (IQ) is stored dequantized, with a note.
    """
    import hashlib

    from ..converter import convert
    from ..formats.dispatch import open_catalog
    from ..formats.planner import Layout
    from ..quantize import int4_layout
    from .assets import cache_dir

    path = catalog.source
    stamp = catalog.stamps[path]
    # The inode and change time too: a GGUF rewritten in place with its old mtime restored is a new file.
    identity = (f"{path}|{stamp.ino}|{stamp.size}|{stamp.mtime_ns}|{stamp.ctime_ns}|{type(model).__name__}|"
                f"{int4_layout()}")
    key = hashlib.sha256(identity.encode()).hexdigest()[:12]
    target = cache_dir() / "gguf" / f"{os.path.basename(path)}-{key}.safetensors"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        logger.info("%s: repacking its blocks for the int4/int8 kernels, once, into %s", path, target)
        convert(hf_catalog(catalog, model), target, layout=Layout(quantize="keep"))
    return open_catalog(target)
