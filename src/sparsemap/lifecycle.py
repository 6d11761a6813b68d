"""Moving weights between anonymous memory and mappings: ``to_mapped`` and ``drop``.

``to_mapped`` turns a model that holds its weights in anonymous memory (just
trained, or built and initialised in place) into one whose weights are views of
a file: the anonymous copies are released, and the memory drops by their size.

``drop`` releases parameters a program no longer needs. Their pages go back
at once and the parameters become meta tensors. Memory is only really free
when nothing else refers to them, so ``drop`` reports every reference that
keeps them alive.
"""

from __future__ import annotations

import gc
import os
import sys
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from .loader import load
from .mapped import release_pages
from .writer import Layout, save


def to_mapped(module: nn.Module, path: str | os.PathLike[str], *, layout: Layout | None = None) -> nn.Module:
    """Write ``module``'s weights to ``path`` and replace them with zero-copy views of that file.

    The old tensors are released when nothing else refers to them (an
    optimizer, a local variable): anonymous memory drops by the weights' size.

    Example:
        >>> model = MyModel(cfg)                                  # doctest: +SKIP
        >>> train(model)
        >>> sparsemap.to_mapped(model, "weights.safetensors")      # same model, weights now file-backed
    """
    save(module, path, layout=layout)
    return load(module, path)


@dataclass
class DropReport:
    """What :func:`drop` released, and what still holds on."""

    released_nbytes: int = 0  # pages given back now (mapped tensors)
    dropped: list[str] = field(default_factory=list)
    # name -> descriptions of the objects that still refer to the old tensor
    lingering: dict[str, list[str]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"dropped {len(self.dropped)} tensors, "
                 f"released {self.released_nbytes / 2**20:.1f} MiB of pages"]
        for name, refs in self.lingering.items():
            lines.append(f"  {name} is still referenced (its memory is not free): " + "; ".join(refs))
        return "\n".join(lines)


def drop(module: nn.Module, names: list[str] | tuple[str, ...] | str) -> DropReport:
    """Release parameters (or buffers) the program no longer needs.

    Each named tensor's pages are released (mapped tensors: at once, they can
    be faulted back from the file if something still reads them) and the
    tensor is replaced in its module by a meta tensor of the same shape. Tied
    names must be dropped together, or the other name keeps the tensor alive;
    the report says so.

    Returns:
        A :class:`DropReport`; ``lingering`` lists references that keep an old
        tensor alive (from ``gc.get_referrers``): an optimizer's state, a local
        variable, another module.

    Example:
        >>> report = sparsemap.drop(model, ["lm_head.weight"])   # doctest: +SKIP
        >>> print(report)
    """
    if isinstance(names, str):
        names = [names]
    report = DropReport()
    old: dict[str, torch.Tensor] = {}
    released: set[int] = set()  # tied names share pages: count them once
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        try:
            owner = module.get_submodule(owner_name) if owner_name else module
        except AttributeError:
            raise KeyError(f"{name}: no such parameter or buffer (no module {owner_name!r})") from None
        if attr in owner._parameters and owner._parameters[attr] is not None:
            t = owner._parameters[attr]
            assert t is not None
            owner._parameters[attr] = nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=False)
        elif attr in owner._buffers and owner._buffers[attr] is not None:
            t = owner._buffers[attr]
            assert t is not None
            owner._buffers[attr] = torch.empty_like(t, device="meta")
        else:
            raise KeyError(f"{name}: no such parameter or buffer")
        if t.device.type != "meta":
            if t.device.type == "cpu" and t.data_ptr() not in released:
                released.add(t.data_ptr())
                report.released_nbytes += release_pages(t)
            old[name] = t
        report.dropped.append(name)
    names_by_dict = _parameter_dicts(module)
    gc.collect()
    for name in list(old):
        refs = _describe_referrers(old[name], names_by_dict, ignore=old)
        if refs:
            report.lingering[name] = refs
    return report


def _parameter_dicts(module: nn.Module) -> dict[int, str]:
    out = {}
    for prefix, m in module.named_modules(remove_duplicate=False):
        out[id(m._parameters)] = f"{prefix or '<root>'}._parameters"
        out[id(m._buffers)] = f"{prefix or '<root>'}._buffers"
    return out


def _describe_referrers(t: torch.Tensor, names_by_dict: dict[int, str], ignore: object) -> list[str]:
    # No closures over `t` here (a generator expression would add a cell that refers to it).
    module_dicts = {id(m.__dict__): name for name, m in list(sys.modules.items()) if m is not None}
    out = []
    # Since Python 3.11 a running function's locals are not objects gc can see:
    # look through every thread's stack for them.
    for frame in sys._current_frames().values():
        while frame is not None:
            if frame.f_code.co_filename != __file__:
                for var, value in frame.f_locals.items():
                    if value is t:
                        out.append(f"a local variable of {frame.f_code.co_name}() ({var!r}, "
                                   f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno})")
            frame = frame.f_back
    for ref in gc.get_referrers(t):
        if ref is ignore or isinstance(ref, types.FrameType):
            continue  # frames were handled above
        if isinstance(ref, dict):
            key = "?"
            for k, v in ref.items():
                if v is t:
                    key = k
                    break
            if id(ref) in module_dicts:
                out.append(f"global {key!r} of module {module_dicts[id(ref)]}")
            elif id(ref) in names_by_dict:
                out.append(f"{names_by_dict[id(ref)]}[{key!r}]")
            else:
                out.append(f"a dict, key {key!r}")
        elif isinstance(ref, (list, tuple, set)):
            out.append(f"a {type(ref).__name__} of {len(ref)} items")
        else:
            out.append(f"a {type(ref).__name__}")
    return out
