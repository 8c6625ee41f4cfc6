"""The portal list's token-health filter: the same sets of portals as `portals.selectors` counts."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from portals import selectors
from portals.models import Portal


class TokenHealthFilter(admin.SimpleListFilter):
    title = "token health"
    parameter_name = "health"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [
            ("due_soon", "Due soon (in the renewal window)"),
            ("lapsing", "Lapsing within 2 days"),
            ("failing", "Failing renewals"),
            ("no_pair", "No usable token pair"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Portal]) -> QuerySet[Portal] | None:
        value = self.value()
        if value == "due_soon":
            return selectors.due_soon(queryset)
        if value == "lapsing":
            return selectors.lapsing(queryset)
        if value == "failing":
            return selectors.failing(queryset)
        if value == "no_pair":
            return selectors.without_usable_pair(queryset)
        return queryset
