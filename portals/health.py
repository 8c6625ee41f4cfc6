"""Whether the parts the product needs answer: the database and the Celery broker.

One check for `/healthz` (load balancers) and `/api/health/` (staff), so both say the same.
"""

from __future__ import annotations

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


def check() -> Health:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        db_ok, db = True, connection.vendor
    except Exception as exc:  # any database failure means "not ready"
        db_ok, db = False, f"{connection.vendor}: {type(exc).__name__}"
    broker_ok, broker = _broker()
    return Health(ok=db_ok and broker_ok, database=db, broker=broker)
