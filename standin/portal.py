"""A stand-in portal: its REST API (CRM, users, events, placements, offline queue, batch), its rate and
operating-time limits, and the pages a portal shows (the app's frame, the console)."""

from __future__ import annotations

import hmac
import html
import json
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from . import crm, payloads
from . import form as phpform
from . import placements as widgets
from .base import RestError as _RestError
from .base import iso as _iso
from .common import (
    _LICENSE_TYPES,
    APP_FRAME_ID,
    DEFAULT_ENTITIES,
    FRAME_REPORT_PATH,
    INVALID_TOKEN,
    JSON,
    KNOWN_SCOPES,
    MAX_BATCH,
    MAX_FRAMES,
    OPERATING_WINDOW,
    PAGE_SIZE,
    Answer,
    _array,
    _Code,
    _flag,
    _Grant,
    _Hit,
    _min_timeout,
    _origin,
    _php_array,
    _positive,
    _require_loopback_url,
    _same_binding,
    _split_scope,
    _static,
    _text,
    _time_block,
)
from .events import (
    CRM_EVENTS,
    FEATURE_CONNECTOR,
    FEATURE_EXTENDED,
    LIST_PAGE,
    OFFLINE_BATCH,
    OfflineQueue,
    crm_event,
    parse_filter,
    parse_order,
    post_form,
)
from .transport import _Handler, _PortalHandler, _Server

if TYPE_CHECKING:
    from .oauth import StandIn


# --------------------------------------------------------------------------------------------------------
# A portal


