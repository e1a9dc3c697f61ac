"""Retry policy: exponential backoff with jitter, and the transient/permanent split.

Kept apart from the writer so the service's capped reconnect loop and the writer's
per-write retries share one definition of "transient".
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg
from sqlalchemy import exc as sa_exc

# SQLSTATE classes/codes worth retrying: connection exceptions, serialization failure,
# deadlock, server shutting down / restarting, insufficient resources (class 53: disk full,
# out of memory, too many connections), lock timeouts, and a database set read-only
# (25006: an operator's or a failover's doing, undone the same way; the rows are fine).
_TRANSIENT_CODES = {"25006", "40001", "40P01", "55P03", "57P01", "57P02", "57P03", "57014"}
_TRANSIENT_CLASSES = ("08", "53", "58")


@dataclass(slots=True)
class RetryPolicy:
    """``attempts`` retries after the first try; delay ``base * 2**i`` plus jitter."""

    attempts: int = 3
    base_delay: float = 0.1
    max_delay: float = 5.0
    rng: random.Random = field(default_factory=random.Random)

    def delays(self) -> Iterator[float]:
        for i in range(self.attempts):
            yield min(self.max_delay, self.base_delay * (2**i)) + self.rng.uniform(
                0, self.base_delay
            )

    def capped(self, failures: int) -> float:
        """Delay before the service's next try after ``failures`` failed rounds."""
        exp = min(failures, 16)
        return min(self.max_delay, self.base_delay * (2**exp)) + self.rng.uniform(
            0, self.base_delay
        )


def sqlstate(error: BaseException) -> str | None:
    orig = getattr(error, "orig", error)
    return getattr(orig, "sqlstate", None)


def is_transient(error: BaseException) -> bool:
    """True when the same write may succeed later (server down, connection lost, conflict)."""
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    code = sqlstate(error)
    if code is not None:
        return code in _TRANSIENT_CODES or code.startswith(_TRANSIENT_CLASSES)
    orig = getattr(error, "orig", error)
    if isinstance(orig, psycopg.OperationalError | psycopg.InterfaceError):
        return True
    return isinstance(
        error, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError | OSError
    )


def describe(error: BaseException) -> str:
    """SQLSTATE, error class and the message's first line: what a log line or a rejection's
    reason may show (never the statement or its parameters, which hold transcript text)."""
    orig = getattr(error, "orig", None) or error
    first = str(orig).strip().splitlines()
    code = sqlstate(error)
    prefix = f"{code} " if code else ""
    return f"{prefix}{type(orig).__name__}: {first[0] if first else ''}"[:500]
