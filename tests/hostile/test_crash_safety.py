"""Conversion killed with SIGKILL at random moments: the destination is always the old file (or absent)
or the new one complete and valid; never a torn file. Temporary files of killed writers are cleaned up."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sparsemap

KILLS = 24


def convert_cmd(src: Path, dst: Path) -> list[str]:
    return [sys.executable, "-m", "sparsemap.cli", "convert", str(src), str(dst), "--dtype", "bfloat16",
            "--pad-rows", "*"]


def wait_for_temporary(folder: Path, name: str, proc: subprocess.Popen) -> float:
    """Poll until this writer's temporary file (named with its pid) exists, or the writer is gone."""
    while not list(folder.glob(f".{name}.{proc.pid}.*.tmp")) and proc.poll() is None:
        time.sleep(0.002)
    return time.perf_counter()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_sigkill_during_convert_never_leaves_a_torn_file(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    src, dst = tmp_path / "src.safetensors", tmp_path / "dst.safetensors"
    save_file({f"layer{i}.weight": torch.randn(2048, 1024, generator=gen) for i in range(24)}, src)  # 192 MiB
    save_file({"old": torch.ones(4)}, dst)
    old = digest(dst)

    # A reference run, watched: when the temporary file appears (writing starts) and when it is done.
    reference = tmp_path / "reference.safetensors"
    started = time.perf_counter()
    proc = subprocess.Popen(convert_cmd(src, reference), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    appeared = wait_for_temporary(tmp_path, "reference.safetensors", proc)
    writing_at = appeared - started
    while list(tmp_path.glob(f".reference.safetensors.{proc.pid}.*.tmp")):  # renamed when complete
        time.sleep(0.002)
    write_s = time.perf_counter() - appeared
    assert proc.wait() == 0
    expected = digest(reference)

    rng = random.Random(0)
    outcomes = {"old": 0, "absent": 0, "new": 0}
    mid_write = 0
    for i in range(KILLS):
        if i % 3 == 2:
            dst.unlink(missing_ok=True)  # some runs start with no destination at all
        elif not dst.exists() or digest(dst) != old:
            save_file({"old": torch.ones(4)}, dst)
        proc = subprocess.Popen(convert_cmd(src, dst), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if i % 4 == 0:  # during start-up, before a byte is written
            time.sleep(rng.uniform(0, writing_at))
        else:  # while writing: from the temporary file's appearance to a little past the expected end
            wait_for_temporary(tmp_path, "dst.safetensors", proc)
            time.sleep(rng.uniform(0, write_s * 1.1))
        mid_write += bool(list(tmp_path.glob(f".dst.safetensors.{proc.pid}.*.tmp")))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not dst.exists():
            outcomes["absent"] += 1
        elif digest(dst) == old:
            outcomes["old"] += 1
        else:
            assert digest(dst) == expected, f"kill {i}: destination is neither old nor the complete new file"
            catalog = sparsemap.open(dst)
            assert len(catalog) == 24
            outcomes["new"] += 1
    print(f"{KILLS} kills: {outcomes}, {mid_write} while the temporary file was being written")
    assert sum(outcomes.values()) == KILLS
    assert mid_write >= KILLS // 3, "too few kills landed mid-write to mean anything"
    # The next conversion succeeds and sweeps the temporaries the killed writers left.
    subprocess.run(convert_cmd(src, dst), check=True, capture_output=True)
    assert digest(dst) == expected
    assert not list(tmp_path.glob(".dst.safetensors.*.tmp"))
    assert os.path.getsize(dst) == os.path.getsize(reference)
