"""The import boundary and the pipeline's direction.

Catalogs are built on machines that may not be able to afford torch (or the
model): parsing and validation never import torch, and neither do the CLI's
entry, the measurement helpers or the model plumbing that runs before torch
is needed. Inside the package, imports point down the pipeline only (format
description, then mapping, then loading / writing / rows / streaming, then
models, then bench and CLI), lazy imports in functions included, so no cycle
can come back (the catalog once imported the mapper lazily, and the mapper
the catalog).

Every ``import`` and ``from ... import`` is read from the source with
:mod:`ast`; relative imports (``from ..mapped import Mapper``) are resolved
to the module they name.
"""

from __future__ import annotations

import ast
import json
import struct
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

import sparsemap

SRC = Path(sparsemap.__file__).resolve().parent
PACKAGE = "sparsemap"

# Modules whose import must not import torch, directly or through the package.
TORCH_FREE = (
    "sparsemap", "sparsemap.errors", "sparsemap.extras", "sparsemap.units", "sparsemap.pages",
    "sparsemap.memory",
    "sparsemap.names", "sparsemap.durable", "sparsemap.cli", "sparsemap.formats.*", "sparsemap.models",
    "sparsemap.models.assets", "sparsemap.models.smollm2", "sparsemap.models.gguf_hf",
    "sparsemap.models.gguf_convert", "sparsemap.models.hf_folder",
    "sparsemap.models.generate", "sparsemap.models.chat", "sparsemap.models.minilm", "sparsemap.models.demo",
    "sparsemap.bench",
    "sparsemap.models.rwkv_config", "sparsemap.models.rwkv_tokenizer",
    "sparsemap.models.llama2c", "sparsemap.models.llama2c_tokenizer", "sparsemap.models.meta_llama",
    "sparsemap.bench.measure", "sparsemap.bench.cgroup", "sparsemap.bench.disk", "sparsemap.bench.report",
    "sparsemap.bench.runner", "sparsemap.serve", "sparsemap.bench.demo", "sparsemap.bench.plot",
    "sparsemap.bench.rwkv_synthetic", "sparsemap.bench.k_quants", "sparsemap.bench.gguf_writer",
)

# Libraries that import torch themselves: importing any of them is importing torch.
IMPORT_TORCH = ("torch", "transformers", "safetensors.torch", "accelerate", "sentence_transformers",
                "tensorizer", "fastsafetensors", "runai_model_streamer")

