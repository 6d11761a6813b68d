"""Loading strategies, ours and the peers', each a function run in a fresh child process.

Every strategy builds the same transformers model (the class the folder's
config.json names: ``LlamaForCausalLM`` for the synthetic sizes) and loads the
same weights its own way. The child
reports when the model was usable and how long one forward pass took; the
parent (:mod:`.measure`) measures memory, faults and reads from outside.
Peers that cannot be imported here are reported as unavailable with the reason.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Strategy:
    """One way of loading the checkpoint.

    Attributes:
        load: builds and loads the model from the synthetic folder (runs in the child).
        description: one line for tables and ``--list``.
        files: what it reads, relative to the folder (made cold or warm before each run).
        imports: modules imported before the clock starts (loading is timed, not imports).
        pip: the PyPI distribution that provides it, when it is a peer's library.
        prepare: writes the strategy's own file once (tensorizer serializes), in the parent.
    """

    load: Callable[[Path], Any]
    description: str
    files: tuple[str, ...] = ("model.safetensors",)
    imports: tuple[str, ...] = ()
    pip: str | None = None
    prepare: Callable[[Path], None] | None = None

    def unavailable(self) -> str | None:
        """Why this strategy cannot run here, or ``None``."""
        missing = [m for m in self.imports if importlib.util.find_spec(m.split(".")[0]) is None]
        if missing:
            return f"{self.pip or missing[0]} is not installed (pip install {self.pip or missing[0]})"
        return None


def _config(folder: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def _model_class(folder: Path) -> Any:
    from ..models.hf import class_for

    return class_for(_config(folder))


def _skeleton_model(folder: Path) -> Any:
    from ..loader import skeleton

    with skeleton():  # the same meta builder for every meta-device strategy: only loading differs
        return _model_class(folder)(_config(folder))


def _assign(folder: Path, state: dict[str, Any]) -> Any:
    """The meta model with ``state`` assigned; tied weights (saved once) tied again, none left on meta."""
    model = _skeleton_model(folder)
    result = model.load_state_dict(state, assign=True, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left or result.unexpected_keys:
        raise RuntimeError(f"state does not fit the model: missing {left[:5]}, unexpected "
                           f"{result.unexpected_keys[:5]}")
    return model


def _weights_dtype(folder: Path) -> Any:
    import torch

    config = _config(folder)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def naive(folder: Path) -> Any:
    """Random init in memory, torch.load of the whole file, load_state_dict (copies)."""
    import torch

    model = _model_class(folder)(_config(folder)).to(_weights_dtype(folder))
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True), strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def torch_mmap(folder: Path) -> Any:
    """Meta model + torch.load(mmap=True, weights_only=True) + load_state_dict(assign=True)."""
    import torch

    return _assign(folder, torch.load(folder / "model.pt", mmap=True, weights_only=True))


def safetensors_load_file(folder: Path) -> Any:
    """Meta model + safetensors.torch.load_file + load_state_dict(assign=True)."""
    from safetensors.torch import load_file

    return _assign(folder, load_file(folder / "model.safetensors"))


def safetensors_safe_open(folder: Path) -> Any:
    """Meta model + safe_open, one get_tensor per tensor."""
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", framework="pt") as f:
        state = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    return _assign(folder, state)


def accelerate_dispatch(folder: Path) -> Any:
    """accelerate: init_empty_weights + load_checkpoint_and_dispatch on the sharded folder."""
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch

    with init_empty_weights():
        model = _model_class(folder)(_config(folder))
    return load_checkpoint_and_dispatch(model, str(folder / "sharded"), device_map={"": "cpu"})


def transformers_from_pretrained(folder: Path) -> Any:
    """transformers' from_pretrained (of the config's class) on the sharded folder (its default path)."""
    return _model_class(folder).from_pretrained(folder / "sharded", dtype="auto")


def fastsafetensors_cpu(folder: Path) -> Any:
    """fastsafetensors' CPU path: fastsafe_open(nogds=True) reads the file into its own buffer."""
    from fastsafetensors import fastsafe_open

    with fastsafe_open(str(folder / "model.safetensors"), device="cpu", nogds=True) as f:
        state = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - tensors keep the buffer alive
    return _assign(folder, state)


def runai_streamer(folder: Path) -> Any:
    """Run:ai model streamer: SafetensorsStreamer.stream_file to CPU, its defaults (owned tensors)."""
    from runai_model_streamer import SafetensorsStreamer

    with SafetensorsStreamer() as streamer:
        streamer.stream_file(str(folder / "model.safetensors"))
        state = dict(streamer.get_tensors())
    return _assign(folder, state)


TENSORIZER_FILE = "model.tensors"


def tensorizer_serialize(folder: Path) -> None:
    """Write the tensorizer file once, with tensorizer's own serializer, from the safetensors weights."""
    target = folder / TENSORIZER_FILE
    if target.is_file():
        return
    from safetensors.torch import load_file
    from tensorizer import TensorSerializer

    partial = target.with_name(target.name + ".partial")
    serializer = TensorSerializer(str(partial))
    serializer.write_state_dict(load_file(folder / "model.safetensors"))
    serializer.close()
    partial.rename(target)


