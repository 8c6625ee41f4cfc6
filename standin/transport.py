"""The stand-in's HTTP plumbing: a threaded server (one per portal and one for the OAuth server) and the base of
their request handlers (keep-alive, JSON and form parsing). The handlers themselves live with what they serve:
``oauth.OAuthHandler``, ``pages.PortalHandler``."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

from . import form as phpform
from .common import (
    JSON,
)

# --------------------------------------------------------------------------------------------------------
# HTTP plumbing


class _Server(ThreadingHTTPServer):
    """A threading server that remembers its open connections so that stopping it cuts keep-alives too."""

    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default listen backlog of 5 drops SYNs under a burst of parallel clients, which then
    # retry after a second; a real front end accepts far more.
    request_queue_size = 256

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        owner: Any,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.owner = owner
        self.tls = tls
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
        if self.tls is not None:
            # The handshake waits for the connection's first read, in its own thread: a slow or broken client
            # must not hold up the accept loop (a failed handshake is an OSError there, dropped quietly).
            conn = self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
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
