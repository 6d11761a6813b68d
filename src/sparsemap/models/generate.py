"""Answering a prompt with a causal LM, measured phase by phase.

Two engines run the same steps (tokenizer, weights, chat prompt, streamed
generation): :class:`LeanEngine` (sparsemap's own Llama and the ``tokenizers``
library) and :class:`TransformersEngine` (transformers' classes, with weights
from sparsemap or, for the demo's reference, transformers' own GGUF loading).
``sparsemap run`` and every process of the demo go through :func:`answer`, so
all are measured the same way: memory by phase
(:class:`~sparsemap.memory.PhaseTracker`), time to first token, tokens per
second. Libraries are imported inside the measured phases, so their cost is
shown, not assumed.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import memory
from ..errors import BadInputError, SourceNotFoundError
from ..formats.source import ModelSource, resolve_source
from .rwkv_config import detect_version, pytorch_view, shape_of

# Names sparsemap knows -> the folder's form: its GGUF's blocks kept quantized, or dequantized to float32.
ALIASES = {"smollm2": "quantized", "smollm2-135m-instruct": "quantized", "smollm2-f32": "float32"}


def resolve_model(model: str | Path | ModelSource) -> ModelSource:
    """What a model argument holds: a path, or the name of a model sparsemap knows (fetched and
    converted on first use). No torch.

    Raises:
        SourceNotFoundError: no such path and no such name.
    """
    if isinstance(model, ModelSource):
        return model
    form = ALIASES.get(str(model).lower())
    if form is not None and not Path(model).exists():
        from . import smollm2

        return resolve_source(smollm2.prepare_quantized() if form == "quantized" else smollm2.prepare())
    if not Path(model).exists():
        raise SourceNotFoundError(f"no such model file or folder (known names: {', '.join(sorted(ALIASES))})",
                                  path=Path(model))
    return resolve_source(model)


def check_model(source: ModelSource) -> None:
    """Refuse what is not a model before anything heavy runs (no torch): clear errors, exit code 2."""
    from ..formats.dispatch import open_catalog
    from .gguf_hf import architecture

    catalog = open_catalog(source)  # the weights: missing shards, malformed files, not a checkpoint at all
    if source.is_gguf:
        architecture(catalog)  # transformers must map the architecture (names are mapped at load)
    elif detect_version(catalog) is not None:
        shape_of(pytorch_view(catalog))  # RWKV: version, every tensor and shape, no compute
    elif source.config is None:
        raise SourceNotFoundError("no config.json next to the weights", path=source.folder)
    else:
        _refuse_encoders(source.config)


# Class name endings of models that generate text; any other architecture is an encoder or a classifier.
GENERATIVE = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _refuse_encoders(config_path: str) -> None:
    """An encoder cannot answer a prompt: say what it can do instead, before any weight is read."""
    import json

    try:
        with open(config_path, "rb") as f:
            architectures = json.loads(f.read()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return  # transformers reads it later and names what is wrong
    if architectures and not any(str(a).endswith(GENERATIVE) for a in architectures):
        raise BadInputError(f"is an encoder ({', '.join(map(str, architectures))}), not a text generator: "
                            f"embed texts with `sparsemap embed {os.path.dirname(config_path)} \"text\"`",
                            path=os.path.dirname(config_path))


def load_tokenizer(source: ModelSource) -> Any:
    """transformers' tokenizer of the model: from the folder, or built from a GGUF's header."""
    from transformers import AutoTokenizer

    try:
        if source.is_gguf:
            return gguf_tokenizer(source)
        return AutoTokenizer.from_pretrained(source.folder)
    except (OSError, ValueError) as e:
        raise BadInputError(f"no usable tokenizer next to the model ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]})", path=source.folder) from None


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


class TransformersEngine:
    """Tokenizer and model from transformers (any architecture transformers knows)."""

    libraries = "transformers"

    def __init__(self, load_model: Callable[[ModelSource], Any]) -> None:
        self.load_model = load_model

    def import_libraries(self) -> None:
        # transformers imports lazily: name the classes so their modules load here.
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401

    def load_tokenizer(self, source: ModelSource) -> Any:
        return load_tokenizer(source)

    def has_chat(self, tokenizer: Any) -> bool:
        return bool(getattr(tokenizer, "chat_template", None))

    def prompt_ids(self, tokenizer: Any, prompt: str, raw: bool = False) -> list[int]:
        if raw:
            return list(tokenizer(prompt)["input_ids"])
        if not self.has_chat(tokenizer):
            raise BadInputError("the tokenizer has no chat template: complete the prompt as raw text "
                                "instead (--raw)", path=getattr(tokenizer, "name_or_path", None) or None)
        messages = [{"role": "user", "content": prompt}]
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        return list(out["input_ids"])

    def generate(self, model: Any, ids: list[int], max_new_tokens: int, temperature: float,
                 on_token: Callable[[int], None]) -> list[int]:
        import torch
        from transformers.generation.streamers import BaseStreamer

        class Tap(BaseStreamer):  # type: ignore[misc]
            prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # the first call carries the prompt
                    self.prompt_seen = True
                    return
                for token in value.reshape(-1).tolist():
                    on_token(int(token))

            def end(self) -> None:
                pass

        sampling = ({"do_sample": True, "temperature": temperature} if temperature > 0
                    else {"do_sample": False})
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]),
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, streamer=Tap(), **sampling)
        return list(out[0][len(ids):].tolist())

    def decode(self, tokenizer: Any, ids: list[int]) -> str:
        return str(tokenizer.decode(ids, skip_special_tokens=True))


class LeanEngine:
    """sparsemap's own Llama in plain torch, with the ``tokenizers`` library: no transformers import."""

    libraries = "tokenizers"

    def __init__(self, dtype: Any = None) -> None:
        self.dtype = dtype

    def import_libraries(self) -> None:
        import jinja2  # noqa: F401
        import tokenizers  # noqa: F401

    def load_tokenizer(self, source: ModelSource) -> Any:
        from .llama import ChatTokenizer

        return ChatTokenizer(source)

    def load_model(self, source: ModelSource) -> Any:
        from .llama import load

        return load(source, dtype=self.dtype)

    def has_chat(self, tokenizer: Any) -> bool:
        return tokenizer.template is not None

    def prompt_ids(self, tokenizer: Any, prompt: str, raw: bool = False) -> list[int]:
        return list(tokenizer.raw_ids(prompt) if raw else tokenizer.prompt_ids(prompt))

    def generate(self, model: Any, ids: list[int], max_new_tokens: int, temperature: float,
                 on_token: Callable[[int], None]) -> list[int]:
        return list(model.generate(ids, max_new_tokens, temperature=temperature, on_token=on_token))

    def decode(self, tokenizer: Any, ids: list[int]) -> str:
        return str(tokenizer.decode(ids))


