"""The sparsemap command: output, JSON and exit codes (0 ok, 1 failed, 2 bad input, 130 interrupted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
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
    """Replace the demo's runs: the command only prints (and draws, and saves) what it is handed."""
    from sparsemap.bench import demo as story
    from sparsemap.models import demo

    calls = []

    def compare(*args, on_intro, on_progress, **kwargs):
        calls.append((*args, *kwargs.values()))
        on_intro("model: M\nprompt: P")
        on_progress("running A in a fresh process ...")
        if args and isinstance(args[0], str):  # the story
            return story.StoryResult(runs=[], budget=400 << 20, limited=True, text="\nthe table\nverdict",
                                     ok=same)
        return demo.DemoResult(runs={}, text="\nthe table\nverdict", same=same)

    monkeypatch.setattr(story, "run_story", compare)
    monkeypatch.setattr(demo, "compare_minilm", compare)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # no picture: said on stderr, the demo goes on
    return calls


def test_demo_prints_intro_then_text_and_progress_on_stderr(monkeypatch, tmp_path):
    calls = _fake_demo(monkeypatch, same=True)
    result = CliRunner().invoke(main, ["demo", "--prompt", "Hi", "--max-new-tokens", "5", "--memory-limit",
                                       "300M", "--json", str(tmp_path / "d.json")])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"model: M\nprompt: P\n\nthe table\nverdict\nraw figures: {tmp_path / 'd.json'}\n"
    assert result.stderr == ("(no picture: matplotlib is not installed, and the demo's picture needs it: "
                             "pip install 'sparsemap[bench]')\nrunning A in a fresh process ...\n")
    assert json.loads((tmp_path / "d.json").read_text()) == {"budget": 400 << 20, "limited": True, "ok": True,
                                                             "busy": None, "runs": []}
    result = CliRunner().invoke(main, ["demo", "--model", "minilm", "--tolerance", "0.5"])
    assert result.exit_code == 0, result.output
    assert calls == [("Hi", 5, 300 << 20), (0.5,)]


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


# ---------------------------------------------------------------- Ctrl-C: exit 130, one line, no traceback

