"""Authentication of the app's own frontend (the page in the portal's iframe).

The page's JavaScript sends the AUTH_ID Bitrix24 gave it (`X-Bitrix24-Auth`) and the portal's
member_id (`X-Bitrix24-Member-Id`). They are trusted only once the OAuth server's `app.info`
confirms that the token is this app's, for that portal, through the one verification path
(`portals.verification.oauth_app_info`): the verdict is kept in the shared cache for the token's remaining
life (at most a minute), so a page that makes many calls costs one `app.info` a minute; definitive refusals
are kept too, and too many refusals for one portal answer 429 without asking.
"""

from __future__ import annotations

import hmac
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions, status
from rest_framework.authentication import BaseAuthentication
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from portals import answers, verification
from portals.models import Portal, PortalState

from .exceptions import Answered

if TYPE_CHECKING:  # a type only: the API uses portals' services, never the OAuth client itself
    from portals.oauth import AppInfo

logger = logging.getLogger(__name__)

AUTH_HEADER = "X-Bitrix24-Auth"
MEMBER_HEADER = "X-Bitrix24-Member-Id"

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


# One answer for a forged token and for a portal we do not serve: an anonymous caller must not learn
# which member_ids are installed here.
NOT_ACCEPTED = "Bitrix24 did not accept the token."


def _verify(portal: Portal, token: str) -> AppInfo:
    """The token's portal and user, per the one verification path (cached there)."""
    try:
        return verification.identify_token(portal=portal, access_token=token)
    except verification.VerificationError as exc:
        # Status and code from the one table (portals.answers); raised as DRF's authentication errors so that
        # a 401 carries WWW-Authenticate. Every other domain error reaches the API's exception handler,
        # which answers it from the same table.
        answer = answers.answer_for(exc)
        assert answer is not None
        if exc.code == "invalid_token":
            raise exceptions.AuthenticationFailed(NOT_ACCEPTED, code="invalid_token") from exc
        if answer.status == status.HTTP_401_UNAUTHORIZED:
            raise exceptions.AuthenticationFailed(answer.message, code=answer.code) from exc
        raise Answered(answer) from exc


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
            raise exceptions.AuthenticationFailed(NOT_ACCEPTED, code="invalid_token")
        info = _verify(portal, token)
        if not hmac.compare_digest(info.member_id.encode(), member_id.encode()):
            logger.warning("Frontend token of portal %s presented for portal %s", info.member_id, member_id)
            raise exceptions.PermissionDenied("The token belongs to another portal.", code="wrong_portal")
        user = PortalUser(portal=portal, user_id=int(info.user_id or 0))
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
