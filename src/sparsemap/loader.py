"""Loading a checkpoint into a model whose parameters live on the meta device.

The usual path (random init, ``torch.load``, ``load_state_dict``) holds the
model twice in anonymous memory. Here the model's parameters are meta tensors
(shapes, no storage) and each one is *replaced* by a view of the mapped file:
zero-copy when dtype and device already match, otherwise converted one tensor
at a time, so at most one converted tensor is in flight beyond the result.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, TypeVar

import torch
from torch import nn

from .checkpoint import Checkpoint
from .checkpoint import Source as CheckpointSource
from .errors import MissingKeysError, ShapeMismatchError, UnexpectedKeysError, UninitializedTensorError
from .formats.catalog import Catalog

logger = logging.getLogger("sparsemap")
M = TypeVar("M", bound=nn.Module)
Source = CheckpointSource | Checkpoint
Skip = Iterable[str] | Callable[[str], bool] | None

# How many names an error message lists before "... and N more".
MAX_LISTED = 20


# ---------------------------------------------------------------- building a model with no weights

@contextlib.contextmanager
def skeleton() -> Iterator[None]:
    """Build modules with their parameters on the meta device; buffers stay real.

    Parameters (the weights) get shapes but no storage, so building a 7 B model
    costs nothing, and their initialisers run on meta (free). Buffers are
    created normally because a model computes some of them at construction and
    never saves them (BERT's ``position_ids``, rotary ``inv_freq``): they must
    hold real values, and they are small.

    Patches ``nn.Module.register_parameter`` for the duration: not thread-safe.

    Example:
        >>> with sparsemap.skeleton():
        ...     model = MyModel(config)        # parameters on meta, buffers on CPU
        >>> sparsemap.load(model, "model.safetensors")
    """
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            # The CPU tensor the module allocated was never touched (torch.empty),
            # so dropping it here costs no page faults.
            attrs = dict(param.__dict__)
            attrs["requires_grad"] = param.requires_grad
            module._parameters[name] = type(param)(param.to("meta"), **attrs)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


# ---------------------------------------------------------------- what the model wants

class _Slot:
    """One tensor of the model, under every name that refers to it (ties)."""

    __slots__ = ("kind", "names", "places", "tensor")

    def __init__(self, kind: str, tensor: torch.Tensor) -> None:
        self.kind = kind  # "param" or "buffer"
        self.tensor = tensor  # as the model holds it before loading (a meta tensor, usually)
        self.names: list[str] = []
        self.places: list[tuple[nn.Module, str]] = []

    def now(self) -> torch.Tensor | None:
        """What the model holds in this slot now."""
        module, attr = self.places[0]
        return (module._parameters if self.kind == "param" else module._buffers).get(attr)


class ModelTensors(NamedTuple):
    """The model's tensors, from one walk over its modules."""

    slots: list[_Slot]  # parameters and persistent buffers, grouped by identity: tied weights share one
    computed: list[tuple[str, nn.Module, str]]  # (name, module, attr) of non-persistent buffers


def model_tensors(model: nn.Module) -> ModelTensors:
    """Walk the model once: its parameters and persistent buffers by identity, and its computed buffers."""
    by_id: dict[int, _Slot] = {}
    computed = []
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for attr, p in module._parameters.items():
            if p is not None:
                slot = by_id.setdefault(id(p), _Slot("param", p))
                slot.names.append(dot + attr)
                slot.places.append((module, attr))
        for attr, b in module._buffers.items():
            if b is None:
                continue
            if attr in module._non_persistent_buffers_set:
                computed.append((dot + attr, module, attr))
                continue
            slot = by_id.setdefault(id(b), _Slot("buffer", b))
            slot.names.append(dot + attr)
            slot.places.append((module, attr))
    return ModelTensors(list(by_id.values()), computed)


def skip_predicate(skip: Skip) -> Callable[[str], bool]:
    """``skip`` (names, glob patterns or a predicate) as a predicate on tensor names."""
    if skip is None:
        return lambda name: False
    if callable(skip):
        return skip
    patterns = [skip] if isinstance(skip, str) else list(skip)
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _listing(items: list[str]) -> str:
    shown = "\n  ".join(items[:MAX_LISTED])
    more = f"\n  ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"\n  {shown}{more}"


class LoadPlan(NamedTuple):
    """Which checkpoint tensor goes to which model slot, and what does not fit."""

    assignments: list[tuple[_Slot, str]]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    skipped: list[str]
    not_loaded: set[str]  # model names left as they are: skipped or missing
    model: ModelTensors  # the walk the plan was made from, for the check after loading

    def raise_for_errors(self, source: str, strict: bool) -> None:
        sections = []
        if self.mismatched:
            sections.append("shape mismatch (checkpoint vs model):" + _listing(
                [f"{n}: {tuple(c)} vs {tuple(m)}" for n, c, m in self.mismatched]))
        if strict and self.missing:
            sections.append(f"{len(self.missing)} missing from the checkpoint:" + _listing(self.missing))
        if strict and self.unexpected:
            sections.append(f"{len(self.unexpected)} in the checkpoint but not in the model:"
                            + _listing(self.unexpected))
        if not sections:
            if self.missing or self.unexpected:
                warnings.warn(f"{source}: loaded with {len(self.missing)} missing and "
                              f"{len(self.unexpected)} unexpected tensors", stacklevel=3)
            return
        cls = (ShapeMismatchError if self.mismatched
               else MissingKeysError if strict and self.missing else UnexpectedKeysError)
        hint = "\n(pass skip=[...] to leave tensors out, or strict=False to allow missing/unexpected)"
        raise cls("checkpoint does not fit the model; " + "\n".join(sections) + hint, path=source,
                  missing=self.missing, unexpected=self.unexpected, mismatched=self.mismatched)


def plan(model: nn.Module, catalog: Catalog, skip: Skip = None) -> LoadPlan:
    """Match the model's tensors to the checkpoint's, without touching any data."""
    skipped_fn = skip_predicate(skip)
    assignments, missing, mismatched, skipped = [], [], [], []
    claimed: set[str] = set()
    not_loaded: set[str] = set()
    walked = model_tensors(model)
    for slot in walked.slots:
        wanted = [n for n in slot.names if not skipped_fn(n)]
        if not wanted:
            skipped.extend(slot.names)
            not_loaded.update(slot.names)
            continue
        found = next((n for n in wanted if n in catalog), None)
        if found is None:
            missing.append(" = ".join(wanted) + f" {tuple(slot.tensor.shape)}")
            not_loaded.update(slot.names)
            continue
        claimed.update(n for n in slot.names if n in catalog)
        shape = catalog[found].shape
        if tuple(slot.tensor.shape) != shape:
            mismatched.append((found, shape, tuple(slot.tensor.shape)))
            continue
        assignments.append((slot, found))
    unexpected = []
    for name in catalog:
        if name in claimed:
            continue
        if skipped_fn(name):
            skipped.append(name)
        else:
            unexpected.append(f"{name} {catalog[name].shape}")
    return LoadPlan(assignments, missing, unexpected, mismatched, sorted(set(skipped)), not_loaded, walked)


# ---------------------------------------------------------------- loading

def load(model: M | Callable[[], M], source: Source, *, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None, strict: bool = True, skip: Skip = None,
         staging: int | str | None = None, readers: int = 2, drop_cache: bool = False) -> M:
    """Load a checkpoint into a model built on the meta device, by mapping, not copying.

    Args:
        model: a module whose parameters are on the meta device (see
            :func:`skeleton`), or a zero-argument factory, built under
            :func:`skeleton`. Real parameters are replaced all the same.
        source: a checkpoint path (any format :func:`sparsemap.open` reads), a
            catalog, or a :class:`~sparsemap.Checkpoint` (whose mappings are reused).
        device: where the weights go. ``"cpu"`` keeps them as views of the file.
        dtype: cast floating-point tensors to this dtype (integer and bool
            tensors keep theirs). ``None`` keeps the checkpoint's dtypes.
        strict: refuse missing and unexpected tensors (shape mismatches are
            always refused).
        skip: names or glob patterns (``"lm_head.*"``), or a predicate, of
            tensors to leave out: not loaded, their pages never touched; a model
            tensor that is skipped stays on the meta device.
        staging: stream instead of mapping (:mod:`sparsemap.stream`): ``K``
            reader threads fill a ring of host buffers of this total size
            (``"256M"``) with large reads, copied to ``device`` as they fill;
            host memory stays bounded by the ring. The default for a GPU
            device is 256 MiB; on the CPU, streaming makes anonymous copies
            (``None`` keeps zero-copy views). Quantized and laid-out tensors
            are loaded mapped all the same.
        readers: reader threads when streaming.
        drop_cache: when streaming, drop each range from the page cache once copied.

    Returns:
        The model, with every parameter and persistent buffer replaced by the
        checkpoint's tensor. Tied parameters stay one tensor.

    Raises:
        ShapeMismatchError, MissingKeysError, UnexpectedKeysError: the
            checkpoint does not fit; the message lists names and shapes. The
            model is left unchanged.
        UninitializedTensorError: a tensor the checkpoint cannot provide (a
            non-persistent buffer built on meta) is still on meta afterwards.
        FormatError: the checkpoint is malformed (subclasses name the fault).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = sparsemap.load(lambda: BertModel(BertConfig()), "model.safetensors")  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        with skeleton():
            model = model()
    ckpt = Checkpoint.of(source)
    the_plan = plan(model, ckpt.catalog, skip)
    the_plan.raise_for_errors(ckpt.source, strict)

    device = torch.device(device)
    streamed: dict[str, torch.Tensor] = {}
    if staging is not None or device.type != "cpu":  # a GPU is always streamed to
        from .stream import DEFAULT_STAGING, stream_tensors, streamable

        staging = DEFAULT_STAGING if staging is None else staging
        plain = [name for _, name in the_plan.assignments if streamable(ckpt.catalog[name])]
        streamed, report = stream_tensors(ckpt, plain, device=device, dtype=dtype, staging=staging,
                                          readers=readers, drop_cache=drop_cache)
        logger.info("%s: %s", ckpt.source, report)
    slots = {name: slot for slot, name in the_plan.assignments}
    for name, t in streamed.items():
        _assign(slots[name], t)
    # Lazily, one tensor at a time: each is checked (per file for views, per tensor when its pages
    # are read) and converted just before it is assigned.
    # Weights kept quantized stay so on the CPU (their matmuls run the int4/int8 kernels, whatever dtype
    # the rest is cast to); another device gets them dequantized.
    mapped = ckpt.tensors((name for name in slots if name not in streamed), reads=_reads(device, dtype),
                          keep_quantized=device.type == "cpu")
    for name, t in mapped:
        if name in ckpt.catalog.quantized and device.type == "cpu":
            _assign(slots[name], t, as_parameter=False)
        else:
            _assign(slots[name], _converted(t, device, dtype))
    _check_materialized(the_plan, ckpt.source, strict)
    return model


def _assign(slot: _Slot, t: torch.Tensor, *, as_parameter: bool = True) -> None:
    """Put ``t`` in every place of ``slot`` (tied names stay one tensor).

    A weight kept quantized (a :class:`~sparsemap.qtensor.QuantizedTensor`) goes in as it is
    (``as_parameter=False``): wrapping it in ``nn.Parameter`` detaches it, and the first detach of a
    tensor subclass loads torch's symbolic-shape machinery (sympy: 38 MiB, measured).
    """
    if slot.kind == "param":
        new = nn.Parameter(t, requires_grad=slot.tensor.requires_grad and t.is_floating_point()) \
            if as_parameter else t
        for module, attr in slot.places:
            module._parameters[attr] = new
    else:
        for module, attr in slot.places:
            module._buffers[attr] = t


def _reads(device: torch.device, dtype: torch.dtype | None) -> bool:
    """Whether loading reads every tensor's pages at once (a cast, a copy to another device)."""
    return dtype is not None or device.type != "cpu"


def _converted(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` on ``device`` in ``dtype`` (floating tensors only); ``t`` itself when nothing changes."""
    target = dtype if dtype is not None and t.is_floating_point() else t.dtype
    if t.device == device and t.dtype == target:
        return t
    return t.to(device=device, dtype=target)


def _check_materialized(the_plan: LoadPlan, source: str, strict: bool) -> None:
    """Refuse tensors still on meta that nobody asked to leave there (skipped and missing are reported)."""
    left = [name for slot in the_plan.model.slots if (t := slot.now()) is not None and t.is_meta
            for name in slot.names if name not in the_plan.not_loaded]
    left += [name for name, module, attr in the_plan.model.computed if module._buffers[attr].is_meta]
    if not left:
        return
    message = (f"{len(left)} tensors are still on the meta device after loading; the checkpoint cannot "
               "provide them (non-persistent buffers are never saved). Build the model under "
               "sparsemap.skeleton(), which keeps buffers real:" + _listing(left))
    if strict:
        raise UninitializedTensorError(message, path=source)
    warnings.warn(f"{source}: {message}", stacklevel=3)


def load_state_dict(source: Source, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    skip: Skip = None) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint as a name -> tensor dict (zero-copy views on CPU).

    Example:
        >>> sd = sparsemap.load_state_dict("model.safetensors")   # doctest: +SKIP
        >>> model.load_state_dict(sd, assign=True)
    """
    ckpt = Checkpoint.of(source)
    skipped = skip_predicate(skip)
    device = torch.device(device)
    served = ckpt.tensors((name for name in ckpt if not skipped(name)), reads=_reads(device, dtype))
    return {name: _converted(t, device, dtype) for name, t in served}


__all__ = ["LoadPlan", "load", "load_state_dict", "plan", "skeleton"]
