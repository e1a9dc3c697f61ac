"""Peak memory of a real ``run --once`` over one valid turn whose text is ~60 MB.

Issue 9 section 5: such a line peaked at ~300 MB RSS (raw bytes, the parsed text, the JSON
text, its encoded copy and psycopg's COPY buffer all alive at once: ~4.1x the line above the
baseline). Now the raw bytes go once parsed and the JSON is streamed into COPY, so the writer
holds the text and its JSON (~2x), and a huge line is handed to the parser, which frees its
bytes once decoded and parses the text with the standard library (orjson needs ~2x the input
besides it): ~2x. The bound: the peak of the whole process (its rusage as its parent sees
it) minus the same process's peak over a tiny file, below 2.5x the line (the old code: 4.1x;
with orjson on huge lines: 2.9x).
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from watcher_helpers import new_uuid, project_dir, rows, scalar, user

LINE_MB = 60


def _run_once_peak_kib(watcher: Any) -> int:
    """``run --once`` as the console script; its peak RSS as its parent sees it (rusage)."""
    script = (
        "import os, resource, subprocess, sys\n"
        "p = subprocess.run(sys.argv[1:])\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.exit(p.returncode)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *watcher.command(), "run", "--once"],
        env=watcher.env_vars(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=watcher.tmp,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout.strip().splitlines()[-1])


def test_valid_60mb_turn_peaks_below_two_and_a_half_times_its_size(
    watcher: Any, db_engine: Any
) -> None:
    watcher.configure(file_watcher={"max_line_bytes": 64 * 1024 * 1024, "read_chunk_bytes": 262144})
    folder = project_dir(watcher.root)
    tiny = new_uuid()
    (folder / f"{tiny}.jsonl").write_bytes(user(tiny, "tiny"))
    baseline_kib = _run_once_peak_kib(watcher)

    session = new_uuid()
    text = "word\\ " * (LINE_MB * 1024 * 1024 // 7)
    path: Path = folder / f"{session}.jsonl"
    path.write_bytes(user(session, text))
    size = path.stat().st_size
    peak_kib = _run_once_peak_kib(watcher)

    stored = scalar(
        db_engine,
        "SELECT md5(payload->>'text') FROM events WHERE event_type = 'turn_detected' "
        "AND payload->>'session_uuid' = :s",
        s=session,
    )
    assert stored == hashlib.md5(text.encode()).hexdigest()  # streamed into COPY intact
    extra_mib = (peak_kib - baseline_kib) / 1024
    print(
        f"line {size / 2**20:.1f} MiB: peak RSS {peak_kib / 1024:.0f} MiB, "
        f"baseline {baseline_kib / 1024:.0f} MiB, extra {extra_mib:.0f} MiB "
        f"= {extra_mib * 2**20 / size:.2f}x the line"
    )
    assert peak_kib - baseline_kib < 2.5 * size / 1024


def test_a_streamed_payload_is_stored_byte_for_byte(
    watcher: Any, db_engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Payloads beyond 1 MiB reach COPY escaped piece by piece: every character COPY's text
    format treats specially, and multi-byte UTF-8 cut at piece boundaries, survive intact."""
    watcher.configure(file_watcher={"max_line_bytes": 16 * 1024 * 1024})
    folder = project_dir(watcher.root)
    tricky = 'tab\there\nnew\rcr\\back\\\\slash "quote" é€😀 \\N \\. end'
    texts = {new_uuid(): (tricky * 70_000)[:n] for n in (1_100_000, 2_500_001)}
    small = new_uuid()
    texts[small] = tricky
    for session, text in texts.items():
        (folder / f"{session}.jsonl").write_bytes(user(session, text) + user(session, "next"))

    watcher.run_once()

    assert "bulk insert refused" not in caplog.text  # COPY took them, not the row-by-row redo

    for session, text in texts.items():
        stored = [
            r[0]
            for r in rows(
                db_engine,
                "SELECT md5(payload->>'text') FROM events WHERE event_type = 'turn_detected' "
                "AND payload->>'session_uuid' = :s ORDER BY source_offset",
                s=session,
            )
        ]
        assert stored == [hashlib.md5(t.encode()).hexdigest() for t in (text, "next")]


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith(field)).split()[1])


def test_writing_a_huge_turn_adds_about_one_copy_of_its_json(db_engine: Any) -> None:
    """The writer's own share: above the event it is given, it holds the payload's JSON once
    (streamed into COPY), not the JSON text, its encoded copy and psycopg's escaped row buffer
    (~3x before). The peak is this process's VmHWM, reset just before the write."""
    from headspace_watcher.records import Batch, Event
    from headspace_watcher.store import Store
    from headspace_watcher.store.retry import RetryPolicy

    writer = Store.for_engine(db_engine, retry=RetryPolicy(1, 0.01))
    writer.ping()  # the pool's connection exists before the measurement
    when = datetime(2026, 1, 1, tzinfo=UTC)
    size = 40 * 1024 * 1024
    payload = {
        "session_uuid": new_uuid(),
        "actor": "user",
        "text": "x\\ " * (size // 3),
        "source": "polling",
        "turn_timestamp": when.isoformat(),
    }
    json_size = len(orjson.dumps(payload))
    batch = Batch()
    batch.events.append(Event("turn_detected", payload, when))
    gc.collect()
    rss = _vm_kib("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    writer.write_batch(batch)
    extra = (_vm_kib("VmHWM:") - rss) * 1024

    print(f"writer peak above its input: {extra / 2**20:.0f} MiB, JSON {json_size >> 20} MiB")
    assert writer.metrics.events_written == 1
    assert extra < 1.5 * json_size


_MMAP_PROBE = """
import ctypes, sys
from headspace_watcher.service.lifecycle import fix_mmap_threshold
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
print(fix_mmap_threshold() if sys.argv[1] == "fixed" else None)
libc.free(libc.malloc(4 << 20))  # glibc's own policy: the threshold is now 4 MiB
before = libc.mallinfo2().hblks
buffer = libc.malloc(1 << 20)
print(libc.mallinfo2().hblks - before)  # 1: the 1 MiB buffer was mmapped (freed = returned)
"""


@pytest.mark.parametrize(("mode", "mmapped"), [("fixed", "1"), ("glibc default", "0")])
def test_the_service_keeps_big_buffers_out_of_the_heap(mode: str, mmapped: str) -> None:
    """After one big buffer glibc would serve every smaller one from the heap, whose freed
    pages stay resident; the service fixes the threshold, so a batch's buffers are returned
    when freed (the default run shows the probe tells the two apart)."""
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("not glibc >= 2.33: no mallinfo2 to observe the allocator")
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run(
        [sys.executable, "-c", _MMAP_PROBE, mode.split()[0]],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.split()
    assert out[-1] == mmapped, out
    if mode == "fixed":
        assert out[0] == "True"
