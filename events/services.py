"""Accepting the app's events into the durable store, and running their handlers.

Every event, online or offline, becomes an `AppEvent` row before anything else happens to it; the
handlers run later in a worker (`events.tasks`). What a handler may rely on, and what not:
- at least once: a worker killed after a handler finished but before the row says so runs it again;
- once per delivery: the same delivery posted twice (or an offline record fetched twice) is one row;
- no order: two events about one object may be handled in either order, or at the same time; a handler
  reads the object's current state through the REST API instead of trusting the event's order.
"""

from __future__ import annotations

import hashlib
import logging
import traceback
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Count, F, Min, Q
from django.utils import timezone

from portals import clock, governor, metrics, registry, sources
from portals.client import PortalClient
from portals.errors import PortalBusy, TooManyEvents
from portals.models import Portal, PortalState

from .models import AppEvent, EventSource, EventState, HandlerPace

logger = logging.getLogger(__name__)


def queued_grace() -> timedelta:
    """A just-stored event is left this long to the task queued with it before the sweep queues it
    again (BITRIX24_WANTED_GRACE_SECONDS, as for the portals' wanted actions)."""
    return timedelta(seconds=settings.BITRIX24_WANTED_GRACE_SECONDS)


# Identifiers kept from an event's data: short scalar values, a few levels deep, a few of them.
IDS_MAX = 20
IDS_DEPTH = 3
ID_KEY_MAX = 40
ID_VALUE_MAX = 64


@dataclass(frozen=True)
class EventContext:
    """What a handler gets (see portals.registry)."""

    portal: Portal
    event: str
    object_id: str
    ids: Mapping[str, Any]
    user_id: int | None
    occurred_at: datetime | None
    offline: bool
    attempt: int
    record_id: int
    client: PortalClient


@dataclass(frozen=True)
class Accepted:
    outcome: str  # "queued", "duplicate", or "ignored" (no handler registered for it)
    record: AppEvent | None = None


# --- what an event carries ---------------------------------------------------------------------------


def identifiers(data: Any) -> dict[str, Any]:
    """The identifiers in an event's `data`, flattened (`FIELDS.ID`): short strings and numbers only.
    Anything else (text, long values, deep structures) is not kept: handlers read objects through the
    REST API, and the store must not grow with what a sender chooses to post."""
    kept: dict[str, Any] = {}

    def walk(value: Any, prefix: str, depth: int) -> None:
        if len(kept) >= IDS_MAX or depth > IDS_DEPTH:
            return
        if isinstance(value, Mapping):
            for key, child in list(value.items())[:IDS_MAX]:
                key = str(key)[:ID_KEY_MAX]
                walk(child, f"{prefix}.{key}" if prefix else key, depth + 1)
        elif isinstance(value, bool) or value is None:
            return
        elif isinstance(value, (int, str)) and prefix and len(str(value)) <= ID_VALUE_MAX:
            kept[prefix] = value

    walk(data, "", 0)
    return kept


def object_id(ids: Mapping[str, Any]) -> str:
    for key in ("FIELDS.ID", "ID", "FIELDS.ENTITY_ID"):
        if key in ids:
            return str(ids[key])[:ID_VALUE_MAX]
    return ""


def user_id_of(value: Any) -> int | None:
    try:
        number = int(str(value))
    except (TypeError, ValueError):
        return None
    return number if 0 < number < 2**63 else None


