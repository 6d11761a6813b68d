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
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple, TypeVar

import torch
from torch import nn

from . import pages
from .checkpoint import Checkpoint
from .checkpoint import Source as CheckpointSource
from .errors import (
    LoadError,
    MissingKeysError,
    ShapeMismatchError,
    TensorParallelError,
    UnexpectedKeysError,
    UninitializedTensorError,
)
from .formats.catalog import Catalog
from .names import PrefixChange, Rename, find_prefix_change, ignored_names, renamer

logger = logging.getLogger("sparsemap")
M = TypeVar("M", bound=nn.Module)
Source = CheckpointSource | Checkpoint
Skip = Iterable[str] | Callable[[str], bool] | None

# How many names an error message lists before "... and N more".
MAX_LISTED = 20
# A saved buffer this large, computed while building under skeleton(saved_buffers=False), trims the heap.
TRIM_AFTER_NBYTES = 1 << 20


# ---------------------------------------------------------------- building a model with no weights

@contextlib.contextmanager
def skeleton(*, saved_buffers: bool = True) -> Iterator[None]:
    """Build modules with their parameters on the meta device; buffers stay real.

    Parameters (the weights) get shapes but no storage, so building a 7 B model
    costs nothing, and their initialisers run on meta (free). Buffers are
    created normally because a model computes some of them at construction and
    never saves them (BERT's ``position_ids``, rotary ``inv_freq``): they must
    hold real values, and they are small.

    With ``saved_buffers=False``, a buffer registered as persistent (one a
    checkpoint saves) goes to meta as soon as it is registered: the checkpoint
    will provide it. ``sparsemap.load(factory, ...)`` builds so (and calls the
    factory a second time where that leaves a buffer without a value, see
    :func:`load`). It matters for saved buffers that are large:
    LLMs-from-scratch's GPT keeps a 4 MiB causal mask in each of its 12 blocks,
    about 100 MiB of construction that loading throws away.

    Patches ``nn.Module.register_parameter`` (and ``register_buffer``, with ``saved_buffers=False``) for
    the duration: not thread-safe. So are ``torch.nn.init``'s
    initialisers, which do nothing to a meta tensor but cost, the first time one runs on meta in a process,
    the import of torch's Python meta kernels (``normal_``, as ``nn.Embedding`` calls it: 0.9 s and 70 MB of
    anonymous memory measured here, more than loading a 700 MB checkpoint): skipped on meta tensors.

    Example:
        >>> with sparsemap.skeleton():
        ...     model = MyModel(config)        # parameters on meta, buffers on CPU
        >>> sparsemap.load(model, "model.safetensors")
    """
    original = nn.Module.register_parameter
    original_buffer = nn.Module.register_buffer
    initialisers = {name: getattr(nn.init, name) for name in _INITIALISERS if hasattr(nn.init, name)}

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            # The CPU tensor the module allocated was never touched (torch.empty),
            # so dropping it here costs no page faults.
            attrs = dict(param.__dict__)
            attrs["requires_grad"] = param.requires_grad
            module._parameters[name] = type(param)(param.to("meta"), **attrs)

    def register_saved_on_meta(module: nn.Module, name: str, tensor: torch.Tensor | None,
                               persistent: bool = True) -> None:
        original_buffer(module, name, tensor, persistent)
        if persistent and tensor is not None and tensor.device.type != "meta":
            module._buffers[name] = tensor.to("meta")  # its values are freed on return, not after loading
            if tensor.nbytes >= TRIM_AFTER_NBYTES:
                # The C heap keeps freed memory: the last large buffer's, and what computing this one
                # freed, go back to the kernel now, before the next one is computed (8 MiB a block held
                # so in LLMs-from-scratch's GPT, 100 MiB over its 12 blocks).
                pages.trim_heap()

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    if not saved_buffers:
        nn.Module.register_buffer = register_saved_on_meta  # type: ignore[method-assign]
    for name, init in initialisers.items():
        setattr(nn.init, name, _skipped_on_meta(init))
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]
        nn.Module.register_buffer = original_buffer  # type: ignore[method-assign]
        for name, init in initialisers.items():
            setattr(nn.init, name, init)


# torch.nn.init's in-place initialisers, as modules' reset_parameters call them (``init.normal_(w)``).
_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                 "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                 "sparse_")


