"""Optional dependencies: import one, or say which ``pip install`` adds it.

sparsemap's core (open, map, load, convert, the lean engine) needs torch, numpy,
gguf, rich, click, tokenizers and jinja2. Everything else is an extra
(``pyproject.toml``): transformers for ``from_pretrained`` and the transformers
engine, the bench's peers and its plot, sentence-transformers for the MiniLM
demo's reference. Each place that reaches for one goes through :func:`require`
(or :func:`check`, to refuse before long work starts), so a missing one is a
:class:`~sparsemap.errors.MissingExtraError` naming the command that adds it,
not a bare ``ModuleNotFoundError`` from deep inside. No torch here.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import NamedTuple

from .errors import MissingExtraError


class Extra(NamedTuple):
    """Where an importable module comes from: its PyPI distribution and the sparsemap extra holding it."""

    distribution: str
    extra: str | None  # None: a core dependency (a broken install, not a missing extra)


# Top-level module name -> where it comes from (pyproject.toml's [project.optional-dependencies]).
KNOWN: dict[str, Extra] = {
    "transformers": Extra("transformers", "transformers"),
    "safetensors": Extra("safetensors", "bench"),
    "accelerate": Extra("accelerate", "bench"),
    "fastsafetensors": Extra("fastsafetensors", "bench"),
    "runai_model_streamer": Extra("runai-model-streamer", "bench"),
    "tensorizer": Extra("tensorizer", "bench"),
    "matplotlib": Extra("matplotlib", "bench"),
    "sentence_transformers": Extra("sentence-transformers", "test"),
    "llama_cpp": Extra("llama-cpp-python", "llama"),
    "tokenizers": Extra("tokenizers", None),
    "jinja2": Extra("jinja2", None),
}


def install_hint(module: str, extra: str | None = None) -> str:
    """The command that installs ``module``.

    Example:
        >>> install_hint("matplotlib")
        "pip install 'sparsemap[bench]'"
    """
    top = module.split(".")[0]
    known = KNOWN.get(top, Extra(top, None))
    extra = extra if extra is not None else known.extra
    if extra is None:
        return f"pip install {known.distribution}"
    return f"pip install 'sparsemap[{extra}]'"


def _missing_error(module: str, extra: str | None, needed_for: str | None) -> MissingExtraError:
    top = module.split(".")[0]
    dist = KNOWN.get(top, Extra(top, None)).distribution
    why = f", and {needed_for} needs it" if needed_for else ""
    return MissingExtraError(f"{dist} is not installed{why}: {install_hint(top, extra)}")


def require(module: str, *, extra: str | None = None, needed_for: str | None = None) -> ModuleType:
    """Import ``module``; if it (or its package) is not installed, raise ``MissingExtraError``.

    A module that is installed but fails on import for another reason (one of *its* dependencies
    missing, a bug) raises as it did: that is not fixed by installing the extra again.

    Args:
        module: the dotted module name (``"transformers"``, ``"matplotlib.pyplot"``).
        extra: the sparsemap extra to name; default: the one :data:`KNOWN` lists.
        needed_for: what needs it, for the message (``"sparsemap embed"``).

    Raises:
        MissingExtraError: naming the ``pip install`` that adds it.

    Example:
        >>> require("transformers", extra="transformers", needed_for="from_pretrained")  # doctest: +SKIP
        <module 'transformers' ...>
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        # e.name is the module that could not be found: ours (or a parent package), or else something
        # deeper that a working install of ours would have brought.
        if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
            raise _missing_error(module, extra, needed_for) from e
        raise


def check(*modules: str, extra: str | None = None, needed_for: str | None = None) -> None:
    """Refuse now, without importing anything, if one of ``modules`` is not installed.

    For work that would only reach the import at its end (a plot after an hour of benchmarks).

    Raises:
        MissingExtraError: naming the first missing module's ``pip install``.
    """
    for module in modules:
        try:
            found = importlib.util.find_spec(module.split(".")[0]) is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules, a broken parent
            found = False
        if not found:
            raise _missing_error(module, extra, needed_for)
