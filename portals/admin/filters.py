"""The portal list's token-health filter: the same sets of portals as `portals.selectors` counts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from portals import selectors
from portals.models import Portal


@dataclass(frozen=True)
class Health:
    """One token-health set of portals, as the list filters it and the dashboard counts it."""

    key: str  # its key in selectors.health_counts
    value: str  # ?health=… in the portal list's URL
    filter_label: str
    card_label: str
    select: Callable[[QuerySet[Portal]], QuerySet[Portal]]


HEALTH = (
    Health(
        "due_soon",
        "due_soon",
        "Due soon (in the renewal window)",
        "due soon (renewal window)",
        selectors.due_soon,
    ),
    Health("lapsing", "lapsing", "Lapsing within 2 days", "lapsing within 2 days", selectors.lapsing),
    Health("failing", "failing", "Failing renewals", "failing renewals", selectors.failing),
    Health(
        "no_usable_pair",
        "no_pair",
        "No usable token pair",
        "without a usable token pair",
        selectors.without_usable_pair,
    ),
    Health(
        "lost",
        "lost",
        "Lost in an interrupted renewal",
        "lost in an interrupted renewal",
        selectors.lost,
    ),
    Health(
        "clock_skew",
        "clock_skew",
        "Refresh issued in the future (clock skew)",
        "with a refresh time in the future",
        selectors.clock_skewed,
    ),
)


class TokenHealthFilter(admin.SimpleListFilter):
    title = "token health"
    parameter_name = "health"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(health.value, health.filter_label) for health in HEALTH]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Portal]) -> QuerySet[Portal] | None:
        value = self.value()
        for health in HEALTH:
            if value == health.value:
                return health.select(queryset)
        return queryset
