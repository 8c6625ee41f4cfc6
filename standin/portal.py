"""A stand-in portal: one Bitrix24 account on its own port. Its jobs live in their own modules and meet here:
``state.py`` (install state, tokens, webhooks), ``records.py`` (entities), ``bindings.py`` (events and the
offline queue), ``placements.py`` and ``frames.py`` (widgets and the app's frame), ``batch.py``; this class
adds the REST API's front door (authorization, the leaky bucket, the operating-time limit, the method table),
users and ``app.info``, and the server."""

from __future__ import annotations

import time
from collections import deque
from http.server import BaseHTTPRequestHandler
from typing import Any

from . import batch, crm
from .base import RestError as _RestError
from .base import iso as _iso
from .bindings import EventsMixin
from .common import (
    _LICENSE_TYPES,
    INVALID_TOKEN,
    JSON,
    KNOWN_SCOPES,
    OPERATING_WINDOW,
    PAGE_SIZE,
    Answer,
    _Grant,
    _Hit,
    _split_scope,
    _text,
    _time_block,
)
from .events import (
    CRM_EVENTS,
)
from .frames import FramesMixin
from .records import RecordsMixin
from .state import Authority
from .transport import _Server

# --------------------------------------------------------------------------------------------------------
# A portal


class FakePortal(EventsMixin, FramesMixin, RecordsMixin):
    """One Bitrix24 account: its REST API on its own port, its install state, data and limits."""

    def __init__(
        self,
        standin: Authority,
        *,
        member_id: str,
        rate: float,
        burst: int,
        scope: str,
        status: str,
        license_family: str,
        handler: type[BaseHTTPRequestHandler],
        port: int = 0,
    ) -> None:
        super().__init__(
            standin,
            member_id=member_id,
            rate=rate,
            burst=burst,
            scope=scope,
            status=status,
            license_family=license_family,
        )
        # The request handler is the caller's (pages.PortalHandler): it renders pages that read this class,
        # so this module cannot import it without a circle.
        self._handler = handler
        self._servers: list[_Server] = []
        self._server = self._start_server(port)
        self.domain = f"{standin.host}:{self._server.port}"
        self.url = f"{self.standin.scheme}://{self.domain}"

    def __repr__(self) -> str:
        return f"<FakePortal {self.member_id} at {self.url}>"

    def _start_server(self, port: int = 0) -> _Server:
        server = _Server((self.standin.host, port), self._handler, self, self.standin.tls_context)
        self._servers.append(server)
        return server

    def _stop(self) -> None:
        for server in self._servers:
            server.stop()
        self._servers.clear()

    @property
    def level(self) -> float:
        """The leaky bucket's current level (drained up to now)."""
        with self._lock:
            elapsed = max(0.0, self.standin.now() - self._level_at)
            return max(0.0, self._level - elapsed * self.rate)

    def rename(self) -> str:
        """docs/bitrix24-protocol.md §6: a renamed portal answers the old domain with 302 to the new one.

        A new server starts on a new port; every older address now redirects each request to the same
        path and query on the current address. Returns the new domain.
        """
        server = self._start_server()
        with self._lock:
            self._server = server
            self.domain = f"{self.standin.host}:{server.port}"
            self.url = f"{self.standin.scheme}://{self.domain}"
        return self.domain

    def edit(
        self,
        entity: str,
        action: str,
        item_id: int | str | None = None,
        fields: JSON | None = None,
        *,
        user_id: int = 1,
        admin: bool = True,
    ) -> str:
        """A user adds, updates or deletes an item in the portal itself (not through the app): the data changes
        and the item's event is raised. Returns the item's ID. ValueError if it cannot be done."""
        if entity not in CRM_EVENTS or entity not in self.items:
            raise ValueError(f"{entity!r} is not one of {', '.join(CRM_EVENTS)}")
        try:
            if action == "add":
                item = str(self._entity_add(entity, {"fields": dict(fields or {})}, user_id))
            elif action == "update":
                item = self._id_param({"id": item_id})
                self._entity_update(entity, {"id": item, "fields": dict(fields or {})}, user_id)
            elif action == "delete":
                item = self._id_param({"id": item_id})
                self._entity_delete(entity, {"id": item})
            else:
                raise ValueError(f"action must be add, update or delete, not {action!r}")
        except _RestError as exc:
            raise ValueError(f"{entity} {item_id}: {exc.description}") from exc
        self.change(entity, item, action, user_id=user_id, admin=admin)
        return item

    def _admit(self) -> bool:
        """Leaky bucket, limits.md: drains at ``rate`` per second, each request adds one, over ``burst`` → 503."""
        with self._lock:
            now = self.standin.now()
            self._level = max(0.0, self._level - max(0.0, now - self._level_at) * self.rate)
            self._level_at = now
            if self._level + 1 > self.burst:
                self.bucket_stats["rejected"] += 1
                return False
            self._level += 1
            self.bucket_stats["calls"] += 1
            self.bucket_stats["max_level"] = max(self.bucket_stats["max_level"], self._level)
            return True

    def _handle(self, method: str, params: JSON) -> Answer:
        if self.deleted:
            return 500, {"error": "PORTAL_DELETED", "error_description": "Portal was deleted"}
        if not self.installed:
            return INVALID_TOKEN
        if not self._admit():
            return 503, {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"}
        grant, error = self.standin._check_access(params.get("auth"), self)
        if error is not None or grant is None:
            return error or INVALID_TOKEN
        hit = _Hit(grant.user_id, grant.admin, _text(params.get("auth_connector")))
        try:
            if method == "batch":
                return batch.run(
                    params, lambda inner, args: self._call(inner, args, grant, hit), self.standin.now()
                )
            return self._call(method, params, grant, hit)
        finally:
            self._hit_done(hit)

    def _operating_usage(self, method: str, now: float) -> tuple[float, float]:
        """Summed duration of ``method`` in the last 10 minutes and when the oldest share of it lapses."""
        with self._lock:
            records = self._operating.setdefault(method, deque())
            while records and records[0][0] <= now - OPERATING_WINDOW:
                records.popleft()
            used = sum(duration for _, duration in records)
            reset_at = records[0][0] + OPERATING_WINDOW if records else now + OPERATING_WINDOW
            return used, reset_at

    def _call(self, method: str, params: JSON, grant: _Grant, hit: _Hit) -> Answer:
        """Run one method with timing and the operating-time limit (limits.md: 429 OPERATION_TIME_LIMIT)."""
        started = self.standin.now()
        used, _ = self._operating_usage(method, started)
        if self.operating_limit is not None and used > self.operating_limit:
            return 429, {
                "error": "OPERATION_TIME_LIMIT",
                "error_description": "Method is blocked due to operation time limit.",
            }
        clock = time.perf_counter()
        if self.rest_latency > 0:
            time.sleep(self.rest_latency)
        if self.method_delays.get(method, 0) > 0:
            time.sleep(self.method_delays[method])
        result: Any = None
        extra: JSON = {}
        answer: Answer | None = None
        try:
            result, extra = self._run(method, params, grant, hit)
        except _RestError as exc:
            answer = exc.answer()
        if self.answer_delays.get(method, 0) > 0:
            time.sleep(self.answer_delays[method])
        processing = time.perf_counter() - clock
        finished = started + processing
        with self._lock:
            self._operating.setdefault(method, deque()).append((finished, processing))
        if answer is not None:
            return answer
        used, reset_at = self._operating_usage(method, finished)
        payload: JSON = {"result": result, **extra}
        payload["time"] = _time_block(
            started, finished, processing, operating=used, operating_reset_at=reset_at
        )
        return 200, payload

    def _run(self, method: str, params: JSON, grant: _Grant, hit: _Hit) -> tuple[Any, JSON]:
        if method == "app.info":
            return self._app_info(), {}
        if method == "profile":
            # api-reference/common/users/profile.md: ID comes as a string, ADMIN as a boolean.
            return {
                "ID": str(grant.user_id),
                "ADMIN": grant.admin,
                "NAME": f"User{grant.user_id}",
                "LAST_NAME": "Standin",
                "PERSONAL_GENDER": "",
                "TIME_ZONE": "",
            }, {}
        if method == "server.time":
            return _iso(self.standin.now()), {}
        if method == "scope":
            # scope.md: the scopes granted to the app on this portal.
            return sorted(_split_scope(self.scope)), {}
        if method == "method.get":
            # method-get.md: `name` in lower case; both false when it is empty.
            name = _text(params.get("name")).lower()
            existing = bool(name) and self._implements(name)
            needed = name.split(".")[0]
            available = existing and (needed not in KNOWN_SCOPES or needed in _split_scope(self.scope))
            return {"isExisting": existing, "isAvailable": available}, {}
        if method in ("user.current", "user.get"):
            if not _split_scope(self.scope) & {"user", "user_brief", "user_basic"}:
                raise _RestError(
                    403, "insufficient_scope", "The request requires higher privileges than provided."
                )
            if method == "user.current":
                return self._user(grant.user_id), {}
            return self._users(params)
        if method == "event.bind":
            return self._event_bind(params, grant), {}
        if method == "event.get":
            return self._event_get(grant), {}
        if method == "event.unbind":
            return self._event_unbind(params, grant), {}
        if method == "event.offline.get":
            return self._offline_get(params, grant), {}
        if method == "event.offline.clear":
            return self._offline_clear(params, grant), {}
        if method == "event.offline.error":
            return self._offline_error(params, grant), {}
        if method == "event.offline.list":
            return self._offline_list(params, grant)
        if method == "feature.get":
            return self._feature_get(params), {}
        if method.startswith("placement."):
            return self._placement_method(method, params, grant), {}
        entity, _, action = method.rpartition(".")
        if entity in self.items and action in ("list", "add", "get", "update", "delete", "fields"):
            needed = entity.split(".")[0]
            if needed in KNOWN_SCOPES and needed not in _split_scope(self.scope):
                raise _RestError(
                    403, "insufficient_scope", "The request requires higher privileges than provided."
                )
            if action == "fields":
                if not crm.handles(entity):
                    raise _RestError(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
                return crm.describe(entity), {}
            if action == "list":
                return self._entity_list(entity, params)
            if action == "get":
                return self._entity_get(entity, params), {}
            if action == "add":
                new_id = self._entity_add(entity, params, grant.user_id)
                self._changed(entity, new_id, action, params, hit)
                return new_id, {}
            if action == "update":
                done = self._entity_update(entity, params, grant.user_id)
                self._changed(entity, self._id_param(params), action, params, hit)
                return done, {}
            done = self._entity_delete(entity, params)
            self._changed(entity, self._id_param(params), action, params, hit)
            return done, {}
        raise _RestError(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")

    # Methods answered here besides the CRM entities' (method.get tells a caller which exist).
    _METHODS = frozenset(
        {
            "app.info",
            "profile",
            "server.time",
            "scope",
            "method.get",
            "user.current",
            "user.get",
            "batch",
            "event.bind",
            "event.get",
            "event.unbind",
            "event.offline.get",
            "event.offline.clear",
            "event.offline.error",
            "event.offline.list",
            "feature.get",
            "placement.bind",
            "placement.unbind",
            "placement.get",
            "placement.list",
        }
    )

    def _implements(self, name: str) -> bool:
        entity, _, action = name.rpartition(".")
        if entity in self.items and action in ("list", "add", "get", "update", "delete"):
            return True
        return name in self._METHODS or (action == "fields" and crm.handles(entity))

    def _user(self, user_id: int) -> JSON:
        """user-current.md: ID as a string, ACTIVE a boolean, IS_ONLINE "Y"/"N", UF_DEPARTMENT integers."""
        joined = _iso(self.standin.now() - 86400 * 30)
        return {
            "ID": str(user_id),
            "ACTIVE": True,
            "NAME": f"User{user_id}",
            "LAST_NAME": "Standin",
            "SECOND_NAME": "",
            "EMAIL": f"user{user_id}@{self.domain.split(':')[0]}.test",
            "LAST_LOGIN": _iso(self.standin.now()),
            "DATE_REGISTER": joined,
            "TIME_ZONE": "",
            "IS_ONLINE": "Y",
            "PERSONAL_GENDER": "",
            "PERSONAL_BIRTHDAY": "",
            "WORK_POSITION": "",
            "UF_EMPLOYMENT_DATE": "",
            "UF_DEPARTMENT": [1],
            "USER_TYPE": "employee",
        }

    def _users(self, params: JSON) -> tuple[Any, JSON]:
        """user-get.md: the portal's users (every user tokens were issued for, and user 1), `FILTER` (or
        `filter`) with the list filter prefixes, `ID` on its own too; 50 a page with `total`."""
        with self.standin._lock:
            known = {
                grant.user_id for grant in self.standin._access.values() if grant.member_id == self.member_id
            }
        users = [self._user(user_id) for user_id in sorted(known | {1})]
        raw = params.get("FILTER", params.get("filter"))
        filters: JSON = dict(raw) if isinstance(raw, dict) else {}
        if params.get("ID") not in (None, ""):
            filters["ID"] = params["ID"]
        rows = [user for user in users if crm.matches(user, filters)]
        return rows[:PAGE_SIZE], {"total": len(rows)}

    def _app_info(self) -> JSON:
        """The portal's own app.info (api-reference/common/system/app-info.md, appinfo-portal-docs.json)."""
        license_type = _LICENSE_TYPES.get(self.license_family, self.license_family)
        return {
            "ID": 1,
            "CODE": self.standin.client_id,
            "VERSION": self.app_version,
            "STATUS": self.status,
            "INSTALLED": self.installed,
            "PAYMENT_EXPIRED": "Y" if self.payment_required else "N",
            "DAYS": None,
            "LANGUAGE_ID": self.language_id,
            "LICENSE": f"{self.language_id}_{license_type}",
            "LICENSE_TYPE": license_type,
            "LICENSE_FAMILY": self.license_family,
        }
