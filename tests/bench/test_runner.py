"""The benchmark matrix on a tiny synthetic Llama: every available strategy runs and is measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sparsemap.bench import cgroup, runner, synthetic
from sparsemap.bench.strategies import STRATEGIES, unavailable
from sparsemap.cli import _parse_limits, main

MiB = 1 << 20


@pytest.fixture(scope="module")
def tiny() -> Path:
    return synthetic.generate("llama-tiny", quiet=True)


def test_synthetic_folder_holds_every_layout(tiny: Path) -> None:
    import sparsemap

    single, pt, sharded = (sparsemap.open(tiny / n) for n in ("model.safetensors", "model.pt", "sharded"))
    assert set(single) == set(pt) == set(sharded)
    assert len(list((tiny / "sharded").glob("model-*.safetensors"))) > 1


def test_every_strategy_names_its_files_and_peers_their_package(tiny: Path) -> None:
    for name, strategy in STRATEGIES.items():
        if strategy.prepare is not None and unavailable(name) is None:
            strategy.prepare(tiny)
        assert strategy.description
        for path in runner.strategy_files(tiny, name):
            assert path.is_file(), (name, path)
        if strategy.imports:
            assert strategy.pip, name  # an unavailable peer says what to install


@pytest.mark.slow
def test_every_available_strategy_loads_and_is_measured(tiny: Path) -> None:
    lines: list[str] = []
    report = runner.run(tiny, list(STRATEGIES), ["cold"], on_progress=lines.append)
    by_name = {r["strategy"]: r for r in report["results"]}
    for name in STRATEGIES:
        r = by_name[name]
        if unavailable(name):
            assert r["unavailable"], name  # reported with its reason, not dropped
            continue
        assert r["exit_code"] == 0, (name, r.get("error"))
        assert r["usable_s"] > 0 and r["peak_rss"] > 0 and r["samples"] > 0
        assert 0 < r["baseline_anon"] <= r["peak_anon"]
        assert r["cached_before"] < 0.01  # the files really were cold
    # The naive path holds a random-init model and a loaded copy: more anonymous memory than sparsemap's.
    assert by_name["naive"]["anon_growth"] > by_name["sparsemap"]["anon_growth"]
    assert report["cold_read_bytes_per_s"] > 0 and report["machine"]["cold_read_mb_per_s"] > 0
    assert any("[1/" in line for line in lines)  # progress is reported run by run
    for row in report["medians"]:
        if row["runs"]:
            assert row["effective_gbps"] > 0 and row["vs_cold_read"] > 0


def test_limited_runs_start_cold_in_a_cgroup_and_report_its_peak(tiny: Path) -> None:
    ok, why = cgroup.available()
    if not ok:
        pytest.skip(f"no memory cgroup can be created here: {why}")
    report = runner.run(tiny, ["sparsemap"], ["warm"], limits=[None, 2 << 30])
    cells = {(r["cache"], r["limit"]): r for r in report["results"]}
    assert set(cells) == {("warm", None), ("cold", 2 << 30)}  # limited: cold, whatever was asked
    limited = cells[("cold", 2 << 30)]
    assert limited["exit_code"] == 0 and not limited["oom_killed"]
    assert limited["cached_before"] < 0.01
    assert limited["cgroup_peak"] >= limited["peak_anon"] > 0
    assert cells[("warm", None)]["cgroup_peak"] is None


def test_medians_and_effective_speed_from_known_runs() -> None:
    run = {"strategy": "s", "cache": "cold", "limit": None, "exit_code": 0, "forward_s": 0.5, "wall_s": 3.0,
           "peak_rss": 1, "peak_anon": 1, "anon_growth": 1, "peak_file": 1, "cgroup_peak": None,
           "major_faults": 1, "read_bytes": 1}
    runs = [{**run, "usable_s": u} for u in (0.5, 1.5, 9.0)]
    killed = {"strategy": "k", "cache": "cold", "limit": 1, "exit_code": -9, "oom_killed": True,
              "wall_s": 2.0, "error": "killed by the memory limit"}
    rows = {r["strategy"]: r for r in runner.medians([*runs, killed], 4_000_000_000, 2e9)}
    assert rows["s"]["usable_s"] == 1.5 and rows["s"]["runs"] == 3
    assert rows["s"]["effective_gbps"] == pytest.approx(4.0 / 2.0)  # 4 GB over usable + forward = 2 s
    assert rows["s"]["vs_cold_read"] == pytest.approx(1.0)
    assert rows["k"]["runs"] == 0 and rows["k"]["oom_killed"] == 1 and rows["k"]["wall_s"] == 2.0
    assert rows["k"]["note"] == "killed by the memory limit"


def test_memory_limits_parse_sizes_percentages_and_none() -> None:
    assert _parse_limits(None, 1000) == [None]
    assert _parse_limits("none,50%,1G", 2000) == [None, 1000, 1 << 30]
    with pytest.raises(Exception, match="percentage"):
        _parse_limits("half%", 1000)


def test_machine_description_names_versions_and_filesystem(tiny: Path) -> None:
    desc = runner.machine(tiny / "model.safetensors", 1.5e9)
    assert desc["cpus"] >= 1 and desc["ram_bytes"] > 0 and desc["kernel"]
    assert desc["versions"]["torch"].startswith("2.") and desc["versions"]["sparsemap"]
    assert desc["cold_read_mb_per_s"] == 1500.0 and "(" in desc["filesystem"]


def test_cli_lists_strategies_writes_json_and_plot(tiny: Path, tmp_path: Path) -> None:
    listed = CliRunner().invoke(main, ["bench", "llama-tiny", "--list"])
    assert "sparsemap: available" in listed.output and "tensorizer:" in listed.output
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    result = CliRunner().invoke(main, ["bench", str(tiny), "--strategies", "sparsemap,safetensors load_file",
                                       "--cache", "warm", "--json", str(out), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert {r["strategy"] for r in doc["medians"]} == {"sparsemap", "safetensors load_file"}
    assert doc["machine"]["cpus"] >= 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    for bad in (["bench", "llama-tiny", "--strategies", "nope"], ["bench", "llama-9b"],
                ["bench", str(tmp_path)]):
        assert CliRunner().invoke(main, bad).exit_code == 2, bad


@pytest.mark.model
def test_bench_on_a_real_model_folder_prepares_each_form_once(minilm_folder: Path, tmp_path: Path) -> None:
    """A Hugging Face folder (here an encoder, BertModel) is written out once per form the strategies
    read (plain safetensors, torch.save, a sharded save) and measured like a synthetic size."""
    out = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["bench", str(minilm_folder), "--strategies",
                                       "sparsemap,naive,transformers from_pretrained", "--cache", "warm",
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert {r["strategy"] for r in doc["medians"]} == {"sparsemap", "naive", "transformers from_pretrained"}
    assert all(r["runs"] == r["attempts"] == 1 and r["usable_s"] > 0 for r in doc["medians"]), doc["medians"]
    folder = synthetic.from_folder(minilm_folder, quiet=True)  # cached: the same folder, not written again
    assert (folder / "model.pt").is_file() and (folder / "sharded").is_dir()


def test_an_interrupted_matrix_keeps_the_runs_that_finished(tiny: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def measure(folder, name, cache, limit, base):
        calls.append(name)
        if len(calls) == 3:  # Ctrl-C during the third run: run_measured has killed its child
            raise KeyboardInterrupt
        return {**base, "exit_code": 0, "usable_s": 0.5, "forward_s": 0.5, "wall_s": 1.0, "peak_rss": 1,
                "peak_anon": 1, "anon_growth": 1, "peak_file": 1, "cgroup_peak": None, "major_faults": 0,
                "read_bytes": 0}

    monkeypatch.setattr(runner, "_measure", measure)
    monkeypatch.setattr(runner, "cold_read_speed", lambda path: 1e9)
    with pytest.raises(runner.Interrupted) as caught:
        runner.run(tiny, ["sparsemap", "naive"], ["warm"], repeat=5)
    stop = caught.value
    assert isinstance(stop, KeyboardInterrupt)  # callers that know nothing of it still see Ctrl-C
    assert (stop.finished, stop.planned) == (2, 10)
    assert stop.report is not None and stop.report["interrupted"] == {"finished": 2, "planned": 10}
    assert [r["strategy"] for r in stop.report["results"]] == ["sparsemap", "naive"]
    assert {r["strategy"]: r["runs"] for r in stop.report["medians"]} == {"sparsemap": 1, "naive": 1}

    def at_once(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "cold_read_speed", at_once)
    with pytest.raises(runner.Interrupted) as caught:
        runner.run(tiny, ["sparsemap"], ["warm"])
    assert caught.value.report is None and caught.value.finished == 0


def test_a_measured_child_is_killed_when_the_parent_is_interrupted(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import sys

    from sparsemap.bench import measure

    started = []
    real_wait4 = os.wait4

    def interrupted_wait4(pid, options):
        started.append(pid)
        raise KeyboardInterrupt

    monkeypatch.setattr(measure.os, "wait4", interrupted_wait4)
    with pytest.raises(KeyboardInterrupt):
        measure.run_measured([sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(measure.os, "wait4", real_wait4)
    assert started and not os.path.exists(f"/proc/{started[0]}")  # killed and reaped, not left behind


def test_the_baseline_is_measured_in_a_fresh_child_and_limits_below_it_refused(tiny: Path) -> None:
    from sparsemap.errors import BudgetError

    measured = runner.baseline(tiny)
    assert measured["anon"] > 50 * MiB and measured["file"] > 10 * MiB  # python + torch + transformers
    floor = measured["anon"] + measured["file"]
    runner.check_limits([None, floor + MiB], measured)
    with pytest.raises(BudgetError, match="below what each run holds before loading any weight"):
        runner.check_limits([None, floor + MiB, floor // 2], measured)
