"""Tensor-parallel loading: each rank of a ``torch.distributed`` group maps only its slice of each tensor.

A naive tensor-parallel load has every rank read (or copy) the whole checkpoint and keep a slice. Here every
rank maps the checkpoint (address space, no pages) and gives the model views of its own slice only:

* ``colwise`` splits a Linear's output features: the rows of its ``(out, in)`` weight, and its bias. A
  rank's slice is a contiguous run of rows, a zero-copy view that touches no page outside it.
* ``rowwise`` splits the input features, the columns of the weight (its bias is added once, after the
  reduction: replicated). The slice is a strided view: it touches the pages holding its part of every row,
  which is every page when a row is shorter than two pages. Stored transposed
  (``sparsemap convert --transpose '*o_proj.weight' --transpose '*down_proj.weight'``), the same slice is a
  contiguous run of stored rows again.
* ``replicate``, and every tensor the plan does not name: the whole tensor.

A plan maps module (or parameter) name patterns to styles: ``fnmatch`` patterns on full names
(``"model.layers.*.mlp.up_proj"``), the first that matches wins, and a module's rule covers its own
parameters. A transformers model's own plan (``model.tp_plan``: its config's ``base_model_tp_plan`` and its
class's ``_tp_plan``, what transformers' ``tp_plan="auto"`` applies) also uses transformers' other styles
(``embedding_rowwise`` for the vocabulary, ``colwise_gather_output`` for the head...).

The steps; the first two read headers and the model built on meta only, so that a bad plan or source fails
alike on every rank, before anything is mapped:

0. :func:`~sparsemap.rank_sources.open_for_rank` says where this rank's tensors come from (below).
1. :func:`prepare` checks the plan against the model (built on meta) and the world size: that every pattern
   names something, which dimension each parameter is split on, that the world size divides it (and the
   attention heads it holds), that tied weights are split alike. It returns a :class:`Sharding`.
2. :meth:`Sharding.apply` makes the split parameters meta ``DTensor`` placeholders and installs the parallel
   forwards: transformers' own styles on a transformers model, ``torch.distributed.tensor.parallel``'s
   ``ColwiseParallel``/``RowwiseParallel`` on any other module.
3. :meth:`Sharding.serve` gives the loader, for each placeholder, ``DTensor.from_local`` of this rank's slice
   of the mapped tensor (:func:`sparsemap.load` assigns it). The mappings are advised ``MADV_RANDOM`` (the
   kernel's read-around on a fault, 128 KiB to several MiB, would read the neighbouring ranks' slices) and
   each slice's pages are read ahead with ``MADV_WILLNEED``: large reads, of this rank's pages only.

Where a rank's tensors come from is decided in one place, :mod:`sparsemap.rank_sources`: the ``parts`` of
what its ``open_for_rank`` returns, ``WholeTensors`` for any checkpoint sparsemap opens (each split tensor
narrowed to the rank's slice, a view of the mapping) or ``RankFiles`` for Meta's release in ``N`` files on
``N`` ranks (rank ``i`` maps file ``i`` and no other; a tensor the plan splits otherwise than the files is
joined from every file's part, the rank's share only). Another number of ranks is refused
(:class:`TensorParallelError`, the same line on every rank): ``sparsemap convert`` joins the files for any
number.

Example (run under ``torchrun --nproc-per-node 2``)::

    torch.distributed.init_process_group("gloo")
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,))
    model = sparsemap.load(lambda: LlamaForCausalLM(config), "model.safetensors", tp=mesh)
    # or: sparsemap.from_pretrained("folder", tp_plan="auto")
    # Meta's Llama-2-13b/ (consolidated.00.pth, consolidated.01.pth) on 2 ranks, rank i mapping file i:
    model = sparsemap.from_pretrained("Llama-2-13b/", tp_plan="auto")
"""

from __future__ import annotations

import fnmatch
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import TensorParallelError
from .rank_sources import RankSource, read_ahead

Plan = Mapping[str, str]

# Styles that split no parameter (they change a module's forward at most).
_WHOLE = frozenset({"replicate", "all_reduce", "sequence_parallel", "replicated_with_grad_allreduce",
                    "local_params", "mla_kv_a_proj", "moe_identity_expert"})
