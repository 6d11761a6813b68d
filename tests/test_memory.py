"""sparsemap.memory: the figures it reports track real allocations."""

from __future__ import annotations

import mmap
import os

from sparsemap.memory import MiB, Snapshot

from .helpers import run_isolated


def test_anonymous_allocation_shows_as_anonymous():
    r = run_isolated("""
        import json
        from sparsemap.memory import MiB, Snapshot
        before = Snapshot.take()
        block = bytearray(200 * MiB)  # calloc'd: touch it so the pages are resident
        for i in range(0, len(block), 4096):
            block[i] = 1
        after = Snapshot.take()
        print(json.dumps({"anon": after.anon - before.anon, "file": after.file - before.file}))
    """)
    assert r["anon"] >= 190 * MiB
    assert abs(r["file"]) < 50 * MiB


def test_touched_file_mapping_shows_as_file_backed(tmp_path):
    path = tmp_path / "data.bin"
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20) * 96)  # 96 MiB
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    before = Snapshot.take()
    total = sum(mm[i] for i in range(0, len(mm), 4096))
    after = Snapshot.take()
    mm.close()
    assert total >= 0
    assert after.file - before.file >= 90 * MiB
    assert after.anon - before.anon < 16 * MiB


def test_sampler_catches_a_transient_peak():
    r = run_isolated("""
        import json, time
        from sparsemap.memory import MiB, AnonSampler
        with AnonSampler() as sampler:
            start = sampler.sample()
            block = bytearray(150 * MiB)
            for i in range(0, len(block), 4096):
                block[i] = 1
            time.sleep(0.2)  # long enough for the sampler process; sample() is not called during the peak
            del block
        print(json.dumps({"rise": sampler.peak - start}))
    """)
    assert r["rise"] >= 140 * MiB


def test_phase_tracker_reports_peak_and_end_state():
    r = run_isolated("""
        import json, time
        from sparsemap.memory import MiB, PhaseTracker
        tracker = PhaseTracker()
        with tracker.phase("allocate and free"):
            block = bytearray(120 * MiB)
            for i in range(0, len(block), 4096):
                block[i] = 1
            # Sampled peaks need the peak to last a few sampling intervals; on a
            # busy 2-core machine the sampler can wait its turn for tens of ms.
            time.sleep(0.2)
            del block
        with tracker.phase("idle"):
            pass
        print(json.dumps({"tracker": tracker.to_dict(), "table": tracker.table()}))
    """)
    baseline, (first, second) = r["tracker"]["baseline"], r["tracker"]["phases"]
    assert first["peak_anon"] - baseline["anon"] >= 110 * MiB
    assert first["peak_rss"] - first["after"]["rss"] >= 100 * MiB  # the peak is gone by the phase's end
    assert second["peak_rss"] < first["peak_rss"]  # the counter was reset between phases
    assert "allocate and free" in r["table"] and "peak anon" in r["table"]
    assert first["name"] == "allocate and free"


def test_phase_tracker_announces_each_phase_as_it_begins_on_the_shared_clock():
    import time

    from sparsemap.memory import PhaseTracker

    heard = []
    before = time.monotonic()
    with PhaseTracker(on_phase=lambda name, at: heard.append((name, at, len(tracker.phases)))) as tracker:
        with tracker.phase("first"):
            time.sleep(0.01)
        with tracker.phase("second"):
            pass
    # Heard before the phase ran (none recorded yet for the first), stamped with time.monotonic().
    assert [(name, done) for name, _, done in heard] == [("first", 0), ("second", 1)]
    assert before <= heard[0][1] <= heard[1][1] - 0.01 <= time.monotonic()
