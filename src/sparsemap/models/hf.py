"""transformers integration: ``sparsemap.from_pretrained``.

Builds the transformers model class from its config under
:func:`sparsemap.skeleton` (parameters on meta, buffers such as rotary caches
computed for real), then maps the checkpoint's weights into it. Sources: a
Hugging Face folder (config.json + safetensors / .bin, sharded or not), a
single checkpoint file with ``config=``, or a GGUF file of any architecture
transformers' GGUF tables map (config from its header, tensors renamed to
transformers' names and their values put back, dequantized on access:
:mod:`sparsemap.models.gguf_hf`), or a Hugging Face repo id found in the local
cache (never downloaded).

transformers' own ``from_pretrained`` arguments are taken with transformers'
meaning where sparsemap can honour it (``dtype``, ``device_map`` onto one
device, ``revision``, ``subfolder``, ``gguf_file``, ``attn_implementation``,
``tp_plan`` under ``torchrun``, config overrides...); the others (quantizing,
multi-device maps, offloading, remote code) are refused by name, each with its
reason and what to do instead.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from ..errors import BadInputError, SourceNotFoundError, UnsupportedArgumentError
from ..extras import require
from ..formats.catalog import Catalog
from ..formats.dispatch import open_catalog
from ..formats.dtypes import FLOATING, TORCH_NAMES
from ..formats.source import ModelSource, locate, resolve_source
from ..loader import Skip, load, skeleton
from ..names import Rename
from .gguf_hf import hf_catalog, hf_config, repacked


def resolve_config(src: ModelSource, config: Any = None) -> Any:
    """The transformers config of a source: ``config`` when given, a GGUF's header (through
    transformers' GGUF tables, :func:`~sparsemap.models.gguf_hf.hf_config`), else ``config.json``."""
    require("transformers", needed_for="a transformers model (sparsemap.from_pretrained)")
    from transformers import AutoConfig

    if config is not None:
        return config
    if src.is_gguf:
        return hf_config(open_catalog(src))
    if src.format == "llama2c":  # its header is the config
        from .llama2c import config as llama2c_config

        return AutoConfig.for_model(**llama2c_config(open_catalog(src)))
    if src.format == "meta-llama":  # Meta's release: params.json is the config
        from .meta_llama import config as meta_config

        return meta_config(src)
    if src.config is None:
        raise SourceNotFoundError(f"no config.json next to the weights; pass config= (looked in "
                                  f"{src.folder})", path=src.path)
    try:
        return AutoConfig.from_pretrained(src.folder)
    except ValueError as e:  # an unknown model_type, a malformed config
        raise BadInputError(f"transformers cannot read config.json: {str(e).splitlines()[0][:200]}",
                            path=src.config) from None


def _gguf_catalog(src: ModelSource, model: nn.Module, keep_quantized: bool) -> Catalog:
    raw = open_catalog(src)
    return repacked(raw, model) if keep_quantized else hf_catalog(raw, model)


def class_for(config: Any) -> type[nn.Module]:
    """The transformers class a config names (``architectures``), else its causal-LM or base auto class."""
    require("transformers", needed_for="a transformers model (sparsemap.from_pretrained)")
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    for auto in (AutoModelForCausalLM, AutoModel):
        try:
            return auto._model_mapping[type(config)]  # type: ignore[no-any-return]
        except KeyError:
            continue
    raise BadInputError(f"no transformers model class for config {type(config).__name__}")


# ---------------------------------------------------------------- transformers' arguments

DeviceMap = str | int | torch.device | Mapping[str, str | int | torch.device] | None

# device_map values that ask accelerate to place the model itself.
AUTO_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

ONE_DEVICE = ("sparsemap loads the whole model onto one device (mapped from the file on the CPU, or "
              "copied to one GPU); to run a model larger than memory, use sparsemap.Budget (`sparsemap run "
              "--memory-limit SIZE`), which keeps what fits mapped and streams the rest layer by layer")
QUANTIZE = ("sparsemap does not quantize while loading: a GGUF's quantized blocks stay quantized with "
            "keep_quantized=True, and `sparsemap convert --quantize` writes a quantized file once")
