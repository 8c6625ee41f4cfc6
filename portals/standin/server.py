"""A fake Bitrix24 — the OAuth server and any number of portals — as real local HTTP servers.

Tests start a :class:`StandIn` on loopback and drive the backend against it over real sockets; a developer
can run it to try the app without a portal (:func:`main`, for a management command). It copies what
Bitrix24's documentation (repository ``bitrix24/b24restdocs``) says the real services do, and the fault
modes the SDK issue trackers report; each such place names its page. Where the docs are silent the choice
made here is marked "not documented".

Standard library only, no Django: the stand-in must run in a bare interpreter and in any test process.

Clocks: token expiry, the refresh-token lifetime, authorization codes, the leaky bucket and the
operating-time window are all judged by :meth:`StandIn.now` (``time.time()`` plus an offset moved by
:meth:`StandIn.advance`), so a test can jump an hour ahead without sleeping. The ``duration`` reported for a
method is real elapsed time. So are the offline queue's ``TIMESTAMP_X`` and ONOFFLINEEVENT's ``minTimeout``.

Events: ``crm.{contact,company,deal,lead}.{add,update,delete}`` (also inside ``batch``) raise their events.
Online bindings get a form-encoded POST from a background courier after the REST answer
(:meth:`StandIn.wait_deliveries`, ``FakePortal.deliveries``); offline bindings fill the portal's offline
queue (``event.offline.*``, see ``events.py``). :meth:`FakePortal.change` and :meth:`FakePortal.fire`
raise events from a test; ``GET /standin/`` on a portal does it for a person (``console.py``).

Widgets: ``placement.bind`` / ``.get`` / ``.unbind`` / ``.list`` keep ``FakePortal.placements``
(``placements.py``). ``GET /app-frame/`` is the portal page that opens the app or a bound widget
(:meth:`FakePortal.app_frame_page`, :meth:`FakePortal.open_placement`); ``GET /api/v1/`` serves a small
BX24.js (``static/bx24.js``) that talks to that page over postMessage (``static/frame.js``) and calls REST
from the app's origin (REST answers CORS for loopback origins). ``BX24.installFinish()`` sets
``FakePortal.install_finished``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hmac
import html
import ipaddress
import json
import re
import secrets
import socket
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, cast
from urllib.parse import parse_qs, urlencode, urlsplit

from .. import phpform
from . import console, crm, payloads
from . import placements as widgets
from .base import RestError as _RestError
from .base import iso as _iso
from .events import (
    CRM_EVENTS,
    DEFAULT_MIN_TIMEOUT,
    FEATURE_CONNECTOR,
    FEATURE_EXTENDED,
    LIST_PAGE,
    OFFLINE_BATCH,
    Courier,
    OfflineQueue,
    crm_event,
    parse_filter,
    parse_order,
    post_form,
)

__all__ = ["FakePortal", "StandIn"]

JSON = dict[str, Any]
Answer = tuple[int, JSON]

PAGE_SIZE = 50  # settings/how-to-call-rest-api/list-methods-pecularities.md: list methods return 50 a page
MAX_BATCH = 50  # settings/how-to-call-rest-api/batch.md: at most 50 commands
OPERATING_WINDOW = 600.0  # limits.md: operating time is summed per method over 10 minutes
CODE_TTL = 30.0  # settings/oauth/index.md: the authorization code lives 30 seconds
# crm.timeline.comment: notes an app writes on a CRM item's timeline (api-reference/crm/timeline/comments/).
DEFAULT_ENTITIES = ("crm.contact", "crm.company", "crm.deal", "crm.lead", "crm.timeline.comment")
# Scopes this stand-in enforces for entity methods (crm.contact.list needs "crm"). Anything else is open.
KNOWN_SCOPES = frozenset({"crm", "user", "im", "task", "tasks", "entity", "disk", "lists", "catalog", "sale"})
_LICENSE_TYPES = {"ent": "ent250", "pro": "pro100", "std": "std", "basic": "basic", "nfr": "nfr"}

_HTML_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)

# The error bodies below are the ones settings/how-to-call-rest-api/ and settings/oauth/error-codes.md list.
INVALID_TOKEN: Answer = (
    401,
    {"error": "invalid_token", "error_description": "The access token provided is invalid."},
)
EXPIRED_TOKEN: Answer = (
    401,
    {"error": "expired_token", "error_description": "The access token provided has expired."},
)
NO_AUTH_FOUND: Answer = (401, {"error": "NO_AUTH_FOUND", "error_description": "Wrong authorization data"})
INVALID_GRANT: Answer = (400, {"error": "invalid_grant", "error_description": "Invalid grant"})
INVALID_CLIENT: Answer = (401, {"error": "invalid_client", "error_description": "Invalid client"})

APP_FRAME_PATH = "/app-frame/"
# The app's iframe on a portal page: found by this id; its name is `DOMAIN|PROTOCOL|APP_SID`, what the
# official JS SDK reads (docs/bitrix24-protocol.md §8).
APP_FRAME_ID = "app-frame"
APP_FRAME_SELECTOR = f"iframe#{APP_FRAME_ID}"
# The JS library, at the path of Bitrix24's own (//api.bitrix24.com/api/v1/, sdk/bx24-js-sdk/index.md).
BX24_JS_PATH = "/api/v1/"
# Where the portal page posts what the library in its frame asked for (see FakePortal.frame_report).
FRAME_REPORT_PATH = "/standin/frame"
MAX_FRAMES = 1000  # frame pages a portal remembers
_STATIC = Path(__file__).with_name("static")
# The hand-firing page needs no script and posts only to itself.
_CONSOLE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
}


def _time_block(
    start: float,
    finish: float,
    processing: float,
    *,
    operating: float | None = None,
    operating_reset_at: float | None = None,
) -> JSON:
    """The ``time`` member every successful REST answer carries (shape of list-next-total-docs.json)."""
    block: JSON = {
        "start": round(start, 6),
        "finish": round(finish, 6),
        "duration": finish - start,
        "processing": processing,
        "date_start": _iso(start),
        "date_finish": _iso(finish),
    }
    if operating_reset_at is not None:
        block["operating_reset_at"] = int(operating_reset_at)
    if operating is not None:
        block["operating"] = round(operating, 6)
    return block


def _php_array(values: dict[str, Any]) -> Any:
    """How PHP's json_encode renders an array: ``[]`` when empty, a list for keys 0..n-1, else an object."""
    if not values:
        return []
    if list(values) == [str(i) for i in range(len(values))]:
        return list(values.values())
    return values