class RwkvEngine:
    """sparsemap's RWKV (7, 6, 5.2, 4) with the World tokenizer (or bytes, for a 256-token vocabulary): no
    rwkv import."""
    libraries = "sparsemap.models.rwkv_tokenizer"

    def __init__(self, sparse: bool = False) -> None:
        # Dense by default: at the half of neurons active measured on trained and random models,
        # gathering the active value rows costs more than it saves (benchmarks/rwkv.py).
        self.sparse = sparse

    def import_libraries(self) -> None:
        from . import rwkv_tokenizer  # noqa: F401

    def load_tokenizer(self, source: ModelSource) -> Any:
        from ..formats.dispatch import open_catalog
        from .rwkv_config import find_vocabulary
        from .rwkv_tokenizer import ByteTokenizer, WorldTokenizer

        vocab_size = shape_of(pytorch_view(open_catalog(source))).vocab_size
        if vocab_size == 256:
            return ByteTokenizer()
        vocabulary = find_vocabulary(source.folder)
        if vocabulary is None:
            raise SourceNotFoundError("no rwkv_vocab_v20230424.txt (the World vocabulary) beside the model",
                                      path=source.folder)
        return WorldTokenizer(vocabulary)

    def load_model(self, source: ModelSource) -> Any:
        from .rwkv import load

        return load(source.weights, sparse=self.sparse)

    def has_chat(self, tokenizer: Any) -> bool:
        return True  # the chat form RWKV models learn is plain text: every RWKV model takes it

    def prompt_ids(self, tokenizer: Any, prompt: str, raw: bool = False) -> list[int]:
        return list(tokenizer.encode(prompt if raw else f"User: {prompt}\n\nAssistant:"))

    def generate(self, model: Any, ids: list[int], max_new_tokens: int, temperature: float,
                 on_token: Callable[[int], None]) -> list[int]:
        return list(model.generate(ids, max_new_tokens, temperature=temperature, stop=(0,),
                                   on_token=on_token))

    def decode(self, tokenizer: Any, ids: list[int]) -> str:
        return str(tokenizer.decode(ids))


