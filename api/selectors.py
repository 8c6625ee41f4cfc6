"""The API's reads, composed from `portals.selectors` (the same token-health annotations and filters
the admin uses, so "failing" means the same set of portals on every staff screen)."""

from __future__ import annotations

from django.db.models import Prefetch, Q, QuerySet

from portals import selectors as portal_selectors
from portals.models import PairState, Portal, PortalState, RenewalLog, TokenPair

RECENT_RENEWALS = 20


def portal_list(*, state: str = "", due: bool = False, failing: bool = False) -> QuerySet[Portal]:
    """Portals with their background pair's health, filtered; one query whatever the page size.

    `due`: a pair of the portal is due for proactive renewal now (what the next beat sweep takes,
    `portals.selectors.due_pairs`). `failing`: the background pair's last renewal failed or the OAuth
    server refused it for good (`portals.selectors.failing`).
    """
    queryset: QuerySet[Portal] = Portal.objects.all()
    if state:
        queryset = queryset.filter(state=state)
    if due:
        queryset = queryset.filter(pk__in=portal_selectors.due_pairs().values("portal_id"))
    if failing:
        queryset = portal_selectors.failing(queryset)
    return portal_selectors.with_token_health(queryset).order_by("domain", "pk")


def portal_detail() -> QuerySet[Portal]:
    """Portals with their pairs (background first) and their last renewal attempts: three queries."""
    return portal_selectors.with_token_health(Portal.objects.all()).prefetch_related(
        Prefetch("token_pairs", queryset=TokenPair.objects.order_by("-is_background", "user_id", "pk")),
        Prefetch(
            "renewals",
            queryset=RenewalLog.objects.order_by("-created_at", "-pk")[:RECENT_RENEWALS],
            to_attr="recent_renewals",
        ),
    )


def pair_counts() -> dict[str, int]:
    """Pairs of portals that are not uninstalled: failing (a renewal failed in a row, or not active)
    and due for proactive renewal now."""
    live = TokenPair.objects.exclude(portal__state=PortalState.UNINSTALLED)
    return {
        "total": live.count(),
        "failing": live.filter(Q(consecutive_failures__gt=0) | ~Q(state=PairState.ACTIVE)).count(),
        "due": portal_selectors.due_pairs().count(),
    }
