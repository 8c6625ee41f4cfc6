"""The OAuth server client: token refresh and app.info, the only way the project talks to it.

Retries what may heal by itself (connection errors, timeouts, 5xx, answers that are not JSON) under
the chokepoint's refresh and verification policies; never a refusal (invalid_grant, invalid_client,
PAYMENT_REQUIRED, invalid/expired token), which would only burn the single-use refresh token's
chances or hammer the server.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import requests
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone

from . import http

logger = logging.getLogger(__name__)


class OAuthError(Exception):
    """Base of every OAuth-server failure."""

    code = "oauth_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code:
            self.code = code


class OAuthRefused(OAuthError):
    """A definite refusal: retrying the same request will not help."""


class InvalidGrant(OAuthRefused):
    code = "invalid_grant"


class InvalidClient(OAuthRefused):
    code = "invalid_client"


class PaymentRequired(OAuthRefused):
    code = "PAYMENT_REQUIRED"


class PortalDeleted(OAuthRefused):
    code = "PORTAL_DELETED"


class InvalidToken(OAuthRefused):
    """app.info did not accept the access token (forged, revoked or from another app)."""

    code = "invalid_token"


class ExpiredToken(InvalidToken):
    code = "expired_token"


class NotInstalled(InvalidToken):
    """app.info: the app is not installed on the token's portal (any more)."""

    code = "NOT_INSTALLED"


class OAuthUnavailable(OAuthError):
    """The server could not be reached or answered garbage, after every retry."""

    code = "oauth_unavailable"


_REFUSALS: dict[str, type[OAuthRefused]] = {
    "invalid_grant": InvalidGrant,
    "invalid_client": InvalidClient,
    "payment_required": PaymentRequired,
    "portal_deleted": PortalDeleted,
    "expired_token": ExpiredToken,
    "invalid_token": InvalidToken,
    "no_auth_found": InvalidToken,
    "wrong_client": InvalidToken,
    "authorization_error": InvalidToken,
    "not_installed": NotInstalled,
    "application_not_found": NotInstalled,
}


@dataclass(frozen=True)
class TokenGrant:
    """A token pair as the OAuth server hands it out."""

    access_token: str
    refresh_token: str
    expires_at: datetime
    scope: str
    member_id: str
    user_id: int | None
    domain: str  # the portal's host, taken from client_endpoint
    status: str
    server_endpoint: str


@dataclass(frozen=True)
class AppInfo:
    """What app.info on the OAuth server says about an access token."""

    client_id: str
    user_id: int | None
    scope: str
    member_id: str
    domain: str
    status: str
    installed: bool
    client_endpoint: str
    version: str
    expires_at: datetime | None = None  # when the access token expires, when the server says


def worst_case_seconds() -> float:
    """The longest a refresh may take with every retry: what a lock or task limit around it must outlast."""
    return http.refresh_policy().worst_case_seconds()


def credentials() -> tuple[str, str]:
    client_id, secret = settings.BITRIX24_CLIENT_ID, settings.BITRIX24_CLIENT_SECRET
    if not client_id or not secret:
        raise ImproperlyConfigured(
            "BITRIX24_CLIENT_ID and BITRIX24_CLIENT_SECRET must be set to verify and renew Bitrix24 tokens "
            "(the app's credentials from the Bitrix24 partner account or the local app's settings)."
        )
    return client_id, secret


def server_for(endpoint: str | None) -> str:
    """The trusted OAuth server for a payload's server_endpoint: the claimed one when configured,
    else the first configured one. Never a host taken from an unverified payload."""
    if endpoint:
        parts = urlsplit(endpoint.strip())
        base = f"{parts.scheme}://{parts.netloc}"
        if http.oauth_server_allowed(base):
            return base
    return settings.BITRIX24_OAUTH_SERVERS[0]