def _require_loopback_url(url: str) -> None:
    """An http(s) URL on a loopback host (127.0.0.0/8, ::1, localhost), or ValueError."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError("handler must be an http:// or https:// URL")
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(
                f"handler host {host!r} is not a loopback address: the stand-in only opens local apps"
            )


def _origin(url: str) -> str:
    """The origin a browser gives ``url`` (``scheme://host[:port]``, the default port left out)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    default = {"http": 80, "https": 443}.get(scheme)
    return f"{scheme}://{host}" + (f":{port}" if port and port != default else "")


@functools.cache
def _static(name: str) -> str:
    """A file of ``static/`` (the JS library and the portal page's script), read once."""
    return (_STATIC / name).read_text(encoding="utf-8")


def _frame_options(params: Mapping[str, str]) -> JSON | None:
    """PLACEMENT_OPTIONS for the frame page: ``options`` (a JSON object), else ``id`` as ``{"ID": id}``."""
    raw = params.get("options", "").strip()
    if raw:
        try:
            options = json.loads(raw)
        except ValueError:
            raise ValueError('options must be a JSON object, e.g. {"ID":"8"}') from None
        if not isinstance(options, dict):
            raise ValueError('options must be a JSON object, e.g. {"ID":"8"}')
        return options
    item = params.get("id", "").strip()
    return {"ID": item} if item else None


def _split_scope(scope: str) -> set[str]:
    # settings/oauth: scope comes comma-separated in tokens and space-separated in some events.
    return {part for part in re.split(r"[,\s]+", scope) if part}


def _text(value: Any) -> str:
    """A scalar parameter as text ("" when absent); arrays count as absent."""
    if value is None or isinstance(value, dict | list):
        return ""
    return str(value).strip()


def _flag(value: Any, *, default: bool) -> bool:
    """A 0/1 parameter (``clear``, ``error``); "N" and "false" count as 0, as PHP code tends to read them."""
    text = _text(value).lower()
    if not text:
        return default
    return text not in ("0", "n", "false", "no")


def _positive(value: Any, default: int) -> int:
    """event-offline-get.md: ``limit`` is "an integer greater than 0"."""
    text = _text(value)
    if not text:
        return default
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise _RestError(400, "ERROR_ARGUMENT", "Value must be positive integer")
    return number


def _array(value: Any, message: str) -> list[Any]:
    """An array parameter: a JSON list, or a PHP form array (``id[]=1``, ``id[0]=1``); absent is empty."""
    if value is None:
        return []
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, list):
        return value
    raise _RestError(400, "ERROR_ARGUMENT", message)


