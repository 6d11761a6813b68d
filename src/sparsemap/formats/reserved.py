"""The names sparsemap reserves in the safetensors files it writes. No torch, no imports.

A file written by the layout compiler carries its layout as a JSON document
under ``__metadata__[LAYOUT_KEY]`` (read by :mod:`sparsemap.formats.layout`),
stores tensors in a special layout under a suffixed name, and fills
alignment gaps with padding tensors when asked to. Source tensors may not use these names.
The constants live apart from the layout reader so that the safetensors reader
can tell a laid-out file by its metadata without importing that reader.
"""

from __future__ import annotations

LAYOUT_KEY = "sparsemap.layout"
QUANT_KEY = "sparsemap.quantized"  # read by sparsemap.formats.quantized
PAD_PREFIX = "__sparsemap_pad__."
# Suffix of a stored tensor's name, by layout kind ("alias" stores nothing of its own).
SUFFIXES = {"rows": "@rows", "transpose": "@T", "bundle": "@bundle", "alias": ""}
# Quantized weights are stored as parts named ``<weight>@int4...`` or ``<weight>@int8...``.
QUANT_MARKS = ("@int4", "@int8")
# Source names sparsemap keeps for itself: its whole ``__sparsemap`` namespace (padding tensors are one
# part of it), and the safetensors header's own key, which a tensor of that name would overwrite.
RESERVED_PREFIX = "__sparsemap"
# A file some of whose stored tensors have other shapes than the model's (padded rows, transposes, bundles,
# quantized parts) says so in ``__metadata__["format"]``: loaders that check it (accelerate, transformers
# before 5) refuse such a file instead of loading it wrong. In a folder it is named WEIGHTS_NAME, which
# Hugging Face loaders do not look for.
RESHAPED_FORMAT = "sparsemap"
RESHAPED_KINDS = ("rows", "transpose", "bundle", "quant")
WEIGHTS_NAME = "model.sparsemap.safetensors"
# The weight files transformers, sentence-transformers and accelerate take for a folder's model.
# (case-insensitive: so are some filesystems; variants such as model.fp16.safetensors included)
HF_WEIGHT_FILE = (r"(?ai)(model|pytorch_model|diffusion_pytorch_model)(\.[\w-]+)?(-\d+-of-\d+)?"
                  r"\.(safetensors|bin)")
HEADER_KEYS = ("__metadata__",)


def is_padding(name: str) -> bool:
    """Whether ``name`` is a padding tensor's (meaningful only in a file with a layout document)."""
    return name.startswith(PAD_PREFIX)


def reserved_reason(name: str) -> str | None:
    """Why a source tensor may not be called ``name`` (it collides with what a file of ours stores), or None.

    Example:
        >>> reserved_reason("emb@rows"), reserved_reason("emb")
        ("ends in '@rows', the suffix of a tensor stored with padded or reordered rows", None)
    """
    if name in HEADER_KEYS:
        return f"{name!r} is the safetensors header's metadata key"
    if name.startswith(RESERVED_PREFIX):
        return (f"names starting with {RESERVED_PREFIX!r} are sparsemap's (padding tensors are "
                f"{PAD_PREFIX}<n>)")
    for kind, suffix in SUFFIXES.items():
        if suffix and name.endswith(suffix):
            what = {"rows": "padded or reordered rows", "transpose": "its columns as rows",
                    "bundle": "an FFN bundle"}.get(kind, kind)
            return f"ends in {suffix!r}, the suffix of a tensor stored with {what}"
    mark = next((m for m in QUANT_MARKS if m in name), None)
    if mark is not None:
        return f"contains {mark!r}, the mark of a quantized weight's stored parts"
    return None


def is_reserved(name: str) -> bool:
    """Whether a source tensor's ``name`` collides with names a file of ours stores."""
    return reserved_reason(name) is not None