_COLWISE = frozenset({"colwise", "colwise_rep", "colwise_gather_output"})
_ROWWISE = frozenset({"rowwise", "rowwise_rep", "rowwise_split_input"})
_EMBEDDING = {"embedding_rowwise": 0, "embedding_colwise": 1}
# The styles of torch.distributed.tensor.parallel a plain module's plan may name.
TORCH_STYLES = ("colwise", "rowwise", "replicate")

# How many patterns or names a message shows.
_SHOWN = 3


# ---------------------------------------------------------------- the process group

def world_mesh(device_type: str = "cpu") -> Any:
    """A 1-D ``DeviceMesh`` over every rank, initialising ``torch.distributed`` from ``torchrun``'s
    environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...) when nobody has: gloo on the CPU, NCCL on
    GPUs.

    Raises:
        TensorParallelError: not initialised, and not launched by ``torchrun``.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_available():
        raise TensorParallelError(f"tensor parallelism runs on torch.distributed, which torch "
                                  f"{torch.__version__} was built without")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise TensorParallelError("tensor parallelism runs on torch.distributed: launch the script with "
                                      "torchrun (`torchrun --nproc-per-node 2 script.py`), or call "
                                      "torch.distributed.init_process_group() first, or pass a device mesh")
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend={"cpu": "gloo", "cuda": "nccl"}.get(device_type))
    return init_device_mesh(device_type, (dist.get_world_size(),))


def mesh_of(tp: Any, device_type: str) -> Any:
    """``tp`` (a ``DeviceMesh``, or a ``ProcessGroup``) as the 1-D mesh tensor parallelism runs on: a
    mesh with several dimensions gives its ``"tp"`` one."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(tp, dist.ProcessGroup):
        return DeviceMesh.from_group(tp, device_type)
    if not isinstance(tp, DeviceMesh):
        raise TensorParallelError(f"tp= takes a torch.distributed DeviceMesh or ProcessGroup, not "
                                  f"{type(tp).__name__}")
    if tp.ndim > 1:
        if "tp" not in (tp.mesh_dim_names or ()):
            raise TensorParallelError(f"tp= is a {tp.ndim}-D device mesh without a 'tp' dimension (it has "
                                      f"{tp.mesh_dim_names}); pass the 1-D mesh the tensors are split over")
        tp = tp["tp"]
    if tp.device_type != device_type:
        raise TensorParallelError(f"the device mesh is on {tp.device_type!r} but the weights go to "
                                  f"{device_type!r}: pass device= on the mesh's kind of device")
    return tp


# ---------------------------------------------------------------- the plan

def model_plan(model: nn.Module) -> dict[str, str]:
    """The model's own plan: a transformers model's ``tp_plan`` (its config's ``base_model_tp_plan`` and its
    class's ``_tp_plan``, as transformers merges them)."""
    plan = getattr(model, "tp_plan", None)
    if plan is None:
        plan = getattr(model, "_tp_plan", None)
    if not plan:
        raise TensorParallelError(f"{type(model).__name__} has no tensor-parallel plan of its own (a "
                                  "transformers model carries one as tp_plan); pass tp_plan={'module name "
                                  "pattern': 'colwise' | 'rowwise' | 'replicate'}")
    return dict(plan)