def pick_engine(model: str | Path | ModelSource, engine: str,
                dtype: Any = None) -> TransformersEngine | LeanEngine | RwkvEngine:
    """RWKV for RWKV checkpoints; ``lean`` for Llama folders with a tokenizer.json (``auto``), else
    transformers."""
    if engine == "transformers":
        return TransformersEngine(sparsemap_loader(dtype))
    source = resolve_model(model)
    # A Hugging Face folder has a config.json; an RWKV checkpoint has none: only then are its keys read.
    if source.config is None and not source.is_gguf and source.format != "sharded":
        from ..formats.dispatch import open_catalog

        if detect_version(open_catalog(source)) is not None:
            return RwkvEngine()
    reason = _lean_refusal(source)
    if engine == "lean" and reason is not None:
        raise BadInputError(f"the lean engine cannot run this model: {reason} (use --engine transformers)",
                            path=source.path)
    return LeanEngine(dtype) if reason is None else TransformersEngine(sparsemap_loader(dtype))


def _lean_refusal(source: ModelSource) -> str | None:
    """Why the lean engine cannot run ``source`` (``auto`` then falls back to transformers), or ``None``."""
    from .llama import read_config, unsupported

    if source.is_gguf:
        return "it runs converted folders, not GGUF files (convert a GGUF with `sparsemap convert`)"
    if source.tokenizer is None:
        return "the folder has no tokenizer.json"
    if source.config is None:
        return "the folder has no config.json"
    return unsupported(read_config(source.config))


