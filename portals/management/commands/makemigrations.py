"""Django's makemigrations, without the token-key check (portals.checks).

Migrations do not depend on BITRIX24_TOKEN_KEYS: a deploy (or CI) checking its migrations with keys
that are not the production ones must not fail on them. Every other system check still runs.
"""

from __future__ import annotations

from collections.abc import Sequence

from django.apps import AppConfig
from django.core import checks
from django.core.management.commands import makemigrations

from portals.checks import TAG


class Command(makemigrations.Command):
    def check(
        self,
        app_configs: Sequence[AppConfig] | None = None,
        tags: Sequence[str] | None = None,
        display_num_errors: bool = False,
        include_deployment_checks: bool = False,
        fail_level: int = checks.ERROR,
        databases: Sequence[str] | None = None,
    ) -> None:
        if tags is None:
            tags = [tag for tag in checks.registry.registry.tags_available() if tag != TAG]
        super().check(app_configs, tags, display_num_errors, include_deployment_checks, fail_level, databases)
