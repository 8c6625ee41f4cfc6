"""What happens to a portal: verification of what Bitrix24 claims, install, launch, update,
payment and uninstall. Plain functions with keyword-only arguments; views call one of them."""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import IntegrityError, transaction
from django.dispatch import Signal
from django.utils import timezone

from . import http, oauth, renewal
from .client import PortalClient
from .models import PairState, Portal, PortalState, ReinstallCause, RenewalLog, TokenPair

logger = logging.getLogger(__name__)

# Sent after an uninstall with CLEAN=1, inside its transaction: receivers delete the app's own
# data for that portal (kwargs: portal).
portal_purged = Signal()


class VerificationError(Exception):
    """What Bitrix24 supposedly sent could not be confirmed. `status` is 401 or 403."""

    def __init__(self, message: str, *, status: int = 401, code: str = "verification_failed") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class UpstreamUnavailable(Exception):
    """The OAuth server could not be asked, so the request could be neither trusted nor refused."""


@dataclass(frozen=True)
class Verified:
    """An access token confirmed by the OAuth server, with where it came from."""

    info: oauth.AppInfo
    server: str
    protocol: str


def is_portal_domain(domain: str) -> bool:
    """Whether `domain` (host[:port]) is a portal this backend serves (BITRIX24_PORTAL_DOMAINS)."""
    return http.portal_domain_allowed(domain)


def normalize_domain(domain: str) -> str:
    """Lowercased host[:port] without a trailing dot; ValueError for anything that is not one."""
    return http.normalize_domain(domain)


def check_portal_domain(domain: str) -> str:
    try:
        normalized = http.normalize_domain(domain)
    except ValueError as exc:
        raise VerificationError(
            f"DOMAIN is not a host name: {exc}", status=403, code="domain_not_allowed"
        ) from exc
    if not http.portal_domain_allowed(normalized):
        raise VerificationError(
            f"{normalized!r} is not a Bitrix24 portal this backend serves (BITRIX24_PORTAL_DOMAINS)",
            status=403,
            code="domain_not_allowed",
        )
    return normalized


def verify_access_token(
    *, access_token: str, member_id: str, domain: str, server_endpoint: str = ""
) -> Verified:
    """Confirm with app.info on a trusted OAuth server that the token is ours, for that portal.

    The claimed domain must be a portal domain before anything is sent anywhere, and app.info
    is asked on a configured OAuth server only: nothing goes to a host taken from the request.
    """
    domain = check_portal_domain(domain)
    client_id, _ = oauth.credentials()
    server = oauth.server_for(server_endpoint)
    try:
        info = oauth.app_info(server, access_token)
    except oauth.InvalidToken as exc:
        raise VerificationError(f"Bitrix24 did not accept the access token ({exc.code})") from exc
    except oauth.OAuthUnavailable as exc:
        raise UpstreamUnavailable(f"cannot verify the request now: {exc}") from exc
    except oauth.OAuthError as exc:
        raise VerificationError(f"Bitrix24 refused to confirm the access token ({exc.code})") from exc
    if not hmac.compare_digest(info.client_id, client_id):
        raise VerificationError("the access token belongs to another application", code="wrong_client")
    if not info.member_id or not hmac.compare_digest(info.member_id, member_id):
        raise VerificationError("the access token belongs to another portal", status=403, code="wrong_portal")
    if info.domain != domain:
        raise VerificationError(
            f"the portal of this token is {info.domain!r}, not {domain!r}", status=403, code="wrong_domain"
        )
    if not info.installed:
        raise VerificationError("the app is not installed on this portal", status=403, code="not_installed")
    protocol = "https"
    if info.client_endpoint.startswith("http://"):
        protocol = "http"
    return Verified(info=info, server=server, protocol=protocol)


def identify_token(*, portal: Portal, access_token: str) -> oauth.AppInfo:
    """What app.info on the portal's OAuth server says about an access token presented for it: an
    installed app's user token of our application (which portal and user it is, the caller checks).

    Raises VerificationError with code `invalid_token` or `wrong_client` (a verdict worth
    remembering) or `verification_failed` (a refusal that may not hold next time),
    UpstreamUnavailable when the server cannot be asked, ImproperlyConfigured without credentials.
    """
    client_id, _ = oauth.credentials()
    try:
        info = oauth.app_info(portal.oauth_server, access_token)
    except oauth.InvalidToken as exc:
        raise VerificationError(
            f"Bitrix24 did not accept the token ({exc.code}).", code="invalid_token"
        ) from exc
    except oauth.OAuthUnavailable as exc:
        raise UpstreamUnavailable(f"The token cannot be verified now: {exc}") from exc
    except oauth.OAuthError as exc:
        raise VerificationError(
            f"Bitrix24 refused to confirm the token ({exc.code}).", code="verification_failed"
        ) from exc
    if not hmac.compare_digest(info.client_id.encode(), client_id.encode()):
        raise VerificationError("The token belongs to another application.", code="wrong_client")
    if not info.member_id or info.user_id is None or not info.installed:
        raise VerificationError("The token is not an installed app's user token.", code="invalid_token")
    return info


