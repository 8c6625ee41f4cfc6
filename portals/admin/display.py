"""How values read in the admin: masked tokens, compact relative times, days left, renewal outcomes,
and the mixin of admins staff only read.

Every helper returns safe HTML (or plain text); none of them queries.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html

from portals import masking, selectors
from portals.models import PairState, RenewalOutcome, TokenPair

from .palette import PALETTE, days_left_colour, outcome_colour


class ReadOnlyMixin:
    """For what staff only read: logs and what Bitrix24 reported. Their lists fit 1,280 px (the stylesheet)."""

    class Media:
        css = {"all": ("portals/admin-lists.css",)}

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class MaskedPairTokensMixin:
    """A token pair's tokens as staff may see them: never in full (see `portals.masking.mask`)."""

    @admin.display(description="access token")
    def masked_access_token(self, obj: TokenPair) -> str:
        return masking.mask(obj.access_token)

    @admin.display(description="refresh token")
    def masked_refresh_token(self, obj: TokenPair) -> str:
        return masking.mask(obj.refresh_token)


def short_time(moment: datetime | None) -> str:
    """A compact relative time for list columns: "in 42m", "3h ago", "12d ago" (full time on hover)."""
    if moment is None:
        return "—"
    seconds = (moment - timezone.now()).total_seconds()
    span = abs(seconds)
    if span < 60:
        return format_html(
            '<span title="{}">now</span>', timezone.localtime(moment).strftime("%Y-%m-%d %H:%M:%S %Z")
        )
    if span < 3600:
        text = f"{int(span // 60)}m"
    elif span < 48 * 3600:
        text = f"{int(span // 3600)}h"
    else:
        text = f"{int(span // 86400)}d"
    text = f"in {text}" if seconds > 0 else f"{text} ago"
    return format_html(
        '<span title="{}">{}</span>', timezone.localtime(moment).strftime("%Y-%m-%d %H:%M:%S %Z"), text
    )


def log_time(moment: datetime | None) -> str:
    """A log row's time on one line ("2026-11-23 06:17"; the seconds and zone on hover): Django's
    "Nov. 23, 2026, 6:17 a.m." took four lines in a narrow column."""
    if moment is None:
        return "—"
    local = timezone.localtime(moment)
    return format_html(
        '<span title="{}" style="white-space:nowrap">{}</span>',
        local.strftime("%Y-%m-%d %H:%M:%S %Z"),
        local.strftime("%Y-%m-%d %H:%M"),
    )


def days_left_html(refresh_issued_at: datetime | None, pair_state: str | None = None) -> str:
    """Days left before the refresh token lapses, coloured by `palette.days_left_colour`; a pair
    that is not active reads as such, in red, whatever its days left."""
    left = selectors.days_left(refresh_issued_at)
    if left is None:
        return "—"
    if pair_state and pair_state != PairState.ACTIVE:
        shorter: dict[str, str] = {PairState.DEAD: "dead", PairState.CREDENTIALS_REJECTED: "creds rejected"}
        short = shorter.get(pair_state, pair_state)
        return format_html(
            '<span style="color:{};font-weight:bold" title="token pair: {}">{} · {}</span>',
            PALETTE.danger,
            PairState(pair_state).label,
            f"{left:.1f}",
            short,
        )
    text = "lapsed" if left <= 0 else f"{left:.1f}"
    return format_html('<span style="color:{};font-weight:bold">{}</span>', days_left_colour(left), text)


def outcome_html(outcome: str | None, at: datetime | None) -> str:
    if not outcome:
        return "—"
    label = RenewalOutcome(outcome).label if outcome in RenewalOutcome.values else outcome
    return format_html(
        '<span style="color:{}">{}</span> <small>{}</small>',
        outcome_colour(outcome),
        label,
        short_time(at) if at else "",
    )


def failures_html(count: int | None, error: str) -> str:
    """Consecutive failed renewals, in red when there are any, the last error on hover."""
    if count is None:
        return "—"
    if count:
        return format_html('<span style="color:{}" title="{}">{}</span>', PALETTE.danger, error, count)
    return "0"
