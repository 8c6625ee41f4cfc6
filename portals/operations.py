"""What staff can do to an installation: plain functions with keyword-only arguments.

The admin's actions and buttons call these and nothing else, so each operation behaves the same
from the admin, a shell or a future API, and is tested on its own.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from django.db import transaction
from django.utils import timezone

from . import errors, licence, lifecycle, oauth, pairs, renewal, services, tasks, verification
from .client import PortalClient
from .models import (
    PairState,
    Portal,
    PortalState,
    StaffCall,
    TokenPair,
    WantedAction,
    WantedKind,
)

logger = logging.getLogger(__name__)


class OperationRefused(Exception):
    """The operation cannot be carried out on this portal as it stands; the message says why."""


def queue_renewal(*, portal: Portal) -> int:
    """Queue a forced renewal of each of the portal's usable pairs, recorded first, sent after commit.

    Forced: a pair is renewed even if not due, and a pair whose credentials were rejected is tried
    again (after a fixed BITRIX24_CLIENT_SECRET that brings it back). A dead or lost pair cannot be
    renewed at all: when no pair is usable, OperationRefused says why (the portal needs a reinstall)
    instead of pretending to queue. Returns how many renewals were queued.
    """
    pairs = list(TokenPair.objects.filter(portal=portal).select_related("portal").order_by("pk"))
    usable = [p for p in pairs if p.state in (PairState.ACTIVE, PairState.CREDENTIALS_REJECTED)]
    if not usable:
        if not pairs:
            raise OperationRefused(f"{portal.domain} has no token pairs: there is nothing to renew")
        reasons = "; ".join(sorted({f"{p.get_state_display()}: {p.last_error}".rstrip(": ") for p in pairs}))
        raise OperationRefused(
            f"{portal.domain}: no pair can be renewed ({reasons}); the customer must reinstall the app"
        )
    for pair in usable:
        tasks.queue_staff_renewal(pair=pair)
    logger.info("Staff queued renewal of %d pair(s) of portal %s", len(usable), portal.member_id)
    return len(usable)


def verify_portal(*, portal: Portal) -> oauth.AppInfo:
    """Ask app.info, with the portal's own background token, what Bitrix24 says about the install.

    Stores the app status it reports. The token is renewed first if it is about to expire (that
    is what `renewal.access_token_for` does). Raises OperationRefused when the portal has no
    usable pair or the OAuth server refuses the token, verification.UpstreamUnavailable when the
    server cannot be reached.
    """
    if portal.state == PortalState.UNINSTALLED:
        raise OperationRefused(f"{portal.domain} is uninstalled: there is no token to verify with")
    try:
        token = renewal.access_token_for(portal)
    except errors.NoUsablePair as exc:
        raise OperationRefused(
            f"{portal.domain} has no usable background token pair: it needs a reinstall"
        ) from exc
    except errors.RenewalPending as exc:
        raise verification.UpstreamUnavailable(f"{portal.domain}: {exc}") from exc
    except errors.RenewalFailed as exc:
        raise OperationRefused(
            f"{portal.domain}: its access token had expired and renewing it failed ({exc.code})"
        ) from exc
    try:
        info = verification.oauth_app_info(
            server=portal.oauth_server, access_token=token, member_id=portal.member_id, handed=False
        )
    except verification.VerificationError as exc:
        raise OperationRefused(f"{portal.domain}: app.info refused the portal's token ({exc.code})") from exc
    # The token at hand reads the licence too (the portal's own app.info).
    licence.read(portal, access_token=token)
    return info


def confirm_uninstall(*, portal: Portal, clean: bool) -> Portal:
    """Staff confirm an uninstall Bitrix24 could not confirm (no live pair to ask with)."""
    if portal.state == PortalState.UNINSTALLED:
        raise OperationRefused(f"{portal.domain} is already uninstalled")
    logger.info("Staff confirmed the uninstall of portal %s", portal.member_id)
    done = services.uninstall_portal(portal=portal, clean=clean)
    WantedAction.objects.filter(portal=portal, kind=WantedKind.CONFIRM_UNINSTALL, done_at=None).update(
        done_at=timezone.now(), note="confirmed by staff"
    )
    return done


def dismiss_uninstall(*, portal: Portal) -> None:
    """Staff dismiss an uninstall claim (they know the app is still wanted there): nothing is deleted."""
    with transaction.atomic():
        locked = Portal.objects.select_for_update().get(pk=portal.pk)
        if not services.dismiss_uninstall_claim(portal=locked, why="by staff"):
            raise OperationRefused(f"{locked.domain}: no uninstall claim is open")
        Portal.objects.filter(pk=locked.pk).update(uninstall_claimed_at=None)
    logger.info("Staff dismissed the uninstall claim of portal %s", portal.member_id)


def acknowledge_lost(*, portal: Portal) -> int:
    """Staff acknowledge the portal's lost pairs (they know it needs a reinstall): `renew_tokens
    --all-unacknowledged` stops naming them. A timestamp, not a state: the pairs stay lost. Returns how many."""
    done = TokenPair.objects.filter(
        portal=portal, state=PairState.LOST, lost_acknowledged_at__isnull=True
    ).update(lost_acknowledged_at=timezone.now())
    if not done:
        raise OperationRefused(f"{portal.domain} has no lost pair to acknowledge")
    logger.info("Staff acknowledged %d lost pair(s) of portal %s", done, portal.member_id)
    return done


def approve_pending(*, portal: Portal) -> Portal:
    """Staff vouch for a portal first seen through a user who is not a portal admin: that user's pair
    becomes the background pair and the install's application token is taken."""
    with transaction.atomic():
        locked = Portal.objects.select_for_update().get(pk=portal.pk)
        if locked.state != PortalState.PENDING:
            raise OperationRefused(f"{locked.domain} is not pending approval")
        pair = TokenPair.objects.filter(portal=locked, state=PairState.ACTIVE).order_by("pk").first()
        if pair is None:
            raise OperationRefused(f"{locked.domain} has no working token pair to run with")
        pairs.make_background(locked, pair=pair)
        if locked.pending_application_token:
            locked.application_token = locked.pending_application_token
            locked.pending_application_token = ""
        lifecycle.approved_by_staff(locked)
        locked.save()
        services.mirror_application_token(locked)
    logger.info("Staff approved pending portal %s", locked.member_id)
    return locked


def mark_needs_reinstall(*, portal: Portal, reason: str) -> Portal:
    """Record that the customer must reinstall the app (staff know something the tokens don't).

    The pairs are kept: a reinstall or a fresh launch by an admin brings the portal back to
    "installed", as it does after a refused renewal.
    """
    reason = reason.strip()
    if not reason:
        raise OperationRefused("a reason is required")
    with transaction.atomic():
        locked = Portal.objects.select_for_update().get(pk=portal.pk)
        try:
            # Staff's mark: a working token pair does not clear it; a reinstall or staff do.
            lifecycle.marked_by_staff(locked, reason=reason)
        except lifecycle.WrongState as exc:
            raise OperationRefused(str(exc)) from exc
        locked.save(update_fields=["state", "state_reason", "reinstall_cause", "updated_at"])
    logger.info("Portal %s marked as needing a reinstall: %s", locked.member_id, reason)
    return locked


def purge_portal(*, portal: Portal) -> None:
    """Delete what the backend keeps about an uninstalled portal (tokens, renewal log, inbound
    requests and, through `services.portal_purged`, the app's own data); the portal row stays."""
    with transaction.atomic():
        # Re-read under the lock: a reinstall that raced the click must not lose its fresh tokens.
        locked = Portal.objects.select_for_update().get(pk=portal.pk)
        try:
            services.purge_portal_data(portal=locked)
        except ValueError as exc:
            raise OperationRefused(f"{locked.domain}: {exc}") from exc
    logger.info("Purged the data of uninstalled portal %s", portal.member_id)


# --- Bitrix24 calls staff make with a portal's background pair (the staff API) ----------------------------

# What a staff user with "call" but not "call any method" may call: reads. A write, or event.bind to an
# outside URL (which would then receive the portal's events and the tokens they carry), needs more.
READ_METHODS = frozenset({"profile", "app.info"})
READ_SUFFIXES = (".get", ".list", ".fields")
_METHOD = re.compile(r"^[a-z0-9_.]{1,100}\Z", re.IGNORECASE)


class CallNotAllowed(OperationRefused):
    """The method (or a command of the batch) writes, and the user may call read methods only."""


def is_read_method(method: str) -> bool:
    name = method.strip().lower()
    return bool(_METHOD.match(name)) and (name in READ_METHODS or name.endswith(READ_SUFFIXES))


def batch_commands(params: Any) -> list[str] | None:
    """The methods a `batch` call runs (`cmd`: a mapping or a list of "method?query"); None when `cmd` is
    not something Bitrix24 would run as commands."""
    cmd = params.get("cmd") if isinstance(params, Mapping) else None
    values = list(cmd.values()) if isinstance(cmd, Mapping) else cmd if isinstance(cmd, list) else None
    if values is None or not all(isinstance(value, str) for value in values):
        return None
    return [value.split("?", 1)[0].strip() for value in values]


def call_for_staff(
    *, portal: Portal, user: Any, method: str, params: Mapping[str, Any], may_call_any: bool
) -> Any:
    """Call `method` with the portal's background pair for a staff user; audited (StaffCall) whether let
    through or not. Without `may_call_any`, only read methods pass (inside a batch too): CallNotAllowed."""
    commands = batch_commands(params) if method.strip().lower() == "batch" else []
    # A batch whose commands cannot be read is not let through on trust.
    reads = commands is not None and all(is_read_method(name) for name in (commands or [method]))
    allowed = may_call_any or reads
    StaffCall.objects.create(
        user=user if getattr(user, "pk", None) else None,
        username=str(getattr(user, "username", "") or user)[:150],
        portal=portal,
        method=method[:100],
        commands=",".join(commands or [])[:500],
        allowed=allowed,
    )
    # The parameters may hold customer data: the log says who called what, not with what.
    logger.info(
        "Staff %s %s %s on portal %s", user, "calls" if allowed else "was refused", method, portal.member_id
    )
    if not allowed:
        raise CallNotAllowed(
            f"{method} is not a read method (*.get, *.list, *.fields, profile, app.info"
            + (", in every command of the batch" if commands is not None and commands else "")
            + "): it needs the permission to call any method"
        )
    return PortalClient(portal).call(method, dict(params), fail_fast=True)
