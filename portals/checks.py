"""System checks: `manage.py check`, `runserver` and `migrate` refuse token keys that do not work.

A malformed BITRIX24_TOKEN_KEYS, or keys that cannot decrypt a stored token, would otherwise start the
server and fail on the first renewal. Registered under its own tag, which `makemigrations` leaves out
(portals/management/commands/makemigrations.py): migrations do not depend on the keys.
"""

from __future__ import annotations

from typing import Any

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