def _request(url: str, params: dict[str, str], policy: http.RetryPolicy) -> dict[str, Any]:
    attempts = http.Attempts(policy)
    # Set once a request may have reached the server without its answer reaching us: a refresh
    # token refused after that was most likely consumed by the lost request.
    maybe_consumed = False
    while True:
        try:
            response = http.send("GET", url, params=params, timeout=policy.timeout)
        except http.HostNotAllowed as exc:
            raise OAuthError(str(exc), code="host_not_allowed") from exc
        except requests.RequestException as exc:
            failure = http.failure_of(exc)
            maybe_consumed = maybe_consumed or failure is not http.Failure.NOT_SENT
            attempts.retry_or_raise(
                failure, OAuthUnavailable(f"{type(exc).__name__} talking to the OAuth server")
            )
            continue
        try:
            data = response.json()
        except ValueError:
            data = None
        if isinstance(data, dict) and data.get("error"):
            code = str(data["error"])
            description = str(data.get("error_description") or "")[:200]
            refusal = _REFUSALS.get(code.lower())
            if refusal is not None:
                if refusal is InvalidGrant and maybe_consumed:
                    description += (
                        " (an earlier attempt got no answer: the server most likely used the token then)"
                    )
                raise refusal(f"{code}: {description}".strip(": "), code=code)
            # An error code we do not know (or a 429) is not taken as a refusal: marking a pair dead
            # on it would give up a refresh token that is probably still good.
        if response.status_code >= 400 or not isinstance(data, dict) or data.get("error"):
            kind = (
                "non-JSON answer" if not isinstance(data, dict) else f"answer {data.get('error') or 'error'}"
            )
            attempts.retry_or_raise(
                http.Failure.BAD_ANSWER,
                OAuthUnavailable(f"OAuth server {kind} (HTTP {response.status_code})"),
            )
            continue
        return data


def _expires_at(data: dict[str, Any]) -> datetime:
    # expires_in is relative and immune to clock skew between us and Bitrix24; `expires` is a fallback.
    try:
        return timezone.now() + timedelta(seconds=int(data.get("expires_in") or 3600))
    except (TypeError, ValueError):
        return timezone.now() + timedelta(hours=1)


def _int_or_none(value: Any) -> int | None:
    text = str(value if value is not None else "").strip()
    return int(text) if text.isdigit() else None


def _when(value: Any) -> datetime | None:
    """app.info's `expires`: a unix time here, an ISO date in some SDKs' reading; None if neither."""
    if isinstance(value, (int, float)) or (isinstance(value, str) and value.strip().isdigit()):
        return datetime.fromtimestamp(int(value), tz=UTC)
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _host(endpoint: str) -> str:
    return urlsplit(endpoint).netloc.lower() if endpoint else ""


def refresh(server: str, refresh_token: str) -> TokenGrant:
    """Exchange a refresh token for a new pair. The old pair is dead once this returns."""
    client_id, secret = credentials()
    data = _request(
        f"{server}/oauth/token/",
        {
            "grant_type": "refresh_token",
            "client_id": client_id,
            "client_secret": secret,
            "refresh_token": refresh_token,
        },
        http.refresh_policy(),
    )
    try:
        access, new_refresh = str(data["access_token"]), str(data["refresh_token"])
    except KeyError as exc:
        raise OAuthUnavailable(f"OAuth server answer lacks {exc.args[0]}") from exc
    return TokenGrant(
        access_token=access,
        refresh_token=new_refresh,
        expires_at=_expires_at(data),
        scope=str(data.get("scope") or ""),
        member_id=str(data.get("member_id") or ""),
        user_id=_int_or_none(data.get("user_id")),
        domain=_host(str(data.get("client_endpoint") or "")),
        status=str(data.get("status") or ""),
        server_endpoint=str(data.get("server_endpoint") or ""),
    )


def app_info(server: str, access_token: str) -> AppInfo:
    """Ask the OAuth server what an access token is: whose app, which portal, which user."""
    data = _request(f"{server}/rest/app.info", {"auth": access_token}, http.verify_policy())
    result = data.get("result")
    if not isinstance(result, dict):
        raise OAuthUnavailable("app.info answer has no result object")
    raw_install = result.get("install")
    install: dict[str, Any] = raw_install if isinstance(raw_install, dict) else {}
    return AppInfo(
        client_id=str(result.get("client_id") or ""),
        user_id=_int_or_none(result.get("user_id")),
        scope=str(result.get("scope") or install.get("scope") or ""),
        member_id=str(install.get("member_id") or ""),
        domain=str(install.get("domain") or _host(str(install.get("client_endpoint") or ""))).lower(),
        status=str(install.get("status") or ""),
        installed=bool(install.get("installed")),
        client_endpoint=str(install.get("client_endpoint") or ""),
        version=str(install.get("version") or ""),
        expires_at=_when(result.get("expires")),
    )