def _children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (the memory sampler, a bench run)."""
    import os

    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _wait_for(condition, proc, what: str, timeout_s: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {what} after {timeout_s} s")
        time.sleep(0.005)


def _ctrl_c(proc) -> None:
    """What a terminal does on Ctrl-C: SIGINT to the whole foreground process group, children included."""
    import os
    import signal

    os.killpg(proc.pid, signal.SIGINT)


def test_ctrl_c_during_a_load_exits_130_with_one_line_and_ends_the_sampler(tmp_path):
    import os

    path = tmp_path / "big.safetensors"
    save_file({f"w{i}": torch.randn(1024, 1024) for i in range(16)}, path)  # 64 MiB
    # Streamed through a one-page ring: seconds of work, during which the file is open.
    proc = subprocess.Popen([sys.executable, "-m", "sparsemap.cli", "load", str(path), "--staging", "4K",
                             "--readers", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)

    def streaming() -> bool:
        try:
            fds = os.listdir(f"/proc/{proc.pid}/fd")
            return _children(proc.pid) != [] and any(
                os.readlink(f"/proc/{proc.pid}/fd/{fd}") == str(path) for fd in fds)
        except OSError:
            return False

    _wait_for(streaming, proc, "the file open for streaming")
    sampler = _children(proc.pid)
    _ctrl_c(proc)  # the sampler gets it too: it used to die with a KeyboardInterrupt traceback
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, out, err)
    assert err == "sparsemap: interrupted\n", err
    for pid in sampler:  # the sampler ends with its parent, not orphaned
        _wait_gone(pid)


def _wait_gone(pid: int, timeout_s: float = 10.0) -> None:
    import os
    import time

    deadline = time.monotonic() + timeout_s
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":  # a zombie: ended, waiting for a reaper
                    return
        except OSError:
            return
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}"), f"process {pid} outlived the command"


def test_keyboard_interrupt_in_any_command_is_exit_130_not_aborted(tmp_path, monkeypatch):
    import sparsemap

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sparsemap, "open", interrupted)
    result = CliRunner().invoke(main, ["inspect", str(_file(tmp_path))])
    assert result.exit_code == 130 and result.stderr == "sparsemap: interrupted\n", result.output
    assert "Aborted" not in result.output


def test_a_phase_tracker_left_open_ends_quietly_at_interpreter_exit():
    """A tracker nobody closed, collected during interpreter shutdown (here: kept alive by a cycle), used
    to raise NameError ('open' is not defined) from __del__."""
    code = ("from sparsemap.memory import PhaseTracker\n"
            "tracker = PhaseTracker()\n"
            "with tracker.phase('x'):\n"
            "    block = bytearray(1 << 20)\n"
            "tracker.me = tracker\n"
            "print(tracker.phases[0].name)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "x\n"
    assert proc.stderr == "", proc.stderr


def test_a_phase_tracker_is_a_context_manager_that_ends_its_sampler():
    from sparsemap.memory import PhaseTracker

    with PhaseTracker() as tracker, tracker.phase("allocate"):
        sampler = tracker._sampler._proc
        block = bytearray(8 << 20)
    assert block and sampler.poll() is not None  # the helper process has ended
    assert tracker.phases[0].name == "allocate"
    tracker.close()  # twice: nothing left to do


# ---------------------------------------------------------------- bench: Ctrl-C keeps the finished runs

def test_ctrl_c_during_bench_keeps_the_finished_runs(tmp_path):
    from sparsemap.bench import synthetic

    tiny = synthetic.generate("llama-tiny", quiet=True)
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    proc = subprocess.Popen([sys.executable, "-m", "sparsemap.cli", "bench", str(tiny), "--strategies",
                             "sparsemap", "--cache", "warm", "--repeat", "50", "--json", str(out_json),
                             "--markdown", str(out_md)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen: list[str] = []

    def second_run_started() -> bool:  # stderr is a pipe: one progress line per run
        seen.append(proc.stderr.readline())
        return seen[-1].startswith("[2/50]")

    _wait_for(second_run_started, proc, "the second run", timeout_s=300)
    _ctrl_c(proc)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "Aborted" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("sparsemap: interrupted after ") and "of 50 runs" in last, err
    assert str(out_json) in last and str(out_md) in last, last
    doc = json.loads(out_json.read_text())
    finished = doc["interrupted"]["finished"]
    assert finished >= 1 and doc["interrupted"]["planned"] == 50
    assert len([r for r in doc["results"] if "exit_code" in r]) == finished
    assert doc["medians"][0]["runs"] == finished and f"interrupted after {finished} of 50" in out
    assert out_md.read_text().count("| sparsemap |") == 1


def _fake_bench_folder(tmp_path):
    folder = tmp_path / "m"
    (folder / "sharded").mkdir(parents=True)
    save_file({"w": torch.ones(4)}, folder / "model.safetensors")
    (folder / "model.pt").write_bytes(b"")
    return folder


def _report(folder, finished):
    row = {"strategy": "sparsemap", "cache": "warm", "limit": None, "runs": finished, "attempts": finished,
           "oom_killed": 0, "note": "", "usable_s": 0.1, "forward_s": 0.1, "effective_gbps": 1.0,
           "vs_cold_read": 1.0, "peak_rss": 1, "peak_anon": 1, "anon_growth": 1, "peak_file": 1,
           "cgroup_peak": None, "major_faults": 1, "read_bytes": 1}
    return {"model": str(folder), "model_nbytes": 16, "repeat": 3, "cold_read_bytes_per_s": 1e9,
            "results": [], "medians": [row], "interrupted": {"finished": finished, "planned": 3}}


def test_an_interrupted_bench_without_output_paths_writes_json_to_the_cache(tmp_path, monkeypatch):
    from sparsemap.bench import runner

    folder = _fake_bench_folder(tmp_path)
    monkeypatch.setenv("SPARSEMAP_CACHE", str(tmp_path / "cache"))

    def stopped(*args, **kwargs):
        raise runner.Interrupted(_report(folder, 2), 2, 3)

    monkeypatch.setattr(runner, "run", stopped)
    result = CliRunner().invoke(main, ["bench", str(folder), "--strategies", "sparsemap"])
    assert result.exit_code == 130, result.output
    written = list((tmp_path / "cache" / "bench" / "results").glob("m-interrupted-*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["interrupted"]["finished"] == 2
    assert f"wrote {written[0]}" in result.stdout
    assert result.stderr.endswith(f"sparsemap: interrupted after 2 of 3 runs; the finished runs are in "
                                  f"{written[0]}\n"), result.stderr

    def nothing(*args, **kwargs):
        raise runner.Interrupted(None, 0, 3)

    monkeypatch.setattr(runner, "run", nothing)
    result = CliRunner().invoke(main, ["bench", str(folder), "--strategies", "sparsemap"])
    assert result.exit_code == 130
    assert result.stderr == "sparsemap: interrupted: none of 3 runs had finished; nothing to keep\n"


# ---------------------------------------------------------------- inspect through a pipe

def test_inspect_through_a_pipe_prints_whole_names(tmp_path):
    import os

    name = "model.layers.0." + "very_long_module_name." * 8 + "weight"  # 197 characters
    path = tmp_path / "long.safetensors"
    save_file({name: torch.zeros(2, 2)}, path)
    proc = subprocess.run([sys.executable, "-m", "sparsemap.cli", "inspect", str(path)],  # stdout: a pipe
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    assert name in proc.stdout, proc.stdout


# ---------------------------------------------------------------- options checked: exit 2, a clear line

def test_device_strings_are_checked_before_loading(tmp_path, monkeypatch):
    path = str(_file(tmp_path))
    for device, says in (("foo", "'foo' is not a device like cpu, cuda or cuda:1"),
                         ("cuda:x", "'cuda:x' is not a device"), ("mps", "tensors go to cpu or cuda:N")):
        result = CliRunner().invoke(main, ["load", path, "--device", device])
        assert result.exit_code == 2 and says in result.output, (device, result.output)
        assert "--device" in result.output
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    result = CliRunner().invoke(main, ["load", path, "--device", "cuda:0"])
    assert result.exit_code == 2 and "this torch build has no CUDA" in result.output, result.output
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    result = CliRunner().invoke(main, ["load", path, "--device", "cuda:3"])
    assert result.exit_code == 2 and "there is no GPU 3; 1 visible" in result.output, result.output
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    result = CliRunner().invoke(main, ["load", path, "--device", "cuda"])
    assert result.exit_code == 2 and "sees no GPU" in result.output, result.output


def test_every_size_option_is_parsed_by_parse_size(tmp_path):
    path = str(_file(tmp_path))
    for args, option in ((["load", path, "--staging", "12Q"], "--staging"),
                         (["convert", path, str(tmp_path / "o.safetensors"), "--align", "4Kb!"], "--align"),
                         (["bench", "llama-tiny", "--memory-limit", "none,1X"], "--memory-limit"),
                         (["bench", "llama-tiny", "--memory-limit", "0%"], "--memory-limit"),
                         (["bench", "llama-tiny", "--memory-limit", "-5%"], "--memory-limit")):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert f"Invalid value for '{option}'" in result.output, (args, result.output)
    result = CliRunner().invoke(main, ["load", path, "--staging", "64K", "--json"])
    assert result.exit_code == 0, result.output
    stream = json.loads(result.output)["stream"]
    assert stream["buffers"] * stream["buffer_nbytes"] <= 64 << 10  # 64K reached the ring as bytes


def test_bench_from_json_refuses_a_file_that_is_not_a_report(tmp_path):
    bad = tmp_path / "r.json"
    for text in ("{not json", json.dumps({"model": "x"})):
        bad.write_text(text)
        result = CliRunner().invoke(main, ["bench", "--from-json", str(bad)])
        assert result.exit_code == 2 and "--from-json" in result.output, result.output


# ---------------------------------------------------------------- convert: the destination first

def test_convert_refuses_a_bad_destination_before_reading_the_source(tmp_path):
    missing_source = str(tmp_path / "missing.safetensors")  # reached only if the destination passed
    (tmp_path / "out").mkdir()
    for dst, says in ((tmp_path / "out", "is a folder, not a file"),
                      (tmp_path / "nope" / "o.safetensors", "folder does not exist"),
                      # /proc takes no new file, whoever asks (root included): ENOENT or EACCES
                      (Path("/proc/sparsemap-test.safetensors"), "cannot create a file in this folder")):
        result = CliRunner().invoke(main, ["convert", missing_source, str(dst)])
        assert result.exit_code == 2 and says in result.stderr, (dst, result.output)
    result = CliRunner().invoke(main, ["convert", missing_source, str(tmp_path / "o.safetensors")])
    assert result.exit_code == 2 and "missing.safetensors" in result.stderr  # a good destination: the source


def test_convert_refuses_a_folder_it_cannot_write_to(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder; /proc stands in for it above")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        result = CliRunner().invoke(main, ["convert", str(_file(tmp_path)), str(folder / "o.safetensors")])
    finally:
        folder.chmod(0o755)
    assert result.exit_code == 2 and "cannot create a file in this folder" in result.stderr, result.output


def test_convert_warns_of_patterns_that_match_no_tensor(tmp_path):
    src, dst = _file(tmp_path), tmp_path / "o.safetensors"
    result = CliRunner().invoke(main, ["convert", str(src), str(dst), "--pad-rows", "*embed*",
                                       "--pad-rows", "*embed_tokens*", "--transpose", "lm_head.weight"])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert any(line.startswith("sparsemap: warning: --pad-rows '*embed_tokens*' matches no tensor")
               for line in lines), lines
    assert any("--transpose 'lm_head.weight' matches no tensor" in line for line in lines), lines
    assert not any("'*embed*'" in line for line in lines)  # it matched embed.weight
    assert dst.is_file()


# ---------------------------------------------------------------- bench: --list, the baseline

def test_bench_list_needs_no_model_and_a_run_does():
    result = CliRunner().invoke(main, ["bench", "--list"])
    assert result.exit_code == 0 and "sparsemap: available" in result.output, result.output
    result = CliRunner().invoke(main, ["bench"])
    assert result.exit_code == 2 and "Missing argument 'MODEL'" in result.output, result.output


def test_bench_refuses_a_memory_limit_below_the_measured_baseline(tmp_path, monkeypatch):
    from sparsemap.bench import runner

    folder = _fake_bench_folder(tmp_path)
    monkeypatch.setattr(runner, "baseline", lambda _folder: {"anon": 300 << 20, "file": 100 << 20})
    monkeypatch.setattr(runner, "run", lambda *a, **k: pytest.fail("ran despite an impossible limit"))
    result = CliRunner().invoke(main, ["bench", str(folder), "--memory-limit", "none,1G,200M"])
    assert result.exit_code == 2, result.output
    assert "a memory limit of 200 MiB is below what each run holds before loading any weight: 400 MiB " \
           "measured" in result.stderr and "300 MiB anonymous + 100 MiB file-backed" in result.stderr


# ---------------------------------------------------------------- a missing extra names its pip install

def test_a_missing_extra_is_exit_1_naming_the_pip_install(tmp_path, monkeypatch):
    from sparsemap.bench.report import COLUMNS  # noqa: F401 - imported before matplotlib is hidden

    report = tmp_path / "r.json"
    report.write_text(json.dumps(_report(tmp_path, 1)))
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    for args, says in ((["embed", str(tmp_path), "a text"], "pip install 'sparsemap[transformers]'"),
                       (["bench", "--from-json", str(report), "--plot", str(tmp_path / "p.png")],
                        "pip install 'sparsemap[bench]'"),
                       (["demo"], "pip install 'sparsemap[transformers]'")):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr.startswith("sparsemap: error: ") and says in result.stderr, (args, result.stderr)
        assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "p.png").exists()


def test_from_pretrained_without_transformers_raises_missing_extra(tiny_llama, monkeypatch):
    import sparsemap
    from sparsemap.errors import MissingExtraError

    _, folder = tiny_llama
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'sparsemap\[transformers\]'") as caught:
        sparsemap.from_pretrained(folder)
    assert isinstance(caught.value, ImportError)  # `except ImportError` still catches it


# ---------------------------------------------------------------- convert: fillers, GGUF to transformers

def test_convert_writes_no_filler_unless_asked_and_inspect_names_the_unaligned(tmp_path: Path) -> None:
    import safetensors

    # Two tensors of 1.5 pages: only one can start on a page without a filler between them.
    save_file({"a": torch.zeros(1536), "b": torch.ones(1536), "n": torch.ones(3)}, tmp_path / "s.safetensors")
    plain, filled = tmp_path / "plain.safetensors", tmp_path / "filled.safetensors"
    for dst, extra in ((plain, []), (filled, ["--fillers"])):
        result = CliRunner().invoke(main, ["convert", str(tmp_path / "s.safetensors"), str(dst), *extra])
        assert result.exit_code == 0, result.output
    with safetensors.safe_open(plain, "pt") as f:
        assert sorted(f.keys()) == ["a", "b", "n"]
    with safetensors.safe_open(filled, "pt") as f:
        assert any(k.startswith("__sparsemap_pad__.") for k in f.keys())  # noqa: SIM118
    shown = CliRunner().invoke(main, ["inspect", str(plain), "--json"])
    assert json.loads(shown.output)["summary"]["unaligned_tensors"] == ["b"]
    shown = CliRunner().invoke(main, ["inspect", str(plain)])
    assert "1 tensor(s) of a page or more do not start on one: b" in shown.output
    shown = CliRunner().invoke(main, ["inspect", str(filled), "--json"])
    assert json.loads(shown.output)["summary"]["unaligned_tensors"] == []


def test_convert_a_gguf_gives_transformers_names_in_a_file_and_a_transformers_folder(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from sparsemap.bench.gguf_writer import write_like_llama_cpp

    from .conftest import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    gguf = write_like_llama_cpp(model, tmp_path / "tiny.gguf")
    result = CliRunner().invoke(main, ["convert", str(gguf), str(tmp_path / "tiny.safetensors")])
    assert result.exit_code == 0, result.output
    import sparsemap

    assert set(sparsemap.open(tmp_path / "tiny.safetensors")) <= set(model.state_dict())
    result = CliRunner().invoke(main, ["convert", str(gguf), str(tmp_path / "out") + "/"])
    assert result.exit_code == 0, result.output
    assert "out/model.safetensors" in result.output
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    result = CliRunner().invoke(main, ["convert", str(gguf), str(tmp_path / "full")])
    assert result.exit_code == 2 and "not empty" in result.output