def _same_binding(one: JSON, other: JSON) -> bool:
    """What event.bind refuses as "already binded": the same event to the same handler as the same user
    online; offline, the same event for the same source key."""
    if one["event"] != other["event"] or one["offline"] != other["offline"]:
        return False
    if one["offline"]:
        return bool(one["auth_connector"] == other["auth_connector"])
    return bool(one["handler"] == other["handler"] and one["auth_type"] == other["auth_type"])


def _min_timeout(binding: JSON) -> float:
    """``options[minTimeout]`` of an ONOFFLINEEVENT binding, in seconds (on-offline-event.md: default 1)."""
    options = binding.get("options") or {}
    try:
        return max(float(options.get("minTimeout", DEFAULT_MIN_TIMEOUT)), 0.0)
    except (TypeError, ValueError):
        return DEFAULT_MIN_TIMEOUT


@dataclass
class _Grant:
    """One access + refresh pair, as the OAuth server remembers it."""

    member_id: str
    user_id: int
    admin: bool
    access_token: str
    refresh_token: str
    issued_at: float
    access_expires: float
    # None while usable; "rotated" once its refresh token was spent; "uninstalled" when the app was removed.
    dead: str | None = None


@dataclass
class _Code:
    member_id: str
    user_id: int
    admin: bool
    created: float


@dataclass
class _Hit:
    """One request to a portal (a whole batch is one): who made it, the source key it passed, and whether it
    wrote to the offline queue — ONOFFLINEEVENT is raised once per hit at most (on-offline-event.md,
    minTimeout 0: "one notification per request to Bitrix24")."""

    user_id: int
    admin: bool
    auth_connector: str = ""
    offline_written: bool = False


# --------------------------------------------------------------------------------------------------------
# HTTP plumbing


class _Server(ThreadingHTTPServer):
    """A threading server that remembers its open connections so that stopping it cuts keep-alives too."""

    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default listen backlog of 5 drops SYNs under a burst of parallel clients, which then
    # retry after a second; a real front end accepts far more.
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], owner: Any) -> None:
        self.owner = owner
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)
        self.thread = threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": 0.5},  # idle cost stays low with many portals; stop() wakes it
            name=f"standin:{self.port}",
            daemon=True,
        )
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = super().get_request()
        # Without this, the client's delayed ACK and Nagle's algorithm add ~40 ms to every keep-alive answer.
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._connections_lock:
            self._connections.add(conn)
        return conn, addr

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up (timeouts in tests, "down" mode) is routine here, not worth a traceback.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)

    def stop(self) -> None:
        stopper = threading.Thread(target=self.shutdown, daemon=True)
        stopper.start()
        # shutdown() is only noticed when the serving loop wakes up; a throwaway connection wakes it now
        # instead of after poll_interval.
        while stopper.is_alive():
            with contextlib.suppress(OSError):
                socket.create_connection((str(self.server_address[0]), self.port), timeout=0.5).close()
            stopper.join(0.01)
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):  # already closed by the client
                conn.shutdown(socket.SHUT_RDWR)
        self.server_close()
        self.thread.join(timeout=2)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: benchmarks reuse connections like a real client would
    server_version = "Bitrix24StandIn/1.0"
    timeout = 30  # an idle keep-alive connection is dropped after this many seconds
    wbufsize = 64 * 1024  # buffer the answer so headers and body leave in one segment (flushed per request)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def handle_expect_100(self) -> bool:
        answer = super().handle_expect_100()
        self.wfile.flush()  # the write buffer would otherwise hold "100 Continue" back
        return answer

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        raise NotImplementedError

    @property
    def _server(self) -> _Server:
        return cast(_Server, self.server)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _params(self, query: str, body: bytes) -> JSON:
        """Query string and body together (settings/how-to-call-rest-api: GET, form POST or JSON POST)."""
        params = phpform.decode_query(query)
        if body:
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if content_type == "application/json":
                data = json.loads(body)
                if not isinstance(data, dict):
                    raise ValueError("a JSON body must be an object")
            else:
                data = phpform.decode_query(body.decode("utf-8"))
            params.update(data)  # the body wins, as PHP's $_REQUEST (GP order) would have it
        return params

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, payload: JSON) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json; charset=utf-8")


