"""The clock that waits: backoffs between attempts, the rate governor's buckets and its waits, the sweep's
time budget all read and sleep on it, so a test can put a clock of its own in its place
(`using(FakeClock())`): retries then happen at once while every figure stays what it would have been.

Real time stays where it is the point: timeouts on sockets, leases other processes read from the
database, waits for another process or thread to finish.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Clock:
    """Real time."""

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class FakeClock(Clock):
    """Time that moves only when somebody sleeps on it (or `advance` is called); `slept` lists the sleeps."""

    def __init__(self, start: float = 1_000.0, on_sleep: Callable[[float], None] | None = None) -> None:
        self._now = start
        self._lock = threading.Lock()
        self.slept: list[float] = []
        # Called after each sleep, with the seconds slept: what "meanwhile" happens in a test.
        self.on_sleep = on_sleep

    def monotonic(self) -> float:
        with self._lock:
            return self._now

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)
        with self._lock:
            self.slept.append(seconds)
        if self.on_sleep is not None:
            self.on_sleep(seconds)

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += max(0.0, seconds)


def backoff(attempt: int, *, base: float, cap: float) -> float:
    """Seconds to wait before try `attempt` + 1 after `attempt` failures: base, 2·base, 4·base … at most cap.
    The one doubling rule of the product: between attempts of a call (portals.http.Backoff adds jitter),
    and for work deferred to a later time (a failing renewal, a wanted action, an app event's handler)."""
    return min(cap, base * 2 ** max(attempt - 1, 0))


_current: Clock = Clock()


def monotonic() -> float:
    return _current.monotonic()


def sleep(seconds: float) -> None:
    _current.sleep(seconds)


@contextmanager
def using(clock: Clock) -> Iterator[Clock]:
    """Every wait of the product goes to `clock` inside the block (all threads: it is process-wide)."""
    global _current
    previous, _current = _current, clock
    try:
        yield clock
    finally:
        _current = previous
