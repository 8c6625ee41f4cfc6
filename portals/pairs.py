"""Every write of token material (access and refresh tokens, their times and scope) and of the background
mark: a pair issued by an install or a launch, the access token a repeat launch brings, a renewal's grant,
and the choice of the background pair. The hot paths' statements are written out (portals.statements);
`tests/test_statements.py` checks they store what the ORM would.

Refusals and losses of a pair (its state after a failed renewal) stay with renewal, which decides them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import DatabaseError, connection
from django.db.models import Exists, OuterRef, Subquery
from django.utils import timezone

from . import statements
from .models import PairState, Portal, TokenPair

# --- the hot paths' reads, written out once per process --------------------------------------------------

# A launch neither reads nor writes the application tokens (decrypting and encrypting them is most of
# what a launch would spend on the portal row).
NOT_IN_A_LAUNCH = ("application_token", "pending_application_token")


# A launch is the most frequent request a portal sends. Its two reads are written out once per process
# (see portals.statements): building the locked read's SQL through the ORM on every launch cost more
# CPU than the rest of the launch.
@dataclass(frozen=True)
class _LaunchSQL:
    names: list[str]  # the portal fields the locked read loads
    generation: str  # params: member_id
    locked: str  # params: True, active, user_id, active, member_id


@functools.cache
def _launch_sql() -> _LaunchSQL:
    names = [f.name for f in Portal._meta.concrete_fields if f.name not in NOT_IN_A_LAUNCH]
    pair, pk = TokenPair, statements.column(Portal, "pk", "p")

    def of(alias: str, name: str) -> str:
        return statements.column(TokenPair, name, alias)

    # Only the portal's row: the pairs are only looked at (a renewal holds a pair's row lock).
    lock = statements.lock_clause("p")
    # Names from the models' metadata, quoted; every value is a parameter.
    locked = (
        f"SELECT {', '.join(statements.column(Portal, n, 'p') for n in names)},"  # noqa: S608
        f" {of('b', 'pk')} IS NOT NULL AS has_background,"
        f" {of('m', 'pk')} AS my_pair_id, {of('m', 'is_background')} AS my_pair_is_background"
        f" FROM {statements.table(Portal)} p"
        # At most one of each: one background pair per portal, one pair per portal and user.
        f" LEFT JOIN {statements.table(pair)} b ON {of('b', 'portal')} = {pk}"
        f" AND {of('b', 'is_background')} = %s AND {of('b', 'state')} = %s"
        f" LEFT JOIN {statements.table(pair)} m ON {of('m', 'portal')} = {pk}"
        f" AND {of('m', 'user_id')} = %s AND {of('m', 'state')} = %s"
        f" WHERE {statements.column(Portal, 'member_id', 'p')} = %s{lock}"
    )
    generation = (
        f"SELECT {statements.column(Portal, 'install_generation')} FROM {statements.table(Portal)}"  # noqa: S608
        f" WHERE {statements.column(Portal, 'member_id')} = %s"
    )
    return _LaunchSQL(names=names, generation=generation, locked=locked)


def launch_portal(member_id: str, user_id: int | None) -> Portal | None:
    """The portal row, locked, with `has_background`, `my_pair_id` and `my_pair_is_background`."""
    sql = _launch_sql()
    active = PairState.ACTIVE.value
    params = [True, active, -1 if user_id is None else user_id, active, member_id]
    return statements.fetch_one(Portal, sql.locked, params, sql.names)


def launch_annotations(user_id: int | None) -> dict[str, Any]:
    """What `launch_portal` reads beside the portal, for a portal first seen: created, or read with these
    if a concurrent launch created it first."""
    active = TokenPair.objects.filter(portal=OuterRef("pk"), state=PairState.ACTIVE)
    mine = active.filter(user_id=user_id if user_id is not None else -1)
    return {
        "has_background": Exists(active.filter(is_background=True)),
        "my_pair_id": Subquery(mine.values("pk")[:1]),
        "my_pair_is_background": Subquery(mine.values("is_background")[:1]),
    }


def install_generation(member_id: str) -> int:
    """The claimed portal's install generation (0 for a portal never seen): every request from a portal asks."""
    with connection.cursor() as cursor:
        cursor.execute(_launch_sql().generation, [member_id])
        row = cursor.fetchone()
    return int(row[0]) if row else 0


