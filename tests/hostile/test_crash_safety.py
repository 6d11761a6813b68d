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


def wait_for_bytes(folder: Path, name: str, proc: subprocess.Popen, nbytes: float) -> None:
    """Poll until this writer's temporary file holds ``nbytes``, is renamed into place, or the writer is gone.

    Kills are aimed by bytes written, not by time: on a loaded machine a write can take twice as
    long as the reference run did, and a kill timed from that run would land before half is written.
    """
    while proc.poll() is None:
        temporaries = list(folder.glob(f".{name}.{proc.pid}.*.tmp"))
        if not temporaries:
            return  # renamed: the caller waited for it to appear first
        try:
            if temporaries[0].stat().st_size >= nbytes:
                return
        except FileNotFoundError:  # renamed between the glob and the stat
            return
        time.sleep(0.001)


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
    assert proc.wait() == 0
    expected = digest(reference)
    final_nbytes = reference.stat().st_size

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
        else:  # while writing: after a random share of the file's bytes; past 1, once it is renamed
            wait_for_temporary(tmp_path, "dst.safetensors", proc)
            wait_for_bytes(tmp_path, "dst.safetensors", proc, rng.uniform(0.02, 1.15) * final_nbytes)
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
    assert outcomes["new"] and (outcomes["old"] or outcomes["absent"]), "kills landed on one side only"
    # The next conversion succeeds and sweeps the temporaries the killed writers left.
    subprocess.run(convert_cmd(src, dst), check=True, capture_output=True)
    assert digest(dst) == expected
    assert not list(tmp_path.glob(".dst.safetensors.*.tmp"))
    assert os.path.getsize(dst) == os.path.getsize(reference)
