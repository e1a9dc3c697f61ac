"""Retrying: jittered exponential delays, and a reconnect loop that backs off in an outage.

The policy is checked with a seeded rng; the backoff against a real ``headspace-watcher
run`` whose database is a local listener that accepts and drops every connection, so each
reconnect attempt is counted where it arrives.
"""

from __future__ import annotations

import itertools
import random
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from watcher_helpers import WatcherEnv, wait_for

from headspace_watcher.store.retry import RetryPolicy

BASE, CAP = 0.1, 5.0


def policy(seed: int = 7, attempts: int = 8) -> RetryPolicy:
    return RetryPolicy(attempts, BASE, CAP, rng=random.Random(seed))


def test_write_retry_delays_are_exponential_plus_jitter_below_base() -> None:
    delays = list(policy().delays())

    exponential = [min(CAP, BASE * 2**i) for i in range(8)]
    jitters = [d - e for d, e in zip(delays, exponential, strict=True)]
    assert len(delays) == 8
    assert all(0 <= j < BASE for j in jitters), jitters
    assert len({round(j, 9) for j in jitters}) == 8  # spread, not one constant offset
    assert list(policy(seed=7).delays()) == delays  # the rng decides, nothing else
    assert list(policy(seed=8).delays()) != delays


def test_reconnect_delay_doubles_per_failure_up_to_the_cap_with_jitter() -> None:
    p = policy()
    delays = [p.capped(n) for n in range(1, 12)]

    exponential = [min(CAP, BASE * 2**n) for n in range(1, 12)]
    jitters = [d - e for d, e in zip(delays, exponential, strict=True)]
    assert all(0 <= j < BASE for j in jitters), jitters
    assert len({round(j, 9) for j in jitters}) == len(jitters)
    assert max(delays) < CAP + BASE  # capped: an outage of hours retries every ~5 s


class DroppingListener:
    """A TCP port that accepts each connection and closes it at once (a dead server that
    still answers SYN), recording when each attempt arrived."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.arrivals: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.arrivals.append(time.monotonic())
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def dropping_listener() -> Iterator[DroppingListener]:
    listener = DroppingListener()
    try:
        yield listener
    finally:
        listener.close()


def test_reconnects_during_an_outage_grow_sparser(
    watcher: WatcherEnv, dropping_listener: DroppingListener
) -> None:
    """Base delay 20 ms (the test config): a hot loop would connect hundreds of times in the
    window; the capped exponential backoff only about ten (20 ms · 2ⁿ, ~5 s apart at last)."""
    url = f"postgresql+psycopg://nobody@127.0.0.1:{dropping_listener.port}/none"
    proc = watcher.start(ready=False, HEADSPACE_DATABASE_URL=url)
    wait_for(
        lambda: (proc.status_file() or {}).get("state") == "degraded",
        "the service to report degraded",
        details=proc.log,
    )
    first = wait_for(lambda: dropping_listener.arrivals[:1], "a first connection attempt")[0]
    # A positive signal ends the window: enough attempts that the last gaps are long ones.
    wait_for(
        lambda: (
            len(dropping_listener.arrivals) >= 2 and dropping_listener.arrivals[-1] - first > 2.5
        ),
        "attempts spread over more than 2.5 s",
        timeout=30,
        details=proc.log,
    )
    arrivals = list(dropping_listener.arrivals)
    assert proc.popen.poll() is None, proc.log()
    assert proc.stop() == 0

    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    window = [t for t in arrivals if t - first <= 2.5]
    assert len(window) < 20, f"{len(window)} connection attempts in 2.5 s: a hot loop"
    # Load can only lengthen a gap, never shorten the delay the service waited.
    assert gaps[-1] >= 1.0, f"the last gap did not grow: {gaps}"  # 1.28 s after 6 failures
    assert gaps[-1] > 4 * gaps[0], gaps
