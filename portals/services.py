"""What happens to a portal once what Bitrix24 sent is verified (portals.verification): install, launch,
update, payment and uninstall. Plain functions with keyword-only arguments; views call one of them."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.dispatch import Signal
from django.utils import timezone

from . import licence, lifecycle, pairs, renewal, spool, statements, verification
from .client import PortalClient
from .models import (
    AttemptState,
    PairState,
    Portal,
    PortalState,
    ReinstallCause,
    RenewalAttempt,
    RenewalLog,
    RenewalTrigger,
    TokenPair,
    WantedAction,
    WantedKind,
)
from .verification import Refusal, UpstreamUnavailable, VerificationError, Verified

logger = logging.getLogger(__name__)

# Sent after an uninstall with CLEAN=1, inside its transaction: receivers delete the app's own
# data for that portal (kwargs: portal).
portal_purged = Signal()


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


def needs_confirmation(*, portal: Portal) -> TokenPair | None:
    """The new background pair to renew once, when the portal waits for that to count as installed."""
    if portal.state != PortalState.NEEDS_REINSTALL or portal.reinstall_cause != ReinstallCause.CONFIRMING:
        return None
    return TokenPair.objects.filter(portal=portal, is_background=True, state=PairState.ACTIVE).first()


def background_to_prove(*, portal: Portal) -> TokenPair | None:
    """An install's new background pair, handed over and never renewed by us: renewed once at once, so that
    its refresh token is ours alone (only then can Bitrix24 refusing it prove an uninstall:
    `check_uninstalled`) and a junk REFRESH_ID is found out now, not at the first sweep."""
    return TokenPair.objects.filter(
        portal=portal, is_background=True, state=PairState.ACTIVE, refresh_ours=False
    ).first()


def install_is_trusted(*, verified: Verified, access_token: str) -> bool:
    """May this install replace the background pair and the application token?

    app.info proves the token is ours and the portal's, not that the request came from
    Bitrix24's install: any employee could post their own token to /install/ or as a forged
    ONAPPINSTALL, with an application token of their choosing (and then forge an uninstall with
    it). So only a portal admin's install (per `profile`) may set them, the very first one too.
    """
    probe = Portal(member_id=verified.info.member_id, domain=verified.info.domain, protocol=verified.protocol)
    return PortalClient(probe, access_token=access_token).is_admin()


def mirror_application_token(portal: Portal) -> None:
    """Once committed, the application-token mirror (portals.spool) follows the portal's token: events keep
    being admitted while the database is away."""
    member_id, token = portal.member_id, portal.application_token
    transaction.on_commit(lambda: spool.mirror_set(member_id, token))


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
    if lifecycle.verified_request_dismisses(portal):
        dismiss_uninstall_claim(portal=portal, why="a verified install or update of the portal")
    lifecycle.after_verified_visit(
        portal, now=now, new_background=trusted and verified.info.user_id is not None
    )
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
    if application_token and trusted:
        mirror_application_token(portal)
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
    "scope",
    "state",
    "state_reason",
    "reinstall_cause",
    "installed_at",
    "uninstalled_at",
    "uninstall_claimed_at",
    "purge_at",
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
    if lifecycle.verified_request_dismisses(portal):
        dismiss_uninstall_claim(portal=portal, why="a verified launch of the portal")
    lifecycle.after_verified_visit(portal, now=now, new_background=background)
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


@transaction.atomic
def uninstall_portal(*, portal: Portal, clean: bool) -> Portal:
    """Forget every token of the portal at once (they are dead anyway); with `clean`, its data is purged
    BITRIX24_PURGE_DELAY_DAYS later (`purge_due_portals`), unless a reinstall or a verified request comes
    first. Only for an uninstall Bitrix24 proved (`check_uninstalled`), or staff confirmed."""
    portal = Portal.objects.select_for_update().get(pk=portal.pk)
    TokenPair.objects.filter(portal=portal).delete()
    portal.application_token = ""
    portal.pending_application_token = ""
    # Launches and installs whose verification began before this cannot store anything now.
    portal.install_generation += 1
    lifecycle.uninstalled(portal, clean=clean)
    portal.uninstall_claimed_at = None
    portal.purge_at = timezone.now() + timedelta(days=settings.BITRIX24_PURGE_DELAY_DAYS) if clean else None
    portal.save()
    mirror_application_token(portal)
    return portal


def purge_portal_data(*, portal: Portal) -> None:
    """Delete what the backend keeps about an uninstalled portal beyond the row itself."""
    if portal.state != PortalState.UNINSTALLED:
        raise ValueError("only an uninstalled portal's data can be purged")
    TokenPair.objects.filter(portal=portal).delete()
    RenewalLog.objects.filter(portal=portal).delete()
    portal_purged.send(sender=Portal, portal=portal)
    Portal.objects.filter(pk=portal.pk).update(purge_at=None)


def purge_due_portals(*, now: Any = None, limit: int = 100) -> int:
    """The sweep: purge the data of portals uninstalled with CLEAN=1 whose delay has run out and that are
    still uninstalled. Returns how many were purged."""
    now = now or timezone.now()
    done = 0
    for portal_id in Portal.objects.filter(purge_at__lte=now).values_list("pk", flat=True)[:limit]:
        with transaction.atomic():
            portal = Portal.objects.select_for_update().get(pk=portal_id)
            if portal.purge_at is None or portal.purge_at > now:
                continue  # a reinstall or a verified request cancelled it meanwhile
            if portal.state != PortalState.UNINSTALLED:
                Portal.objects.filter(pk=portal.pk).update(purge_at=None)
                continue
            purge_portal_data(portal=portal)
            done += 1
        logger.info("Purged the data of portal %s (uninstalled with CLEAN=1)", portal.member_id)
    return done


class UninstallCheck(enum.StrEnum):
    CONFIRMED = "confirmed"  # Bitrix24 proved the app is gone
    INSTALLED = "installed"  # Bitrix24 says it is still installed
    RETRY = "retry"  # Bitrix24 could not tell now (5xx, timeout): ask again later
    HELD = "held"  # no proof either way: held for staff, nothing deleted


@dataclass(frozen=True)
class UninstallVerdict:
    check: UninstallCheck
    evidence: str  # what Bitrix24 answered, for staff (the admin's held claims)


# What the OAuth server says of a token of an app that is no longer installed.
_GONE = ("invalid_token", "not_installed")


def check_uninstalled(*, portal: Portal, claim: WantedAction) -> UninstallVerdict:
    """Ask Bitrix24, with the portal's background pair, whether the app is gone (an ONAPPUNINSTALL claim).

    The event carries only the application token, which every employee who opens the app can read, so
    only proof deletes (docs/contract.md, verification rules): app.info saying not installed, or Bitrix24
    refusing a token nothing else could have killed, that is one of our own renewal (`refresh_ours`,
    `access_ours`) with no renewal of the pair left unresolved. A refused token that was handed over (by a
    frame, which may refresh it away; by an install or a launch, whose REFRESH_ID nothing proved) or one
    an interrupted renewal may have killed proves nothing: the claim is held for staff. No other pair is
    asked: a user's pair is whatever that user posted. A claim refreshes the pair once at most."""
    pair = TokenPair.objects.filter(portal=portal, is_background=True, state=PairState.ACTIVE).first()
    if pair is None:
        return UninstallVerdict(
            UninstallCheck.HELD,
            "no working background pair to ask Bitrix24 with (the installing admin's pair is dead or gone)",
        )
    unresolved = RenewalAttempt.objects.filter(pair=pair, state=AttemptState.IN_FLIGHT).exists()
    seen = ""
    if pair.access_expires_at > timezone.now() + timedelta(seconds=60):
        verdict = _ask_app_info(portal, pair.access_token, ours=pair.access_ours and not unresolved)
        if verdict.check != UninstallCheck.HELD:
            return verdict
        seen = verdict.evidence + "; "
    else:
        seen = "the background access token had expired; "
    if claim.refreshed:
        return UninstallVerdict(UninstallCheck.HELD, seen + "the claim's one refresh was spent")
    proven = pair.refresh_ours and not unresolved
    try:
        renewed = renewal.renew_pair(pair.pk, trigger=RenewalTrigger.ON_DEMAND, force=True, wait=False)
    except renewal.RenewalFailed as exc:
        if exc.transient:
            return UninstallVerdict(UninstallCheck.RETRY, f"{seen}the refresh failed for now: {exc.code}")
        WantedAction.objects.filter(pk=claim.pk).update(refreshed=True)
        if proven and not exc.lost:
            return UninstallVerdict(
                UninstallCheck.CONFIRMED, f"{seen}the OAuth server refused our own refresh token ({exc.code})"
            )
        whose = "lost in an interrupted renewal" if exc.lost else "handed over, never renewed by us"
        return UninstallVerdict(
            UninstallCheck.HELD, f"{seen}the OAuth server refused a refresh token {whose} ({exc.code})"
        )
    WantedAction.objects.filter(pk=claim.pk).update(refreshed=True)
    if not renewed.renewed:
        return UninstallVerdict(UninstallCheck.RETRY, seen + "a newer pair was stored meanwhile")
    return _ask_app_info(portal, renewed.pair.access_token, ours=True, seen=seen)


