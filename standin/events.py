"""Events on a stand-in portal: the offline queue, and the courier that posts online events to handlers.

What Bitrix24's documentation (``bitrix24/b24restdocs``) says, and what this module copies:

* Online events go through Bitrix24's queue server, not from the request that changed the object: a
  handler may be called seconds later, a failed call is not repeated ("No second chances",
  api-reference/events/index.md). :class:`Courier` is that queue server in small: a few threads that post
  each event once, after the REST answer has left.
* Offline events (api-reference/events/offline-events.md and the ``event-offline-*.md`` pages) are kept
  on the portal in a queue the app reads: one record per object — a repeat of the same event with the same
  data refreshes the unreserved record (its ``MESSAGE_ID`` is a hash of the event name and data), and a
  repeat of a record that a batch has reserved makes a new record, so nothing is lost while the app works.
  The queue is split by source key (``auth_connector``): each key has its own queue, and the app's own
  writes made with that key do not reach it. :class:`OfflineQueue` keeps those records.

Standard library only; no import of ``server.py`` (it imports this module).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import http.client
import json
import re
import secrets
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

from .base import RestError, iso

__all__ = [
    "CRM_EVENTS",
    "Courier",
    "OfflineQueue",
    "OfflineRecord",
    "crm_event",
    "message_id",
    "parse_filter",
    "parse_order",
    "post_form",
]

JSON = dict[str, Any]

# Not documented: the most records one event.offline.get hands out. The pages give only the default (50) and
# offline-events.md says records come "in batches of 50"; the stand-in never hands out more, so an app must
# call again until the queue is empty rather than trust a bigger limit.
OFFLINE_BATCH = 50
LIST_PAGE = 50  # event-offline-list.md: "The page size of results is always static: 50 records"
RESERVATION_TTL = 30 * 86400.0  # offline-events.md: a reserved batch is kept up to 30 days, then deleted
DEFAULT_MIN_TIMEOUT = 1.0  # on-offline-event.md: minTimeout "Defaults to 1"
FEATURE_EXTENDED = "rest_offline_extended"  # common/system/feature-get.md: clear=0, event.offline.clear/error
FEATURE_CONNECTOR = "rest_auth_connector"  # common/system/feature-get.md: auth_connector

# The CRM entities the stand-in serves and the prefix of their events (api-reference/crm/*/events/):
# crm.deal.add raises ONCRMDEALADD, crm.contact.update ONCRMCONTACTUPDATE, and so on.
CRM_EVENTS = {
    "crm.contact": "ONCRMCONTACT",
    "crm.company": "ONCRMCOMPANY",
    "crm.deal": "ONCRMDEAL",
    "crm.lead": "ONCRMLEAD",
}
_ACTIONS = {"add": "ADD", "update": "UPDATE", "delete": "DELETE"}


def crm_event(entity: str, action: str) -> str | None:
    """The event a change of ``entity`` raises (``crm.deal``, ``add`` → ``ONCRMDEALADD``), None if none."""
    prefix = CRM_EVENTS.get(entity)
    suffix = _ACTIONS.get(action)
    return prefix + suffix if prefix and suffix else None


def message_id(event: str, data: Any) -> str:
    """A record's key: "a hash of the event name and data" (offline-events.md), 32 hex characters as the
    pages' examples show. Not a security measure, only a key."""
    canonical = json.dumps([event, data], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.md5(canonical.encode(), usedforsecurity=False).hexdigest()


# --------------------------------------------------------------------------------------------------------
# Filter and order of event.offline.get / event.offline.list


_GET_FIELDS = ("ID", "TIMESTAMP_X", "EVENT_NAME", "MESSAGE_ID")
_LIST_FIELDS = (*_GET_FIELDS, "PROCESS_ID", "ERROR")
_GET_OPERATIONS = ("", "=", ">", "<", ">=", "<=")
_LIST_OPERATIONS = (*_GET_OPERATIONS, "@", "%")  # event-offline-list.md: "@" in an array, "%" substring
_FILTER_KEY = re.compile(r"^(?P<op>[^A-Za-z_]*)(?P<field>[A-Za-z_]+)$")


def _argument(description: str) -> RestError:
    return RestError(400, "ERROR_ARGUMENT", description)


def _field_value(field: str, value: Any, key: str) -> Any:
    """A filter value as the record's field holds it: numbers for ID and ERROR, a unix time for
    TIMESTAMP_X ("Pass TIMESTAMP_X in ISO 8601 format"), text otherwise."""
    if isinstance(value, dict | list):
        raise _argument(f"The value of an argument '{key}' has an invalid type")
    try:
        if field in ("ID", "ERROR"):
            return int(str(value))
        if field == "TIMESTAMP_X":
            return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        raise _argument(f"The value of an argument '{key}' has an invalid type") from None
    return str(value).upper() if field == "EVENT_NAME" else str(value)


@dataclass(frozen=True)
class Condition:
    field: str
    op: str
    value: Any

    def holds(self, record: OfflineRecord) -> bool:
        left = record.value(self.field)
        right = self.value
        if self.op == "@":
            return bool(left in right)
        if self.op == "%":
            return str(right) in str(left)
        if self.op in ("", "="):
            return bool(left == right)
        try:
            if self.op == ">":
                return bool(left > right)
            if self.op == "<":
                return bool(left < right)
            if self.op == ">=":
                return bool(left >= right)
            return bool(left <= right)
        except TypeError:
            return False


def parse_filter(raw: Any, *, listing: bool) -> list[Condition]:
    """``filter`` of event.offline.get (``listing=False``) or event.offline.list, with the errors their pages
    list: an unknown field, an operation not allowed (``!`` is never allowed), an array as a value."""
    if raw is None or raw == "" or raw == []:
        return []  # absent, or PHP's empty array as JSON renders it
    if not isinstance(raw, dict):
        raise _argument("The filter is not an array.")
    fields = _LIST_FIELDS if listing else _GET_FIELDS
    operations = _LIST_OPERATIONS if listing else _GET_OPERATIONS
    conditions = []
    for key, value in raw.items():
        match = _FILTER_KEY.match(str(key))
        if match is None or match["field"].upper() not in fields:
            raise _argument(f"Filter field not allowed: {key}")
        op, field = match["op"], match["field"].upper()
        if op not in operations:
            raise _argument(f"Filter operation not allowed: {op}")
        if op == "@":
            items = list(value.values()) if isinstance(value, dict) else value
            if not isinstance(items, list):
                raise _argument(f"The value of an argument '{key}' has an invalid type")
            conditions.append(Condition(field, op, [_field_value(field, item, key) for item in items]))
        else:
            conditions.append(Condition(field, op, _field_value(field, value, key)))
    return conditions


def parse_order(raw: Any, *, listing: bool) -> list[tuple[str, bool]]:
    """``order``: ``{"FIELD": "ASC"|"DESC"}`` over the filter's fields; ``(field, descending)`` pairs.
    Defaults: ``TIMESTAMP_X`` ascending for .get (event-offline-get.md), ``ID`` for .list."""
    if raw is None or raw == "" or raw == []:
        return [("ID", False)] if listing else [("TIMESTAMP_X", False)]
    if not isinstance(raw, dict):
        raise _argument("The order is not an array.")
    fields = _LIST_FIELDS if listing else _GET_FIELDS
    order = []
    for key, direction in raw.items():
        field = str(key).upper()
        if field not in fields:
            raise _argument(f"Order field not allowed: {key}")
        if str(direction).upper() not in ("ASC", "DESC"):
            raise _argument("Order direction should be one of {ASC|DESC}")
        order.append((field, str(direction).upper() == "DESC"))
    return order


def _sorted(records: Iterable[OfflineRecord], order: list[tuple[str, bool]]) -> list[OfflineRecord]:
    rows = sorted(records, key=lambda record: record.id)  # ties keep the order of writing
    for field, descending in reversed(order):  # stable sorts, last key first

        def by_field(record: OfflineRecord, field: str = field) -> Any:
            return record.value(field)

        rows.sort(key=by_field, reverse=descending)
    return rows


# --------------------------------------------------------------------------------------------------------
# The offline queue


@dataclass
class OfflineRecord:
    """One record of the offline queue, as event-offline-list.md describes its fields."""

    id: int
    channel: str  # the auth_connector of the queue it belongs to; "" for events without a source
    event: str
    data: Any
    user_id: int
    message_id: str
    timestamp: float
    process_id: str = ""
    reserved_at: float = 0.0
    error: bool = False

    def value(self, field: str) -> Any:
        return {
            "ID": self.id,
            "TIMESTAMP_X": self.timestamp,
            "EVENT_NAME": self.event,
            "MESSAGE_ID": self.message_id,
            "PROCESS_ID": self.process_id,
            "ERROR": int(self.error),
        }[field]

    def for_get(self) -> JSON:
        """An element of event.offline.get's ``events`` (event-offline-get.md, "Element of the Events Array")."""
        return {
            "ID": str(self.id),
            "TIMESTAMP_X": iso(self.timestamp),
            "EVENT_NAME": self.event,
            # "If the event has no data, the field is empty: false or null".
            "EVENT_DATA": self.data if self.data else False,
            # "If the action was performed without a user, for example by an agent, user_id is 0"; the pages'
            # examples print a user's id as a string.
            "EVENT_ADDITIONAL": {"user_id": str(self.user_id) if self.user_id else 0},
            "MESSAGE_ID": self.message_id,
        }

    def for_list(self) -> JSON:
        """An element of event.offline.list's result: the same plus ``PROCESS_ID`` and ``ERROR`` (strings)."""
        return {**self.for_get(), "PROCESS_ID": self.process_id, "ERROR": "1" if self.error else "0"}


class OfflineQueue:
    """The offline queue of one app on one portal, all source keys together (each record names its own).

    Thread-safe: every operation holds the queue's lock, so parallel event.offline.get calls never hand out
    the same record (event-offline-get.md: "each request receives its own set of records").
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[OfflineRecord] = []
        self._next_id = 1

    def _expire(self, now: float) -> None:
        self._records = [
            record
            for record in self._records
            if not record.process_id or now - record.reserved_at <= RESERVATION_TTL
        ]

    def write(self, *, channel: str, event: str, data: Any, user_id: int, now: float) -> None:
        """Record a change. A repeat with the same key refreshes the unreserved record (its time and user);
        a repeat of a reserved record makes a new one (event-offline-get.md, MESSAGE_ID)."""
        key = message_id(event, data)
        with self._lock:
            self._expire(now)
            for record in self._records:
                if record.channel == channel and record.message_id == key and not record.process_id:
                    # Not documented: whether a repeat clears an error mark. It is kept here (the stricter
                    # reading): the change then only shows with error=1, so an app must work off its
                    # erroneous records too.
                    record.timestamp = now
                    record.user_id = user_id
                    return
            self._records.append(
                OfflineRecord(
                    id=self._next_id,
                    channel=channel,
                    event=event,
                    data=copy.deepcopy(data),  # the caller's dict may change after the event
                    user_id=user_id,
                    message_id=key,
                    timestamp=now,
                )
            )
            self._next_id += 1

    def take(
        self,
        *,
        channel: str,
        conditions: list[Condition],
        order: list[tuple[str, bool]],
        limit: int,
        clear: bool,
        process_id: str,
        error: bool,
        now: float,
    ) -> tuple[str | None, list[JSON]]:
        """event.offline.get (event-offline-get.md). Without ``process_id``: the first unreserved records;
        ``clear`` deletes them, otherwise they are reserved under a new process id. With ``process_id``: the
        records of that batch not confirmed yet; ``clear`` then deletes the whole batch, "including records
        that were not included in the response due to limit". Returns ``(process_id, events)``;
        ``process_id`` is None when called with clear=1 and no process id."""
        with self._lock:
            self._expire(now)
            pool = [r for r in self._records if r.channel == channel and r.process_id == process_id]
            chosen = [
                record
                for record in pool
                if record.error == error and all(condition.holds(record) for condition in conditions)
            ]
            chosen = _sorted(chosen, order)[:limit]
            events = [record.for_get() for record in chosen]
            if clear:
                gone = {id(record) for record in (pool if process_id else chosen)}
                self._records = [record for record in self._records if id(record) not in gone]
                return process_id or None, events
            if not process_id:
                process_id = secrets.token_hex(16)
                for record in chosen:
                    record.process_id = process_id
                    record.reserved_at = now
            return process_id, events

    def clear(
        self, *, channel: str, process_id: str, ids: list[int], message_ids: list[str], now: float
    ) -> None:
        """event.offline.clear (event-offline-clear.md): delete the batch's records, or those of them named by
        ``message_id`` (which wins over ``id``) or ``id``. An empty ``process_id`` names the records outside
        any batch, erroneous ones included, as the page warns."""
        with self._lock:
            self._expire(now)

            def doomed(record: OfflineRecord) -> bool:
                if record.channel != channel or record.process_id != process_id:
                    return False
                if message_ids:
                    return record.message_id in message_ids
                if ids:
                    return record.id in ids
                return True

            self._records = [record for record in self._records if not doomed(record)]

    def mark_error(self, *, channel: str, process_id: str, message_ids: list[str], now: float) -> None:
        """event.offline.error (event-offline-error.md): the batch's records with these keys are marked
        erroneous and released from the batch; records with the same keys outside the batch are deleted
        (so a wrong ``process_id`` marks nothing and deletes them); records already marked stay as they are."""
        if not message_ids:
            return
        with self._lock:
            self._expire(now)
            self._records = [
                record
                for record in self._records
                if not (
                    record.channel == channel
                    and record.message_id in message_ids
                    and record.process_id != process_id
                )
            ]
            for record in self._records:
                if (
                    record.channel == channel
                    and record.process_id == process_id
                    and record.message_id in message_ids
                    and not record.error
                ):
                    record.error = True
                    record.process_id = ""
                    record.reserved_at = 0.0

    def read(
        self, *, channel: str, conditions: list[Condition], order: list[tuple[str, bool]], now: float
    ) -> list[JSON]:
        """event.offline.list (event-offline-list.md): every matching record of the channel, unchanged."""
        with self._lock:
            self._expire(now)
            rows = [
                record
                for record in self._records
                if record.channel == channel and all(condition.holds(record) for condition in conditions)
            ]
            return [record.for_list() for record in _sorted(rows, order)]

    def records(self, channel: str | None = None) -> list[OfflineRecord]:
        """Copies of the records (of one source key, or all), oldest first: for tests and the portal page."""
        with self._lock:
            return [replace(r) for r in self._records if channel is None or r.channel == channel]

    def drop(self) -> None:
        with self._lock:
            self._records.clear()


# --------------------------------------------------------------------------------------------------------
# Delivering online events


def post_form(
    url: str, pairs: list[tuple[str, str]], *, timeout: float, user_agent: str
) -> tuple[int | None, str | None]:
    """POST ``pairs`` form-encoded to ``url`` once; ``(HTTP status, None)`` or ``(None, what went wrong)``.

    ``http.client`` rather than ``urllib``: no proxy from the environment, no redirect followed (a
    redirect is the handler's answer, recorded as its status), nothing but the one request.
    """
    parts = urlsplit(url)
    connection_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_type(parts.hostname or "", parts.port, timeout=timeout)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    body = urlencode(pairs).encode("utf-8")
    headers = {"Content-Type": "application/x-www-form-urlencoded", "User-Agent": user_agent}
    try:
        connection.request("POST", target, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status, None
    except (OSError, http.client.HTTPException) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    finally:
        connection.close()


class Courier:
    """Bitrix24's queue server in small: jobs (one event to one handler each) run on a few background
    threads, in the order queued but in parallel, each once. :meth:`wait` blocks until all are done."""

    def __init__(self, workers: int = 4, name: str = "standin-courier") -> None:
        self._workers = workers
        self._name = name
        self._cond = threading.Condition()
        self._jobs: deque[Callable[[], None]] = deque()
        self._busy = 0
        self._threads: list[threading.Thread] = []
        self._stopping = False

    def put(self, job: Callable[[], None]) -> None:
        with self._cond:
            if self._stopping:
                return  # the stand-in is shutting down: like a queue server that is gone, nothing is sent
            self._jobs.append(job)
            if len(self._threads) < self._workers and len(self._jobs) > self._idle():
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
            self._cond.notify()

    def _idle(self) -> int:
        return len(self._threads) - self._busy

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._jobs.popleft()
                self._busy += 1
            try:
                job()
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def wait(self, timeout: float) -> bool:
        """Block until no job is queued or running; False if ``timeout`` seconds passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and not self._busy, timeout)

    def stop(self, timeout: float = 2.0) -> None:
        """Drop queued jobs and let the threads end (a job in flight finishes on its own)."""
        with self._cond:
            self._stopping = True
            self._jobs.clear()
            self._cond.notify_all()
            threads, self._threads = self._threads, []
        for thread in threads:
            with contextlib.suppress(RuntimeError):
                thread.join(timeout)
