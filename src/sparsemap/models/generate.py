"""Answering a prompt with a causal LM, measured phase by phase.

Shared by ``sparsemap run`` (weights mapped by sparsemap) and the reference
child of the demo (transformers' own GGUF loading), so both are measured the
same way: memory by phase (:class:`~sparsemap.memory.PhaseTracker`), time to
first token, tokens per second. Torch and transformers are imported inside the
measured phases, so their cost is shown, not assumed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import memory
from ..errors import BadInputError, SourceNotFoundError

ALIASES = {"smollm2": "SmolLM2-135M-Instruct", "smollm2-135m-instruct": "SmolLM2-135M-Instruct"}


def resolve_model(model: str) -> Path:
    """A path, or the name of a model sparsemap knows (fetched and converted on first use)."""
    name = ALIASES.get(model.lower())
    if name is not None and not Path(model).exists():
        from . import smollm2

        return smollm2.prepare()
    path = Path(model)
    if not path.exists():
        raise SourceNotFoundError(f"no such model file or folder (known names: {', '.join(sorted(ALIASES))})",
                                  path=path)
    return path


def check_model(path: Path) -> None:
    """Refuse what is not a model before anything heavy runs (no torch): clear errors, exit code 2."""
    from ..formats.resolve import open_catalog

    if path.suffix == ".gguf" or (path.is_dir() and not (path / "config.json").exists()
                                  and any(path.glob("*.gguf"))):
        open_catalog(path)
        return
    open_catalog(path)  # the weights: missing shards, malformed files, not a checkpoint at all
    folder = path if path.is_dir() else path.parent
    if not (folder / "config.json").is_file():
        raise SourceNotFoundError("no config.json next to the weights", path=folder)


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    folder = path if path.is_dir() else path.parent
    try:
        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(folder, gguf_file=path.name)
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise BadInputError(f"no usable tokenizer next to the model ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]})", path=folder) from None


class _Streamer:
    """Prints new text as tokens arrive and notes when the first one came."""

    def __init__(self, tokenizer: Any, echo: Callable[[str], None] | None) -> None:
        from transformers import TextStreamer

        outer = self

        class Printer(TextStreamer):  # type: ignore[misc]
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if echo is not None:
                    echo(text)

            def put(self, value: Any) -> None:
                if not self.next_tokens_are_prompt and outer.first_token_at is None:
                    outer.first_token_at = time.perf_counter()
                super().put(value)

        self.first_token_at: float | None = None
        self.streamer = Printer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def answer(load_model: Callable[[Path], Any], model: str, prompt: str, *, max_new_tokens: int = 64,
           temperature: float = 0.0, echo: Callable[[str], None] | None = None,
           tracker: memory.PhaseTracker | None = None) -> dict[str, Any]:
    """Load a model with ``load_model`` and answer ``prompt``; returns the answer and the measurements.

    Phases: import torch, import transformers, tokenizer, weights, generate.
    ``first_token_s`` counts from the start of loading (tokenizer + weights +
    prompt + first token): what a user waits for.
    """
    tracker = tracker or memory.PhaseTracker()
    path = resolve_model(model)
    check_model(path)
    with tracker.phase("import torch"):
        import torch
    with tracker.phase("import transformers"):
        # transformers imports lazily: name the classes so their modules load here.
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401
    load_start = time.perf_counter()
    with tracker.phase("tokenizer"):
        tokenizer = load_tokenizer(path)
    with tracker.phase("weights"):
        lm = load_model(path)
    messages = [{"role": "user", "content": prompt}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    streamer = _Streamer(tokenizer, echo)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with tracker.phase("generate"):
        with torch.inference_mode():
            out = lm.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer.streamer, **sampling)
        end = time.perf_counter()
    new = out[0][inputs["input_ids"].shape[1]:]
    first = streamer.first_token_at or end
    decode_tokens = max(len(new) - 1, 0)
    report = {
        "model": str(path), "prompt": prompt, "answer": tokenizer.decode(new, skip_special_tokens=True),
        "tokens": new.tolist(), "new_tokens": len(new),
        "load_s": sum(p.seconds for p in tracker.phases if p.name in ("tokenizer", "weights")),
        "first_token_s": first - load_start,
        "tokens_per_s": decode_tokens / (end - first) if end > first and decode_tokens else 0.0,
        "tracker": tracker.to_dict(), "table": tracker.table(),
    }
    tracker.close()
    return report


def sparsemap_loader(dtype: Any = None) -> Callable[[Path], Any]:
    def load_model(path: Path) -> Any:
        from .hf import from_pretrained

        return from_pretrained(path, dtype=dtype)

    return load_model


def transformers_gguf_loader(path: Path) -> Any:
    """transformers' own loading of a GGUF file (dequantizes every tensor into memory)."""
    from transformers import AutoModelForCausalLM

    gguf = path if path.suffix == ".gguf" else next(path.glob("*.gguf"))
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()


def run_child(way: str, model: str, prompt: str, max_new_tokens: int) -> dict[str, Any]:
    """One measured run (``way``: "sparsemap" or "transformers") in a fresh interpreter."""
    import json
    import os
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "sparsemap.models.generate", way, model, prompt,
                           str(max_new_tokens)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{way} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def figures(report: dict[str, Any]) -> dict[str, float]:
    """The numbers the demo and the benchmark compare, from one run's report."""
    phases = {p["name"]: p for p in report["tracker"]["phases"]}
    names = [p["name"] for p in report["tracker"]["phases"]]
    before_weights = report["tracker"]["phases"][names.index("weights") - 1]["after"]
    return {
        "load_s": report["load_s"],
        "first_token_s": report["first_token_s"],
        "tokens_per_s": report["tokens_per_s"],
        "weights_anon": phases["weights"]["after"]["anon"] - before_weights["anon"],
        "peak_anon": max(p["peak_anon"] for p in report["tracker"]["phases"]),
        "peak_rss": max(p["peak_rss"] for p in report["tracker"]["phases"]),
        "imports_anon": phases["import transformers"]["after"]["anon"],
    }


def _child_main(argv: list[str]) -> None:
    """``python -m sparsemap.models.generate WAY MODEL PROMPT MAX_NEW``: one measured run, JSON on the last line."""
    import json
    import os

    way, model, prompt, max_new = argv
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tracker = memory.PhaseTracker()
    loader = sparsemap_loader() if way == "sparsemap" else transformers_gguf_loader
    report = answer(loader, model, prompt, max_new_tokens=int(max_new), tracker=tracker)
    print(json.dumps(report))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
