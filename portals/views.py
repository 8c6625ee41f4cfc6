from __future__ import annotations

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse


def _broker_ok() -> tuple[bool, str]:
    if settings.REDIS_URL:
        import redis

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


def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness and readiness: the database answers and the broker is reachable."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        db_ok, db = True, connection.vendor
    except Exception as exc:  # any database failure means "not ready"
        db_ok, db = False, f"{connection.vendor}: {type(exc).__name__}"
    broker_ok, broker = _broker_ok()
    ok = db_ok and broker_ok
    return JsonResponse(
        {"status": "ok" if ok else "unavailable", "database": db, "broker": broker}, status=200 if ok else 503
    )