# The pipeline, bottom up. A module may import from its own layer or a lower one, never a higher one.
LAYERS = (
    ("sparsemap.errors", "sparsemap.extras", "sparsemap.units", "sparsemap.memory", "sparsemap.names"),
    ("sparsemap.formats.*", "sparsemap.formats"),
    ("sparsemap.pages", "sparsemap.durable"),
    ("sparsemap.mapped",),
    ("sparsemap.quantize",),
    ("sparsemap.qtensor",),
    ("sparsemap.checkpoint",),
    ("sparsemap.loader", "sparsemap.writer", "sparsemap.converter", "sparsemap.sparse_rows",
     "sparsemap.stream", "sparsemap.lifecycle", "sparsemap.budget", "sparsemap.row_pieces",
     "sparsemap.rank_sources", "sparsemap.safetensors_api", "sparsemap.parallel"),
    ("sparsemap.models.*", "sparsemap.models"),
    ("sparsemap.bench.*", "sparsemap.bench"),
    ("sparsemap.serve",),
    ("sparsemap.cli", "sparsemap"),
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def matches(name: str, pattern: str) -> bool:
    return name.startswith(pattern[:-1]) if pattern.endswith("*") else name == pattern


def layer_of(name: str) -> int:
    for rank, patterns in enumerate(LAYERS):
        if any(matches(name, p) for p in patterns):
            return rank
    raise AssertionError(f"{name} is in no layer of LAYERS: add it where it belongs in the pipeline")


def _is_type_checking(test: ast.expr) -> bool:
    return ast.unparse(test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def imports(tree: ast.Module, module: str, *, lazy: bool) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of the imports in ``tree``, relative ones resolved.

    ``lazy=False``: only those that run when the module is imported: every
    statement and block at module level and in class bodies (if, try, with,
    for, while, match, their ``else`` parts), but no function body.
    ``lazy=True``: function bodies too. ``if TYPE_CHECKING:`` blocks never
    count. ``importlib.import_module("name")`` and ``__import__("name")`` with
    a literal name count as imports. ``from pkg import name`` counts as
    ``pkg.name`` when that is a module.
    """
    is_package = MODULES.get(module, Path()).name == "__init__.py"
    base = module.split(".") if is_package else module.split(".")[:-1]
    found: list[tuple[int, str]] = []

    def resolve(node: ast.ImportFrom) -> str:
        if node.level == 0:
            return node.module or ""
        anchor = base[: len(base) - (node.level - 1)]
        return ".".join(anchor + ([node.module] if node.module else []))

    def import_call(node: ast.Call) -> str | None:
        name = ast.unparse(node.func)
        if name in ("importlib.import_module", "import_module", "__import__") and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                return first.value
        return None

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((child.lineno, a.name) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = resolve(child)
                for alias in child.names:
                    sub = f"{target}.{alias.name}"
                    found.append((child.lineno, sub if sub in MODULES else target))
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]))
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) and not lazy:
                # The body runs when called; decorators and defaults run now.
                for part in (*getattr(child, "decorator_list", ()), *child.args.defaults,
                             *(d for d in child.args.kw_defaults if d is not None)):
                    visit(ast.Expression(body=part))
            else:
                if isinstance(child, ast.Call) and (name := import_call(child)) is not None:
                    found.append((child.lineno, name))
                visit(child)

    visit(tree)
    return found


@cache
def parsed(module: str) -> ast.Module:
    return ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))


def package_parents(name: str) -> list[str]:
    """Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in MODULES]


def eager_closure(module: str) -> dict[str, list[str]]:
    """Every module importing ``module`` runs, with the chain of imports that reaches it."""
    chains = {module: [module]}
    todo = [module]
    while todo:
        current = todo.pop()
        targets = [t for _, t in imports(parsed(current), current, lazy=False)] if current in MODULES else []
        for target in targets:
            for step in (*package_parents(target), target):
                if step not in chains:
                    chains[step] = [*chains[current], step]
                    if step in MODULES:
                        todo.append(step)
    return chains


# ---------------------------------------------------------------- the walker itself

def test_the_walker_resolves_relative_and_lazy_imports() -> None:
    source = ("import os\nimport torch.nn as nn\nfrom torch import Tensor\nfrom .. import errors\n"
              "from .dtypes import ITEMSIZE\nfrom ..mapped import map_file\n"
              "if TYPE_CHECKING:\n    import torch\n"
              "def f():\n    import torch\n    from ..checkpoint import Checkpoint\n"
              "try:\n    import torch\nexcept ImportError:\n    pass\n")
    tree = ast.parse(source)
    eager = [m for _, m in imports(tree, "sparsemap.formats.catalog", lazy=False)]
    assert eager == ["os", "torch.nn", "torch", "sparsemap.errors", "sparsemap.formats.dtypes",
                     "sparsemap.mapped", "torch"]
    every = [m for _, m in imports(tree, "sparsemap.formats.catalog", lazy=True)]
    assert "sparsemap.checkpoint" in every and "sparsemap.checkpoint" not in eager
    # In a package's __init__, "." is the package itself.
    assert [m for _, m in imports(ast.parse("from .catalog import Catalog\n"), "sparsemap.formats",
                                  lazy=False)] == ["sparsemap.formats.catalog"]


def test_the_walker_sees_every_block_that_runs_at_import() -> None:
    source = ("match x:\n    case 1:\n        import a_match\n"
              "for i in x:\n    pass\nelse:\n    import a_for_else\n"
              "try:\n    pass\nexcept* ValueError:\n    import a_except_star\n"
              "class C:\n    import a_class_body\n    def m(self):\n        import a_method\n"
              "async def f():\n    async with x:\n        import a_async_with\n"
              "mod = importlib.import_module('a_import_module')\n"
              "def g(default=__import__('a_default')):\n"
              "    return importlib.import_module('a_call_in_body')\n")
    eager = {m for _, m in imports(ast.parse(source), "sparsemap.x", lazy=False)}
    every = {m for _, m in imports(ast.parse(source), "sparsemap.x", lazy=True)}
    assert eager == {"a_match", "a_for_else", "a_except_star", "a_class_body", "a_import_module", "a_default"}
    assert every == eager | {"a_method", "a_async_with", "a_call_in_body"}


# ---------------------------------------------------------------- torch stays out

def torch_free_modules() -> list[str]:
    return [m for m in MODULES if any(matches(m, p) for p in TORCH_FREE)]


@pytest.mark.parametrize("module", torch_free_modules())
def test_importing_does_not_reach_torch(module: str) -> None:
    chains = eager_closure(module)
    leaks = [" -> ".join(chain) for name, chain in chains.items()
             if name == "torch" or name.startswith("torch.")]
    assert not leaks, f"importing {module} imports torch: {leaks[0]}"


def test_opening_checkpoints_does_not_import_torch(tmp_path: Path) -> None:
    # Written by hand: the test process may have torch loaded, the child must not.
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<4f", 1, 2, 3, 4))
    torch = pytest.importorskip("torch")
    pt = tmp_path / "m.pt"
    torch.save({"model": {"w": torch.ones(3, 2).t()}, "epoch": 1}, pt)
    modules = ", ".join(sorted(m for m in MODULES if matches(m, "sparsemap.formats.*")))
    code = (
        "import sys\n"
        f"import sparsemap, sparsemap.errors, {modules}\n"
        f"cat = sparsemap.open({str(path)!r})\n"
        "assert cat['w'].shape == (2, 2) and cat.metadata == {'format': 'pt'}, cat\n"
        "cat.summary()\n"
        f"zcat = sparsemap.open({str(pt)!r})\n"
        "assert zcat['model.w'].shape == (2, 3) and zcat['model.w'].strides == (1, 2), zcat['model.w']\n"
        "leaked = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not leaked, leaked[:5]\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_import_sparsemap_loads_no_parser_it_may_not_need() -> None:
    """``import sparsemap`` stays cheap: the format readers load on first use."""
    code = ("import sys, sparsemap\n"
            "print(sorted(m for m in sys.modules if m.startswith(('sparsemap', 'gguf', 'zipfile', 'pickle', "
            "'numpy'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    loaded = set(eval(out.stdout))  # a list literal printed by the child
    assert not loaded & {"sparsemap.formats.torchzip", "sparsemap.formats.gguf",
                         "sparsemap.formats.safetensors", "gguf", "zipfile", "numpy"}, sorted(loaded)


# ---------------------------------------------------------------- the pipeline's direction

def package_edges(*, lazy: bool) -> list[tuple[str, int, str]]:
    """``(importer, line, imported)`` for every import of one package module by another."""
    edges = []
    for module in MODULES:
        for line, target in imports(parsed(module), module, lazy=lazy):
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                while target not in MODULES:  # from pkg.mod import name: the module is pkg.mod
                    target = target.rpartition(".")[0]
                if target != module:
                    edges.append((module, line, target))
    return edges


def test_imports_point_down_the_pipeline_lazy_ones_included() -> None:
    upward = [f"{src}:{line} imports {dst} (layer {layer_of(src)} -> {layer_of(dst)})"
              for src, line, dst in package_edges(lazy=True)
              if layer_of(dst) > layer_of(src) and src != PACKAGE]  # the root re-exports, lazily
    assert not upward, "\n".join(upward)


def test_the_format_layer_imports_nothing_above_it() -> None:
    outside = [f"{src}:{line} imports {dst}" for src, line, dst in package_edges(lazy=True)
               if matches(src, "sparsemap.formats.*") and layer_of(dst) > layer_of(src)]
    assert not outside, "\n".join(outside)


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for src, _, dst in package_edges(lazy=True):
        if src != PACKAGE:  # the package root re-exports; its lazy names are strings, not imports
            graph[src].add(dst)
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt):], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_public_functions_are_not_shadowed_by_submodules():
    """Importing a submodule binds its name in the package: no public function may share one."""
    code = ("import importlib, pkgutil, sparsemap\n"
            "for m in pkgutil.walk_packages(sparsemap.__path__, 'sparsemap.'):\n"
            "    importlib.import_module(m.name)\n"
            "for name in ('load', 'rows', 'convert', 'save', 'drop', 'to_mapped', 'from_pretrained', 'open', "
            "'skeleton', 'load_state_dict', 'safe_open'):\n"
            "    assert callable(getattr(sparsemap, name)) and not isinstance(getattr(sparsemap, name), "
            "type(sparsemap)), name\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