def _is_transformers(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _split_dim(style: str, attr: str, ndim: int, module: nn.Module, *, hf: bool) -> int | None:
    """The dimension ``style`` splits parameter ``attr`` (of ``ndim`` dims) of ``module`` on; None: whole.

    As the styles themselves split: transformers' colwise ones ``Shard(ndim - 2)`` (a weight's output
    features, a bias), its rowwise ones ``Shard(-1)`` and a replicated bias; torch's the same for a Linear,
    and an Embedding's dim 1 (colwise) or 0 (rowwise).
    """
    if style in _WHOLE:
        return None
    if not hf and isinstance(module, nn.Embedding):
        return 1 if style == "colwise" else 0
    if style in _COLWISE:
        return max(ndim - 2, 0)
    if style in _ROWWISE:
        return None if attr == "bias" or ndim < 2 else ndim - 1
    return _EMBEDDING[style]


def _check_style(style: object, where: str, module: nn.Module | None, *, hf: bool) -> None:
    known = sorted(_WHOLE | _COLWISE | _ROWWISE | set(_EMBEDDING)) if hf else list(TORCH_STYLES)
    if not isinstance(style, str) or style not in known:
        pieces = hf and isinstance(style, str) and any(k in style for k in ("packed", "moe", "ep_"))
        hint = ("transformers' packed and expert styles split a tensor into pieces that are not one view: "
                "not supported" if pieces else f"known: {', '.join(known)}")
        raise TensorParallelError(f"tp_plan[{where!r}] = {style!r} is not a style sparsemap maps ({hint})")
    if module is None:
        return
    kind = type(module).__name__
    if hf:
        needs = ("out_features" if style in _COLWISE else "in_features" if style in _ROWWISE
                 else "embedding_dim" if style in _EMBEDDING else None)
        if needs is not None and not hasattr(module, needs):
            splits = "embeddings" if style in _EMBEDDING else "linear layers"
            raise TensorParallelError(f"tp_plan[{where!r}] = {style!r}, but {where} is a {kind}, which has "
                                      f"no {needs}: {style} splits {splits}")
    elif style != "replicate" and not isinstance(module, nn.Linear | nn.Embedding):
        raise TensorParallelError(f"tp_plan[{where!r}] = {style!r}, but {where} is a {kind}: torch's "
                                  f"{style} splits nn.Linear and nn.Embedding only")


@dataclass(frozen=True)
class Sharding:
    """A tensor-parallel plan checked against a model and a world size (made by :func:`prepare`).

    Attributes:
        size: the number of ranks.
        plan: the plan as given (patterns to styles), for the model to keep (``model.tp_plan``).
        split: parameter name -> the dimension it is split on, for every split parameter (each tied
            name).
        modules: module name -> the style whose forward it runs, in the model's order.
        styles: split parameter name -> the style that splits it.
        hf: a transformers model (transformers' styles) rather than any module (torch's).
    """

    size: int
    plan: dict[str, str]
    split: dict[str, int]
    modules: dict[str, str]
    styles: dict[str, str]
    hf: bool

    # ------------------------------------------------------------ step 2: placeholders and forwards

    def check_loadable(self, missing: Iterable[str], source: str) -> None:
        """Refuse a split parameter the checkpoint lacks (``missing``: model names): a slice of an
        initialised tensor is not what every rank would initialise alike."""
        missing = [n for n in missing if n in self.split]
        if missing:
            raise TensorParallelError(f"{len(missing)} split parameters are missing from the checkpoint "
                                      f"({', '.join(missing[:_SHOWN])}): give them in the checkpoint, or "
                                      "replicate them in tp_plan", path=source)

    def apply(self, model: nn.Module, mesh: Any) -> None:
        """Make the split parameters meta ``DTensor`` placeholders and install the parallel forwards."""
        from torch.distributed.tensor import DTensor, Shard

        tied = _tied(model)
        if self.hf:
            self._apply_transformers(model, mesh, tied)
        else:
            from torch.distributed.tensor import parallel

            styles = {"colwise": parallel.ColwiseParallel, "rowwise": parallel.RowwiseParallel}
            chosen = {name: styles[style]() for name, style in self.modules.items() if style in styles}
            if chosen:  # src_data_rank=None: no data to send, every parameter is on meta
                parallel.parallelize_module(model, mesh, chosen, src_data_rank=None)
        # Each module's style replaced its own parameters: a tied tensor is one tensor again (the split one).
        for names in tied:
            now = [model.get_parameter(name) for name in names]
            keep = next((t for t in now if isinstance(t, DTensor)), now[0])
            for name in names:
                module_name, _, attr = name.rpartition(".")
                model.get_submodule(module_name)._parameters[attr] = keep
        for name, dim in self.split.items():
            placeholder = model.get_parameter(name)
            if not isinstance(placeholder, DTensor) or tuple(placeholder.placements) != (Shard(dim),):
                got = getattr(placeholder, "placements", "not split")
                raise TensorParallelError(f"{name}: its style {self.styles[name]!r} split it as {got}, not "
                                          f"on dim {dim} as sparsemap expected (a newer transformers or "
                                          "torch?)")

    def _apply_transformers(self, model: nn.Module, mesh: Any, tied: list[list[str]]) -> None:
        import transformers
        from transformers.integrations import tensor_parallel as hf_tp

        registry = getattr(hf_tp, "ALL_PARALLEL_STYLES", {})
        wanted = {*self.modules.values(), *self.styles.values()}
        lacking = sorted(s for s in wanted if s not in registry or not hasattr(registry[s], "shard_param")
                         or not hasattr(registry[s], "install_forward"))
        if lacking:
            raise TensorParallelError(f"transformers {transformers.__version__} lacks the tensor-parallel "
                                      f"styles {lacking} as sparsemap applies them (shard_param and "
                                      "install_forward, transformers 5)")
        styles = {name: registry[name] for name in wanted}
        first_of = {name: names[0] for names in tied for name in names}
        for name in self.split:
            if first_of.get(name, name) != name:
                continue  # a tied name: split once, under its first name, and tied again after
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            styles[self.styles[name]].shard_param(module, attr, mesh)  # a meta DTensor, no data
        for module_name, style in self.modules.items():
            if style == "replicate":
                continue  # no forward to change
            module = model.get_submodule(module_name)
            styles[style].install_forward(module, mesh)
            module._is_hooked = True
        # What transformers' own tensor-parallel loading records (generate reads them for its caches).
        model._tp_plan = dict(self.plan)  # type: ignore[assignment]
        model._tp_size = self.size  # type: ignore[assignment]
        model._device_mesh = mesh  # type: ignore[assignment]

    # ------------------------------------------------------------ step 3: the weights

    def serve(self, source: RankSource, held: Mapping[str, torch.Tensor], mesh: Any, *,
              reads: bool, convert: Callable[[torch.Tensor], torch.Tensor], keep_quantized: bool,
              prefetch: bool = True) -> Iterator[tuple[str, torch.Tensor, bool]]:
        """``(checkpoint name, tensor, as a parameter)`` for each of ``held`` (checkpoint name -> what the
        model holds there now): this rank's slice as a ``DTensor`` where that is a placeholder, the whole
        tensor elsewhere (weights kept quantized as they are), as ``source`` gives them (views of a mapping
        where they can be: see :meth:`WholeTensors.parts`, :meth:`RankFiles.parts`). ``convert`` (a cast, a
        copy to the device) copies the slice only.

        With ``prefetch``, the mappings are advised ``MADV_RANDOM`` and the pages of each slice read ahead
        (``MADV_WILLNEED``): see the module's docstring.
        """
        from torch.distributed.tensor import DTensor

        wanted = {name: shard_dim(t) if isinstance(t, DTensor) else None for name, t in held.items()}
        advised: set[str] = set()
        for name, t in source.parts(wanted, reads=reads, keep_quantized=keep_quantized):
            if name in source.catalog.quantized and keep_quantized and wanted[name] is None:
                yield name, t, False
                continue
            if prefetch:
                read_ahead(t, advised)
            placeholder = held[name]
            if not isinstance(placeholder, DTensor):
                yield name, convert(t), True
                continue
            yield name, DTensor.from_local(convert(t), mesh, placeholder.placements, run_check=False,
                                           shape=placeholder.shape, stride=placeholder.stride()), True


def prepare(model: nn.Module, plan: Plan | None, size: int) -> Sharding:
    """Check ``plan`` (``None``: the model's own) against ``model`` on ``size`` ranks, touching nothing.

    Raises:
        TensorParallelError: a pattern that names no module or parameter, a style sparsemap does not map (or
            one that does not fit the module), a split dimension or head count ``size`` does not divide, tied
            tensors split differently. The message is one line, the same on every rank.
    """
    hf = _is_transformers(model)
    plan = model_plan(model) if plan is None else plan
    if not isinstance(plan, Mapping) or not plan:
        raise TensorParallelError(f"tp_plan= takes a non-empty mapping of name patterns to styles, not "
                                  f"{plan!r}")
    for pattern, style in plan.items():
        if not isinstance(pattern, str):
            raise TensorParallelError(f"tp_plan keys are module name patterns (str), not {pattern!r}")
        _check_style(style, pattern, None, hf=hf)
    used: set[str] = set()

    def rule(name: str) -> str | None:
        matching = [pattern for pattern in plan if fnmatch.fnmatchcase(name, pattern)]
        used.update(matching)
        return plan[matching[0]] if matching else None

    split: dict[str, int] = {}
    styles: dict[str, str] = {}
    modules: dict[str, str] = {}
    for module_name, module in model.named_modules():
        module_style = rule(module_name) if module_name else None
        if module_style is not None:
            _check_style(module_style, module_name, module, hf=hf)
            modules[module_name] = module_style
        for attr, param in module._parameters.items():
            if param is None:
                continue
            name = f"{module_name}.{attr}" if module_name else attr
            own = rule(name)
            if own is not None and not hf:
                raise TensorParallelError(f"tp_plan names the parameter {name}: torch's styles split "
                                          f"modules; name its module ({module_name or 'the model'})")
            style = own or module_style
            if style is None:
                continue
            dim = _split_dim(style, attr, param.dim(), module, hf=hf)
            if dim is None:
                continue
            _check_divides(model, module_name, module, name, tuple(param.shape), dim, style, size)
            split[name], styles[name] = dim, style
    unused = [p for p in plan if p not in used]
    if unused:
        leaves = [n for n, m in model.named_modules() if m._parameters and not m._modules]
        first = max(leaves[:8] or [""], key=lambda n: n.count("."))  # as deep as a plan's names usually are
        several = len(unused) > 1
        raise TensorParallelError(f"tp_plan pattern{'s' if several else ''} "
                                  f"{', '.join(map(repr, unused[:_SHOWN]))} name{'' if several else 's'} "
                                  f"no module or parameter of {type(model).__name__} (full names, such as "
                                  f"{first!r})")
    for names in _tied(model):
        dims = {n: split.get(n) for n in names}
        if len(set(dims.values())) > 1:
            shown = ", ".join(f"{n} ({'whole' if d is None else f'dim {d}'})" for n, d in dims.items())
            raise TensorParallelError(f"tied tensors are split differently by tp_plan: {shown}; give them "
                                      "one rule")
    return Sharding(size, dict(plan), split, modules, styles, hf)


def _tied(model: nn.Module) -> list[list[str]]:
    """The names of each parameter the model holds under several names (tied weights)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def _check_divides(model: nn.Module, module_name: str, module: nn.Module, name: str,
                   shape: tuple[int, ...], dim: int, style: str, size: int) -> None:
    """Refuse a split ``size`` does not divide: the dimension itself, or the attention heads it holds (a
    projection of a module with a ``head_dim``, such as Llama's attention, is split between heads)."""
    where = f"tp_plan: {name} {shape} is split on dim {dim} by {style!r}"
    if shape[dim] % size:
        raise TensorParallelError(f"{where}: {shape[dim]} does not divide among {size} ranks")
    parent = model.get_submodule(module_name.rpartition(".")[0]) if "." in module_name else model
    head_dim = getattr(parent, "head_dim", None)
    if isinstance(module, nn.Linear) and isinstance(head_dim, int) and head_dim > 0 \
            and shape[dim] % head_dim == 0 and (heads := shape[dim] // head_dim) % size:
        raise TensorParallelError(f"{where}: its {heads} heads (of {head_dim}) do not divide among {size} "
                                  f"ranks; replicate {module_name} (tp_plan={{...: 'replicate'}}) or run a "
                                  "number of ranks that divides the heads")


def rowwise_weights(plan: Plan) -> list[str]:
    """Patterns of the weights ``plan`` splits rowwise: what to store transposed
    (``Layout(transpose=...)``, ``sparsemap convert --transpose``) so that each rank's slice of them is a
    contiguous run of stored rows rather than a part of every row.

    Example:
        >>> rowwise_weights({"layers.*.mlp.down_proj": "rowwise", "layers.*.mlp.up_proj": "colwise"})
        ['layers.*.mlp.down_proj.weight']
    """
    return [f"{pattern}.weight" for pattern, style in plan.items() if style in _ROWWISE]


# ---------------------------------------------------------------- placements

def shard_dim(placeholder: torch.Tensor) -> int | None:
    """The dimension a ``DTensor`` placeholder on a 1-D mesh is split on (its ``Shard``), or ``None``:
    ``Replicate`` (torch's rowwise bias, a ``DTensor`` whole on every rank)."""
    for placement in placeholder.placements:  # type: ignore[attr-defined]
        if placement.is_shard():
            return int(placement.dim) % placeholder.dim()
    return None


__all__ = ["Plan", "Sharding", "mesh_of", "model_plan", "prepare", "rowwise_weights", "shard_dim",
           "world_mesh"]
