"""The stand-in's HTTP servers: one threaded server per portal and for the OAuth server, and their request
handlers (JSON and form parsing, CORS for loopback origins, the portal's pages)."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qs, urlencode, urlsplit

from . import console
from . import form as phpform
from .common import (
    _CONSOLE_HEADERS,
    _HTML_502,
    APP_FRAME_PATH,
    BX24_JS_PATH,
    FRAME_REPORT_PATH,
    JSON,
    _frame_options,
    _require_loopback_url,
    _static,
)

if TYPE_CHECKING:
    from .oauth import StandIn
    from .portal import FakePortal


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
