"""The sparsemap command: output, JSON and exit codes (0 ok, 2 bad input)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from sparsemap.cli import main


def _file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"embed.weight": torch.randn(64, 32), "norm": torch.ones(32, dtype=torch.bfloat16)}, path)
    return path


def test_inspect_table_and_totals(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(_file(tmp_path))])
    assert result.exit_code == 0, result.output
    assert "embed.weight" in result.output and "2 tensors" in result.output


def test_inspect_json_lists_offsets_and_alignment(tmp_path):
    path = _file(tmp_path)
    result = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    doc = json.loads(result.output)
    by_name = {t["name"]: t for t in doc["tensors"]}
    assert by_name["embed.weight"]["shape"] == [64, 32]
    assert by_name["embed.weight"]["nbytes"] == 64 * 32 * 4
    offset = by_name["embed.weight"]["offset"]
    assert offset % by_name["embed.weight"]["alignment"] == 0
    assert doc["summary"]["tensors"] == 2


def test_load_prints_the_memory_report(tmp_path):
    result = CliRunner().invoke(main, ["load", str(_file(tmp_path)), "--touch"])
    assert result.exit_code == 0, result.output
    assert "import torch" in result.output and "map tensors" in result.output


def test_bad_input_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "zeros.safetensors"
    bad.write_bytes(bytes(4096))
    for args in (["inspect", str(tmp_path / "missing.safetensors")], ["inspect", str(bad)],
                 ["load", str(bad)]):
        proc = subprocess.run([sys.executable, "-m", "sparsemap.cli", *args], capture_output=True, text=True)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("sparsemap: error: ") and "Traceback" not in proc.stderr


def test_help_shows_examples():
    result = CliRunner().invoke(main, ["inspect", "--help"])
    assert "Example" in result.output and "sparsemap inspect" in result.output