def _upsert_portal(*, verified: Verified, scope: str = "") -> Portal:
    """The portal row for a verified token, locked; created on first sight, renamed if its domain moved."""
    info = verified.info
    defaults = {
        "domain": info.domain,
        "protocol": verified.protocol,
        "oauth_server": verified.server,
        "app_status": info.status[:1],
        "scope": scope or info.scope,
    }
    try:
        with transaction.atomic():
            portal, created = Portal.objects.select_for_update().get_or_create(
                member_id=info.member_id, defaults=defaults
            )
    except IntegrityError:
        # A concurrent request created it first: the unique member_id is the natural key.
        portal, created = Portal.objects.select_for_update().get(member_id=info.member_id), False
    if not created:
        if portal.domain != info.domain:
            logger.info("Portal %s renamed: %s -> %s", portal.member_id, portal.domain, info.domain)
        for field, value in defaults.items():
            if value:
                setattr(portal, field, value)
    return portal


def _store_pair(
    *,
    portal: Portal,
    user_id: int,
    access_token: str,
    refresh_token: str,
    expires_in: int,
    scope: str,
    background: bool,
) -> TokenPair:
    now = timezone.now()
    if background:
        TokenPair.objects.filter(portal=portal, is_background=True).exclude(user_id=user_id).update(
            is_background=False
        )
    pair = TokenPair.objects.select_for_update().filter(portal=portal, user_id=user_id).first()
    if pair is None:
        pair = TokenPair(portal=portal, user_id=user_id)
    pair.access_token = access_token
    pair.refresh_token = refresh_token
    pair.access_expires_at = now + timedelta(seconds=expires_in)
    pair.refresh_issued_at = now
    pair.scope = scope
    pair.is_background = pair.is_background or background
    pair.state = PairState.ACTIVE
    pair.last_error = ""
    pair.consecutive_failures = 0
    pair.next_attempt_at = None
    pair.save()
    return pair


def _revive(portal: Portal, now: datetime, *, new_background: bool) -> None:
    """The portal's state after a verified install or launch.

    A portal that needs a reinstall because its background tokens were refused or lost stays so
    until a new background pair has renewed once (`renewal` then marks it installed): an ordinary
    user's launch proves nothing about the background pair, and a new pair is only trusted once
    the OAuth server has taken its refresh token. An admin's reinstall or launch with a new
    background pair does clear a mark staff set by hand (the customer did what staff asked).
    """
    if portal.state == PortalState.INSTALLED:
        return
    if portal.state == PortalState.NEEDS_REINSTALL:
        if not new_background:
            return
        if portal.reinstall_cause in (ReinstallCause.TOKENS, ReinstallCause.CONFIRMING):
            portal.state_reason = renewal.CONFIRMING
            portal.reinstall_cause = ReinstallCause.CONFIRMING
            return
    if portal.state == PortalState.UNINSTALLED or portal.installed_at is None:
        portal.installed_at = now
    portal.state = PortalState.INSTALLED
    portal.state_reason = ""
    portal.reinstall_cause = ""
    portal.uninstalled_at = None


def needs_confirmation(portal: Portal) -> TokenPair | None:
    """The new background pair to renew once, when the portal waits for that to count as installed."""
    if portal.state != PortalState.NEEDS_REINSTALL or portal.reinstall_cause != ReinstallCause.CONFIRMING:
        return None
    return TokenPair.objects.filter(portal=portal, is_background=True, state=PairState.ACTIVE).first()


def install_is_trusted(*, verified: Verified, access_token: str) -> bool:
    """May this install replace the background pair and the application token?

    app.info proves the token is ours and the portal's, not that the request came from
    Bitrix24's install: any employee could post their own token to /install/ or as a forged
    ONAPPINSTALL, with an application token of their choosing (and then forge an uninstall with
    it). Only the very first sight of a portal is taken on trust; after that, only a portal
    admin's install (per `profile`) may replace them.
    """
    if not Portal.objects.filter(member_id=verified.info.member_id).exists():
        return True
    probe = Portal(member_id=verified.info.member_id, domain=verified.info.domain, protocol=verified.protocol)
    return PortalClient(probe, access_token=access_token).is_admin()


