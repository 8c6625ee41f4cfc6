"""A portal's events: bindings (api-reference/events/event-bind.md, event-get.md, event-unbind.md), raising
events on writes and by hand, delivering online ones, and the offline queue's methods
(api-reference/events/offline-events.md, event-offline-*.md)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from . import payloads
from .base import RestError as _RestError
from .common import (
    JSON,
    _array,
    _flag,
    _Grant,
    _Hit,
    _min_timeout,
    _positive,
    _require_loopback_url,
    _same_binding,
    _split_scope,
    _text,
)
from .events import (
    CRM_EVENTS,
    FEATURE_CONNECTOR,
    FEATURE_EXTENDED,
    LIST_PAGE,
    OFFLINE_BATCH,
    crm_event,
    parse_filter,
    parse_order,
    post_form,
)
from .state import PortalState
from .transport import _Handler


class EventsMixin(PortalState):
    """Event bindings, raising and delivering events, the offline queue."""

    def _event_kind(self, params: JSON) -> bool:
        """``event_type``: True for offline; "online" (the default) or "offline", any case."""
        value = _text(params.get("event_type")).lower() or "online"
        if value not in ("online", "offline"):
            raise _RestError(400, "ERROR_ARGUMENT", "Value must be one of {online|offline}")
        return value == "offline"

    def _source_key(self, params: JSON) -> str:
        """``auth_connector``; a plan without source keys answers WRONG_LICENSE (event-bind.md)."""
        key = _text(params.get("auth_connector"))
        if key and not self.features.get(FEATURE_CONNECTOR):
            raise _RestError(
                403, "WRONG_LICENSE", "This feature is not enabled for the current license: auth_connector"
            )
        return key

    def _bind_auth_type(self, params: JSON, grant: _Grant) -> str:
        """event-bind.md: by default an administrator's binding is authorized as whoever triggers the event
        ("0"), a non-administrator's as that user; a non-administrator may name only themselves."""
        raw = _text(params.get("auth_type"))
        if not raw:
            return "0" if grant.admin else str(grant.user_id)
        if not raw.isdigit():
            # Not documented; auth_type is an integer on the page.
            raise _RestError(400, "ERROR_ARGUMENT", "Argument 'AUTH_TYPE' must be an integer")
        auth_type = str(int(raw))
        if not grant.admin and auth_type != str(grant.user_id):
            raise _RestError(
                403,
                "ACCESS_DENIED",
                "Access denied! Event binding with AUTH_TYPE requires administrator access rights",
            )
        return auth_type

    def _event_bind(self, params: JSON, grant: _Grant) -> bool:
        event = _text(params.get("event")).upper()
        if not event:
            raise _RestError(400, "ERROR_ARGUMENT", "Argument 'EVENT' is null or empty")
        # event-bind.md: "The event must belong to the application's scope or be a basic event".
        if not event.startswith("ON") or (
            event.startswith("ONCRM") and "crm" not in _split_scope(self.scope)
        ):
            raise _RestError(400, "ERROR_EVENT_NOT_FOUND", "Event not found")
        offline = self._event_kind(params)
        key = self._source_key(params)
        binding: JSON
        if offline:
            if not grant.admin:
                raise _RestError(
                    403,
                    "ACCESS_DENIED",
                    "Access denied! Offline events binding requires administrator access rights",
                )
            if event == "ONOFFLINEEVENT":
                # on-offline-event.md: "the queue notification itself is not placed into the queue".
                raise _RestError(400, "ERROR_ARGUMENT", "Offline event cannot be registered for this event.")
            # offline-events.md: no handler URL (ignored if sent), auth_type ignored.
            binding = {"event": event, "handler": "", "auth_type": "0", "offline": 1, "auth_connector": key}
        else:
            handler = params.get("handler")
            if not isinstance(handler, str) or not handler.strip():
                raise _RestError(400, "ERROR_ARGUMENT", "Argument 'HANDLER' is null or empty")
            parts = urlsplit(handler.strip())
            if parts.scheme.lower() not in ("http", "https"):
                raise _RestError(400, "ERROR_UNSUPPORTED_PROTOCOL", "Unsupported handler protocol")
            # event-bind.md: "The host name must contain a dot, so localhost is not accepted".
            if "." not in (parts.hostname or ""):
                raise _RestError(400, "ERROR_WRONG_HANDLER_URL", "Wrong handler URL")
            binding = {
                "event": event,
                "handler": handler.strip(),
                "auth_type": self._bind_auth_type(params, grant),
                "offline": 0,
            }
            options = params.get("options")
            if isinstance(options, dict) and options:
                binding["options"] = dict(options)  # ONOFFLINEEVENT's minTimeout (on-offline-event.md)
        with self._lock:
            if any(_same_binding(existing, binding) for existing in self.events):
                # event-bind.md lists this answer; apps in the wild look for "already binded" in it.
                raise _RestError(400, "ERROR_CORE", "Unable to set event handler: Handler already binded")
            binding["id"] = self._next_binding
            self._next_binding += 1
            self.events.append(binding)
        return True

    def _event_get(self, grant: _Grant) -> list[JSON]:
        """event-get.md: online bindings as ``event, handler, auth_type, offline``, offline ones as ``event,
        connector_id, offline``; an administrator sees all, anyone else only those authorized as them."""
        with self._lock:
            bindings = [dict(binding) for binding in self.events]
        shown: list[JSON] = []
        for binding in bindings:
            if binding["offline"]:
                if grant.admin:
                    shown.append(
                        {"event": binding["event"], "connector_id": binding["auth_connector"], "offline": 1}
                    )
            elif grant.admin or binding["auth_type"] == str(grant.user_id):
                shown.append(
                    {
                        "event": binding["event"],
                        "handler": binding["handler"],
                        "auth_type": binding["auth_type"],
                        "offline": 0,
                    }
                )
        return shown

    def _event_unbind(self, params: JSON, grant: _Grant) -> JSON:
        """event-unbind.md: removes every binding matching ``event`` and, online, ``handler`` (and
        ``auth_type`` when given: "0" or empty for "the user who triggered the event"); offline, the one of
        the ``auth_connector`` given (none: those without a source key). Answers ``{"count": n}``."""
        event = _text(params.get("event")).upper()
        if not event:
            raise _RestError(400, "ERROR_ARGUMENT", "Argument 'EVENT' is null or empty")
        offline = self._event_kind(params)
        key = self._source_key(params)
        if offline:
            if not grant.admin:
                raise _RestError(
                    403,
                    "ACCESS_DENIED",
                    "Access denied! Offline events unbinding requires administrator access rights",
                )

            def matches(binding: JSON) -> bool:
                return (
                    bool(binding["offline"])
                    and binding["event"] == event
                    and binding["auth_connector"] == key
                )

        else:
            handler = params.get("handler")
            if not isinstance(handler, str) or not handler.strip():
                raise _RestError(400, "ERROR_ARGUMENT", "Argument 'HANDLER' is null or empty")
            wanted: str | None
            if "auth_type" in params:
                raw = _text(params.get("auth_type"))
                wanted = str(int(raw)) if raw.isdigit() else raw or "0"
                if not grant.admin and wanted != str(grant.user_id):
                    raise _RestError(
                        403,
                        "ACCESS_DENIED",
                        "Access denied! Event unbinding with AUTH_TYPE requires administrator access rights",
                    )
            else:
                # Without auth_type an administrator removes every user's bindings, anyone else their own.
                wanted = None if grant.admin else str(grant.user_id)

            def matches(binding: JSON) -> bool:
                return (
                    not binding["offline"]
                    and binding["event"] == event
                    and binding["handler"] == handler.strip()
                    and (wanted is None or binding["auth_type"] == wanted)
                )

        with self._lock:
            removed = [binding for binding in self.events if matches(binding)]
            self.events[:] = [binding for binding in self.events if not matches(binding)]
            for binding in removed:
                self._notified.pop(binding["id"], None)
        return {"count": len(removed)}

    def _feature_get(self, params: JSON) -> JSON:
        """api-reference/common/system/feature-get.md: ``{"value": "Y"|"N"}`` for ``CODE``."""
        code = _text(params.get("CODE", params.get("code")))
        if not code:
            raise _RestError(400, "CODE_EMPTY", "CODE can't be empty")
        return {"value": "Y" if self.features.get(code) else "N"}

    def _changed(self, entity: str, item_id: Any, action: str, params: JSON, hit: _Hit) -> None:
        """A REST write changed an item: raise its event. A command's own ``auth_connector`` wins over the
        request's (not documented for batch: a command without one takes the batch's)."""
        event = crm_event(entity, action)
        if event is not None:
            key = _text(params.get("auth_connector")) or hit.auth_connector
            self._raise(event, {"FIELDS": {"ID": str(item_id)}}, hit, key)

    def _raise(self, event: str, data: Any, hit: _Hit, source_key: str) -> None:
        """Hand ``event`` to every binding of it: online ones to the courier (the REST answer does not wait
        for them), offline ones into the queue of their source key — unless the change was made with that
        same key (offline-events.md, "How to Avoid Cycles"). Online bindings get the event whatever key
        the writer passed: only offline queues know source keys."""
        with self._lock:
            if not self.installed:
                return
            bindings = [dict(binding) for binding in self.events if binding["event"] == event]
        for binding in bindings:
            if not binding["offline"]:
                self._send(binding, event, data, hit)
                continue
            channel = binding["auth_connector"]
            if channel and channel == source_key:
                continue
            self.offline.write(
                channel=channel, event=event, data=data, user_id=hit.user_id, now=self.standin.now()
            )
            hit.offline_written = True

    def _hit_done(self, hit: _Hit) -> None:
        """After a request that wrote to the offline queue: raise ONOFFLINEEVENT on its online bindings, each
        at most once per ``options[minTimeout]`` seconds (default 1; on-offline-event.md). What is written
        while a binding waits out its timeout is not announced later on its own (whether Bitrix24 sends a
        late notification is not documented): an app must empty the queue whenever it is told."""
        if not hit.offline_written:
            return
        now = self.standin.now()
        due: list[JSON] = []
        with self._lock:
            for binding in self.events:
                if binding["event"] != "ONOFFLINEEVENT" or binding["offline"]:
                    continue
                last = self._notified.get(binding["id"])
                if last is not None and now - last < _min_timeout(binding):
                    continue
                self._notified[binding["id"]] = now
                due.append(dict(binding))
        for binding in due:
            # on-offline-event.md: "data arrives empty" (an empty array, which a form does not carry).
            self._send(binding, "ONOFFLINEEVENT", [], hit)

    def _send(self, binding: JSON, event: str, data: Any, hit: _Hit) -> None:
        """Queue one delivery. event-bind.md: auth_type "0" authorizes the handler as the user who triggered
        the event, another value as that user."""
        queued = self.standin.now()
        user_id = hit.user_id if binding["auth_type"] == "0" else int(binding["auth_type"])
        admin = hit.admin and user_id == hit.user_id
        self.standin._courier.put(lambda: self._deliver(binding, event, data, user_id, admin, queued))

    def _deliver(
        self, binding: JSON, event: str, data: Any, user_id: int, admin: bool, queued: float
    ) -> None:
        """Post one event, once, as the queue server does, and record the outcome in ``deliveries``:
        ``{"event", "handler", "event_handler_id", "user_id", "form" (the pairs posted), "status" (HTTP status
        or None), "error" (None or why nothing was answered), "refused" (True when nothing was sent),
        "queued", "started", "finished" (the stand-in's clock)}``. Failures are not retried
        (api-reference/events/index.md). Only loopback handlers are called: the stand-in is a development
        tool and sends live tokens; anything else is recorded as refused."""
        handler = str(binding["handler"])
        record: JSON = {
            "event": event,
            "handler": handler,
            "event_handler_id": str(binding["id"]),
            "user_id": user_id,
            "form": [],
            "status": None,
            "error": None,
            "refused": False,
            "queued": queued,
            "started": self.standin.now(),
        }
        try:
            _require_loopback_url(handler)
        except ValueError as exc:
            record["refused"], record["error"] = True, f"refused: {exc}"
        else:
            # Tokens are the user's own, usable against the REST API (api-reference/events/index.md); a change
            # without a user (user_id 0, "by an agent") carries none.
            tokens = self.issue_tokens(user_id, admin=admin) if user_id else None
            pairs = payloads.event(self, event, data, tokens, handler_id=binding["id"])
            record["form"] = pairs
            record["status"], record["error"] = post_form(
                handler, pairs, timeout=self.standin.delivery_timeout, user_agent=_Handler.server_version
            )
        record["finished"] = self.standin.now()
        with self._lock:
            self.deliveries.append(record)

    def change(
        self,
        entity: str,
        item_id: int | str,
        action: str = "update",
        *,
        user_id: int = 1,
        admin: bool = True,
        auth_connector: str = "",
    ) -> None:
        """Someone changed ``entity`` item ``item_id`` in the portal (``action``: add, update or delete):
        raise its event (``crm.deal`` + ``update`` → ONCRMDEALUPDATE, data ``{"FIELDS": {"ID": …}}``) as the
        portal would. The item itself is not touched (see :meth:`edit`). ``user_id`` 0: a change without a
        user (an agent), whose online events carry no token. Raises ValueError for an entity without events."""
        event = crm_event(entity, action)
        if event is None:
            raise ValueError(
                f"no event for {entity}.{action}: entities with events are {', '.join(CRM_EVENTS)}"
            )
        self.fire(
            event,
            {"FIELDS": {"ID": str(item_id)}},
            user_id=user_id,
            admin=admin,
            auth_connector=auth_connector,
        )

    def fire(
        self, event: str, data: Any = None, *, user_id: int = 1, admin: bool = True, auth_connector: str = ""
    ) -> None:
        """Raise any event with any ``data`` on this portal, as one request would: online bindings get it
        through the courier, offline ones in their queue, then ONOFFLINEEVENT as due."""
        hit = _Hit(user_id, admin, auth_connector)
        self._raise(event.upper(), data, hit, auth_connector)
        self._hit_done(hit)

    def offline_queue(self, auth_connector: str = "") -> list[JSON]:
        """The offline queue of one source key (default: none), as event.offline.list shows it, by ID."""
        return [record.for_list() for record in self.offline.records(auth_connector)]

    def _offline_queue_key(self, params: JSON, grant: _Grant) -> str:
        """The event.offline.* pages: "Who can execute the method: administrator" (403 ACCESS_DENIED "Access
        denied!"), in an application's context only — every stand-in token is an application's. Returns the
        source key whose queue the call works on."""
        if not grant.admin:
            raise _RestError(403, "ACCESS_DENIED", "Access denied!")
        return self._source_key(params)

    def _offline_get(self, params: JSON, grant: _Grant) -> JSON:
        """event-offline-get.md: ``{"process_id": …, "events": [...]}``."""
        key = self._offline_queue_key(params, grant)
        clear = _flag(params.get("clear"), default=True)
        if not clear and not self.features.get(FEATURE_EXTENDED):
            raise _RestError(
                403,
                "WRONG_LICENSE",
                "This feature is not enabled for the current license: extended offline events handling",
            )
        limit = _positive(params.get("limit"), OFFLINE_BATCH)
        process_id, events = self.offline.take(
            channel=key,
            conditions=parse_filter(params.get("filter"), listing=False),
            order=parse_order(params.get("order"), listing=False),
            limit=min(limit, OFFLINE_BATCH),
            clear=clear,
            process_id=_text(params.get("process_id")),
            error=_flag(params.get("error"), default=False),
            now=self.standin.now(),
        )
        return {"process_id": process_id, "events": events}

    def _offline_clear(self, params: JSON, grant: _Grant) -> bool:
        """event-offline-clear.md: always ``true``; ``message_id`` wins over ``id``; an empty ``process_id``
        (allowed, unlike a missing one) names the records outside every batch."""
        key = self._offline_queue_key(params, grant)
        if params.get("process_id") is None:
            raise _RestError(400, "ERROR_ARGUMENT", "Argument 'PROCESS_ID' is null or empty")
        ids = _array(params.get("id"), "Value must be array of integers")
        if not all(str(item).isdigit() and int(str(item)) > 0 for item in ids):
            raise _RestError(400, "ERROR_ARGUMENT", "Value must be array of integers")
        message_ids = _array(params.get("message_id"), "Value must be array of MESSAGE_ID values")
        if not all(isinstance(item, str) and len(item) == 32 for item in message_ids):
            raise _RestError(400, "ERROR_ARGUMENT", "Value must be array of MESSAGE_ID values")
        self.offline.clear(
            channel=key,
            process_id=_text(params.get("process_id")),
            ids=[int(str(item)) for item in ids],
            message_ids=[str(item) for item in message_ids],
            now=self.standin.now(),
        )
        return True

    def _offline_error(self, params: JSON, grant: _Grant) -> bool:
        """event-offline-error.md: always ``true``; message_id is required (an array), its length unchecked."""
        key = self._offline_queue_key(params, grant)
        if params.get("process_id") is None:
            raise _RestError(400, "ERROR_ARGUMENT", "Argument 'PROCESS_ID' is null or empty")
        if params.get("message_id") is None:
            raise _RestError(400, "ERROR_ARGUMENT", "Value must be array of MESSAGE_ID values")
        message_ids = _array(params.get("message_id"), "Value must be array of MESSAGE_ID values")
        self.offline.mark_error(
            channel=key,
            process_id=_text(params.get("process_id")),
            message_ids=[str(item) for item in message_ids],
            now=self.standin.now(),
        )
        return True

    def _offline_list(self, params: JSON, grant: _Grant) -> tuple[list[JSON], JSON]:
        """event-offline-list.md: pages of 50 by ``start``, with ``total`` and ``next``; changes nothing."""
        key = self._offline_queue_key(params, grant)
        rows = self.offline.read(
            channel=key,
            conditions=parse_filter(params.get("filter"), listing=True),
            order=parse_order(params.get("order"), listing=True),
            now=self.standin.now(),
        )
        try:
            start = max(int(_text(params.get("start")) or 0), 0)
        except ValueError:
            start = 0
        extra: JSON = {}
        if start + LIST_PAGE < len(rows):
            extra["next"] = start + LIST_PAGE
        extra["total"] = len(rows)
        return rows[start : start + LIST_PAGE], extra