class _OAuthHandler(_Handler):
    def _dispatch(self) -> None:
        standin = cast("StandIn", self._server.owner)
        split = urlsplit(self.path)
        body = self._read_body()
        standin._bump("oauth_requests")
        if standin.oauth_latency > 0:
            time.sleep(standin.oauth_latency)
        mode = standin.oauth_mode
        if mode == "down":
            # Close without a byte: the client sees "connection closed without response".
            standin._bump("oauth_faults")
            self.close_connection = True
            return
        if mode == "500":
            standin._bump("oauth_faults")
            self._send_json(500, {"error": "internal", "error_description": "Internal server error"})
            return
        if mode == "html":
            # settings/how-to-call-rest-api: "some error bodies are HTML, not JSON" (a proxy's error page).
            standin._bump("oauth_faults")
            self._send(502, _HTML_502.encode(), "text/html; charset=utf-8")
            return
        if mode == "slow":
            time.sleep(standin.slow_seconds)
        if mode == "hang":
            # Takes the request and never answers nor acts on it (until released or hang_seconds pass),
            # as a server that stalled before doing anything.
            standin._bump("oauth_faults")
            standin.release.wait(standin.hang_seconds)
            self.close_connection = True
            return
        try:
            params = self._params(split.query, body)
        except (ValueError, UnicodeDecodeError) as exc:
            self._send_json(400, {"error": "invalid_request", "error_description": str(exc)})
            return
        path = split.path
        if path in ("/oauth/token/", "/oauth/token"):
            status, payload = standin._token_endpoint(params)
            if mode == "rotate_drop":
                # The server carried the refresh out, and its answer is lost on the way back.
                standin._bump("oauth_faults")
                self.close_connection = True
                return
        elif path in ("/rest/app.info", "/rest/app.info.json", "/rest/app.info/"):
            status, payload = standin._oauth_app_info(params)
        else:
            status, payload = 404, {"error": "NOT_FOUND", "error_description": f"No such endpoint {path}"}
        if mode == "late":
            # The server acted at once; its answer takes slow_seconds on the way back.
            time.sleep(standin.slow_seconds)
        self._send_json(status, payload)


