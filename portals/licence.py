"""The app's licence on a portal, as the portal's own app.info says it: STATUS (`Portal.app_status`),
LICENSE, PAYMENT_EXPIRED and DAYS. This module is the only writer of those fields.

It reads whenever a valid access token is at hand, with that token as it is: an install or update (the
installer's token), a launch (the user's, when the last reading is older than `FRESH`), ONAPPPAYMENT (the
stored background access token, while it is still valid) and staff's check. It never refreshes a token to
read the licence: a token refreshed for that would spend a single-use refresh token on a nicety.

The OAuth server's app.info also names a status; that answer is for verification (portals.verification)
and is not stored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.utils import timezone

from . import governor
from .client import PortalClient, RestError
from .errors import PortalBusy
from .models import AppStatus, Portal

logger = logging.getLogger(__name__)

# A launch reads the licence again when the last reading is older than this.
FRESH = timedelta(hours=1)


@dataclass(frozen=True)
class Licence:
    status: str  # one of AppStatus (F free, D demo, T trial, P paid, L local, S subscription), or ""
    license: str  # e.g. "de_ent10000"
    payment_expired: bool | None
    days: int | None  # days left of a trial or a paid period, when Bitrix24 says

    @classmethod
    def from_answer(cls, result: Any) -> Licence:
        """The portal's app.info `result` (api-reference/common/system/app-info.md); what is missing or
        malformed is unknown, never guessed."""
        data = result if isinstance(result, dict) else {}
        status = str(data.get("STATUS") or "")[:1].upper()
        expired = str(data.get("PAYMENT_EXPIRED") or "").upper()
        days = data.get("DAYS")
        return cls(
            status=status if status in AppStatus.values else "",
            license=str(data.get("LICENSE") or "")[:64],
            payment_expired={"Y": True, "N": False}.get(expired),
            days=int(days) if isinstance(days, int | str) and str(days).lstrip("-").isdigit() else None,
        )


def is_stale(portal: Portal) -> bool:
    checked = portal.licence_checked_at
    return checked is None or timezone.now() - checked > FRESH


def read(portal: Portal, *, access_token: str) -> Licence | None:
    """Ask the portal's app.info with `access_token` (never renewed, never waiting for the rate limit) and
    store what it says on `portal`. None, and nothing stored, when the portal could not be asked now or
    refused: the next token at hand tries again."""
    try:
        # A nicety read beside a launch or an install: never a wait for the portal's rate limit.
        with governor.waiting_at_most(0.0):
            result = PortalClient(portal, access_token=access_token).call("app.info")
    except PortalBusy:
        logger.info("Licence of portal %s not read now: its rate limit has no slot", portal.member_id)
        return None
    except RestError as exc:
        logger.info("Licence of portal %s not read: %s", portal.member_id, exc.code or type(exc).__name__)
        return None
    licence = Licence.from_answer(result)
    _store(portal, licence)
    return licence


def read_if_stale(portal: Portal, *, access_token: str) -> Licence | None:
    """`read`, when the last reading is older than FRESH (a launch: most launches ask nobody)."""
    if not is_stale(portal):
        return None
    return read(portal, access_token=access_token)


def _store(portal: Portal, licence: Licence) -> None:
    fields = {
        "app_status": licence.status or portal.app_status,
        "license": licence.license,
        "payment_expired": licence.payment_expired,
        "licence_days": licence.days,
        "licence_checked_at": timezone.now(),
    }
    Portal.objects.filter(pk=portal.pk).update(**fields, updated_at=timezone.now())
    for name, value in fields.items():
        setattr(portal, name, value)
