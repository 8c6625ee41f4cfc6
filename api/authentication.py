"""Authentication of the app's own frontend (the page in the portal's iframe).

The page's JavaScript sends the AUTH_ID Bitrix24 gave it (`X-Bitrix24-Auth`) and the portal's
member_id (`X-Bitrix24-Member-Id`). They are trusted only once the OAuth server's `app.info`
confirms that the token is this app's, for that portal; the answer is then kept in the shared
cache under a hash of the token for the token's remaining life (at most ten minutes), so a page
that makes many calls costs one `app.info`. Refusals are kept for a minute, so a client that
repeats a dead token does not make the backend hammer the OAuth server.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from dataclasses import dataclass
from typing import Any

from django.core.cache import cache
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from portals import services
from portals.models import Portal, PortalState, TokenPair

from .exceptions import NotConfigured, UpstreamUnavailable

logger = logging.getLogger(__name__)

AUTH_HEADER = "X-Bitrix24-Auth"
MEMBER_HEADER = "X-Bitrix24-Member-Id"
CACHE_PREFIX = "api:frame-token:"
MAX_TTL = 600  # a verified token is trusted without asking again for at most this many seconds
REFUSAL_TTL = 60

_TOKEN_RE = re.compile(r"[A-Za-z0-9._~+/=-]{8,512}")
_MEMBER_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class PortalUser:
    """Who a frontend request speaks for: one Bitrix24 user of one installed portal (not a Django user)."""

    portal: Portal
    user_id: int

    is_authenticated = True
    is_anonymous = False
    is_staff = False
    is_superuser = False
    is_active = True

    @property
    def member_id(self) -> str:
        return self.portal.member_id

    def __str__(self) -> str:
        return f"Bitrix24 user {self.user_id} on {self.portal.domain}"


class IsPortalUser(BasePermission):
    """The request was authenticated by Bitrix24FrameAuthentication."""

    def has_permission(self, request: Request, view: Any) -> bool:
        return isinstance(request.auth, PortalUser)


def _cache_key(token: str) -> str:
    return CACHE_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def _cache_get(key: str) -> dict[str, Any] | None:
    # The cache saves app.info calls; when it is down, verify every request rather than refuse them.
    try:
        value = cache.get(key)
    except Exception as exc:  # any cache backend failure
        logger.warning("Cache unavailable, verifying the frontend token again: %s", type(exc).__name__)
        return None
    return value if isinstance(value, dict) else None


def _cache_set(key: str, value: dict[str, Any], ttl: int) -> None:
    try:
        cache.set(key, value, timeout=ttl)
    except Exception as exc:  # any cache backend failure
        logger.warning("Cache unavailable, frontend token verification not kept: %s", type(exc).__name__)


def _refuse(status: int, code: str, message: str) -> exceptions.APIException:
    if status == 403:
        return exceptions.PermissionDenied(message, code=code)
    return exceptions.AuthenticationFailed(message, code=code)


def _ttl(portal: Portal, user_id: int, token: str, expires: float | None = None) -> int:
    """How long the verification may be kept: the token's remaining life, as app.info said it or as
    the user's stored pair knows it (the page got the token with the launch), at most MAX_TTL."""
    if expires is not None:
        return max(0, min(MAX_TTL, int(expires - timezone.now().timestamp())))
    pair = TokenPair.objects.filter(portal=portal, user_id=user_id).first()
    if pair is not None and hmac.compare_digest(pair.access_token.encode(), token.encode()):
        return max(0, min(MAX_TTL, int((pair.access_expires_at - timezone.now()).total_seconds())))
    return MAX_TTL


def _verify(portal: Portal, token: str) -> dict[str, Any]:
    """Ask app.info what the token is. Returns what to cache: the token's portal and user, or a refusal."""
    try:
        info = services.identify_token(portal=portal, access_token=token)
    except ImproperlyConfigured as exc:
        raise NotConfigured() from exc
    except services.UpstreamUnavailable as exc:
        raise UpstreamUnavailable(str(exc)) from exc
    except services.VerificationError as exc:
        if exc.code == "verification_failed":  # not a verdict on the token: not remembered
            raise exceptions.AuthenticationFailed(str(exc), code=exc.code) from exc
        return {"status": 401, "code": exc.code, "message": str(exc)}
    verdict: dict[str, Any] = {"member_id": info.member_id, "user_id": info.user_id}
    if info.expires_at is not None:
        verdict["expires"] = info.expires_at.timestamp()
    return verdict


class Bitrix24FrameAuthentication(BaseAuthentication):
    """`X-Bitrix24-Auth` + `X-Bitrix24-Member-Id`, verified with app.info (see the module's docstring)."""

    def authenticate_header(self, request: Request) -> str:
        return 'Bitrix24 realm="app"'

    def authenticate(self, request: Request) -> tuple[PortalUser, PortalUser] | None:
        token = request.headers.get(AUTH_HEADER, "").strip()
        member_id = request.headers.get(MEMBER_HEADER, "").strip()
        if not token and not member_id:
            return None
        if not token or not member_id:
            raise exceptions.AuthenticationFailed(
                f"Send both {AUTH_HEADER} (the AUTH_ID) and {MEMBER_HEADER}.", code="incomplete_credentials"
            )
        if not _TOKEN_RE.fullmatch(token) or not _MEMBER_RE.fullmatch(member_id):
            raise exceptions.AuthenticationFailed(
                f"{AUTH_HEADER} or {MEMBER_HEADER} is malformed.", code="malformed_credentials"
            )
        # Checked on every request, cached or not: an uninstall ends access at once.
        portal = Portal.objects.filter(member_id=member_id, state=PortalState.INSTALLED).first()
        if portal is None:
            raise exceptions.AuthenticationFailed(
                "No portal with this member_id has the app installed.", code="unknown_portal"
            )
        key = _cache_key(token)
        verdict = _cache_get(key)
        if verdict is None:
            verdict = _verify(portal, token)
            if "member_id" not in verdict:
                ttl = REFUSAL_TTL
            elif verdict["member_id"] == member_id:
                ttl = _ttl(portal, verdict["user_id"], token, verdict.get("expires"))
            else:
                ttl = MAX_TTL
            if ttl > 0:
                _cache_set(key, verdict, ttl)
        if "member_id" not in verdict:
            raise _refuse(int(verdict["status"]), str(verdict["code"]), str(verdict["message"]))
        if not hmac.compare_digest(str(verdict["member_id"]).encode(), member_id.encode()):
            logger.warning(
                "Frontend token of portal %s presented for portal %s", verdict["member_id"], member_id
            )
            raise exceptions.PermissionDenied("The token belongs to another portal.", code="wrong_portal")
        user = PortalUser(portal=portal, user_id=int(verdict["user_id"]))
        return user, user


class Bitrix24FrameScheme(OpenApiAuthenticationExtension):
    target_class = "api.authentication.Bitrix24FrameAuthentication"
    name = ["bitrix24Auth", "bitrix24MemberId"]

    def get_security_definition(self, auto_schema: Any) -> list[dict[str, str]]:
        return [
            {
                "type": "apiKey",
                "in": "header",
                "name": AUTH_HEADER,
                "description": "The AUTH_ID (access token) Bitrix24 gave the app page.",
            },
            {
                "type": "apiKey",
                "in": "header",
                "name": MEMBER_HEADER,
                "description": "The portal's member_id.",
            },
        ]
