"""Verification: whether what arrives claiming to be Bitrix24 is, and what the OAuth server's app.info says
about a token.

`oauth_app_info` is the one function that asks an OAuth server's app.info, and checks its answer once: our
client_id, the portal's member_id and, when one is claimed, its domain. Tokens handed to us (install
frames, launches, install and update events, the app page's API calls) go through `verify_access_token` /
`identify_token`, which add the verdict cache and the budget of refusals; the backend's own tokens (an
uninstall check, staff's check, a renamed portal) ask it directly. What the portal's own app.info says
(the licence) is portals.licence's.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.utils import timezone

from . import http, metrics, oauth, pairs, sources
from .models import Portal

logger = logging.getLogger(__name__)


class Refusal(enum.StrEnum):
    """Why a request was refused, in the domain's words; the views and the API choose the HTTP status."""

    NOT_ACCEPTED = "not_accepted"  # the credentials prove nothing (forged, expired, another app's)
    NOT_HERE = "not_here"  # genuine credentials, but for another portal or domain, or the app is gone
    STALE = "stale"  # true when it was verified, overtaken since (an uninstall confirmed meanwhile)


class VerificationError(Exception):
    """What Bitrix24 supposedly sent could not be confirmed; `refusal` says how, `code` exactly."""

    def __init__(
        self,
        message: str,
        *,
        refusal: Refusal = Refusal.NOT_ACCEPTED,
        code: str = "verification_failed",
        cause: str = "",
    ) -> None:
        super().__init__(message)
        self.refusal = refusal
        self.code = code
        # The OAuth server's own error code behind the refusal, when there was one (e.g. expired_token).
        self.cause = cause
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
    """Requests from this source (or from everywhere) failed verification too often lately: answer 429, ask
    nobody."""

    retry_after = 60


# --- one verification path ---------------------------------------------------------------------------
# Every token we are handed (install frame, launch, install/update events, the app page's API calls) is
# checked by `oauth_app_info`: one app.info call with a short timeout, its verdict kept in the shared cache
# under a hash of the token, the claimed portal and that portal's install generation (so an uninstall or
# a reinstall invalidates it), for the token's remaining life and at most a minute. Only definitive
# refusals are kept; "try again" never is. Refusals also count against the budgets of their source and of
# all sources (never of the claimed portal: junk naming a portal must not lock its genuine users out).

# A verdict is kept a minute at most: a token Bitrix24 revoked (a user who left, an app uninstalled)
# stops working within it. The cost: one app.info call a minute for each token in use.
VERDICT_TTL = 60
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
        cache.set(key, {**value, "_until": time.time() + ttl}, timeout=ttl)
    except Exception as exc:
        logger.warning("Shared cache unavailable (%s): verdict not kept", type(exc).__name__)


# Half of BITRIX24_UNVERIFIED_TOTAL is left to sources verified successfully in the last day.
KNOWN_SHARE = 0.5
KNOWN_FOR = 86400


# Where the budgets' counts live in the shared cache (tests give each test its own).
BUDGET_KEYS = "b24"


def _window_key(name: str) -> str:
    return f"{BUDGET_KEYS}:unverified:{name}:{int(time.time() // BUDGET_WINDOW)}"


def _count(key: str) -> int:
    try:
        return int(cache.get(key) or 0)
    except Exception:
        # Without the shared cache each process keeps its own count: the bound holds per process.
        _window, count = _local_budget.get(key, (0.0, 0))
        return count


def _known(source: str) -> bool:
    try:
        return bool(cache.get(f"{BUDGET_KEYS}:known-source:{source}"))
    except Exception:
        return False


def _over_budget(source: str) -> bool:
    """Refused verifications lately: from this source past its budget, or from all sources past the total
    (strangers get only the unreserved part of it). Requests made outside a web request are not counted."""
    if not source:
        return False
    if _count(_window_key(f"source:{source}")) >= settings.BITRIX24_UNVERIFIED_BUDGET:
        return True
    total = _count(_window_key("total"))
    limit = settings.BITRIX24_UNVERIFIED_TOTAL
    return total >= limit or (total >= limit * (1 - KNOWN_SHARE) and not _known(source))


