"""Lifecycle events that could not be verified when they came, kept and applied later.

ONAPPINSTALL and ONAPPUPDATE carry a new pair and a new application token; Bitrix24 does not deliver an
event twice. When one cannot be verified now (its source is over the budget of refused verifications, or
the OAuth server cannot be reached), dropping it would lose the portal's new tokens, so it is kept: what it
needs, encrypted, at most 1 KB, bounded per source and per portal. A worker verifies it, as if it had just
come, within its access token's hour, one portal's events in Bitrix24's `ts` order, and applies it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

from django.db import transaction
from django.utils import timezone

from portals import clock, sources
from portals.errors import TooManyEvents
from portals.verification import TooManyUnverified, UpstreamUnavailable, VerificationError

from .models import DeferredEvent
from .parsing import BadRequest

logger = logging.getLogger(__name__)

LIFECYCLE = ("ONAPPINSTALL", "ONAPPUPDATE")
APPLY_TASK = "install.tasks.apply_deferred_task"  # by name: the task module imports the endpoints' handlers
MAX_BYTES = 1024
PER_SOURCE = 50  # pending at once from one source
PER_PORTAL = 5  # pending at once naming one member_id
AUTH_KEYS = (
    "access_token",
    "refresh_token",
    "expires_in",
    "scope",
    "domain",
    "server_endpoint",
    "client_endpoint",
    "member_id",
    "status",
    "application_token",
    "user_id",
)
DATA_KEYS = ("VERSION", "LANGUAGE_ID")


def defer(
    *, name: str, auth: Mapping[str, Any], data: Mapping[str, Any], ts: Any, reason: str
) -> DeferredEvent:
    """Keep the event for a worker; raises TooManyEvents past the bounds, BadRequest (413) past 1 KB."""
    kept = {
        "auth": {key: auth[key] for key in AUTH_KEYS if isinstance(auth.get(key), str | int)},
        "data": {key: data[key] for key in DATA_KEYS if isinstance(data.get(key), str | int)},
    }
    blob = json.dumps(kept, separators=(",", ":"))
    if len(blob.encode()) > MAX_BYTES:
        raise BadRequest(
            f"the event's auth and data fields take more than {MAX_BYTES} bytes", status=413, code="too_large"
        )
    member_id = str(auth.get("member_id", ""))[:64]
    source = sources.current()[:64]
    pending = DeferredEvent.objects.filter(done_at__isnull=True)
    if pending.filter(source=source).count() >= PER_SOURCE:
        raise TooManyEvents(f"{PER_SOURCE} events from this address wait for verification", retry_after=60)
    if pending.filter(member_id=member_id).count() >= PER_PORTAL:
        raise TooManyEvents(f"{PER_PORTAL} events of this portal wait for verification", retry_after=60)
    try:
        expires_in = max(60, min(int(str(auth.get("expires_in", 3600))), 3600))
    except ValueError:
        expires_in = 3600
    try:
        stamp = int(str(ts))
    except (TypeError, ValueError):
        stamp = None
    now = timezone.now()
    row = DeferredEvent.objects.create(
        event=name,
        member_id=member_id,
        source=source,
        ts=stamp,
        payload=blob,
        reason=reason[:200],
        received_at=now,
        expires_at=now + timedelta(seconds=expires_in),
    )
    logger.warning("%s for portal %s kept for later verification: %s", name, member_id, reason)
    return row


Replay = Callable[[str, dict[str, Any], dict[str, Any]], Any]


def apply_due(*, replay: Replay, limit: int = 100, now: Any = None) -> int:
    """Verify and apply the deferred events whose time has come, each portal's in `ts` order (an event
    waits while an earlier one of its portal is pending). Returns how many were settled."""
    now = now or timezone.now()
    settled = 0
    due = list(
        DeferredEvent.objects.filter(done_at__isnull=True, next_attempt_at__lte=now).order_by(
            "member_id", "ts", "pk"
        )[:limit]
    )
    blocked: set[str] = set()
    for row in due:
        if row.member_id in blocked:
            continue
        earlier = DeferredEvent.objects.filter(
            done_at__isnull=True, member_id=row.member_id, ts__lt=row.ts
        ).exclude(pk=row.pk)
        if row.ts is not None and earlier.exists():
            blocked.add(row.member_id)  # an earlier event of this portal is not settled yet
            continue
        if not _settle(row, replay, now):
            blocked.add(row.member_id)
            continue
        settled += 1
    return settled


def _settle(row: DeferredEvent, replay: Replay, now: Any) -> bool:
    """True when the row is done (applied, refused or expired); False when it waits for another try."""
    if now >= row.expires_at:
        _done(row, "dropped: its access token expired before it could be verified")
        return True
    kept = json.loads(row.payload)
    attempts = row.attempts + 1
    try:
        # A worker's own verification: not counted against any source's budget.
        with sources.using(""), transaction.atomic():
            replay(row.event, dict(kept["auth"]), dict(kept["data"]))
    except (UpstreamUnavailable, TooManyUnverified) as exc:
        wait = timedelta(seconds=clock.backoff(attempts, base=30, cap=600))
        DeferredEvent.objects.filter(pk=row.pk).update(
            attempts=attempts, next_attempt_at=now + wait, outcome=f"not yet: {exc}"[:300]
        )
        return False
    except VerificationError as exc:
        _done(row, f"refused: {exc}", attempts)
        return True
    except Exception as exc:  # the event itself is bad (it passed only the first checks): kept as failed
        logger.exception("Deferred %s for portal %s failed", row.event, row.member_id)
        _done(row, f"failed: {type(exc).__name__}: {exc}", attempts)
        return True
    _done(row, "applied", attempts)
    return True


def _done(row: DeferredEvent, outcome: str, attempts: int | None = None) -> None:
    # The tokens are no use any more: not kept past this.
    DeferredEvent.objects.filter(pk=row.pk).update(
        done_at=timezone.now(), outcome=outcome[:300], payload="", attempts=attempts or row.attempts
    )
    logger.info("Deferred %s for portal %s: %s", row.event, row.member_id, outcome)
