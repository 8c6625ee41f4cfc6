"""Whether this process saw the database fail a moment ago, so that the requests that can do without it
(events, kept in the spool; launches and installs, refused with 503) do not each wait for it first.

A database host that does not answer costs a request `DATABASE_CONNECT_TIMEOUT` seconds (5) before it
is known to be away. Paid by every event of a flood, that is a few events a second per process while
Bitrix24's queue server gives up on slow handlers. After a failure the next `RETRY_SECONDS` go without
asking; the first request after them asks again (one waits, once a window, per process), and its success
ends the outage here. Per process, in memory: nothing to reach while things are failing.
"""

from __future__ import annotations

import threading

from django.db import connection

from . import clock

__all__ = ["RETRY_SECONDS", "database_answered", "database_failed", "failed_if_lost", "skip_database"]

RETRY_SECONDS = 10.0

_lock = threading.Lock()
_skip_until = 0.0


def database_failed() -> None:
    """The database could not be reached or dropped the connection: skip it for a while."""
    global _skip_until
    with _lock:
        _skip_until = clock.monotonic() + RETRY_SECONDS


def failed_if_lost() -> None:
    """After a database error: skip the database only if the connection is gone (never made, or broken).
    A deadlock, a serialization failure or a lock timeout is an OperationalError too, on a database that
    answers: one of those must not send a process's launches to 503 for the window."""
    raw = connection.connection
    if raw is None or getattr(raw, "broken", False) or getattr(raw, "closed", False):
        database_failed()


def database_answered() -> None:
    global _skip_until
    if not _skip_until:  # every request that reached the database calls this: no lock when nothing to end
        return
    with _lock:
        _skip_until = 0.0


def skip_database() -> bool:
    """True while a failure of the database is recent enough not to ask it again."""
    with _lock:
        return clock.monotonic() < _skip_until