class _PortalHandler(_Handler):
    _allow_origin = ""

    def do_OPTIONS(self) -> None:
        self._dispatch()

    def end_headers(self) -> None:
        if self._allow_origin:
            # REST answers a browser page of a local app (the JS library calls the portal from the app's
            # origin). Whether and how Bitrix24 answers CORS is not documented; the stand-in allows loopback
            # origins only, without credentials (the token travels in the body).
            self.send_header("Access-Control-Allow-Origin", self._allow_origin)
            self.send_header("Vary", "Origin")
        super().end_headers()

    def _dispatch(self) -> None:
        portal = cast("FakePortal", self._server.owner)
        self._allow_origin = ""
        body = self._read_body()
        if self._server is not portal._server:
            # A renamed portal answers its old address with a redirect to the new one (see FakePortal.rename).
            self._send(302, b"", "text/html; charset=utf-8", {"Location": portal.url + self.path})
            return
        split = urlsplit(self.path)
        if split.path.startswith("/rest/"):
            origin = self.headers.get("Origin") or ""
            try:
                _require_loopback_url(origin)
            except ValueError:
                pass
            else:
                self._allow_origin = origin
            if self.command == "OPTIONS":
                self._send(
                    204,
                    b"",
                    "text/plain",
                    {
                        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                        "Access-Control-Allow-Headers": "Content-Type",
                        "Access-Control-Max-Age": "600",
                    },
                )
                return
        if split.path in (APP_FRAME_PATH, APP_FRAME_PATH.rstrip("/")) and self.command in ("GET", "HEAD"):
            self._app_frame(portal, split.query)
            return
        if split.path in (BX24_JS_PATH, BX24_JS_PATH.rstrip("/")) and self.command in ("GET", "HEAD"):
            self._send(
                200,
                _static("bx24.js").encode(),
                "text/javascript; charset=utf-8",
                {"Cache-Control": "no-cache"},
            )
            return
        if split.path == FRAME_REPORT_PATH and self.command == "POST":
            self._frame_report(portal, body)
            return
        if self.command == "OPTIONS":
            self._send(405, b"", "text/plain", {"Allow": "GET, POST"})
            return
        if split.path in (console.CONSOLE_PATH, console.CONSOLE_PATH.rstrip("/")) and self.command in (
            "GET",
            "HEAD",
        ):
            self._console(portal, split.query)
            return
        if split.path == console.FIRE_PATH and self.command == "POST":
            self._console_fire(portal, body)
            return
        if not split.path.startswith("/rest/"):
            self._send_json(404, {"error": "NOT_FOUND", "error_description": "Not a REST path"})
            return
        method = split.path[len("/rest/") :].strip("/")
        # An inbound webhook (local-integrations/local-webhooks.md): /rest/{user_id}/{webhook_code}/{method}.
        hook = re.fullmatch(r"(\d+)/([A-Za-z0-9]+)/(.+)", method)
        if hook is not None:
            method = hook.group(3)
        method = method.lower()
        if method.endswith(".json"):
            method = method[: -len(".json")]
        try:
            params = self._params(split.query, body)
        except (ValueError, UnicodeDecodeError) as exc:
            portal._log_call(self.command, method, {})
            self._send_json(400, {"error": "INVALID_REQUEST", "error_description": str(exc)})
            return
        if hook is not None:
            token = portal.webhook_token(int(hook.group(1)), hook.group(2))
            if token is None:
                self._send_json(
                    401, {"error": "NO_AUTH_FOUND", "error_description": "Wrong authorization data"}
                )
                return
            params["auth"] = token  # the webhook's own, whatever the caller sent
        portal._log_call(self.command, method, params)
        status, payload = portal._handle(method, params)
        self._send_json(status, payload)

    def _console(self, portal: FakePortal, query: str) -> None:
        """``GET /standin/``: the page for raising events by hand (see ``console.py``)."""
        params = {key: values[-1] for key, values in parse_qs(query).items()}
        page = console.page(portal, notice=params.get("done", ""), problem=params.get("problem", ""))
        self._send(200, page.encode(), "text/html; charset=utf-8", _CONSOLE_HEADERS)

    def _console_fire(self, portal: FakePortal, body: bytes) -> None:
        """``POST /standin/fire``: carry out one form of the page, then back to it (303) with the outcome."""
        try:
            form = {
                key: values[-1]
                for key, values in parse_qs(body.decode("utf-8"), keep_blank_values=True).items()
            }
            outcome = {"done": console.submit(portal, form)}
        except PermissionError as exc:
            self._send(403, f"{exc}\n".encode(), "text/plain; charset=utf-8")
            return
        except (ValueError, UnicodeDecodeError) as exc:
            outcome = {"problem": str(exc)}
        location = f"{console.CONSOLE_PATH}?{urlencode(outcome)}"
        self._send(303, b"", "text/html; charset=utf-8", {"Location": location, "Cache-Control": "no-store"})

    def _app_frame(self, portal: FakePortal, query: str) -> None:
        """``GET /app-frame/?handler=<app URL>&user_id=1[&admin=0][&placement=…][&options=<JSON>][&lang=…]``:
        the portal page that opens the app in its frame (see :meth:`FakePortal.app_frame_page`). Without
        ``handler`` it opens the handler bound to ``placement``, and a handler bound to it opens as that
        widget (:meth:`FakePortal.open_placement`: ordinary users only after installFinish); ``id=3``
        stands for ``options={"ID":"3"}``. A development tool: the handler must be on a loopback host,
        anything else is refused with 400."""
        params = {key: values[-1] for key, values in parse_qs(query).items()}
        try:
            user_id = int(params.get("user_id") or 1)
            admin = params.get("admin", "1") not in ("0", "N", "false")
            placement = params.get("placement") or "DEFAULT"
            lang = params.get("lang") or "en"
            options = _frame_options(params)
            handler = params.get("handler", "")
            if placement != "DEFAULT" and (not handler or portal.is_bound(placement, handler)):
                page = portal.open_placement(
                    placement, options=options, user_id=user_id, admin=admin, lang=lang, handler=handler
                )
            else:
                page = portal.app_frame_page(
                    handler, user_id=user_id, admin=admin, placement=placement, lang=lang, options=options
                )
        except ValueError as exc:
            self._send(400, f"{exc}\n".encode(), "text/plain; charset=utf-8")
            return
        self._send(200, page.encode(), "text/html; charset=utf-8", {"Cache-Control": "no-store"})

    def _frame_report(self, portal: FakePortal, body: bytes) -> None:
        """``POST /standin/frame`` (``sid``, ``secret``, ``command``) from a portal page's own script: see
        :meth:`FakePortal.frame_report`. Answers JSON."""
        try:
            form = {key: values[-1] for key, values in parse_qs(body.decode("utf-8")).items()}
            answer = portal.frame_report(form.get("sid", ""), form.get("secret", ""), form.get("command", ""))
        except PermissionError as exc:
            self._send_json(403, {"error": "ACCESS_DENIED", "error_description": str(exc)})
            return
        except (ValueError, UnicodeDecodeError) as exc:
            self._send_json(400, {"error": "ERROR_ARGUMENT", "error_description": str(exc)})
            return
        self._send_json(200, answer)


