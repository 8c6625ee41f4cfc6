"""What happens to a portal: verification of what Bitrix24 claims, install, launch, update,
payment and uninstall. Plain functions with keyword-only arguments; views call one of them."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import logging
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db import IntegrityError, transaction
from django.dispatch import Signal
from django.utils import timezone

from . import http, lifecycle, metrics, oauth, pairs, renewal, statements
from .client import PortalClient
from .models import PairState, Portal, PortalState, ReinstallCause, RenewalLog, RenewalTrigger, TokenPair

logger = logging.getLogger(__name__)

# Sent after an uninstall with CLEAN=1, inside its transaction: receivers delete the app's own
# data for that portal (kwargs: portal).
portal_purged = Signal()


class Refusal(enum.StrEnum):
    """Why a request was refused, in the domain's words; the views and the API choose the HTTP status."""

    NOT_ACCEPTED = "not_accepted"  # the credentials prove nothing (forged, expired, another app's)
    NOT_HERE = "not_here"  # genuine credentials, but for another portal or domain, or the app is gone
    STALE = "stale"  # true when it was verified, overtaken since (an uninstall confirmed meanwhile)


class VerificationError(Exception):
    """What Bitrix24 supposedly sent could not be confirmed; `refusal` says how, `code` exactly."""

    def __init__(
        self, message: str, *, refusal: Refusal = Refusal.NOT_ACCEPTED, code: str = "verification_failed"
    ) -> None:
        super().__init__(message)
        self.refusal = refusal
        self.code = code
        if not isinstance(sys.exc_info()[1], VerificationError):  # a refusal restated is counted once
            metrics.refusal(refusal, code)


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
            f"DOMAIN is not a host name: {exc}", refusal=Refusal.NOT_HERE, code="domain_not_allowed"
        ) from exc
    if not http.portal_domain_allowed(normalized):
        raise VerificationError(
            f"{normalized!r} is not a Bitrix24 portal this backend serves (BITRIX24_PORTAL_DOMAINS)",
            refusal=Refusal.NOT_HERE,
            code="domain_not_allowed",
        )
    return normalized


class TooManyUnverified(Exception):
    """Requests claiming this portal failed verification too often lately: answer 429, ask nobody."""

    retry_after = 60


# --- one verification path ---------------------------------------------------------------------------
# Every token we are handed (install frame, launch, install/update events, the app page's API calls) is
# checked by `app_info_for`: one app.info call with a short timeout, its verdict kept in the shared cache
# under a hash of the token, the claimed portal and that portal's install generation (so an uninstall or
# a reinstall invalidates it), for the token's remaining life and at most ten minutes. Only definitive
# refusals are kept; "try again" never is. Refusals also count against a per-portal budget.

VERDICT_TTL = 600
BUDGET_WINDOW = 60
_local_budget: dict[str, tuple[float, int]] = {}  # per process, only while the shared cache is away


def _verdict_key(server: str, access_token: str, member_id: str, generation: int) -> str:
    digest = hashlib.sha256(f"{server}\n{access_token}".encode()).hexdigest()
    return f"b24:verdict:{digest}:{member_id}:{generation}"


def _cache_get(key: str) -> Any:
    try:
        return cache.get(key)
    except Exception as exc:  # the shared cache is away: verify again rather than refuse
        logger.warning("Shared cache unavailable (%s): verifying without it", type(exc).__name__)
        return None


def _cache_set(key: str, value: Any, ttl: int) -> None:
    if ttl <= 0:
        return
    try:
        cache.set(key, value, timeout=ttl)
    except Exception as exc:
        logger.warning("Shared cache unavailable (%s): verdict not kept", type(exc).__name__)


def _budget_key(member_id: str) -> str:
    return f"b24:unverified:{member_id}:{int(time.time() // BUDGET_WINDOW)}"


def _over_budget(member_id: str) -> bool:
    key = _budget_key(member_id)
    try:
        return int(cache.get(key) or 0) >= settings.BITRIX24_UNVERIFIED_BUDGET
    except Exception:
        # Without the shared cache each process keeps its own count: the bound holds per process.
        _window, count = _local_budget.get(key, (0.0, 0))
        return count >= settings.BITRIX24_UNVERIFIED_BUDGET


