"""Whether the parts the product needs answer: the database (or, while it is away, the spool that keeps
deliveries for it), the Celery broker, and token keys that can decrypt what is stored.

One check for `/healthz` (load balancers), `/api/health/` (staff) and the system check
(`portals.checks`), so all say the same.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import redis
from cryptography.fernet import InvalidToken
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, connection

from . import crypto, outage, spool
from .models import TokenPair


@dataclass(frozen=True)
class Health:
    ok: bool
    database: str  # the vendor, or "vendor: ErrorName" when it did not answer
    broker: str  # "redis" / "filesystem", or "redis: ErrorName"
    keys: str = "ok"  # or what is wrong with BITRIX24_TOKEN_KEYS
    spool: str = ""  # where deliveries are kept while the database is away ("redis", "disk"), "" nowhere
    database_ok: bool = True


def sample_ciphertext() -> str | None:
    """One stored token as it is in the database (the newest pair's refresh token), or None when there
    is none or the table cannot be read (no database, not migrated: not a key problem)."""
    table = connection.ops.quote_name(TokenPair._meta.db_table)
    column = connection.ops.quote_name(TokenPair._meta.get_field("refresh_token").column)
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT {column} FROM {table} WHERE {column} <> '' ORDER BY id DESC LIMIT 1")  # noqa: S608
            row = cursor.fetchone()
    except DatabaseError:
        return None
    return row[0] if row else None


def keys_problem(sample: str | None) -> str:
    """What is wrong with BITRIX24_TOKEN_KEYS ("" when nothing): malformed, or unable to decrypt
    `sample`, a stored token."""
    try:
        fernet = crypto.fernet()
    except ImproperlyConfigured as exc:
        return str(exc)
    if sample:
        try:
            fernet.decrypt(sample.encode())
        except InvalidToken:
            return (
                "BITRIX24_TOKEN_KEYS cannot decrypt the stored tokens: was a key removed before "
                "`manage.py rotate_token_keys` re-encrypted the rows?"
            )
    return ""


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
_pending: Future[tuple[bool, str, str | None]] | None = None
_pending_lock = threading.Lock()


def _ask_database() -> tuple[bool, str, str | None]:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        # In the same thread, so the wait below bounds it too.
        sample = sample_ciphertext()
        outage.database_answered()  # a probe that reached it ends this process's outage at once
        return True, connection.vendor, sample
    except Exception as exc:  # any database failure means "not ready"
        outage.database_failed()
        # A broken connection is not reused by the next check; closing what broke may fail too.
        with contextlib.suppress(Exception):
            connection.close()
        return False, f"{connection.vendor}: {type(exc).__name__}", None


def _database() -> tuple[bool, str, str | None]:
    global _pending
    with _pending_lock:
        if _pending is not None and not _pending.done():
            # The previous check still hangs: one stuck thread is enough.
            return False, f"{connection.vendor}: no answer", None
        _pending = future = _asker.submit(_ask_database)
    try:
        return future.result(timeout=DATABASE_WAIT)
    except FutureTimeout:
        return False, f"{connection.vendor}: no answer within {DATABASE_WAIT:.0f} s", None


def check() -> Health:
    db_ok, db, sample = _database()
    broker_ok, broker = _broker()
    # Keys that cannot read the tokens make every renewal and every staff page about tokens fail: the
    # process must not be sent traffic as if it worked.
    problem = keys_problem(sample)
    # Ready while events can be taken: by the database, or while it is away by the spool (portals.spool);
    # a process that can do neither must not be sent deliveries Bitrix24 will not send again.
    kept = spool.can_take() if not db_ok else ""
    return Health(
        ok=(db_ok or bool(kept)) and broker_ok and not problem,
        database=db,
        broker=broker,
        keys=problem or "ok",
        spool=kept,
        database_ok=db_ok,
    )


def connection_vendor() -> str:
    """What `Health.database` says when the database answered."""
    return connection.vendor
