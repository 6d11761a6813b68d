"""Tensor names must be valid UTF-8, and ``inspect`` must not let a name drive the terminal (issue 14,
item 7). JSON can spell a lone surrogate (``"\\ud800"``), which Python decodes into a str that no file
can hold; the safetensors library refuses such a header, and so does sparsemap, by name.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sparsemap
from sparsemap import errors
from sparsemap.formats.layout import LAYOUT_KEY

LONE = "\\ud800"  # as JSON spells it: a lone high surrogate


def header_file(tmp_path: Path, header_text: str, data: bytes) -> Path:
    raw = header_text.encode()
    path = tmp_path / "names.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_a_tensor_name_with_a_lone_surrogate_is_refused_like_safetensors_does(tmp_path: Path) -> None:
    path = header_file(tmp_path, '{"a' + LONE + '": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
                       bytes(4))
    with pytest.raises(Exception):  # noqa: B017 - the reference refuses it; its error type is its own
        safe_open(str(path), framework="pt")
    with pytest.raises(errors.InvalidNameError, match=r"tensor name 'a\\ud800' is not valid UTF-8") as info:
        sparsemap.open(path)
    assert info.value.path == str(path)


def test_metadata_with_a_lone_surrogate_is_refused(tmp_path: Path) -> None:
    path = header_file(tmp_path, '{"__metadata__": {"note": "x' + LONE + '"}, "a": {"dtype": "F32", '
                                 '"shape": [1], "data_offsets": [0, 4]}}', bytes(4))
    with pytest.raises(errors.InvalidNameError, match="__metadata__ value of 'note'"):
        sparsemap.open(path)


def test_a_layout_view_name_with_a_lone_surrogate_is_refused(tmp_path: Path) -> None:
    doc = '{"version": 1, "views": {"w' + LONE + '": {"stored": "w@rows", "kind": "rows", "offset": 0, ' \
          '"shape": [2, 2], "strides": [2, 1]}}}'
    path = tmp_path / "laid.safetensors"
    save_file({"w@rows": torch.ones(2, 2)}, str(path), metadata={LAYOUT_KEY: doc})
    with pytest.raises(errors.InvalidNameError, match="view name"):
        sparsemap.open(path)


def test_a_shard_index_naming_a_lone_surrogate_is_refused(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "one.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "one.safetensors", "b": "two' + LONE + '.safetensors"}}')
    with pytest.raises(errors.InvalidNameError, match="shard file name of 'b'"):
        sparsemap.open(tmp_path)


def test_inspect_escapes_names_that_would_drive_the_terminal(tmp_path: Path) -> None:
    names = {"clear\x1b[2J\x1b[Hscreen": torch.ones(1), "bell\x07\u202eevil": torch.ones(1),
             "[bold red]markup[/]": torch.ones(1)}
    path = tmp_path / "names.safetensors"
    save_file(names, str(path))
    proc = subprocess.run([sys.executable, "-m", "sparsemap.cli", "inspect", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "clear\\x1b[2J\\x1b[Hscreen" in out and "bell\\x07\\u202eevil" in out
    assert "[bold red]markup[/]" in out  # shown as written, not read as rich markup
    cmd = [sys.executable, "-m", "sparsemap.cli", "inspect", str(path), "--json"]
    listed = json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout)
    assert {t["name"] for t in listed["tensors"]} == set(names)  # JSON escapes by itself, names exact
