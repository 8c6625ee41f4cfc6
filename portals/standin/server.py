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
method is real elapsed time.
"""

from __future__ import annotations

import argparse
import contextlib
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
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, cast
from urllib.parse import parse_qs, urlencode, urlsplit

from .. import phpform
from . import payloads

__all__ = ["FakePortal", "StandIn"]

JSON = dict[str, Any]
Answer = tuple[int, JSON]

PAGE_SIZE = 50  # settings/how-to-call-rest-api/list-methods-pecularities.md: list methods return 50 a page
MAX_BATCH = 50  # settings/how-to-call-rest-api/batch.md: at most 50 commands
OPERATING_WINDOW = 600.0  # limits.md: operating time is summed per method over 10 minutes
CODE_TTL = 30.0  # settings/oauth/index.md: the authorization code lives 30 seconds
DEFAULT_ENTITIES = ("crm.contact", "crm.company", "crm.deal", "crm.lead")
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
APP_FRAME_NAME = "app-frame"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


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


def _split_scope(scope: str) -> set[str]:
    # settings/oauth: scope comes comma-separated in tokens and space-separated in some events.
    return {part for part in re.split(r"[,\s]+", scope) if part}


class _RestError(Exception):
    def __init__(self, status: int, code: str, description: str = "") -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.description = description

    def answer(self) -> Answer:
        return self.status, {"error": self.code, "error_description": self.description}


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
    def _dispatch(self) -> None:
        portal = cast("FakePortal", self._server.owner)
        body = self._read_body()
        if self._server is not portal._server:
            # A renamed portal answers its old address with a redirect to the new one (see FakePortal.rename).
            self._send(302, b"", "text/html; charset=utf-8", {"Location": portal.url + self.path})
            return
        split = urlsplit(self.path)
        if split.path in (APP_FRAME_PATH, APP_FRAME_PATH.rstrip("/")) and self.command in ("GET", "HEAD"):
            self._app_frame(portal, split.query)
            return
        if not split.path.startswith("/rest/"):
            self._send_json(404, {"error": "NOT_FOUND", "error_description": "Not a REST path"})
            return
        method = split.path[len("/rest/") :].strip("/").lower()
        if method.endswith(".json"):
            method = method[: -len(".json")]
        try:
            params = self._params(split.query, body)
        except (ValueError, UnicodeDecodeError) as exc:
            portal._log_call(self.command, method, {})
            self._send_json(400, {"error": "INVALID_REQUEST", "error_description": str(exc)})
            return
        portal._log_call(self.command, method, params)
        status, payload = portal._handle(method, params)
        self._send_json(status, payload)

    def _app_frame(self, portal: FakePortal, query: str) -> None:
        """``GET /app-frame/?handler=<app URL>&user_id=1[&admin=0][&placement=…]``: the portal page that
        opens the app in its frame (see :meth:`FakePortal.app_frame_page`). A development tool: the handler
        must be on a loopback host, anything else is refused with 400."""
        params = {key: values[-1] for key, values in parse_qs(query).items()}
        try:
            user_id = int(params.get("user_id") or 1)
            page = portal.app_frame_page(
                params.get("handler", ""),
                user_id=user_id,
                admin=params.get("admin", "1") not in ("0", "N", "false"),
                placement=params.get("placement") or "DEFAULT",
                lang=params.get("lang") or "en",
            )
        except ValueError as exc:
            self._send(400, f"{exc}\n".encode(), "text/plain; charset=utf-8")
            return
        self._send(200, page.encode(), "text/html; charset=utf-8", {"Cache-Control": "no-store"})


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
        self.events: list[JSON] = []
        self.calls: list[tuple[str, str, JSON]] = []
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
    ) -> str:
        """The HTML a portal serves when a user opens the app: fresh tokens for that user, posted by a form
        whose ``target`` is an ``<iframe>`` on the same page (settings/oauth/simple-way.md, "What the
        Application Receives on Opening"). The fields are exactly :func:`payloads.launch`'s: ``DOMAIN``,
        ``PROTOCOL``, ``LANG`` and ``APP_SID`` in the action's query string, the rest as hidden inputs.

        ``handler`` is the app's URL (its "handler path"). Only loopback hosts are accepted: this is a
        development tool that hands out live tokens, not a redirector. Raises ValueError otherwise.
        """
        _require_loopback_url(handler)
        tokens = self.issue_tokens(user_id, admin=admin)
        query, body = payloads.launch(self, tokens, placement=placement, lang=lang)
        action = handler + ("&" if "?" in handler else "?") + urlencode(query)
        inputs = "\n".join(
            f'    <input type="hidden" name="{html.escape(name)}" value="{html.escape(value)}">'
            for name, value in body.items()
        )
        domain = html.escape(self.domain)
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
  <header>Bitrix24 stand-in · portal <b>{domain}</b> · user {int(user_id)} · placement {html.escape(placement)}</header>
  <form id="launch" method="post" action="{html.escape(action)}" target="{APP_FRAME_NAME}">
{inputs}
    <noscript><button type="submit">Open the app</button></noscript>
  </form>
  <iframe name="{APP_FRAME_NAME}" id="{APP_FRAME_NAME}" title="Application"></iframe>
  <script>document.getElementById("launch").submit();</script>
</body>
</html>
"""

    def rotate_application_token(self) -> str:
        self.application_token = secrets.token_hex(16)
        return self.application_token

    def install(self) -> str:
        """Reinstall after :meth:`uninstall`: installed again, with a new application token (returned).

        Old tokens stay dead; issue new ones with :meth:`issue_tokens` for the install event or frame.
        """
        self.installed = True
        return self.rotate_application_token()

    def update_app(self) -> tuple[int, int]:
        """The app was updated: new version and application token; event bindings are dropped
        (api-reference/events/event-bind.md: "When deleting and updating the application, its actions
        will be removed"). Returns ``(previous_version, version)``."""
        with self._lock:
            previous = self.app_version
            self.app_version += 1
            self.events.clear()
        self.rotate_application_token()
        return previous, self.app_version

    def uninstall(self) -> None:
        """Every token of the portal dies; refresh → invalid_grant, REST → invalid_token; bindings dropped."""
        self.installed = False
        self.standin._kill_portal_tokens(self.member_id)
        with self._lock:
            self.events.clear()

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
        if method == "batch":
            return self._batch(params, grant)
        return self._call(method, params, grant)

    def _operating_usage(self, method: str, now: float) -> tuple[float, float]:
        """Summed duration of ``method`` in the last 10 minutes and when the oldest share of it lapses."""
        with self._lock:
            records = self._operating.setdefault(method, deque())
            while records and records[0][0] <= now - OPERATING_WINDOW:
                records.popleft()
            used = sum(duration for _, duration in records)
            reset_at = records[0][0] + OPERATING_WINDOW if records else now + OPERATING_WINDOW
            return used, reset_at

    def _call(self, method: str, params: JSON, grant: _Grant) -> Answer:
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
        result: Any = None
        extra: JSON = {}
        answer: Answer | None = None
        try:
            result, extra = self._run(method, params, grant)
        except _RestError as exc:
            answer = exc.answer()
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

    def _run(self, method: str, params: JSON, grant: _Grant) -> tuple[Any, JSON]:
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
        if method == "event.bind":
            return self._event_bind(params, grant), {}
        if method == "event.get":
            with self._lock:
                return [dict(binding) for binding in self.events], {}
        if method == "event.unbind":
            return self._event_unbind(params, grant), {}
        entity, _, action = method.rpartition(".")
        if entity in self.items and action in ("list", "add", "get", "update", "delete"):
            needed = entity.split(".")[0]
            if needed in KNOWN_SCOPES and needed not in _split_scope(self.scope):
                raise _RestError(
                    403, "insufficient_scope", "The request requires higher privileges than provided."
                )
            if action == "list":
                return self._entity_list(entity, params)
            if action == "add":
                return self._entity_add(entity, params), {}
            if action == "get":
                return self._entity_get(entity, params), {}
            if action == "update":
                return self._entity_update(entity, params), {}
            return self._entity_delete(entity, params), {}
        raise _RestError(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")

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

    # ---- events (api-reference/events/event-bind.md, event-get.md, event-unbind.md)

    def _event_bind(self, params: JSON, grant: _Grant) -> bool:
        event = str(params.get("event") or "").upper()
        handler = params.get("handler")
        if not event.startswith("ON"):
            raise _RestError(400, "ERROR_EVENT_NOT_FOUND", "Event not found")
        if not isinstance(handler, str) or not handler:
            raise _RestError(400, "ERROR_ARGUMENT", "Argument 'handler' is null or empty")
        auth_type = str(params.get("auth_type") or "0")
        offline = 1 if str(params.get("event_type") or "online").lower() == "offline" else 0
        # event-bind.md: a user without admin rights cannot bind offline events nor for another user.
        if not grant.admin and (offline or auth_type not in ("0", str(grant.user_id))):
            raise _RestError(403, "ACCESS_DENIED", "Access denied!")
        binding = {"event": event, "handler": handler, "auth_type": auth_type, "offline": offline}
        with self._lock:
            if binding in self.events:
                # Not on the doc page; the answer real portals give, as apps in the wild check for it.
                raise _RestError(400, "ERROR_CORE", "Handler already binded")
            self.events.append(binding)
        return True

    def _event_unbind(self, params: JSON, grant: _Grant) -> JSON:
        if not grant.admin:
            raise _RestError(403, "ACCESS_DENIED", "Access denied!")  # event-unbind.md: administrator only
        wanted: JSON = {}
        if params.get("event"):
            wanted["event"] = str(params["event"]).upper()
        if params.get("handler"):
            wanted["handler"] = params["handler"]
        if "auth_type" in params:
            wanted["auth_type"] = str(params.get("auth_type") or "0")
        wanted["offline"] = 1 if str(params.get("event_type") or "online").lower() == "offline" else 0
        with self._lock:
            kept = [b for b in self.events if any(b[k] != v for k, v in wanted.items())]
            count = len(self.events) - len(kept)
            self.events[:] = kept
        return {"count": count}

    # ---- entities: <entity>.list / .add / .get / .update / .delete

    def _max_id(self, entity: str) -> int:
        return max((int(row["ID"]) for row in self.items.get(entity, [])), default=0)

    @staticmethod
    def _compare(left: Any, op: str, right: Any) -> bool:
        if isinstance(right, list):
            hit = any(FakePortal._compare(left, "=", item) for item in right)
            return not hit if op in ("!", "!=") else hit
        try:
            a: Any = float(left)
            b: Any = float(right)
        except (TypeError, ValueError):
            a, b = str(left), str(right)
        if op in ("", "="):
            return bool(a == b)
        if op in ("!", "!="):
            return bool(a != b)
        if op == ">":
            return bool(a > b)
        if op == ">=":
            return bool(a >= b)
        if op == "<":
            return bool(a < b)
        return bool(a <= b)

    def _matches(self, row: JSON, filters: JSON) -> bool:
        for key, value in filters.items():
            match = re.match(r"^(>=|<=|!=|>|<|=|!)?(.+)$", str(key))
            if match is None:
                continue
            op, field = match.group(1) or "", match.group(2)
            if not self._compare(row.get(field), op, value):
                return False
        return True

    def _entity_list(self, entity: str, params: JSON) -> tuple[Any, JSON]:
        """List methods (settings/how-to-call-rest-api/list-methods-pecularities.md): 50 a page, ``start``
        picks the page, the answer carries ``next`` (when more follow) and ``total``. ``start=-1`` is the fast
        path for big exports: no count, no ``next``, the caller pages by ``filter[>ID]``."""
        try:
            start = int(params.get("start") or 0)
        except (TypeError, ValueError):
            start = 0
        raw_filter, raw_order = params.get("filter"), params.get("order")
        filters: JSON = raw_filter if isinstance(raw_filter, dict) else {}
        order: JSON = raw_order if isinstance(raw_order, dict) else {}
        select = params.get("select")
        with self._lock:
            rows = [dict(row) for row in self.items[entity] if self._matches(row, filters)]
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

    def _entity_add(self, entity: str, params: JSON) -> int:
        fields = self._fields_param(params)
        with self._lock:
            new_id = self._max_id(entity) + 1
            row = {key: value for key, value in fields.items() if key != "ID"}
            self.items[entity].append({"ID": str(new_id), **row})
        if self.write_delay > 0:
            time.sleep(self.write_delay)  # the write has landed; only the answer is late
        return new_id

    def _find(self, entity: str, item_id: str) -> JSON:
        for row in self.items[entity]:
            if row["ID"] == item_id:
                return row
        raise _RestError(400, "NOT_FOUND", "Not found")

    def _entity_get(self, entity: str, params: JSON) -> JSON:
        item_id = self._id_param(params)
        with self._lock:
            return dict(self._find(entity, item_id))

    def _entity_update(self, entity: str, params: JSON) -> bool:
        item_id = self._id_param(params)
        fields = self._fields_param(params)
        with self._lock:
            row = self._find(entity, item_id)
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

    def _batch(self, params: JSON, grant: _Grant) -> Answer:
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
                        status, payload = self._call(method, inner, grant)
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
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
