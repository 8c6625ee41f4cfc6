"""The admin's one palette: the portal list's badges, the dashboard's cards and charts and the purge
button take their colours from here, so a colour means the same thing on every staff screen.

Red: lapsed, refused, failing. Orange: inside the renewal window, or failed and retried. Green:
healthy, renewed. Grey: nothing needed doing.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings

from portals.models import RenewalOutcome


@dataclass(frozen=True)
class Palette:
    danger: str = "#ba2121"  # the admin's own error red
    warning: str = "#c77700"
    ok: str = "#2e7d32"
    quiet: str = "#666"
    ink: str = "#333"  # text that carries no meaning of its own
    rule: str = "#999"  # chart axes
    hairline: str = "#e8e8e8"  # card borders
    on_danger: str = "#fff"  # text on a danger background


# Templates get it as `palette` (the dashboard, the portal page).
PALETTE = Palette()

OUTCOME_COLOURS: dict[str, str] = {
    RenewalOutcome.RENEWED: PALETTE.ok,
    RenewalOutcome.SKIPPED: PALETTE.quiet,
    RenewalOutcome.TRANSIENT: PALETTE.warning,
    RenewalOutcome.REFUSED: PALETTE.danger,
}


def outcome_colour(outcome: str) -> str:
    return OUTCOME_COLOURS.get(outcome, PALETTE.ink)


def days_left_colour(days: float) -> str:
    """Red when lapsed or within a day, orange inside the renewal window (the sweep should be on
    it), green otherwise: the list's days-left badge and the dashboard's bars alike."""
    if days <= 1:
        return PALETTE.danger
    if days <= settings.BITRIX24_RENEW_MARGIN_DAYS:
        return PALETTE.warning
    return PALETTE.ok
