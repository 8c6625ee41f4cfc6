"""Every change of a portal's state, each a named transition that checks the state it starts from.

Nothing else writes `Portal.state`: the model refuses a change made outside these functions
(`models.StateOutsideLifecycle`), on an instance and in a queryset update alike. A reader finds here who
can move a portal, from where to where, and why:

    first seen through a user    (new) · pending · uninstalled  →  pending
    installed by an admin        any state but installed        →  installed   (an admin's install, update or
                                                                                 launch with a new background pair;
                                                                                 not a portal whose tokens failed)
    background awaits its proof  needs reinstall (tokens)       →  needs reinstall (confirming)
    background proven            needs reinstall (tokens, confirming) → installed   (the pair renewed once)
    background refused           installed · confirming         →  needs reinstall (tokens)
    background lost              any but uninstalled, not staff's mark → needs reinstall (tokens)
    approved by staff            pending                        →  installed
    marked by staff              any but uninstalled            →  needs reinstall (staff)
    uninstalled                  any                            →  uninstalled

Functions that take a `Portal` change the instance the caller holds locked and saves in its transaction;
those that take a pair's portal id write a conditional update under the pair's lock (renewal holds it),
the condition being the state they start from.
"""

from __future__ import annotations

from datetime import datetime

from django.db.models import Q
from django.utils import timezone

from .models import Portal, PortalState, ReinstallCause, state_door

# Shown while a new background pair waits for its first renewal to prove the portal's tokens work.
CONFIRMING = "new background pair: confirming it with a renewal"
SEEN_THROUGH_A_USER = "first seen through a user who is not a portal admin"


class WrongState(Exception):
    """A transition was asked of a portal in a state it does not start from."""


# --- a verified install, update or launch -------------------------------------------------------------


def after_verified_visit(portal: Portal, *, now: datetime, new_background: bool) -> None:
    """The portal's state after a verified install, update or launch (`new_background`: an admin's, which
    brought a new background pair). Chooses the transition; the caller saves the portal.

    A portal first seen (or seen again after an uninstall) only through a user who is not a portal admin
    is pending: an employee can post their own token as an install. A portal that needs a reinstall
    because its background tokens were refused or lost stays so until a new background pair has renewed
    once: an ordinary user's launch proves nothing about the background pair, and a new pair is trusted
    only once the OAuth server has taken its refresh token. An admin's reinstall or launch with a new
    background pair does clear a mark staff set by hand (the customer did what staff asked)."""
    if portal.state == PortalState.INSTALLED:
        return
    if portal.state in (PortalState.PENDING, PortalState.UNINSTALLED) and not new_background:
        first_seen_through_a_user(portal)
        return
    if portal.state == PortalState.NEEDS_REINSTALL:
        if not new_background:
            return
        if portal.reinstall_cause in (ReinstallCause.TOKENS, ReinstallCause.CONFIRMING):
            background_awaits_proof(portal)
            return
    installed_by_admin(portal, now=now)


def verified_request_dismisses(portal: Portal) -> bool:
    """A verified install, update or launch proves the app is on the portal: an uninstall claim still open
    or held is dismissed, and a purge scheduled by an uninstall with CLEAN=1 is cancelled (the caller saves
    the portal). True when a claim was open: the caller closes it (services.dismiss_uninstall_claim)."""
    claimed = portal.uninstall_claimed_at is not None
    portal.uninstall_claimed_at = None
    portal.purge_at = None
    return claimed


def first_seen_through_a_user(portal: Portal) -> None:
    _starts_from(portal, PortalState.PENDING, PortalState.UNINSTALLED)
    with state_door():
        portal.state = PortalState.PENDING
    portal.state_reason = SEEN_THROUGH_A_USER


def background_awaits_proof(portal: Portal) -> None:
    _starts_from(portal, PortalState.NEEDS_REINSTALL)
    if portal.reinstall_cause not in (ReinstallCause.TOKENS, ReinstallCause.CONFIRMING):
        raise WrongState(
            f"{portal.domain}: staff's mark is cleared by staff or a reinstall, not by a new pair"
        )
    portal.state_reason = CONFIRMING
    portal.reinstall_cause = ReinstallCause.CONFIRMING