OFFLOAD = ("sparsemap does not offload to disk: its weights already are pages of the checkpoint file, which "
           "the kernel drops and reads back as needed; to bound memory, use sparsemap.Budget (`sparsemap run "
           "--memory-limit SIZE`)")
NO_REMOTE_CODE = "sparsemap never runs code from a checkpoint folder or the Hugging Face Hub"
PEFT = ("sparsemap loads no PEFT adapters: load the base model with it, then apply the adapter with "
        "peft.PeftModel.from_pretrained(model, adapter)")


class _Refused(NamedTuple):
    """Why an argument of transformers' ``from_pretrained`` is refused; its values that ask for nothing."""

    reason: str
    harmless: tuple[object, ...] = (None, False)  # transformers' defaults: given so, nothing is asked


_KERNELS = _Refused("it downloads kernels from the Hugging Face Hub and runs them; " + NO_REMOTE_CODE)

# transformers' from_pretrained arguments that sparsemap does not honour: refused by name, with the reason.
REFUSED: dict[str, _Refused] = {
    "quantization_config": _Refused(QUANTIZE),
    "load_in_8bit": _Refused(QUANTIZE),
    "load_in_4bit": _Refused(QUANTIZE),
    "max_memory": _Refused("it is a per-device budget for accelerate's device map; " + ONE_DEVICE),
    "offload_folder": _Refused(OFFLOAD),
    "offload_buffers": _Refused(OFFLOAD),
    "offload_state_dict": _Refused(OFFLOAD),
    "state_dict": _Refused("to load tensors of your own, build the model under sparsemap.skeleton() and call "
                           "sparsemap.load(model, source)"),
    "variant": _Refused("name the variant's file instead: from_pretrained('folder/model.fp16.safetensors') "
                        "reads config.json from beside it"),
    "output_loading_info": _Refused("sparsemap.loader.plan(model, sparsemap.open(source)) lists what is "
                                    "missing and left over; from_pretrained warns with their counts"),
    "ignore_mismatched_sizes": _Refused("sparsemap never loads a tensor whose shape is not the model's: "
                                        "leave those tensors out with skip= (they stay on the meta device)"),
    "key_mapping": _Refused("pass rename= instead (a mapping of name prefixes, or a function of the "
                            "checkpoint's name)"),
    "adapter_kwargs": _Refused(PEFT),
    "adapter_name": _Refused(PEFT),
    "use_kernels": _KERNELS,
    "kernel_config": _KERNELS,
    "allow_all_kernels": _KERNELS,
    "fusion_config": _Refused("it patches the model class's modules before building it; sparsemap builds the "
                              "class transformers ships as it is"),
    "force_download": _Refused("sparsemap never downloads: it reads the local Hugging Face cache (download "
                               "with `hf download REPO --force-download`)"),
    "weights_only": _Refused("sparsemap never runs pickle code: torch checkpoints are read by an "
                             "allowlisting parser, as weights_only=True does", harmless=(None, True)),
    "disable_mmap": _Refused("mapping the checkpoint is what sparsemap does; device= copies the weights to a "
                             "GPU, dtype= casts them into memory"),
    "from_tf": _Refused("sparsemap reads PyTorch, safetensors and GGUF checkpoints, not TensorFlow ones"),
    "from_flax": _Refused("sparsemap reads PyTorch, safetensors and GGUF checkpoints, not Flax ones"),
}
# Accepted and ignored: they only matter to a request to the Hub, which sparsemap never makes.
NETWORK_ONLY = ("proxies",)


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:300]


