"""Events kept to be handled later: one store (`DeferredEvent`), one drain (`apply_due`).

Bitrix24 delivers an event once. Two kinds of delivery cannot be handled when they come, and are kept:

- ONAPPINSTALL and ONAPPUPDATE that cannot be verified now (their source is over the budget of refused
  verifications, or the OAuth server cannot be reached): dropping one would lose the portal's new tokens.
  What it needs is kept, encrypted, at most 1 KB, bounded per source and per portal (`defer`).
- Any event that comes while the database is away (`spool_delivery`): kept in the spool (portals.spool,
  Redis or local files) when it can be admitted without the database. An event of the app is admitted by
  the application-token mirror (an HMAC per portal, kept beside the spool); an install or update is kept
  unverified, within the same tight bounds as above. `drain_spool` moves the spool into `DeferredEvent`
  once the database is back (each entry once: its spool key is unique).

A worker then handles each as if it had just come (an install verified with Bitrix24, an event's
application token checked against the database), one portal's events in Bitrix24's `ts` order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import DatabaseError, transaction
from django.utils import timezone

from portals import clock, sources, spool
from portals.errors import TooManyEvents
from portals.models import Portal, PortalState
from portals.verification import TooManyUnverified, UpstreamUnavailable, VerificationError

from .models import DeferredEvent
from .parsing import BadRequest

logger = logging.getLogger(__name__)

LIFECYCLE = ("ONAPPINSTALL", "ONAPPUPDATE")
# An event of the app kept in the spool is handled within this long, or dropped (and logged).
SPOOLED_EVENT_LIFE = timedelta(days=7)
SPOOLED_REASON = "came while the database was away (kept in the spool)"
# The application-token mirror is rewritten from the database at most this often (and on every change).
MIRROR_EVERY = 600
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


def _lifecycle_kept(auth: Mapping[str, Any], data: Mapping[str, Any]) -> str:
    """What an unverified install or update keeps, as JSON; BadRequest (413) past 1 KB."""
    kept = {
        "auth": {key: auth[key] for key in AUTH_KEYS if isinstance(auth.get(key), str | int)},
        "data": {key: data[key] for key in DATA_KEYS if isinstance(data.get(key), str | int)},
    }
    blob = json.dumps(kept, separators=(",", ":"))
    if len(blob.encode()) > MAX_BYTES:
        raise BadRequest(
            f"the event's auth and data fields take more than {MAX_BYTES} bytes", status=413, code="too_large"
        )
    return blob


def _stamp(ts: Any) -> int | None:
    try:
        return int(str(ts))
    except (TypeError, ValueError):
        return None


def _token_life(auth: Mapping[str, Any]) -> int:
    try:
        return max(60, min(int(str(auth.get("expires_in", 3600))), 3600))
    except ValueError:
        return 3600


def defer(
    *, name: str, auth: Mapping[str, Any], data: Mapping[str, Any], ts: Any, reason: str
) -> DeferredEvent:
    """Keep the event for a worker; raises TooManyEvents past the bounds, BadRequest (413) past 1 KB."""
    blob = _lifecycle_kept(auth, data)
    member_id = str(auth.get("member_id", ""))[:64]
    source = sources.current()[:64]
    pending = DeferredEvent.objects.filter(done_at__isnull=True)
    if pending.filter(source=source).count() >= PER_SOURCE:
        raise TooManyEvents(f"{PER_SOURCE} events from this address wait for verification", retry_after=60)
    if pending.filter(member_id=member_id).count() >= PER_PORTAL:
        raise TooManyEvents(f"{PER_PORTAL} events of this portal wait for verification", retry_after=60)
    now = timezone.now()
    row = DeferredEvent.objects.create(
        event=name,
        member_id=member_id,
        source=source,
        ts=_stamp(ts),
        payload=blob,
        reason=reason[:200],
        received_at=now,
        expires_at=now + timedelta(seconds=_token_life(auth)),
    )
    logger.warning("%s for portal %s kept for later verification: %s", name, member_id, reason)
    return row


# --- the spool: while the database is away ----------------------------------------------------------


def spool_delivery(*, name: str, auth: dict[str, Any], data: dict[str, Any], ts: Any) -> str:
    """Keep an event that came while the database is away; returns the member_id it names.

    Raises VerificationError when the mirror says its application token is not the portal's (the answer
    the database would give), spool.SpoolFull past a bound, spool.SpoolUnavailable when it cannot be
    kept (no mirror to admit it, nowhere to write)."""
    member_id = str(auth.get("member_id", ""))[:64]
    if name in LIFECYCLE:
        # Nothing can prove it now: kept as an unverified install would be in the database, verified later.
        payload: dict[str, Any] = json.loads(_lifecycle_kept(auth, data))
        trust = spool.UNVERIFIED
    else:
        matches = spool.mirror_matches(member_id, str(auth.get("application_token", "")))
        if matches is None:
            raise spool.SpoolUnavailable("no application-token mirror to admit events with")
        if not matches:
            raise VerificationError(
                "application token does not match this portal", code="bad_application_token"
            )
        payload = {"auth": {key: auth[key] for key in AUTH_KEYS if key in auth}, "data": data}
        trust = spool.VERIFIED
    payload.update(event=name, member_id=member_id, ts=ts, source=sources.current()[:64])
    spool.put(payload, member_id=member_id, source=sources.current(), trust=trust)
    logger.warning("%s for portal %s kept in the spool: the database is away", name, member_id)
    return member_id


def drain_spool(limit: int = 500) -> int:
    """Move what waits in the spool into `DeferredEvent` (each entry once); returns how many moved.
    Stops at the first database error: the rest waits for the next run."""
    moved = 0
    for entry in spool.entries(limit):
        kept = entry.payload
        name = str(kept.get("event", ""))[:64]
        received = datetime.fromtimestamp(entry.received, tz=UTC)
        life = (
            timedelta(seconds=_token_life(kept.get("auth", {}))) if name in LIFECYCLE else SPOOLED_EVENT_LIFE
        )
        row = DeferredEvent(
            event=name,
            member_id=str(kept.get("member_id", ""))[:64],
            source=str(kept.get("source", ""))[:64],
            ts=_stamp(kept.get("ts")),
            payload=json.dumps({"auth": kept.get("auth", {}), "data": kept.get("data", {})}),
            reason=SPOOLED_REASON,
            spool_key=entry.key,
            received_at=received,
            expires_at=received + life,
        )
        try:
            DeferredEvent.objects.bulk_create([row], ignore_conflicts=True)
        except DatabaseError as exc:
            logger.warning("The spool waits: the database refused an entry (%s)", exc)
            break
        spool.remove(entry.key)
        moved += 1
    if moved:
        logger.info("Moved %d delivery(ies) from the spool into the database", moved)
    return moved


def sync_mirror(*, force: bool = False) -> bool:
    """Rewrite the application-token mirror from the database when it is older than MIRROR_EVERY."""
    synced = spool.mirror_synced_at()
    if not force and synced is not None and timezone.now().timestamp() - synced < MIRROR_EVERY:
        return False
    installed = Portal.objects.exclude(application_token="").exclude(state=PortalState.UNINSTALLED)
    spool.mirror_replace({portal.member_id: portal.application_token for portal in installed.iterator()})
    return True


Replay = Callable[[str, dict[str, Any], dict[str, Any], Any], Any]


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
            replay(row.event, dict(kept["auth"]), dict(kept["data"]), row.ts)
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
