"""A transcript writer like Claude Code's: appends lines, often in several ``write()`` calls.

Used as a thread (:func:`append_lines`) or as a separate process
(``python appender.py '<json>'``, see :func:`main`): each writer owns its files (one writer
per file, like one Claude Code process per session), several writers run at once.
Between the pieces of a line the file holds a partial line, for a few milliseconds.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from pathlib import Path

from gen import TranscriptFile, TreeGen, partial_tail  # run as a script: its folder is on sys.path


def append_lines(
    gen: TreeGen,
    files: list[TranscriptFile],
    *,
    lines: int | None = None,
    stop: threading.Event | None = None,
    max_pieces: int = 4,
    piece_gap_s: float = 0.003,
    line_gap_s: float = 0.004,
    new_session_every: int = 0,
) -> int:
    """Append ``lines`` lines (or until ``stop``) to random ``files``; return lines written."""
    rng = gen.rng
    fds: dict[Path, int] = {}
    written = 0
    try:
        while (lines is None or written < lines) and not (stop is not None and stop.is_set()):
            if new_session_every and written % new_session_every == 0:
                files = files + gen.new_session_files()
            tf = rng.choice(files)
            data = gen.line(tf)
            fd = fds.get(tf.path)
            if fd is None:
                tf.path.parent.mkdir(parents=True, exist_ok=True)
                fd = fds[tf.path] = os.open(tf.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            pieces = rng.randint(1, max_pieces)
            cuts = sorted(rng.sample(range(1, len(data)), k=min(pieces - 1, len(data) - 1)))
            for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
                os.write(fd, data[a:b])
                if b < len(data):
                    time.sleep(rng.uniform(0, piece_gap_s))  # a partial line on disk
            written += 1
            time.sleep(rng.uniform(0, line_gap_s))
    finally:
        for fd in fds.values():
            os.close(fd)
    return written


def main() -> int:
    """``{"seed", "root", "sessions", "lines", "partial_tails"}``: a writer process."""
    spec = json.loads(sys.argv[1])
    gen = TreeGen(random.Random(spec["seed"]), Path(spec["root"]), max_line_bytes=spec["max_line"])
    files = [f for _ in range(spec["sessions"]) for f in gen.new_session_files()]
    append_lines(
        gen,
        files,
        lines=spec["lines"],
        new_session_every=spec.get("new_session_every", 0),
        line_gap_s=spec.get("line_gap_s", 0.004),
    )
    for tf in gen.rng.sample(gen.files, k=min(spec.get("partial_tails", 0), len(gen.files))):
        with open(tf.path, "ab") as f:
            f.write(partial_tail(gen, tf))
    return 0


if __name__ == "__main__":
    sys.exit(main())
