"""The import boundary: parsing and validation never import torch.

Catalogs are built on machines that may not be able to afford torch (or the
model); only :mod:`sparsemap.mapped` and what uses it may import it.
"""

from __future__ import annotations

import ast
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import sparsemap

SRC = Path(sparsemap.__file__).resolve().parent
TORCH_FREE = sorted(SRC.glob("formats/*.py")) + [SRC / p for p in (
    "errors.py", "__init__.py", "pages.py", "memory.py", "cgroup.py", "cli.py", "models/assets.py",
    "models/gguf_llama.py", "models/smollm2.py", "models/generate.py", "models/minilm.py", "bench/measure.py")]


def _top_level_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """``(line, module)`` of every import that runs when the module is imported.

    Walks module-level statements and the blocks they open (if/try/with), but
    not function or class bodies (lazy imports are the point) nor
    ``if TYPE_CHECKING:`` blocks.
    """
    found: list[tuple[int, str]] = []

    def visit(stmts: list[ast.stmt]) -> None:
        for node in stmts:
            if isinstance(node, ast.Import):
                found.extend((node.lineno, a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0 and node.module:
                    found.append((node.lineno, node.module))
            elif isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if test not in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, ast.With | ast.For | ast.While):
                visit(node.body)

    visit(tree.body)
    return found


def test_the_walker_sees_top_level_torch_imports() -> None:
    source = ("import os\nimport torch.nn as nn\nfrom torch import Tensor\n"
              "if TYPE_CHECKING:\n    import torch\n"
              "def f():\n    import torch\n"
              "try:\n    import torch\nexcept ImportError:\n    pass\n")
    modules = [m for _, m in _top_level_imports(ast.parse(source))]
    assert modules == ["os", "torch.nn", "torch", "torch"]


@pytest.mark.parametrize("path", TORCH_FREE, ids=[str(p.relative_to(SRC)) for p in TORCH_FREE])
def test_no_top_level_torch_import(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = [(line, m) for line, m in _top_level_imports(tree) if m == "torch" or m.startswith("torch.")]
    assert not bad, f"{path.relative_to(SRC)} imports torch at module level: {bad}"


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
    code = (
        "import sys\n"
        "import sparsemap, sparsemap.errors, sparsemap.formats.safetensors, sparsemap.formats.catalog, "
        "sparsemap.formats.torchzip, sparsemap.formats.sharded, sparsemap.formats.resolve, "
        "sparsemap.formats.gguf, sparsemap.formats.dtypes\n"
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



def test_public_functions_are_not_shadowed_by_submodules():
    """Importing a submodule binds its name in the package: no public function may share one."""
    code = ("import importlib, pkgutil, sparsemap\n"
            "for m in pkgutil.walk_packages(sparsemap.__path__, 'sparsemap.'):\n"
            "    importlib.import_module(m.name)\n"
            "for name in ('load', 'rows', 'convert', 'save', 'drop', 'to_mapped', 'from_pretrained', 'open', "
            "'skeleton', 'load_state_dict'):\n"
            "    assert callable(getattr(sparsemap, name)) and not isinstance(getattr(sparsemap, name), "
            "type(sparsemap)), name\n")
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