def _skipped_on_meta(init: Callable[..., Any]) -> Callable[..., Any]:
    """``init``, except that a meta tensor is returned as it is (it has no values to initialise)."""
    def initialise(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(tensor, torch.Tensor) and tensor.device.type == "meta":
            return tensor
        return init(tensor, *args, **kwargs)

    initialise.__wrapped__ = init  # type: ignore[attr-defined]
    return initialise


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

    assignments: list[tuple[_Slot, str]]  # (slot, checkpoint name)
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    skipped: list[str]
    not_loaded: set[str]  # model names left as they are: skipped or missing
    model: ModelTensors  # the walk the plan was made from, for the check after loading
    found_change: PrefixChange | None = None  # the prefix change found by itself, when none was given
    missing_slots: tuple[_Slot, ...] = ()  # slots no checkpoint tensor fills (and nobody skipped)
    not_required: frozenset[str] = frozenset()  # missing names the model says it does not need
    checkpoint_names: tuple[str, ...] = ()  # the checkpoint's first names, for messages

    def raise_for_errors(self, source: str, strict: bool) -> None:
        sections = []
        missing = [m for m in self.missing if m.split(" ", 1)[0] not in self.not_required]
        if self.mismatched:
            sections.append("shape mismatch (checkpoint vs model):" + _listing(
                [f"{n}: {tuple(c)} vs {tuple(m)}" for n, c, m in self.mismatched]))
        if strict and missing:
            sections.append(f"{len(missing)} missing from the checkpoint:" + _listing(missing))
        if strict and self.unexpected:
            sections.append(f"{len(self.unexpected)} in the checkpoint but not in the model:"
                            + _listing(self.unexpected))
        if not self.assignments and self.missing_slots and self.checkpoint_names and not self.mismatched:
            sections.append("no tensor of the checkpoint is a tensor of the model (compare the names: "
                            f"the model has {_first_names(self.model)}, the checkpoint "
                            f"{', '.join(map(repr, self.checkpoint_names))})")
        if not sections:
            if missing or self.unexpected:
                warnings.warn(f"{source}: loaded with {len(missing)} missing (initialised) and "
                              f"{len(self.unexpected)} unexpected tensors (left out)", stacklevel=3)
            return
        cls = (ShapeMismatchError if self.mismatched
               else MissingKeysError if strict and missing else UnexpectedKeysError)
        hint = "\n(pass skip=[...] to leave tensors out, or strict=False to allow missing/unexpected)"
        if self.found_change is not None:
            hint = (f"\n(checkpoint names were read with {self.found_change.option()}, found by themselves; "
                    "pass rename= to say otherwise)" + hint)
        raise cls("checkpoint does not fit the model; " + "\n".join(sections) + hint, path=source,
                  missing=missing, unexpected=self.unexpected, mismatched=self.mismatched)


def _first_names(walked: ModelTensors) -> str:
    return ", ".join(repr(slot.names[0]) for slot in walked.slots[:2])


def plan(model: nn.Module, catalog: Catalog, skip: Skip = None, *, rename: Rename = None,
         prefix: str | None = None) -> LoadPlan:
    """Match the model's tensors to the checkpoint's, without touching any data.

    Checkpoint names are read through ``rename``/``prefix`` (see :mod:`sparsemap.names`); with
    neither, through the one prefix change that finds the most model names, if any finds more
    than the names as they are. Names the model says never to expect are left out.
    """
    skipped_fn = skip_predicate(skip)
    walked = model_tensors(model)
    leave_out, not_required = ignored_names(model, (name for name, _, _ in walked.computed))
    change = renamer(rename, prefix)
    found = None
    if change is None:
        model_names = {n for slot in walked.slots for n in slot.names}
        found = find_prefix_change(model_names, [n for n in catalog if not leave_out(n)],
                                   getattr(model, "base_model_prefix", None) or None)
        change = found
    served: dict[str, str] = {}  # model name -> checkpoint name
    skipped: list[str] = []
    for name in catalog:
        as_model = change(name) if change is not None else name
        if as_model is None or leave_out(name) or leave_out(as_model):
            continue  # the rename leaves it out, or the model says it never expects it
        if as_model in served:
            raise LoadError(f"checkpoint tensors {served[as_model]!r} and {name!r} would both load into "
                            f"{as_model!r}; pass rename= to tell them apart", path=catalog.source)
        else:
            served[as_model] = name
    assignments, missing, mismatched, missing_slots = [], [], [], []
    claimed: set[str] = set()
    not_loaded: set[str] = set()
    for slot in walked.slots:
        wanted = [n for n in slot.names if not skipped_fn(n)]
        if not wanted:
            skipped.extend(slot.names)
            not_loaded.update(slot.names)
            continue
        hit = next((n for n in wanted if n in served), None)
        if hit is None:
            missing.append(" = ".join(wanted) + f" {tuple(slot.tensor.shape)}")
            missing_slots.append(slot)
            not_loaded.update(slot.names)
            continue
        claimed.update(served[n] for n in slot.names if n in served)
        found_name = served[hit]
        shape = catalog[found_name].shape
        if tuple(slot.tensor.shape) != shape:
            mismatched.append((found_name, shape, tuple(slot.tensor.shape)))
            continue
        assignments.append((slot, found_name))
    unexpected = []
    for as_model, name in served.items():
        if name in claimed:
            continue
        if skipped_fn(name) or skipped_fn(as_model):
            skipped.append(name)
        else:
            unexpected.append(f"{name} {catalog[name].shape}")
    quiet = frozenset(n for slot in missing_slots for n in slot.names if not_required(n))
    return LoadPlan(assignments, missing, unexpected, mismatched, sorted(set(skipped)), not_loaded, walked,
                    found, tuple(missing_slots), quiet, tuple(list(catalog)[:2]))


# ---------------------------------------------------------------- loading

def load(model: M | Callable[[], M], source: Source, *, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None, strict: bool = True, skip: Skip = None,
         rename: Rename = None, prefix: str | None = None,
         staging: int | str | None = None, readers: int = 2, drop_cache: bool = False,
         tp: Any = None, tp_plan: Mapping[str, str] | None = None) -> M:
    """Load a checkpoint into a model built on the meta device, by mapping, not copying.

    Args:
        model: a module whose parameters are on the meta device (see
            :func:`skeleton`), or a zero-argument factory, built under
            :func:`skeleton` with the buffers the checkpoint saves left to it
            (``saved_buffers=False``). The factory is called again, with real
            buffers, where that leaves one without a value: a constructor that
            reads a saved buffer, a buffer the checkpoint lacks or ``skip``
            leaves out. Real parameters are replaced all the same.
        source: a checkpoint path (any format :func:`sparsemap.open` reads), a
            catalog, or a :class:`~sparsemap.Checkpoint` (whose mappings are reused).
        device: where the weights go. ``"cpu"`` keeps them as views of the file.
        dtype: cast floating-point tensors to this dtype (integer and bool
            tensors keep theirs). ``None`` keeps the checkpoint's dtypes.
        strict: refuse missing and unexpected tensors (shape mismatches are
            always refused). With ``strict=False`` a missing parameter is
            initialised on the CPU as the model would initialise it (its
            module's ``reset_parameters``, or transformers' ``_init_weights``),
            and one that cannot be is refused by name: none is left on meta.
        skip: names or glob patterns (``"lm_head.*"``), or a predicate, of
            tensors to leave out: not loaded, their pages never touched; a model
            tensor that is skipped stays on the meta device.
        rename: how checkpoint names become model names: a mapping of name
            prefixes (``{"module.": ""}``, ``{"": "bert."}``) or a function
            (``None`` from it leaves a tensor out). With neither ``rename`` nor
            ``prefix``, a single prefix that explains the difference (a
            DataParallel ``module.``, a nested ``state_dict.``, a transformers
            ``base_model_prefix``) is found and used: see :mod:`sparsemap.names`.
        prefix: the checkpoint's names carry this prefix (``"module."``): short for
            ``rename={prefix: ""}``.
        staging: stream instead of mapping (:mod:`sparsemap.stream`): ``K``
            reader threads fill a ring of host buffers of this total size
            (``"256M"``) with large reads, copied to ``device`` as they fill;
            host memory stays bounded by the ring. The default for a GPU
            device is 256 MiB; on the CPU, streaming makes anonymous copies
            (``None`` keeps zero-copy views). Quantized and laid-out tensors
            are loaded mapped all the same.
        readers: reader threads when streaming.
        drop_cache: when streaming, drop each range from the page cache once copied.
        tp: tensor parallelism: the ``torch.distributed`` ``DeviceMesh`` (1-D, or one
            with a ``"tp"`` dimension) or ``ProcessGroup`` the tensors are split over.
            Each rank maps only its slice of each tensor the plan splits (a view:
            contiguous rows for ``colwise``, a strided view for ``rowwise``) and the
            model gets ``DTensor`` parameters and the parallel forwards, so it runs
            under tensor parallelism as it is: see :mod:`sparsemap.parallel`. Call it
            on every rank. The slices go to ``device`` as they are (no ``staging``).
            ``source`` may then also be Meta's release in ``N`` files
            (``consolidated.NN.pth``) on ``N`` ranks: rank ``i`` maps file ``i`` only.
        tp_plan: with ``tp``, module name patterns to ``"colwise"``, ``"rowwise"``
            or ``"replicate"`` (``{"layers.*.mlp.up_proj": "colwise"}``); ``None``:
            the model's own plan (a transformers model's ``tp_plan``).

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
        TensorParallelError: ``tp_plan`` names nothing, or splits a dimension (or
            attention heads) the world size does not divide, or a Meta release's
            number of files is not the world size: raised alike on every rank,
            before any tensor is mapped.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = sparsemap.load(lambda: BertModel(BertConfig()), "model.safetensors")  # doctest: +SKIP
    """
    factory = None if isinstance(model, nn.Module) else model
    if factory is not None:
        model = _build(factory)
    _tie_again(model)
    device = torch.device(device)
    sharding = mesh = ranked = None
    if tp is not None:  # checked first, alike on every rank: headers are read, nothing is mapped yet
        from .parallel import mesh_of, prepare
        from .rank_sources import open_for_rank

        if staging is not None:
            raise TensorParallelError("staging= streams whole tensors; with tp= each rank copies its slices "
                                      "to the device itself: leave staging out")
        mesh = mesh_of(tp, device.type)
        # Where this rank's tensors come from: the checkpoint's whole tensors, or its own file of a release
        # whose files already are the ranks' slices (Meta's consolidated.NN.pth).
        ranked = open_for_rank(source, mesh.get_local_rank(), mesh.size())
        sharding = prepare(model, tp_plan, mesh.size())
    elif tp_plan is not None:
        raise TensorParallelError("tp_plan= needs tp=: the device mesh or process group the tensors are "
                                  "split over")
    ckpt = Checkpoint.of(source) if ranked is None else ranked  # either: .catalog, .source
    the_plan = plan(model, ckpt.catalog, skip, rename=rename, prefix=prefix)
    the_plan.raise_for_errors(ckpt.source, strict)
    if the_plan.found_change is not None:
        logger.info("%s: checkpoint names read with %s", ckpt.source, the_plan.found_change.option())
    if sharding is not None and ranked is not None:
        sharding.check_loadable((n for slot in the_plan.missing_slots for n in slot.names), ckpt.source)
        sharding.apply(model, mesh)
        slots = {name: slot for slot, name in the_plan.assignments}
        held = {name: slot.now() for name, slot in slots.items()}  # split ones: meta DTensor placeholders
        for name, t, as_parameter in sharding.serve(ranked, held, mesh, reads=_reads(device, dtype),  # type: ignore[arg-type]
                                                    convert=lambda t: _converted(t, device, dtype),
                                                    keep_quantized=device.type == "cpu"):
            _assign(slots[name], t, as_parameter=as_parameter)
    else:
        assert isinstance(ckpt, Checkpoint)
        _assign_all(ckpt, the_plan, device=device, dtype=dtype, staging=staging, readers=readers,
                    drop_cache=drop_cache)
    if factory is not None:
        _compute_buffers_left_on_meta(factory, model)
    _initialise_missing(model, the_plan, ckpt.source, dtype, device)
    _check_materialized(the_plan, ckpt.source, strict)
    if factory is not None:  # what building computed and loading replaced is free now: back to the kernel
        pages.trim_heap()
    return model


def _assign_all(ckpt: Checkpoint, the_plan: LoadPlan, *, device: torch.device, dtype: torch.dtype | None,
                staging: int | str | None, readers: int, drop_cache: bool) -> None:
    """Assign every planned tensor, whole: views of the mapping, converted, or streamed to a device."""
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


def _build(factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` under :func:`skeleton`, the buffers a checkpoint saves left on meta for the file to give.

    A constructor that reads such a buffer's values (``.item()``, a branch on it) cannot run on meta: it is
    built again with real buffers, as :func:`skeleton` builds by default.
    """
    try:
        with skeleton(saved_buffers=False):
            model = factory()
    except Exception as e:  # any failure on meta values: the plain build below says what is really wrong
        logger.debug("building with saved buffers on meta failed (%s): building with real buffers", e)
        with skeleton():
            model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"the model factory returned {type(model).__name__}, not an nn.Module")
    return model


def _compute_buffers_left_on_meta(factory: Callable[[], nn.Module], model: nn.Module) -> None:
    """Give every buffer still on meta after loading the value the model computes, from one build with real
    buffers: buffers built on meta that the checkpoint lacks or that ``skip`` left out, and buffers the
    constructor computed from them (older rotary code: ``cos`` from a saved ``inv_freq``). So a model
    built from a factory holds every buffer :func:`skeleton`'s default build would."""
    left = [(prefix, module, attr) for prefix, module in model.named_modules(remove_duplicate=False)
            for attr, b in module._buffers.items() if b is not None and b.is_meta]
    if not left:
        return
    with skeleton():
        computed = dict(factory().named_buffers(remove_duplicate=False))
    for prefix, module, attr in left:
        value = computed.get(f"{prefix}.{attr}" if prefix else attr)
        if value is not None and not value.is_meta:
            module._buffers[attr] = value


def _tie_again(model: nn.Module) -> None:
    """Tie the weights a transformers model declares tied (``lm_head.weight`` is ``embed_tokens.weight``) when
    they came out as two meta tensors, before names are matched (else the head is "missing").

    accelerate's ``init_empty_weights`` wraps every parameter assigned while it is active in a new one, so the
    ties transformers makes in ``post_init`` are lost; transformers' own ``from_pretrained`` ties again after
    loading, and so does this, with the model's ``tie_weights()``, which follows its config. Only for a model
    wholly on meta (nothing loaded yet to lose); one built under :func:`skeleton` keeps its ties: a no-op.
    """
    tie = getattr(model, "tie_weights", None)
    if getattr(model, "config", None) is None or not callable(tie):
        return
    params = list(model.parameters())  # a tied tensor comes once
    if not params or not all(p.is_meta for p in params):
        return
    tie()
    if len(list(model.parameters())) < len(params):
        logger.info("%s: weights tied again as its config declares (they were built untied)",
                    type(model).__name__)


def _initialise_missing(model: nn.Module, the_plan: LoadPlan, source: str, dtype: torch.dtype | None,
                        device: torch.device) -> None:
    """Give the parameters the checkpoint lacks real values on ``device``, as the model initialises them.

    Only reached when missing tensors are allowed (``strict=False``, or names the model says it does
    not need). Each missing parameter gets memory filled with NaN (tied names share it); then each
    module owning one runs its initialiser (transformers' ``_init_weights``, else ``reset_parameters``)
    with its loaded parameters and buffers swapped for meta placeholders, on which initialisers do
    nothing: a tensor mapped from the file is never written (that would copy its pages, and change
    loaded running statistics), and only the missing ones change. A parameter no initialiser filled
    (still NaN: the model's initialiser skips its kind of module, or there is none) is refused by name.
    """
    slots = [slot for slot in the_plan.missing_slots
             if slot.kind == "param" and (t := slot.now()) is not None and t.is_meta]
    if not slots:
        return
    init = getattr(model, "_init_weights", None)  # transformers' per-module initialiser
    fresh = set()
    owners: dict[int, nn.Module] = {}
    for slot in slots:
        meta = slot.now()
        assert meta is not None
        target = dtype if dtype is not None and meta.is_floating_point() else meta.dtype
        fill = float("nan") if target.is_floating_point else 0
        blank = torch.full(meta.shape, fill, dtype=target, device=device)
        _assign(slot, blank)
        fresh.add(id(slot.now()))
        owners.update((id(m), m) for m, _ in slot.places)
    with torch.no_grad():
        for module in owners.values():
            if init is None and not hasattr(module, "reset_parameters"):
                continue  # its parameters stay NaN: refused below
            kept_params = {a: p for a, p in module._parameters.items()
                           if p is not None and id(p) not in fresh}
            kept_buffers = {a: b for a, b in module._buffers.items() if b is not None}
            # Placeholders: initialisers write nothing to a meta tensor.
            for attr, p in kept_params.items():
                module._parameters[attr] = nn.Parameter(torch.empty_like(p, device="meta"),
                                                        requires_grad=p.requires_grad)
            for attr, b in kept_buffers.items():
                module._buffers[attr] = torch.empty_like(b, device="meta")
            try:
                init(module) if init is not None else module.reset_parameters()  # type: ignore[operator]
            finally:
                module._parameters.update(kept_params)
                module._buffers.update(kept_buffers)
    refused = [n for slot in slots if (t := slot.now()) is not None and t.is_floating_point()
               and bool(torch.isnan(t).any()) for n in slot.names]
    if refused:
        raise MissingKeysError("these tensors are missing from the checkpoint and no initialiser of the "
                               "model fills them: pass skip= to leave them on the meta device knowingly, or "
                               "give them in the checkpoint" + _listing(refused),
                               path=source, missing=refused)


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
               "sparsemap.skeleton(), which keeps buffers real, or pass sparsemap.load a factory:"
               + _listing(left))
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
