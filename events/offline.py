"""Pulling a portal's offline event queue into the durable store, losing nothing to a crash.

Offline bindings make the portal keep one record per changed object instead of calling us, so changes
made while the backend is down wait on the portal. A pull (docs: api-reference/events/offline-events.md,
event-offline-get.md, event-offline-clear.md, event-offline-list.md):

1. `OfflineQueue.fetching_since` is stored: a fetch is about to be sent;
2. `event.offline.get` with `clear=0`: the portal reserves the records it hands out under a process id
   of its choosing (parallel callers get others) and keeps them;
3. that process id is stored at once, then the records as `AppEvent` rows (deduplicated by record id,
   message id and time);
4. `event.offline.clear` with the process id and the message ids removes them from the portal;
5. the process id and the fetch mark are forgotten.

Killed after 2, the next pull finds the process id (or, killed before it was stored, the fetch mark)
and reads the reserved records with `event.offline.list` (which changes nothing): by the stored process
id, or every reserved record of the queue, since only one pull of a portal runs at a time and only our
pulls reserve its records. It stores what is not stored yet and clears them: nothing is lost, and
nothing is stored twice. `event.offline.error` is used only for a record that cannot be stored at all
(no event name); a handler's failure is retried from our store, not left on the portal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
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
    if created:  # counted as stored, not when the pull ends: a pull killed later stored them all the same
        OfflineQueue.objects.filter(portal=portal).update(pulled=F("pulled") + len(created))
    return clear, broken, created


def _settle(client: PortalClient, process_id: str, clear: list[str], broken: list[str]) -> None:
    if broken:
        client.call(
            "event.offline.error", _offline_params(process_id=process_id, message_id=broken), idempotent=True
        )
    if clear:
        client.call(
            "event.offline.clear", _offline_params(process_id=process_id, message_id=clear), idempotent=True
        )


def _offline_params(**params: Any) -> dict[str, Any]:
    # With a connector the portal keeps the bound events in that connector's queue: every call about the
    # queue names it (offline-events.md).
    if settings.BITRIX24_AUTH_CONNECTOR:
        params["auth_connector"] = settings.BITRIX24_AUTH_CONNECTOR
    return params


def _reserved(client: PortalClient, process_id: str) -> list[Any]:
    """The records reserved under `process_id`, or under any process id when it is ''."""
    condition = {"=PROCESS_ID": process_id} if process_id else {">PROCESS_ID": ""}
    return list(client.list("event.offline.list", _offline_params(filter=condition)))


def _recover(
    client: PortalClient, portal: Portal, queue: OfflineQueue, result: PullResult, on_stored: OnStored
) -> None:
    """Store and clear what an interrupted pull left reserved on the portal."""
    hidden = _reserved(client, queue.process_id)
    batches: dict[str, list[Any]] = {}
    for record in hidden:
        if isinstance(record, dict) and record.get("PROCESS_ID"):
            batches.setdefault(str(record["PROCESS_ID"]), []).append(record)
    before = result.stored
    for process_id, records in batches.items():
        clear, broken, created = _store_records(portal, records, result)
        on_stored(created)
        _settle(client, process_id, clear, broken)
    result.recovered += result.stored - before
    _set(queue, process_id="", fetching_since=None)
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
    queue.refresh_from_db()  # what the last pull left, as it is now that this one holds the lease
    client = PortalClient(portal)
    try:
        if queue.process_id or queue.fetching_since:
            _recover(client, portal, queue, result, on_stored)
        for _page in range(max_pages):
            try:
                services.check_budget(portal=portal)
            except services.TooManyEvents:
                result.more = True  # the records wait on the portal, where they cost us nothing
                break
            _set(queue, fetching_since=timezone.now())  # see the module's docstring
            answer = client.call("event.offline.get", _offline_params(clear=0, limit=PAGE))
            answer = answer if isinstance(answer, dict) else {}
            records = answer.get("events") or []
            process_id = str(answer.get("process_id") or "")
            if not records:
                _set(queue, fetching_since=None)
                break
            _set(queue, process_id=process_id)  # before anything else: the records are reserved under it
            clear, broken, created = _store_records(portal, records, result)
            on_stored(created)
            _settle(client, process_id, clear, broken)
            _set(queue, process_id="", fetching_since=None)
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
    done.update(last_error="")
    return result
