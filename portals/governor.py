"""A per-portal rate governor shared by every process of the app.

Bitrix24 limits REST calls per portal with a leaky bucket (2 requests/s drain, burst 50; Enterprise
5/s, 250). Every web process and worker of the app shares that bucket, so the governor lives in
Redis when REDIS_URL is set: a GCRA (generic cell rate algorithm, the leaky bucket as a "theoretical
arrival time") in one Lua script, timed by Redis's own clock so that machines with skewed clocks
agree. Each caller reserves its slot and is told how long to wait; nobody polls.

Without Redis the same algorithm runs in-process: right for one process, which is what the embedded
setup runs; docs/calling-bitrix24.md says so.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import redis
from django.conf import settings

from . import clock, metrics
from .errors import PortalBusy

logger = logging.getLogger(__name__)

# KEYS[1] = bucket key. ARGV = emission interval (s), burst tolerance (s), seconds the key outlives
# the last reserved slot, the longest the caller may wait (negative: any).
# Returns the seconds to wait before sending, as a string (Lua numbers become integers otherwise); a
# negative number when that wait is longer than the caller may wait: then nothing is reserved.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait < 0 then wait = 0 end
local most = tonumber(ARGV[4])
if most >= 0 and wait > most then return tostring(-wait) end
-- The key lives until the last reserved slot is past, plus a margin: a backlog longer than
-- that must not expire and let a fresh burst through.
redis.call('SET', KEYS[1], tostring(tat + interval), 'EX', math.ceil(tat + interval - now) + tonumber(ARGV[3]))
return tostring(wait)
"""

# After QUERY_LIMIT_EXCEEDED the portal's bucket is full whatever we thought: push the theoretical
# arrival time so that every process waits for it to drain.
_FILL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local full = now + tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < full then redis.call('SET', KEYS[1], tostring(full), 'EX', math.ceil(full - now) + tonumber(ARGV[2])) end
return 1
"""


@dataclass(frozen=True)
class Limit:
    rate: float  # requests per second the bucket drains
    burst: int  # requests the bucket holds

    def governed(self) -> tuple[float, float]:
        """(emission interval, burst tolerance) with a safety margin: requests reach Bitrix24 a few
        milliseconds apart from when they were scheduled, so the governor keeps a little headroom."""
        rate = self.rate * 0.99
        burst = max(1, self.burst - 3)
        interval = 1.0 / rate
        return interval, (burst - 1) * interval


# The longest a call may wait for its slot here (None: as long as it takes). Work that has other work
# to do meanwhile (the app's event handlers) sets it: past it the call raises PortalBusy instead of
# sleeping in its worker while every other portal's work waits (`waiting_at_most`).
_most_wait: ContextVar[float | None] = ContextVar("governor_most_wait", default=None)


@contextmanager
def waiting_at_most(seconds: float) -> Iterator[None]:
    """Calls made inside wait at most `seconds` for their portal's rate limit, else raise PortalBusy."""
    token = _most_wait.set(seconds)
    try:
        yield
    finally:
        _most_wait.reset(token)


class Governor:
    def reserve(self, key: str, limit: Limit, most: float = -1.0) -> float:
        """Reserve the next slot for `key`; returns the seconds to wait before sending. When that is
        longer than `most` (if not negative), reserves nothing and returns minus the wait."""
        raise NotImplementedError

    def fill(self, key: str, limit: Limit) -> None:
        """The server said the bucket is full: make every caller wait for it to drain."""
        raise NotImplementedError

    def acquire(self, key: str, limit: Limit) -> float:
        most = _most_wait.get()
        wait = self.reserve(key, limit, -1.0 if most is None else most)
        if wait < 0:
            raise PortalBusy(f"the portal's rate limit has no slot for {-wait:.1f} s", wait=-wait)
        if wait > 0:
            metrics.governor_waited(wait)
            clock.sleep(wait)
        return wait


class RedisGovernor(Governor):
    """The shared bucket in Redis. While Redis cannot be reached, each process falls back to its own
    bucket at a fraction of the portal's limit (several processes together then still stay under it),
    and asks Redis again after a pause instead of on every call."""

    FALLBACK_SHARE = 0.25  # of the rate and the burst, per process, while Redis is away
    RETRY_AFTER = 10.0  # seconds between attempts to reach Redis again

    def __init__(self, url: str) -> None:
        # Short timeouts: a hung Redis must cost a call a second at most, not the default minutes.
        self.client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        # Closed while the interpreter still works, not from __del__ during its shutdown.
        atexit.register(self.client.close)
        self._gcra = self.client.register_script(_GCRA)
        self._fill = self.client.register_script(_FILL)
        self._local = LocalGovernor()
        self._down_until = 0.0

    def _fallback(self, limit: Limit) -> Limit:
        return Limit(
            rate=limit.rate * self.FALLBACK_SHARE, burst=max(1, int(limit.burst * self.FALLBACK_SHARE))
        )

    def _away(self, exc: redis.RedisError) -> None:
        if clock.monotonic() >= self._down_until:
            logger.warning(
                "Rate governor: Redis unavailable (%s); each process keeps %d%% of the portal limits",
                type(exc).__name__,
                int(self.FALLBACK_SHARE * 100),
            )
        self._down_until = clock.monotonic() + self.RETRY_AFTER

    def reserve(self, key: str, limit: Limit, most: float = -1.0) -> float:
        if clock.monotonic() >= self._down_until:
            interval, tolerance = limit.governed()
            try:
                return float(self._gcra(keys=[key], args=[interval, tolerance, 60, most]))
            except redis.RedisError as exc:
                self._away(exc)
        return self._local.reserve(key, self._fallback(limit), most)

    def fill(self, key: str, limit: Limit) -> None:
        self._local.fill(key, self._fallback(limit))
        if clock.monotonic() < self._down_until:
            return
        interval, tolerance = limit.governed()
        try:
            self._fill(keys=[key], args=[tolerance + interval, 60])
        except redis.RedisError as exc:
            self._away(exc)


class LocalGovernor(Governor):
    """The same algorithm in one process (no Redis): correct only within that process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tat: dict[str, float] = {}

    def reserve(self, key: str, limit: Limit, most: float = -1.0) -> float:
        interval, tolerance = limit.governed()
        with self._lock:
            now = clock.monotonic()
            tat = max(self._tat.get(key, 0.0), now)
            wait = max(0.0, tat - tolerance - now)
            if 0 <= most < wait:
                return -wait
            self._tat[key] = tat + interval
            return wait

    def fill(self, key: str, limit: Limit) -> None:
        interval, tolerance = limit.governed()
        with self._lock:
            full = clock.monotonic() + tolerance + interval
            self._tat[key] = max(self._tat.get(key, 0.0), full)


@lru_cache(maxsize=4)
def _governor(redis_url: str) -> Governor:
    return RedisGovernor(redis_url) if redis_url else LocalGovernor()


def governor() -> Governor:
    return _governor(settings.REDIS_URL)


def limit_for(portal: Any) -> Limit:
    """The portal's own limit when staff set one (Enterprise: 5/s, 250), the default otherwise."""
    rate = portal.rate_limit or settings.BITRIX24_RATE_LIMIT
    burst = portal.rate_burst or settings.BITRIX24_RATE_BURST
    return Limit(rate=float(rate), burst=int(burst))


def bucket_key(member_id: str) -> str:
    return f"b24:bucket:{member_id}"
