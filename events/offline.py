"""Pulling a portal's offline event queue into the durable store, losing nothing to a crash.

Offline bindings make the portal keep one record per changed object instead of calling us, so changes
made while the backend is down wait on the portal. A pull (docs: api-reference/events/offline-events.md):

1. a new process id is stored in our database (OfflineQueue.process_id) *before* the fetch;
2. `event.offline.get` with `clear=0` and that process id: the portal hides the records it hands out
   under it (parallel callers get others) but keeps them;
3. the records are stored as `AppEvent` rows (deduplicated by record id, message id and time);
4. `event.offline.clear` with the process id and the message ids removes them from the portal;
5. the process id is forgotten.

Killed anywhere between 2 and 4, the next pull finds the process id still stored and reads the records
hidden under it with `event.offline.list` (which does not change the queue), stores what is not stored
yet and clears them: nothing is lost, and nothing is stored twice. `event.offline.error` is used only
for a record that cannot be stored at all (no event name); a handler's failure is retried from our
store, not left on the portal.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db.models import F, Q
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from portals import journal, registry
from portals.client import PortalClient
from portals.models import Portal

from . import services
from .models import EventSource, OfflineQueue

logger = logging.getLogger(__name__)

PAGE = 50  # event.offline.get hands out at most 50 records a call
# A pull stores at most this many pages a run; a longer queue is pulled on by the next run.
MAX_PAGES = 20
LEASE = timedelta(minutes=5)


@dataclass
class PullResult:
    stored: int = 0
    duplicates: int = 0
    ignored: int = 0  # records of events no handler wants (bound once, since removed): cleared
    recovered: int = 0  # of the stored, how many an interrupted pull had left hidden
    errors: int = 0  # records that could not be stored, marked with event.offline.error
    more: bool = False  # stopped with records left (page limit or the portal's event budget)
    busy: bool = False  # another pull of this portal was running


OnStored = Callable[[list[int]], None]


def _set(queue: OfflineQueue, **fields: Any) -> None:
    OfflineQueue.objects.filter(pk=queue.pk).update(**fields)
    for name, value in fields.items():
        setattr(queue, name, value)


def _store_records(
    portal: Portal, records: Iterable[Any], result: PullResult
) -> tuple[list[str], list[str], list[int]]:
    """Store each record; returns (message ids to clear, message ids to mark failed, new event ids)."""
    clear: list[str] = []
    broken: list[str] = []
    created: list[int] = []
    for record in records:
        if not isinstance(record, dict):
            continue
        message_id = str(record.get("MESSAGE_ID") or "")
        name = str(record.get("EVENT_NAME") or "").upper()
        if not registry.EVENT_NAME.match(name) or not message_id:
            if message_id:
                broken.append(message_id)
            result.errors += 1
            continue
        clear.append(message_id)
        if not registry.handlers_for(name):
            result.ignored += 1
            continue
        data = record.get("EVENT_DATA")
        additional = record.get("EVENT_ADDITIONAL")
        stamp = str(record.get("TIMESTAMP_X") or "")
        occurred_at: datetime | None = None
        try:
            occurred_at = parse_datetime(stamp) if stamp else None
        except ValueError:
            occurred_at = None
        accepted = services.store(
            portal=portal,
            event=name,
            source=EventSource.OFFLINE,
            dedup_key=f"offline|{name}|{record.get('ID', '')}|{message_id}|{stamp}",
            ids=services.identifiers(data if isinstance(data, dict) else {}),
            user_id=services.user_id_of(additional.get("user_id")) if isinstance(additional, dict) else None,
            occurred_at=occurred_at,
        )
        if accepted.outcome == "duplicate":
            result.duplicates += 1
        elif accepted.record is not None:
            result.stored += 1
            created.append(accepted.record.pk)
    return clear, broken, created


def _settle(client: PortalClient, process_id: str, clear: list[str], broken: list[str]) -> None:
    if broken:
        client.call("event.offline.error", {"process_id": process_id, "message_id": broken}, idempotent=True)
    if clear:
        client.call("event.offline.clear", {"process_id": process_id, "message_id": clear}, idempotent=True)


def _recover(
    client: PortalClient, portal: Portal, process_id: str, result: PullResult, on_stored: OnStored
) -> None:
    hidden = list(client.list("event.offline.list", {"filter": {"=PROCESS_ID": process_id}}))
    before = result.stored
    clear, broken, created = _store_records(portal, hidden, result)
    on_stored(created)
    _settle(client, process_id, clear, broken)
    result.recovered += result.stored - before
    if hidden:
        logger.info(
            "Offline queue of %s: %d record(s) of an interrupted pull recovered", portal.domain, len(hidden)
        )


def _holder_is_dead(text: str) -> bool:
    host, _, rest = text.partition("|")
    pid, _, start = rest.partition("|")
    return bool(pid.isdigit()) and journal.holder_is_dead(host, int(pid), start)


def _take(queue: OfflineQueue, now: datetime) -> bool:
    """One pull of a portal at a time: a lease, which a pull whose process died gives up at once."""
    free = Q(lease_until__isnull=True) | Q(lease_until__lt=now)
    current = OfflineQueue.objects.filter(pk=queue.pk).values_list("lease_until", "holder").first()
    if current and current[0] and current[0] >= now and _holder_is_dead(current[1]):
        free |= Q(lease_until=current[0], holder=current[1])
    me = journal.current_holder()
    return bool(
        OfflineQueue.objects.filter(pk=queue.pk)
        .filter(free)
        .update(lease_until=now + LEASE, holder=f"{me.host}|{me.pid}|{me.start}"[:300])
    )


def pull(*, portal: Portal, on_stored: OnStored = lambda ids: None, max_pages: int = MAX_PAGES) -> PullResult:
    """Pull the portal's offline queue into the store; `on_stored` gets the new events' ids as they are
    stored (to queue their handlers while the pull goes on)."""
    queue, _ = OfflineQueue.objects.get_or_create(portal=portal)
    started = timezone.now()
    result = PullResult()
    if not _take(queue, started):
        result.busy = True
        return result
    client = PortalClient(portal)
    try:
        if queue.process_id:
            _recover(client, portal, queue.process_id, result, on_stored)
            _set(queue, process_id="")
        for _page in range(max_pages):
            try:
                services.check_budget(portal)
            except services.TooManyEvents:
                result.more = True  # the records wait on the portal, where they cost us nothing
                break
            process_id = uuid.uuid4().hex
            _set(queue, process_id=process_id)  # stored before the fetch: see the module's docstring
            answer = client.call("event.offline.get", {"clear": 0, "process_id": process_id, "limit": PAGE})
            answer = answer if isinstance(answer, dict) else {}
            given = str(answer.get("process_id") or process_id)
            if given != process_id:
                _set(queue, process_id=given)
            records = answer.get("events") or []
            if not records:
                _set(queue, process_id="")
                break
            clear, broken, created = _store_records(portal, records, result)
            on_stored(created)
            _settle(client, given, clear, broken)
            _set(queue, process_id="")
            if len(records) < PAGE:
                break
        else:
            result.more = True
    except Exception as exc:
        _set(queue, last_error=f"{type(exc).__name__}: {exc}"[:500])
        raise
    finally:
        fields: dict[str, Any] = {"lease_until": None, "holder": "", "pulled_at": timezone.now()}
        OfflineQueue.objects.filter(pk=queue.pk).update(**fields)
    done = OfflineQueue.objects.filter(pk=queue.pk)
    if result.more:
        done.update(wanted_at=timezone.now())
    else:
        done.filter(wanted_at__lte=started).update(wanted_at=None)
    done.update(pulled=F("pulled") + result.stored, last_error="")
    return result
