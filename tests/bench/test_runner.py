"""The benchmark matrix on a tiny synthetic Llama: every available strategy runs and is measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sparsemap.bench import runner, synthetic
from sparsemap.bench.strategies import STRATEGIES, unavailable
from sparsemap.cli import main


@pytest.fixture(scope="module")
def tiny() -> Path:
    return synthetic.generate("llama-tiny", quiet=True)


def test_synthetic_folder_holds_every_layout(tiny: Path) -> None:
    import sparsemap

    single, pt, sharded = (sparsemap.open(tiny / n) for n in ("model.safetensors", "model.pt", "sharded"))
    assert set(single) == set(pt) == set(sharded)
    assert len(list((tiny / "sharded").glob("model-*.safetensors"))) > 1


@pytest.mark.slow
def test_every_available_strategy_loads_and_is_measured(tiny: Path) -> None:
    report = runner.run(tiny, list(STRATEGIES), ["cold"])
    by_name = {r["strategy"]: r for r in report["results"]}
    for name in STRATEGIES:
        r = by_name[name]
        if unavailable(name):
            assert r["unavailable"], name  # reported with its reason, not dropped
            continue
        assert r["exit_code"] == 0, (name, r.get("error"))
        assert r["usable_s"] > 0 and r["peak_rss"] > 0 and r["samples"] > 0
        assert r["cached_before"] < 0.01  # the files really were cold
    # The naive path holds a random-init model and a loaded copy: more anonymous memory than sparsemap's.
    assert by_name["naive"]["peak_anon"] > by_name["sparsemap"]["peak_anon"]


def test_cli_lists_strategies_and_writes_json(tiny: Path, tmp_path: Path) -> None:
    listed = CliRunner().invoke(main, ["bench", "llama-tiny", "--list"])
    assert "sparsemap: available" in listed.output and "tensorizer:" in listed.output
    out = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["bench", str(tiny), "--strategies", "sparsemap,safetensors load_file",
                                       "--cache", "warm", "--json", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert {r["strategy"] for r in doc["medians"]} == {"sparsemap", "safetensors load_file"}
    assert doc["machine"]["cpus"] >= 1
    bad = CliRunner().invoke(main, ["bench", "llama-tiny", "--strategies", "nope"])
    assert bad.exit_code == 2