class FakePortal:
    """One Bitrix24 account: its REST API on its own port, its install state, data and limits."""

    def __init__(
        self,
        standin: StandIn,
        *,
        member_id: str,
        rate: float,
        burst: int,
        scope: str,
        status: str,
        license_family: str,
        port: int = 0,
    ) -> None:
        self.standin = standin
        self.member_id = member_id
        self._webhooks: dict[tuple[int, str], str] = {}
        self.rate = rate
        self.burst = burst
        self.scope = scope
        self.status = status
        self.license_family = license_family
        self.application_token = secrets.token_hex(16)
        self.installed = True
        self.payment_required = False
        self.deleted = False
        self.app_version = 1
        self.language_id = "en"
        self.member_type = "PORTAL"  # present in app.info's install block; its values are not documented
        self.items: dict[str, list[JSON]] = {entity: [] for entity in DEFAULT_ENTITIES}
        self.bucket_stats: JSON = {"calls": 0, "rejected": 0, "max_level": 0.0}
        self.operating_limit: float | None = None
        self.rest_latency: float = 0.0
        self.write_delay: float = 0.0
        # Seconds one method sleeps before it runs, or after it ran and before it answers (a slow portal at
        # the worst moment, for fault tests: a caller killed meanwhile never learns what was done).
        self.method_delays: dict[str, float] = {}
        self.answer_delays: dict[str, float] = {}
        # Bindings made with event.bind, in the order made: {"id", "event", "handler", "auth_type",
        # "offline"}, plus "auth_connector" on offline ones and "options" when bound with options.
        self.events: list[JSON] = []
        # What the queue server did with each online event: see _deliver.
        self.deliveries: list[JSON] = []
        self.offline = OfflineQueue()
        # feature.get codes (api-reference/common/system/feature-get.md). auth_connector is "available on the
        # Professional plan and above" (offline-events.md); which plans have the extended offline mode is not
        # documented, the stand-in gives it to the same ones. Tests may flip either.
        top_plan = license_family in ("pro", "ent", "nfr")
        self.features: dict[str, bool] = {FEATURE_EXTENDED: top_plan, FEATURE_CONNECTOR: top_plan}
        # The hand-firing page's forms carry this, so that another page open in the same browser cannot
        # post to them.
        self.console_token = secrets.token_hex(16)
        self.calls: list[tuple[str, str, JSON]] = []
        # Widgets bound with placement.bind, in the order made (shape in placements.py).
        self.placements: list[JSON] = []
        # Whether an app page called BX24.installFinish() (sdk/bx24-js-sdk/system-functions/
        # bx24-install-finish.md). Until then placements show to administrators only (placement-bind.md).
        self.install_finished = False
        # What app frames told the portal through the JS library: {"command", "app_sid", "user_id",
        # "placement", "at"} (installFinish only; fitWindow and resizeWindow stay in the browser).
        self.frame_messages: list[JSON] = []
        self._frames: dict[str, JSON] = {}  # APP_SID -> the frame page that was rendered with it
        self._next_binding = 1
        self._next_placement = 1
        self._notified: dict[int, float] = {}  # ONOFFLINEEVENT binding id -> when it was last raised
        self._lock = threading.RLock()
        self._level = 0.0
        self._level_at = standin.now()
        self._operating: dict[str, deque[tuple[float, float]]] = {}
        self._servers: list[_Server] = []
        self._server = self._start_server(port)
        self.domain = f"{standin.host}:{self._server.port}"
        self.url = f"http://{self.domain}"

    def __repr__(self) -> str:
        return f"<FakePortal {self.member_id} at {self.url}>"

    # ---- lifecycle and state changes used by tests

    def _start_server(self, port: int = 0) -> _Server:
        server = _Server((self.standin.host, port), _PortalHandler, self)
        self._servers.append(server)
        return server

    def _stop(self) -> None:
        for server in self._servers:
            server.stop()
        self._servers.clear()

    @property
    def client_endpoint(self) -> str:
        return self.url + "/rest/"

    @property
    def level(self) -> float:
        """The leaky bucket's current level (drained up to now)."""
        with self._lock:
            elapsed = max(0.0, self.standin.now() - self._level_at)
            return max(0.0, self._level - elapsed * self.rate)

    def issue_tokens(self, user_id: int = 1, *, admin: bool = True) -> JSON:
        """Register a new access + refresh pair for ``user_id``; shaped like refresh-response-docs.json."""
        grant = self.standin._issue(self, user_id, admin)
        return self.standin._token_answer(self, grant)

    def issue_code(self, user_id: int = 1, *, admin: bool = True) -> str:
        """An authorization code (settings/oauth/index.md, 3-legged flow) for ``grant_type=authorization_code``."""
        code = secrets.token_hex(16)
        with self.standin._lock:
            self.standin._codes[code] = _Code(self.member_id, user_id, admin, self.standin.now())
        return code

    def app_frame_page(
        self,
        handler: str,
        *,
        user_id: int = 1,
        admin: bool = True,
        placement: str = "DEFAULT",
        lang: str = "en",
        options: Mapping[str, Any] | None = None,
    ) -> str:
        """The HTML a portal serves when a user opens the app: fresh tokens for that user, posted by a form
        whose ``target`` is an ``<iframe>`` on the same page (settings/oauth/simple-way.md, "What the
        Application Receives on Opening"). The fields are exactly :func:`payloads.launch`'s: ``DOMAIN``,
        ``PROTOCOL``, ``LANG`` and ``APP_SID`` in the action's query string, the rest as hidden inputs;
        ``options`` become ``PLACEMENT_OPTIONS`` (JSON as PHP writes it, api-reference/widgets/crm/
        detail-tab.md).

        The page also answers the JS library inside the frame (``/api/v1/``, see ``static/bx24.js``) over
        ``postMessage``, as a portal page answers BX24.js: its one script submits the form and listens.

        ``handler`` is the app's URL (its "handler path"). Only loopback hosts are accepted: this is a
        development tool that hands out live tokens, not a redirector. Raises ValueError otherwise.
        """
        _require_loopback_url(handler)
        tokens = self.issue_tokens(user_id, admin=admin)
        query, body = payloads.launch(self, tokens, placement=placement, options=options, lang=lang)
        action = handler + ("&" if "?" in handler else "?") + urlencode(query)
        inputs = "\n".join(
            f'    <input type="hidden" name="{html.escape(name)}" value="{html.escape(value)}">'
            for name, value in body.items()
        )
        secret = secrets.token_hex(16)
        self._remember_frame(
            query["APP_SID"],
            {"secret": secret, "user_id": user_id, "admin": admin, "placement": placement},
        )
        raw_options = body.get("PLACEMENT_OPTIONS", "")
        try:
            parsed_options = json.loads(raw_options) if raw_options else {}
        except ValueError:
            parsed_options = {}
        init: JSON = {
            **query,
            "AUTH_ID": body["AUTH_ID"],
            "AUTH_EXPIRES": body["AUTH_EXPIRES"],
            "REFRESH_ID": body["REFRESH_ID"],
            "member_id": body["member_id"],
            "MEMBER_ID": body["member_id"],
            "PLACEMENT": placement,
            "PLACEMENT_OPTIONS": raw_options,
            "USER_ID": user_id,
            "IS_ADMIN": admin,
            "INSTALL": not self.install_finished,
            # What the official JS SDK's getInitData also reads: the options as an object, the REST path.
            "SDK_PLACEMENT_OPTIONS": parsed_options if isinstance(parsed_options, dict) else {},
            "FIRST_RUN": False,
            "PATH": "/rest/",
        }
        frame_config = json.dumps(
            {"appOrigin": _origin(handler), "secret": secret, "reportUrl": FRAME_REPORT_PATH, "init": init}
        )
        domain = html.escape(self.domain)
        frame_name = f"{self.domain}|{query['PROTOCOL']}|{query['APP_SID']}"
        finished = "installFinish called" if self.install_finished else "installFinish not called yet"
        return f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{domain} — Bitrix24 stand-in</title>
  <style>
    body {{ margin: 0; font: 14px system-ui, sans-serif; background: #eef2f4; }}
    header {{ background: #2fc6f6; color: #fff; padding: 10px 16px; }}
    iframe {{ display: block; width: calc(100% - 32px); height: 80vh; margin: 16px; border: 0;
              background: #fff; border-radius: 8px; }}
  </style>
</head>
<body>
  <header>Bitrix24 stand-in · portal <b>{domain}</b> · user {int(user_id)} · placement {html.escape(placement)}
    · <span id="standin-status">{finished}</span></header>
  <form id="launch" method="post" action="{html.escape(action)}" target="{html.escape(frame_name)}">
{inputs}
    <noscript><button type="submit">Open the app</button></noscript>
  </form>
  <iframe name="{html.escape(frame_name)}" id="{APP_FRAME_ID}" title="Application"
          data-standin="{html.escape(frame_config)}"></iframe>
  <script>{_static("frame.js")}</script>
</body>
</html>
"""

    def open_placement(
        self,
        placement: str,
        *,
        options: Mapping[str, Any] | None = None,
        user_id: int = 1,
        admin: bool = True,
        lang: str = "en",
        handler: str = "",
    ) -> str:
        """The portal page of a *bound* widget: :meth:`app_frame_page` for the handler bound to
        ``placement`` (the first one, or ``handler`` among them), with ``options`` as PLACEMENT_OPTIONS
        (``{"ID": "3"}`` for CRM_DEAL_DETAIL_TAB). ValueError when nothing is bound, or when an ordinary user
        opens it before BX24.installFinish() (placement-bind.md: until the install is complete widgets are
        "only visible to users with administrative rights")."""
        binding = self.bound_handler(placement, handler)
        if not admin and not self.install_finished:
            raise ValueError(
                f"{binding['placement']} shows to administrators only until the app calls "
                "BX24.installFinish() (placement-bind.md)"
            )
        return self.app_frame_page(
            binding["handler"],
            user_id=user_id,
            admin=admin,
            placement=binding["placement"],
            lang=lang,
            options=options,
        )

    def _remember_frame(self, app_sid: str, frame: JSON) -> None:
        with self._lock:
            self._frames[app_sid] = frame
            while len(self._frames) > MAX_FRAMES:  # the oldest pages can no longer report
                del self._frames[next(iter(self._frames))]

    def frame_report(self, app_sid: str, secret: str, command: str) -> JSON:
        """What the portal page does with a message of the JS library that needs the server (``POST
        /standin/frame``): ``installFinish`` is recorded (``install_finished``, ``frame_messages``);
        ``refreshAuth`` answers fresh tokens for the frame's user (sdk/bx24-js-sdk/system-functions/
        bx24-refresh-auth.md). PermissionError for a page the portal did not render; ValueError otherwise."""
        with self._lock:
            frame = self._frames.get(app_sid)
        if frame is None or not hmac.compare_digest(secret.encode(), str(frame["secret"]).encode()):
            raise PermissionError("not a frame page of this portal: reload it")
        if command == "installFinish":
            with self._lock:
                self.install_finished = True
                self.frame_messages.append(
                    {
                        "command": command,
                        "app_sid": app_sid,
                        "user_id": frame["user_id"],
                        "placement": frame["placement"],
                        "at": self.standin.now(),
                    }
                )
            return {"install_finished": True}
        if command == "refreshAuth":
            tokens = self.issue_tokens(int(frame["user_id"]), admin=bool(frame["admin"]))
            return {
                "AUTH_ID": tokens["access_token"],
                "REFRESH_ID": tokens["refresh_token"],
                "AUTH_EXPIRES": str(tokens["expires_in"]),
            }
        raise ValueError(f"unknown command {command!r}")

    def add_webhook(self, user_id: int = 1, *, admin: bool = True) -> str:
        """An inbound webhook of `user_id` (local-integrations/local-webhooks.md): returns its URL,
        ``{portal}/rest/{user_id}/{code}/``. It acts as that user, with the app's scope, and does not expire."""
        code = secrets.token_hex(8)
        grant = self.standin._issue(self, user_id, admin)
        grant.access_expires = float("inf")
        with self._lock:
            self._webhooks[(user_id, code)] = grant.access_token
        return f"{self.url}/rest/{user_id}/{code}/"

    def webhook_token(self, user_id: int, code: str) -> str | None:
        with self._lock:
            return self._webhooks.get((user_id, code))

    def forget_access_token(self, token: str) -> None:
        """The portal no longer knows this access token (the app's frame refreshed it away, say): REST and
        app.info answer ``invalid_token`` for it from now on."""
        with self.standin._lock:
            self.standin._access.pop(token, None)

    def rotate_application_token(self) -> str:
        self.application_token = secrets.token_hex(16)
        return self.application_token

    def install(self) -> str:
        """Reinstall after :meth:`uninstall`: installed again, with a new application token (returned).

        Old tokens stay dead; issue new ones with :meth:`issue_tokens` for the install event or frame.
        """
        self.installed = True
        self.install_finished = False
        return self.rotate_application_token()

    def update_app(self) -> tuple[int, int]:
        """The app was updated: new version and application token; event bindings are dropped
        (api-reference/events/event-bind.md: "When deleting and updating the application, its actions
        will be removed"). Returns ``(previous_version, version)``."""
        with self._lock:
            previous = self.app_version
            self.app_version += 1
            self.events.clear()
            self._notified.clear()
        self.rotate_application_token()
        return previous, self.app_version

    def uninstall(self) -> None:
        """Every token of the portal dies; refresh → invalid_grant, REST → invalid_token; bindings and the
        offline queue dropped."""
        self.installed = False
        self.standin._kill_portal_tokens(self.member_id)
        with self._lock:
            self.events.clear()
            self._notified.clear()
            self.placements.clear()  # widgets go with the app (placement-bind.md binds them to the app)
            self.install_finished = False
            self._frames.clear()
        self.offline.drop()  # the app's data on the portal goes with it

    def rename(self) -> str:
        """docs/bitrix24-protocol.md §6: a renamed portal answers the old domain with 302 to the new one.

        A new server starts on a new port; every older address now redirects each request to the same
        path and query on the current address. Returns the new domain.
        """
        server = self._start_server()
        with self._lock:
            self._server = server
            self.domain = f"{self.standin.host}:{server.port}"
            self.url = f"http://{self.domain}"
        return self.domain

    def seed(self, entity: str = "crm.contact", n: int = 120) -> None:
        """Add ``n`` items to ``entity`` (IDs continue from the highest one), making ``entity.*`` callable."""
        with self._lock:
            rows = self.items.setdefault(entity, [])
            first = self._max_id(entity) + 1
            created = _iso(self.standin.now())
            for number in range(first, first + n):
                rows.append(
                    {
                        "ID": str(number),
                        "TITLE": f"{entity} #{number}",
                        "NAME": f"Name{number}",
                        "LAST_NAME": f"Seeded{number}",
                        "DATE_CREATE": created,
                    }
                )

    # ---- request handling

    def _log_call(self, http_method: str, rest_method: str, params: JSON) -> None:
        with self._lock:
            self.calls.append((http_method, rest_method, params))

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
                return self._batch(params, grant, hit)
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

    # ---- event bindings (api-reference/events/event-bind.md, event-get.md, event-unbind.md)

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

    # ---- widgets (api-reference/widgets/placement-bind.md, placement-get.md, placement-unbind.md)

    def _placement_method(self, method: str, params: JSON, grant: _Grant) -> Any:
        """placement.bind / .get / .unbind / .list. All need the ``placement`` scope (answered like any
        method outside the app's scope); all but .list are for administrators ("Who can execute the method:
        administrator"; placement-unbind.md: 403 ACCESS_DENIED "Access denied!")."""
        scopes = _split_scope(self.scope)
        if "placement" not in scopes:
            raise _RestError(
                403, "insufficient_scope", "The request requires higher privileges than provided."
            )
        if method == "placement.list":
            # placement-list.md: the codes this app may bind, given its scopes.
            return [code for code in widgets.PLACEMENT_SCOPES if widgets.known(code, scopes)]
        if method not in ("placement.bind", "placement.get", "placement.unbind"):
            raise _RestError(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
        if not grant.admin:
            raise _RestError(403, "ACCESS_DENIED", "Access denied!")
        if method == "placement.get":
            with self._lock:
                return [widgets.for_get(binding) for binding in self.placements]
        if method == "placement.unbind":
            return self._placement_unbind(params)
        binding = widgets.bind_params(params, scopes)
        handler = binding["handler"]
        parts = urlsplit(handler)
        if parts.scheme.lower() not in ("http", "https"):
            # Not documented for placement.bind: event-bind.md's answer for the same mistake.
            raise _RestError(400, "ERROR_UNSUPPORTED_PROTOCOL", "Unsupported handler protocol")
        try:
            # placement-bind.md wants a handler on the app's own domain, reachable from outside; the
            # stand-in opens only loopback apps, so that is what it accepts (not documented: the code).
            _require_loopback_url(handler)
        except ValueError:
            raise _RestError(400, "ERROR_WRONG_HANDLER_URL", "Wrong handler URL") from None
        with self._lock:
            if any(
                existing["placement"] == binding["placement"] and existing["handler"] == handler
                for existing in self.placements
            ):
                # The answer user-field-type binding documents for the same placement table
                # (api-reference/widgets/user-field/userfieldtype-add.md); apps look for "already binded".
                raise _RestError(400, "ERROR_CORE", "Unable to set placement handler: Handler already binded")
            binding["id"] = self._next_placement
            self._next_placement += 1
            self.placements.append(binding)
        return True

    def _placement_unbind(self, params: JSON) -> JSON:
        """placement-unbind.md: removes the app's handlers of ``PLACEMENT`` (all of them without ``HANDLER``).
        ``count`` follows the page's current wording: "+1 for each found handler record before the removal
        call, +1 after each successful removal" — two per removed handler (its example answers 4). An
        older version of the page said "the number of removed handlers"; an app should test ``count > 0``."""
        code, handler = widgets.unbind_params(params)
        with self._lock:
            removed = [
                binding
                for binding in self.placements
                if binding["placement"] == code and (not handler or binding["handler"] == handler)
            ]
            self.placements[:] = [binding for binding in self.placements if binding not in removed]
        return {"count": 2 * len(removed)}

    def is_bound(self, placement: str, handler: str) -> bool:
        try:
            self.bound_handler(placement, handler)
        except ValueError:
            return False
        return True

    def bound_handler(self, placement: str, handler: str = "") -> JSON:
        """The binding that opens ``placement`` (the first bound, or the one of ``handler``); ValueError if
        none."""
        code = placement.strip().upper()
        with self._lock:
            for binding in self.placements:
                if binding["placement"] == code and (not handler or binding["handler"] == handler):
                    return dict(binding)
        raise ValueError(f"no handler is bound to {code} on this portal (placement.bind)")

    # ---- raising events

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

    # ---- raising events by hand (tests, the /standin/ page)

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

    def offline_queue(self, auth_connector: str = "") -> list[JSON]:
        """The offline queue of one source key (default: none), as event.offline.list shows it, by ID."""
        return [record.for_list() for record in self.offline.records(auth_connector)]

    # ---- offline events (api-reference/events/offline-events.md, event-offline-*.md)

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

    # ---- entities: <entity>.list / .add / .get / .update / .delete

    def _max_id(self, entity: str) -> int:
        return max((int(row["ID"]) for row in self.items.get(entity, [])), default=0)

    def _entity_list(self, entity: str, params: JSON) -> tuple[Any, JSON]:
        """List methods (settings/how-to-call-rest-api/list-methods-pecularities.md): 50 a page, ``start``
        picks the page, the answer carries ``next`` (when more follow) and ``total``. ``start=-1`` is the fast
        path for big exports: no count, no ``next``, the caller pages by ``filter[>ID]``."""
        try:
            start = int(params.get("start") or 0)
        except (TypeError, ValueError):
            start = 0
        # Either case (the docs write `filter`, their examples and many callers `FILTER`).
        raw_filter = params.get("filter", params.get("FILTER"))
        raw_order = params.get("order", params.get("ORDER"))
        filters: JSON = raw_filter if isinstance(raw_filter, dict) else {}
        order: JSON = raw_order if isinstance(raw_order, dict) else {}
        select = params.get("select", params.get("SELECT"))
        with self._lock:
            rows = [dict(row) for row in self.items[entity] if crm.matches(row, filters)]
        field, direction = next(iter(order.items()), ("ID", "ASC"))

        def sort_key(row: JSON) -> tuple[int, float, str]:
            value: Any = row.get(str(field))
            try:
                return (0, float(value), "")
            except (TypeError, ValueError):
                return (1, 0.0, str(value))

        rows.sort(key=sort_key, reverse=str(direction).upper() == "DESC")
        if isinstance(select, list) and select and "*" not in select:
            wanted = {str(name) for name in select} | {"ID"}  # ID always: the fast path pages by it
            rows = [{k: v for k, v in row.items() if k in wanted} for row in rows]
        if start == -1:
            return rows[:PAGE_SIZE], {}
        start = max(start, 0)
        extra: JSON = {}
        if start + PAGE_SIZE < len(rows):
            extra["next"] = start + PAGE_SIZE
        extra["total"] = len(rows)
        return rows[start : start + PAGE_SIZE], extra

    @staticmethod
    def _id_param(params: JSON) -> str:
        value = params.get("id", params.get("ID"))
        if value in (None, ""):
            raise _RestError(400, "ERROR_ARGUMENT", "ID is not defined or invalid.")
        return str(value)

    @staticmethod
    def _fields_param(params: JSON) -> JSON:
        fields = params.get("fields", params.get("FIELDS"))
        if not isinstance(fields, dict):
            raise _RestError(400, "ERROR_ARGUMENT", "Parameter 'fields' must be an object.")
        return fields

    def _moment(self) -> datetime:
        return datetime.fromtimestamp(self.standin.now(), tz=UTC).astimezone()

    def _entity_add(self, entity: str, params: JSON, user_id: int = 1) -> int:
        fields = self._fields_param(params)
        with self._lock:
            new_id = self._max_id(entity) + 1
            if crm.handles(entity):
                self.items[entity].append(
                    crm.new_record(entity, new_id, fields, user_id=user_id, now=self._moment())
                )
            else:
                row = {key: value for key, value in fields.items() if key != "ID"}
                self.items[entity].append({"ID": str(new_id), **row})
        if self.write_delay > 0:
            time.sleep(self.write_delay)  # the write has landed; only the answer is late
        return new_id

    def _find(self, entity: str, item_id: str) -> JSON:
        for row in self.items[entity]:
            if row["ID"] == item_id:
                return row
        # crm-deal-get.md (and contact, company, lead): HTTP 400, an empty error code, "Not found".
        raise _RestError(400, "", "Not found")

    def _entity_get(self, entity: str, params: JSON) -> JSON:
        item_id = self._id_param(params)
        with self._lock:
            return dict(self._find(entity, item_id))

    def _entity_update(self, entity: str, params: JSON, user_id: int = 1) -> bool:
        item_id = self._id_param(params)
        fields = self._fields_param(params)
        with self._lock:
            row = self._find(entity, item_id)
            if crm.handles(entity):
                crm.update_record(entity, row, fields, user_id=user_id, now=self._moment())
            else:
                row.update({key: value for key, value in fields.items() if key != "ID"})
        if self.write_delay > 0:
            time.sleep(self.write_delay)
        return True

    def _entity_delete(self, entity: str, params: JSON) -> bool:
        item_id = self._id_param(params)
        with self._lock:
            row = self._find(entity, item_id)
            self.items[entity].remove(row)
        return True

    # ---- batch (settings/how-to-call-rest-api/batch.md)

    _REFERENCE = re.compile(r"\$result\[([^\]]+)\]((?:\[[^\]]*\])*)")

    def _resolve(self, value: Any, results: dict[str, Any]) -> Any:
        """Substitute ``$result[key][a][b]`` references to earlier commands' results.

        Only ``$result`` is supported (not ``$result_total`` etc.). A value that is exactly one reference takes
        the referenced value as is; a reference inside a longer string is replaced by its text. What a real
        portal does with an unresolvable reference is not documented; here it becomes an empty string.
        """
        if isinstance(value, dict):
            return {key: self._resolve(item, results) for key, item in value.items()}
        if isinstance(value, list):
            return [self._resolve(item, results) for item in value]
        if not isinstance(value, str) or "$result[" not in value:
            return value

        def lookup(match: re.Match[str]) -> Any:
            node: Any = results.get(match.group(1))
            for segment in re.findall(r"\[([^\]]*)\]", match.group(2)):
                if (
                    isinstance(node, list)
                    and segment.lstrip("-").isdigit()
                    and -len(node) <= int(segment) < len(node)
                ):
                    node = node[int(segment)]
                elif isinstance(node, dict) and segment in node:
                    node = node[segment]
                else:
                    return ""
            return "" if node is None else node

        whole = self._REFERENCE.fullmatch(value)
        if whole is not None:
            return lookup(whole)
        return self._REFERENCE.sub(lambda m: str(lookup(m)), value)

    def _batch(self, params: JSON, grant: _Grant, hit: _Hit) -> Answer:
        started = self.standin.now()
        clock = time.perf_counter()
        cmd = params.get("cmd")
        if isinstance(cmd, list):
            commands = {str(index): command for index, command in enumerate(cmd)}
        elif isinstance(cmd, dict):
            commands = {str(key): command for key, command in cmd.items()}
        elif cmd in (None, ""):
            commands = {}
        else:
            return 400, {"error": "INVALID_ARG_VALUE", "error_description": "cmd must be an array"}
        if len(commands) > MAX_BATCH:
            return 400, {
                "error": "ERROR_BATCH_LENGTH_EXCEEDED",
                "error_description": "Max batch length exceeded",
            }
        halt = str(params.get("halt") or "0").lower() in ("1", "true", "y")
        results: dict[str, Any] = {}
        errors: dict[str, Any] = {}
        totals: dict[str, Any] = {}
        nexts: dict[str, Any] = {}
        times: dict[str, Any] = {}
        for key, command in commands.items():
            if not isinstance(command, str):
                errors[key] = {"error": "INVALID_ARG_VALUE", "error_description": "command must be a string"}
            else:
                path, _, query = command.partition("?")
                method = path.strip().strip("/").lower()
                if method.endswith(".json"):
                    method = method[: -len(".json")]
                try:
                    inner = phpform.decode_query(query)
                except ValueError as exc:
                    inner = None
                    errors[key] = {"error": "INVALID_REQUEST", "error_description": str(exc)}
                if inner is not None:
                    inner.pop("auth", None)  # every command runs with the batch's own token
                    inner = self._resolve(inner, results)
                    if method == "batch":
                        errors[key] = {
                            "error": "ERROR_BATCH_METHOD_NOT_ALLOWED",
                            "error_description": "Method is not allowed for batch usage",
                        }
                    else:
                        status, payload = self._call(method, inner, grant, hit)
                        if status == 200:
                            results[key] = payload["result"]
                            times[key] = payload["time"]
                            if "total" in payload:
                                totals[key] = payload["total"]
                            if "next" in payload:
                                nexts[key] = payload["next"]
                        else:
                            errors[key] = {
                                "error": payload.get("error", ""),
                                "error_description": payload.get("error_description", ""),
                            }
            if halt and key in errors:
                break
        processing = time.perf_counter() - clock
        # batch-result-error-docs.json: the batch itself answers 200; failures sit in result_error.
        result = {
            "result": _php_array(results),
            "result_error": _php_array(errors),
            "result_total": _php_array(totals),
            "result_next": _php_array(nexts),
            "result_time": _php_array(times),
        }
        return 200, {"result": result, "time": _time_block(started, started + processing, processing)}