def _spend_budget(member_id: str) -> None:
    key = _budget_key(member_id)
    try:
        if not cache.add(key, 1, timeout=BUDGET_WINDOW * 2):
            cache.incr(key)
    except Exception:
        window, count = _local_budget.get(key, (time.time(), 0))
        _local_budget[key] = (window, count + 1)
        for stale in [k for k in _local_budget if k != key]:
            del _local_budget[stale]


def _refusal(exc: oauth.OAuthError) -> VerificationError:
    if isinstance(exc, oauth.NotInstalled):
        return VerificationError(
            "the app is not installed on this portal", refusal=Refusal.NOT_HERE, code="not_installed"
        )
    return VerificationError(f"Bitrix24 did not accept the access token ({exc.code})", code="invalid_token")


def install_generation(member_id: str) -> int:
    """The claimed portal's install generation (0 for a portal never seen)."""
    return pairs.install_generation(member_id)


def app_info_for(
    *, server: str, access_token: str, member_id: str, generation: int | None = None
) -> oauth.AppInfo:
    """What app.info says about a token presented for `member_id` (see above). Raises
    VerificationError (a refusal), TooManyUnverified, UpstreamUnavailable, ImproperlyConfigured."""
    oauth.credentials()
    if generation is None:
        generation = install_generation(member_id)
    key = _verdict_key(server, access_token, member_id, generation)
    cached = _cache_get(key)
    if isinstance(cached, dict):
        if "refused" in cached:
            raise VerificationError(
                cached["refused"], refusal=Refusal(cached["refusal"]), code=cached["code"]
            )
        return oauth.AppInfo(**cached)
    if _over_budget(member_id):
        raise TooManyUnverified(f"too many requests for portal {member_id} failed verification; try later")
    try:
        info = oauth.app_info(server, access_token)
    except oauth.InvalidToken as exc:
        refusal = _refusal(exc)
        _spend_budget(member_id)
        _cache_set(
            key, {"refused": str(refusal), "refusal": str(refusal.refusal), "code": refusal.code}, VERDICT_TTL
        )
        raise refusal from exc
    except oauth.OAuthUnavailable as exc:
        raise UpstreamUnavailable(f"cannot verify the request now: {exc}") from exc
    except oauth.OAuthError as exc:
        _spend_budget(member_id)
        raise VerificationError(
            f"Bitrix24 refused to confirm the access token ({exc.code})", code="verification_failed"
        ) from exc
    ttl = VERDICT_TTL
    if info.expires_at is not None:
        ttl = min(ttl, int((info.expires_at - timezone.now()).total_seconds()))
    _cache_set(key, dataclasses.asdict(info), ttl)
    return info


def verify_access_token(
    *,
    access_token: str,
    member_id: str,
    domain: str,
    server_endpoint: str = "",
    generation: int | None = None,
) -> Verified:
    """Confirm with app.info on a trusted OAuth server that the token is ours, for that portal.

    The claimed domain must be a portal domain before anything is sent anywhere, and app.info
    is asked on a configured OAuth server only: nothing goes to a host taken from the request.
    """
    domain = check_portal_domain(domain)
    client_id, _ = oauth.credentials()
    server = oauth.server_for(server_endpoint)
    info = app_info_for(server=server, access_token=access_token, member_id=member_id, generation=generation)
    if not hmac.compare_digest(info.client_id, client_id):
        raise VerificationError("the access token belongs to another application", code="wrong_client")
    if not info.member_id or not hmac.compare_digest(info.member_id, member_id):
        raise VerificationError(
            "the access token belongs to another portal", refusal=Refusal.NOT_HERE, code="wrong_portal"
        )
    if info.domain != domain:
        raise VerificationError(
            f"the portal of this token is {info.domain!r}, not {domain!r}",
            refusal=Refusal.NOT_HERE,
            code="wrong_domain",
        )
    if not info.installed:
        raise VerificationError(
            "the app is not installed on this portal", refusal=Refusal.NOT_HERE, code="not_installed"
        )
    protocol = "https"
    if info.client_endpoint.startswith("http://"):
        protocol = "http"
    return Verified(info=info, server=server, protocol=protocol)


