"""A portal's state and what an install changes in it: tokens it issues through its OAuth server, webhooks,
install, update and uninstall. The jobs of a portal (records, events, placements, frames, its REST API)
build on this class; :class:`Authority` is what a portal asks of the OAuth server that owns it."""

from __future__ import annotations

import secrets
import ssl
import threading
from collections import deque
from typing import Any, Protocol

from .common import (
    DEFAULT_ENTITIES,
    JSON,
    Answer,
    _Code,
    _Grant,
)
from .events import (
    FEATURE_CONNECTOR,
    FEATURE_EXTENDED,
    Courier,
    OfflineQueue,
)


class Authority(Protocol):
    """What a portal asks of the OAuth server that issues its tokens (:class:`~standin.oauth.StandIn`)."""

    host: str
    scheme: str  # "https" when the stand-in serves TLS
    tls_context: ssl.SSLContext | None
    client_id: str
    access_ttl: int
    delivery_timeout: float
    _lock: threading.RLock
    _codes: dict[str, _Code]
    _access: dict[str, _Grant]
    _courier: Courier

    @property
    def oauth_url(self) -> str: ...

    @property
    def server_endpoint(self) -> str: ...

    def now(self) -> float: ...

    def _issue(self, portal: PortalState, user_id: int, admin: bool) -> _Grant: ...

    def _token_answer(self, portal: PortalState, grant: _Grant) -> JSON: ...

    def _kill_portal_tokens(self, member_id: str) -> None: ...

    def _check_access(
        self, token: Any, portal: PortalState | None = None
    ) -> tuple[_Grant | None, Answer | None]: ...


class PortalState:
    """One Bitrix24 account's data and install state (see :class:`~standin.portal.FakePortal`)."""

    # Set by the portal once its server listens (the domain is the server's address).
    domain: str
    url: str

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

    @property
    def client_endpoint(self) -> str:
        return self.url + "/rest/"

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

    def _log_call(self, http_method: str, rest_method: str, params: JSON) -> None:
        with self._lock:
            self.calls.append((http_method, rest_method, params))