@transaction.atomic
def install_portal(
    *,
    verified: Verified,
    access_token: str,
    refresh_token: str,
    expires_in: int,
    trusted: bool,
    scope: str = "",
    application_token: str = "",
    version: str = "",
) -> Portal:
    """Store a verified install (the install frame, ONAPPINSTALL or ONAPPUPDATE).

    When `trusted` (see install_is_trusted) the installing user's pair becomes the background
    pair and a new application token replaces the old one; otherwise only that user's pair is
    stored. A second install of the same portal updates it (member_id is the key).
    """
    now = timezone.now()
    portal = _upsert_portal(verified=verified, scope=scope)
    _revive(portal, now, new_background=trusted and verified.info.user_id is not None)
    if portal.installed_at is None:
        portal.installed_at = now
    if application_token and trusted:
        portal.application_token = application_token
    if version:
        portal.app_version = version[:32]
    portal.save()
    user_id = verified.info.user_id
    if user_id is not None:
        _store_pair(
            portal=portal,
            user_id=user_id,
            access_token=access_token,
            refresh_token=refresh_token,
            expires_in=expires_in,
            scope=scope or verified.info.scope,
            background=trusted,
        )
    return portal


def record_launch(
    *,
    verified: Verified,
    access_token: str,
    refresh_token: str,
    expires_in: int,
    scope: str = "",
) -> tuple[Portal, TokenPair | None]:
    """Store the tokens of the user who opened the app. Never moves the background mark to them,
    unless the portal has no background pair at all and `profile` says they are an admin."""
    info = verified.info
    may_take_background = False
    if (
        info.user_id is not None
        and not TokenPair.objects.filter(
            portal__member_id=info.member_id, is_background=True, state=PairState.ACTIVE
        ).exists()
    ):
        # Asked before the transaction: no row lock is held while the portal answers.
        probe = Portal(member_id=info.member_id, domain=info.domain, protocol=verified.protocol)
        may_take_background = PortalClient(probe, access_token=access_token).is_admin()
    return _record_launch(
        verified=verified,
        access_token=access_token,
        refresh_token=refresh_token,
        expires_in=expires_in,
        scope=scope,
        may_take_background=may_take_background,
    )


@transaction.atomic
def _record_launch(
    *,
    verified: Verified,
    access_token: str,
    refresh_token: str,
    expires_in: int,
    scope: str,
    may_take_background: bool,
) -> tuple[Portal, TokenPair | None]:
    now = timezone.now()
    portal = _upsert_portal(verified=verified, scope=scope)
    user_id = verified.info.user_id
    background = (
        user_id is not None
        and may_take_background
        and not TokenPair.objects.filter(portal=portal, is_background=True, state=PairState.ACTIVE).exists()
    )
    _revive(portal, now, new_background=background)
    portal.last_launch_at = now
    # The APPLICATION_TOKEN newer portals send with a launch is never taken: nothing in a launch
    # proves it, and whoever sets it can forge ONAPPUNINSTALL. Installs and updates set it.
    portal.save()
    if user_id is None:
        return portal, None
    pair = _store_pair(
        portal=portal,
        user_id=user_id,
        access_token=access_token,
        refresh_token=refresh_token,
        expires_in=expires_in,
        scope=scope or verified.info.scope,
        background=background,
    )
    return portal, pair


def check_application_token(*, member_id: str, application_token: str) -> Portal:
    """The portal whose stored application token equals the one given (compared in constant time)."""
    portal = Portal.objects.filter(member_id=member_id).first()
    stored = portal.application_token if portal is not None else ""
    # Compare even when the portal is unknown, so timing does not tell which member_ids exist.
    matches = hmac.compare_digest((stored or "\0").encode(), (application_token or "").encode())
    if portal is None or not stored or not matches:
        raise VerificationError("application token does not match this portal", code="bad_application_token")
    return portal


@transaction.atomic
def uninstall_portal(*, portal: Portal, clean: bool) -> Portal:
    """Forget every token of the portal (they are dead anyway); with `clean`, purge its data too."""
    portal = Portal.objects.select_for_update().get(pk=portal.pk)
    TokenPair.objects.filter(portal=portal).delete()
    portal.application_token = ""
    portal.state = PortalState.UNINSTALLED
    portal.state_reason = "uninstalled with CLEAN=1" if clean else "uninstalled"
    portal.reinstall_cause = ""
    portal.uninstalled_at = timezone.now()
    portal.save()
    if clean:
        purge_portal_data(portal=portal)
    return portal


def purge_portal_data(*, portal: Portal) -> None:
    """Delete what the backend keeps about an uninstalled portal beyond the row itself."""
    if portal.state != PortalState.UNINSTALLED:
        raise ValueError("only an uninstalled portal's data can be purged")
    TokenPair.objects.filter(portal=portal).delete()
    RenewalLog.objects.filter(portal=portal).delete()
    portal_purged.send(sender=Portal, portal=portal)
