"""System checks: `manage.py check`, `runserver` and `migrate` refuse token keys that do not work.

A malformed BITRIX24_TOKEN_KEYS, or keys that cannot decrypt a stored token, would otherwise start the
server and fail on the first renewal. Registered under its own tag, which `makemigrations` leaves out
(portals/management/commands/makemigrations.py): migrations do not depend on the keys.
"""

from __future__ import annotations

from typing import Any

import redis
from django.conf import settings
from django.core import checks

from . import health

TAG = "bitrix24_keys"


@checks.register(TAG)
def token_keys(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    # One stored token is sampled (when the database answers and is migrated): keys that are well-formed
    # but not the ones the rows were encrypted with are as fatal as malformed ones.
    problem = health.keys_problem(health.sample_ciphertext())
    if not problem:
        return []
    return [
        checks.Error(
            problem,
            hint="Set BITRIX24_TOKEN_KEYS to comma-separated Fernet keys, the key that encrypted the stored "
            "tokens among them (see docs/tokens.md).",
            id="portals.E001",
        )
    ]


@checks.register(checks.Tags.security, deploy=True)
def redis_keeps_what_it_holds(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """`manage.py check --deploy`: a Redis that keeps nothing on disk, or that evicts keys, loses the broker's
    messages and the renewal copies it holds when it restarts or fills up (the copies are in the fsynced
    file too, on the worker's host; the broker's messages only in Redis)."""
    if not settings.REDIS_URL:
        return []
    try:
        client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
        config: dict[str, Any] = {}
        for name in ("appendonly", "save", "maxmemory-policy"):
            answer: Any = client.config_get(name)
            config.update(answer)
        client.close()
    except redis.RedisError as exc:
        return [
            checks.Warning(
                f"Redis at REDIS_URL could not be asked how it keeps data: {exc}", id="portals.W002"
            )
        ]
    found: list[checks.CheckMessage] = []
    if str(config.get("appendonly", "no")).lower() != "yes" and not str(config.get("save", "")).strip():
        found.append(
            checks.Warning(
                "Redis keeps nothing on disk (appendonly no, no save points): a restart loses the queued tasks "
                "and the renewal copies it holds.",
                hint="Run Redis with `appendonly yes` (compose.yaml does), or at least save points.",
                id="portals.W003",
            )
        )
    policy = str(config.get("maxmemory-policy", "noeviction")).lower()
    if policy != "noeviction":
        found.append(
            checks.Warning(
                f"Redis evicts keys when full (maxmemory-policy {policy}): queued tasks and renewal copies may "
                "vanish.",
                hint="Set maxmemory-policy noeviction for the Redis this backend uses.",
                id="portals.W004",
            )
        )
    return found