def identify_token(*, portal: Portal, access_token: str) -> oauth.AppInfo:
    """What app.info says about an access token presented for an installed portal by the app's own
    page: an installed app's user token of our application (which portal and user it is, the caller
    checks). The same path and cache as `verify_access_token`.

    Raises VerificationError with code `invalid_token` or `wrong_client` (definitive) or
    `verification_failed` (a refusal that may not hold next time), TooManyUnverified,
    UpstreamUnavailable when the server cannot be asked, ImproperlyConfigured without credentials.
    """
    client_id, _ = oauth.credentials()
    try:
        info = app_info_for(server=portal.oauth_server, access_token=access_token, member_id=portal.member_id)
    except VerificationError as exc:
        if exc.code == "verification_failed":
            raise
        raise VerificationError("Bitrix24 did not accept the token.", code="invalid_token") from exc
    if not hmac.compare_digest(info.client_id.encode(), client_id.encode()):
        raise VerificationError("The token belongs to another application.", code="wrong_client")
    if not info.member_id or info.user_id is None or not info.installed:
        raise VerificationError("The token is not an installed app's user token.", code="invalid_token")
    return info


def _upsert_portal(
    *,
    verified: Verified,
    scope: str = "",
    generation: int | None = None,
    annotations: dict[str, Any] | None = None,
    defer: tuple[str, ...] = (),
    known: Portal | None = None,
) -> Portal:
    """The portal row for a verified token, locked; created on first sight (pending until `_revive`
    says otherwise), renamed if its domain moved.

    `generation`: the portal's install generation read before the token was verified. If an
    uninstall was confirmed meanwhile, that verification predates it and proves nothing now.
    `known`: the row already read and locked by the caller (None: not found, or not asked).
    """
    info = verified.info
    defaults = {
        "domain": info.domain,
        "protocol": verified.protocol,
        "oauth_server": verified.server,
        "app_status": info.status[:1],
        "scope": scope or info.scope,
    }
    portal, created = known, False
    if portal is None:
        portals = Portal.objects.select_for_update().annotate(**(annotations or {})).defer(*defer)
        try:
            with transaction.atomic():
                portal, created = portals.get_or_create(
                    member_id=info.member_id, defaults={**defaults, "state": PortalState.PENDING}
                )
        except IntegrityError:
            # A concurrent request created it first: the unique member_id is the natural key.
            portal, created = portals.get(member_id=info.member_id), False
    if generation is not None and portal.install_generation != generation:
        raise VerificationError(
            "the app was uninstalled from this portal while this request was being verified",
            refusal=Refusal.STALE,
            code="uninstalled_meanwhile",
        )
    if not created:
        if portal.domain != info.domain:
            logger.info("Portal %s renamed: %s -> %s", portal.member_id, portal.domain, info.domain)
        for field, value in defaults.items():
            if value:
                setattr(portal, field, value)
    return portal


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
    it). So only a portal admin's install (per `profile`) may set them, the very first one too.
    """
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
    generation: int | None = None,
) -> Portal:
    """Store a verified install (the install frame, ONAPPINSTALL or ONAPPUPDATE).

    When `trusted` (see install_is_trusted) the installing user's pair becomes the background
    pair and a new application token replaces the old one; otherwise only that user's pair is
    stored. A second install of the same portal updates it (member_id is the key).
    """
    now = timezone.now()
    portal = _upsert_portal(verified=verified, scope=scope, generation=generation)
    lifecycle.after_verified_visit(portal, now, new_background=trusted and verified.info.user_id is not None)
    if portal.installed_at is None:
        portal.installed_at = now
    if application_token and trusted:
        portal.application_token = application_token
        portal.pending_application_token = ""
    elif application_token and portal.state == PortalState.PENDING:
        # Kept aside: it becomes the application token only if staff approve this portal.
        portal.pending_application_token = application_token
    if version:
        portal.app_version = version[:32]
    portal.save()
    user_id = verified.info.user_id
    if user_id is not None:
        pairs.store_issued(
            portal=portal,
            user_id=user_id,
            access_token=access_token,
            refresh_token=refresh_token,
            expires_in=expires_in,
            scope=scope or verified.info.scope,
            background=trusted,
        )
    return portal


# What a launch may change on the portal: `_upsert_portal`'s fields and `_revive`'s (and the launch time).
_LAUNCH_WRITES = [
    "domain",
    "protocol",
    "oauth_server",
    "app_status",
    "scope",
    "state",
    "state_reason",
    "reinstall_cause",
    "installed_at",
    "uninstalled_at",
]


class _AskProfileFirst(Exception):
    """The launch may move the background mark: `profile` must be asked, outside the transaction."""


def record_launch(
    *,
    verified: Verified,
    access_token: str,
    refresh_token: str,
    expires_in: int,
    scope: str = "",
    generation: int | None = None,
) -> tuple[Portal, TokenPair | None]:
    """Store the tokens of the user who opened the app. Never moves the background mark to them,
    unless the portal has no background pair at all and `profile` says they are an admin.

    app.info proves the launch's access token, not its refresh token: a working pair of that user
    keeps its refresh token (only the access token is taken), so a junk REFRESH_ID cannot replace
    a good one. A user without a working pair gets the launch's pair as it is.

    A repeat launch (a portal with a background pair, a user with a working pair) costs one locked
    read of the portal (which also tells both), one UPDATE of the portal and one of the pair."""
    fields: dict[str, Any] = {
        "verified": verified,
        "access_token": access_token,
        "refresh_token": refresh_token,
        "expires_in": expires_in,
        "scope": scope,
        "generation": generation,
    }
    try:
        return _record_launch(**fields, may_take_background=None)
    except _AskProfileFirst:
        # No row lock is held while the portal answers: the transaction was rolled back, and runs again.
        info = verified.info
        probe = Portal(member_id=info.member_id, domain=info.domain, protocol=verified.protocol)
        may_take_background = PortalClient(probe, access_token=access_token).is_admin()
    return _record_launch(**fields, may_take_background=may_take_background)


@transaction.atomic
def _record_launch(
    *,
    verified: Verified,
    access_token: str,
    refresh_token: str,
    expires_in: int,
    scope: str,
    may_take_background: bool | None,
    generation: int | None,
) -> tuple[Portal, TokenPair | None]:
    """`may_take_background` None: not asked yet; raises _AskProfileFirst if it must be."""
    now = timezone.now()
    user_id = verified.info.user_id
    known = pairs.launch_portal(verified.info.member_id, user_id)
    read = {name: getattr(known, name) for name in _LAUNCH_WRITES} if known is not None else {}
    portal = _upsert_portal(
        verified=verified,
        scope=scope,
        generation=generation,
        known=known,
        annotations=pairs.launch_annotations(user_id) if known is None else None,
        defer=pairs.NOT_IN_A_LAUNCH,
    )
    background = False
    if user_id is not None and not getattr(portal, "has_background", False):
        if may_take_background is None:
            raise _AskProfileFirst
        # Asked again under the lock: another admin's launch may have taken it meanwhile.
        background = (
            may_take_background
            and not TokenPair.objects.filter(
                portal=portal, is_background=True, state=PairState.ACTIVE
            ).exists()
        )
    lifecycle.after_verified_visit(portal, now, new_background=background)
    portal.last_launch_at = now
    # The APPLICATION_TOKEN newer portals send with a launch is never taken: nothing in a launch
    # proves it, and whoever sets it can forge ONAPPUNINSTALL. Installs and updates set it.
    # Only what changed, and the launch time: most launches change nothing else.
    statements.update(
        portal,
        [name for name in _LAUNCH_WRITES if name not in read or getattr(portal, name) != read[name]]
        + ["last_launch_at", "updated_at"],
    )
    if user_id is None:
        return portal, None
    my_pair_id = getattr(portal, "my_pair_id", None)
    if my_pair_id is not None and not background:
        working = pairs.take_access_token(
            pair_id=my_pair_id,
            portal=portal,
            user_id=user_id,
            is_background=bool(getattr(portal, "my_pair_is_background", False)),
            access_token=access_token,
            expires_at=now + timedelta(seconds=expires_in),
        )
        if working is not None:
            return portal, working
    pair = pairs.store_issued(
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
    """Forget every token of the portal (they are dead anyway); with `clean`, purge its data too.
    Only for an uninstall Bitrix24 confirmed (`operations.confirm_uninstall`), or staff did."""
    portal = Portal.objects.select_for_update().get(pk=portal.pk)
    TokenPair.objects.filter(portal=portal).delete()
    portal.application_token = ""
    portal.pending_application_token = ""
    # Launches and installs whose verification began before this cannot store anything now.
    portal.install_generation += 1
    lifecycle.uninstalled(portal, clean=clean)
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


class UninstallCheck(enum.StrEnum):
    CONFIRMED = "confirmed"  # Bitrix24 says the app is gone
    INSTALLED = "installed"  # Bitrix24 says it is still installed
    RETRY = "retry"  # Bitrix24 could not tell now (expired token, payment, 5xx, timeout)
    NO_PAIR = "no_pair"  # no live pair to ask with: only staff can confirm


# An expired access token is refreshed at most this often per portal to ask about an uninstall: the
# event that asks for it is signed only by the application token, which every employee knows.
UNINSTALL_REFRESH_EVERY = 300


def check_uninstalled(*, portal: Portal) -> UninstallCheck:
    """Ask Bitrix24, with the portal's own stored pair, whether the app is still installed.

    Confirmed when app.info says not installed, or the OAuth server refuses the pair (not installed,
    invalid token, invalid grant) while it was live; not by an expired token, PAYMENT_REQUIRED or an
    unreachable server.
    """
    pair = (
        TokenPair.objects.filter(portal=portal, state=PairState.ACTIVE)
        .order_by("-is_background", "pk")
        .first()
    )
    if pair is None:
        return UninstallCheck.NO_PAIR
    token = pair.access_token
    if pair.access_expires_at <= timezone.now() + timedelta(seconds=60):
        try:
            fresh = cache.add(f"b24:uninstall-refresh:{portal.pk}", 1, timeout=UNINSTALL_REFRESH_EVERY)
        except Exception:  # without the shared cache, the action's own backoff bounds the refreshes
            fresh = True
        if not fresh:
            return UninstallCheck.RETRY
        try:
            token = renewal.renew_pair(
                pair.pk, trigger=RenewalTrigger.ON_DEMAND, wait=False
            ).pair.access_token
        except renewal.RenewalFailed as exc:
            if not exc.transient and exc.code.lower() in ("invalid_grant", "portal_deleted"):
                return UninstallCheck.CONFIRMED
            return UninstallCheck.RETRY
    try:
        info = oauth.app_info(portal.oauth_server, token)
    except oauth.ExpiredToken:
        return UninstallCheck.RETRY
    except (oauth.InvalidToken, oauth.PortalDeleted):
        return UninstallCheck.CONFIRMED
    except oauth.OAuthError:
        return UninstallCheck.RETRY
    if info.member_id and not hmac.compare_digest(info.member_id, portal.member_id):
        return UninstallCheck.RETRY
    return UninstallCheck.INSTALLED if info.installed else UninstallCheck.CONFIRMED


def check_app_status(*, portal: Portal) -> bool | None:
    """ONAPPPAYMENT's check, made by a worker: ask app.info with the portal's stored background access
    token and store the status it reports. Never refreshes (an anonymous event asked for it): with an
    expired token it returns None and the status waits for the next renewal. True when checked."""
    pair = TokenPair.objects.filter(portal=portal, is_background=True, state=PairState.ACTIVE).first()
    if pair is None or pair.access_expires_at <= timezone.now() + timedelta(seconds=30):
        return None
    try:
        info = oauth.app_info(portal.oauth_server, pair.access_token)
    except oauth.OAuthUnavailable as exc:
        raise UpstreamUnavailable(f"cannot reach the OAuth server: {exc}") from exc
    except oauth.OAuthError:
        return None
    if not info.member_id or not hmac.compare_digest(info.member_id, portal.member_id):
        return None
    Portal.objects.filter(pk=portal.pk).update(app_status=info.status[:1], updated_at=timezone.now())
    return True
