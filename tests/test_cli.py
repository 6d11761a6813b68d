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


def _fake_demo(monkeypatch, same):
    """Replace the demo's runs: the command only prints what sparsemap.models.demo hands it."""
    from sparsemap.models import demo

    calls = []

    def compare(*args, on_intro, on_progress):
        calls.append(args)
        on_intro("model: M\nprompt: P")
        on_progress("running A in a fresh process ...")
        return demo.DemoResult(runs={}, text="\nthe table\nverdict", same=same)

    monkeypatch.setattr(demo, "compare_smollm2", compare)
    monkeypatch.setattr(demo, "compare_minilm", compare)
    return calls


def test_demo_prints_intro_then_text_and_progress_on_stderr(monkeypatch):
    calls = _fake_demo(monkeypatch, same=True)
    result = CliRunner().invoke(main, ["demo", "--prompt", "Hi", "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "model: M\nprompt: P\n\nthe table\nverdict\n"
    assert result.stderr == "running A in a fresh process ...\n"
    result = CliRunner().invoke(main, ["demo", "--model", "minilm", "--tolerance", "0.5"])
    assert result.exit_code == 0, result.output
    assert calls == [("Hi", 5), (0.5,)]


def test_demo_exits_1_when_the_ways_disagree(monkeypatch):
    _fake_demo(monkeypatch, same=False)
    for args in (["demo"], ["demo", "--model", "minilm"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and result.stdout.endswith("verdict\n"), (args, result.output)


def test_bench_from_json_prints_the_table_and_writes_markdown(tmp_path):
    from sparsemap.bench.report import COLUMNS

    row = {"strategy": "naive", "cache": "cold", "limit": 1 << 29, "runs": 0, "attempts": 1, "oom_killed": 1,
           "note": "killed by the memory limit"}
    doc = {"model": "/x/llama-1b", "model_nbytes": 2_000_000_000, "repeat": 1, "cold_read_bytes_per_s": 1e9,
           "medians": [row]}
    path, md = tmp_path / "r.json", tmp_path / "r.md"
    path.write_text(json.dumps(doc))
    result = CliRunner().invoke(main, ["bench", "llama-1b", "--from-json", str(path), "--markdown", str(md)])
    assert result.exit_code == 0, result.output
    assert "llama-1b: 2.00 GB, medians of 1; cold sequential read 1000 MB/s" in result.stdout
    assert "naive" in result.stdout and f"wrote {md}" in result.stdout
    header, _, killed = md.read_text().splitlines()
    assert header == "| " + " | ".join(COLUMNS) + " |" and killed.endswith("| OOM-killed 1/1 |")


def test_inspect_refuses_a_limit_below_one(tmp_path) -> None:
    import torch
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from sparsemap.cli import main

    save_file({"w": torch.ones(2)}, str(tmp_path / "m.safetensors"))
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "m.safetensors"), "--limit", "-1"])
    assert result.exit_code == 2 and "-1 is not in the range x>=1" in result.output