def answer(engine: TransformersEngine | LeanEngine | RwkvEngine, model: str, prompt: str, *,
           max_new_tokens: int = 64, temperature: float = 0.0, echo: Callable[[str], None] | None = None,
           tracker: memory.PhaseTracker | None = None, memory_limit: int | None = None,
           on_plan: Callable[[str], None] | None = None, raw: bool | None = None,
           on_note: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Load a model and answer ``prompt``; returns the answer and the measurements.

    The prompt is the user's turn of the model's chat template; ``raw=True`` (or, when ``raw`` is
    ``None``, a tokenizer without a chat template: a base model) continues it as plain text, and the
    report says which (``"prompt_form"``); ``on_note`` hears of the fallback before generation starts.

    Phases: import torch, import the engine's libraries, tokenizer, weights,
    generate. ``first_token_s`` counts from the start of loading (tokenizer +
    weights + prompt + first token): what a user waits for.

    With ``memory_limit`` (bytes), the run keeps inside it
    (:class:`sparsemap.budget.Budget`): the runtime's baseline is measured
    before any weight is loaded (a limit below it is refused then), the plan
    (what stays resident, what streams) goes to ``on_plan``, and the report
    gets a ``budget`` entry: the plan and the process's own peak accounting.

    Raises:
        BudgetError: the limit is below the runtime's baseline, or too small to stream the model in.
    """
    tracker = tracker or memory.PhaseTracker()
    source = resolve_model(model)
    check_model(source)
    with tracker.phase("import torch"):
        import torch  # noqa: F401
    with tracker.phase(f"import {engine.libraries}"):
        engine.import_libraries()
    load_start = time.perf_counter()
    with tracker.phase("tokenizer"):
        tokenizer = engine.load_tokenizer(source)
    baseline = None
    if memory_limit is not None:  # refuse an impossible limit before any weight is loaded
        from ..budget import check_room

        snap = memory.Snapshot.take()
        baseline = snap.anon + snap.file
        check_room(memory_limit, baseline)
    with tracker.phase("weights"):
        lm = engine.load_model(source)
    raw_text = raw if raw is not None else not engine.has_chat(tokenizer)
    if raw is None and raw_text and on_note is not None:
        on_note("(the tokenizer has no chat template: the prompt is continued as plain text)")
    ids = engine.prompt_ids(tokenizer, prompt, raw_text)
    budget = None
    if memory_limit is not None:
        from ..budget import Budget

        budget = Budget(lm, limit=memory_limit, baseline=baseline, max_tokens=len(ids) + max_new_tokens)
        if on_plan is not None:
            try:
                on_plan(str(budget.plan))
            except BaseException:
                budget.remove()
                raise
    new: list[int] = []
    shown = [""]
    first_token_at: list[float] = []

    def on_token(token: int) -> None:
        if not first_token_at:
            first_token_at.append(time.perf_counter())
        new.append(token)
        if echo is not None:
            text = engine.decode(tokenizer, new)
            if text.startswith(shown[0]) and not text.endswith("\ufffd"):  # whole characters only
                echo(text[len(shown[0]):])
                shown[0] = text

    try:
        with tracker.phase("generate"):
            tokens = engine.generate(lm, ids, max_new_tokens, temperature, on_token)
            end = time.perf_counter()
        if budget is not None:
            budget.sample(every_s=0)
    finally:  # the model may live on (a caller's): its hooks go whatever happened
        if budget is not None:
            budget.remove()
    first = first_token_at[0] if first_token_at else end
    decode_tokens = max(len(tokens) - 1, 0)
    report = {
        "model": source.path, "engine": type(engine).__name__, "prompt": prompt,
        "prompt_form": ("raw" if raw else "raw: the tokenizer has no chat template") if raw_text else "chat",
        "answer": engine.decode(tokenizer, tokens), "tokens": tokens, "new_tokens": len(tokens),
        "load_s": sum(p.seconds for p in tracker.phases if p.name in ("tokenizer", "weights")),
        "first_token_s": first - load_start,
        "tokens_per_s": decode_tokens / (end - first) if end > first and decode_tokens else 0.0,
        "tracker": tracker.to_dict(), "table": tracker.table(),
    }
    if budget is not None:
        p = budget.plan
        report["budget"] = {"limit": p.limit, "baseline": p.baseline, "planned": p.planned_nbytes,
                            "resident": p.resident_nbytes, "streamed": p.streamed_nbytes,
                            "own_peak": budget.own_peak, "plan": str(p)}
    tracker.close()
    return report


def sparsemap_loader(dtype: Any = None) -> Callable[[ModelSource], Any]:
    def load_model(source: ModelSource) -> Any:
        from .hf import from_pretrained

        # A GGUF's blocks stay quantized (repacked once into the cache) unless a dtype is asked for.
        return from_pretrained(source, dtype=dtype, keep_quantized=dtype is None)

    return load_model


def transformers_gguf_loader(source: ModelSource) -> Any:
    """transformers' own loading of a GGUF file (dequantizes every tensor into memory)."""
    from transformers import AutoModelForCausalLM

    if not source.is_gguf:
        raise SourceNotFoundError("transformers' GGUF loading needs a GGUF file", path=source.path)
    return AutoModelForCausalLM.from_pretrained(source.folder, gguf_file=Path(source.weights).name).eval()


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
    imports = report["tracker"]["phases"][names.index("tokenizer") - 1]
    return {
        "load_s": report["load_s"],
        "first_token_s": report["first_token_s"],
        "tokens_per_s": report["tokens_per_s"],
        "weights_anon": phases["weights"]["after"]["anon"] - before_weights["anon"],
        "weights_file": phases["weights"]["after"]["file"] - before_weights["file"],
        "peak_anon": max(p["peak_anon"] for p in report["tracker"]["phases"]),
        "peak_rss": max(p["peak_rss"] for p in report["tracker"]["phases"]),
        "imports_anon": imports["after"]["anon"],
    }


def _child_main(argv: list[str]) -> None:
    """``python -m sparsemap.models.generate WAY MODEL PROMPT MAX_NEW [MEMORY_LIMIT]``: one measured run,
    JSON on the last line."""
    import json
    import os

    way, model, prompt, max_new, *limit = argv
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tracker = memory.PhaseTracker()
    if way == "transformers":
        engine: TransformersEngine | LeanEngine = TransformersEngine(transformers_gguf_loader)
    else:  # "sparsemap" (auto), "sparsemap-lean", "sparsemap-transformers"
        engine = pick_engine(model, {"sparsemap-transformers": "transformers"}.get(way, "auto"))
    report = answer(engine, model, prompt, max_new_tokens=int(max_new), tracker=tracker,
                    memory_limit=int(limit[0]) if limit else None)
    print(json.dumps(report))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
