"""The stand-in's OAuth server (`oauth.bitrix.info`): tokens, authorization codes, `app.info`, and the portals
it knows."""

from __future__ import annotations

import hmac
import os
import secrets
import ssl
import threading
import time
from collections import Counter
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from .base import iso
from .common import (
    _HTML_502,
    CODE_TTL,
    EXPIRED_TOKEN,
    INVALID_CLIENT,
    INVALID_GRANT,
    INVALID_TOKEN,
    JSON,
    NO_AUTH_FOUND,
    Answer,
    _Code,
    _Grant,
    _time_block,
)
from .events import (
    Courier,
)
from .pages import PortalHandler
from .portal import FakePortal
from .state import PortalState
from .transport import _Handler, _Server

if TYPE_CHECKING:
    from .tls import LocalCA

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
        tls_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """``tls_dir``: serve HTTPS, as Bitrix24 does, with a certificate of the local authority kept there
        (``tls.LocalCA``: made on first use, its ``ca.pem`` is what clients must trust). Plain HTTP without."""
        self.client_id = client_id
        self.oauth_port = oauth_port  # 0: any free port
        self.client_secret = client_secret
        self.host = host
        self.tls: LocalCA | None = None
        if tls_dir is not None:
            # Imported for HTTPS only: it needs `cryptography`, the rest of the stand-in the standard library.
            from .tls import LocalCA  # noqa: PLC0415

            self.tls = LocalCA(tls_dir)
        self.tls_context: ssl.SSLContext | None = self.tls.server_context(host) if self.tls else None
        self.scheme = "https" if self.tls else "http"
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
            self._server = _Server((self.host, self.oauth_port), OAuthHandler, self, self.tls_context)
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
        """``http://127.0.0.1:PORT`` (``https://`` with ``tls_dir``; no trailing slash); the token endpoint is
        ``oauth_url + "/oauth/token/"``."""
        if self._server is None:
            raise RuntimeError("StandIn is not started: call start() or use it as a context manager")
        return f"{self.scheme}://{self.host}:{self._server.port}"

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
                handler=PortalHandler,
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

    def _issue(self, portal: PortalState, user_id: int, admin: bool) -> _Grant:
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

    def _token_answer(self, portal: PortalState, grant: _Grant) -> JSON:
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
        self, token: Any, portal: PortalState | None = None
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

        Bitrix24's docs describe only the portal's own ``app.info``; this answer's shape is the one the official
        Python SDK (``bitrix24/b24pysdk``, ``bitrix_app_info_response.py`` and its tests) reads: ``expires``
        is an ISO 8601 date with its offset (not a unix time, as in token answers), ``install.scope`` a
        comma-separated string.
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
            "expires": iso(grant.access_expires),
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


class OAuthHandler(_Handler):
    """The OAuth server's requests: ``/oauth/token/`` and ``/rest/app.info``, through its fault modes."""

    def _dispatch(self) -> None:
        standin = cast(StandIn, self._server.owner)
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
