"""Sentence embeddings from an encoder folder, pooled as its sentence-transformers config says.

A sentence-transformers folder lists its modules in ``modules.json``: the
transformer (weights and config at ``path``), a ``Pooling`` module whose
``config.json`` names the modes (CLS token, mean, max, mean over the square
root of the length, last token), and often ``Normalize`` (L2). The encoder
is transformers' base model class for the config, with weights mapped by
:func:`~sparsemap.models.hf.from_pretrained` (a config naming a class with a
head, such as ``MPNetForMaskedLM``, still builds the base model: its weights
load with or without the ``base_model_prefix``). A plain transformers folder
without ``modules.json`` is mean-pooled, as sentence-transformers does for one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadInputError
from ..extras import require

# sentence-transformers' pooling modes, in the order it concatenates them.
POOLING_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens", "lasttoken")


@dataclass(frozen=True)
class Pipeline:
    """How a folder turns token states into one vector per text.

    Attributes:
        encoder: the folder holding the transformer's config and weights.
        modes: pooling modes, from :data:`POOLING_MODES`.
        normalize: whether vectors are scaled to unit L2 norm.
        max_length: tokens per text at most (longer texts are truncated).
    """

    encoder: Path
    modes: tuple[str, ...] = ("mean_tokens",)
    normalize: bool = False
    max_length: int = 512

    @classmethod
    def of(cls, folder: str | os.PathLike[str]) -> Pipeline:
        """Read ``modules.json`` and the pooling config of ``folder`` (defaults without them).

        Raises:
            BadInputError: a module sparsemap does not run (a Dense layer, an unknown pooling mode).
        """
        root = Path(folder)
        modules_file = root / "modules.json"
        if not modules_file.is_file():
            return cls(encoder=root)
        modules = _json(modules_file)
        if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
            raise BadInputError("modules.json must be a list of objects", path=modules_file)
        encoder, modes, normalize = root, ("mean_tokens",), False
        for module in modules:
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            where = root / str(module.get("path", ""))
            if kind == "Transformer":
                encoder = where
            elif kind == "Pooling":
                config = _json(where / "config.json")
                if not isinstance(config, dict):
                    raise BadInputError("the pooling config must be a JSON object",
                                        path=where / "config.json")
                modes = tuple(m for m in POOLING_MODES if config.get(f"pooling_mode_{m}"))
                unknown = [k for k, v in config.items() if k.startswith("pooling_mode_") and v
                           and k.removeprefix("pooling_mode_") not in POOLING_MODES]
                if unknown or not modes:
                    raise BadInputError(f"pooling {unknown or 'with no mode'} is not one sparsemap computes "
                                        f"({', '.join(POOLING_MODES)})", path=where / "config.json")
            elif kind == "Normalize":
                normalize = True
            else:
                raise BadInputError(f"module {kind or module!r} is not one sparsemap runs (Transformer, "
                                    "Pooling, Normalize)", path=modules_file)
        settings = encoder / "sentence_bert_config.json"
        max_length = 512
        if settings.is_file():
            doc = _json(settings)
            value = doc.get("max_seq_length") if isinstance(doc, dict) else None
            if value is not None and (type(value) is not int or value <= 0):
                raise BadInputError(f"max_seq_length is {value!r}, not a positive integer", path=settings)
            max_length = value or max_length
        return cls(encoder=encoder, modes=modes, normalize=normalize, max_length=max_length)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInputError(f"not readable JSON: {e}", path=path) from None


def pool(hidden: Any, mask: Any, modes: tuple[str, ...]) -> Any:
    """One vector per text from token states ``hidden`` (batch, tokens, dim) and ``mask`` (batch, tokens)."""
    import torch

    m = mask.unsqueeze(-1).to(hidden.dtype)  # (batch, tokens, 1)
    lengths = m.sum(1).clamp(min=1e-9)  # (batch, 1)
    parts = []
    for mode in modes:
        if mode == "cls_token":
            parts.append(hidden[:, 0])
        elif mode == "max_tokens":
            parts.append(hidden.masked_fill(m == 0, -1e9).max(1).values)
        elif mode == "mean_tokens":
            parts.append((hidden * m).sum(1) / lengths)
        elif mode == "mean_sqrt_len_tokens":
            parts.append((hidden * m).sum(1) / lengths.sqrt())
        else:  # lasttoken: the last position the mask keeps, whichever side the padding is on
            _, from_end = mask.flip(1).max(1)  # (batch,): tokens after the last kept one
            last = mask.shape[1] - 1 - from_end
            parts.append(hidden[torch.arange(hidden.shape[0]), last])
    return torch.cat(parts, dim=-1)  # (batch, dim * len(modes))


class Embedder:
    """An encoder folder's tokenizer, model (weights mapped) and pooling, ready to embed texts.

    Example:
        >>> emb = Embedder("all-MiniLM-L6-v2/")              # doctest: +SKIP
        >>> emb(["A cat.", "A dog."]).shape
        torch.Size([2, 384])
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        require("transformers", needed_for="embedding texts")
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from .hf import from_pretrained

        self.pipeline = Pipeline.of(folder)
        config = AutoConfig.from_pretrained(self.pipeline.encoder)
        try:
            base = AutoModel._model_mapping[type(config)]
        except KeyError:
            raise BadInputError(f"transformers has no base model for config {type(config).__name__}",
                                path=self.pipeline.encoder) from None
        self.tokenizer = AutoTokenizer.from_pretrained(self.pipeline.encoder)
        self.model = from_pretrained(self.pipeline.encoder, config=config, model_class=base)

    def __call__(self, texts: list[str]) -> Any:
        import torch

        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.pipeline.max_length,
                               return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(**batch)[0]  # (batch, tokens, dim)
        vectors = pool(hidden, batch["attention_mask"], self.pipeline.modes)
        return torch.nn.functional.normalize(vectors, p=2, dim=1) if self.pipeline.normalize else vectors
