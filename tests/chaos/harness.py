"""Running the real ``headspace-watcher run`` process under faults.

Settings: short by default (inside ``just test``), long with ``HEADSPACE_CHAOS=long`` (what
``just chaos`` sets). Schedules come from a seeded ``random.Random``; the seed is printed
and put in every assertion message; ``HEADSPACE_CHAOS_SEED`` replays one.

Synchronisation is always a poll with a deadline (:func:`wait_for`); the only sleeps are the
fault schedule's own random delays.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from sqlalchemy import Engine, text
from watcher_helpers import wait_for as _wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
CONSOLE_SCRIPT = REPO_ROOT / ".venv" / "bin" / "headspace-watcher"
LONG = os.environ.get("HEADSPACE_CHAOS", "").lower() == "long"
POLL_S = 0.02
T = TypeVar("T")


def pick(short: T, long: T) -> T:
    """A setting: ``short`` in ``just test``, ``long`` under ``HEADSPACE_CHAOS=long``."""
    return long if LONG else short


def make_rng(name: str) -> tuple[random.Random, int]:
    env = os.environ.get("HEADSPACE_CHAOS_SEED")
    seed = int(env) if env else random.SystemRandom().randrange(1 << 32)
    print(f"[chaos] {name}: seed {seed} ({'long' if LONG else 'short'} settings)")
    return random.Random(seed), seed


def wait_for(
    predicate: Callable[[], T],
    what: str,
    *,
    timeout: float = 30.0,
    details: Callable[[], str] | None = None,
) -> T:
    """``watcher_helpers.wait_for`` with the chaos suite's longer default deadline."""
    return _wait_for(predicate, what, timeout=timeout, details=details)


# ---------------------------------------------------------------------- configuration

BASE_CONFIG: dict[str, Any] = {
    "database": {"connect_timeout_seconds": 2},
    "file_watcher": {
        "mode": "all",
        "inactivity_timeout": 30 * 24 * 3600,
        "max_line_bytes": 64 * 1024,
        "read_chunk_bytes": 16 * 1024,
        "batch_max_lines": 50,
        "batch_max_bytes": 256 * 1024,
    },
    "event_system": {
        "write_retry_attempts": 2,
        "write_retry_delay_ms": 20,
        "max_restarts_per_minute": 5,
        "shutdown_timeout_seconds": 2,
    },
    "health": {"heartbeat_interval_seconds": 1},
    "logging": {"level": "INFO"},
}