def _spend_budget(source: str) -> None:
    if not source:
        return
    for key in (_window_key(f"source:{source}"), _window_key("total")):
        try:
            if not cache.add(key, 1, timeout=BUDGET_WINDOW * 2):
                cache.incr(key)
        except Exception:
            window, count = _local_budget.get(key, (time.time(), 0))
            _local_budget[key] = (window, count + 1)
    current = int(time.time() // BUDGET_WINDOW)
    for stale in [k for k in _local_budget if not k.endswith(f":{current}")]:
        del _local_budget[stale]


def _verified_from(source: str) -> None:
    """A token from this source was verified: its later requests get the reserved share of the total."""
    if source:
        try:
            cache.set(f"{BUDGET_KEYS}:known-source:{source}", 1, timeout=KNOWN_FOR)
        except Exception:
            return


def install_generation(member_id: str) -> int:
    """The claimed portal's install generation (0 for a portal never seen)."""
    return pairs.install_generation(member_id)


def _ask(server: str, access_token: str) -> oauth.AppInfo:
    """The one request to an OAuth server's app.info, its failures in the domain's words."""
    try:
        return oauth.app_info(server, access_token)
    except oauth.NotInstalled as exc:
        raise VerificationError(
            "the app is not installed on this portal",
            refusal=Refusal.NOT_HERE,
            code="not_installed",
            cause=exc.code,
        ) from exc
    except oauth.InvalidToken as exc:  # expired_token too (`cause` says which)
        raise VerificationError(
            f"Bitrix24 did not accept the access token ({exc.code})", code="invalid_token", cause=exc.code
        ) from exc
    except oauth.OAuthUnavailable as exc:
        raise UpstreamUnavailable(f"cannot reach the OAuth server: {exc}") from exc
    except oauth.OAuthError as exc:
        raise VerificationError(
            f"Bitrix24 refused to confirm the access token ({exc.code})",
            code="verification_failed",
            cause=exc.code,
        ) from exc


# Refusals that hold for the token's life: kept in the verdict cache.
_DEFINITIVE = frozenset({"invalid_token", "not_installed"})


def _ask_about_a_handed_token(
    server: str, access_token: str, member_id: str, generation: int | None
) -> oauth.AppInfo:
    """`_ask` behind the verdict cache and the refusal budget (see above)."""
    if generation is None:
        generation = install_generation(member_id)
    key = _verdict_key(server, access_token, member_id, generation)
    cached = _cache_get(key)
    # The verdict's own end, besides the cache's expiry: a cache that keeps it longer (a Redis whose clock
    # is ahead, an expiry rounded up) must not stretch it.
    if isinstance(cached, dict) and float(cached.pop("_until", 0)) >= time.time():
        if "refused" in cached:
            raise VerificationError(
                cached["refused"], refusal=Refusal(cached["refusal"]), code=cached["code"]
            )
        return oauth.AppInfo(**cached)
    source = sources.current()
    if _over_budget(source):
        raise TooManyUnverified("too many requests from this address failed verification; try later")
    try:
        info = _ask(server, access_token)
    except VerificationError as refusal:
        _spend_budget(source)
        if refusal.code in _DEFINITIVE:
            entry = {"refused": str(refusal), "refusal": str(refusal.refusal), "code": refusal.code}
            _cache_set(key, entry, VERDICT_TTL)
        raise
    _verified_from(source)
    ttl = VERDICT_TTL
    if info.expires_at is not None:
        ttl = min(ttl, int((info.expires_at - timezone.now()).total_seconds()))
    _cache_set(key, dataclasses.asdict(info), ttl)
    return info


def oauth_app_info(
    *,
    server: str,
    access_token: str,
    member_id: str,
    domain: str | None = None,
    handed: bool = True,
    generation: int | None = None,
) -> oauth.AppInfo:
    """What the OAuth server's app.info says about `access_token`, checked once: the token is our
    application's (client_id), of the portal `member_id`, and on `domain` when one is claimed. Whether the
    app is installed is the caller's to judge (`info.installed`).

    `handed`: a token somebody handed us (see the module's docstring): its verdict is cached and its
    refusals count against the portal's budget. The backend's own tokens pass False.

    Raises VerificationError (`invalid_token` — `cause` says `expired_token` when it only expired —,
    `not_installed`, `verification_failed`, `wrong_client`, `wrong_portal`, `wrong_domain`),
    TooManyUnverified, UpstreamUnavailable, ImproperlyConfigured without the app's credentials."""
    client_id, _ = oauth.credentials()
    if handed:
        info = _ask_about_a_handed_token(server, access_token, member_id, generation)
    else:
        info = _ask(server, access_token)
    if not hmac.compare_digest(info.client_id.encode(), client_id.encode()):
        raise VerificationError("the access token belongs to another application", code="wrong_client")
    if not info.member_id or not hmac.compare_digest(info.member_id.encode(), member_id.encode()):
        raise VerificationError(
            "the access token belongs to another portal", refusal=Refusal.NOT_HERE, code="wrong_portal"
        )
    if domain is not None and info.domain != domain:
        raise VerificationError(
            f"the portal of this token is {info.domain!r}, not {domain!r}",
            refusal=Refusal.NOT_HERE,
            code="wrong_domain",
        )
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
    server = oauth.server_for(server_endpoint)
    info = oauth_app_info(
        server=server, access_token=access_token, member_id=member_id, domain=domain, generation=generation
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
    try:
        info = oauth_app_info(
            server=portal.oauth_server, access_token=access_token, member_id=portal.member_id
        )
    except VerificationError as exc:
        if exc.code in ("verification_failed", "wrong_client", "wrong_portal"):
            raise
        # Forged, expired or not installed: one answer, so an anonymous caller learns nothing more.
        raise VerificationError("Bitrix24 did not accept the token.", code="invalid_token") from exc
    if not info.member_id or info.user_id is None or not info.installed:
        raise VerificationError("The token is not an installed app's user token.", code="invalid_token")
    return info


def check_application_token(*, member_id: str, application_token: str) -> Portal:
    """The portal whose stored application token equals the one given (compared in constant time)."""
    portal = Portal.objects.filter(member_id=member_id).first()
    stored = portal.application_token if portal is not None else ""
    # Compare even when the portal is unknown, so timing does not tell which member_ids exist.
    matches = hmac.compare_digest((stored or "\0").encode(), (application_token or "").encode())
    if portal is None or not stored or not matches:
        raise VerificationError("application token does not match this portal", code="bad_application_token")
    return portal
