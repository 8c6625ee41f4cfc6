"""Whether the parts the product needs answer: the database and the Celery broker.

One check for `/healthz` (load balancers) and `/api/health/` (staff), so both say the same.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import redis
from django.conf import settings
from django.db import connection


@dataclass(frozen=True)
class Health:
    ok: bool
    database: str  # the vendor, or "vendor: ErrorName" when it did not answer
    broker: str  # "redis" / "filesystem", or "redis: ErrorName"


def _broker() -> tuple[bool, str]:
    if settings.REDIS_URL:
        try:
            with redis.Redis.from_url(
                settings.REDIS_URL, socket_connect_timeout=2, socket_timeout=2
            ) as client:
                client.ping()
        except redis.RedisError as exc:
            return False, f"redis: {type(exc).__name__}"
        return True, "redis"
    folder = settings.CELERY_FS_BROKER_DIR / "out"
    return folder.is_dir(), "filesystem"


# The database is asked from one thread of its own, waited for at most this long: a database host that
# accepts connections and never answers must make the check fail, not hang the request (and the load
# balancer's probe) for as long as the kernel keeps the connection.
DATABASE_WAIT = 3.0
_asker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="health-db")
_pending: Future[tuple[bool, str]] | None = None
_pending_lock = threading.Lock()


def _ask_database() -> tuple[bool, str]:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True, connection.vendor
    except Exception as exc:  # any database failure means "not ready"
        # A broken connection is not reused by the next check; closing what broke may fail too.
        with contextlib.suppress(Exception):
            connection.close()
        return False, f"{connection.vendor}: {type(exc).__name__}"


def _database() -> tuple[bool, str]:
    global _pending
    with _pending_lock:
        if _pending is not None and not _pending.done():
            # The previous check still hangs: one stuck thread is enough.
            return False, f"{connection.vendor}: no answer"
        _pending = future = _asker.submit(_ask_database)
    try:
        return future.result(timeout=DATABASE_WAIT)
    except FutureTimeout:
        return False, f"{connection.vendor}: no answer within {DATABASE_WAIT:.0f} s"


def check() -> Health:
    db_ok, db = _database()
    broker_ok, broker = _broker()
    return Health(ok=db_ok and broker_ok, database=db, broker=broker)
