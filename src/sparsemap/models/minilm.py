"""all-MiniLM-L6-v2 (BERT sentence embeddings) through sparsemap: the demo model.

``embed_sparsemap`` builds transformers' ``BertModel`` on the meta device and
maps the real checkpoint into it; ``embed_reference`` is sentence-transformers'
own loading. The demo runs each in a fresh process and compares embeddings and
memory. Torch is imported inside functions so a child process can measure
``import torch`` itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import TYPE_CHECKING, Any

from .. import memory
from ..extras import require

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import BertModel

SENTENCES = [
    "sparsemap maps model weights instead of copying them.",
    "A laptop with 8 GB of memory can still run a language model.",
    "The cat sat on the mat.",
    "Page-aligned rows can be released one by one.",
]


def build_model(folder: str | os.PathLike[str]) -> BertModel:
    """transformers' ``BertModel`` with weights mapped from ``folder``'s checkpoint.

    The checkpoint holds ``embeddings.position_ids``, a buffer current
    transformers computes; ``from_pretrained`` ignores it as transformers does.
    """
    from transformers import BertConfig, BertModel

    from .hf import from_pretrained

    config = BertConfig.from_pretrained(folder)
    return from_pretrained(folder, config=config, model_class=BertModel)


def mean_pooled(model: BertModel, tokenizer: Any, sentences: list[str],
                max_length: int = 256) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them: masked mean, then L2 norm."""
    import torch

    batch = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state  # (batch, tokens, 384)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (batch, tokens, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (batch, 384)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


# ---------------------------------------------------------------- child processes, one per way

def _child_sparsemap(folder: str, tracker: memory.PhaseTracker) -> list[list[float]]:
    with tracker.phase("import torch"):
        import torch  # noqa: F401
    with tracker.phase("import transformers"):
        from transformers import AutoTokenizer, BertModel  # noqa: F401
    with tracker.phase("tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(folder)
    with tracker.phase("weights (sparsemap.load)"):
        model = build_model(folder)
    with tracker.phase("first forward"):
        out = mean_pooled(model, tokenizer, SENTENCES)
    return out.tolist()


def _child_reference(folder: str, tracker: memory.PhaseTracker) -> list[list[float]]:
    with tracker.phase("import torch"):
        import torch  # noqa: F401
    with tracker.phase("import transformers"):
        require("sentence_transformers", needed_for="the MiniLM demo's reference")
        from sentence_transformers import SentenceTransformer
    with tracker.phase("tokenizer + weights"):
        model = SentenceTransformer(folder, device="cpu")
    with tracker.phase("first forward"):
        out = model.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=True)
    return out.tolist()


WAYS = {"sparsemap": _child_sparsemap, "sentence-transformers": _child_reference}


def run_child(way: str, folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Run one way in a fresh interpreter; return its phases and embeddings."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "sparsemap.models.minilm", "--child", way, str(folder)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{way} child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child_main(way: str, folder: str) -> None:
    tracker = memory.PhaseTracker()
    embeddings = WAYS[way](folder, tracker)
    print(json.dumps({"way": way, "tracker": tracker.to_dict(), "table": tracker.table(way),
                      "embeddings": embeddings}))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child_main(sys.argv[2], sys.argv[3])
    else:
        print("usage: python -m sparsemap.models.minilm --child WAY FOLDER", file=sys.stderr)
        raise SystemExit(2)