# --------------------------------------------------------------------------------------------------------
# The OAuth server


class StandIn:
    """The fake OAuth server (``oauth.bitrix.info``) plus the portals it knows, each on its own port."""

    def __init__(
        self,
        client_id: str = "app.standin",
        client_secret: str = "standin-secret",  # noqa: S107 - the fake's published development secret
        *,
        host: str = "127.0.0.1",
        oauth_latency: float = 0.0,
        access_ttl: int = 3600,
        oauth_port: int = 0,
    ) -> None:
        self.client_id = client_id
        self.oauth_port = oauth_port  # 0: any free port
        self.client_secret = client_secret
        self.host = host
        self.oauth_latency = oauth_latency
        # settings/oauth/index.md: access tokens live 1 hour.
        self.access_ttl = access_ttl
        # Current docs say 180 days, older ones 28; the stand-in takes the shorter (docs/bitrix24-protocol.md §4).
        self.refresh_ttl: float = 28 * 86400.0
        # "ok"; faults: "down", "500", "html" (answer at once), "slow" (works after slow_seconds), "late"
        # (works at once, answers after slow_seconds), "hang"
        # (never acts nor answers until `release` is set or hang_seconds pass), "rotate_drop" (rotates,
        # then closes without an answer).
        self.oauth_mode: str = "ok"
        self.slow_seconds: float = 5.0
        self.hang_seconds: float = 120.0
        self.release = threading.Event()
        # The HTTP status of the OAuth server's PAYMENT_REQUIRED answer is not documented; clients must read
        # the body. Settable so a test can try another.
        self.payment_required_status: int = 402
        self.stats: Counter[str] = Counter()
        self._lock = threading.RLock()
        self._offset = 0.0
        self._portals: dict[str, FakePortal] = {}
        self._access: dict[str, _Grant] = {}
        self._refresh: dict[str, _Grant] = {}
        self._codes: dict[str, _Code] = {}
        self._server: _Server | None = None
        # Not documented: how long the queue server waits for a handler. Long enough for a slow handler in a
        # test, short enough that a hung one does not hold a delivery thread for long.
        self.delivery_timeout: float = 10.0
        self._courier = Courier()

    # ---- lifecycle

    def start(self) -> StandIn:
        if self._server is None:
            self._server = _Server((self.host, self.oauth_port), _OAuthHandler, self)
        return self

    def stop(self) -> None:
        self.release.set()  # a hung request must not keep its server thread alive
        server, self._server = self._server, None
        if server is not None:
            server.stop()
        for portal in list(self._portals.values()):
            portal._stop()
        # Events still queued are dropped, as a queue server that went away would; a restarted stand-in
        # delivers with a fresh courier.
        courier, self._courier = self._courier, Courier()
        courier.stop()

    def __enter__(self) -> StandIn:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def oauth_url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash); the token endpoint is ``oauth_url + "/oauth/token/"``."""
        if self._server is None:
            raise RuntimeError("StandIn is not started: call start() or use it as a context manager")
        return f"http://{self.host}:{self._server.port}"

    @property
    def oauth_domain(self) -> str:
        """The OAuth host as token answers give it in ``domain`` (``oauth.bitrix.info`` in production)."""
        return self.oauth_url.split("://", 1)[1]

    @property
    def server_endpoint(self) -> str:
        return self.oauth_url + "/rest/"

    # ---- clock

    def now(self) -> float:
        return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._offset += seconds

    # ---- events on their way to handlers

    def wait_deliveries(self, timeout: float = 10.0) -> bool:
        """Wait until every online event queued so far (on any portal) has been posted and its outcome
        recorded in its portal's ``deliveries``; False if ``timeout`` seconds passed first.

        Deliveries run on background threads, as Bitrix24's queue server sends events after the REST answer
        (api-reference/events/index.md). A throttled ONOFFLINEEVENT that was not sent is not waited for.
        """
        return self._courier.wait(timeout)

    # ---- portals

    def add_portal(
        self,
        *,
        member_id: str | None = None,
        rate: float = 2.0,
        burst: int = 50,
        scope: str = "crm,user,placement,im",
        status: str = "F",
        license_family: str = "ent",
        port: int = 0,
    ) -> FakePortal:
        member_id = member_id or secrets.token_hex(16)
        with self._lock:
            if member_id in self._portals:
                raise ValueError(f"a portal with member_id {member_id} exists already")
            portal = FakePortal(
                self,
                member_id=member_id,
                rate=rate,
                burst=burst,
                scope=scope,
                status=status,
                license_family=license_family,
                port=port,
            )
            self._portals[member_id] = portal
        return portal

    def portal(self, member_id: str) -> FakePortal:
        return self._portals[member_id]

    @property
    def portals(self) -> list[FakePortal]:
        return list(self._portals.values())

    # ---- internals shared with the portals

    def _bump(self, name: str, by: int = 1) -> None:
        with self._lock:
            self.stats[name] += by

    def _issue(self, portal: FakePortal, user_id: int, admin: bool) -> _Grant:
        with self._lock:
            now = self.now()
            grant = _Grant(
                member_id=portal.member_id,
                user_id=user_id,
                admin=admin,
                access_token=secrets.token_hex(16),
                refresh_token=secrets.token_hex(16),
                issued_at=now,
                access_expires=now + self.access_ttl,
            )
            self._access[grant.access_token] = grant
            self._refresh[grant.refresh_token] = grant
        return grant

    def _token_answer(self, portal: FakePortal, grant: _Grant) -> JSON:
        # Field for field refresh-response-docs.json (settings/oauth/auto-renewal.md), same key order.
        return {
            "access_token": grant.access_token,
            "client_endpoint": portal.url + "/rest/",
            "domain": self.oauth_domain,
            "expires": int(grant.access_expires),
            "expires_in": self.access_ttl,
            "member_id": portal.member_id,
            "refresh_token": grant.refresh_token,
            "scope": portal.scope,
            "server_endpoint": self.server_endpoint,
            "status": portal.status,
            "user_id": grant.user_id,
        }

    def _kill_portal_tokens(self, member_id: str) -> None:
        with self._lock:
            for token, grant in list(self._refresh.items()):
                if grant.member_id == member_id:
                    del self._refresh[token]
            for grant in self._access.values():
                if grant.member_id == member_id:
                    grant.dead = "uninstalled"
            for code, entry in list(self._codes.items()):
                if entry.member_id == member_id:
                    del self._codes[code]

    def _check_access(
        self, token: Any, portal: FakePortal | None = None
    ) -> tuple[_Grant | None, Answer | None]:
        """Judge an access token: the grant, or the 401 answer a portal / the OAuth server would give."""
        if not isinstance(token, str) or not token:
            return None, NO_AUTH_FOUND
        with self._lock:
            grant = self._access.get(token)
            if grant is None or grant.dead == "uninstalled":
                return None, INVALID_TOKEN
            owner = self._portals.get(grant.member_id)
            if owner is None or not owner.installed:
                return None, INVALID_TOKEN
            if portal is not None and grant.member_id != portal.member_id:
                return None, INVALID_TOKEN  # a token is only good on the portal that issued it
            # Not documented: what a portal answers for an access token whose pair was refreshed. The docs
            # say the refresh "invalidates" it; the stand-in answers expired_token so that a worker holding
            # a stale copy re-reads the stored pair instead of declaring the portal lost.
            if grant.dead == "rotated" or self.now() >= grant.access_expires:
                return None, EXPIRED_TOKEN
            return grant, None

    def _token_endpoint(self, params: JSON) -> Answer:
        client_id = params.get("client_id")
        client_secret = params.get("client_secret")
        if not (
            isinstance(client_id, str)
            and isinstance(client_secret, str)
            and hmac.compare_digest(client_id.encode(), self.client_id.encode())
            and hmac.compare_digest(client_secret.encode(), self.client_secret.encode())
        ):
            self._bump("invalid_client")
            return INVALID_CLIENT
        grant_type = params.get("grant_type")
        if grant_type == "refresh_token":
            return self._refresh_grant(params.get("refresh_token"))
        if grant_type == "authorization_code":
            return self._code_grant(params.get("code"))
        return 400, {"error": "unsupported_grant_type", "error_description": "Unsupported grant type"}

    def _refresh_grant(self, token: Any) -> Answer:
        """settings/oauth/auto-renewal.md. Single use: spending a refresh token kills it and its access token.

        The whole check-and-rotate runs under one lock: of two concurrent refreshes with the same token exactly
        one gets a new pair, the other ``invalid_grant`` (the race every SDK has open, b24phpsdk #102).
        """
        with self._lock:
            grant = self._refresh.get(token) if isinstance(token, str) else None
            portal = self._portals.get(grant.member_id) if grant else None
            if grant is None or portal is None or portal.deleted or not portal.installed:
                self.stats["refresh_invalid_grant"] += 1
                return INVALID_GRANT
            if self.now() - grant.issued_at > self.refresh_ttl:
                del self._refresh[grant.refresh_token]
                self.stats["refresh_invalid_grant"] += 1
                return INVALID_GRANT
            if portal.payment_required:
                # settings/oauth/auto-renewal.md shows this body; the token is not spent by the refusal.
                self.stats["refresh_payment_required"] += 1
                return self.payment_required_status, {
                    "error": "PAYMENT_REQUIRED",
                    "error_description": "Payment required",
                }
            del self._refresh[grant.refresh_token]
            grant.dead = "rotated"
            fresh = self._issue(portal, grant.user_id, grant.admin)
            self.stats["refresh_ok"] += 1
            return 200, self._token_answer(portal, fresh)

    def _code_grant(self, code: Any) -> Answer:
        """settings/oauth/index.md step 2: a code lives 30 s and is exchanged once for a pair."""
        with self._lock:
            entry = self._codes.pop(code, None) if isinstance(code, str) else None
            portal = self._portals.get(entry.member_id) if entry else None
            if (
                entry is None
                or portal is None
                or portal.deleted
                or not portal.installed
                or self.now() - entry.created > CODE_TTL
            ):
                self.stats["code_invalid_grant"] += 1
                return INVALID_GRANT
            fresh = self._issue(portal, entry.user_id, entry.admin)
            self.stats["code_ok"] += 1
            return 200, self._token_answer(portal, fresh)

    def _oauth_app_info(self, params: JSON) -> Answer:
        """``{oauth_server}/rest/app.info?auth=…``: the trusted answer about a token (docs/bitrix24-protocol §5).

        Shape as parsed by ``bitrix24/b24pysdk`` (``bitrix_app_info_response.py``). ``expires`` is a unix
        timestamp here; b24pysdk parses it as an ISO date, so a client should accept both.
        """
        started = self.now()
        self._bump("app_info")
        grant, error = self._check_access(params.get("auth"))
        if error is not None or grant is None:
            self._bump("app_info_rejected")
            return error or INVALID_TOKEN
        portal = self._portals[grant.member_id]
        if portal.deleted:
            self._bump("app_info_rejected")
            return INVALID_TOKEN
        result = {
            "client_id": self.client_id,
            "scope": portal.scope,
            "expires": int(grant.access_expires),
            "user_id": grant.user_id,
            "install": {
                "installed": portal.installed,
                "version": portal.app_version,
                "status": portal.status,
                "scope": portal.scope,
                "domain": portal.domain,
                "uri": portal.url,
                "client_endpoint": portal.url + "/rest/",
                "member_id": portal.member_id,
                "member_type": portal.member_type,
            },
        }
        finished = self.now()
        return 200, {"result": result, "time": _time_block(started, finished, finished - started)}


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


# --------------------------------------------------------------------------------------------------------
# Running it by hand


def main(argv: list[str] | None = None) -> int:
    """Start a stand-in with seeded portals and print what an app needs to talk to it; Ctrl-C stops it."""
    parser = argparse.ArgumentParser(description="Run the Bitrix24 stand-in on loopback.")
    parser.add_argument("--client-id", default="app.standin")
    parser.add_argument("--client-secret", default="standin-secret")
    parser.add_argument("--portals", type=int, default=1)
    parser.add_argument("--seed", type=int, default=120, help="crm.contact items per portal")
    # Fixed ports let a backend keep trusting the stand-in across restarts (bin/run trusts 8001 and 8002).
    parser.add_argument("--oauth-port", type=int, default=0, help="OAuth server port (default: any free)")
    parser.add_argument(
        "--portal-port",
        type=int,
        default=0,
        help="the first portal's port, the next ones' follow (default: any free)",
    )
    args = parser.parse_args(argv)
    with StandIn(args.client_id, args.client_secret, oauth_port=args.oauth_port) as standin:
        print(f"OAuth server: {standin.oauth_url}  (client_id={standin.client_id})")
        for index in range(args.portals):
            portal = standin.add_portal(port=args.portal_port + index if args.portal_port else 0)
            portal.seed("crm.contact", args.seed)
            tokens = portal.issue_tokens()
            print(f"portal {portal.url}  member_id={portal.member_id}")
            print(f"  application_token={portal.application_token}")
            print(f"  tokens={json.dumps(tokens)}")
            print(f"  events and widgets by hand: {portal.url}{console.CONSOLE_PATH}")
            print(f"  JS library for app pages: {portal.url}{BX24_JS_PATH}")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