def tensorizer_deserialize(folder: Path) -> Any:
    """tensorizer: TensorDeserializer of its own file to CPU, then assigned into the meta model."""
    from tensorizer import TensorDeserializer

    deserializer = TensorDeserializer(str(folder / TENSORIZER_FILE), device="cpu")
    return _assign(folder, dict(deserializer.items()))


def sparsemap_zero_copy(folder: Path) -> Any:
    """sparsemap.load: views of the mapped file."""
    from ..loader import load

    return load(_skeleton_model(folder), folder / "model.safetensors")


def sparsemap_zero_copy_pt(folder: Path) -> Any:
    """sparsemap.load of the torch.save zip: views of the mapped file, no unpickling of objects."""
    from ..loader import load

    return load(_skeleton_model(folder), folder / "model.pt")


def sparsemap_materialized(folder: Path) -> Any:
    """sparsemap.load, then every weight copied into anonymous memory (measures read speed)."""
    import torch

    model = sparsemap_zero_copy(folder)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    return model


STRATEGIES: dict[str, Strategy] = {
    "naive": Strategy(naive, "random init + torch.load + load_state_dict", files=("model.pt",)),
    "torch.load mmap": Strategy(torch_mmap, "meta + torch.load(mmap=True) + assign=True",
                                files=("model.pt",)),
    "safetensors load_file": Strategy(safetensors_load_file, "meta + safetensors load_file + assign=True"),
    "safetensors safe_open": Strategy(safetensors_safe_open, "meta + safe_open, get_tensor per tensor"),
    "accelerate dispatch": Strategy(accelerate_dispatch, "init_empty_weights + load_checkpoint_and_dispatch",
                                    files=("sharded",), imports=("accelerate",), pip="accelerate"),
    "transformers from_pretrained": Strategy(transformers_from_pretrained, "from_pretrained (default path)",
                                             files=("sharded",)),
    "fastsafetensors": Strategy(fastsafetensors_cpu, "fastsafe_open(device='cpu', nogds=True)",
                                imports=("fastsafetensors",), pip="fastsafetensors"),
    "run:ai streamer": Strategy(runai_streamer, "SafetensorsStreamer.stream_file to CPU",
                                imports=("runai_model_streamer",), pip="runai-model-streamer"),
    "tensorizer": Strategy(tensorizer_deserialize, "TensorDeserializer(device='cpu') of its own file",
                           files=(TENSORIZER_FILE,), imports=("tensorizer",), pip="tensorizer",
                           prepare=tensorizer_serialize),
    "sparsemap": Strategy(sparsemap_zero_copy, "sparsemap.load: views of the mapped file"),
    "sparsemap .pt": Strategy(sparsemap_zero_copy_pt, "sparsemap.load of the torch.save file",
                              files=("model.pt",)),
    "sparsemap materialized": Strategy(sparsemap_materialized,
                                       "sparsemap.load, then copied to anonymous memory"),
}


def unavailable(name: str) -> str | None:
    """Why strategy ``name`` cannot run here, or ``None``."""
    return STRATEGIES[name].unavailable()


def _import_common(folder: str) -> None:
    """What every strategy's child imports before its clock starts: torch, safetensors and the model's
    class. Libraries are imported before the clock starts: "usable" measures loading, not imports
    (naming the model class imports its modeling module)."""
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    _model_class(Path(folder))


def baseline(folder: str) -> dict[str, int]:
    """What a child holds before any strategy loads a weight (in this fresh process): its resident
    anonymous and file-backed bytes after :func:`_import_common`, as ``sparsemap.budget`` counts a
    runtime's baseline. A memory limit below it kills every run before loading begins."""
    from ..memory import Snapshot

    _import_common(folder)
    snap = Snapshot.take()
    return {"anon": snap.anon, "file": snap.file}


def child(name: str, folder: str) -> dict[str, float]:
    """Run one strategy (in this fresh process): seconds to a usable model, then one forward pass."""
    start = time.perf_counter()
    strategy = STRATEGIES[name]
    _import_common(folder)
    import torch

    from ..memory import rss_anon

    for module in strategy.imports:
        importlib.import_module(module)
    baseline_anon = rss_anon()  # what the interpreter and libraries hold before loading starts
    imported = time.perf_counter()
    model = strategy.load(Path(folder)).eval()
    usable = time.perf_counter()
    with torch.inference_mode():
        model(torch.arange(8).unsqueeze(0))[0].float().sum().item()  # logits, or an encoder's states
    return {"import_s": imported - start, "usable_s": usable - imported,
            "forward_s": time.perf_counter() - usable, "baseline_anon": baseline_anon}


if __name__ == "__main__":
    if sys.argv[1] == "--baseline":
        print(json.dumps(baseline(sys.argv[2])))
    else:
        print(json.dumps(child(sys.argv[1], sys.argv[2])))