def _refuse_unsupported(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Refuse, by name and with the reason, transformers' arguments sparsemap does not honour; return the
    rest (config overrides, checked against the config later)."""
    rest = {}
    for name, value in kwargs.items():
        refused = REFUSED.get(name)
        if refused is not None:
            if not any(value is harmless for harmless in refused.harmless):
                raise UnsupportedArgumentError(f"{name}={value!r} is not supported: {refused.reason}")
        elif name not in NETWORK_ONLY:
            rest[name] = value
    return rest


def dtype_arg(value: object, *, name: str = "dtype") -> torch.dtype | Literal["auto"] | None:
    """``dtype=`` as transformers takes it (a torch dtype, its name, or ``"auto"``), made one thing.

    Args:
        value: ``torch.bfloat16``, ``"bfloat16"`` (or ``"torch.bfloat16"``, ``"half"``...), ``"auto"``,
            or ``None``.
        name: the argument's name, for messages.

    Returns:
        A floating torch dtype, ``"auto"`` (resolved once the config and checkpoint are known), or ``None``.

    Raises:
        BadInputError: not a dtype torch has, or not a floating one (only floating weights are cast).
        UnsupportedArgumentError: a dict of dtypes per sub-config (transformers deprecates it too).

    Example:
        >>> dtype_arg("bfloat16")
        torch.bfloat16
    """
    if value is None or (isinstance(value, torch.dtype) and value.is_floating_point):
        return value
    if isinstance(value, Mapping):
        raise UnsupportedArgumentError(f"{name}= as a dict (a dtype per sub-config) is not supported: pass "
                                       "one dtype for the whole model")
    if isinstance(value, str):
        if value == "auto":
            return "auto"
        found = getattr(torch, value.removeprefix("torch."), None)
        if not isinstance(found, torch.dtype):
            raise BadInputError(f"{name}={value!r} is not a torch dtype; pass one such as 'bfloat16', "
                                "'float16', 'float32', or 'auto' (the config's)")
        value = found
    if not isinstance(value, torch.dtype):
        raise BadInputError(f"{name}= takes a torch dtype, a dtype's name or 'auto', not "
                            f"{type(value).__name__}")
    if not value.is_floating_point:
        raise BadInputError(f"{name}={value} is not a floating dtype: only floating weights are cast "
                            "(integer ones keep theirs)")
    return value


def _auto_dtype(config: Any, catalog: Catalog | None) -> torch.dtype | None:
    """transformers' ``dtype="auto"``: the config's ``dtype`` (``torch_dtype`` in older configs), else the
    dtype of the checkpoint's first floating tensor (fp8 passed over, as transformers does); for a GGUF
    (``catalog`` None) with no dtype in its config, ``None``: its own types, as transformers leaves them."""
    stated = getattr(config, "dtype", None)
    if stated is None:  # transformers 4 keeps a plain attribute; 5's is a property that warns
        stated = getattr(config, "__dict__", {}).get("torch_dtype")
    if stated is not None:
        resolved = dtype_arg(stated, name="the config's dtype")
        return None if resolved == "auto" else resolved
    if catalog is None:
        return None
    for entry in catalog.values():
        if entry.dtype in FLOATING and not entry.dtype.startswith("F8_"):
            return getattr(torch, TORCH_NAMES[entry.dtype])  # type: ignore[no-any-return]
    return None


def _accelerator() -> str | None:
    """The kind of accelerator torch would use here (``"cuda"``, ``"xpu"``, ``"mps"``...), or ``None``."""
    acc = getattr(torch, "accelerator", None)  # torch >= 2.6
    if acc is not None:
        return acc.current_accelerator().type if acc.is_available() else None  # type: ignore[no-any-return]
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else None


def _parsed_device(value: object, name: str) -> torch.device:
    """A device as transformers' ``device_map`` values and sparsemap's ``device=`` spell it; nothing asked yet
    of torch's backends, except which accelerator an integer means."""
    if isinstance(value, torch.device):
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadInputError(f"{name}: expected a device ('cpu', 'cuda:0', 0, a torch.device), not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise BadInputError(f"{name}={value}: a device index is 0 or more; pass 'cpu' for the CPU")
        kind = _accelerator()
        if kind is None:
            raise BadInputError(f"{name}={value} names accelerator {value}, but torch {torch.__version__} "
                                "finds no accelerator here; pass 'cpu'")
        return torch.device(kind, value)
    if value == "disk":
        raise UnsupportedArgumentError(f"{name}='disk' is not supported: {OFFLOAD}")
    try:
        return torch.device(value)
    except (RuntimeError, ValueError):
        raise BadInputError(f"{name}={value!r} is not a device torch knows ('cpu', 'cuda', 'cuda:0', 'mps', "
                            "...)") from None


def _usable(device: torch.device, name: str) -> torch.device:
    """``device``, once torch says it can use it here; a message that names it otherwise (torch's own comes
    later, from deep inside a copy)."""
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "meta":
        raise BadInputError(f"{name}: the meta device holds no data, so nothing would be loaded (to build a "
                            "model without weights, use sparsemap.skeleton())")
    if device.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    else:
        backend = getattr(torch, device.type, None)
        if not callable(getattr(backend, "is_available", None)):
            return device  # a backend torch cannot be asked about: the copy will tell
        available = backend.is_available()  # type: ignore[union-attr]
        count = backend.device_count() if available else 0  # type: ignore[union-attr]
    if not available:
        built_without = device.type == "cuda" and torch.version.cuda is None and torch.version.hip is None
        why = "was built without CUDA" if built_without else f"finds no {device.type} device"
        raise BadInputError(f"{name}: device {str(device)!r} is not available here: torch "
                            f"{torch.__version__} {why}; pass 'cpu'")
    if device.index is not None and device.index >= count:
        raise BadInputError(f"{name}: device {str(device)!r} does not exist: torch finds {count} "
                            f"{device.type} device(s), indices from 0")
    return device


def _device_of_map(device_map: object) -> torch.device | None:
    """The one device a transformers ``device_map`` names; a map onto several is refused."""
    if device_map is None:
        return None
    if isinstance(device_map, str) and device_map in AUTO_DEVICE_MAPS:
        kind = _accelerator()
        if kind is None:
            return torch.device("cpu")
        count = 1 if kind == "mps" else getattr(torch, kind).device_count()
        if count > 1:
            raise UnsupportedArgumentError(
                f"device_map={device_map!r} would spread the model over the {count} {kind} devices here; "
                f"{ONE_DEVICE}. Pass device_map='{kind}:0' to load it all there")
        return _usable(torch.device(kind, 0), "device_map")
    if isinstance(device_map, Mapping):
        if not device_map:
            raise BadInputError("device_map={} places nothing; pass one device ('cpu', 'cuda:0') or "
                                "{'': device}")
        devices = {_parsed_device(v, f"device_map[{k!r}]") for k, v in device_map.items()}
        if len(devices) > 1:
            listed = ", ".join(sorted(map(str, devices)))
            raise UnsupportedArgumentError(f"device_map puts the model on {len(devices)} devices ({listed}): "
                                           f"{ONE_DEVICE}")
        return _usable(devices.pop(), "device_map")
    return _usable(_parsed_device(device_map, "device_map"), "device_map")


def _target_device(device: object, device_map: object) -> torch.device:
    """The one device the weights go to, from sparsemap's ``device=`` and transformers' ``device_map=``."""
    mapped = _device_of_map(device_map)
    if device is None:
        return mapped if mapped is not None else torch.device("cpu")
    chosen = _usable(_parsed_device(device, "device"), "device")
    if mapped is not None and mapped != chosen:
        raise BadInputError(f"device={str(chosen)!r} and device_map={device_map!r} name different devices; "
                            "pass one of them")
    return chosen


def _distributed(distributed_config: Any, tp_plan: object,
                 tp_size: int | None) -> tuple[object, int | None]:
    """``tp_plan`` and ``tp_size`` from transformers' ``DistributedConfig`` (or its dict), which asks for
    tensor parallelism only (the rest is refused), or as given."""
    if distributed_config is None:
        return tp_plan, tp_size
    if tp_plan is not None or tp_size is not None:
        raise BadInputError("distributed_config= and tp_plan=/tp_size= are one request, as in transformers: "
                            "pass one of them")
    fields = (dict(distributed_config) if isinstance(distributed_config, Mapping)
              else getattr(distributed_config, "__dict__", {}))
    others = sorted(name for name in ("fsdp_size", "dp_replicate_size", "pp_size", "ep_size")
                    if (fields.get(name) or 1) > 1)
    others += [name for name in ("enable_expert_parallel", "enable_sequence_parallel") if fields.get(name)]
    if others:
        raise UnsupportedArgumentError(f"distributed_config= asks for {', '.join(others)}: sparsemap runs "
                                       "tensor parallelism only (tp_plan, tp_size); pipeline, data and "
                                       "expert parallelism are not supported")
    size = fields.get("tp_size")
    plan = fields.get("tp_plan")
    return ("auto" if plan is None and (size or 1) > 1 else plan), size


def _tp_mesh(tp_plan: object, tp_size: int | None, device_mesh: Any, *, device: object,
             device_map: object) -> Any:
    """The device mesh transformers' tensor-parallel arguments ask for (torch.distributed set up from
    torchrun's environment when it is not yet), or ``None`` without them."""
    if tp_plan is None:
        if tp_size is not None or device_mesh is not None:
            raise BadInputError("tp_size= and device_mesh= go with tp_plan= ('auto', or a plan): pass it too")
        return None
    if device_map is not None:
        raise BadInputError(f"tp_plan= and device_map={device_map!r} are exclusive, as in transformers: each "
                            "rank's device comes from the device mesh; pass device= to name its kind")
    if tp_plan != "auto" and not isinstance(tp_plan, Mapping):
        raise BadInputError(f"tp_plan={tp_plan!r}: pass 'auto' (the model's own plan) or a mapping of module "
                            "name patterns to 'colwise', 'rowwise' or 'replicate'")
    from ..parallel import mesh_of, world_mesh

    kind = (_parsed_device(device, "device").type if device is not None
            else "cuda" if torch.cuda.is_available() else "cpu")
    mesh = world_mesh(kind) if device_mesh is None else mesh_of(device_mesh, kind)
    if tp_size is not None and tp_size != mesh.size():
        raise UnsupportedArgumentError(f"tp_size={tp_size}, but the device mesh has {mesh.size()} ranks: "
                                       "sparsemap splits the model over the whole mesh; pass device_mesh= of "
                                       f"{tp_size} ranks")
    return mesh


def _source(source: str | os.PathLike[str] | ModelSource, *, revision: str | None,
            cache_dir: str | os.PathLike[str] | None, subfolder: str | os.PathLike[str],
            gguf_file: str | os.PathLike[str] | None) -> ModelSource:
    """The source as transformers names it: a folder or repo id, then ``subfolder``, then ``gguf_file``."""
    if isinstance(source, ModelSource):
        if subfolder or gguf_file:
            raise BadInputError("subfolder= and gguf_file= name a place inside a folder or repo: pass the "
                                "folder or repo id, not a ModelSource")
        return source
    path = locate(source, revision=revision, cache_dir=cache_dir)
    src = resolve_source(os.path.join(path, *(os.fspath(p) for p in (subfolder, gguf_file) if p)))
    if gguf_file and not src.is_gguf:
        raise BadInputError(f"gguf_file={os.fspath(gguf_file)!r} is not a GGUF file (its content is "
                            f"{src.format})", path=src.weights)
    return src


def _configured(config: Any, *, given: bool, overrides: dict[str, Any], implementations: dict[str, str],
                dtype: torch.dtype | None) -> Any:
    """The config the model is built from, as transformers makes it: a copy of one given, with the attention
    (experts) implementation, the dtype loaded into, and the keyword arguments that name its attributes."""
    if given and (overrides or implementations or dtype is not None):
        config = copy.deepcopy(config)  # transformers never changes a config it is given
    for name, value in implementations.items():
        if "/" in value:  # "org/repo[:kernel]": transformers fetches it from the Hub
            raise UnsupportedArgumentError(f"{name}={value!r} is a Hugging Face Hub kernel, which "
                                           f"transformers downloads and runs; {NO_REMOTE_CODE}")
        setattr(config, f"_{name}", value)
    if dtype is not None:
        config.dtype = dtype
    for name, value in overrides.items():
        if name.startswith("_") or not hasattr(config, name) or callable(getattr(config, name)):
            raise UnsupportedArgumentError(
                f"{name}= is neither an argument of sparsemap.from_pretrained nor an attribute of "
                f"{type(config).__name__} (transformers gives unknown keyword arguments to the config)")
        try:
            setattr(config, name, value)
        except (ValueError, TypeError, AttributeError) as e:
            raise BadInputError(f"{name}={value!r}: {type(config).__name__} refuses it: "
                                f"{_first_line(e)}") from None
    return config


# ---------------------------------------------------------------- from_pretrained

def from_pretrained(source: str | os.PathLike[str] | ModelSource, *, config: Any = None,
                    dtype: torch.dtype | str | None = None, device: str | torch.device | int | None = None,
                    model_class: type[nn.Module] | None = None, skip: Skip = None,
                    strict: bool = False, rename: Rename = None, prefix: str | None = None,
                    keep_quantized: bool = False, torch_dtype: torch.dtype | str | None = None,
                    device_map: DeviceMap = None, low_cpu_mem_usage: bool = True,
                    revision: str | None = None, local_files_only: bool = False,
                    cache_dir: str | os.PathLike[str] | None = None, subfolder: str | os.PathLike[str] = "",
                    token: str | bool | None = None, trust_remote_code: bool | None = False,
                    attn_implementation: str | None = None, experts_implementation: str | None = None,
                    use_safetensors: bool | None = None, gguf_file: str | os.PathLike[str] | None = None,
                    generation_config: Any = None, tp_plan: str | Mapping[str, str] | None = None,
                    tp_size: int | None = None, device_mesh: Any = None, distributed_config: Any = None,
                    **kwargs: Any) -> nn.Module:
    """A transformers model with weights mapped from ``source``, in eval mode.

    Takes transformers' ``from_pretrained`` arguments with transformers' meaning where sparsemap can honour
    it. The others are refused by name with the reason (:class:`~sparsemap.errors.UnsupportedArgumentError`,
    a ``TypeError``): quantizing while loading (``quantization_config``, ``load_in_8bit``/``4bit``: see
    ``keep_quantized`` and ``sparsemap convert --quantize``), several devices by a map (``max_memory``, a
    multi-device ``device_map``: see :class:`sparsemap.Budget`; ``distributed_config`` beyond tensor
    parallelism),
    offloading, remote code and Hub kernels,
    PEFT adapters, ``state_dict``, ``variant``, ``output_loading_info``, ``ignore_mismatched_sizes``,
    ``key_mapping`` (see ``rename``). Given with its transformers default (``None``, ``False``), such an
    argument asks for nothing and is accepted.

    Args:
        source: a Hugging Face folder, a checkpoint file (with ``config=``; ``config.json`` beside it is read
            otherwise), a GGUF file or folder holding one, or a Hugging Face repo id
            (``"HuggingFaceTB/SmolLM2-135M"``) found in the local cache: nothing is ever downloaded, and a
            path that exists wins over a repo id.
        config: a transformers config; read from the source when omitted. It is copied, not changed, when
            other arguments change it.
        dtype: cast floating weights (one tensor at a time; no longer zero-copy): a torch dtype or its name
            (``"bfloat16"``), or ``"auto"``: the config's ``dtype`` (``torch_dtype``), else the checkpoint's
            first floating tensor's, as transformers reads it. ``None`` (the default; transformers 5's is
            ``"auto"``) keeps each tensor's stored dtype (GGUF quantized tensors come as float32). When a
            dtype is applied, ``model.config.dtype`` says it.
        device: where the weights go; ``"cpu"`` (the default) keeps them as views of the file. As
            ``device_map`` takes it; give one or the other, or both naming the same device.
        model_class: the transformers class to build; from the config's
            ``architectures`` (or the causal-LM auto class) when omitted.
        skip, strict, rename, prefix: as for :func:`sparsemap.load`. As transformers does, a base
            model's weights load into a model with a head (its ``base_model_prefix`` added; the head
            initialised, with a warning) and the reverse (the head's weights left out); pass
            ``strict=True`` to refuse anything missing or left over instead.
        keep_quantized: for a GGUF loaded on the CPU, keep its quantized blocks (repacked once into the
            cache for the int4/int8 kernels, :func:`~sparsemap.models.gguf_hf.repacked`) instead of
            dequantizing every weight into memory; weights in a block type with no kernel layout (IQ)
            are stored dequantized, with a note.
        torch_dtype: the old name of ``dtype``; give one or the other.
        device_map: transformers' placement, onto one device: ``"cpu"``, ``"cuda:1"``, an accelerator index
            (``0``), a ``torch.device``, ``{"": device}`` (a map whose modules all go to one device), or
            ``"auto"`` (also ``"balanced"``, ``"sequential"``): the one accelerator here, else the CPU; it
            never offloads to the CPU a model that does not fit. A map onto several devices, or ``"auto"``
            on a machine with several accelerators, is refused: see :class:`sparsemap.Budget` for models
            larger than memory. A device torch cannot use here is refused by name.
        low_cpu_mem_usage: accepted for transformers' sake: sparsemap always builds on the meta device and
            maps the weights (what ``True`` asks for); ``False`` changes nothing.
        revision: the branch, tag or commit of a repo id (``"main"`` when omitted); unused for a path.
        local_files_only: accepted; sparsemap only ever reads local files (as if always ``True``).
        cache_dir: the Hugging Face cache to find a repo id in (``HF_HUB_CACHE`` when omitted).
        subfolder: the folder inside ``source`` (a folder or repo) that holds the model, as transformers
            joins it.
        token: accepted and ignored: nothing is downloaded.
        trust_remote_code: ``True`` is refused: sparsemap never runs code from a checkpoint folder; the config
            must name a class transformers ships (or pass ``model_class=``).
        attn_implementation: ``"eager"``, ``"sdpa"``, ``"flash_attention_2"``...: set on the config
            (``config._attn_implementation``) before the model is built, as transformers does; one the model
            or this machine cannot use is refused with transformers' reason. Hub kernels (``"org/repo"``)
            are refused: they are downloaded code.
        experts_implementation: the same, for mixture-of-experts layers (``config._experts_implementation``).
        use_safetensors: ``True`` refuses a source whose weights are not safetensors (a ``.bin``-only folder,
            a GGUF); ``False`` or ``None`` load what the folder holds (safetensors first; sparsemap reads
            ``.bin`` files without running their pickle code either way).
        gguf_file: the GGUF file's name inside ``source`` (a folder or repo), as transformers takes it.
        generation_config: a ``GenerationConfig`` for ``model.generation_config``; by default the source's
            ``generation_config.json``, if any.
        tp_plan: tensor parallelism, as transformers takes it: ``"auto"`` (the model's own plan,
            ``model.tp_plan``) or a mapping of module name patterns to ``"colwise"``, ``"rowwise"``,
            ``"replicate"`` (or transformers' other styles) that overrides rules of the model's own plan
            (``{"model.layers.*.self_attn.q_proj": "replicate", ...}``). Run on every rank (``torchrun
            --nproc-per-node N``; torch.distributed is set up from its environment when it is not yet: gloo on
            the CPU, NCCL on GPUs): each rank maps only its slice of each split tensor
            (:mod:`sparsemap.parallel`); Meta's release in ``N`` files loads on ``N`` ranks, rank ``i``
            mapping file ``i``. A world size that does not divide a split dimension or the attention heads (or
            is not a Meta release's number of files) is refused on every rank before anything is mapped.
        tp_size: the number of ranks to split over: the mesh's (transformers' meaning); another is refused.
        device_mesh: the 1-D ``DeviceMesh`` (or one with a ``"tp"`` dimension) to split over; by default one
            over every rank.
        distributed_config: transformers' ``DistributedConfig`` (or its dict) asking for tensor parallelism
            (``tp_size``, ``tp_plan``), the same as those two arguments; pipeline, data (FSDP) and expert
            parallelism are refused.
        **kwargs: as in transformers, attributes of the config to set (``output_hidden_states=True``); a name
            the config does not have is refused.

    Returns:
        The model, in eval mode, every parameter a view of the checkpoint (or, cast or on a GPU, a copy).

    Raises:
        UnsupportedArgumentError: an argument sparsemap does not honour (named, with the reason).
        SourceNotFoundError: nothing at ``source``, and no such repo in the local Hugging Face cache.
        BadInputError: a dtype or device that cannot be used here; others for a checkpoint that does not fit.

    Example:
        >>> model = sparsemap.from_pretrained("HuggingFaceTB/SmolLM2-135M", dtype="auto",   # doctest: +SKIP
        ...                                   device_map="auto", attn_implementation="sdpa")
        >>> model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=8)
    """
    del low_cpu_mem_usage, local_files_only, token  # accepted for transformers' sake; nothing to do (Args)
    overrides = _refuse_unsupported(kwargs)
    if trust_remote_code:
        raise UnsupportedArgumentError(f"trust_remote_code=True is not supported: {NO_REMOTE_CODE}; the "
                                       "config must name a class transformers ships (or pass model_class=)")
    if dtype is not None and torch_dtype is not None:
        raise BadInputError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} are one argument (torch_dtype "
                            "is its old name); pass dtype= only")
    wanted = dtype_arg(dtype) if torch_dtype is None else dtype_arg(torch_dtype, name="torch_dtype")
    tp_plan, tp_size = _distributed(distributed_config, tp_plan, tp_size)
    mesh = _tp_mesh(tp_plan, tp_size, device_mesh, device=device, device_map=device_map)
    target = _target_device(device, device_map)
    if mesh is not None and device is None and mesh.device_type == "cuda":
        target = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU (LOCAL_RANK)
    src = _source(source, revision=revision, cache_dir=cache_dir, subfolder=subfolder, gguf_file=gguf_file)
    safetensors = src.format == "safetensors" or src.weights.endswith(".safetensors.index.json")
    if use_safetensors and not safetensors:
        raise SourceNotFoundError(
            f"use_safetensors=True, but the weights there are {os.path.basename(src.weights)} "
            f"({src.format}), not safetensors: pass use_safetensors=None to load them, or convert them once "
            f"with `sparsemap convert {src.weights} model.safetensors`", path=src.folder)
    given = config is not None
    config = resolve_config(src, config)
    # A Meta release under tensor parallelism is opened per rank by load (rank i maps file i).
    per_rank = mesh is not None and src.format == "meta-llama"
    catalog = None if src.is_gguf or per_rank else open_catalog(src)  # a GGUF's is made for the model (below)
    cast = _auto_dtype(config, catalog) if wanted == "auto" else wanted
    implementations = {name: value for name, value in (("attn_implementation", attn_implementation),
                                                       ("experts_implementation", experts_implementation))
                       if value is not None}
    config = _configured(config, given=given, overrides=overrides, implementations=implementations,
                         dtype=cast)
    cls = model_class or class_for(config)
    try:
        with skeleton():
            model = cls(config)
    except (ImportError, ValueError) as e:
        if not implementations:
            raise
        chosen = ", ".join(f"{name}={value!r}" for name, value in implementations.items())
        raise BadInputError(f"{chosen}: transformers cannot build {cls.__name__} with it: {_first_line(e)}") \
            from None
    if catalog is None and not per_rank:
        # GGUF weights carry llama.cpp's names and values: seen as this model's (gguf_hf).
        catalog = _gguf_catalog(src, model, keep_quantized and target.type == "cpu")
    # As in transformers, a plan given overrides rules of the model's own.
    plan = (None if mesh is None or tp_plan == "auto"
            else {**(getattr(model, "tp_plan", None) or {}), **tp_plan})  # type: ignore[dict-item]
    load(model, src if catalog is None else catalog, device=target, dtype=cast, skip=skip, strict=strict,
         rename=rename, prefix=prefix, tp=mesh, tp_plan=plan)
    model.eval()
    if generation_config is not None:
        model.generation_config = generation_config
    elif hasattr(model, "generation_config") and src.generation_config is not None:
        from transformers import GenerationConfig

        folder, name = os.path.split(src.generation_config)  # beside the weights, or in the cache
        model.generation_config = GenerationConfig.from_pretrained(folder, config_file_name=name)
    return model