# What the sweep's renewals read of a pair under its lock: enough to decide, to journal, to store and
# to log (its access token, scope and the portal's other columns are never needed there).
_NARROW_PAIR = (
    "id",
    "portal",
    "user_id",
    "is_background",
    "refresh_token",
    "access_expires_at",
    "refresh_issued_at",
    "state",
    "consecutive_failures",
    "last_error",
)
_NARROW_PORTAL = ("id", "member_id", "oauth_server", "state", "reinstall_cause")


@functools.cache
def _narrow_sql() -> tuple[list[str], list[str], str]:
    """The sweep's locked read, written out once per process (portals.statements): a renewal makes it
    twice, and building it through the ORM each time was the largest part of a renewal's CPU."""
    pair_names = [f.name for f in TokenPair._meta.concrete_fields if f.name in _NARROW_PAIR]
    portal_names = [f.name for f in Portal._meta.concrete_fields if f.name in _NARROW_PORTAL]
    columns = [statements.column(TokenPair, n, "t") for n in pair_names]
    columns += [statements.column(Portal, n, "p") for n in portal_names]
    # Names from the models' metadata, quoted; the one value is a parameter.
    sql = (
        f"SELECT {', '.join(columns)} FROM {statements.table(TokenPair)} t"  # noqa: S608
        f" INNER JOIN {statements.table(Portal)} p"
        f" ON {statements.column(TokenPair, 'portal', 't')} = {statements.column(Portal, 'pk', 'p')}"
        f" WHERE {statements.column(TokenPair, 'pk', 't')} = %s{statements.lock_clause('t')}"
    )
    return pair_names, portal_names, sql


def locked_for_sweep(pair_id: int) -> TokenPair:
    """The pair under its row lock with the few portal columns a sweep renewal needs (`_narrow_sql`)."""
    pair_names, portal_names, sql = _narrow_sql()
    pair = statements.fetch_one(TokenPair, sql, [pair_id], pair_names, related=("portal", portal_names))
    if pair is None:
        raise TokenPair.DoesNotExist("TokenPair matching query does not exist.")
    return pair


# --- writes ---------------------------------------------------------------------------------------------

# What a renewal's grant writes (a renewal reads and writes only what it needs).
GRANT_FIELDS = [
    "access_token",
    "refresh_token",
    "access_expires_at",
    "refresh_issued_at",
    "scope",
    "state",
    "last_renewed_at",
    "refresh_ours",
    "access_ours",
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
    # Ours alone: only this process saw the answer (the journal's copy aside).
    pair.refresh_ours = True
    pair.access_ours = True
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
    # Handed over: whoever handed them may have kept them (or a frame may refresh them away).
    pair.refresh_ours = False
    pair.access_ours = False
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
        ["id", "portal_id", "user_id", "is_background", "access_token", "access_expires_at", "access_ours"],
        # The frame that handed it may refresh it away: its refusal proves nothing (services.check_uninstalled).
        [pair_id, portal.pk, user_id, is_background, access_token, expires_at, False],
    )  # the rest of the row is read if asked for
    if statements.update(
        working, ["access_token", "access_expires_at", "access_ours", "updated_at"], state=PairState.ACTIVE
    ):
        return working
    return None


def make_background(portal: Portal, *, pair: TokenPair) -> None:
    """`pair` becomes the portal's one background pair (staff approving a pending portal)."""
    _unmark_background(portal, keep_user_id=None)
    TokenPair.objects.filter(pk=pair.pk).update(is_background=True)


def _unmark_background(portal: Portal, *, keep_user_id: int | None) -> None:
    others = TokenPair.objects.filter(portal=portal, is_background=True)
    if keep_user_id is not None:
        others = others.exclude(user_id=keep_user_id)
    others.update(is_background=False)