@dataclass
class Watcher:
    """One ``headspace-watcher run`` process."""

    popen: subprocess.Popen[bytes]
    log_path: Path
    log_offset: int
    started: float

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self, limit: int = 8000) -> str:
        with contextlib.suppress(OSError), open(self.log_path, "rb") as f:
            f.seek(self.log_offset)
            return f.read().decode("utf-8", "replace")[-limit:]
        return ""

    def kill9(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def term(self, timeout: float = 10.0) -> tuple[int, float]:
        """SIGTERM; return (exit code, seconds from the signal to the exit)."""
        t0 = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise AssertionError(f"watcher ignored SIGTERM for {timeout}s:\n{self.log()}") from None
        return code, time.monotonic() - t0


@dataclass
class ChaosEnv:
    """A projects tree, a state dir, a config file and a database for one test."""

    tmp: Path
    database_url: str
    engine: Engine
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    watchers: list[Watcher] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tmp = self.tmp.resolve()
        self.root = self.tmp / "projects"
        self.root.mkdir(exist_ok=True)
        self.state_dir = self.tmp / "state"
        self.config_path = self.tmp / "config.yaml"
        self.log_path = self.tmp / "watcher.log"
        self.configure()

    def configure(self, **sections: dict[str, Any]) -> None:
        for key, value in sections.items():
            self.overrides[key] = {**self.overrides.get(key, {}), **value}
        merged = {k: {**v, **self.overrides.get(k, {})} for k, v in BASE_CONFIG.items()}
        self.config_path.write_text(yaml.safe_dump(merged))

    @property
    def fw(self) -> dict[str, Any]:
        return {**BASE_CONFIG["file_watcher"], **self.overrides.get("file_watcher", {})}

    @property
    def max_line(self) -> int:
        return int(self.fw["max_line_bytes"])

    @property
    def shutdown_timeout(self) -> float:
        es = {**BASE_CONFIG["event_system"], **self.overrides.get("event_system", {})}
        return float(es["shutdown_timeout_seconds"])

    def env_vars(self, state_dir: Path | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HEADSPACE_")}
        env.update(
            HEADSPACE_CONFIG=str(self.config_path),
            HEADSPACE_DATABASE_URL=self.database_url,
            HEADSPACE_PROJECTS_PATH=str(self.root),
            HEADSPACE_STATE_DIR=str(state_dir or self.state_dir),
        )
        return env

    @staticmethod
    def command() -> list[str]:
        if CONSOLE_SCRIPT.exists():
            return [str(CONSOLE_SCRIPT)]
        return [sys.executable, "-m", "headspace_watcher.cli"]

    def start(self, state_dir: Path | None = None, log_path: Path | None = None) -> Watcher:
        log_path = log_path or self.log_path
        with open(log_path, "ab") as log:
            log.write(f"===== start {len(self.watchers)} =====\n".encode())
            log.flush()
            offset = log.tell()
            popen = subprocess.Popen(
                [*self.command(), "run"],
                env=self.env_vars(state_dir),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmp,
            )
        w = Watcher(popen, log_path, offset, time.monotonic())
        self.watchers.append(w)
        return w

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.command(), *args],
            env=self.env_vars(),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.tmp,
            check=False,
        )

    def status(self) -> tuple[int, dict[str, Any]]:
        res = self.cli("status", "--json")
        try:
            return res.returncode, json.loads(res.stdout)
        except ValueError:
            raise AssertionError(
                f"status --json printed no JSON: {res.stdout!r} {res.stderr!r}"
            ) from None

    def status_file(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.state_dir / "status.json").read_text())
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        for w in self.watchers:
            if w.alive():
                with contextlib.suppress(Exception):
                    w.term(timeout=5)
            if w.alive():
                w.kill9()

    # ------------------------------------------------------------------ database
    def committed(self) -> int:
        """Sum of every source's checkpoint: grows as the service commits."""
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT coalesce(sum(committed_offset), 0) FROM sources")
                ).scalar()
            )

    def checkpoints(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(text("SELECT path, committed_offset FROM sources")).all()
        return {r.path: int(r.committed_offset) for r in rows}

    def caught_up(self, files: dict[Path, bytes] | None = None) -> bool:
        """Every file's checkpoint is at its complete length (files as on disk now)."""
        from invariants import complete_length, transcript_files

        cps = self.checkpoints()
        contents = (
            files if files is not None else {p: p.read_bytes() for p in transcript_files(self.root)}
        )
        return all(cps.get(str(p), 0) == complete_length(d) for p, d in contents.items())

    def lag(self) -> int:
        from invariants import complete_length, transcript_files

        cps = self.checkpoints()
        return sum(
            max(0, complete_length(p.read_bytes()) - cps.get(str(p), 0))
            for p in transcript_files(self.root)
        )

    def wait_caught_up(
        self, watcher: Watcher | None, timeout: float = 60.0, files: dict[Path, bytes] | None = None
    ) -> None:
        def done() -> bool:
            if watcher is not None and not watcher.alive():
                raise AssertionError(
                    f"watcher exited with {watcher.popen.returncode}:\n{watcher.log()}"
                )
            # caught up, and by this watcher: with nothing left to do it must still have come
            # up (its handlers in place) before a test stops it
            ready = watcher is None or "database reachable" in watcher.log(limit=1 << 30)
            return ready and self.caught_up(files)

        wait_for(
            done,
            "the watcher to catch up",
            timeout=timeout,
            details=lambda: watcher.log() if watcher else "",
        )
