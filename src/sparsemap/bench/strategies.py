"""Loading strategies, ours and the peers', each a function run in a fresh child process.

Every strategy builds the same transformers ``LlamaForCausalLM`` from the
synthetic folder's config and loads the same weights its own way. The child
reports when the model was usable and how long one forward pass took; the
parent (:mod:`.measure`) measures memory, faults and reads from outside.
Peers that cannot be imported here are reported as unavailable with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _config(folder: Path) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig.from_pretrained(folder)


def _skeleton_model(folder: Path) -> Any:
    from transformers import LlamaForCausalLM

    from ..loader import skeleton

    with skeleton():  # the same meta builder for every meta-device strategy: only loading differs
        return LlamaForCausalLM(_config(folder))


def naive(folder: Path) -> Any:
    """Random init in memory, torch.load of the whole file, load_state_dict (copies)."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(_config(folder)).to(torch.bfloat16)
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    return model


def torch_mmap(folder: Path) -> Any:
    """Meta model + torch.load(mmap=True, weights_only=True) + load_state_dict(assign=True)."""
    import torch

    model = _skeleton_model(folder)
    model.load_state_dict(torch.load(folder / "model.pt", mmap=True, weights_only=True), assign=True)
    return model


def safetensors_load_file(folder: Path) -> Any:
    """Meta model + safetensors.torch.load_file + load_state_dict(assign=True)."""
    from safetensors.torch import load_file

    model = _skeleton_model(folder)
    model.load_state_dict(load_file(folder / "model.safetensors"), assign=True)
    return model


def safetensors_safe_open(folder: Path) -> Any:
    """Meta model + safe_open, one get_tensor per tensor."""
    from safetensors import safe_open

    model = _skeleton_model(folder)
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        state = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    model.load_state_dict(state, assign=True)
    return model


def accelerate_dispatch(folder: Path) -> Any:
    """accelerate: init_empty_weights + load_checkpoint_and_dispatch on the sharded folder."""
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch
    from transformers import LlamaForCausalLM

    with init_empty_weights():
        model = LlamaForCausalLM(_config(folder))
    return load_checkpoint_and_dispatch(model, str(folder / "sharded"), device_map={"": "cpu"})


def transformers_from_pretrained(folder: Path) -> Any:
    """transformers' AutoModelForCausalLM.from_pretrained on the sharded folder (its default path)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder / "sharded", dtype="auto")


def sparsemap_zero_copy(folder: Path) -> Any:
    """sparsemap.load: views of the mapped file."""
    from ..loader import load

    return load(_skeleton_model(folder), folder / "model.safetensors")


def sparsemap_materialized(folder: Path) -> Any:
    """sparsemap.load, then every weight copied into anonymous memory (measures read speed)."""
    import torch

    model = sparsemap_zero_copy(folder)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    return model


def _needs(module: str, pip_name: str) -> str | None:
    return None if importlib.util.find_spec(module) else f"{pip_name} is not installed"


STRATEGIES: dict[str, tuple[Callable[[Path], Any], Callable[[], str | None]]] = {
    "naive": (naive, lambda: None),
    "torch.load mmap": (torch_mmap, lambda: None),
    "safetensors load_file": (safetensors_load_file, lambda: None),
    "safetensors safe_open": (safetensors_safe_open, lambda: None),
    "accelerate dispatch": (accelerate_dispatch, lambda: _needs("accelerate", "accelerate")),
    "transformers from_pretrained": (transformers_from_pretrained, lambda: None),
    "fastsafetensors": (lambda f: None, lambda: _needs("fastsafetensors", "fastsafetensors")
                        or "strategy not written yet"),
    "run:ai streamer": (lambda f: None, lambda: _needs("runai_model_streamer", "runai-model-streamer")
                        or "strategy not written yet"),
    "tensorizer": (lambda f: None, lambda: _needs("tensorizer", "tensorizer") or "strategy not written yet"),
    "sparsemap": (sparsemap_zero_copy, lambda: None),
    "sparsemap materialized": (sparsemap_materialized, lambda: None),
}


def unavailable(name: str) -> str | None:
    """Why strategy ``name`` cannot run here, or ``None``."""
    return STRATEGIES[name][1]()


def child(name: str, folder: str) -> dict[str, float]:
    """Run one strategy (in this fresh process): seconds to a usable model, then one forward pass."""
    start = time.perf_counter()
    import safetensors.torch  # noqa: F401
    import torch

    # Libraries are imported before the clock starts: "usable" measures loading, not imports.
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: F401

    if importlib.util.find_spec("accelerate"):
        import accelerate  # noqa: F401
    imported = time.perf_counter()
    model = STRATEGIES[name][0](Path(folder)).eval()
    usable = time.perf_counter()
    with torch.inference_mode():
        model(torch.arange(8).unsqueeze(0)).logits.float().sum().item()
    return {"import_s": imported - start, "usable_s": usable - imported,
            "forward_s": time.perf_counter() - usable}


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1], sys.argv[2])))
