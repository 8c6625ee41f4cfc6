"""A portal's HTTP requests: REST (with CORS for loopback origins and inbound webhooks), the app frame page,
the JS library, the frame's reports and the ``/standin/`` console."""

from __future__ import annotations

import re
from typing import cast
from urllib.parse import parse_qs, urlencode, urlsplit

from . import console
from .common import (
    _CONSOLE_HEADERS,
    APP_FRAME_PATH,
    BX24_JS_PATH,
    FRAME_REPORT_PATH,
    _frame_options,
    _require_loopback_url,
    _static,
)
from .portal import FakePortal
from .transport import _Handler

__all__ = ["PortalHandler"]


class PortalHandler(_Handler):
    """Requests to one portal's port (``_Server.owner`` is the :class:`FakePortal`)."""

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
        portal = cast(FakePortal, self._server.owner)
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