def _ask_app_info(portal: Portal, token: str, *, ours: bool, seen: str = "") -> UninstallVerdict:
    try:
        info = verification.oauth_app_info(
            server=portal.oauth_server, access_token=token, member_id=portal.member_id, handed=False
        )
    except UpstreamUnavailable as exc:
        return UninstallVerdict(UninstallCheck.RETRY, f"{seen}app.info could not be asked: {exc}")
    except VerificationError as exc:
        gone = exc.code in _GONE or exc.cause.upper() == "PORTAL_DELETED"
        if gone and ours:
            return UninstallVerdict(
                UninstallCheck.CONFIRMED,
                f"{seen}app.info refused our own access token ({exc.cause or exc.code})",
            )
        if gone or exc.cause == "expired_token":
            return UninstallVerdict(
                UninstallCheck.HELD,
                f"{seen}app.info refused an access token a frame or an install handed over ({exc.cause or exc.code})",
            )
        return UninstallVerdict(UninstallCheck.RETRY, f"{seen}app.info answered {exc.cause or exc.code}")
    if info.installed:
        return UninstallVerdict(UninstallCheck.INSTALLED, seen + "app.info says the app is installed")
    return UninstallVerdict(UninstallCheck.CONFIRMED, seen + "app.info says the app is not installed")


def dismiss_uninstall_claim(*, portal: Portal, why: str) -> int:
    """Close the portal's open or held uninstall claim (a verified request, a reinstall, staff)."""
    return WantedAction.objects.filter(
        portal=portal, kind=WantedKind.CONFIRM_UNINSTALL, done_at__isnull=True
    ).update(done_at=timezone.now(), note=f"dismissed: {why}"[:500], next_attempt_at=None)


def check_app_status(*, portal: Portal) -> bool | None:
    """ONAPPPAYMENT's check, made by a worker: read the licence (portals.licence) with the portal's stored
    background access token. Never refreshes (an anonymous event asked for it): with an expired token it
    returns None and the licence waits for the next token at hand. True when read."""
    pair = TokenPair.objects.filter(portal=portal, is_background=True, state=PairState.ACTIVE).first()
    if pair is None or pair.access_expires_at <= timezone.now() + timedelta(seconds=30):
        return None
    return licence.read(portal, access_token=pair.access_token) is not None