def _timestamp(value: Any) -> datetime | None:
    try:
        seconds = int(str(value))
    except (TypeError, ValueError):
        return None
    try:
        return datetime.fromtimestamp(seconds, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


# --- storing -----------------------------------------------------------------------------------------


def check_budget(*, portal: Portal, sender: str = "", now: datetime | None = None) -> None:
    """Raise TooManyEvents when the portal's events from this sender (portals.sources) are over the
    per-minute rate or the backlog. Kept per sender: anyone who can read the application token (every
    employee who opens the app) can post the portal's events, and their flood must not spend what
    Bitrix24's own deliveries need. Counted in the database, so they hold across any number of processes."""
    now = now or timezone.now()
    rate = settings.BITRIX24_EVENTS_PER_MINUTE
    mine = AppEvent.objects.filter(portal=portal, sender=sender)
    if mine.filter(received_at__gt=now - timedelta(minutes=1)).count() >= rate:
        raise TooManyEvents(f"more than {rate} events in a minute from this portal", retry_after=60)
    backlog = settings.BITRIX24_EVENT_BACKLOG
    waiting = mine.filter(state__in=(EventState.QUEUED, EventState.RUNNING))
    if waiting[:backlog].count() >= backlog:
        raise TooManyEvents(f"{backlog} events of this portal are waiting to be handled", retry_after=300)


def store(
    *,
    portal: Portal,
    event: str,
    source: str,
    dedup_key: str,
    ids: dict[str, Any],
    user_id: int | None,
    occurred_at: datetime | None,
    sender: str = "",
) -> Accepted:
    """One row for one delivery; the same key again is a duplicate, not a second row."""
    now = timezone.now()
    try:
        with transaction.atomic():
            record = AppEvent.objects.create(
                portal=portal,
                event=event,
                source=source,
                dedup_key=dedup_key[:200],
                object_id=object_id(ids),
                ids=ids,
                user_id=user_id,
                occurred_at=occurred_at,
                sender=sender,
                received_at=now,
                next_attempt_at=now + queued_grace(),
            )
    except IntegrityError:
        return Accepted(
            "duplicate", AppEvent.objects.filter(portal=portal, dedup_key=dedup_key[:200]).first()
        )
    return Accepted("queued", record)


def _delivery_mark(auth: Mapping[str, Any]) -> str:
    """What only Bitrix24's own delivery carries, for the deduplication key: the access token in its `auth`
    (a hash of it). Anyone who reads the application token can post an event ahead of Bitrix24 with the
    same event, object and a guessed `ts`; without this, the genuine delivery would be taken for a
    duplicate of theirs and dropped. Bitrix24 posting the same delivery twice sends the same token."""
    token = auth.get("access_token")
    if not isinstance(token, str) or not token:
        return ""
    return "|" + hashlib.sha256(token.encode()).hexdigest()[:16]


def accept_online(*, portal: Portal, event: str, data: Any, ts: Any, auth: Mapping[str, Any]) -> Accepted:
    """An event posted to /events/ and admitted by the portal's application token."""
    if not registry.handlers_for(event):
        return Accepted("ignored")
    ids = identifiers(data)
    occurred_at = _timestamp(ts)
    # Bitrix24 stamps every delivery with `ts`: the same event about the same object at the same second is
    # one delivery. Without a ts nothing tells two deliveries apart: each is kept.
    stamp = str(int(occurred_at.timestamp())) if occurred_at else f"no-ts:{uuid.uuid4().hex}"
    sender = sources.current()[:64]
    check_budget(portal=portal, sender=sender)
    accepted = store(
        sender=sender,
        portal=portal,
        event=event,
        source=EventSource.ONLINE,
        dedup_key=f"{event}|{object_id(ids)}|{stamp}{_delivery_mark(auth)}",
        ids=ids,
        user_id=user_id_of(auth.get("user_id")),
        occurred_at=occurred_at,
    )
    if accepted.outcome == "duplicate":
        metrics.event_handled(event, "duplicate")
    return accepted


# --- running handlers --------------------------------------------------------------------------------


def lease() -> timedelta:
    """How long a running event is left to its worker before the sweep presumes the worker dead."""
    return timedelta(seconds=settings.BITRIX24_EVENT_HANDLER_SECONDS + 60)


def retry_delay(attempts: int) -> timedelta:
    return timedelta(
        seconds=clock.backoff(attempts, base=settings.BITRIX24_EVENT_RETRY_SECONDS, cap=6 * 3600)
    )


def claim(*, event_id: int, now: datetime | None = None) -> AppEvent | None:
    """Take the event for running: a queued one, or a running one whose worker's lease ran out.
    Atomic, so a task queued twice (or by the sweep as well) runs the handlers once at a time."""
    now = now or timezone.now()
    taken = (
        AppEvent.objects.filter(pk=event_id)
        .filter(_runnable(now))
        .update(state=EventState.RUNNING, attempts=F("attempts") + 1, next_attempt_at=now + lease())
    )
    if not taken:
        return None
    return AppEvent.objects.select_related("portal").get(pk=event_id)


@dataclass(frozen=True)
class Outcome:
    state: str
    retry_in: timedelta | None = None
    error: str = ""


def _finish(record: AppEvent, state: str, **fields: Any) -> None:
    AppEvent.objects.filter(pk=record.pk).update(state=state, finished_at=timezone.now(), **fields)


# How each end of a run is counted (portals.metrics): a run that leaves the event queued is a retry.
_COUNTED = {
    EventState.HANDLED: "handled",
    EventState.QUEUED: "retry",
    EventState.FAILED: "failed",
    EventState.DROPPED: "dropped",
}


def handle_next(*, now: datetime | None = None) -> tuple[AppEvent, Outcome] | None:
    """Run the handlers of the due event that is fairest to take (`claim_next`): (the event, the outcome),
    or None when nothing may run now."""
    record = claim_next(now=now)
    if record is None:
        return None
    outcome = _run(record)
    metrics.event_handled(record.event, _COUNTED[EventState(outcome.state)])
    return record, outcome


def _runnable(now: datetime) -> Q:
    """Queued and due (its retry time or rate-limit slot has come), or running past its worker's lease."""
    due = Q(runnable_at__isnull=True) | Q(runnable_at__lte=now)
    return Q(state=EventState.QUEUED) & due | Q(state=EventState.RUNNING, next_attempt_at__lte=now)


def claim_next(*, now: datetime | None = None, tries: int = 5) -> AppEvent | None:
    """Take the due event that is fairest to run: its portal has fewer than BITRIX24_HANDLERS_PER_PORTAL
    handlers running, and of such portals the one with the fewest running goes first, then the one whose
    oldest due event is oldest. So one portal's 5,000 waiting events take at most that many workers, and
    another portal's first event is next as soon as a worker is free, whatever was queued before it.

    The cap holds under races: a claim that finds its portal over the cap afterwards gives the event back."""
    now = now or timezone.now()
    cap = settings.BITRIX24_HANDLERS_PER_PORTAL
    running = _running_per_portal(now)
    # Portals whose rate limit has no slot yet, and those at their cap: a short list, read first, so that
    # the scan below joins nothing.
    paced = list(HandlerPace.objects.filter(runnable_at__gt=now).values_list("portal_id", flat=True))
    full = [portal_id for portal_id, n in running.items() if n >= cap]
    firsts = (
        AppEvent.objects.filter(_runnable(now))
        .exclude(portal_id__in=paced + full)
        .order_by()
        .values("portal_id")
        .annotate(first=Min("pk"))
        .values_list("portal_id", "first")
    )
    order = sorted(
        (
            (running.get(portal_id, 0), first, portal_id)
            for portal_id, first in firsts
            if running.get(portal_id, 0) < cap
        )
    )
    for _busy_now, _first, portal_id in order[:tries]:
        candidate = (
            AppEvent.objects.filter(_runnable(now), portal_id=portal_id)
            .order_by("pk")
            .values_list("pk", flat=True)
            .first()
        )
        if candidate is None:
            continue
        record = claim(event_id=candidate, now=now)
        if record is None:
            continue  # another worker took it first
        if _running_per_portal(now, portal_id=portal_id).get(portal_id, 0) > cap:
            # Two workers claimed for this portal at once: give this one back, untouched.
            AppEvent.objects.filter(pk=record.pk, state=EventState.RUNNING).update(
                state=EventState.QUEUED, attempts=F("attempts") - 1, next_attempt_at=now + queued_grace()
            )
            continue
        return record
    return None


def has_runnable(*, portal_id: int, now: datetime | None = None) -> bool:
    """The portal has an event a worker may start now (not paced for its rate limit)."""
    now = now or timezone.now()
    if HandlerPace.objects.filter(portal_id=portal_id, runnable_at__gt=now).exists():
        return False
    return AppEvent.objects.filter(_runnable(now), portal_id=portal_id).exists()


def _running_per_portal(now: datetime, portal_id: int | None = None) -> dict[int, int]:
    running = AppEvent.objects.filter(state=EventState.RUNNING, next_attempt_at__gt=now)
    if portal_id is not None:
        running = running.filter(portal_id=portal_id)
    return dict(running.order_by().values("portal_id").annotate(n=Count("pk")).values_list("portal_id", "n"))


def _run(record: AppEvent) -> Outcome:
    portal = record.portal
    if portal.state == PortalState.UNINSTALLED:
        _finish(record, EventState.DROPPED, last_error="the app was uninstalled from the portal")
        return Outcome(EventState.DROPPED)
    handlers = registry.handlers_for(record.event)
    if not handlers:
        _finish(record, EventState.DROPPED, last_error="no handler is registered for this event any more")
        return Outcome(EventState.DROPPED)
    context = EventContext(
        portal=portal,
        event=record.event,
        object_id=record.object_id,
        ids=dict(record.ids),
        user_id=record.user_id,
        occurred_at=record.occurred_at,
        offline=record.source == EventSource.OFFLINE,
        attempt=record.attempts,
        record_id=record.pk,
        client=PortalClient(portal, auth_connector=settings.BITRIX24_AUTH_CONNECTOR),
    )
    done = list(record.done_handlers)
    for handler in handlers:
        if handler.name in done:
            continue
        try:
            # No sleeping here for the portal's rate limit: the worker has other portals' work to do.
            with governor.waiting_at_most(settings.BITRIX24_HANDLER_RATE_WAIT_SECONDS):
                handler.func(context)
        except PortalBusy as exc:
            return _busy(record, handler.name, exc, done)
        except Exception as exc:  # the app's code: any failure is retried, then kept for staff
            return _failed(record, handler.name, exc, done)
        done.append(handler.name)
        AppEvent.objects.filter(pk=record.pk).update(done_handlers=done)
    _finish(record, EventState.HANDLED, last_error="")
    return Outcome(EventState.HANDLED)


def _busy(record: AppEvent, handler: str, exc: PortalBusy, done: list[str]) -> Outcome:
    """The portal's rate limit had no slot soon enough: the event goes back to the database with the time
    the slot frees, not counted as a failed attempt; the handler then runs again from its start (so a
    handler must be idempotent: docs, *The app's events*)."""
    delay = timedelta(seconds=exc.wait)
    at = timezone.now() + delay
    # The portal's other waiting events wait for the slot too: workers take other portals' work meanwhile
    # (the task queued for this event's time wakes the portal up again).
    HandlerPace.objects.update_or_create(portal_id=record.portal_id, defaults={"runnable_at": at})
    _requeue(
        record,
        at,
        attempts=F("attempts") - 1,
        last_error=f"{handler}: waiting for the portal's rate limit ({exc.wait:.1f} s)"[:500],
        done_handlers=done,
    )
    return Outcome(EventState.QUEUED, retry_in=delay)


def _requeue(record: AppEvent, at: datetime, **fields: Any) -> None:
    """Back to the queue, not to be started (by a worker, or by the sweep) before `at`."""
    AppEvent.objects.filter(pk=record.pk).update(
        state=EventState.QUEUED, runnable_at=at, next_attempt_at=at, **fields
    )


def _failed(record: AppEvent, handler: str, exc: Exception, done: list[str]) -> Outcome:
    error = f"{handler}: {type(exc).__name__}: {exc}"[:500]
    details = traceback.format_exc()[-20000:]
    logger.warning("Handler %s failed on %s (attempt %d): %s", handler, record.event, record.attempts, exc)
    if record.attempts > settings.BITRIX24_EVENT_RETRIES:
        _finish(record, EventState.FAILED, last_error=error, traceback=details)
        return Outcome(EventState.FAILED, error=error)
    delay = retry_delay(record.attempts)
    _requeue(
        record,
        timezone.now() + delay,
        last_error=error,
        traceback=details,
        done_handlers=done,
    )
    return Outcome(EventState.QUEUED, retry_in=delay, error=error)


def run_again(*, event_ids: list[int]) -> list[int]:
    """Staff: failed or dropped events start again with a fresh count of retries (handlers that already
    succeeded on them are not run again). Returns the ids that will run."""
    now = timezone.now()
    ids = list(
        AppEvent.objects.filter(
            pk__in=event_ids, state__in=(EventState.FAILED, EventState.DROPPED)
        ).values_list("pk", flat=True)
    )
    AppEvent.objects.filter(pk__in=ids).update(
        state=EventState.QUEUED,
        attempts=0,
        finished_at=None,
        runnable_at=None,
        next_attempt_at=now + queued_grace(),
    )
    return ids


def due(*, now: datetime | None = None, limit: int = 1000) -> list[int]:
    """Events the sweep should queue: queued and due (a retry, or a task that never came), or running
    past their lease (a worker that died). Marked so the next sweep leaves them to this one's tasks."""
    now = now or timezone.now()
    ids = list(
        AppEvent.objects.filter(state__in=(EventState.QUEUED, EventState.RUNNING), next_attempt_at__lte=now)
        .order_by("next_attempt_at")
        .values_list("pk", flat=True)[:limit]
    )
    AppEvent.objects.filter(pk__in=ids, state=EventState.QUEUED).update(next_attempt_at=now + queued_grace())
    return ids


def purge_expired(*, batch_size: int = 1000, max_batches: int = 100) -> int:
    """Delete handled and dropped events after BITRIX24_EVENT_RETENTION_DAYS, failed ones after
    BITRIX24_FAILED_EVENT_RETENTION_DAYS, in short batches."""
    now = timezone.now()
    finished = Q(
        state__in=(EventState.HANDLED, EventState.DROPPED),
        finished_at__lt=now - timedelta(days=settings.BITRIX24_EVENT_RETENTION_DAYS),
    ) | Q(
        state=EventState.FAILED,
        finished_at__lt=now - timedelta(days=settings.BITRIX24_FAILED_EVENT_RETENTION_DAYS),
    )
    deleted = 0
    for _ in range(max_batches):
        batch = list(
            AppEvent.objects.filter(finished).order_by("pk").values_list("pk", flat=True)[:batch_size]
        )
        if not batch:
            break
        deleted += AppEvent.objects.filter(pk__in=batch).delete()[0]
    return deleted
