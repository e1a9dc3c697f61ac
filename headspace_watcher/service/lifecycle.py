"""The process's lifecycle around the loop: stop signals, the shutdown deadline, memory.

Why a deadline: circus (and systemd) give the service ``shutdown_timeout_seconds`` after
SIGTERM before they kill it. The loop stops between batches on its own; a batch that would
overrun is interrupted by SIGALRM (``ShutdownDeadline``) and rolled back — its bytes are
read again at the next start, so exiting in time never loses or doubles a line.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


class ShutdownDeadline(BaseException):
    """Raised in the main thread when a graceful stop overruns its time budget."""


class StopSignals:
    """SIGTERM/SIGINT set ``stopping`` and arm the deadline; a pipe wakes the loop's poll."""

    def __init__(self, budget_seconds: float) -> None:
        self.budget = budget_seconds
        self.stopping = False
        self.wakeup_r, self.wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def install(self, early_signal: list[int] | None = None) -> None:
        """``early_signal``: stop signals caught before this object existed (start-up)."""
        signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGALRM, self._on_deadline)
        if early_signal:
            self._on_stop(early_signal[0], None)

    def drain_wakeups(self) -> None:
        with contextlib.suppress(OSError):
            os.read(self.wakeup_r, 512)

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info("received %s; stopping", signal.Signals(signum).name)
        signal.setitimer(signal.ITIMER_REAL, max(0.2, self.budget - 0.5))

    def _on_deadline(self, _signum: int, _frame: FrameType | None) -> None:
        if self.stopping:
            raise ShutdownDeadline()

    def close(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)
        for fd in (self.wakeup_r, self.wakeup_w):
            with contextlib.suppress(OSError):
                os.close(fd)


_MALLOC_TRIM: Any = None


def release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    glibc keeps what a backlog's batches freed (its trim threshold grows with the largest
    buffers seen), ~10 MB after a catch-up that the idle service would otherwise hold forever.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 128 * 1024
ENV_MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"


def fix_mmap_threshold() -> bool:
    """Keep glibc's mmap threshold at 128 KiB (its initial value) for good; True if set.

    glibc raises the threshold to the size of every mmapped block freed (up to 32 MiB), so
    after one big line or COPY buffer every later buffer of that size comes from the heap,
    where freed pages stay resident between batches. Fixed, a batch's large buffers go back
    to the OS when freed: the catch-up's peak is lower, and so is the idle service's RSS. An
    explicit ``MALLOC_MMAP_THRESHOLD_`` in the environment is left as the operator set it.
    """
    if os.environ.get(ENV_MMAP_THRESHOLD):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