def installed_by_admin(portal: Portal, *, now: datetime) -> None:
    if portal.state == PortalState.INSTALLED:
        raise WrongState(f"{portal.domain} is installed already")
    if portal.state == PortalState.UNINSTALLED or portal.installed_at is None:
        portal.installed_at = now
    with state_door():
        portal.state = PortalState.INSTALLED
    portal.state_reason = ""
    portal.reinstall_cause = ""
    portal.uninstalled_at = None


# --- the background pair, as renewal finds it (under the pair's row lock) -------------------------------

_TOKENS_DECIDE = (ReinstallCause.TOKENS, ReinstallCause.CONFIRMING)


def background_proven(portal_id: int) -> int:
    """The background pair renewed: it proves the portal's tokens work again. A mark staff set is theirs."""
    with state_door():
        return Portal.objects.filter(
            pk=portal_id, state=PortalState.NEEDS_REINSTALL, reinstall_cause__in=_TOKENS_DECIDE
        ).update(state=PortalState.INSTALLED, state_reason="", reinstall_cause="")


def background_refused(portal_id: int, *, code: str) -> int:
    """The OAuth server refused the background pair for good (also a new pair that was being confirmed)."""
    with state_door():
        return (
            Portal.objects.filter(pk=portal_id)
            .filter(Q(state=PortalState.INSTALLED) | Q(reinstall_cause=ReinstallCause.CONFIRMING))
            .update(
                state=PortalState.NEEDS_REINSTALL,
                state_reason=f"renewal refused: {code}"[:255],
                reinstall_cause=ReinstallCause.TOKENS,
            )
        )


def background_lost(portal_id: int, *, reason: str) -> int:
    """The background pair was lost in an interrupted renewal. A mark staff set stays theirs (its reason
    too); the pair's own state says it was lost."""
    with state_door():
        return (
            Portal.objects.filter(pk=portal_id)
            .exclude(state=PortalState.UNINSTALLED)
            .exclude(reinstall_cause=ReinstallCause.STAFF)
            .update(
                state=PortalState.NEEDS_REINSTALL,
                state_reason=reason[:255],
                reinstall_cause=ReinstallCause.TOKENS,
            )
        )


# --- staff ----------------------------------------------------------------------------------------------


def approved_by_staff(portal: Portal) -> None:
    """Staff vouch for a portal first seen through a user who is not a portal admin."""
    _starts_from(portal, PortalState.PENDING)
    with state_door():
        portal.state = PortalState.INSTALLED
    portal.state_reason = ""
    portal.installed_at = portal.installed_at or timezone.now()


def marked_by_staff(portal: Portal, *, reason: str) -> None:
    """Staff know something the tokens don't: the customer must reinstall. Only staff or a reinstall clear it."""
    if portal.state == PortalState.UNINSTALLED:
        raise WrongState(f"{portal.domain} is uninstalled: a reinstall is the customer's choice")
    with state_door():
        portal.state = PortalState.NEEDS_REINSTALL
    portal.state_reason = reason[:255]
    portal.reinstall_cause = ReinstallCause.STAFF


# --- uninstall ------------------------------------------------------------------------------------------


def uninstalled(portal: Portal, *, clean: bool) -> None:
    """A confirmed uninstall (or staff's): the caller has deleted the tokens in the same transaction."""
    with state_door():
        portal.state = PortalState.UNINSTALLED
    portal.state_reason = "uninstalled with CLEAN=1" if clean else "uninstalled"
    portal.reinstall_cause = ""
    portal.uninstalled_at = timezone.now()


def _starts_from(portal: Portal, *states: str) -> None:
    if portal.state not in states:
        raise WrongState(f"{portal.domain} is {portal.state}, not {' or '.join(states)}")
