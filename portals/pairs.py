"""Every write of token material (access and refresh tokens, their times and scope) and of the background
mark: a pair issued by an install or a launch, the access token a repeat launch brings, a renewal's grant,
and the choice of the background pair. The hot paths' statements are written out (portals.statements);
`tests/test_statements.py` checks they store what the ORM would.

Refusals and losses of a pair (its state after a failed renewal) stay with renewal, which decides them.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.db import DatabaseError, connection
from django.utils import timezone

from . import statements
from .models import PairState, Portal, TokenPair

# What a renewal's grant writes (a renewal reads and writes only what it needs).
GRANT_FIELDS = [
    "access_token",
    "refresh_token",
    "access_expires_at",
    "refresh_issued_at",
    "scope",
    "state",
    "last_renewed_at",
    "last_error",
    "consecutive_failures",
    "next_attempt_at",
    "updated_at",
]


def store_grant(
    pair: TokenPair, *, access_token: str, refresh_token: str, expires_at: datetime, scope: str, now: datetime
) -> None:
    """A renewal's new pair onto the locked row (the refresh token just used is dead from now on)."""
    pair.access_token = access_token
    pair.refresh_token = refresh_token
    pair.access_expires_at = expires_at
    pair.refresh_issued_at = now
    if scope:
        pair.scope = scope
    pair.state = PairState.ACTIVE
    pair.last_renewed_at = now
    pair.last_error = ""
    pair.consecutive_failures = 0
    pair.next_attempt_at = None
    if not statements.update(pair, GRANT_FIELDS):  # as save(update_fields=...) would, for a row gone
        raise DatabaseError(f"token pair {pair.pk} was not stored: its row is gone")


def store_issued(
    *,
    portal: Portal,
    user_id: int,
    access_token: str,
    refresh_token: str,
    expires_in: int,
    scope: str,
    background: bool,
) -> TokenPair:
    """A pair Bitrix24 handed over (an install, an update, a launch with a new refresh token): the user's
    row, created or overwritten, active; `background` makes it the portal's background pair."""
    now = timezone.now()
    if background:
        _unmark_background(portal, keep_user_id=user_id)
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


def take_access_token(
    *,
    pair_id: int,
    portal: Portal,
    user_id: int,
    is_background: bool,
    access_token: str,
    expires_at: datetime,
) -> TokenPair | None:
    """A repeat launch's fresh access token onto the user's active pair (its refresh token stays ours).
    None when the pair is no longer active: the caller stores the launch's whole pair instead.

    A renewal holds the pair's row lock, not the portal's: the state is checked by the write itself."""
    working = TokenPair.from_db(
        connection.alias,
        ["id", "portal_id", "user_id", "is_background", "access_token", "access_expires_at"],
        [pair_id, portal.pk, user_id, is_background, access_token, expires_at],
    )  # the rest of the row is read if asked for
    if statements.update(
        working, ["access_token", "access_expires_at", "updated_at"], state=PairState.ACTIVE
    ):
        return working
    return None


def make_background(portal: Portal, pair: TokenPair) -> None:
    """`pair` becomes the portal's one background pair (staff approving a pending portal)."""
    _unmark_background(portal, keep_user_id=None)
    TokenPair.objects.filter(pk=pair.pk).update(is_background=True)


def _unmark_background(portal: Portal, *, keep_user_id: int | None) -> None:
    others = TokenPair.objects.filter(portal=portal, is_background=True)
    if keep_user_id is not None:
        others = others.exclude(user_id=keep_user_id)
    others.update(is_background=False)
